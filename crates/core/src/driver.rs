//! The driver traits: what a protocol, format or filter driver implements.
//!
//! A driver answers requests for its own node; it reaches its children
//! through the [`Node`] it is given (`node.child(Role::File)`), never through
//! pointers of its own, so that graph changes stay the graph's business.

use crate::buf::{IoBytes, ReadBuf};
use crate::error::{Error, Result};
use crate::graph::{Node, Role};
use crate::perm::{ChildPermModel, PermPair};
use async_trait::async_trait;

/// Flags of a write request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Forced unit access: the data is durable when the request completes.
    pub fua: bool,
    /// A copy-on-read copy-up: the data is what the layers below already
    /// show. Drivers with allocation write it only where this layer is
    /// still unallocated, so a guest write that landed meanwhile wins.
    pub copy_on_read: bool,
}

/// Flags of a write-zeroes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) instead of written.
    pub may_unmap: bool,
    /// Fail with `NotSupported` rather than fall back to writing zero buffers.
    pub no_fallback: bool,
    pub fua: bool,
}

/// What one layer knows about the start of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverStatus {
    /// Allocated here and holds data; `offset` is where it lies in this
    /// node's `file` child, when the driver can tell.
    Data { len: u64, offset: Option<u64> },
    /// Allocated here and reads as zeroes.
    Zero { len: u64, offset: Option<u64> },
    /// Not allocated in this layer: the backing child (or zeroes) shows.
    Unallocated { len: u64 },
    /// This layer is transparent here: ask `child` at `offset` (raw, filters).
    Passthrough { len: u64, child: Role, offset: u64 },
}

impl DriverStatus {
    pub fn len(&self) -> u64 {
        match *self {
            DriverStatus::Data { len, .. }
            | DriverStatus::Zero { len, .. }
            | DriverStatus::Unallocated { len }
            | DriverStatus::Passthrough { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Events a driver raises on a child edge for `blkdebug` to act on. The
/// names are QEMU's (`BlkdebugEvent`), so blkdebug configs and qemu-io
/// `break` commands carry over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DebugEvent {
    L1Update,
    L1GrowAllocTable,
    L1GrowWriteTable,
    L1GrowActivateTable,
    L2Load,
    L2Update,
    L2UpdateCompressed,
    L2AllocCowRead,
    L2AllocWrite,
    ReadAio,
    ReadBackingAio,
    ReadCompressed,
    WriteAio,
    WriteCompressed,
    VmstateLoad,
    VmstateSave,
    CowRead,
    CowWrite,
    ReftableLoad,
    ReftableGrow,
    ReftableUpdate,
    RefblockLoad,
    RefblockUpdate,
    RefblockUpdatePart,
    RefblockAlloc,
    RefblockAllocHookup,
    RefblockAllocWrite,
    RefblockAllocWriteBlocks,
    RefblockAllocWriteTable,
    RefblockAllocSwitchTable,
    ClusterAlloc,
    ClusterAllocBytes,
    ClusterFree,
    FlushToOs,
    FlushToDisk,
    PwritevRmwHead,
    PwritevRmwAfterHead,
    PwritevRmwTail,
    PwritevRmwAfterTail,
    Pwritev,
    PwritevZero,
    PwritevDone,
    EmptyImagePrepare,
    L1ShrinkWriteTable,
    L1ShrinkFreeL2Clusters,
    CorWrite,
    ClusterAllocSpace,
    None,
}

impl DebugEvent {
    /// Every event with its QEMU name.
    pub const ALL: &'static [(DebugEvent, &'static str)] = &[
        (DebugEvent::L1Update, "l1_update"),
        (DebugEvent::L1GrowAllocTable, "l1_grow_alloc_table"),
        (DebugEvent::L1GrowWriteTable, "l1_grow_write_table"),
        (DebugEvent::L1GrowActivateTable, "l1_grow_activate_table"),
        (DebugEvent::L2Load, "l2_load"),
        (DebugEvent::L2Update, "l2_update"),
        (DebugEvent::L2UpdateCompressed, "l2_update_compressed"),
        (DebugEvent::L2AllocCowRead, "l2_alloc_cow_read"),
        (DebugEvent::L2AllocWrite, "l2_alloc_write"),
        (DebugEvent::ReadAio, "read_aio"),
        (DebugEvent::ReadBackingAio, "read_backing_aio"),
        (DebugEvent::ReadCompressed, "read_compressed"),
        (DebugEvent::WriteAio, "write_aio"),
        (DebugEvent::WriteCompressed, "write_compressed"),
        (DebugEvent::VmstateLoad, "vmstate_load"),
        (DebugEvent::VmstateSave, "vmstate_save"),
        (DebugEvent::CowRead, "cow_read"),
        (DebugEvent::CowWrite, "cow_write"),
        (DebugEvent::ReftableLoad, "reftable_load"),
        (DebugEvent::ReftableGrow, "reftable_grow"),
        (DebugEvent::ReftableUpdate, "reftable_update"),
        (DebugEvent::RefblockLoad, "refblock_load"),
        (DebugEvent::RefblockUpdate, "refblock_update"),
        (DebugEvent::RefblockUpdatePart, "refblock_update_part"),
        (DebugEvent::RefblockAlloc, "refblock_alloc"),
        (DebugEvent::RefblockAllocHookup, "refblock_alloc_hookup"),
        (DebugEvent::RefblockAllocWrite, "refblock_alloc_write"),
        (
            DebugEvent::RefblockAllocWriteBlocks,
            "refblock_alloc_write_blocks",
        ),
        (
            DebugEvent::RefblockAllocWriteTable,
            "refblock_alloc_write_table",
        ),
        (
            DebugEvent::RefblockAllocSwitchTable,
            "refblock_alloc_switch_table",
        ),
        (DebugEvent::ClusterAlloc, "cluster_alloc"),
        (DebugEvent::ClusterAllocBytes, "cluster_alloc_bytes"),
        (DebugEvent::ClusterFree, "cluster_free"),
        (DebugEvent::FlushToOs, "flush_to_os"),
        (DebugEvent::FlushToDisk, "flush_to_disk"),
        (DebugEvent::PwritevRmwHead, "pwritev_rmw_head"),
        (DebugEvent::PwritevRmwAfterHead, "pwritev_rmw_after_head"),
        (DebugEvent::PwritevRmwTail, "pwritev_rmw_tail"),
        (DebugEvent::PwritevRmwAfterTail, "pwritev_rmw_after_tail"),
        (DebugEvent::Pwritev, "pwritev"),
        (DebugEvent::PwritevZero, "pwritev_zero"),
        (DebugEvent::PwritevDone, "pwritev_done"),
        (DebugEvent::EmptyImagePrepare, "empty_image_prepare"),
        (DebugEvent::L1ShrinkWriteTable, "l1_shrink_write_table"),
        (
            DebugEvent::L1ShrinkFreeL2Clusters,
            "l1_shrink_free_l2_clusters",
        ),
        (DebugEvent::CorWrite, "cor_write"),
        (DebugEvent::ClusterAllocSpace, "cluster_alloc_space"),
        (DebugEvent::None, "none"),
    ];

    pub fn name(self) -> &'static str {
        DebugEvent::ALL
            .iter()
            .find(|(e, _)| *e == self)
            .map(|(_, n)| *n)
            .unwrap_or("none")
    }

