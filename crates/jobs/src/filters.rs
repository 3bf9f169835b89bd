//! Filters the jobs put into the graph for their duration, and the two
//! drained steps that put one in and take it out again.

use async_trait::async_trait;
use sluice_core::{
    BlockDriver, DriverStatus, GraphWriter, IoBytes, Node, NodeName, NodeSpec, Perm, PermPair,
    ReadBuf, Result, Role, WriteFlags, ZeroFlags,
};
use std::sync::Arc;

/// QEMU's `commit_top`: a filter above the committed top that takes no
/// permission on it and shares everything, so the layers below may be
/// written by the job while the overlays above keep reading.
pub struct CommitTop;

#[async_trait]
impl BlockDriver for CommitTop {
    fn driver_name(&self) -> &'static str {
        "commit_top"
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn child_perm(&self, _role: Role, _parents: PermPair, _writable: bool) -> PermPair {
        PermPair::new(Perm::empty(), Perm::ALL)
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
        node.required_child(Role::File)?
            .write(offset, data, flags)
            .await
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        node.required_child(Role::File)?
            .write_zeroes(offset, len, flags)
            .await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        node.required_child(Role::File)?.discard(offset, len).await
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
