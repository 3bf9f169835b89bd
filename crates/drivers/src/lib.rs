//! sluice-drivers: protocol, format and filter drivers.

pub mod protocol;
