//! Filters the jobs put into the graph for their duration, and the two
//! drained steps that put one in and take it out again.

use async_trait::async_trait;
use sluice_core::{
    BlockDriver, DriverStatus, GraphWriter, IoBytes, Node, NodeName, NodeSpec, Perm, PermPair,
    ReadBuf, Result, Role, Root, WriteFlags, ZeroFlags,
};
use std::sync::Arc;

/// A guest write arriving at a job's filter: data, zeroes or a discard.
pub enum WriteKind {
    Data(IoBytes, WriteFlags),
    Zeroes(ZeroFlags),
    Discard,
}

pub struct GuestWrite {
    pub offset: u64,
    pub len: u64,
    pub kind: WriteKind,
}

impl GuestWrite {
    /// Whether this is a copy-on-read copy-up (data unchanged).
    pub fn is_copy_up(&self) -> bool {
        matches!(&self.kind, WriteKind::Data(_, f) if f.copy_on_read)
    }

    /// Carries the write out on `node`.
    pub async fn on_node(&self, node: &Node) -> Result<()> {
        match &self.kind {
            WriteKind::Data(d, f) => node.write(self.offset, d.clone(), *f).await,
            WriteKind::Zeroes(f) => node.write_zeroes(self.offset, self.len, *f).await,
            WriteKind::Discard => node.discard(self.offset, self.len).await,
        }
    }

    /// Carries the write out through `root`.
    pub async fn on_root(&self, root: &Root) -> Result<()> {
        match &self.kind {
            WriteKind::Data(d, f) => root.write(self.offset, d.clone(), *f).await,
            WriteKind::Zeroes(f) => root.write_zeroes(self.offset, self.len, *f).await,
            WriteKind::Discard => root.discard(self.offset, self.len).await,
        }
    }
}

/// What makes one job filter differ from another: its permissions on the
/// node below and what it does around a guest write.
#[async_trait]
pub trait FilterHooks: Send + Sync + 'static {
    fn driver_name(&self) -> &'static str;

    /// Permissions on the filtered node, given the filter's users' needs.
    fn child_perm(&self, parents: PermPair) -> PermPair {
        parents
    }

    /// A guest write: by default it just goes down to `child`.
    async fn write(&self, child: &Arc<Node>, w: GuestWrite) -> Result<()> {
        w.on_node(child).await
    }
}

/// A filter a job puts above a node: reads, flushes and block status pass
/// through; writes go through the job's [`FilterHooks`].
pub struct JobFilter<H>(pub H);

#[async_trait]
impl<H: FilterHooks> BlockDriver for JobFilter<H> {
    fn driver_name(&self) -> &'static str {
        self.0.driver_name()
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn child_perm(&self, _role: Role, parents: PermPair, _writable: bool) -> PermPair {
        self.0.child_perm(parents)
    }

    async fn read(&self, node: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()> {
        node.required_child(Role::File)?.read(offset, buf).await
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        let len = data.len() as u64;
        let kind = WriteKind::Data(data, flags);
        let child = node.required_child(Role::File)?;
        self.0.write(&child, GuestWrite { offset, len, kind }).await
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        let kind = WriteKind::Zeroes(flags);
        let child = node.required_child(Role::File)?;
        self.0.write(&child, GuestWrite { offset, len, kind }).await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        let kind = WriteKind::Discard;
        let child = node.required_child(Role::File)?;
        self.0.write(&child, GuestWrite { offset, len, kind }).await
    }

    async fn flush(&self, node: &Node) -> Result<()> {
        node.required_child(Role::File)?.flush().await
    }

    async fn block_status(&self, _node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus::Passthrough {
            len,
            child: Role::File,
            offset,
        })
    }
}

/// QEMU's `commit_top`: a filter above the committed top that takes no
/// permission on it and shares everything, so the layers below may be
/// written by the job while the overlays above keep reading.
pub struct CommitTop;

impl FilterHooks for CommitTop {
    fn driver_name(&self) -> &'static str {
        "commit_top"
    }

    fn child_perm(&self, _parents: PermPair) -> PermPair {
        PermPair::new(Perm::empty(), Perm::ALL)
    }
}

/// Adds a filter node over `below` and moves every parent of `below` to
/// it, drained. Without a `name` the node is implicit (auto-named, closed
/// when dropped).
pub async fn insert_filter(
    w: &GraphWriter<'_>,
    below: &Arc<Node>,
    driver: Box<dyn BlockDriver>,
    name: Option<&str>,
) -> Result<Arc<Node>> {
    let filter = w
        .add_node(NodeSpec {
            name: name.map(NodeName::new).transpose()?,
            driver,
            size: below.size(),
            read_only: false,
            children: vec![(Role::File, below.clone())],
            implicit: name.is_none(),
        })
        .await?;
    let drained = w.drain(below).await;
    if let Err(e) = w.insert_filter(&drained, below, &filter).await {
        drop(drained);
        remove_filter(w, below, &filter).await;
        return Err(e);
    }
    Ok(filter)
}

/// Takes a job's filter out again (its parents get `below` back), drained.
pub async fn remove_filter(w: &GraphWriter<'_>, below: &Arc<Node>, filter: &Arc<Node>) {
    let drained = w.drain(below).await;
    if let Err(e) = w.drop_filter(&drained, filter).await {
        tracing::warn!(filter = filter.name(), "could not drop a job's filter: {e}");
    }
}

/// The two roots a copying job works through, both named after the job:
/// one reading `from`, one writing `to`. They share everything: the
/// filters and drains of the job, not permissions, keep the guest safe.
pub async fn copy_roots(
    w: &GraphWriter<'_>,
    id: &str,
    from: &Arc<Node>,
    to: &Arc<Node>,
) -> Result<(Root, Root)> {
    let reader = w
        .add_root(
            "job",
            id,
            from,
            PermPair::new(Perm::CONSISTENT_READ, Perm::ALL),
        )
        .await?;
    let writer = w
        .add_root(
            "job",
            id,
            to,
            PermPair::new(Perm::WRITE | Perm::CONSISTENT_READ, Perm::ALL),
        )
        .await?;
    Ok((reader, writer))
}