    pub fn from_name(name: &str) -> Option<DebugEvent> {
        DebugEvent::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(e, _)| *e)
    }
}

/// A block driver instance: the behaviour of one node.
///
/// Requests arrive already range-checked, aligned to
/// [`BlockDriver::request_alignment`] and accounted as in flight on `node`.
#[async_trait]
pub trait BlockDriver: Send + Sync + 'static {
    /// QEMU's driver name: `file`, `raw`, `null-co`, `blkdebug`, ...
    fn driver_name(&self) -> &'static str;

    /// Requests reach the driver aligned to this many bytes.
    fn request_alignment(&self) -> u32 {
        1
    }

    /// A filter has one `file` or `filtered` child whose contents it shows.
    fn is_filter(&self) -> bool {
        false
    }

    /// Whether the node may have a `backing` child.
    fn supports_backing(&self) -> bool {
        false
    }

    /// The permissions this node needs on a child, given its parents' needs.
    fn child_perm(&self, role: Role, parents: PermPair, node_writable: bool) -> PermPair {
        ChildPermModel::for_role(role, self.is_filter()).child_perm(parents, node_writable)
    }

    /// The combined needs of this node's users changed to `cumulative`.
    /// Drivers that mirror permissions outside the process (the `file`
    /// driver's image locks) apply them here; an error refuses the graph
    /// change, which is then rolled back.
    fn set_perm(&self, _node: &Node, _cumulative: PermPair) -> Result<()> {
        Ok(())
    }

    /// The image file this node stands for, if any (`qemu-img info`'s filename).
    fn filename(&self) -> Option<String> {
        None
    }

    async fn read(&self, node: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()>;

    async fn write(&self, node: &Node, offset: u64, buf: IoBytes, flags: WriteFlags) -> Result<()>;

    /// Efficient zeroing. The default says the driver cannot; the node then
    /// writes zero buffers unless `no_fallback` is set.
    async fn write_zeroes(
        &self,
        node: &Node,
        _offset: u64,
        _len: u64,
        _flags: ZeroFlags,
    ) -> Result<()> {
        Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: self.driver_name(),
            what: "efficient write-zeroes",
        })
    }

    /// Discard is advisory: the default does nothing.
    async fn discard(&self, _node: &Node, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    async fn flush(&self, node: &Node) -> Result<()>;

    /// Writes one whole cluster compressed (QEMU's
    /// `bdrv_co_pwritev_compressed`, what `qemu-img convert -c` uses):
    /// `offset` is cluster aligned and `data` one cluster, or less for
    /// the last cluster of the disk. Only formats with compressed
    /// clusters (qcow2) can; the default says so.
    async fn write_compressed(&self, node: &Node, _offset: u64, _data: IoBytes) -> Result<()> {
        Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: self.driver_name(),
            what: "compressed writes",
        })
    }

    /// What this layer knows about `[offset, offset + len)`; the answer may
    /// cover less than `len` but at least one byte.
    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<DriverStatus>;

    /// Grows or shrinks the node to `size` bytes (QEMU's `bdrv_co_truncate`,
    /// `block_resize`, `qemu-img resize`). `prealloc` is QEMU's
    /// `preallocation` value for the new area (`off` unless asked). On
    /// success the caller records the new size with `Node::set_size`.
    async fn truncate(&self, node: &Node, _size: u64, _prealloc: &str) -> Result<()> {
        Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: self.driver_name(),
            what: "resizing",
        })
    }

    /// Rewrites the backing file name and format recorded in the image
    /// (QEMU's `bdrv_change_backing_file`): what the end of a stream or
    /// commit job leaves in the header. `None` removes the backing link.
    async fn change_backing_file(
        &self,
        node: &Node,
        _backing_file: Option<&str>,
        _backing_fmt: Option<&str>,
    ) -> Result<()> {
        Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: self.driver_name(),
            what: "changing the backing file in the image",
        })
    }

    /// Switches the driver to `read_only` (QEMU's `bdrv_reopen_prepare` and
    /// commit for the `read-only` option). Core calls it drained, with the
    /// node's flag still at the old value and flips the flag after: to
    /// read-write once the children it writes through are writable, to
    /// read-only before they stop being. A driver that fails must be left
    /// as it was. The default can only keep the current mode.
    async fn reopen(&self, node: &Node, read_only: bool) -> Result<()> {
        if node.is_read_only() == read_only {
            return Ok(());
        }
        Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: self.driver_name(),
            what: if read_only {
                "reopening read-only"
            } else {
                "reopening read-write"
            },
        })
    }

    /// A drained section began on `node` (its drain count left zero;
    /// QEMU's `bdrv_drain_begin`). Drivers that hold requests back (the
    /// throttle filter's queues) let them go now: a drain waits for every
    /// request in flight and must not wait on a timer.
    fn drained_begin(&self, _node: &Node) {}

    /// Whether this driver reacts to debug events (only `blkdebug` does).
    fn handles_debug_events(&self) -> bool {
        false
    }

    /// A parent raised `event` on the edge to this node. `blkdebug` may park
    /// the calling request here until a test resumes it.
    async fn debug_event(&self, _node: &Node, _event: DebugEvent) {}

    /// The breakpoint controls of a debugging driver (blkdebug), if this is one.
    fn debug_control(&self) -> Option<&dyn DebugControl> {
        None
    }

    /// Called once when the node leaves the graph, after its children are
    /// detached and no request is in flight.
    fn close(&self) {}
}

