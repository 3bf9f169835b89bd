//! Permission refresh: recompute what every edge takes and shares, top down
//! from the roots, and check every node's users against each other.

use super::node::{Edge, Node, Parent};
use super::Graph;
use crate::error::{Error, Result};
use crate::perm::{Perm, PermPair};
use std::collections::HashMap;
use std::sync::Arc;

/// New permissions for every node-to-node edge, and every node's new
/// combined needs.
pub(crate) struct PermPlan {
    edges: Vec<(Arc<Edge>, PermPair)>,
    nodes: Vec<(Arc<Node>, PermPair)>,
}

/// The combined needs of `node`'s users: union of what they take,
/// intersection of what they share.
fn cumulative(node: &Arc<Node>, memo: &mut HashMap<u64, PermPair>, depth: usize) -> PermPair {
    if let Some(p) = memo.get(&node.id) {
        return *p;
    }
    let mut acc = PermPair::NONE_ALL_SHARED;
    if depth < 4096 {
        for e in node.parents() {
            let p = edge_perm(&e, memo, depth + 1);
            acc.perm |= p.perm;
            acc.shared &= p.shared;
        }
    }
    memo.insert(node.id, acc);
    acc
}

/// What `edge` takes and shares under the current graph.
fn edge_perm(edge: &Arc<Edge>, memo: &mut HashMap<u64, PermPair>, depth: usize) -> PermPair {
    match &edge.parent {
        Parent::Root(_) => edge.perm(),
        Parent::Node(p) => match p.upgrade() {
            Some(p) => {
                let parents = cumulative(&p, memo, depth);
                p.driver().child_perm(edge.role, parents, !p.is_read_only())
            }
            None => PermPair::NONE_ALL_SHARED,
        },
    }
}

/// Computes every edge's permissions and checks them; nothing is changed.
pub(crate) fn compute(graph: &Graph) -> Result<PermPlan> {
    let mut memo = HashMap::new();
    let mut plan = Vec::new();
    let mut nodes = Vec::new();
    for node in graph.nodes() {
        let cumulative = cumulative(&node, &mut memo, 0);
        nodes.push((node.clone(), cumulative));
        let users: Vec<(Arc<Edge>, PermPair)> = node
            .parents()
            .into_iter()
            .map(|e| {
                let p = edge_perm(&e, &mut memo, 0);
                (e, p)
            })
            .collect();
        check_node(&node, &users)?;
        for (e, p) in users {
            if matches!(e.parent, Parent::Node(_)) {
                plan.push((e, p));
            }
        }
    }
    Ok(PermPlan { edges: plan, nodes })
}

/// Applies a checked plan. Drivers see their node's new combined needs
/// (`BlockDriver::set_perm`); if one refuses, everything applied so far is
/// put back and the error returned.
pub(crate) fn apply(plan: &PermPlan) -> Result<()> {
    let old_edges: Vec<PermPair> = plan.edges.iter().map(|(e, _)| e.perm()).collect();
    for (e, p) in &plan.edges {
        *e.perm.lock() = *p;
    }
    let mut changed: Vec<(&Arc<Node>, PermPair)> = Vec::new();
    for (node, new) in &plan.nodes {
        let old = node.cumulative_perm();
        if old == *new {
            continue;
        }
        if let Err(e) = node.driver().set_perm(node, *new) {
            for (n, prev) in changed.into_iter().rev() {
                let _ = n.driver().set_perm(n, prev);
                *n.cumulative.lock() = prev;
            }
            for ((edge, _), prev) in plan.edges.iter().zip(old_edges) {
                *edge.perm.lock() = prev;
            }
            return Err(e);
        }
        *node.cumulative.lock() = *new;
        changed.push((node, old));
    }
    Ok(())
}

fn check_node(node: &Arc<Node>, users: &[(Arc<Edge>, PermPair)]) -> Result<()> {
    if node.is_read_only() {
        for (e, p) in users {
            let bad = p.perm & (Perm::WRITE | Perm::WRITE_UNCHANGED);
            if !bad.is_empty() {
                return Err(Error::ReadOnly {
                    node: node.name().to_string(),
                    user: format!("{} as '{}'", e.parent.describe(), e.user_role()),
                    perm: bad.first().name(),
                });
            }
        }
    }
    // Newest users last: name the newcomer as the one refused.
    for (i, (a, pa)) in users.iter().enumerate().rev() {
        for (j, (b, pb)) in users.iter().enumerate() {
            if i == j {
                continue;
            }
            let conflict = pa.perm & !pb.shared;
            if !conflict.is_empty() {
                return Err(Error::PermissionConflict {
                    node: node.name().to_string(),
                    requester: format!("{} as '{}'", a.parent.describe(), a.user_role()),
                    other: b.parent.describe(),
                    other_role: b.user_role().to_string(),
                    perm: conflict.first().name(),
                });
            }
        }
    }
    Ok(())
}
