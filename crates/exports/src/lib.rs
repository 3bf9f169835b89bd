//! sluice-exports: serving nodes to clients (the NBD server).

pub mod alloc;
pub mod nbd;
pub mod signals;

pub use nbd::{ExportConfig, ExportInfo, ListenAddr, NbdServer, RemoveMode, ServerConfig};
