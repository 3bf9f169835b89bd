//! Permissions: what an edge does to its child, and what it lets others do.
//!
//! The same four permissions as QEMU's `BLK_PERM_*`, with the same names in
//! messages, and the same defaults for the common child roles.

use crate::graph::Role;

bitflags::bitflags! {
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Perm: u32 {
        /// Reads return consistent data (no one changes it underneath).
        const CONSISTENT_READ = 1 << 0;
        /// Guest-visible contents may change.
        const WRITE = 1 << 1;
        /// Writes that do not change guest-visible contents (e.g. copy-on-read).
        const WRITE_UNCHANGED = 1 << 2;
        /// The size may change.
        const RESIZE = 1 << 3;
    }
}

impl Perm {
    pub const ALL: Perm = Perm::all();

    /// QEMU's name for a single permission bit, as used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            p if p == Perm::CONSISTENT_READ => "consistent read",
            p if p == Perm::WRITE => "write",
            p if p == Perm::WRITE_UNCHANGED => "write unchanged",
            p if p == Perm::RESIZE => "resize",
            _ => "permissions",
        }
    }

    /// The lowest single bit of `self`, or empty.
    pub fn first(self) -> Perm {
        Perm::from_bits_truncate(self.bits() & self.bits().wrapping_neg())
    }
}

/// What an edge takes (`perm`) and what it lets others take (`shared`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PermPair {
    pub perm: Perm,
    pub shared: Perm,
}

impl PermPair {
    pub const NONE_ALL_SHARED: PermPair = PermPair {
        perm: Perm::empty(),
        shared: Perm::ALL,
    };

    pub fn new(perm: Perm, shared: Perm) -> PermPair {
        PermPair { perm, shared }
    }

    /// A reader that tolerates anything else: `-U`/`force-share` style.
    pub fn reader_sharing_all() -> PermPair {
        PermPair::new(Perm::CONSISTENT_READ, Perm::ALL)
    }

    /// A reader that lets others write unchanged data only.
    pub fn reader() -> PermPair {
        PermPair::new(
            Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
    }

    /// A guest-style writer: one writer at a time, others may read.
    pub fn writer() -> PermPair {
        PermPair::new(
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
    }
}

/// How a node of a given kind passes its parents' needs down to a child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildPermModel {
    /// Filters and raw: forward the parents' permissions and sharing.
    Filter,
    /// A format's own image file: metadata needs consistent reads and, when
    /// writable, write and resize; nobody else may write or resize it.
    Storage,
    /// A backing file: read-only use, shared freely.
    Cow,
}

impl ChildPermModel {
    /// The default model for a role.
    pub fn for_role(role: Role, node_is_filter: bool) -> ChildPermModel {
        match role {
            Role::Backing => ChildPermModel::Cow,
            Role::Filtered => ChildPermModel::Filter,
            Role::File if node_is_filter => ChildPermModel::Filter,
            Role::File | Role::Data => ChildPermModel::Storage,
        }
    }

    /// The permissions an edge needs on its child, given the cumulative needs
    /// of the node's parents and whether the node is writable.
    pub fn child_perm(self, parents: PermPair, node_writable: bool) -> PermPair {
        match self {
            ChildPermModel::Filter => parents,
            ChildPermModel::Storage => {
                let mut perm = parents.perm | Perm::CONSISTENT_READ;
                if node_writable
                    && parents
                        .perm
                        .intersects(Perm::WRITE | Perm::WRITE_UNCHANGED | Perm::RESIZE)
                {
                    perm |= Perm::WRITE | Perm::RESIZE;
                }
                let shared =
                    (parents.shared & !(Perm::WRITE | Perm::RESIZE)) | Perm::WRITE_UNCHANGED;
                PermPair::new(perm, shared)
            }
            ChildPermModel::Cow => {
                let perm = parents.perm & Perm::CONSISTENT_READ;
                let mut shared = if parents.shared.contains(Perm::WRITE) {
                    Perm::WRITE | Perm::RESIZE
                } else {
                    Perm::empty()
                };
                shared |= Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
                PermPair::new(perm, shared)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_qemu() {
        assert_eq!(Perm::WRITE.name(), "write");
        assert_eq!(Perm::CONSISTENT_READ.name(), "consistent read");
        assert_eq!((Perm::WRITE | Perm::RESIZE).first(), Perm::WRITE);
    }

    #[test]
    fn backing_edges_only_read() {
        let p = ChildPermModel::Cow.child_perm(PermPair::writer(), true);
        assert_eq!(p.perm, Perm::CONSISTENT_READ);
        assert!(!p.shared.contains(Perm::WRITE));
    }

    #[test]
    fn storage_of_a_writable_format_takes_write_and_resize() {
        let p = ChildPermModel::Storage.child_perm(PermPair::writer(), true);
        assert!(p
            .perm
            .contains(Perm::WRITE | Perm::RESIZE | Perm::CONSISTENT_READ));
        assert!(!p.shared.intersects(Perm::WRITE | Perm::RESIZE));
        let ro = ChildPermModel::Storage.child_perm(PermPair::reader(), true);
        assert!(!ro.perm.contains(Perm::WRITE));
    }
}
