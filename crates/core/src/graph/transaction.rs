//! Graph changes as transactions: a list of undoable steps, committed or
//! rolled back as one (QEMU's `Transaction`/`tran_*`).
//!
//! Each step applies at once, so later steps see it, and records how to undo
//! it. `commit` rechecks permissions over the graph; a conflict — or an error
//! in any step, or dropping the transaction — rolls every step back in
//! reverse order, leaving names, edges and permissions exactly as before.
//! Only after that check does `commit` close nodes that lost their last user.

use super::links::{self, is_ancestor_or_self};
use super::node::{Edge, Node, NodeSpec, Parent, Role};
use super::perms;
use super::root::Root;
use super::GraphWriter;
use crate::drain::DrainProof;
use crate::error::{Error, Result};
use crate::name::NodeName;
use crate::perm::PermPair;
use std::sync::Arc;

/// A step already applied, and what undoing it takes.
enum Undo {
    Linked {
        edge: Arc<Edge>,
        /// For a root: the edge it had before.
        prev_root_edge: Option<Arc<Edge>>,
    },
    Unlinked(Arc<Edge>),
    Registered(Arc<Node>),
    Unregistered(Arc<Node>),
    /// A driver-level change (e.g. an image header rewrite) to revert.
    Custom(Box<dyn FnOnce() + Send>),
}

pub struct Transaction<'w, 'g> {
    w: &'w GraphWriter<'g>,
    undo: Vec<Undo>,
    /// Nodes that may have lost their last parent; closed at commit if so.
    orphan_candidates: Vec<Arc<Node>>,
    /// Nodes removed on purpose; closed at commit.
    deleted: Vec<Arc<Node>>,
    /// Nodes this transaction changes, each held quiesced until it ends.
    /// A drain of a node *below* a changed node covers it only while the
    /// path between them exists; the first step that cuts that path (a
    /// new backing link, a dropped filter) would release it, and a queued
    /// request could run into the half-done change. The pin keeps it
    /// quiesced whatever the steps do to the edges.
    pins: Vec<Arc<Node>>,
    steps: usize,
    fail_at: Option<usize>,
    /// Test-only: changed nodes are not pinned (negative controls).
    no_pins: bool,
}

impl<'w, 'g> Transaction<'w, 'g> {
    pub(crate) fn new(w: &'w GraphWriter<'g>) -> Self {
        Transaction {
            w,
            undo: Vec::new(),
            orphan_candidates: Vec::new(),
            deleted: Vec::new(),
            pins: Vec::new(),
            steps: 0,
            fail_at: None,
            no_pins: false,
        }
    }

    /// Makes the transaction fail at primitive step `k` (0-based; the
    /// permission check at commit is the last step). Tests use this to show
    /// that a failure anywhere leaves the graph as it was.
    #[cfg(feature = "test-hooks")]
    pub fn fail_at_step(&mut self, k: usize) {
        self.fail_at = Some(k);
    }

    /// Leaves changed nodes unpinned, for the negative control of the
    /// pinning test: it shows the drain coverage a cut path loses.
    #[cfg(feature = "test-hooks")]
    pub fn skip_pins_for_negative_control(&mut self) {
        self.no_pins = true;
    }

