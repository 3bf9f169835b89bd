//! Filter drivers: one child, shown with a twist.

pub mod blkdebug;
pub mod copy_on_read;
pub mod throttle;
