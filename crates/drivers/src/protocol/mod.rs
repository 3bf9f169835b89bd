//! Protocol drivers: where bytes finally live.

pub mod file;
pub mod memory;
pub mod null;
