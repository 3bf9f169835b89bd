//! The primitive edge operations every graph change is made of. Each keeps
//! both ends of the edge and the drain counts consistent:
//!
//! for every node or root X,
//! `X.quiesce = (drains of X itself) + Σ over X's child edges of child.quiesce`.
//!
//! So a parent attached to a drained node starts out quiesced, and one
//! detached from it is released. Callers hold the graph-writer lock.

use super::node::{Edge, Node, Parent};
use std::sync::{Arc, Weak};

/// Adds `n` drains to `parent` and everything above it.
pub(crate) fn quiesce_up(parent: &Parent, n: usize) {
    if n == 0 {
        return;
    }
    match parent {
        Parent::Root(r) => {
            if let Some(r) = r.upgrade() {
                r.gate.begin_quiesce_n(n);
            }
        }
        Parent::Node(p) => {
            if let Some(p) = p.upgrade() {
                quiesce_node_up(&p, n);
            }
        }
    }
}

/// Adds `n` drains to `node` and its ancestors; a node whose count
/// leaves zero is told ([`crate::BlockDriver::drained_begin`]).
pub(crate) fn quiesce_node_up(node: &Arc<Node>, n: usize) {
    let was_running = node.gate.quiesce_count() == 0;
    node.gate.begin_quiesce_n(n);
    if was_running && n > 0 {
        node.driver().drained_begin(node);
    }
    for e in node.parents() {
        quiesce_up(&e.parent, n);
    }
}

/// Removes `n` drains from `parent` and everything above it.
pub(crate) fn unquiesce_up(parent: &Parent, n: usize) {
    if n == 0 {
        return;
    }
    match parent {
        Parent::Root(r) => {
            if let Some(r) = r.upgrade() {
                r.gate.end_quiesce_n(n);
            }
        }
        Parent::Node(p) => {
            if let Some(p) = p.upgrade() {
                unquiesce_node_up(&p, n);
            }
        }
    }
}

/// Removes `n` drains from `node` and its ancestors.
pub(crate) fn unquiesce_node_up(node: &Arc<Node>, n: usize) {
    for e in node.parents() {
        unquiesce_up(&e.parent, n);
    }
    node.gate.end_quiesce_n(n);
}

/// Links `edge` into the graph. For a root parent the root's previous edge
/// is returned (the caller unlinks it from its child separately).
pub(crate) fn link(edge: &Arc<Edge>) -> Option<Arc<Edge>> {
    let prev = match &edge.parent {
        Parent::Node(p) => {
            let p = p.upgrade().expect("linking an edge of a dropped parent");
            let mut list = p.children.load().as_ref().clone();
            list.push(edge.clone());
            p.children.store(Arc::new(list));
            None
        }
        Parent::Root(r) => {
            let r = r.upgrade().expect("linking an edge of a dropped root");
            Some(r.edge.swap(edge.clone()))
        }
    };
    edge.child.parents.lock().push(Arc::downgrade(edge));
    quiesce_up(&edge.parent, edge.child.gate.quiesce_count());
    prev
}

/// Unlinks `edge` from both ends. A root keeps pointing at it until its new
/// edge is linked.
pub(crate) fn unlink(edge: &Arc<Edge>) {
    if let Parent::Node(p) = &edge.parent {
        if let Some(p) = p.upgrade() {
            let list: Vec<_> = p
                .children
                .load()
                .iter()
                .filter(|e| !Arc::ptr_eq(e, edge))
                .cloned()
                .collect();
            p.children.store(Arc::new(list));
        }
    }
    unlink_from_child(edge);
    unquiesce_up(&edge.parent, edge.child.gate.quiesce_count());
}

/// Removes `edge` from its child's parent list only (a root going away).
pub(crate) fn unlink_from_child(edge: &Arc<Edge>) {
    let target = Arc::as_ptr(edge);
    edge.child
        .parents
        .lock()
        .retain(|w| !std::ptr::eq(Weak::as_ptr(w), target) && w.strong_count() > 0);
}

/// Whether `maybe_ancestor` is `node` or lies above it.
pub(crate) fn is_ancestor_or_self(maybe_ancestor: &Arc<Node>, node: &Arc<Node>) -> bool {
    if Arc::ptr_eq(maybe_ancestor, node) {
        return true;
    }
    node.parents().iter().any(|e| match e.parent.node() {
        Some(p) => is_ancestor_or_self(maybe_ancestor, &p),
        None => false,
    })
}
