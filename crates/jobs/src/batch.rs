//! The copy loop stream and commit share: windows of a disk copied a
//! batch at a time, with the rate limit and a pause point between batches
//! and the job's `on-error` policy applied to a failed batch.

use crate::job::{ErrorAction, Job};
use sluice_core::{Error, Result};
use std::future::Future;

/// A failed window: whether the failure was in reading, and the error.
pub(crate) type WindowError = (bool, Error);

/// Runs `window(start, end)` over `[0, len)`: `in_flight` windows of
/// `chunk` bytes at once, each returning the bytes it copied. A batch ends
/// before the next pause point, so a parked job holds no request. A failed
/// batch is retried after `stop` (what was copied is skipped then), ends
/// the job after `report`, and is passed over after `ignore` — the job
/// then fails at the end, as QEMU's stream and commit do.
pub(crate) async fn copy_in_batches<F, Fut>(
    job: &Job,
    len: u64,
    chunk: u64,
    in_flight: u64,
    window: F,
) -> Result<()>
where
    F: Fn(u64, u64) -> Fut,
    Fut: Future<Output = std::result::Result<u64, WindowError>>,
{
    job.progress_set_remaining(len);
    let mut ignored = None;
    let (mut offset, mut last) = (0, 0);
    while offset < len {
        job.rate_limit(last).await;
        if job.is_cancelled() {
            break;
        }
        let end = (offset + chunk * in_flight).min(len);
        let windows = (offset..end)
            .step_by(chunk as usize)
            .map(|s| window(s, (s + chunk).min(end)));
        let mut copied = 0;
        let mut failed = None;
        for r in futures::future::join_all(windows).await {
            match r {
                Ok(c) => copied += c,
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        last = copied;
        match failed {
            None => {
                job.progress_update(end - offset);
                offset = end;
            }
            Some((is_read, e)) => match job.error_action(is_read, &e) {
                ErrorAction::Stop => last = 0,
                ErrorAction::Report => return Err(e),
                ErrorAction::Ignore => {
                    ignored.get_or_insert(e);
                    job.progress_update(end - offset);
                    offset = end;
                }
            },
        }
    }
    match ignored {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
