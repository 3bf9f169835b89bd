//! Nodes and edges, and the request path through a node.

use super::root::RootInner;
use super::serialize::RangeLocks;
use crate::buf::{IoBuf, IoBytes, ReadBuf};
use crate::drain::gate::Gate;
use crate::driver::{BlockDriver, DebugEvent, DriverStatus, WriteFlags, ZeroFlags};
use crate::error::{Error, Result};
use crate::name::NodeName;
use crate::perm::PermPair;
use crate::stats::{IoKind, IoStats};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Weak};

/// Largest single request, as QEMU's `BDRV_REQUEST_MAX_BYTES` (2 GiB - 512).
pub const MAX_REQUEST_BYTES: u64 = (i32::MAX as u64) & !511;

/// Largest chunk a write-zeroes fallback writes at once.
const ZERO_FALLBACK_CHUNK: u64 = 1 << 20;

/// The role of a child edge, with QEMU's child names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The image file of a format, or the child of a protocol-level filter.
    File,
    /// The backing image of a copy-on-write format.
    Backing,
    /// The child of a filter that is not a `file` (e.g. copy-on-read, throttle).
    Filtered,
    /// An external data file.
    Data,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::File => "file",
            Role::Backing => "backing",
            Role::Filtered => "filtered",
            Role::Data => "data-file",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The parent end of an edge: another node, or a root.
#[derive(Clone)]
pub enum Parent {
    Node(Weak<Node>),
    Root(Weak<RootInner>),
}

impl Parent {
    /// How error messages name this user, as QEMU's `bdrv_child_user_desc`.
    pub fn describe(&self) -> String {
        match self {
            Parent::Node(n) => n
                .upgrade()
                .map(|n| format!("node '{}'", n.name()))
                .unwrap_or_else(|| "a removed node".into()),
            Parent::Root(r) => r
                .upgrade()
                .map(|r| format!("{} '{}'", r.kind, r.name))
                .unwrap_or_else(|| "a removed user".into()),
        }
    }

    pub fn node(&self) -> Option<Arc<Node>> {
        match self {
            Parent::Node(n) => n.upgrade(),
            Parent::Root(_) => None,
        }
    }

    /// For a root: what kind of user it is (`job`, `export`, ...) and its
    /// name (a job's id, an export's name).
    pub fn root_user(&self) -> Option<(String, String)> {
        match self {
            Parent::Root(r) => r.upgrade().map(|r| (r.kind.clone(), r.name.clone())),
            Parent::Node(_) => None,
        }
    }
}

/// A parent → child link with a role and permissions (QEMU's `BdrvChild`).
///
/// Edges are immutable apart from their permissions: replacing a child
/// swaps in a new edge, so a request that loaded an edge sees one whole.
pub struct Edge {
    pub(crate) parent: Parent,
    pub(crate) role: Role,
    pub(crate) child: Arc<Node>,
    pub(crate) perm: Mutex<PermPair>,
}

