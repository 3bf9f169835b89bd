//! The NBD wire format. Client and server share one definition, in
//! `sluice-drivers` (the layer below, where the `nbd` client lives).

pub use sluice_drivers::protocol::nbd::proto::*;
