//! `blockdev-backup`: copy the disk *as it was when the job started* to a
//! target while the guest keeps writing.
//!
//! A `copy-before-write` filter goes above the source; before a guest
//! write changes a cluster that the target has not received yet, the
//! filter copies the cluster's old contents to the target. The job copies
//! the remaining clusters in order. A cluster is copied once: a bitmap
//! says which are still owed, and a cluster being copied (by the filter or
//! the job) is locked against the other. The set of clusters owed is
//! taken inside the drained section that inserts the filter, so no write
//! slips in between. `prepare` drops the filter, drained.

use crate::bitmap::{Busy, DirtyBitmap};
use crate::chain::allocated_above;
use crate::filters::{
    copy_roots, insert_filter, remove_filter, FilterHooks, GuestWrite, JobFilter,
};
use crate::job::{ErrorAction, Job, JobDriver, JobManager, JobOptions, JobTxn};
use crate::mirror::SyncMode;
use async_trait::async_trait;
use parking_lot::Mutex;
use sluice_core::{
    DriverStatus, Error, Graph, IoBuf, Node, Result, Role, Root, WriteFlags, ZeroFlags,
};
use std::sync::Arc;

/// Windows (of up to `MAX_RUN`) the job copies at once.
const IN_FLIGHT: u64 = 4;

/// What `blockdev-backup` asks for, with its nodes resolved.
pub struct BackupParams {
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub sync: SyncMode,
    /// Copy unit in bytes (QEMU uses the target's cluster size, ≥ 64 KiB).
    pub cluster_size: u64,
    pub filter_node_name: Option<String>,
}

impl BackupParams {
    pub fn new(source: &Arc<Node>, target: &Arc<Node>, sync: SyncMode) -> BackupParams {
        BackupParams {
            source: source.clone(),
            target: target.clone(),
            sync,
            cluster_size: 64 << 10,
            filter_node_name: None,
        }
    }
}

/// What the filter and the job share.
struct State {
    /// Clusters the target has not received yet.
    owed: Mutex<DirtyBitmap>,
    busy: Busy,
    target: Mutex<Option<Arc<Root>>>,
}

impl State {
    /// Copies the owed clusters of `[offset, offset + len)` from `source`
    /// to the target. Returns whether a failure was in reading.
    async fn copy(
        &self,
        source: &Node,
        offset: u64,
        len: u64,
    ) -> std::result::Result<u64, (bool, Error)> {
        let target = self.target.lock().clone().ok_or_else(|| {
            (
                false,
                Error::Other("the backup has no target any more".into()),
            )
        })?;
        let cs = self.owed.lock().granularity();
        let size = source.size();
        let mut copied = 0;
        let end = (offset + len).min(size);
        let mut pos = offset / cs * cs;
        while pos < end {
            // A run of owed clusters, copied with as few requests as its
            // status allows (QEMU's block-copy: up to 1 MiB at once).
            let owed_from = |at: u64| {
                let owed = self.owed.lock();
                let mut run = 0;
                while at + run < end && run < MAX_RUN && owed.is_set((at + run) / cs) {
                    run += cs;
                }
                run.min(size - at)
            };
            if owed_from(pos) == 0 {
                pos += cs;
                continue;
            }
            // The range this call may copy, and no more: windows side by
            // side do not wait for each other.
            let reach = MAX_RUN.min(end.div_ceil(cs) * cs - pos).min(size - pos);
            let _g = self.busy.lock(pos, reach).await;
            // Copied meanwhile (by a guest write's copy-before-write)?
            let run = owed_from(pos);
            if run == 0 {
                pos += cs;
                continue;
            }
            let run_end = pos + run;
            let mut p = pos;
            while p < run_end {
                let rest = run_end - p;
                let (n, zero) = match source.block_status(p, rest).await {
                    Ok(DriverStatus::Zero { len, .. }) if len >= rest => (rest, true),
                    Ok(DriverStatus::Zero { len, .. }) if len >= cs => (len / cs * cs, true),
                    // Data (or a zero run shorter than a cluster) goes in
                    // whole clusters.
                    Ok(st) => (
                        st.len().div_ceil(cs).saturating_mul(cs).max(cs).min(rest),
                        false,
                    ),
                    Err(_) => (rest, false),
                };
                if zero {
                    target
                        .write_zeroes(p, n, ZeroFlags::default())
                        .await
                        .map_err(|e| (false, e))?;
                } else {
                    let mut buf = IoBuf::recycled(n as usize);
                    source
                        .read(p, buf.as_read_buf())
                        .await
                        .map_err(|e| (true, e))?;
                    target
                        .write(p, buf.freeze(), WriteFlags::default())
                        .await
                        .map_err(|e| (false, e))?;
                }
                self.owed.lock().clear(p, n);
                copied += n;
                p += n;
            }
            pos = run_end;
        }
        Ok(copied)
    }
}

