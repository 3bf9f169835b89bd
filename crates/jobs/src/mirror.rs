//! `blockdev-mirror` (and active `block-commit`, which is a mirror into
//! the base): copy a disk to a target while the guest keeps writing, stay
//! in sync once `ready`, and on `complete` put the target in the source's
//! place in every parent.
//!
//! A `mirror_top` filter above the source sees every guest write. In
//! `background` copy mode it marks the written granules dirty and the job
//! copies them again; in `write-blocking` mode the write also goes to the
//! target before it completes, serialised against the job's own copies of
//! the same granules, so the target never falls behind once in sync.
//!
//! `prepare` drains the source (the guest is quiesced), copies what is
//! still dirty, and — for `complete` — drops the filter and replaces the
//! source by the target in one transaction. A soft cancel after `ready`
//! leaves a consistent copy without the pivot.

use crate::bitmap::{Busy, DirtyBitmap};
use crate::chain::{allocated_above, skip_filters};
use crate::commit::{make_writable, restore_read_only};
use crate::filters::{
    copy_roots, insert_filter, remove_filter, FilterHooks, GuestWrite, JobFilter, WriteKind,
};
use crate::job::{ErrorAction, Job, JobDriver, JobManager, JobOptions};
use async_trait::async_trait;
use parking_lot::Mutex;
use sluice_core::{
    DriverStatus, Error, Graph, IoBuf, Node, Perm, PermPair, Result, Role, Root, WriteFlags,
    ZeroFlags,
};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Weak};

/// Copies a mirror runs at once (QEMU's `MAX_IN_FLIGHT`).
const MAX_IN_FLIGHT: usize = 16;

/// QEMU's `MirrorSyncMode` for what is copied at the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// The whole disk as the source shows it.
    Full,
    /// What the source's top layer (above `base`) holds.
    Top,
    /// Nothing at first: only what the guest writes from now on.
    None,
}

impl SyncMode {
    pub fn parse(s: &str) -> Result<SyncMode> {
        match s {
            "full" => Ok(SyncMode::Full),
            "top" => Ok(SyncMode::Top),
            "none" => Ok(SyncMode::None),
            other => Err(Error::Other(format!(
                "Parameter 'sync' does not accept value '{other}'"
            ))),
        }
    }
}

/// QEMU's `MirrorCopyMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    Background,
    WriteBlocking,
}

impl CopyMode {
    pub fn parse(s: &str) -> Result<CopyMode> {
        match s {
            "background" => Ok(CopyMode::Background),
            "write-blocking" => Ok(CopyMode::WriteBlocking),
            other => Err(Error::Other(format!(
                "Parameter 'copy-mode' does not accept value '{other}'"
            ))),
        }
    }
}

/// What `blockdev-mirror` asks for, with its nodes resolved.
pub struct MirrorParams {
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub sync: SyncMode,
    /// For `sync: top`: the layer below the copied ones (default: the
    /// source's backing node).
    pub base: Option<Arc<Node>>,
    /// Dirty-tracking granule in bytes, a power of two from 512 B to 64 MiB.
    pub granularity: u64,
    /// Bytes copied per step (`buf-size`).
    pub buf_size: u64,
    pub copy_mode: CopyMode,
    pub filter_node_name: Option<String>,
}

impl MirrorParams {
    pub fn new(source: &Arc<Node>, target: &Arc<Node>, sync: SyncMode) -> MirrorParams {
        MirrorParams {
            source: source.clone(),
            target: target.clone(),
            sync,
            base: None,
            granularity: 64 << 10,
            buf_size: 16 << 20,
            copy_mode: CopyMode::Background,
            filter_node_name: None,
        }
    }
}

/// What the filter and the job share.
struct Shared {
    dirty: Mutex<DirtyBitmap>,
    busy: Busy,
    mode: CopyMode,
    /// The job's root on the target, for write-blocking writes.
    target: Mutex<Option<Arc<Root>>>,
    job: Mutex<Weak<Job>>,
    is_commit: bool,
}

impl Shared {
    fn mark_dirty(&self, offset: u64, len: u64) {
        self.dirty.lock().set(offset, len);
        if let Some(job) = self.job.lock().upgrade() {
            job.kick();
        }
    }

