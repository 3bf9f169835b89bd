//! QMP commands for block jobs (`block-stream`, `block-commit`,
//! `blockdev-mirror`, `blockdev-backup`, the `job-*` and `block-job-*`
//! verbs, `query-jobs`, `query-block-jobs`) and
//! a few graph queries that go with them (`x-debug-query-block-graph`,
//! `query-blockstats`, `block_resize`), with QEMU's argument names,
//! defaults and error messages (`qapi/block-core.json`, `qapi/job.json`,
//! `blockdev.c`, `job-qmp.c`).
//!
//! Every [`JobEvent`] the jobs publish goes out through [`Qmp::emit`]. The
//! events a command causes go out before its reply, as in QEMU: the
//! command drains the queue itself before it returns.

use crate::qmp::{self, BoxFuture, Extension, Qmp, QmpError};
use serde_json::{json, Map, Value};
use sluice_core::{Graph, Node, Parent, Perm, PermPair, Role};
use sluice_jobs::backup::BackupParams;
use sluice_jobs::chain::skip_filters;
use sluice_jobs::commit::CommitParams;
use sluice_jobs::mirror::{CopyMode, MirrorParams, SyncMode};
use sluice_jobs::stream::StreamParams;
use sluice_jobs::{Job, JobEvent, JobManager, JobOptions, JobStatus, OnError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

/// The arguments every job command takes, as given.
#[derive(Default)]
struct CommonArgs {
    job_id: Option<String>,
    speed: Option<i64>,
    /// `on-error`, or a mirror's or backup's `on-source-error`.
    on_error: Option<String>,
    on_target_error: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

impl CommonArgs {
    fn take_auto(&mut self, a: &mut Map<String, Value>) -> Result<(), QmpError> {
        self.auto_finalize = qmp::take_bool(a, "auto-finalize")?;
        self.auto_dismiss = qmp::take_bool(a, "auto-dismiss")?;
        Ok(())
    }
}

/// The job commands of one graph.
pub struct JobCommands {
    jobs: JobManager,
    /// The job events not yet sent. Both the forwarding task and each
    /// command drain it under this lock, so events keep their order.
    events: Mutex<UnboundedReceiver<JobEvent>>,
}

const COMMANDS: &[&str] = &[
    "block-stream",
    "block-commit",
    "blockdev-mirror",
    "blockdev-backup",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "block-job-set-speed",
    "query-jobs",
    "query-block-jobs",
    "x-debug-query-block-graph",
    "query-blockstats",
    "block_resize",
    "blockdev-snapshot",
    "blockdev-create",
    "transaction",
];

impl JobCommands {
    pub fn new(graph: Graph) -> Arc<JobCommands> {
        let jobs = JobManager::new(graph);
        let events = Mutex::new(jobs.events().subscribe());
        Arc::new(JobCommands { jobs, events })
    }

    /// Sends every job event to `qmp`'s clients as it happens.
    pub fn forward_events(self: &Arc<Self>, qmp: &Qmp) -> JoinHandle<()> {
        use std::task::Poll;
        let this = self.clone();
        let qmp = qmp.clone();
        tokio::spawn(async move {
            // The lock is held only inside `poll`, never across a wait.
            let next = || {
                std::future::poll_fn(|cx| {
                    let mut rx = this.events.lock().unwrap_or_else(|p| p.into_inner());
                    match rx.poll_recv(cx) {
                        Poll::Ready(Some(ev)) => {
                            qmp.emit(ev.name, ev.data);
                            emit_queued(&mut rx, &qmp);
                            Poll::Ready(true)
                        }
                        Poll::Ready(None) => Poll::Ready(false),
                        Poll::Pending => Poll::Pending,
                    }
                })
            };
            while next().await {}
        })
    }

    /// Cancels every job and waits until each has concluded, as the
    /// storage daemon does when it exits: job filters leave the graph,
    /// and images stay as a cancelled job leaves them.
    pub async fn cancel_all(&self, qmp: &Qmp) {
        for job in self.jobs.list() {
            // A concluded job is dismissed (QEMU's job_cancel_sync_all).
            if job.status() == JobStatus::Concluded {
                let _ = job.dismiss();
                continue;
            }
            let _ = job.cancel(true).await;
            job.wait_concluded().await;
        }
        self.flush_events(qmp);
    }

    /// Sends the events queued so far (those a command just caused).
    fn flush_events(&self, qmp: &Qmp) {
        let mut rx = self.events.lock().unwrap_or_else(|p| p.into_inner());
        emit_queued(&mut rx, qmp);
    }

    async fn run(&self, name: &str, mut args: Map<String, Value>) -> Result<Value, QmpError> {
        let a = &mut args;
        let ret = match name {
            "block-stream" => self.block_stream(a).await?,
            "block-commit" => self.block_commit(a).await?,
            "blockdev-mirror" => self.blockdev_mirror(a).await?,
            "blockdev-backup" => self.blockdev_backup(a).await?,
            "query-jobs" => {
                qmp::no_args(a)?;
                Value::Array(self.jobs.list().iter().map(|j| j.info()).collect())
            }
            "query-block-jobs" => {
                qmp::no_args(a)?;
                Value::Array(
                    self.jobs
                        .list()
                        .iter()
                        .filter(|j| j.is_block_job())
                        .map(|j| j.block_info())
                        .collect(),
                )
            }
            "block-job-set-speed" => {
                let job = self.block_job(a, "device")?;
                let speed = take_int(a, "speed")?.ok_or_else(|| missing("speed"))?;
                qmp::no_args(a)?;
                if speed < 0 {
                    // QEMU checks the verb first: its error wins. Setting
                    // the speed the job has changes nothing.
                    job.set_speed(job.speed())?;
                    return Err(negative_speed());
                }
                job.set_speed(speed as u64)?;
                json!({})
            }
            "block-job-cancel" => {
                let device = take_string(a, "device")?.ok_or_else(|| missing("device"))?;
                let force = qmp::take_bool(a, "force")?.unwrap_or(false);
                qmp::no_args(a)?;
                let job = self.find_block_job(&device)?;
                if job.is_user_paused() && !force {
                    return Err(QmpError::generic(format!(
                        "The block job for device '{device}' is currently paused"
                    )));
                }
                job.cancel(force).await?;
                json!({})
            }
            _ => {
                let (job, verb) = match name.strip_prefix("job-") {
                    Some(verb) => (self.job(a)?, verb),
                    None => match name.strip_prefix("block-job-") {
                        Some(verb @ ("finalize" | "dismiss")) => (self.block_job(a, "id")?, verb),
                        Some(verb) => (self.block_job(a, "device")?, verb),
                        None => return self.run_graph_command(name, a).await,
                    },
                };
                qmp::no_args(a)?;
                match verb {
                    "pause" => job.pause()?,
                    "resume" => job.resume()?,
                    // `job-cancel` always forces (QEMU's qmp_job_cancel).
                    "cancel" => job.cancel(true).await?,
                    "complete" => job.complete()?,
                    "finalize" => job.finalize().await?,
                    "dismiss" => job.dismiss()?,
                    _ => return Err(not_found(name)),
                }
                json!({})
            }
        };
        Ok(ret)
    }

    async fn run_graph_command(
        &self,
        name: &str,
        a: &mut Map<String, Value>,
    ) -> Result<Value, QmpError> {
        match name {
            "x-debug-query-block-graph" => {
                qmp::no_args(a)?;
                Ok(block_graph(self.jobs.graph()))
            }
            "query-blockstats" => {
                let query_nodes = qmp::take_bool(a, "query-nodes")?.unwrap_or(false);
                qmp::no_args(a)?;
                // sluice has no named block devices: only nodes have stats.
                if !query_nodes {
                    return Ok(json!([]));
                }
                Ok(Value::Array(
                    self.jobs
                        .graph()
                        .nodes()
                        .iter()
                        .map(|n| node_stats(n, 0))
                        .collect(),
                ))
            }
            "block_resize" => self.block_resize(a).await,
            "blockdev-snapshot" => {
                let snap = self.snapshot_args(a)?;
                qmp::no_args(a)?;
                self.apply_snapshots(&[snap]).await?;
                Ok(json!({}))
            }
            "blockdev-create" => self.blockdev_create(a).await,
            "transaction" => self.transaction(a).await,
            _ => Err(not_found(name)),
        }
    }

    /// `job-*`: the job named by `id`.
    fn job(&self, a: &mut Map<String, Value>) -> Result<Arc<Job>, QmpError> {
        let id = take_string(a, "id")?.ok_or_else(|| missing("id"))?;
        self.jobs
            .get(&id)
            .ok_or_else(|| QmpError::generic("Job not found"))
    }

    /// `block-job-*`: the job named by `key`.
    fn block_job(&self, a: &mut Map<String, Value>, key: &str) -> Result<Arc<Job>, QmpError> {
        let id = take_string(a, key)?.ok_or_else(|| missing(key))?;
        self.find_block_job(&id)
    }

    fn find_block_job(&self, id: &str) -> Result<Arc<Job>, QmpError> {
        self.jobs.get(id).ok_or_else(|| QmpError {
            class: "DeviceNotActive",
            desc: format!("Block job '{id}' not found"),
        })
    }

    /// The options every job command shares, checked as QEMU's
    /// `job_create` does before anything changes in the graph.
    fn job_options(&self, c: CommonArgs) -> Result<JobOptions, QmpError> {
        // QEMU names a job after its block device; the storage daemon's
        // nodes have no device name, so the id is empty and refused.
        let mut o = JobOptions::new(&c.job_id.unwrap_or_default());
        // QEMU creates the job before it touches the graph: id errors come
        // first. (`JobManager::create` checks again.)
        if !sluice_jobs::job::id_wellformed(&o.id) {
            return Err(QmpError::generic(format!("Invalid job ID '{}'", o.id)));
        }
        if self.jobs.get(&o.id).is_some() {
            return Err(QmpError::generic(format!(
                "Job ID '{}' already in use",
                o.id
            )));
        }
        let speed = c.speed.unwrap_or(0);
        if speed < 0 {
            return Err(negative_speed());
        }
        o.speed = speed as u64;
        // sluice's jobs take one policy for reads and writes.
        let on_error = match (c.on_error, c.on_target_error) {
            (Some(s), Some(t)) if s != t => {
                return Err(QmpError::generic(
                    "'on-source-error' and 'on-target-error' must be the same in sluice",
                ))
            }
            (s, t) => s.or(t),
        };
        if let Some(e) = on_error {
            o.on_error = OnError::parse(&e)?;
        }
        o.auto_finalize = c.auto_finalize.unwrap_or(true);
        o.auto_dismiss = c.auto_dismiss.unwrap_or(true);
        Ok(o)
    }

    /// QEMU's op blockers: a node in the chain of a job that has not yet
    /// concluded cannot start another job.
    fn check_not_busy(&self, nodes: &[Arc<Node>]) -> Result<(), QmpError> {
        for n in nodes {
            let Some(job) = job_above(n).and_then(|id| self.jobs.get(&id)) else {
                continue;
            };
            if !matches!(job.status(), JobStatus::Concluded | JobStatus::Null) {
                return Err(QmpError::generic(format!(
                    "Node '{}' is busy: block device is in use by block job: {}",
                    n.name(),
                    job.job_type()
                )));
            }
        }
        Ok(())
    }

    async fn block_stream(&self, a: &mut Map<String, Value>) -> Result<Value, QmpError> {
        let mut c = CommonArgs {
            job_id: take_string(a, "job-id")?,
            ..CommonArgs::default()
        };
        let device = take_string(a, "device")?.ok_or_else(|| missing("device"))?;
        let base = take_string(a, "base")?;
        let base_node = take_string(a, "base-node")?;
        let backing_file = take_string(a, "backing-file")?;
        // Only matters for protocol prefixes, which file names here lack.
        qmp::take_bool(a, "backing-mask-protocol")?;
        let bottom = take_string(a, "bottom")?;
        c.speed = take_int(a, "speed")?;
        c.on_error = take_string(a, "on-error")?;
        let filter_node_name = take_string(a, "filter-node-name")?;
        c.take_auto(a)?;
        qmp::no_args(a)?;

        for (x, y, both) in [
            (&base, &base_node, "'base' and 'base-node'"),
            (&base, &bottom, "'base' and 'bottom'"),
            (&bottom, &base_node, "'bottom' and 'base-node'"),
        ] {
            if x.is_some() && y.is_some() {
                return Err(QmpError::generic(format!(
                    "{both} cannot be specified at the same time"
                )));
            }
        }
        let graph = self.jobs.graph();
        let top = lookup_bs(graph, Some(&device), Some(&device))?;
        let mut base_bs = None;
        if let Some(b) = &base {
            base_bs = Some(find_backing_image(&top, b).ok_or_else(|| {
                QmpError::generic(format!("Can't find '{b}' in the backing chain"))
            })?);
        }
        if let Some(b) = &base_node {
            let n = lookup_bs(graph, None, Some(b))?;
            if Arc::ptr_eq(&n, &top) || !chain_contains(&top, &n) {
                return Err(QmpError::generic(format!(
                    "Node '{b}' is not a backing image of '{device}'"
                )));
            }
            base_bs = Some(n);
        }
        if let Some(b) = &bottom {
            let n = lookup_bs(graph, None, Some(b))?;
            if n.driver().is_filter() {
                return Err(QmpError::generic(format!(
                    "Node '{b}' is a filter, use a non-filter node as 'bottom'"
                )));
            }
            if !chain_contains(&top, &n) {
                return Err(QmpError::generic(format!(
                    "Node '{b}' is not in a chain starting from '{device}'"
                )));
            }
            base_bs = below(&n);
        }
        self.check_not_busy(&chain_between(&top, base_bs.as_ref()))?;
        if base_bs.is_none() && backing_file.is_some() {
            return Err(QmpError::generic(
                "backing file specified, but streaming the entire chain",
            ));
        }
        let opts = self.job_options(c)?;
        let mut params = StreamParams::new(&top, base_bs.as_ref());
        params.backing_file = backing_file;
        params.filter_node_name = filter_node_name;
        sluice_jobs::stream::start(&self.jobs, opts, params).await?;
        Ok(json!({}))
    }

    async fn block_commit(&self, a: &mut Map<String, Value>) -> Result<Value, QmpError> {
        let mut c = CommonArgs {
            job_id: take_string(a, "job-id")?,
            ..CommonArgs::default()
        };
        let device = take_string(a, "device")?.ok_or_else(|| missing("device"))?;
        let base_node = take_string(a, "base-node")?;
        let base = take_string(a, "base")?;
        let top_node = take_string(a, "top-node")?;
        let top = take_string(a, "top")?;
        let backing_file = take_string(a, "backing-file")?;
        qmp::take_bool(a, "backing-mask-protocol")?;
        c.speed = take_int(a, "speed")?;
        c.on_error = take_string(a, "on-error")?;
        let filter_node_name = take_string(a, "filter-node-name")?;
        c.take_auto(a)?;
        qmp::no_args(a)?;

        let graph = self.jobs.graph();
        // libvirt probes for DeviceNotFound: the device lookup comes first.
        if graph.node(&device).is_err() {
            return Err(QmpError::device_not_found(format!(
                "Device '{device}' not found"
            )));
        }
        let bs = root_bs(graph, &device)?;
        let top_bs = match (&top_node, &top) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'top-node' and 'top' are mutually exclusive",
                ))
            }
            (Some(t), None) => {
                let n = lookup_bs(graph, None, Some(t))?;
                if !chain_contains(&bs, &n) {
                    return Err(QmpError::generic(format!(
                        "'{t}' is not in this backing file chain"
                    )));
                }
                n
            }
            (None, Some(t)) if bs.driver().filename().as_deref() != Some(t) => {
                find_backing_image(&bs, t)
                    .ok_or_else(|| QmpError::generic(format!("Top image file {t} not found")))?
            }
            _ => bs.clone(),
        };
        let base_bs = match (&base_node, &base) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'base-node' and 'base' are mutually exclusive",
                ))
            }
            (Some(b), None) => {
                let n = lookup_bs(graph, None, Some(b))?;
                if !chain_contains(&top_bs, &n) {
                    return Err(QmpError::generic(format!(
                        "'{b}' is not in this backing file chain"
                    )));
                }
                n
            }
            (None, Some(b)) => find_backing_image(&top_bs, b).ok_or_else(|| {
                QmpError::generic(format!("Can't find '{b}' in the backing chain"))
            })?,
            (None, None) => chain_between(&top_bs, None)
                .pop()
                .unwrap_or_else(|| top_bs.clone()),
        };
        let mut chain = chain_between(&top_bs, Some(&base_bs));
        chain.push(base_bs.clone());
        self.check_not_busy(&chain)?;
        if Arc::ptr_eq(&top_bs, &base_bs) {
            return Err(QmpError::generic("cannot commit an image into itself"));
        }
        let unfiltered_top = skip_filters(&top_bs);
        let is_active_layer = Arc::ptr_eq(&unfiltered_top, &skip_filters(&bs));
        if is_active_layer || top_bs.cumulative_perm().perm.contains(Perm::WRITE) {
            if backing_file.is_some() {
                return Err(QmpError::generic(if is_active_layer {
                    "'backing-file' specified, but 'top' is the active layer"
                } else {
                    "'backing-file' specified, but 'top' has a writer on it"
                }));
            }
            let opts = self.job_options(c)?;
            sluice_jobs::mirror::start_active_commit(
                &self.jobs,
                opts,
                &top_bs,
                &base_bs,
                filter_node_name.as_deref(),
            )
            .await?;
            return Ok(json!({}));
        }
        let opts = self.job_options(c)?;
        let params = CommitParams {
            top: top_bs,
            base: base_bs,
            backing_file,
            filter_node_name,
        };
        sluice_jobs::commit::start(&self.jobs, opts, params).await?;
        Ok(json!({}))
    }

    async fn blockdev_mirror(&self, a: &mut Map<String, Value>) -> Result<Value, QmpError> {
        let mut c = CommonArgs {
            job_id: take_string(a, "job-id")?,
            ..CommonArgs::default()
        };
        let device = take_string(a, "device")?.ok_or_else(|| missing("device"))?;
        let target = take_string(a, "target")?.ok_or_else(|| missing("target"))?;
        let replaces = take_string(a, "replaces")?;
        let sync = take_string(a, "sync")?.ok_or_else(|| missing("sync"))?;
        c.speed = take_int(a, "speed")?;
        let granularity = take_int(a, "granularity")?;
        let buf_size = take_int(a, "buf-size")?;
        c.on_error = take_string(a, "on-source-error")?;
        c.on_target_error = take_string(a, "on-target-error")?;
        let filter_node_name = take_string(a, "filter-node-name")?;
        let copy_mode = take_string(a, "copy-mode")?;
        c.take_auto(a)?;
        qmp::no_args(a)?;
        let mut sync = match sync.as_str() {
            "incremental" | "bitmap" => {
                return Err(QmpError::generic(format!(
                    "Sync mode '{sync}' not supported"
                )))
            }
            s => SyncMode::parse(s)?,
        };
        let copy_mode = copy_mode
            .map(|m| CopyMode::parse(&m))
            .transpose()?
            .unwrap_or(CopyMode::Background);

        let graph = self.jobs.graph();
        let bs = root_bs(graph, &device)?;
        let target_bs = lookup_bs(graph, Some(&target), Some(&target))?;
        let granularity = granularity.unwrap_or(0);
        if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
            return Err(QmpError::generic(
                "Parameter 'granularity' expects a value in range [512B, 64MB]",
            ));
        }
        if granularity & (granularity - 1) != 0 {
            return Err(QmpError::generic(
                "Parameter 'granularity' expects a power of 2",
            ));
        }
        self.check_not_busy(&[bs.clone(), target_bs.clone()])?;
        let base = below(&skip_filters(&bs));
        if base.is_none() && sync == SyncMode::Top {
            sync = SyncMode::Full;
        }
        if replaces.is_some_and(|r| r != bs.name()) {
            return Err(unsupported("replaces", "a mirror"));
        }
        let opts = self.job_options(c)?;
        let mut params = MirrorParams::new(&bs, &target_bs, sync);
        if sync == SyncMode::Top {
            params.base = base;
        }
        if granularity != 0 {
            params.granularity = granularity as u64;
        }
        match buf_size {
            Some(n) if n < 0 => return Err(QmpError::generic("Invalid parameter 'buf-size'")),
            Some(n) if n > 0 => params.buf_size = n as u64,
            _ => {}
        }
        params.copy_mode = copy_mode;
        params.filter_node_name = filter_node_name;
        sluice_jobs::mirror::start(&self.jobs, opts, params).await?;
        Ok(json!({}))
    }

    async fn blockdev_backup(&self, a: &mut Map<String, Value>) -> Result<Value, QmpError> {
        let (opts, params) = self.backup_args(a)?;
        sluice_jobs::backup::start(&self.jobs, opts, params).await?;
        Ok(json!({}))
    }

    /// `blockdev-backup`'s arguments, checked as QEMU does before anything
    /// changes (shared with the `transaction` action).
    fn backup_args(
        &self,
        a: &mut Map<String, Value>,
    ) -> Result<(JobOptions, BackupParams), QmpError> {
        let mut c = CommonArgs {
            job_id: take_string(a, "job-id")?,
            ..CommonArgs::default()
        };
        let device = take_string(a, "device")?.ok_or_else(|| missing("device"))?;
        let sync = take_string(a, "sync")?.ok_or_else(|| missing("sync"))?;
        c.speed = take_int(a, "speed")?;
        let bitmap = take_string(a, "bitmap")?;
        let bitmap_mode = take_string(a, "bitmap-mode")?;
        let compress = qmp::take_bool(a, "compress")?.unwrap_or(false);
        c.on_error = take_string(a, "on-source-error")?;
        c.on_target_error = take_string(a, "on-target-error")?;
        c.take_auto(a)?;
        let filter_node_name = take_string(a, "filter-node-name")?;
        let x_perf = a.remove("x-perf");
        let discard_source = qmp::take_bool(a, "discard-source")?.unwrap_or(false);
        let target = take_string(a, "target")?.ok_or_else(|| missing("target"))?;
        qmp::no_args(a)?;
        let sync_mode = match sync.as_str() {
            "incremental" | "bitmap" => None,
            s => Some(SyncMode::parse(s)?),
        };

        let graph = self.jobs.graph();
        let bs = lookup_bs(graph, Some(&device), Some(&device))?;
        let target_bs = lookup_bs(graph, Some(&target), Some(&target))?;
        if sync_mode.is_none() && bitmap.is_none() {
            return Err(QmpError::generic(format!(
                "must provide a valid bitmap name for '{sync}' sync mode"
            )));
        }
        if let Some(b) = bitmap {
            // sluice has no dirty bitmaps a user could name yet.
            return Err(QmpError::generic(format!(
                "Bitmap '{b}' could not be found"
            )));
        }
        if bitmap_mode.is_some() {
            return Err(QmpError::generic(
                "Cannot specify bitmap sync mode without a bitmap",
            ));
        }
        let opts = self.job_options(c)?;
        if compress {
            return Err(unsupported("compress", "a backup"));
        }
        if discard_source {
            return Err(unsupported("discard-source", "a backup"));
        }
        if x_perf.is_some() {
            return Err(unsupported("x-perf", "a backup"));
        }
        self.check_not_busy(&[bs.clone(), target_bs.clone()])?;
        let Some(sync) = sync_mode else {
            return Err(unsupported("sync", "a backup"));
        };
        let mut params = BackupParams::new(&bs, &target_bs, sync);
        params.filter_node_name = filter_node_name;
        Ok((opts, params))
    }

    /// `block_resize`: drained, with a root that takes `resize` so that
    /// users that do not share it refuse the change.
    async fn block_resize(&self, a: &mut Map<String, Value>) -> Result<Value, QmpError> {
        let device = take_string(a, "device")?;
        let node_name = take_string(a, "node-name")?;
        let size = take_int(a, "size")?.ok_or_else(|| missing("size"))?;
        qmp::no_args(a)?;
        let graph = self.jobs.graph();
        let node = lookup_bs(graph, device.as_deref(), node_name.as_deref())?;
        if size < 0 {
            return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
        }
        self.check_not_busy(std::slice::from_ref(&node))?;
        let w = graph.writer().await;
        let root = w
            .add_root(
                "block device",
                "",
                &node,
                PermPair::new(Perm::RESIZE, Perm::ALL),
            )
            .await?;
        let drained = w.drain(&node).await;
        let res = node.driver().truncate(&node, size as u64, "off").await;
        if res.is_ok() {
            node.set_size(size as u64);
        }
        drop(drained);
        drop(root);
        res?;
        Ok(json!({}))
    }
}