    /// Primitive steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    fn step(&mut self) -> Result<()> {
        let k = self.steps;
        self.steps += 1;
        if self.fail_at == Some(k) {
            return Err(Error::GraphChange(format!("failure injected at step {k}")));
        }
        Ok(())
    }

    fn link(&mut self, edge: Arc<Edge>) -> Result<()> {
        self.step()?;
        let prev_root_edge = links::link(&edge);
        self.undo.push(Undo::Linked {
            edge,
            prev_root_edge,
        });
        Ok(())
    }

    fn unlink(&mut self, edge: &Arc<Edge>) -> Result<()> {
        self.step()?;
        links::unlink(edge);
        self.orphan_candidates.push(edge.child.clone());
        self.undo.push(Undo::Unlinked(edge.clone()));
        Ok(())
    }

    fn register(&mut self, node: &Arc<Node>) -> Result<()> {
        self.step()?;
        let mut nodes = self.w.inner().nodes.lock();
        if nodes.contains_key(node.node_name()) {
            return Err(Error::DuplicateNodeName {
                name: node.name().to_string(),
            });
        }
        nodes.insert(node.node_name().clone(), node.clone());
        drop(nodes);
        self.undo.push(Undo::Registered(node.clone()));
        Ok(())
    }

    fn unregister(&mut self, node: &Arc<Node>) -> Result<()> {
        self.step()?;
        self.w.inner().nodes.lock().remove(node.node_name());
        self.undo.push(Undo::Unregistered(node.clone()));
        Ok(())
    }

    /// Records an undo action for a change a driver made as part of this
    /// transaction (for instance a rewritten image header).
    pub fn on_abort(&mut self, undo: impl FnOnce() + Send + 'static) -> Result<()> {
        self.step()?;
        self.undo.push(Undo::Custom(Box::new(undo)));
        Ok(())
    }

    fn require(&mut self, proof: &dyn DrainProof, node: &Arc<Node>) -> Result<()> {
        if proof.covers(node) {
            // Already idle and quiesced (the proof says so): pinning it
            // waits for nothing.
            if !self.no_pins && !self.pins.iter().any(|p| Arc::ptr_eq(p, node)) {
                links::quiesce_node_up(node, 1);
                self.pins.push(node.clone());
            }
            Ok(())
        } else {
            Err(Error::WrongDrain {
                node: node.name().to_string(),
                drained: proof.drained_what(),
            })
        }
    }

    fn new_edge(parent: &Arc<Node>, role: Role, child: &Arc<Node>) -> Arc<Edge> {
        Edge::new(
            Parent::Node(Arc::downgrade(parent)),
            role,
            child.clone(),
            PermPair::NONE_ALL_SHARED,
        )
    }

    /// A node has at most one child per role.
    fn check_role_free(parent: &Arc<Node>, role: Role) -> Result<()> {
        match parent.child(role) {
            Some(_) => Err(Error::GraphChange(format!(
                "node '{}' already has a '{}' child",
                parent.name(),
                role
            ))),
            None => Ok(()),
        }
    }

    fn existing_edge(parent: &Arc<Node>, role: Role) -> Result<Arc<Edge>> {
        parent.child_edge(role).ok_or_else(|| {
            Error::GraphChange(format!("node '{}' has no '{}' child", parent.name(), role))
        })
    }

    fn check_no_cycle(parent: &Arc<Node>, child: &Arc<Node>) -> Result<()> {
        if is_ancestor_or_self(child, parent) {
            return Err(Error::GraphChange(format!(
                "making '{}' a child of '{}' would create a loop",
                child.name(),
                parent.name()
            )));
        }
        Ok(())
    }

    /// Creates a node with its children. A fresh node has no parents, so no
    /// request can be inside it: it needs no drain.
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<Arc<Node>> {
        let name = spec.name.unwrap_or_else(NodeName::generated);
        let node = Node::new(name, spec.driver, spec.size, spec.read_only, spec.implicit);
        self.register(&node)?;
        for (role, child) in &spec.children {
            Self::check_role_free(&node, *role)?;
            if child.is_closed() {
                return Err(Error::NodeClosed {
                    node: child.name().to_string(),
                });
            }
            self.link(Self::new_edge(&node, *role, child))?;
        }
        Ok(node)
    }

    /// Attaches a root to `node`.
    pub fn add_root(
        &mut self,
        kind: &str,
        name: &str,
        node: &Arc<Node>,
        perm: PermPair,
    ) -> Result<Root> {
        if node.is_closed() {
            return Err(Error::NodeClosed {
                node: node.name().to_string(),
            });
        }
        self.step()?;
        let root = Root::new(kind, name, node.clone(), perm);
        let edge = root.inner.edge.load_full();
        // The edge is already the root's; link only the child side.
        node.parents.lock().push(Arc::downgrade(&edge));
        links::quiesce_up(&edge.parent, node.gate.quiesce_count());
        self.undo.push(Undo::Custom(Box::new(move || {
            links::unlink(&edge);
        })));
        Ok(root)
    }

    /// Attaches `child` to `parent` in `role`.
    pub fn attach_child(
        &mut self,
        proof: &dyn DrainProof,
        parent: &Arc<Node>,
        role: Role,
        child: &Arc<Node>,
    ) -> Result<()> {
        self.require(proof, parent)?;
        Self::check_role_free(parent, role)?;
        Self::check_no_cycle(parent, child)?;
        self.link(Self::new_edge(parent, role, child))
    }

    /// Detaches `parent`'s child in `role`.
    pub fn detach_child(
        &mut self,
        proof: &dyn DrainProof,
        parent: &Arc<Node>,
        role: Role,
    ) -> Result<()> {
        self.require(proof, parent)?;
        let edge = Self::existing_edge(parent, role)?;
        self.unlink(&edge)
    }

    /// Replaces `parent`'s child in `role` by `child`.
    pub fn replace_child(
        &mut self,
        proof: &dyn DrainProof,
        parent: &Arc<Node>,
        role: Role,
        child: &Arc<Node>,
    ) -> Result<()> {
        self.require(proof, parent)?;
        Self::check_no_cycle(parent, child)?;
        let old = Self::existing_edge(parent, role)?;
        self.unlink(&old)?;
        self.link(Self::new_edge(parent, role, child))
    }

    /// Sets `node`'s backing child to `backing`, or removes it with `None`
    /// (QEMU's `bdrv_set_backing_hd`).
    pub fn set_backing(
        &mut self,
        proof: &dyn DrainProof,
        node: &Arc<Node>,
        backing: Option<&Arc<Node>>,
    ) -> Result<()> {
        self.require(proof, node)?;
        if !node.driver().supports_backing() {
            return Err(Error::NotSupported {
                node: node.name().to_string(),
                driver: node.driver_name(),
                what: "a backing file",
            });
        }
        match (node.child_edge(Role::Backing), backing) {
            (Some(old), Some(new)) if Arc::ptr_eq(&old.child, new) => Ok(()),
            (Some(_), Some(new)) => self.replace_child(proof, node, Role::Backing, new),
            (None, Some(new)) => self.attach_child(proof, node, Role::Backing, new),
            (Some(_), None) => self.detach_child(proof, node, Role::Backing),
            (None, None) => Ok(()),
        }
    }

    /// Moves every parent of `from` (nodes and roots) over to `to`, except
    /// edges coming from `to` itself or from `skip` (a filter above `from`).
    fn move_parents(
        &mut self,
        proof: &dyn DrainProof,
        from: &Arc<Node>,
        to: &Arc<Node>,
        skip: Option<&Arc<Node>>,
    ) -> Result<()> {
        for edge in from.parents() {
            match &edge.parent {
                Parent::Node(p) => {
                    let Some(p) = p.upgrade() else { continue };
                    if Arc::ptr_eq(&p, to) || skip.is_some_and(|s| Arc::ptr_eq(&p, s)) {
                        continue;
                    }
                    self.require(proof, &p)?;
                    Self::check_no_cycle(&p, to)?;
                    self.unlink(&edge)?;
                    self.link(Self::new_edge(&p, edge.role, to))?;
                }
                Parent::Root(r) => {
                    let Some(r) = r.upgrade() else { continue };
                    // A root's requests pass through `from`: the proof must
                    // cover `from` itself for the root to be quiesced.
                    self.require(proof, from)?;
                    self.unlink(&edge)?;
                    let new = Edge::new(
                        Parent::Root(Arc::downgrade(&r)),
                        edge.role,
                        to.clone(),
                        edge.perm(),
                    );
                    self.link(new)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces `from` by `to` in all of `from`'s parents (what mirror's
    /// pivot needs). The proof must cover every parent of `from`; draining
    /// `from` does.
    pub fn replace_node(
        &mut self,
        proof: &dyn DrainProof,
        from: &Arc<Node>,
        to: &Arc<Node>,
    ) -> Result<()> {
        if Arc::ptr_eq(from, to) {
            return Ok(());
        }
        if to.is_closed() {
            return Err(Error::NodeClosed {
                node: to.name().to_string(),
            });
        }
        self.move_parents(proof, from, to, None)
    }

    /// Puts `filter` above `below`: every parent of `below` now uses
    /// `filter`, whose own filtered child is `below`.
    pub fn insert_filter(
        &mut self,
        proof: &dyn DrainProof,
        below: &Arc<Node>,
        filter: &Arc<Node>,
    ) -> Result<()> {
        match filter.filtered_child() {
            Some(c) if Arc::ptr_eq(&c, below) => {}
            _ => {
                return Err(Error::GraphChange(format!(
                    "'{}' is not a filter of '{}'",
                    filter.name(),
                    below.name()
                )))
            }
        }
        if !filter.parents().is_empty() {
            return Err(Error::InUse {
                node: filter.name().to_string(),
                reason: "a filter to insert must not have parents yet".into(),
            });
        }
        self.move_parents(proof, below, filter, Some(filter))
    }

    /// Takes `filter` out of the graph: its parents get its filtered child,
    /// and the filter is deleted.
    pub fn drop_filter(&mut self, proof: &dyn DrainProof, filter: &Arc<Node>) -> Result<()> {
        let child = filter.filtered_child().ok_or_else(|| {
            Error::GraphChange(format!("'{}' is not a filter with a child", filter.name()))
        })?;
        self.require(proof, filter)?;
        self.move_parents(proof, filter, &child, None)?;
        self.delete_node(proof, filter)
    }

    /// Removes a node that has no parents: detaches its children and drops
    /// its name; it is closed at commit.
    pub fn delete_node(&mut self, proof: &dyn DrainProof, node: &Arc<Node>) -> Result<()> {
        self.require(proof, node)?;
        if let Some(user) = node.parents().first() {
            return Err(Error::InUse {
                node: node.name().to_string(),
                reason: format!(
                    "it is used as '{}' by {}",
                    user.user_role(),
                    user.parent.describe()
                ),
            });
        }
        // The node keeps its children until commit closes it: closing
        // flushes the driver (a format writes back cached metadata through
        // its file) before the children go.
        self.unregister(node)?;
        self.deleted.push(node.clone());
        Ok(())
    }

    /// Rechecks permissions and makes the changes final. On a conflict,
    /// everything is rolled back and the error names both users.
    pub async fn commit(mut self) -> Result<()> {
        self.step()?;
        let new_perms = perms::compute(self.w.graph())?;
        perms::apply(&new_perms)?;
        self.undo.clear();
        let deleted = std::mem::take(&mut self.deleted);
        let candidates = std::mem::take(&mut self.orphan_candidates);
        for node in deleted {
            close_node(self.w, &node).await;
        }
        for node in candidates {
            if node.is_implicit() && node.parents().is_empty() && !node.is_closed() {
                self.w.inner().nodes.lock().remove(node.node_name());
                close_node(self.w, &node).await;
            }
        }
        // Closing only removed users; permissions can only relax.
        if let Ok(relaxed) = perms::compute(self.w.graph()) {
            let _ = perms::apply(&relaxed);
        }
        Ok(())
    }

    fn rollback(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Linked {
                    edge,
                    prev_root_edge,
                } => {
                    links::unlink(&edge);
                    if let (Some(prev), Parent::Root(r)) = (prev_root_edge, &edge.parent) {
                        if let Some(r) = r.upgrade() {
                            r.edge.store(prev);
                        }
                    }
                }
                Undo::Unlinked(edge) => {
                    links::link(&edge);
                }
                Undo::Registered(node) => {
                    self.w.inner().nodes.lock().remove(node.node_name());
                }
                Undo::Unregistered(node) => {
                    self.w
                        .inner()
                        .nodes
                        .lock()
                        .insert(node.node_name().clone(), node);
                }
                Undo::Custom(f) => f(),
            }
        }
    }
}

impl Drop for Transaction<'_, '_> {
    fn drop(&mut self) {
        self.rollback();
        for node in self.pins.drain(..) {
            links::unquiesce_node_up(&node, 1);
        }
    }
}

/// Closes a node that has left the graph: refuses new requests, drains it,
/// flushes it while its children are still attached (as QEMU's `bdrv_close`
/// flushes first), detaches its children (closing implicit ones left without
/// users), and closes its driver.
async fn close_node(w: &GraphWriter<'_>, node: &Arc<Node>) {
    let mut queue = vec![node.clone()];
    while let Some(n) = queue.pop() {
        n.mark_closed();
        let drained = w.drain(&n).await;
        if let Err(e) = n.driver().flush(&n).await {
            tracing::warn!(node = n.name(), "flush before close failed: {e}");
        }
        for edge in n.children() {
            links::unlink(&edge);
            let c = edge.child.clone();
            if c.is_implicit() && c.parents().is_empty() && !c.is_closed() {
                w.inner().nodes.lock().remove(c.node_name());
                queue.push(c);
            }
        }
        drop(drained);
        n.close_driver();
    }
}
