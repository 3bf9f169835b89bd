//! `block-commit` of an intermediate layer (the active layer is committed
//! by [`crate::mirror::start_active_commit`], which `start` hands it to): copies what `top` and the
//! layers between it and `base` hold into `base`, then points top's
//! overlays at `base` and drops the committed layers.
//!
//! `prepare` drains `top` (so every overlay above it, and their users,
//! are quiesced), rewrites each overlay's header to name `base`, and sets
//! the backing links in one transaction; committed layers that no one
//! else uses are closed when it commits.

use crate::batch::{copy_in_batches, WindowError};
use crate::chain::{allocated_above, intermediates, skip_filters};
use crate::filters::{copy_roots, insert_filter, remove_filter, CommitTop, JobFilter};
use crate::job::{Job, JobDriver, JobManager, JobOptions};
use crate::stream::{relink_overlays, Relink};
use async_trait::async_trait;
use parking_lot::Mutex;
use sluice_core::{Error, Graph, GraphWriter, Node, Parent, Result, Role, Root, WriteFlags};
use std::sync::Arc;

/// How much one step copies (QEMU's `COMMIT_BUFFER_SIZE`).
const CHUNK: u64 = 512 * 1024;

/// Steps copied at once (disjoint, so overlapping them hides latency).
const IN_FLIGHT: u64 = 4;

/// What `block-commit` asks for, with its nodes resolved.
pub struct CommitParams {
    /// The highest layer to commit; it must have an overlay.
    pub top: Arc<Node>,
    /// The layer that receives the data and stays.
    pub base: Arc<Node>,
    /// The backing file name written into the overlays' headers.
    pub backing_file: Option<String>,
    /// Node-name for the `commit_top` filter (`filter-node-name`).
    pub filter_node_name: Option<String>,
}

struct Commit {
    params: CommitParams,
    /// `commit_top` above `top` while the job runs.
    filter: Mutex<Option<Arc<Node>>>,
    top_root: Mutex<Option<Arc<Root>>>,
    base_root: Mutex<Option<Arc<Root>>>,
    /// The base, when the job made it writable: read-only again at the end.
    reopened_base: Mutex<Option<Arc<Node>>>,
}

/// Makes `base` writable for a job that writes it (a commit into it, a
/// stream into it), as QEMU does for a node opened read-only (from an
/// overlay's header, say); returns it when it had to be switched, so that
/// the job can switch it back.
pub(crate) async fn make_writable(
    w: &GraphWriter<'_>,
    base: &Arc<Node>,
) -> Result<Option<Arc<Node>>> {
    if !base.is_read_only() {
        return Ok(None);
    }
    reopen(w, base, false).await?;
    Ok(Some(base.clone()))
}

/// Puts back a node [`make_writable`] switched, once the job no longer
/// writes it. A failure leaves it writable, which loses nothing.
pub(crate) async fn restore_read_only(w: &GraphWriter<'_>, base: Option<Arc<Node>>) {
    if let Some(base) = base {
        if let Err(e) = reopen(w, &base, true).await {
            tracing::warn!(
                node = base.name(),
                "could not make the node read-only again: {e}"
            );
        }
    }
}

async fn reopen(w: &GraphWriter<'_>, node: &Arc<Node>, read_only: bool) -> Result<()> {
    let drained = w.drain_for_reopen(node).await;
    w.reopen_read_only(&drained, node, read_only).await
}

/// The nodes that use `node` as their backing layer.
fn overlays(node: &Arc<Node>) -> Vec<Arc<Node>> {
    node.parents()
        .iter()
        .filter(|e| e.role() == Role::Backing)
        .filter_map(|e| match e.parent() {
            Parent::Node(_) => e.parent().node(),
            Parent::Root(_) => None,
        })
        .collect()
}