impl Edge {
    pub(crate) fn new(parent: Parent, role: Role, child: Arc<Node>, perm: PermPair) -> Arc<Edge> {
        Arc::new(Edge {
            parent,
            role,
            child,
            perm: Mutex::new(perm),
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn child(&self) -> &Arc<Node> {
        &self.child
    }

    pub fn parent(&self) -> &Parent {
        &self.parent
    }

    pub fn perm(&self) -> PermPair {
        *self.perm.lock()
    }

    /// The name used for this edge in messages: `backing`, `file`, or `root`.
    pub fn user_role(&self) -> &'static str {
        match self.parent {
            Parent::Root(_) => "root",
            Parent::Node(_) => self.role.name(),
        }
    }
}

/// What a graph user passes to create a node.
pub struct NodeSpec {
    pub name: Option<NodeName>,
    pub driver: Box<dyn BlockDriver>,
    pub size: u64,
    pub read_only: bool,
    pub children: Vec<(Role, Arc<Node>)>,
    /// Implicit nodes are owned by their parents and closed when the last
    /// parent lets go (e.g. a backing file opened from an image header).
    pub implicit: bool,
}

/// One driver instance in the graph (QEMU's `BlockDriverState`).
pub struct Node {
    pub(crate) id: u64,
    name: NodeName,
    driver: Box<dyn BlockDriver>,
    size: AtomicU64,
    read_only: AtomicBool,
    align: u64,
    pub(crate) gate: Arc<Gate>,
    pub(crate) children: ArcSwap<Vec<Arc<Edge>>>,
    pub(crate) parents: Mutex<Vec<Weak<Edge>>>,
    closed: AtomicBool,
    pub(crate) implicit: AtomicBool,
    stats: IoStats,
    write_locks: RangeLocks,
    /// The combined permissions of this node's users, as last applied.
    pub(crate) cumulative: Mutex<PermPair>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Node({}, {})", self.name, self.driver.driver_name())
    }
}

impl Node {
    pub(crate) fn new(
        spec_name: NodeName,
        driver: Box<dyn BlockDriver>,
        size: u64,
        read_only: bool,
        implicit: bool,
    ) -> Arc<Node> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let align = u64::from(driver.request_alignment().max(1));
        assert!(
            align.is_power_of_two(),
            "request alignment must be a power of two"
        );
        Arc::new(Node {
            id: NEXT_ID.fetch_add(1, SeqCst),
            name: spec_name,
            driver,
            size: AtomicU64::new(size),
            read_only: AtomicBool::new(read_only),
            align,
            gate: Arc::new(Gate::new()),
            children: ArcSwap::from_pointee(Vec::new()),
            parents: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            implicit: AtomicBool::new(implicit),
            stats: IoStats::default(),
            write_locks: RangeLocks::default(),
            cumulative: Mutex::new(PermPair::NONE_ALL_SHARED),
        })
    }

    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    pub fn node_name(&self) -> &NodeName {
        &self.name
    }

    pub fn driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    pub fn size(&self) -> u64 {
        self.size.load(SeqCst)
    }

    /// Records a new size after a resize the driver carried out.
    pub fn set_size(&self, size: u64) {
        self.size.store(size, SeqCst);
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(SeqCst)
    }

    /// Flips the read-only flag once the driver has switched (core's
    /// reopen, under a drain that covers this node, is the only caller).
    pub(crate) fn set_read_only(&self, read_only: bool) {
        self.read_only.store(read_only, SeqCst);
    }

    pub fn request_alignment(&self) -> u64 {
        self.align
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }

    pub fn is_implicit(&self) -> bool {
        self.implicit.load(SeqCst)
    }

    /// The combined permissions of this node's users.
    pub fn cumulative_perm(&self) -> PermPair {
        *self.cumulative.lock()
    }

    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// Requests in flight through this node right now.
    pub fn in_flight(&self) -> usize {
        self.gate.in_flight()
    }

    /// How many drained sections cover this node (nested count).
    pub fn quiesce_count(&self) -> usize {
        self.gate.quiesce_count()
    }

    /// The child in `role`, read lock-free. The drain, not this load, makes
    /// it safe to use across a graph change.
    pub fn child(&self, role: Role) -> Option<Arc<Node>> {
        self.children
            .load()
            .iter()
            .find(|e| e.role == role)
            .map(|e| e.child.clone())
    }

    /// The child in `role`, which this node's driver cannot work without;
    /// its absence means the node was closed under the request.
    pub fn required_child(&self, role: Role) -> Result<Arc<Node>> {
        self.child(role).ok_or_else(|| self.closed_error())
    }

    /// The child edge in `role`.
    pub fn child_edge(&self, role: Role) -> Option<Arc<Edge>> {
        self.children
            .load()
            .iter()
            .find(|e| e.role == role)
            .cloned()
    }

    /// All child edges, in attach order.
    pub fn children(&self) -> Vec<Arc<Edge>> {
        self.children.load().as_ref().clone()
    }

