//! A comparable picture of the graph: names, edges and permissions. Tests
//! compare snapshots to prove a rolled-back change left no trace; the
//! control layer renders it as `x-debug-query-block-graph`.

use super::node::Parent;
use super::Graph;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EdgeSnapshot {
    pub role: String,
    pub child: String,
    pub perm: u32,
    pub shared: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeSnapshot {
    pub driver: String,
    pub read_only: bool,
    pub size: u64,
    pub children: Vec<EdgeSnapshot>,
    /// Each parent as "who as 'role'", sorted.
    pub parents: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RootSnapshot {
    pub node: String,
    pub perm: u32,
    pub shared: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GraphSnapshot {
    pub nodes: BTreeMap<String, NodeSnapshot>,
    pub roots: BTreeMap<String, RootSnapshot>,
}

impl GraphSnapshot {
    pub(crate) fn of(graph: &Graph) -> GraphSnapshot {
        let mut nodes = BTreeMap::new();
        for n in graph.nodes() {
            let children = n
                .children()
                .iter()
                .map(|e| {
                    let p = e.perm();
                    EdgeSnapshot {
                        role: e.role().name().to_string(),
                        child: e.child().name().to_string(),
                        perm: p.perm.bits(),
                        shared: p.shared.bits(),
                    }
                })
                .collect();
            let mut parents: Vec<String> = n
                .parents()
                .iter()
                .map(|e| format!("{} as '{}'", e.parent().describe(), e.user_role()))
                .collect();
            parents.sort();
            nodes.insert(
                n.name().to_string(),
                NodeSnapshot {
                    driver: n.driver_name().to_string(),
                    read_only: n.is_read_only(),
                    size: n.size(),
                    children,
                    parents,
                },
            );
        }
        let mut roots = BTreeMap::new();
        for r in graph.roots() {
            let e = r.edge.load();
            if let Parent::Root(_) = e.parent() {
                let p = e.perm();
                roots.insert(
                    format!("{} '{}'", r.kind, r.name),
                    RootSnapshot {
                        node: e.child().name().to_string(),
                        perm: p.perm.bits(),
                        shared: p.shared.bits(),
                    },
                );
            }
        }
        GraphSnapshot { nodes, roots }
    }
}