    fn target(&self) -> Result<Arc<Root>> {
        self.target
            .lock()
            .clone()
            .ok_or_else(|| Error::Other("the mirror has no target any more".into()))
    }
}

/// QEMU's `mirror_top`: the filter that sees every guest write.
struct MirrorTop {
    shared: Arc<Shared>,
}

#[async_trait]
impl FilterHooks for MirrorTop {
    fn driver_name(&self) -> &'static str {
        "mirror_top"
    }

    fn child_perm(&self, parents: PermPair) -> PermPair {
        if self.shared.is_commit {
            // The job writes the base below: force-share writing down the
            // chain (QEMU's mirror_top does the same for commit).
            PermPair::new(
                parents.perm & !Perm::CONSISTENT_READ,
                parents.shared | Perm::WRITE,
            )
        } else {
            parents
        }
    }

    /// Runs a guest write on the source, then keeps the target in step.
    async fn write(&self, child: &Arc<Node>, w: GuestWrite) -> Result<()> {
        let through =
            matches!(w.kind, WriteKind::Data(..) | WriteKind::Zeroes(_)) && !w.is_copy_up();
        if self.shared.mode == CopyMode::WriteBlocking && through {
            let _g = self.shared.busy.lock(w.offset, w.len).await;
            w.on_node(child).await?;
            match self.shared.target() {
                Ok(t) => w.on_root(&t).await,
                Err(_) => Ok(()), // completed: the target is the disk now
            }
        } else {
            let r = w.on_node(child).await;
            // A discarded range may read back as anything: recopy it too.
            self.shared.mark_dirty(w.offset, w.len);
            r
        }
    }
}

struct Mirror {
    params: MirrorParams,
    shared: Arc<Shared>,
    filter: Mutex<Option<Arc<Node>>>,
    source_root: Mutex<Option<Arc<Root>>>,
    should_complete: AtomicBool,
    job_type: &'static str,
    /// An active commit's base that the job made writable: read-only
    /// again at the end, unless it took the active layer's place.
    reopened_base: Mutex<Option<Arc<Node>>>,
}

/// Starts a mirror of `params.source` to `params.target`.
pub async fn start(jobs: &JobManager, opts: JobOptions, params: MirrorParams) -> Result<Arc<Job>> {
    start_as(jobs, opts, params, "mirror").await
}

/// Starts an active commit: `top` (the active layer) mirrored into `base`
/// below it; `complete` puts base in top's place.
pub async fn start_active_commit(
    jobs: &JobManager,
    opts: JobOptions,
    top: &Arc<Node>,
    base: &Arc<Node>,
    filter_node_name: Option<&str>,
) -> Result<Arc<Job>> {
    crate::chain::intermediates(top, Some(base))?;
    let mut p = MirrorParams::new(top, base, SyncMode::Top);
    p.base = Some(base.clone());
    p.filter_node_name = filter_node_name.map(str::to_string);
    start_as(jobs, opts, p, "commit").await
}

