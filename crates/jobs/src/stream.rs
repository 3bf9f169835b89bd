//! `block-stream`: copies the data of the layers between `top` and `base`
//! into `top`, then makes `base` top's backing — the job whose last step
//! the QEMU thread found racing with a read.
//!
//! At the start a `copy-on-read` filter goes above `top` (guest reads copy
//! up too); the job reads every range `top` lacks through it. `prepare`
//! drains `top` — which quiesces the filter, the job's root and every
//! guest root above — rewrites top's header to name `base`, and in one
//! transaction drops the filter and sets the backing link. Intermediate
//! nodes no one else uses are closed when it commits.

use crate::batch::{copy_in_batches, WindowError};
use crate::chain::{base_overlay, intermediates, skip_filters};
use crate::commit::{make_writable, restore_read_only};
use crate::filters::{insert_filter, remove_filter};
use crate::job::{Job, JobDriver, JobManager, JobOptions};
use async_trait::async_trait;
use parking_lot::Mutex;
use sluice_core::{
    DrainProof, DriverStatus, Error, Graph, GraphWriter, Node, Perm, PermPair, Result, Role, Root,
    Transaction,
};
use sluice_drivers::filter::copy_on_read::CopyOnReadDriver;
use std::sync::Arc;

/// How much one step copies (QEMU's `STREAM_CHUNK`).
const CHUNK: u64 = 512 * 1024;

/// Steps copied at once (QEMU copies one at a time; the chunks are
/// disjoint, so overlapping them only hides latency).
const IN_FLIGHT: u64 = 4;

/// What `block-stream` asks for, with its nodes resolved.
pub struct StreamParams {
    /// The overlay that receives the data (`device`).
    pub top: Arc<Node>,
    /// The node that stays below `top`; `None` streams the whole chain.
    pub base: Option<Arc<Node>>,
    /// The backing file name written into top's header (`backing-file`);
    /// by default base's file name.
    pub backing_file: Option<String>,
    /// Node-name for the copy-on-read filter (`filter-node-name`).
    pub filter_node_name: Option<String>,
    /// Test-only: finish without a drained section (negative controls).
    #[cfg(feature = "test-hooks")]
    pub skip_drain_for_negative_control: bool,
}

impl StreamParams {
    pub fn new(top: &Arc<Node>, base: Option<&Arc<Node>>) -> StreamParams {
        StreamParams {
            top: top.clone(),
            base: base.cloned(),
            backing_file: None,
            filter_node_name: None,
            #[cfg(feature = "test-hooks")]
            skip_drain_for_negative_control: false,
        }
    }
}

struct Stream {
    params: StreamParams,
    /// Top, when the job made it writable: read-only again at the end.
    reopened: Mutex<Option<Arc<Node>>>,
    filter: Mutex<Option<Arc<Node>>>,
    root: Mutex<Option<Arc<Root>>>,
}

/// Starts a stream job: inserts the filter (drained) and sets it running.
pub async fn start(jobs: &JobManager, opts: JobOptions, params: StreamParams) -> Result<Arc<Job>> {
    let w = jobs.graph().writer().await;
    let top = &params.top;
    intermediates(top, params.base.as_ref())?;
    let bottom = base_overlay(top, params.base.as_ref())?;
    // A read-only top (opened from a header) is written for the job's
    // duration, as QEMU reopens it.
    let reopened = make_writable(&w, top).await?;
    let filter = match insert_filter(
        &w,
        top,
        Box::new(CopyOnReadDriver::new(Some(bottom.name().to_string()))),
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
    let root = match w
        .add_root(
            "job",
            &opts.id,
            &filter,
            PermPair::new(Perm::CONSISTENT_READ, Perm::ALL),
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            remove_filter(&w, top, &filter).await;
            restore_read_only(&w, reopened).await;
            return Err(e);
        }
    };
    let driver = Stream {
        params,
        filter: Mutex::new(Some(filter.clone())),
        root: Mutex::new(Some(Arc::new(root))),
        reopened: Mutex::new(reopened.clone()),
    };
    drop(w);
    match jobs.create(opts, Box::new(driver), None) {
        Ok(job) => {
            jobs.start(&job);
            Ok(job)
        }
        Err(e) => {
            // The driver (and its root) is gone; take the filter out again.
            let w = jobs.graph().writer().await;
            remove_filter(
                &w,
                &filter.filtered_child().unwrap_or_else(|| filter.clone()),
                &filter,
            )
            .await;
            restore_read_only(&w, reopened).await;
            Err(e)
        }
    }
}

impl Stream {
    /// Copies what `[start, end)` lacks in top, piece by piece; returns
    /// the bytes copied.
    async fn copy_window(
        &self,
        job: &Job,
        root: &Root,
        start: u64,
        end: u64,
    ) -> std::result::Result<u64, WindowError> {
        let (mut pos, mut copied) = (start, 0);
        while pos < end && !job.is_cancelled() {
            let (allocated, n) = self
                .allocated_in_top(root, pos, end - pos)
                .await
                .map_err(|e| (true, e))?;
            if !allocated {
                // The filter copies up whatever a layer above base holds.
                root.read(pos, n as usize).await.map_err(|e| (true, e))?;
                copied += n;
            }
            pos += n;
        }
        Ok(copied)
    }

