//! Reopening nodes read-only or read-write (QEMU's
//! `bdrv_reopen_set_read_only`).
//!
//! A reopen switches a node and the children it writes through that it
//! opened itself (implicit `file`, `filtered` and `data` children: QEMU
//! reopens the children that inherit their options), each through its
//! driver's [`BlockDriver::reopen`](crate::BlockDriver::reopen) hook, then
//! rechecks permissions over the graph.
//!
//! Order matters: to read-write, children switch first (a qcow2 node's
//! repair and writer need a writable file); to read-only, parents switch
//! first (a qcow2 node flushes through its still-writable file). Any
//! failure — a driver, a lock held by another process, a permission
//! conflict — switches back what was switched, in reverse order, and
//! leaves the permissions as they were.

use super::links::is_ancestor_or_self;
use super::node::{Node, Role};
use super::{perms, GraphWriter};
use crate::drain::DrainProof;
use crate::error::{Error, Result};
use crate::perm::{Perm, PermPair};
use std::sync::Arc;

/// Roles whose child a node writes through (not `backing`: a backing
/// file is only read).
const WRITE_THROUGH: [Role; 3] = [Role::File, Role::Filtered, Role::Data];

/// `node` and every node below it through write-through edges: what a
/// drain for a reopen must cover.
pub(crate) fn write_through_subtree(node: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut out: Vec<Arc<Node>> = Vec::new();
    let mut stack = vec![node.clone()];
    while let Some(n) = stack.pop() {
        if out.iter().any(|o| Arc::ptr_eq(o, &n)) || out.len() > 4096 {
            continue;
        }
        for role in WRITE_THROUGH {
            if let Some(c) = n.child(role) {
                stack.push(c);
            }
        }
        out.push(n);
    }
    out
}

/// The implicit children `node` writes through: opened with it from
/// nested options, they follow its mode, as QEMU reopens the children
/// that inherit their options from the node.
fn inheriting_children(node: &Node) -> Vec<Arc<Node>> {
    WRITE_THROUGH
        .iter()
        .filter_map(|r| node.child(*r))
        .filter(|c| c.is_implicit())
        .collect()
}

/// Every node the `targets` switch: each target (the last word on a node
/// counts), then the nodes inheriting from it that are not targets
/// themselves; without those already in their mode.
fn switch_set(targets: Vec<(Arc<Node>, bool)>) -> Vec<(Arc<Node>, bool)> {
    let mut named: Vec<(Arc<Node>, bool)> = Vec::new();
    for (n, ro) in targets {
        named.retain(|(m, _)| !Arc::ptr_eq(m, &n));
        named.push((n, ro));
    }
    let known =
        |list: &[(Arc<Node>, bool)], n: &Arc<Node>| list.iter().any(|(m, _)| Arc::ptr_eq(m, n));
    let mut out = named.clone();
    for (n, ro) in &named {
        let mut stack = inheriting_children(n);
        while let Some(c) = stack.pop() {
            if known(&out, &c) || out.len() > 4096 {
                continue;
            }
            stack.extend(inheriting_children(&c));
            out.push((c, *ro));
        }
    }
    out.retain(|(n, ro)| n.is_read_only() != *ro);
    out
}

/// Whether `parent`, writable, needs `child` in `role` writable too: a
/// format writes metadata to its image file whether or not its users
/// write (a repair, the dirty bit at close), as QEMU's
/// `bdrv_default_perms_for_storage` takes write on it. Told by asking the
/// driver what a user that only resizes makes it take: a format adds
/// write, a filter (or raw) passes the resize through.
fn needs_writable(parent: &Node, role: Role) -> bool {
    let resizer = PermPair::new(Perm::RESIZE, Perm::ALL);
    parent
        .driver()
        .child_perm(role, resizer, true)
        .perm
        .contains(Perm::WRITE)
}