/// One `blockdev-snapshot`: `overlay` goes on top of `node`.
struct Snapshot {
    node: Arc<Node>,
    overlay: Arc<Node>,
}

impl JobCommands {
    /// `blockdev-snapshot`'s arguments, checked as QEMU's
    /// `external_snapshot_action` does.
    fn snapshot_args(&self, a: &mut Map<String, Value>) -> Result<Snapshot, QmpError> {
        let node = take_string(a, "node")?.ok_or_else(|| missing("node"))?;
        let overlay = take_string(a, "overlay")?.ok_or_else(|| missing("overlay"))?;
        let graph = self.jobs.graph();
        let node = lookup_bs(graph, Some(&node), Some(&node))?;
        if let Some(e) = qmp::busy_as_backing(&node) {
            return Err(e);
        }
        self.check_not_busy(std::slice::from_ref(&node))?;
        let overlay = lookup_bs(graph, Some(&overlay), Some(&overlay))?;
        if overlay
            .parents()
            .iter()
            .any(|e| e.parent().node().is_none())
        {
            return Err(QmpError::generic("The overlay is already in use"));
        }
        if let Some(e) = qmp::busy_as_backing(&overlay) {
            return Err(e);
        }
        self.check_not_busy(std::slice::from_ref(&overlay))?;
        if overlay.driver().is_filter() {
            return Err(QmpError::generic("Filters cannot be used as overlays"));
        }
        if overlay.child(Role::Backing).is_some() {
            return Err(QmpError::generic("The overlay already has a backing image"));
        }
        if !overlay.driver().supports_backing() {
            return Err(QmpError::generic(
                "The overlay does not support backing images",
            ));
        }
        self.check_not_busy(std::slice::from_ref(&node))?;
        Ok(Snapshot { node, overlay })
    }