async fn start_as(
    jobs: &JobManager,
    opts: JobOptions,
    params: MirrorParams,
    job_type: &'static str,
) -> Result<Arc<Job>> {
    let g = params.granularity;
    if !(512..=64 << 20).contains(&g) || !g.is_power_of_two() {
        return Err(Error::Other(
            "Granularity must be a power of 2 between 512 and 64M".into(),
        ));
    }
    let (source, target) = (&params.source, &params.target);
    if Arc::ptr_eq(source, target) {
        return Err(Error::Other("Can't mirror node into itself".into()));
    }
    let is_commit = job_type == "commit";
    if !is_commit && source.size() != target.size() {
        return Err(Error::Other(
            "Source and target image have different sizes".into(),
        ));
    }
    if is_commit && target.size() < source.size() {
        return Err(Error::Other(format!(
            "Top image '{}' is larger than base image '{}'",
            source.name(),
            target.name()
        )));
    }
    let shared = Arc::new(Shared {
        dirty: Mutex::new(DirtyBitmap::new(source.size(), g)),
        busy: Busy::default(),
        mode: params.copy_mode,
        target: Mutex::new(None),
        job: Mutex::new(Weak::new()),
        is_commit,
    });
    let w = jobs.graph().writer().await;
    let reopened = if is_commit {
        make_writable(&w, target).await?
    } else {
        None
    };
    let filter = match insert_filter(
        &w,
        source,
        Box::new(JobFilter(MirrorTop {
            shared: shared.clone(),
        })),
        params.filter_node_name.as_deref(),
    )
    .await
    {
        Ok(f) => f,
        Err(e) => {
            restore_read_only(&w, reopened).await;
            return Err(e);
        }
    };
    let (source_root, target_root) = match copy_roots(&w, &opts.id, source, target).await {
        Ok(r) => r,
        Err(e) => {
            remove_filter(&w, source, &filter).await;
            restore_read_only(&w, reopened).await;
            return Err(e);
        }
    };
    drop(w);
    *shared.target.lock() = Some(Arc::new(target_root));
    let source = source.clone();
    let driver = Mirror {
        params,
        shared: shared.clone(),
        filter: Mutex::new(Some(filter.clone())),
        source_root: Mutex::new(Some(Arc::new(source_root))),
        should_complete: AtomicBool::new(false),
        job_type,
        reopened_base: Mutex::new(reopened.clone()),
    };
    match jobs.create(opts, Box::new(driver), None) {
        Ok(job) => {
            *shared.job.lock() = Arc::downgrade(&job);
            jobs.start(&job);
            Ok(job)
        }
        Err(e) => {
            shared.target.lock().take();
            let w = jobs.graph().writer().await;
            remove_filter(&w, &source, &filter).await;
            restore_read_only(&w, reopened).await;
            Err(e)
        }
    }
}

impl Mirror {
    /// Marks what the sync mode copies at the start.
    async fn initial_dirty(&self, root: &Root) -> Result<()> {
        let p = &self.params;
        let size = p.source.size();
        match p.sync {
            SyncMode::None => {}
            SyncMode::Full => self.shared.dirty.lock().set(0, size),
            SyncMode::Top => {
                let base = match &p.base {
                    Some(b) => Some(b.clone()),
                    None => skip_filters(&p.source).child(Role::Backing),
                };
                let mut off = 0;
                while off < size {
                    let (alloc, n) = {
                        let _a = root.admit().await;
                        allocated_above(&p.source, base.as_ref(), off, size - off).await?
                    };
                    if alloc {
                        self.shared.dirty.lock().set(off, n);
                    }
                    off += n;
                }
            }
        }
        Ok(())
    }

    /// Copies one run from source to target: zeroes as zeroes.
    async fn copy_run(
        &self,
        source: &Node,
        target: &Root,
        off: u64,
        len: u64,
    ) -> (bool, Result<()>) {
        let st = match source.block_status(off, len).await {
            Ok(s) => s,
            Err(e) => return (true, Err(e)),
        };
        if let DriverStatus::Zero { len: zl, .. } = st {
            if zl >= len {
                return (
                    false,
                    target.write_zeroes(off, len, ZeroFlags::default()).await,
                );
            }
        }
        let mut buf = IoBuf::recycled(len as usize);
        if let Err(e) = source.read(off, buf.as_read_buf()).await {
            return (true, Err(e));
        }
        (
            false,
            target.write(off, buf.freeze(), WriteFlags::default()).await,
        )
    }

    /// Takes up to [`MAX_IN_FLIGHT`] dirty runs and copies them at once
    /// (QEMU's mirror keeps up to 16 operations in flight); `Ok(false)`
    /// when nothing was dirty. All of them finish before it returns, so
    /// the job never parks with a request of its own in flight.
    async fn copy_batch(
        &self,
        job: &Job,
        root: &Root,
        target: &Root,
        cursor: &mut u64,
    ) -> Result<bool> {
        let chunk =
            (self.params.buf_size / MAX_IN_FLIGHT as u64).clamp(self.params.granularity, 4 << 20);
        let mut runs = Vec::new();
        {
            let mut dirty = self.shared.dirty.lock();
            while runs.len() < MAX_IN_FLIGHT {
                let Some((off, len)) = dirty.next_run(*cursor, chunk) else {
                    break;
                };
                // Cleared before reading: a guest write from now on sets
                // it again.
                dirty.clear(off, len);
                *cursor = off + len;
                runs.push((off, len));
            }
        }
        if runs.is_empty() {
            return Ok(false);
        }
        let copies = runs.iter().map(|&(off, len)| async move {
            let _busy = self.shared.busy.lock(off, len).await;
            let _admitted = root.admit().await;
            let (is_read, r) = self.copy_run(&self.params.source, target, off, len).await;
            (off, len, is_read, r)
        });
        let mut failure = None;
        for (off, len, is_read, r) in futures::future::join_all(copies).await {
            match r {
                Ok(()) => job.progress_update(len),
                Err(e) => {
                    self.shared.dirty.lock().set(off, len);
                    failure.get_or_insert((is_read, e));
                }
            }
        }
        if let Some((is_read, e)) = failure {
            if job.error_action(is_read, &e) == ErrorAction::Report {
                return Err(e);
            }
        }
        Ok(true)
    }
}