/// Checks the graph as it would be with `switches` applied, without
/// changing anything: no writable format over a read-only image file, and
/// the permissions of every user.
fn precheck(w: &GraphWriter<'_>, switches: &[(Arc<Node>, bool)]) -> Result<()> {
    for (n, ro) in switches {
        n.set_read_only(*ro);
    }
    let res = (|| {
        for (n, _) in switches {
            for e in n.children().iter().chain(n.parents().iter()) {
                let Some(parent) = e.parent().node() else {
                    continue;
                };
                let child = e.child();
                if needs_writable(&parent, e.role())
                    && !parent.is_read_only()
                    && child.is_read_only()
                {
                    return Err(Error::ReadOnly {
                        node: child.name().to_string(),
                        user: format!("node '{}' as '{}'", parent.name(), e.role()),
                        perm: "write",
                    });
                }
            }
        }
        perms::compute(w.graph()).map(drop)
    })();
    for (n, ro) in switches {
        n.set_read_only(!*ro);
    }
    res
}

/// The order the drivers switch in: to read-only first, parents before
/// children; then to read-write, children before parents.
fn switch_order(switches: &[(Arc<Node>, bool)]) -> Vec<(Arc<Node>, bool)> {
    let mut out = Vec::new();
    for ro in [true, false] {
        let mut pending: Vec<&Arc<Node>> = switches
            .iter()
            .filter(|(_, r)| *r == ro)
            .map(|(n, _)| n)
            .collect();
        while !pending.is_empty() {
            // A node none of the others must precede.
            let i = (0..pending.len())
                .find(|&i| {
                    !pending.iter().enumerate().any(|(j, other)| {
                        j != i
                            && if ro {
                                is_ancestor_or_self(other, pending[i])
                            } else {
                                is_ancestor_or_self(pending[i], other)
                            }
                    })
                })
                .unwrap_or(0);
            out.push((pending.remove(i).clone(), ro));
        }
    }
    out
}

pub(crate) async fn reopen_nodes(
    w: &GraphWriter<'_>,
    proof: &dyn DrainProof,
    targets: Vec<(Arc<Node>, bool)>,
) -> Result<()> {
    let switches = switch_set(targets);
    for (n, _) in &switches {
        if n.is_closed() {
            return Err(Error::NodeClosed {
                node: n.name().to_string(),
            });
        }
        if !proof.covers(n) {
            return Err(Error::WrongDrain {
                node: n.name().to_string(),
                drained: proof.drained_what(),
            });
        }
    }
    if switches.is_empty() {
        return Ok(());
    }
    precheck(w, &switches)?;
    let mut done: Vec<(Arc<Node>, bool)> = Vec::new();
    let mut res = Ok(());
    for (n, ro) in switch_order(&switches) {
        if let Err(e) = n.driver().reopen(&n, ro).await {
            res = Err(e);
            break;
        }
        n.set_read_only(ro);
        done.push((n, ro));
    }
    if res.is_ok() {
        res = perms::compute(w.graph()).and_then(|plan| perms::apply(&plan));
    }
    if let Err(e) = res {
        switch_back(w, &done).await;
        return Err(e);
    }
    Ok(())
}

/// Undoes the switches in `done`, last first, and puts the permissions
/// back. A node whose driver cannot switch back keeps the flag its driver
/// has, so no node is left half-switched.
async fn switch_back(w: &GraphWriter<'_>, done: &[(Arc<Node>, bool)]) {
    for (n, ro) in done.iter().rev() {
        match n.driver().reopen(n, !ro).await {
            Ok(()) => n.set_read_only(!ro),
            Err(e) => tracing::warn!(
                node = n.name(),
                "switching back after a failed reopen failed: {e}"
            ),
        }
    }
    match perms::compute(w.graph()).and_then(|plan| perms::apply(&plan)) {
        Ok(()) => {}
        Err(e) => tracing::warn!("permissions after a failed reopen: {e}"),
    }
}