    /// Puts each overlay on top of its node, all in one transaction:
    /// the overlay's backing becomes the node, and the node's users move
    /// to the overlay (QEMU's `bdrv_append`), with both drained.
    async fn apply_snapshots(&self, snaps: &[Snapshot]) -> Result<(), QmpError> {
        let w = self.jobs.graph().writer().await;
        let mut drains = Vec::new();
        for s in snaps {
            drains.push((w.drain(&s.node).await, w.drain(&s.overlay).await));
        }
        let mut tx = w.transaction();
        for (s, (d_node, d_overlay)) in snaps.iter().zip(&drains) {
            tx.set_backing(d_overlay, &s.overlay, Some(&s.node))?;
            tx.replace_node(d_node, &s.node, &s.overlay)?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Undoes [`Self::apply_snapshots`] (a later action of a
    /// `transaction` failed): users go back to the nodes.
    async fn revert_snapshots(&self, snaps: &[Snapshot]) {
        let w = self.jobs.graph().writer().await;
        let mut drains = Vec::new();
        for s in snaps {
            drains.push((w.drain(&s.node).await, w.drain(&s.overlay).await));
        }
        let mut tx = w.transaction();
        let staged = snaps
            .iter()
            .zip(&drains)
            .try_for_each(|(s, (_, d_overlay))| {
                tx.replace_node(d_overlay, &s.overlay, &s.node)?;
                tx.set_backing(d_overlay, &s.overlay, None)
            });
        let done = match staged {
            Ok(()) => tx.commit().await,
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            tracing::error!("could not undo a snapshot of a failed transaction: {e}");
        }
    }

    /// `transaction`: `blockdev-snapshot` and `blockdev-backup` actions,
    /// all or none. Every action is checked first; the snapshots then go
    /// in as one graph transaction, and the backups start (as one job
    /// group with `completion-mode: grouped`). A backup that fails to
    /// start cancels those before it and undoes the snapshots.
    async fn transaction(&self, a: &mut Map<String, Value>) -> Result<Value, QmpError> {
        let actions = match a.remove("actions") {
            Some(Value::Array(v)) => v,
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'actions', expected: array",
                ))
            }
            None => return Err(missing("actions")),
        };
        let grouped = match a.remove("properties") {
            None => false,
            Some(Value::Object(mut p)) => {
                let mode = take_string(&mut p, "completion-mode")?;
                qmp::no_args(&p)?;
                match mode.as_deref() {
                    None | Some("individual") => false,
                    Some("grouped") => true,
                    Some(other) => {
                        return Err(QmpError::generic(format!(
                            "Parameter 'completion-mode' does not accept value '{other}'"
                        )))
                    }
                }
            }
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'properties', expected: object",
                ))
            }
        };
        qmp::no_args(a)?;
        // Actions take effect in order, as QEMU's: a snapshot at once, a
        // backup job created (filter in place) but not started. A failing
        // action undoes every one before it.
        let txn = grouped.then(sluice_jobs::JobTxn::new);
        let mut snaps: Vec<Snapshot> = Vec::new();
        let mut created: Vec<Arc<Job>> = Vec::new();
        let mut result = Ok(());
        for action in actions {
            result = self
                .transaction_action(action, &txn, &mut snaps, &mut created)
                .await;
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = result {
            for job in created.iter().rev() {
                let _ = job.cancel(true).await;
                job.wait_concluded().await;
            }
            self.revert_snapshots(&snaps).await;
            return Err(e);
        }
        for job in &created {
            self.jobs.start(job);
        }
        Ok(json!({}))
    }

    /// One action of a `transaction`.
    async fn transaction_action(
        &self,
        action: Value,
        txn: &Option<Arc<sluice_jobs::JobTxn>>,
        snaps: &mut Vec<Snapshot>,
        created: &mut Vec<Arc<Job>>,
    ) -> Result<(), QmpError> {
        let Value::Object(mut action) = action else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'actions[0]', expected: object",
            ));
        };
        let ty = take_string(&mut action, "type")?.ok_or_else(|| missing("type"))?;
        let mut data = match action.remove("data") {
            Some(Value::Object(d)) => d,
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'data', expected: object",
                ))
            }
            None => return Err(missing("data")),
        };
        qmp::no_args(&action)?;
        match ty.as_str() {
            "blockdev-snapshot" => {
                let s = self.snapshot_args(&mut data)?;
                qmp::no_args(&data)?;
                self.apply_snapshots(std::slice::from_ref(&s)).await?;
                snaps.push(s);
            }
            "blockdev-backup" => {
                let (opts, params) = self.backup_args(&mut data)?;
                qmp::no_args(&data)?;
                let job =
                    sluice_jobs::backup::create_in(&self.jobs, opts, params, txn.clone()).await?;
                created.push(job);
            }
            other => {
                return Err(QmpError::generic(format!(
                    "Parameter 'type' does not accept value '{other}' \\
                     (sluice's transactions take blockdev-snapshot and blockdev-backup)"
                )))
            }
        }
        Ok(())
    }

    /// `blockdev-create`: a `create` job for a `file` or a `qcow2` image.
    async fn blockdev_create(&self, a: &mut Map<String, Value>) -> Result<Value, QmpError> {
        use sluice_jobs::create::CreateSpec;
        let job_id = take_string(a, "job-id")?.ok_or_else(|| missing("job-id"))?;
        let mut o = match a.remove("options") {
            Some(Value::Object(o)) => o,
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'options', expected: object",
                ))
            }
            None => return Err(missing("options")),
        };
        qmp::no_args(a)?;
        let driver = take_string(&mut o, "driver")?.ok_or_else(|| missing("driver"))?;
        let spec = match driver.as_str() {
            "file" => {
                let filename =
                    take_string(&mut o, "filename")?.ok_or_else(|| missing("filename"))?;
                let size = take_int(&mut o, "size")?.ok_or_else(|| missing("size"))?;
                let preallocation =
                    take_string(&mut o, "preallocation")?.unwrap_or_else(|| "off".into());
                // Accepted for compatibility; they only tune the host file.
                let _ = qmp::take_bool(&mut o, "nocow")?;
                let _ = take_int(&mut o, "extent-size-hint")?;
                qmp::no_args(&o)?;
                if size < 0 {
                    return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
                }
                CreateSpec::File {
                    filename,
                    size: size as u64,
                    preallocation,
                }
            }
            "qcow2" => {
                let file = take_string(&mut o, "file")?.ok_or_else(|| missing("file"))?;
                CreateSpec::Qcow2 { file, options: o }
            }
            other => {
                return Err(QmpError::generic(format!(
                    "Driver '{other}' does not support image creation"
                )))
            }
        };
        let opts = JobOptions::new(&job_id);
        if !sluice_jobs::job::id_wellformed(&opts.id) {
            return Err(QmpError::generic(format!("Invalid job ID '{}'", opts.id)));
        }
        sluice_jobs::create::start(&self.jobs, opts, spec)?;
        Ok(json!({}))
    }
}

