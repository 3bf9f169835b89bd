//! The block graph: nodes, edges, roots, and the one writer that changes it.

pub(crate) mod links;
mod node;
mod perms;
mod reopen;
mod root;
mod serialize;
mod snapshot;
mod transaction;

pub use node::{Edge, Node, NodeSpec, Parent, Role, MAX_REQUEST_BYTES};
pub use root::Root;
pub(crate) use root::RootInner;
pub use snapshot::{EdgeSnapshot, GraphSnapshot, NodeSnapshot, RootSnapshot};
pub use transaction::Transaction;

use crate::drain::{DrainProof, Drained, DrainedAll};
use crate::error::{Error, Result};
use crate::name::NodeName;
use crate::perm::PermPair;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

/// A block graph. Cheap to clone: clones share the graph.
#[derive(Clone, Default)]
pub struct Graph {
    inner: Arc<GraphInner>,
}

#[derive(Default)]
pub(crate) struct GraphInner {
    /// The graph-writer lock: control work (QMP commands, job completion,
    /// tool set-up) is serialised by it, the role QEMU gives its main loop.
    writer: tokio::sync::Mutex<()>,
    pub(crate) nodes: Mutex<BTreeMap<NodeName, Arc<Node>>>,
    roots: Mutex<Vec<Weak<RootInner>>>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Takes the graph-writer lock. Every change goes through the writer.
    pub async fn writer(&self) -> GraphWriter<'_> {
        GraphWriter {
            graph: self,
            _lock: self.inner.writer.lock().await,
        }
    }

    /// Looks a node up by name.
    pub fn node(&self, name: &str) -> Result<Arc<Node>> {
        self.inner
            .nodes
            .lock()
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, node)| node.clone())
            .ok_or_else(|| Error::NodeNotFound {
                name: name.to_string(),
            })
    }

    /// Every node, ordered by name.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.inner.nodes.lock().values().cloned().collect()
    }

    /// Every live root.
    pub fn roots(&self) -> Vec<Arc<RootInner>> {
        let mut roots = self.inner.roots.lock();
        roots.retain(|r| r.strong_count() > 0);
        roots.iter().filter_map(Weak::upgrade).collect()
    }

    /// A comparable picture of names, edges and permissions.
    pub fn snapshot(&self) -> GraphSnapshot {
        GraphSnapshot::of(self)
    }
}

/// Proof that the caller holds the graph-writer lock; all changes hang off it.
pub struct GraphWriter<'g> {
    graph: &'g Graph,
    _lock: tokio::sync::MutexGuard<'g, ()>,
}