#[async_trait]
impl JobDriver for Mirror {
    fn job_type(&self) -> &'static str {
        self.job_type
    }

    async fn run(&self, job: &Arc<Job>) -> Result<()> {
        let root = self
            .source_root
            .lock()
            .clone()
            .ok_or_else(|| Error::Other("the mirror has no source root".into()))?;
        let target = self.shared.target()?;
        self.initial_dirty(&root).await?;
        let mut cursor = 0;
        let mut ready = false;
        loop {
            if job.is_cancelled() {
                return Ok(());
            }
            let remaining = self.shared.dirty.lock().count_bytes();
            job.progress_set_remaining(remaining);
            if remaining == 0 {
                if !ready {
                    job.transition_to_ready();
                    ready = true;
                }
                if self.should_complete.load(SeqCst) || job.cancel_requested() {
                    return Ok(());
                }
                // In sync: wait for a guest write, complete or cancel.
                job.yield_until_kicked().await;
                job.pause_point().await;
                continue;
            }
            job.rate_limit(0).await;
            if job.is_cancelled() {
                return Ok(());
            }
            let before = job.progress().0;
            self.copy_batch(job, &root, &target, &mut cursor).await?;
            let copied = job.progress().0 - before;
            job.rate_limit(copied).await;
        }
    }

    fn complete(&self, _job: &Job) -> Result<()> {
        self.should_complete.store(true, SeqCst);
        Ok(())
    }

    fn cancel(&self, job: &Job, force: bool) -> bool {
        // A soft cancel of a job in sync finishes it without the pivot.
        force || !job.status().is_ready()
    }

    async fn prepare(&self, graph: &Graph) -> Result<()> {
        let p = &self.params;
        self.source_root.lock().take();
        let target = self.shared.target()?;
        let w = graph.writer().await;
        let drained = w.drain(&p.source).await;
        // The guest is quiesced: whatever is still dirty is the last of it.
        loop {
            let next = self.shared.dirty.lock().next_run(0, 4 << 20);
            let Some((off, len)) = next else { break };
            self.shared.dirty.lock().clear(off, len);
            if let (_, Err(e)) = self.copy_run(&p.source, &target, off, len).await {
                self.shared.dirty.lock().set(off, len);
                return Err(e);
            }
        }
        target.flush().await?;
        if !self.should_complete.load(SeqCst) {
            return Ok(()); // a soft cancel: a consistent copy, no pivot
        }
        // The target's writer leaves before it takes the source's users.
        self.shared.target.lock().take();
        drop(target);
        let filter = self.filter.lock().clone();
        let mut tx = w.transaction();
        let staged = (|| {
            if let Some(f) = &filter {
                tx.drop_filter(&drained, f)?;
            }
            tx.replace_node(&drained, &p.source, &p.target)
        })();
        match staged {
            Ok(()) => tx.commit().await?,
            Err(e) => return Err(e),
        }
        self.filter.lock().take();
        // The base is the active layer now: it stays writable.
        self.reopened_base.lock().take();
        Ok(())
    }

    async fn clean(&self, graph: &Graph) {
        self.source_root.lock().take();
        self.shared.target.lock().take();
        let filter = self.filter.lock().take();
        let base = self.reopened_base.lock().take();
        let w = graph.writer().await;
        if let Some(f) = filter {
            remove_filter(&w, &self.params.source, &f).await;
        }
        restore_read_only(&w, base).await;
    }
}