impl Extension for JobCommands {
    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    fn execute<'a>(
        &'a self,
        qmp: &'a Qmp,
        name: &'a str,
        args: Map<String, Value>,
    ) -> BoxFuture<'a, Result<Value, QmpError>> {
        Box::pin(async move {
            let res = self.run(name, args).await;
            // A failed command may have started and ended a job too.
            self.flush_events(qmp);
            res
        })
    }

    fn before_quit<'a>(&'a self, qmp: &'a Qmp) -> BoxFuture<'a, ()> {
        Box::pin(self.cancel_all(qmp))
    }
}

fn emit_queued(rx: &mut UnboundedReceiver<JobEvent>, qmp: &Qmp) {
    while let Ok(ev) = rx.try_recv() {
        qmp.emit(ev.name, ev.data);
    }
}

fn not_found(name: &str) -> QmpError {
    QmpError::command_not_found(format!("The command {name} has not been found"))
}

fn missing(key: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{key}' is missing"))
}

/// An argument QEMU takes that sluice's job does not implement yet.
fn unsupported(arg: &str, what: &str) -> QmpError {
    QmpError::generic(format!(
        "Parameter '{arg}' is not supported for {what} in sluice yet"
    ))
}

fn negative_speed() -> QmpError {
    QmpError::generic("Parameter 'speed' expects a non-negative value")
}