impl<'g> GraphWriter<'g> {
    pub fn graph(&self) -> &'g Graph {
        self.graph
    }

    pub(crate) fn inner(&self) -> &GraphInner {
        &self.graph.inner
    }

    /// Begins a drained section of `node`: quiesces its parents up to the
    /// roots and waits out every request in flight through it.
    pub async fn drain(&self, node: &Arc<Node>) -> Drained<'_> {
        Drained::begin(node).await
    }

    /// A guard that skips the drain, for negative-control tests only: it
    /// shows what goes wrong without a drained section.
    #[cfg(feature = "test-hooks")]
    pub fn drain_skipped_for_negative_control(&self, node: &Arc<Node>) -> Drained<'_> {
        Drained::skipped(node)
    }

    /// Drains every node in the graph.
    pub async fn drain_all(&self) -> DrainedAll<'_> {
        DrainedAll::begin(self.graph.nodes()).await
    }

    /// Starts a transaction: a list of graph changes applied as one.
    pub fn transaction(&self) -> Transaction<'_, 'g> {
        Transaction::new(self)
    }

    /// Adds a node with its children. The new node has no parents, so no
    /// drain is needed to give it children.
    pub async fn add_node(&self, spec: NodeSpec) -> Result<Arc<Node>> {
        let mut tx = self.transaction();
        let node = tx.add_node(spec)?;
        tx.commit().await?;
        Ok(node)
    }

    /// Attaches a root (an export, job or tool) to `node` with `perm`.
    /// `kind` names the user in messages ("block device", "export").
    pub async fn add_root(
        &self,
        kind: &str,
        name: &str,
        node: &Arc<Node>,
        perm: PermPair,
    ) -> Result<Root> {
        let mut tx = self.transaction();
        let root = tx.add_root(kind, name, node, perm)?;
        tx.commit().await?;
        self.inner().roots.lock().push(Arc::downgrade(&root.inner));
        Ok(root)
    }

    /// Sets (or with `None` removes) `node`'s backing child.
    ///
    /// The drained-section guard is part of the signature:
    ///
    /// ```no_run
    /// # async fn f(g: &sluice_core::Graph, top: &std::sync::Arc<sluice_core::Node>) -> sluice_core::Result<()> {
    /// let w = g.writer().await;
    /// let drained = w.drain(top).await;
    /// w.set_backing(&drained, top, None).await
    /// # }
    /// ```
    ///
    /// and a change without one does not compile:
    ///
    /// ```compile_fail
    /// # async fn f(g: &sluice_core::Graph, top: &std::sync::Arc<sluice_core::Node>) -> sluice_core::Result<()> {
    /// let w = g.writer().await;
    /// w.set_backing(top, None).await
    /// # }
    /// ```
    ///
    /// nor can a guard outlive the writer lock it was taken under:
    ///
    /// ```compile_fail
    /// # async fn f(g: &sluice_core::Graph, top: &std::sync::Arc<sluice_core::Node>) {
    /// let drained = {
    ///     let w = g.writer().await;
    ///     w.drain(top).await
    /// };
    /// # }
    /// ```
    pub async fn set_backing(
        &self,
        proof: &dyn DrainProof,
        node: &Arc<Node>,
        backing: Option<&Arc<Node>>,
    ) -> Result<()> {
        let mut tx = self.transaction();
        tx.set_backing(proof, node, backing)?;
        tx.commit().await
    }

    /// Replaces `from` by `to` in every parent of `from`.
    pub async fn replace_node(
        &self,
        proof: &dyn DrainProof,
        from: &Arc<Node>,
        to: &Arc<Node>,
    ) -> Result<()> {
        let mut tx = self.transaction();
        tx.replace_node(proof, from, to)?;
        tx.commit().await
    }

    /// Puts `filter` (whose filtered child is `below`) above `below`.
    pub async fn insert_filter(
        &self,
        proof: &dyn DrainProof,
        below: &Arc<Node>,
        filter: &Arc<Node>,
    ) -> Result<()> {
        let mut tx = self.transaction();
        tx.insert_filter(proof, below, filter)?;
        tx.commit().await
    }

    /// Takes `filter` out: its parents point at its filtered child again.
    pub async fn drop_filter(&self, proof: &dyn DrainProof, filter: &Arc<Node>) -> Result<()> {
        let mut tx = self.transaction();
        tx.drop_filter(proof, filter)?;
        tx.commit().await
    }

    /// Drains everything a reopen of `node` may switch: `node` and the
    /// children it writes through (see [`GraphWriter::reopen_read_only`]).
    pub async fn drain_for_reopen(&self, node: &Arc<Node>) -> DrainedAll<'_> {
        DrainedAll::begin(reopen::write_through_subtree(node)).await
    }

    /// Switches `node`, and the implicit children it writes through, to
    /// read-only or read-write (QEMU's `bdrv_reopen_set_read_only`), then
    /// rechecks permissions; on any failure everything is switched back.
    /// The proof must cover every node switched ([`Self::drain_for_reopen`]).
    pub async fn reopen_read_only(
        &self,
        proof: &dyn DrainProof,
        node: &Arc<Node>,
        read_only: bool,
    ) -> Result<()> {
        reopen::reopen_nodes(self, proof, vec![(node.clone(), read_only)]).await
    }

    /// Switches several nodes, each to its mode (and the implicit
    /// children that follow it, unless named themselves), as one step:
    /// QEMU's `blockdev-reopen` with several entries. The same order,
    /// checks and rollback as [`Self::reopen_read_only`]; the last entry
    /// for a node counts.
    pub async fn reopen_nodes(
        &self,
        proof: &dyn DrainProof,
        targets: Vec<(Arc<Node>, bool)>,
    ) -> Result<()> {
        reopen::reopen_nodes(self, proof, targets).await
    }

    /// Removes a node no one uses (`blockdev-del`).
    pub async fn delete_node(&self, proof: &dyn DrainProof, node: &Arc<Node>) -> Result<()> {
        let mut tx = self.transaction();
        tx.delete_node(proof, node)?;
        tx.commit().await
    }
}
