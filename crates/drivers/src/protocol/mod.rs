//! Protocol drivers: where bytes finally live.

pub mod file;
pub mod memory;
pub mod nbd;
pub mod null;