fn take_string(a: &mut Map<String, Value>, key: &str) -> Result<Option<String>, QmpError> {
    qmp::take_string(a, key)
}

/// Takes an integer argument.
fn take_int(a: &mut Map<String, Value>, key: &str) -> Result<Option<i64>, QmpError> {
    match a.remove(key) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| {
            QmpError::generic(format!(
                "Invalid parameter type for '{key}', expected: integer"
            ))
        }),
    }
}

/// QEMU's `bdrv_lookup_bs`. `device` names a block device; the storage
/// daemon has none, so only `node_name` can match.
fn lookup_bs(
    graph: &Graph,
    device: Option<&str>,
    node_name: Option<&str>,
) -> Result<Arc<Node>, QmpError> {
    if let Some(n) = node_name.and_then(|n| graph.node(n).ok()) {
        return Ok(n);
    }
    Err(QmpError::generic(format!(
        "Cannot find device='{}' nor node-name='{}'",
        device.unwrap_or(""),
        node_name.unwrap_or("")
    )))
}

/// QEMU's `qmp_get_root_bs`: a node no other node uses (nor a job).
fn root_bs(graph: &Graph, name: &str) -> Result<Arc<Node>, QmpError> {
    let bs = lookup_bs(graph, Some(name), Some(name))?;
    if job_above(&bs).is_some()
        || bs
            .parents()
            .iter()
            .any(|e| matches!(e.parent(), Parent::Node(_)))
    {
        return Err(QmpError::generic("Need a root block node"));
    }
    Ok(bs)
}