/// The most one copy step moves (QEMU's block-copy buffer).
const MAX_RUN: u64 = 1 << 20;

/// QEMU's `copy-before-write` filter.
struct CopyBeforeWrite {
    state: Arc<State>,
}

#[async_trait]
impl FilterHooks for CopyBeforeWrite {
    fn driver_name(&self) -> &'static str {
        "copy-before-write"
    }

    async fn write(&self, child: &Arc<Node>, w: GuestWrite) -> Result<()> {
        if !w.is_copy_up() {
            // As QEMU's default `on-cbw-error=break-guest-write`: a write
            // whose old data cannot be saved fails.
            self.state
                .copy(child, w.offset, w.len)
                .await
                .map_err(|(_, e)| e)?;
        }
        w.on_node(child).await
    }
}

struct Backup {
    params: BackupParams,
    state: Arc<State>,
    filter: Mutex<Option<Arc<Node>>>,
    source_root: Mutex<Option<Arc<Root>>>,
}

/// Starts a backup of `params.source` into `params.target`.
pub async fn start(jobs: &JobManager, opts: JobOptions, params: BackupParams) -> Result<Arc<Job>> {
    start_in(jobs, opts, params, None).await
}

/// Starts a backup as a member of `txn` (a `transaction` with
/// `completion-mode: grouped`): the group finalizes or aborts together.
pub async fn start_in(
    jobs: &JobManager,
    opts: JobOptions,
    params: BackupParams,
    txn: Option<Arc<JobTxn>>,
) -> Result<Arc<Job>> {
    let job = create_in(jobs, opts, params, txn).await?;
    jobs.start(&job);
    Ok(job)
}

/// Creates a backup job with its filter in place and the point in time
/// fixed, but does not start it (a `transaction` starts its jobs once
/// every action succeeded, and cancels them otherwise — which takes the
/// filter out again).
pub async fn create_in(
    jobs: &JobManager,
    opts: JobOptions,
    params: BackupParams,
    txn: Option<Arc<JobTxn>>,
) -> Result<Arc<Job>> {
    let (source, target) = (&params.source, &params.target);
    if Arc::ptr_eq(source, target) {
        return Err(Error::Other("Source and target cannot be the same".into()));
    }
    if target.size() < source.size() {
        return Err(Error::Other(format!(
            "Target '{}' is smaller than source '{}'",
            target.name(),
            source.name()
        )));
    }
    let cs = params.cluster_size;
    if !cs.is_power_of_two() || cs < 512 {
        return Err(Error::Other(
            "cluster size must be a power of two of at least 512".into(),
        ));
    }
    let w = jobs.graph().writer().await;
    let (source_root, target_root) = copy_roots(&w, &opts.id, source, target).await?;
    // The point in time: what is owed is decided while nothing writes,
    // and the filter is in place before anything can write again.
    let drained = w.drain(source).await;
    let mut owed = DirtyBitmap::new(source.size(), cs);
    match params.sync {
        // With `none` the job copies nothing itself, but every cluster is
        // still saved on its first overwrite.
        SyncMode::Full | SyncMode::None => owed.set(0, source.size()),
        SyncMode::Top => {
            let base = source.child(Role::Backing);
            let mut off = 0;
            while off < source.size() {
                let (alloc, n) =
                    allocated_above(source, base.as_ref(), off, source.size() - off).await?;
                if alloc {
                    owed.set(off, n);
                }
                off += n;
            }
        }
    }
    let state = Arc::new(State {
        owed: Mutex::new(owed),
        busy: Busy::default(),
        target: Mutex::new(Some(Arc::new(target_root))),
    });
    let filter = insert_filter(
        &w,
        source,
        Box::new(JobFilter(CopyBeforeWrite {
            state: state.clone(),
        })),
        params.filter_node_name.as_deref(),
    )
    .await?;
    drop(drained);
    drop(w);
    let source = source.clone();
    let driver = Backup {
        params,
        state,
        filter: Mutex::new(Some(filter.clone())),
        source_root: Mutex::new(Some(Arc::new(source_root))),
    };
    match jobs.create(opts, Box::new(driver), txn) {
        Ok(job) => Ok(job),
        Err(e) => {
            let w = jobs.graph().writer().await;
            remove_filter(&w, &source, &filter).await;
            Err(e)
        }
    }
}

