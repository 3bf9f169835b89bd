//! One error type for the block layer, with the context a user needs:
//! which node, which offset, which file.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid node-name: '{name}': {reason}")]
    InvalidNodeName { name: String, reason: &'static str },

    #[error("Duplicate nodes with node-name='{name}'")]
    DuplicateNodeName { name: String },

    #[error("Cannot find node '{name}'")]
    NodeNotFound { name: String },

    #[error(
        "{node}: request at offset {offset} length {len} is past the end of the {size}-byte node"
    )]
    OutOfRange {
        node: String,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("{node}: invalid request: {reason}")]
    InvalidRequest { node: String, reason: String },

    #[error(
        "{node}: {op} at offset {offset} length {len} failed: {}",
        os_text(source)
    )]
    Io {
        node: String,
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },

    #[error("{requester} cannot take '{perm}' on {node}: Conflicts with use by {other} as '{other_role}', which does not allow '{perm}' on {node}")]
    PermissionConflict {
        node: String,
        requester: String,
        other: String,
        other_role: String,
        perm: &'static str,
    },

    #[error("{user} cannot take '{perm}' on {node}: Block node is read-only")]
    ReadOnly {
        node: String,
        user: String,
        perm: &'static str,
    },

    #[error("graph change on '{node}' refused: the drained section is for '{drained}', which does not cover '{node}'")]
    WrongDrain { node: String, drained: String },

    #[error("graph change refused: {0}")]
    GraphChange(String),

    #[error("Node '{node}' is closed")]
    NodeClosed { node: String },

    #[error("Node '{node}' is busy: {reason}")]
    InUse { node: String, reason: String },

    #[error("{node}: {what} is not supported by driver '{driver}'")]
    NotSupported {
        node: String,
        driver: &'static str,
        what: &'static str,
    },

    #[error("{driver}: {message}")]
    InvalidOption { driver: String, message: String },

    #[error("Could not open '{file}': {}", os_text(source))]
    Open {
        file: String,
        #[source]
        source: io::Error,
    },

    #[error("{0}")]
    Other(String),
}

/// An I/O error's text as QEMU prints it: `strerror()` without Rust's
/// "(os error N)" suffix.
pub fn os_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if e.raw_os_error().is_some() => text[..i].to_string(),
        _ => text,
    }
}

impl Error {
    /// The errno a wire protocol (NBD) or a qemu-io style message reports.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::Open { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            // QEMU's block layer fails a request past the end with EIO.
            Error::OutOfRange { .. } => libc::EIO,
            Error::InvalidRequest { .. } => libc::EINVAL,
            Error::NotSupported { .. } => libc::ENOTSUP,
            Error::ReadOnly { .. } | Error::PermissionConflict { .. } => libc::EPERM,
            Error::NodeClosed { .. } => libc::ENOMEDIUM,
            Error::InUse { .. } => libc::EBUSY,
            _ => libc::EIO,
        }
    }

    pub fn io(node: &str, op: &'static str, offset: u64, len: u64, source: io::Error) -> Error {
        Error::Io {
            node: node.to_string(),
            op,
            offset,
            len,
            source,
        }
    }

    pub fn invalid_request(node: &str, reason: impl Into<String>) -> Error {
        Error::InvalidRequest {
            node: node.to_string(),
            reason: reason.into(),
        }
    }

    pub fn invalid_option(driver: &str, message: impl Into<String>) -> Error {
        Error::InvalidOption {
            driver: driver.to_string(),
            message: message.into(),
        }
    }
}