/// The next layer of a chain: a filter's child, else the backing child
/// (`bdrv_filter_or_cow_bs`).
fn below(n: &Arc<Node>) -> Option<Arc<Node>> {
    if n.driver().is_filter() {
        n.filtered_child()
    } else {
        n.child(Role::Backing)
    }
}

/// `bdrv_chain_contains`: `n` is `top` or below it.
fn chain_contains(top: &Arc<Node>, n: &Arc<Node>) -> bool {
    let mut cur = Some(top.clone());
    while let Some(c) = cur {
        if Arc::ptr_eq(&c, n) {
            return true;
        }
        cur = below(&c);
    }
    false
}

/// `top` and the layers below it down to (not including) `base`.
fn chain_between(top: &Arc<Node>, base: Option<&Arc<Node>>) -> Vec<Arc<Node>> {
    let mut out = Vec::new();
    let mut cur = Some(top.clone());
    while let Some(c) = cur {
        if base.is_some_and(|b| Arc::ptr_eq(b, &c)) {
            break;
        }
        cur = below(&c);
        out.push(c);
    }
    out
}

/// `bdrv_find_backing_image`: the layer below `top` whose file is `name`,
/// as written in the overlay's header or as a path; relative names are
/// relative to the overlay's directory.
fn find_backing_image(top: &Arc<Node>, name: &str) -> Option<Arc<Node>> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let mut overlay = top.clone();
    while let Some(next) = below(&overlay) {
        if let Some(file) = next.driver().filename() {
            let dir = overlay
                .driver()
                .filename()
                .and_then(|f| Path::new(&f).parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("."));
            let wanted = if Path::new(name).is_absolute() {
                PathBuf::from(name)
            } else {
                dir.join(name)
            };
            if file == name
                || (canon(&wanted).is_some() && canon(&wanted) == canon(Path::new(&file)))
            {
                return Some(next);
            }
        }
        overlay = next;
    }
    None
}