    fn root(&self) -> Result<Arc<Root>> {
        self.root
            .lock()
            .clone()
            .ok_or_else(|| Error::Other("the stream job has no root".into()))
    }

    /// Whether `top` itself holds `[offset, offset + len)`'s start, and for
    /// how long the answer holds.
    async fn allocated_in_top(&self, root: &Root, offset: u64, len: u64) -> Result<(bool, u64)> {
        let _admitted = root.admit().await;
        let st = self.params.top.block_status(offset, len).await?;
        let n = st.len().clamp(1, len);
        Ok((!matches!(st, DriverStatus::Unallocated { .. }), n))
    }
}

#[async_trait]
impl JobDriver for Stream {
    fn job_type(&self) -> &'static str {
        "stream"
    }

    async fn run(&self, job: &Arc<Job>) -> Result<()> {
        let root = self.root()?;
        let len = self.params.top.size();
        copy_in_batches(job, len, CHUNK, IN_FLIGHT, |start, end| {
            self.copy_window(job, &root, start, end)
        })
        .await
    }

    async fn prepare(&self, graph: &Graph) -> Result<()> {
        let p = &self.params;
        let w = graph.writer().await;
        #[cfg(feature = "test-hooks")]
        let drained = if p.skip_drain_for_negative_control {
            w.drain_skipped_for_negative_control(&p.top)
        } else {
            w.drain(&p.top).await
        };
        #[cfg(not(feature = "test-hooks"))]
        let drained = w.drain(&p.top).await;

        let new_name = match (&p.backing_file, &p.base) {
            (Some(f), _) => Some(f.clone()),
            (None, Some(b)) => crate::chain::skip_filters(b).driver().filename(),
            (None, None) => None,
        };
        let new_fmt = p
            .base
            .as_ref()
            .map(|b| crate::chain::skip_filters(b).driver_name().to_string());
        let filter = self.filter.lock().clone();
        let target = Relink {
            backing: p.base.as_ref(),
            name: new_name.as_deref(),
            fmt: new_fmt.as_deref(),
        };
        relink_overlays(
            &w,
            &drained,
            std::slice::from_ref(&p.top),
            target,
            |tx| match &filter {
                Some(f) => tx.drop_filter(&drained, f),
                None => Ok(()),
            },
        )
        .await?;
        self.filter.lock().take();
        Ok(())
    }

    async fn clean(&self, graph: &Graph) {
        // The job's root goes first: it is a parent of the filter.
        self.root.lock().take();
        let filter = self.filter.lock().take();
        let reopened = self.reopened.lock().take();
        let w = graph.writer().await;
        if let Some(f) = filter {
            remove_filter(&w, &self.params.top, &f).await;
        }
        restore_read_only(&w, reopened).await;
    }
}

/// Writes the backing file name and format into `node`'s image header.
/// Nodes without a header that names a backing file (RAM disks) have
/// nothing to rewrite.
pub(crate) async fn rewrite_backing(
    node: &Arc<Node>,
    name: Option<&str>,
    fmt: Option<&str>,
) -> Result<()> {
    match node.driver().change_backing_file(node, name, fmt).await {
        Err(Error::NotSupported { .. }) => Ok(()),
        other => other,
    }
}

/// Where [`relink_overlays`] points the overlays: a node, and the name
/// and format their headers give it.
pub(crate) struct Relink<'a> {
    pub backing: Option<&'a Arc<Node>>,
    pub name: Option<&'a str>,
    pub fmt: Option<&'a str>,
}

/// The last step of stream and commit: every overlay gets `to.backing`
/// as its backing node. Headers first (naming the new backing), then one
/// transaction with the new links and the job's `more` steps; if that
/// fails, the graph is as before and so are the headers, as near as the
/// old backing nodes can name themselves.
pub(crate) async fn relink_overlays(
    w: &GraphWriter<'_>,
    drained: &dyn DrainProof,
    overlays: &[Arc<Node>],
    to: Relink<'_>,
    more: impl FnOnce(&mut Transaction<'_, '_>) -> Result<()>,
) -> Result<()> {
    let old: Vec<(Option<String>, Option<String>)> = overlays
        .iter()
        .map(|o| {
            let b = o.child(Role::Backing).map(|b| skip_filters(&b));
            (
                b.as_ref().and_then(|b| b.driver().filename()),
                b.as_ref().map(|b| b.driver_name().to_string()),
            )
        })
        .collect();
    let restore = || async {
        for (o, (name, fmt)) in overlays.iter().zip(&old) {
            let _ = rewrite_backing(o, name.as_deref(), fmt.as_deref()).await;
        }
    };
    for o in overlays {
        if let Err(e) = rewrite_backing(o, to.name, to.fmt).await {
            restore().await;
            return Err(e);
        }
    }
    let mut tx = w.transaction();
    let staged = overlays
        .iter()
        .try_for_each(|o| tx.set_backing(drained, o, to.backing))
        .and_then(|()| more(&mut tx));
    let result = match staged {
        Ok(()) => tx.commit().await,
        Err(e) => Err(e), // dropping `tx` rolls its steps back
    };
    if result.is_err() {
        restore().await;
    }
    result
}
