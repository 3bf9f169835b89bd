//! Roots: where requests enter the graph (QEMU's `BlockBackend`).
//!
//! An export, a job or a tool holds a [`Root`]. While a drained section
//! covers the root's node, new requests queue at the root's gate; requests
//! already admitted run to completion.

use super::node::{Edge, Node, Parent};
use crate::buf::{IoBuf, IoBytes};
use crate::drain::gate::{Gate, InFlight};
use crate::driver::{WriteFlags, ZeroFlags};
use crate::error::{Error, Result};
use crate::perm::{Perm, PermPair};
use crate::status::{block_status_chain, Extent};
use arc_swap::ArcSwap;
use std::sync::{Arc, Weak};

pub struct RootInner {
    /// What kind of user this is, for messages: `block device`, `export`, `job`.
    pub(crate) kind: String,
    pub(crate) name: String,
    pub(crate) gate: Arc<Gate>,
    pub(crate) edge: ArcSwap<Edge>,
}

/// A handle through which requests enter the graph. Dropping it detaches
/// the root from its node.
pub struct Root {
    pub(crate) inner: Arc<RootInner>,
}

impl Root {
    pub(crate) fn new(kind: &str, name: &str, node: Arc<Node>, perm: PermPair) -> Root {
        let inner = Arc::new_cyclic(|weak: &Weak<RootInner>| RootInner {
            kind: kind.to_string(),
            name: name.to_string(),
            gate: Arc::new(Gate::new()),
            edge: ArcSwap::new(Edge::new(
                Parent::Root(weak.clone()),
                super::Role::File,
                node,
                perm,
            )),
        });
        Root { inner }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node requests currently go to.
    pub fn node(&self) -> Arc<Node> {
        self.inner.edge.load().child.clone()
    }

    pub fn perm(&self) -> PermPair {
        self.inner.edge.load().perm()
    }

    pub fn size(&self) -> u64 {
        self.node().size()
    }

    /// Requests in flight through this root.
    pub fn in_flight(&self) -> usize {
        self.inner.gate.in_flight()
    }

    /// Whether new requests are being queued by a drained section.
    pub fn is_quiesced(&self) -> bool {
        self.inner.gate.is_quiesced()
    }

    /// Counts one request in flight through this root, waiting first while
    /// a drained section covers it. Users that query a node below the root
    /// directly (a job asking one layer for its allocation) hold this
    /// guard meanwhile, so drains wait for them and they wait for drains.
    pub async fn admit(&self) -> InFlight {
        self.inner.gate.enter().await
    }

    fn require(&self, perm: Perm, op: &str) -> Result<()> {
        if self.perm().perm.contains(perm) {
            Ok(())
        } else {
            Err(Error::InvalidRequest {
                node: self.node().name().to_string(),
                reason: format!(
                    "{op} through {} '{}', which did not take the '{}' permission",
                    self.inner.kind,
                    self.inner.name,
                    perm.name()
                ),
            })
        }
    }

    /// Reads into `buf` at `offset` and gives the buffer back.
    pub async fn read_into(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let _in_flight = self.inner.gate.enter().await;
        let node = self.node();
        node.read(offset, buf.as_read_buf()).await?;
        Ok(buf)
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        self.read_into(offset, IoBuf::recycled(len)).await
    }

    pub async fn write(&self, offset: u64, data: IoBytes, flags: WriteFlags) -> Result<()> {
        self.require(Perm::WRITE, "write")?;
        let _in_flight = self.inner.gate.enter().await;
        self.node().write(offset, data, flags).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.require(Perm::WRITE, "write-zeroes")?;
        let _in_flight = self.inner.gate.enter().await;
        self.node().write_zeroes(offset, len, flags).await
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.require(Perm::WRITE, "discard")?;
        let _in_flight = self.inner.gate.enter().await;
        self.node().discard(offset, len).await
    }

    pub async fn flush(&self) -> Result<()> {
        let _in_flight = self.inner.gate.enter().await;
        self.node().flush().await
    }

    /// Status of the range through the whole backing chain (`qemu-img map`).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let _in_flight = self.inner.gate.enter().await;
        block_status_chain(&self.node(), offset, len).await
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let edge = self.inner.edge.load_full();
        super::links::unlink_from_child(&edge);
    }
}