#[async_trait]
impl JobDriver for Backup {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    async fn run(&self, job: &Arc<Job>) -> Result<()> {
        let root = self
            .source_root
            .lock()
            .clone()
            .ok_or_else(|| Error::Other("the backup has no source root".into()))?;
        if self.params.sync == SyncMode::None {
            // Only the filter copies: the job lasts until it is cancelled.
            while !job.cancel_requested() {
                job.yield_until_kicked().await;
                job.pause_point().await;
            }
            return Ok(());
        }
        let total = self.state.owed.lock().count_bytes();
        job.progress_set_remaining(total);
        let (cs, size) = (self.params.cluster_size, self.params.source.size());
        let mut off = 0;
        let mut last = 0;
        while off < size {
            job.rate_limit(last).await;
            if job.is_cancelled() {
                return Ok(());
            }
            // IN_FLIGHT windows of up to MAX_RUN at a time, copied at once;
            // a failed step is retried whole (clusters already copied are
            // skipped).
            let window = MAX_RUN.max(cs) / cs * cs;
            let n = (window * IN_FLIGHT).min(size - off);
            let r = {
                let _a = root.admit().await;
                let copies = (off..off + n).step_by(window as usize).map(|o| {
                    self.state
                        .copy(&self.params.source, o, window.min(off + n - o))
                });
                futures::future::join_all(copies)
                    .await
                    .into_iter()
                    .try_fold(0, |sum, c| c.map(|c| sum + c))
            };
            match r {
                Ok(c) => {
                    off += n;
                    last = c;
                    // Clusters the filter copied count where the job passes.
                    job.progress_update(n.min(total.saturating_sub(job.progress().0)));
                }
                // As QEMU's backup, `ignore` retries like `stop` (a backup
                // with a hole is no backup); only `report` ends it.
                Err((is_read, e)) => match job.error_action(is_read, &e) {
                    ErrorAction::Stop | ErrorAction::Ignore => last = 0,
                    ErrorAction::Report => return Err(e),
                },
            }
        }
        Ok(())
    }

    async fn prepare(&self, graph: &Graph) -> Result<()> {
        let target = self.state.target.lock().clone();
        if let Some(t) = target {
            t.flush().await?;
        }
        let w = graph.writer().await;
        let drained = w.drain(&self.params.source).await;
        let filter = self.filter.lock().clone();
        if let Some(f) = filter {
            w.drop_filter(&drained, &f).await?;
            self.filter.lock().take();
        }
        Ok(())
    }

    async fn clean(&self, graph: &Graph) {
        self.source_root.lock().take();
        self.state.target.lock().take();
        let filter = self.filter.lock().take();
        if let Some(f) = filter {
            let w = graph.writer().await;
            remove_filter(&w, &self.params.source, &f).await;
        }
    }
}