    /// All edges whose child is this node.
    pub fn parents(&self) -> Vec<Arc<Edge>> {
        self.parents
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The child a filter shows (its `filtered` or `file` child).
    pub fn filtered_child(&self) -> Option<Arc<Node>> {
        if !self.driver.is_filter() {
            return None;
        }
        self.child(Role::Filtered)
            .or_else(|| self.child(Role::File))
    }

    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, SeqCst);
    }

    pub(crate) fn close_driver(&self) {
        self.driver.close();
    }

    fn closed_error(&self) -> Error {
        Error::NodeClosed {
            node: self.name().to_string(),
        }
    }

    /// Range checks every request passes before reaching a driver.
    pub fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::invalid_request(
                self.name(),
                format!("zero-length request at offset {offset}"),
            ));
        }
        if len > MAX_REQUEST_BYTES {
            return Err(Error::invalid_request(
                self.name(),
                format!("length {len} exceeds the maximum request size {MAX_REQUEST_BYTES}"),
            ));
        }
        let size = self.size();
        match offset.checked_add(len) {
            None => Err(Error::invalid_request(
                self.name(),
                format!("offset {offset} + length {len} overflows"),
            )),
            Some(end) if end > size => Err(Error::OutOfRange {
                node: self.name().to_string(),
                offset,
                len,
                size,
            }),
            Some(_) => Ok(()),
        }
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        (offset | len) & (self.align - 1) == 0
    }

    fn align_down(&self, x: u64) -> u64 {
        x & !(self.align - 1)
    }

    fn align_up(&self, x: u64) -> u64 {
        (x + self.align - 1) & !(self.align - 1)
    }

    /// Enters the node: counts the request in flight, refuses it if closed.
    fn enter(&self) -> Result<crate::drain::gate::InFlight> {
        let guard = self.gate.enter_counted();
        if self.is_closed() {
            return Err(self.closed_error());
        }
        Ok(guard)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, mut buf: ReadBuf<'_>) -> Result<()> {
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        let _in_flight = self.enter()?;
        let res = if self.is_aligned(offset, len) {
            self.driver.read(self, offset, buf.reborrow()).await
        } else {
            self.read_unaligned(offset, buf).await
        };
        self.stats.account(IoKind::Read, len, res.is_ok());
        res
    }

    async fn read_unaligned(&self, offset: u64, mut buf: ReadBuf<'_>) -> Result<()> {
        let start = self.align_down(offset);
        let end = self.align_up(offset + buf.len() as u64);
        let mut bounce = IoBuf::recycled((end - start) as usize);
        self.driver.read(self, start, bounce.as_read_buf()).await?;
        let skip = (offset - start) as usize;
        buf.copy_from(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: IoBytes, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        self.check_request(offset, len)?;
        self.check_writable("write")?;
        let _in_flight = self.enter()?;
        let res = self.write_inner(offset, data, flags).await;
        self.stats.account(IoKind::Write, len, res.is_ok());
        res
    }

    async fn write_inner(&self, offset: u64, data: IoBytes, flags: WriteFlags) -> Result<()> {
        if self.align == 1 {
            return self.driver.write(self, offset, data, flags).await;
        }
        let len = data.len() as u64;
        let start = self.align_down(offset);
        let end = self.align_up(offset + len);
        // Writes that share an aligned block are serialised, so that a
        // read-modify-write never loses a neighbour's bytes.
        let _range = self.write_locks.lock(start, end).await;
        if start == offset && end == offset + len {
            return self.driver.write(self, offset, data, flags).await;
        }
        let mut bounce = IoBuf::zeroed((end - start) as usize);
        self.debug_event(DebugEvent::PwritevRmwHead).await;
        self.driver.read(self, start, bounce.as_read_buf()).await?;
        let skip = (offset - start) as usize;
        bounce[skip..skip + data.len()].copy_from_slice(&data);
        self.driver.write(self, start, bounce.freeze(), flags).await
    }

    /// Writes `data` at `offset` compressed: one whole cluster of the
    /// format, or the disk's last (shorter) one. The format checks the
    /// cluster alignment; a compressed write cannot be split or
    /// read-modify-written, so an offset off the node's request
    /// alignment is refused here.
    pub async fn write_compressed(&self, offset: u64, data: IoBytes) -> Result<()> {
        let len = data.len() as u64;
        self.check_request(offset, len)?;
        self.check_writable("compressed write")?;
        if offset & (self.align - 1) != 0 {
            return Err(Error::invalid_request(
                self.name(),
                format!(
                    "a compressed write must start on a cluster boundary: offset {offset} is not a multiple of the {}-byte request alignment",
                    self.align
                ),
            ));
        }
        let _in_flight = self.enter()?;
        let res = self.driver.write_compressed(self, offset, data).await;
        self.stats.account(IoKind::Write, len, res.is_ok());
        res
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly {
                node: self.name().to_string(),
                user: format!("{op} request"),
                perm: "write",
            });
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_request(offset, len)?;
        self.check_writable("write-zeroes")?;
        let _in_flight = self.enter()?;
        let res = self.write_zeroes_inner(offset, len, flags).await;
        self.stats.account(IoKind::Write, len, res.is_ok());
        res
    }

    async fn write_zeroes_inner(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.is_aligned(offset, len) {
            match self.driver.write_zeroes(self, offset, len, flags).await {
                Err(Error::NotSupported { .. }) if !flags.no_fallback => {}
                other => return other,
            }
        } else if flags.no_fallback {
            return Err(Error::NotSupported {
                node: self.name().to_string(),
                driver: self.driver_name(),
                what: "unaligned write-zeroes without fallback",
            });
        }
        let wflags = WriteFlags {
            fua: flags.fua,
            ..WriteFlags::default()
        };
        let zeroes = IoBuf::zeroed(len.min(ZERO_FALLBACK_CHUNK) as usize).freeze();
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(ZERO_FALLBACK_CHUNK);
            self.write_inner(pos, zeroes.slice(0..n as usize), wflags)
                .await?;
            pos += n;
        }
        Ok(())
    }

    /// Hints that `[offset, offset + len)` is no longer needed. Unaligned
    /// edges are left alone; discard is advisory.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_request(offset, len)?;
        self.check_writable("discard")?;
        let _in_flight = self.enter()?;
        let start = self.align_up(offset);
        let end = self.align_down(offset + len);
        let res = if start < end {
            self.driver.discard(self, start, end - start).await
        } else {
            Ok(())
        };
        self.stats.account(IoKind::Unmap, len, res.is_ok());
        res
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> Result<()> {
        let _in_flight = self.enter()?;
        let res = self.driver.flush(self).await;
        self.stats.account(IoKind::Flush, 0, res.is_ok());
        res
    }

    /// This layer's status at `offset`, covering between 1 and `len` bytes.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        // A query moves no data: a longer one is answered for its start,
        // as any answer may cover less than asked.
        let len = len.min(MAX_REQUEST_BYTES);
        self.check_request(offset, len)?;
        let _in_flight = self.enter()?;
        let st = self.driver.block_status(self, offset, len).await?;
        if st.is_empty() {
            return Err(Error::Other(format!(
                "{}: driver '{}' returned an empty block status at offset {offset}",
                self.name(),
                self.driver_name()
            )));
        }
        Ok(clip_status(st, len))
    }

    /// A parent raised `event` on its edge to this node (for blkdebug).
    pub async fn debug_event(&self, event: DebugEvent) {
        if self.driver.handles_debug_events() {
            self.driver.debug_event(self, event).await;
        }
    }

    /// Reads into a fresh buffer: a convenience for drivers and tools.
    pub async fn read_to_vec(&self, offset: u64, len: usize) -> Result<IoBuf> {
        let mut buf = IoBuf::recycled(len);
        self.read(offset, buf.as_read_buf()).await?;
        Ok(buf)
    }
}

fn clip_status(st: DriverStatus, max: u64) -> DriverStatus {
    match st {
        DriverStatus::Data { len, offset } => DriverStatus::Data {
            len: len.min(max),
            offset,
        },
        DriverStatus::Zero { len, offset } => DriverStatus::Zero {
            len: len.min(max),
            offset,
        },
        DriverStatus::Unallocated { len } => DriverStatus::Unallocated { len: len.min(max) },
        DriverStatus::Passthrough { len, child, offset } => DriverStatus::Passthrough {
            len: len.min(max),
            child,
            offset,
        },
    }
}
