//! Node names, validated by QEMU's rule.

use crate::error::{Error, Result};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// QEMU's limit on node-name length (`sizeof(bs->node_name) - 1`).
pub const MAX_NODE_NAME_LEN: usize = 31;

/// A node's name: a letter first, then letters, digits, `-`, `.` and `_`, at
/// most 31 characters. Names the graph generates for implicit nodes start
/// with `#`, as QEMU's do, so they never clash with user names.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    /// Validates a user-supplied node-name.
    pub fn new(name: &str) -> Result<NodeName> {
        let bad = |reason| {
            Err(Error::InvalidNodeName {
                name: name.to_string(),
                reason,
            })
        };
        let mut chars = name.chars();
        match chars.next() {
            None => return bad("it is empty"),
            Some(c) if !c.is_ascii_alphabetic() => return bad("it must start with a letter"),
            _ => {}
        }
        if name.len() > MAX_NODE_NAME_LEN {
            return bad("it is longer than 31 characters");
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
            return bad("only letters, digits, '-', '.' and '_' are allowed");
        }
        Ok(NodeName(name.to_string()))
    }

    /// A fresh name for a node the user did not name (`#block123`).
    pub fn generated() -> NodeName {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NodeName(format!("#block{}", NEXT.fetch_add(1, Ordering::Relaxed)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_generated(&self) -> bool {
        self.0.starts_with('#')
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_qemu_style_names() {
        for ok in ["a", "node0", "drive-virtio.disk0_x", &"a".repeat(31)] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_names_with_a_reason() {
        for bad in [
            "",
            "0abc",
            "-a",
            "#block1",
            "a b",
            "a/b",
            "é",
            &"a".repeat(32),
        ] {
            let e = NodeName::new(bad).unwrap_err();
            assert!(e.to_string().contains("Invalid node-name"), "{bad}: {e}");
        }
    }

    #[test]
    fn generated_names_are_distinct_and_marked() {
        let a = NodeName::generated();
        let b = NodeName::generated();
        assert_ne!(a, b);
        assert!(a.is_generated());
    }
}
