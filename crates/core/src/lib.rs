//! sluice-core: the block graph.
//!
//! Nodes (driver instances) are linked by edges with roles and permissions;
//! requests enter at roots and flow down. The graph changes only through a
//! [`GraphWriter`] (the graph-writer lock), in [`Transaction`]s, and only with
//! a [`drain::DrainProof`] for the nodes whose children change.
//!
//! Start with `docs/design.md` in the repository for the request path, the
//! drain and the graph-change API.

pub mod buf;
pub mod drain;
pub mod driver;
pub mod error;
pub mod graph;
pub mod name;
pub mod perm;
pub mod stats;
pub mod status;

pub use buf::{IoBuf, IoBytes, ReadBuf};
pub use drain::{DrainProof, Drained, DrainedAll};
pub use driver::{
    find_debug_control, BlockDriver, DebugControl, DebugEvent, DriverStatus, WriteFlags, ZeroFlags,
};
pub use error::{Error, Result};
pub use graph::{
    Edge, Graph, GraphSnapshot, GraphWriter, Node, NodeSpec, Parent, Role, Root, Transaction,
};
pub use name::NodeName;
pub use perm::{Perm, PermPair};
pub use status::Extent;
