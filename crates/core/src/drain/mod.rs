//! Drained sections: the proof a graph change needs.
//!
//! `GraphWriter::drain(&node)` quiesces `node` and every parent up to the
//! roots (roots queue new requests), then waits until `node` and every
//! quiesced parent have nothing in flight. The returned [`Drained`] guard is
//! the only way to obtain a [`DrainProof`], and every graph-changing method
//! takes one: a change without a drain does not compile, and a change to a
//! node the drain does not cover is refused at run time.
//!
//! Draining `node` covers changes to the children of `node` and of any node
//! above it — those are exactly the nodes no request can be inside. It does
//! not drain `node`'s children: a request that does not pass through `node`
//! cannot see `node`'s edges.

pub mod gate;

use crate::graph::links::{is_ancestor_or_self, quiesce_node_up, unquiesce_node_up};
use crate::graph::{Node, Parent};
use std::marker::PhantomData;
use std::sync::Arc;

/// Evidence that a drained section is in force for some part of the graph.
pub trait DrainProof: Send + Sync {
    /// Whether no request can be inside `node` while this proof lives.
    fn covers(&self, node: &Arc<Node>) -> bool;
    /// For messages: what was drained.
    fn drained_what(&self) -> String;
}

/// A drained section of one node. Ends (nested counter) when dropped; the
/// graph-writer lock it borrows is held throughout.
#[must_use = "a drained section ends when its guard is dropped"]
pub struct Drained<'w> {
    node: Arc<Node>,
    active: bool,
    _writer: PhantomData<&'w ()>,
}

impl<'w> Drained<'w> {
    /// Quiesces `node` and its ancestors and waits for them to be idle.
    pub(crate) async fn begin(node: &Arc<Node>) -> Drained<'w> {
        quiesce_node_up(node, 1);
        wait_idle_upwards(node).await;
        Drained {
            node: node.clone(),
            active: true,
            _writer: PhantomData,
        }
    }

    /// A guard that did not drain. Only negative-control tests use it, to
    /// show the race that the drain prevents.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn skipped(node: &Arc<Node>) -> Drained<'w> {
        Drained {
            node: node.clone(),
            active: false,
            _writer: PhantomData,
        }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

impl DrainProof for Drained<'_> {
    fn covers(&self, node: &Arc<Node>) -> bool {
        is_ancestor_or_self(node, &self.node)
    }

    fn drained_what(&self) -> String {
        self.node.name().to_string()
    }
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        if self.active {
            unquiesce_node_up(&self.node, 1);
        }
    }
}

/// Waits until `node` and everything above it has nothing in flight. New
/// requests cannot start meanwhile: every root above is quiesced.
async fn wait_idle_upwards(node: &Arc<Node>) {
    node.gate.wait_idle().await;
    for e in node.parents() {
        match &e.parent {
            Parent::Node(p) => {
                if let Some(p) = p.upgrade() {
                    Box::pin(wait_idle_upwards(&p)).await;
                }
            }
            Parent::Root(r) => {
                if let Some(r) = r.upgrade() {
                    r.gate.wait_idle().await;
                }
            }
        }
    }
}

/// A drained section of every node in the graph (`bdrv_drain_all`).
#[must_use = "a drained section ends when its guard is dropped"]
pub struct DrainedAll<'w> {
    sections: Vec<Drained<'w>>,
}

impl<'w> DrainedAll<'w> {
    pub(crate) async fn begin(nodes: Vec<Arc<Node>>) -> DrainedAll<'w> {
        for n in &nodes {
            quiesce_node_up(n, 1);
        }
        for n in &nodes {
            wait_idle_upwards(n).await;
        }
        DrainedAll {
            sections: nodes
                .into_iter()
                .map(|node| Drained {
                    node,
                    active: true,
                    _writer: PhantomData,
                })
                .collect(),
        }
    }
}

impl DrainProof for DrainedAll<'_> {
    fn covers(&self, node: &Arc<Node>) -> bool {
        self.sections.iter().any(|d| d.covers(node))
    }

    fn drained_what(&self) -> String {
        "all nodes".into()
    }
}

impl Drop for DrainedAll<'_> {
    fn drop(&mut self) {
        self.sections.clear();
    }
}
