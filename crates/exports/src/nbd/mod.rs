//! The NBD server: fixed newstyle handshake, simple and structured replies,
//! `base:allocation` and `qemu:allocation-depth` metadata contexts, over
//! Unix and TCP sockets.
//!
//! * [`NbdServer`] owns the listeners, the exports and every connection.
//! * Each export holds a [`sluice_core::Root`]: requests enter the graph
//!   there, and a drained section queues them like any other root's.
//! * Each connection is one task that reads requests; every request runs
//!   in a task of its own (at most [`MAX_IN_FLIGHT`] per connection) and
//!   writes its whole reply under the connection's writer lock.
//! * Bad requests get the protocol's error reply; protocol violations (a
//!   bad magic, an oversized write payload, unknown client flags) close
//!   that connection only.
//! * Memory from client input is bounded: payloads of at most 32 MiB,
//!   options of at most 1 MiB, and all request buffers of all connections
//!   within [`BUFFER_BUDGET`].
//! * Structured reads send zero runs (16 KiB-aligned, found in the data
//!   read) as hole chunks; `NBD_CMD_FLAG_DF` gets one data chunk.

mod conn;
pub mod proto;
mod server;

pub use server::{
    ExportConfig, ExportInfo, ListenAddr, NbdServer, RemoveMode, ServerConfig, BUFFER_BUDGET,
    MAX_IN_FLIGHT,
};
