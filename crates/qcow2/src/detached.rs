//! A qcow2 image opened for a change of its whole metadata (internal
//! snapshots, amend) with exactly one qcow2 driver: the [`Qcow2Driver`]
//! is the caller's, outside the graph, and the image's place in the graph
//! is taken by a node that only holds its children (`file`, `data-file`,
//! `backing`), the sizes and the permissions a qcow2 node would: its own
//! driver ([`ChildHolder`]) does no I/O. The operations reach the
//! children through that node, as they would through the image's own.

use crate::driver::Qcow2Driver;
use crate::options::Qcow2Options;
use async_trait::async_trait;
use sluice_core::{BlockDriver, DriverStatus, Error, IoBytes, Node, ReadBuf, Result, Role};
use std::sync::Arc;

/// An image opened detached: its one qcow2 driver, the options it was
/// opened with (for an operation that has to open it again), and the
/// node holding its children.
pub struct Detached {
    pub driver: Qcow2Driver,
    pub options: Qcow2Options,
    pub node: Arc<Node>,
}

impl Detached {
    /// The image file.
    pub fn file(&self) -> Result<Arc<Node>> {
        self.driver.file(&self.node)
    }

    /// Writes everything back and marks the image clean, as the flush
    /// of a closing qcow2 node does: the data file, then the metadata and
    /// the image file.
    pub async fn finish(&self) -> Result<()> {
        if self.node.is_read_only() {
            return Ok(());
        }
        if let Some(data) = self.node.child(Role::Data) {
            data.flush().await?;
        }
        crate::snapshot::close(&self.driver, &*self.file()?).await
    }
}

/// The driver of a [`Detached`] image's node: the children's holder.
pub struct ChildHolder;

impl ChildHolder {
    fn refused(node: &Node) -> Error {
        Error::NotSupported {
            node: node.name().to_string(),
            driver: "qcow2",
            what: "requests through a qcow2 image opened for a metadata change",
        }
    }
}

#[async_trait]
impl BlockDriver for ChildHolder {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn supports_backing(&self) -> bool {
        true
    }

    async fn read(&self, node: &Node, _offset: u64, _buf: ReadBuf<'_>) -> Result<()> {
        Err(Self::refused(node))
    }

    async fn write(
        &self,
        node: &Node,
        _offset: u64,
        _data: IoBytes,
        _flags: sluice_core::WriteFlags,
    ) -> Result<()> {
        Err(Self::refused(node))
    }

    /// The metadata is the driver's to write back ([`Detached::finish`]);
    /// the children flush themselves when they close.
    async fn flush(&self, _node: &Node) -> Result<()> {
        Ok(())
    }

    async fn block_status(&self, node: &Node, _offset: u64, _len: u64) -> Result<DriverStatus> {
        Err(Self::refused(node))
    }
}