/// The id of a job whose root sits on `n` or on a node above it: the job
/// reads or changes `n`'s chain.
fn job_above(n: &Arc<Node>) -> Option<String> {
    let mut todo = vec![n.clone()];
    let mut visited = 0;
    while let Some(cur) = todo.pop() {
        visited += 1;
        if visited > 4096 {
            break; // not a tree of sane size: say nothing
        }
        for e in cur.parents() {
            match e.parent().node() {
                Some(p) => todo.push(p),
                None => {
                    if let Some(("job", id)) = e
                        .parent()
                        .root_user()
                        .as_ref()
                        .map(|(k, n)| (k.as_str(), n.as_str()))
                    {
                        return Some(id.to_string());
                    }
                }
            }
        }
    }
    None
}

/// QEMU's permission names in `x-debug-query-block-graph`.
fn perm_names(p: Perm) -> Vec<&'static str> {
    [
        (Perm::CONSISTENT_READ, "consistent-read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write-unchanged"),
        (Perm::RESIZE, "resize"),
    ]
    .into_iter()
    .filter(|(bit, _)| p.contains(*bit))
    .map(|(_, n)| n)
    .collect()
}

/// `x-debug-query-block-graph`: nodes (block drivers, and the roots as
/// block backends or jobs) and the edges between them.
fn block_graph(graph: &Graph) -> Value {
    let nodes = graph.nodes();
    let mut out_nodes = Vec::new();
    let mut edges = Vec::new();
    let mut id_of = std::collections::HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        id_of.insert(Arc::as_ptr(n), i + 1);
        out_nodes.push(json!({"name": n.name(), "type": "block-driver", "id": i + 1}));
    }
    let mut next = nodes.len() + 1;
    let mut roots = std::collections::HashMap::new();
    for n in &nodes {
        for e in n.parents() {
            let parent = match e.parent() {
                Parent::Node(_) => match e.parent().node() {
                    Some(p) => id_of.get(&Arc::as_ptr(&p)).copied(),
                    None => None,
                },
                Parent::Root(_) => {
                    let user = e.parent().root_user().unwrap_or_default();
                    let id = *roots.entry(user.clone()).or_insert_with(|| {
                        let (ty, name) = match user.0.as_str() {
                            "job" => ("block-job", user.1.as_str()),
                            _ => ("block-backend", ""),
                        };
                        out_nodes.push(json!({"name": name, "type": ty, "id": next}));
                        next += 1;
                        next - 1
                    });
                    Some(id)
                }
            };
            let Some(parent) = parent else { continue };
            let p = e.perm();
            edges.push(json!({
                "parent": parent,
                "child": id_of[&Arc::as_ptr(n)],
                "name": e.user_role(),
                "perm": perm_names(p.perm),
                "shared-perm": perm_names(p.shared),
            }));
        }
    }
    json!({"nodes": out_nodes, "edges": edges})
}

