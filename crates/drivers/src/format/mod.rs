//! Format drivers: map guest offsets into an image file.

pub mod raw;