/// Breakpoints on debug events, as qemu-io's `break`, `wait_break`, `resume`
/// and `remove_break` commands drive them. A breakpoint is one-shot: the
/// first request that raises `event` is parked under `tag`.
#[async_trait]
pub trait DebugControl: Send + Sync {
    fn set_breakpoint(&self, event: DebugEvent, tag: &str) -> Result<()>;
    /// Removes breakpoints with `tag` and resumes requests parked under it.
    fn remove_breakpoint(&self, tag: &str) -> Result<()>;
    /// Resumes the requests parked under `tag`; an error if there are none.
    fn resume(&self, tag: &str) -> Result<()>;
    fn is_suspended(&self, tag: &str) -> bool;
    /// Resolves once a request is parked under `tag`.
    async fn wait_suspended(&self, tag: &str);
}

/// Finds the first debug control at or below `node`, following `file`,
/// `filtered` and `backing` children in that order, as QEMU's
/// `bdrv_debug_breakpoint` does.
pub fn find_debug_control(node: &std::sync::Arc<Node>) -> Option<std::sync::Arc<Node>> {
    let mut stack = vec![node.clone()];
    let mut seen = 0;
    while let Some(n) = stack.pop() {
        seen += 1;
        if seen > 4096 {
            return None;
        }
        if n.driver().debug_control().is_some() {
            return Some(n);
        }
        for role in [Role::Backing, Role::Filtered, Role::File] {
            if let Some(c) = n.child(role) {
                stack.push(c);
            }
        }
    }
    None
}
