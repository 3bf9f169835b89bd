//! The `file` protocol driver (being written).