/// One node's `BlockStats`, with its `file` child as `parent` and its
/// backing child as `backing`, as QEMU nests them.
fn node_stats(n: &Arc<Node>, depth: u32) -> Value {
    use sluice_core::stats::IoStats;
    let s = n.stats();
    let g = IoStats::get;
    let mut v = json!({
        "node-name": n.name(),
        "stats": {
            "rd_bytes": g(&s.rd_bytes),
            "wr_bytes": g(&s.wr_bytes),
            "rd_operations": g(&s.rd_operations),
            "wr_operations": g(&s.wr_operations),
            "flush_operations": g(&s.flush_operations),
            "unmap_operations": g(&s.unmap_operations),
            "unmap_bytes": g(&s.unmap_bytes),
            "zone_append_operations": 0,
            "zone_append_bytes": 0,
            "failed_rd_operations": g(&s.failed_rd_operations),
            "failed_wr_operations": g(&s.failed_wr_operations),
            "failed_flush_operations": g(&s.failed_flush_operations),
            "failed_unmap_operations": g(&s.failed_unmap_operations),
            "failed_zone_append_operations": 0,
            "invalid_rd_operations": 0,
            "invalid_wr_operations": 0,
            "invalid_flush_operations": 0,
            "invalid_unmap_operations": 0,
            "invalid_zone_append_operations": 0,
            "rd_merged": 0,
            "wr_merged": 0,
            "unmap_merged": 0,
            "zone_append_merged": 0,
            "rd_total_time_ns": 0,
            "wr_total_time_ns": 0,
            "flush_total_time_ns": 0,
            "unmap_total_time_ns": 0,
            "zone_append_total_time_ns": 0,
            "idle_time_ns": 0,
            "account_invalid": false,
            "account_failed": false,
            "timed_stats": [],
        },
    });
    // Chains are bounded in practice; the cap keeps a cycle from recursing.
    if depth < 64 {
        if let Some(f) = n.child(Role::File) {
            v["parent"] = node_stats(&f, depth + 1);
        }
        if let Some(b) = n.child(Role::Backing) {
            v["backing"] = node_stats(&b, depth + 1);
        }
    }
    v
}