/// Starts committing `params.top` (not the active layer) into `params.base`.
pub async fn start(jobs: &JobManager, opts: JobOptions, params: CommitParams) -> Result<Arc<Job>> {
    let w = jobs.graph().writer().await;
    if Arc::ptr_eq(&params.top, &params.base) {
        return Err(Error::Other("cannot commit an image into itself".into()));
    }
    intermediates(&params.top, Some(&params.base))?;
    if overlays(&params.top).is_empty() {
        // The active layer: committed by mirroring it into base.
        drop(w);
        let filter = params.filter_node_name.as_deref();
        return crate::mirror::start_active_commit(jobs, opts, &params.top, &params.base, filter)
            .await;
    }
    let reopened = make_writable(&w, &skip_filters(&params.base)).await?;
    let filter = match insert_filter(
        &w,
        &params.top,
        Box::new(JobFilter(CommitTop)),
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
    let roots = copy_roots(&w, &opts.id, &params.top, &params.base).await;
    let (top_root, base_root) = match roots {
        Ok(r) => r,
        Err(e) => {
            remove_filter(&w, &params.top, &filter).await;
            restore_read_only(&w, reopened).await;
            return Err(e);
        }
    };
    drop(w);
    let driver = Commit {
        params,
        filter: Mutex::new(Some(filter)),
        top_root: Mutex::new(Some(Arc::new(top_root))),
        base_root: Mutex::new(Some(Arc::new(base_root))),
        reopened_base: Mutex::new(reopened.clone()),
    };
    // On an error the driver is dropped and its roots with it; the filter
    // is taken out and the base switched back below.
    let top = driver.params.top.clone();
    let filter = driver.filter.lock().clone();
    match jobs.spawn(opts, Box::new(driver)) {
        Ok(job) => Ok(job),
        Err(e) => {
            let w = jobs.graph().writer().await;
            if let Some(f) = filter {
                remove_filter(&w, &top, &f).await;
            }
            restore_read_only(&w, reopened).await;
            Err(e)
        }
    }
}

impl Commit {
    /// Copies what the committed layers hold in `[start, end)` into
    /// base; returns the bytes copied.
    async fn copy_window(
        &self,
        job: &Job,
        top: &Root,
        base: &Root,
        start: u64,
        end: u64,
    ) -> std::result::Result<u64, WindowError> {
        let (mut pos, mut copied) = (start, 0);
        while pos < end && !job.is_cancelled() {
            let (alloc, n) = {
                let _admitted = top.admit().await;
                allocated_above(&self.params.top, Some(&self.params.base), pos, end - pos)
                    .await
                    .map_err(|e| (true, e))?
            };
            if alloc {
                let data = top.read(pos, n as usize).await.map_err(|e| (true, e))?;
                base.write(pos, data.freeze(), WriteFlags::default())
                    .await
                    .map_err(|e| (false, e))?;
                copied += n;
            }
            pos += n;
        }
        Ok(copied)
    }
}

#[async_trait]
impl JobDriver for Commit {
    fn job_type(&self) -> &'static str {
        "commit"
    }

    async fn run(&self, job: &Arc<Job>) -> Result<()> {
        let top = self.top_root.lock().clone();
        let base = self.base_root.lock().clone();
        let (Some(top), Some(base)) = (top, base) else {
            return Err(Error::Other("the commit job has no roots".into()));
        };
        let len = self.params.top.size();
        if self.params.base.size() < len {
            return Err(Error::Other(format!(
                "Top image '{}' is larger than base image '{}'",
                self.params.top.name(),
                self.params.base.name()
            )));
        }
        copy_in_batches(job, len, CHUNK, IN_FLIGHT, |start, end| {
            self.copy_window(job, &top, &base, start, end)
        })
        .await
    }

    async fn prepare(&self, graph: &Graph) -> Result<()> {
        let p = &self.params;
        // Nothing is in flight through the job's roots any more. The one on
        // top goes so the committed layers can close; the one writing base
        // goes so the overlays' backing links (which do not share writing)
        // can take base (as QEMU's commit_prepare drops `s->base`).
        self.top_root.lock().take();
        self.base_root.lock().take();
        let w = graph.writer().await;
        let drained = w.drain(&p.top).await;
        let base = skip_filters(&p.base);
        let name = p.backing_file.clone().or_else(|| base.driver().filename());
        let fmt = base.driver_name().to_string();
        // The overlays sit on the `commit_top` filter now.
        let filter = self.filter.lock().clone();
        let ups = overlays(filter.as_ref().unwrap_or(&p.top));
        let to = Relink {
            backing: Some(&p.base),
            name: name.as_deref(),
            fmt: Some(&fmt),
        };
        relink_overlays(&w, &drained, &ups, to, |tx| match &filter {
            // The filter has no users left; a named one goes too.
            Some(f) if f.parents().is_empty() => tx.delete_node(&drained, f),
            _ => Ok(()),
        })
        .await?;
        // The filter lost its last parent and was closed.
        self.filter.lock().take();
        Ok(())
    }

    async fn clean(&self, graph: &Graph) {
        self.top_root.lock().take();
        self.base_root.lock().take();
        let filter = self.filter.lock().take();
        let base = self.reopened_base.lock().take();
        let w = graph.writer().await;
        if let Some(f) = filter {
            remove_filter(&w, &self.params.top, &f).await;
        }
        restore_read_only(&w, base).await;
    }
}
