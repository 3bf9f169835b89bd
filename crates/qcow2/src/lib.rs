//! sluice-qcow2: the qcow2 format (QEMU's `docs/interop/qcow2.txt`).
//!
//! * [`format`](mod@format) — the on-disk structures: header, extensions, L1/L2
//!   entries, compressed descriptors, snapshots; parsing and validation.
//! * [`driver`] — [`Qcow2Driver`], the block driver: a mapping layer and an
//!   access layer, with a bounded write-back L2 table cache ([`cache`]).
//! * [`write`](mod@write) — allocation and refcounts, copy-on-write, zero flag and
//!   discard, in an order that keeps the image consistent after a crash.
//! * [`chain`] — the backing chain an image header names.
//! * [`detached`] — an image opened with its one driver outside the graph,
//!   for whole-image metadata changes (snapshots, amend).
//! * [`options`] — the node's options, with QEMU's names.

pub mod amend;
pub mod cache;
pub mod chain;
pub mod check;
pub mod compress;
pub mod compressed_write;
pub mod create;
pub mod detached;
pub mod driver;
pub mod format;
pub mod header_write;
pub mod options;
pub mod resize;
pub mod snapshot;
pub mod write;

pub use driver::{Mapping, Qcow2Driver};
pub use options::Qcow2Options;
