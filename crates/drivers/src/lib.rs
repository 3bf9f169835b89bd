//! sluice-drivers: protocol, format and filter drivers, and opening nodes
//! from QEMU-style options.
//!
//! * `protocol/` — where bytes live: `file`, `memory`, `null-co`/`null-aio`.
//! * `format/` — how an image maps guest offsets to its file: `raw`.
//! * `filter/` — nodes that show their child with a twist: `blkdebug`,
//!   `copy-on-read`.

pub mod filter;
pub mod format;
pub mod lenient;
pub mod open;
pub mod protocol;
pub mod size;

pub use open::{blockdev_add, open_node, open_qcow2_detached, open_with, CommonOptions};
