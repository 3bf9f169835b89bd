//! Serialisation of overlapping writes on nodes with a request alignment,
//! so that a read-modify-write of a partial block never races another write
//! to the same block.

use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    released: Notify,
    next_id: std::sync::atomic::AtomicU64,
}

pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub(crate) async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = self.held.lock();
                if !held.iter().any(|&(_, s, e)| s < end && start < e) {
                    held.push((id, start, end));
                    return RangeGuard { locks: self, id };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.locks.held.lock().retain(|&(id, _, _)| id != self.id);
        self.locks.released.notify_waiters();
    }
}
