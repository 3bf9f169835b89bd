//! The `qcow2` block driver.
//!
//! Split the imago way: a mapping layer ([`Qcow2Driver::map`]) tells, for
//! a guest range, whether it lies in the image's data file, reads as
//! zeroes, is unallocated here (the backing chain shows) or is a
//! compressed cluster; one access layer ([`Qcow2Driver::read`]) moves the
//! bytes for each kind.

use crate::cache::{Table, TableCache};
use crate::compress;
use crate::format::{
    compat, corrupt, fixed_header_len, peek_cluster_bits, snapshot_var_lens, Header, L2Entry,
    Layout, Snapshot, L1_RESERVED, MAX_L1_BYTES, MAX_SNAPSHOTS_BYTES, OFFSET_MASK, SNAPSHOT_FIXED,
};
use crate::options::Qcow2Options;
use async_trait::async_trait;
use sluice_core::{
    BlockDriver, DebugEvent, DriverStatus, Error, IoBuf, IoBytes, Node, ReadBuf, Result, Role,
    WriteFlags, ZeroFlags,
};
use std::sync::Arc;

/// Where a guest range lies, as the mapping layer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// In the data file (the image file, or the external data file) at
    /// `host`.
    Data { host: u64 },
    /// Reads as zeroes.
    Zero,
    /// Not allocated in this image: the backing chain (or zeroes) shows.
    Unallocated,
    /// Inside the compressed cluster that starts at guest offset
    /// `guest_cluster`, whose stream is `len` bytes at `host`.
    Compressed {
        host: u64,
        len: u64,
        guest_cluster: u64,
    },
}

pub struct Qcow2Driver {
    /// Replaced by header rewrites and resizes.
    header: crate::header_write::HeaderCell,
    layout: Layout,
    /// How errors name the image: the file's name, or its node's.
    name: String,
    filename: Option<String>,
    pub(crate) l1: parking_lot::RwLock<Vec<u64>>,
    pub(crate) l2_cache: TableCache,
    /// Bumped whenever an L2 table changes (in the cache, and again when
    /// it is written back): a table loaded from disk across a change is
    /// not cached (it may be stale).
    pub(crate) l2_epoch: std::sync::atomic::AtomicU64,
    snapshots: Vec<Snapshot>,
    /// The write side, when the node is writable; a reopen creates or
    /// drops it.
    pub(crate) writer: WriterSlot,
    /// What a reopen read-write needs to create the writer.
    refcount_cache: Option<u64>,
    lazy_refcounts: Option<bool>,
}

/// The write side of a qcow2 node, present while the node is writable.
/// A request holds its own reference; a reopen (drained) swaps the slot.
#[derive(Default)]
pub(crate) struct WriterSlot(parking_lot::RwLock<Option<Arc<crate::write::Writer>>>);

impl WriterSlot {
    /// The writer, if the node is writable.
    pub(crate) fn get(&self) -> Option<Arc<crate::write::Writer>> {
        self.0.read().clone()
    }

    pub(crate) fn set(&self, w: Option<crate::write::Writer>) {
        *self.0.write() = w.map(Arc::new);
    }
}

/// Reads `len` bytes of metadata at `offset` of `file`; metadata past the
/// end of the file is corruption.
pub(crate) async fn read_meta(
    file: &Node,
    offset: u64,
    len: u64,
    what: &str,
    name: &str,
) -> Result<IoBuf> {
    match offset.checked_add(len) {
        Some(end) if end <= file.size() => {}
        _ => {
            return Err(corrupt(
                name,
                format!(
                "{what} at offset {offset:#x} ({len} bytes) is past the end of the {}-byte file",
                file.size()
            ),
            ))
        }
    }
    if len == 0 {
        return Ok(IoBuf::zeroed(0));
    }
    file.read_to_vec(offset, len as usize).await
}

/// Reads `buf.len()` bytes at `offset` of `file`; bytes past its end read
/// as zeroes (as QEMU's block layer does for a format's data reads).
pub(crate) async fn read_clipped(file: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()> {
    let n = file.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, mut tail) = buf.split_at(n);
    tail.fill(0);
    if n > 0 {
        file.read(offset, head).await?;
    }
    Ok(())
}

/// Reads and parses the header in the first cluster of `file`.
pub(crate) async fn read_header(file: &Node, name: &str) -> Result<Header> {
    let file_size = file.size();
    // The fixed header first, then the whole first cluster.
    let first_len = file_size.min(512);
    let first = if first_len > 0 {
        file.read_to_vec(0, first_len as usize).await?
    } else {
        IoBuf::zeroed(0)
    };
    let mut want = fixed_header_len(&first) as u64;
    if let Some(bits) = peek_cluster_bits(&first) {
        want = want.max(1 << bits);
    }
    let want = want.min(file_size);
    let head = if want > first_len {
        file.read_to_vec(0, want as usize).await?
    } else {
        first
    };
    Header::parse(&head, file_size, name)
}

/// Reads the header for a writable open: a corrupt image is refused, a
/// dirty one (refcounts behind the tables after a crash with lazy
/// refcounts) repaired first, as QEMU does. Also says whether it repaired.
async fn writable_header(file: &Arc<Node>, name: &str) -> Result<(Header, bool)> {
    let header = read_header(file, name).await?;
    if header.is_corrupt() {
        return Err(corrupt(
            name,
            "Image is corrupt; cannot be opened read/write",
        ));
    }
    if !header.is_dirty() {
        return Ok((header, false));
    }
    crate::check::repair_dirty(file, name).await?;
    Ok((read_header(file, name).await?, true))
}

/// The write side for `header`; lazy refcounts as asked, else as the
/// image says (version 3 only).
async fn open_writer(
    file: &Arc<Node>,
    header: &Header,
    name: &str,
    refcount_cache: Option<u64>,
    lazy: Option<bool>,
) -> Result<crate::write::Writer> {
    let lazy = header.version >= 3
        && lazy.unwrap_or(header.compatible_features & compat::LAZY_REFCOUNTS != 0);
    crate::write::Writer::open(file, header, name, refcount_cache, lazy).await
}

/// The big-endian 64-bit words of a table.
pub(crate) fn decode_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

pub(crate) fn decode_table(bytes: &[u8]) -> Table {
    decode_words(bytes).into()
}

/// Reads the table of `len` bytes at `offset` ([`read_meta`]'s checks and
/// message) as its big-endian 64-bit words.
pub(crate) async fn read_words(
    file: &Node,
    offset: u64,
    len: u64,
    what: &str,
    name: &str,
) -> Result<Vec<u64>> {
    Ok(decode_words(
        &read_meta(file, offset, len, what, name).await?,
    ))
}

impl Qcow2Driver {
    /// Opens the image in `file`: reads and checks the header, the active
    /// L1 table and the snapshot table.
    pub async fn open(file: &Arc<Node>, opts: &Qcow2Options, read_only: bool) -> Result<Self> {
        let filename = file.driver().filename();
        let name = filename.clone().unwrap_or_else(|| file.name().to_string());
        let header = if read_only {
            read_header(file, &name).await?
        } else {
            writable_header(file, &name).await?.0
        };
        let layout = Layout::of(&header);
        let l1_bytes = u64::from(header.l1_size) * 8;
        debug_assert!(l1_bytes <= MAX_L1_BYTES);
        let l1 = read_words(file, header.l1_table_offset, l1_bytes, "L1 table", &name).await?;
        let (snapshots, _) = read_snapshots(file, &header, &name, true).await?;
        let tables =
            opts.l2_cache_tables(header.size, header.cluster_size(), header.l2_entry_size())?;
        let writer = if read_only {
            None
        } else {
            Some(
                open_writer(
                    file,
                    &header,
                    &name,
                    opts.refcount_cache_size,
                    opts.lazy_refcounts,
                )
                .await?,
            )
        };
        let slot = WriterSlot::default();
        slot.set(writer);
        Ok(Qcow2Driver {
            layout,
            name,
            filename,
            l1: parking_lot::RwLock::new(l1),
            l2_cache: TableCache::new(tables, opts.clean_interval()),
            l2_epoch: std::sync::atomic::AtomicU64::new(0),
            snapshots,
            writer: slot,
            refcount_cache: opts.refcount_cache_size,
            lazy_refcounts: opts.lazy_refcounts,
            header: crate::header_write::HeaderCell::new(header),
        })
    }

    /// Switches to read-write (the checks of a writable open: a corrupt
    /// image is refused, a dirty one repaired; then the writer) or to
    /// read-only (everything written back and flushed, the image marked
    /// clean, the writer dropped), as QEMU's `qcow2_reopen_prepare`.
    async fn reopen_as(&self, node: &Node, read_only: bool) -> Result<()> {
        let file = self.file(node)?;
        if read_only {
            let Some(w) = self.writer.get() else {
                return Ok(());
            };
            if self.layout.data_file {
                self.data_node(node)?.flush().await?;
            }
            // As a close: a lazy-refcounts image's dirty bit is cleared.
            w.flush(self, &file, true).await?;
            self.writer.set(None);
            return Ok(());
        }
        if self.writer.get().is_some() {
            return Ok(());
        }
        let (header, repaired) = writable_header(&file, &self.name).await?;
        if repaired {
            // The repair may have rewritten table entries (their COPIED
            // flags): nothing read before it is trusted.
            let l1_bytes = u64::from(header.l1_size) * 8;
            let l1 = read_words(
                &file,
                header.l1_table_offset,
                l1_bytes,
                "L1 table",
                &self.name,
            )
            .await?;
            *self.l1.write() = l1;
            self.l2_cache.clear();
            self.l2_epoch
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let w = open_writer(
            &file,
            &header,
            &self.name,
            self.refcount_cache,
            self.lazy_refcounts,
        )
        .await?;
        self.set_header(header);
        self.writer.set(Some(w));
        Ok(())
    }

    /// The current header (as last written by sluice, or as opened).
    pub fn header(&self) -> &Header {
        self.header.get()
    }

    /// Replaces the in-memory header after the one on disk changed.
    pub(crate) fn set_header(&self, h: Header) {
        self.header.set(h);
    }

    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The virtual disk size.
    pub fn size(&self) -> u64 {
        self.header().size
    }

    /// How many L2 tables the cache may hold.
    pub fn l2_cache_capacity(&self) -> usize {
        self.l2_cache.capacity()
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn file(&self, node: &Node) -> Result<Arc<Node>> {
        node.child(Role::File).ok_or_else(|| Error::NodeClosed {
            node: node.name().to_string(),
        })
    }

    /// The node guest data lives in: the external data file, or the image.
    pub(crate) fn data_node(&self, node: &Node) -> Result<Arc<Node>> {
        if self.layout.data_file {
            node.child(Role::Data).ok_or_else(|| {
                corrupt(
                    &self.name,
                    "the image has an external data file, but none is attached",
                )
            })
        } else {
            self.file(node)
        }
    }

    pub(crate) async fn l2_table(&self, file: &Node, l2_offset: u64) -> Result<Table> {
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(t) = self.l2_cache.get(l2_offset) {
            return Ok(t);
        }
        let epoch = self.l2_epoch.load(SeqCst);
        file.debug_event(DebugEvent::L2Load).await;
        let cs = self.layout.cluster_size();
        let raw = read_meta(file, l2_offset, cs, "L2 table", &self.name).await?;
        let table = decode_table(&raw);
        if self.l2_epoch.load(SeqCst) == epoch {
            self.l2_cache.insert(l2_offset, table.clone());
        }
        Ok(table)
    }

    /// The mapping of one cluster's bytes from `within` on: what they are
    /// and how many bytes (to the end of the cluster or of a run of
    /// subclusters alike) it covers.
    fn cluster_mapping(
        &self,
        table: &[u64],
        l2_index: usize,
        guest_cluster: u64,
        within: u64,
    ) -> Result<(Mapping, u64)> {
        let cs = self.layout.cluster_size();
        let ext = self.layout.extended_l2;
        let word = if ext {
            table[2 * l2_index]
        } else {
            table[l2_index]
        };
        let entry = self.layout.decode(word).map_err(|e| {
            corrupt(
                &self.name,
                format!("{e} at guest offset {guest_cluster:#x}"),
            )
        })?;
        if let L2Entry::Compressed { host, len } = entry {
            return Ok((
                Mapping::Compressed {
                    host,
                    len,
                    guest_cluster,
                },
                cs - within,
            ));
        }
        if !ext {
            let m = match entry {
                L2Entry::Unallocated => Mapping::Unallocated,
                L2Entry::Zero { .. } => Mapping::Zero,
                L2Entry::Normal { host } => Mapping::Data {
                    host: host + within,
                },
                L2Entry::Compressed { .. } => unreachable!("handled above"),
            };
            return Ok((m, cs - within));
        }
        let bitmap = table[2 * l2_index + 1];
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(corrupt(
                &self.name,
                format!(
                    "subcluster bitmap {bitmap:#018x} at guest offset {guest_cluster:#x} marks subclusters both allocated and zero"
                ),
            ));
        }
        let host = match entry {
            L2Entry::Normal { host } => Some(host),
            _ => None,
        };
        if alloc != 0 && host.is_none() {
            return Err(corrupt(
                &self.name,
                format!(
                    "subclusters allocated at guest offset {guest_cluster:#x} (bitmap {bitmap:#018x}) in a cluster without a host offset"
                ),
            ));
        }
        let sc_bits = self.layout.cluster_bits - 5;
        let sc = (within >> sc_bits) as u32;
        let kind = |i: u32| ((alloc >> i) & 1, (zero >> i) & 1);
        let k = kind(sc);
        let mut end = sc + 1;
        while end < 32 && kind(end) == k {
            end += 1;
        }
        let run = (u64::from(end) << sc_bits) - within;
        let m = match k {
            (1, _) => Mapping::Data {
                host: host.expect("checked") + within,
            },
            (_, 1) => Mapping::Zero,
            _ => Mapping::Unallocated,
        };
        Ok((m, run))
    }

    /// Maps `[offset, offset + max_len)`: what its start is, and for how
    /// many bytes (at least one, at most `max_len`) that holds.
    pub async fn map(&self, file: &Node, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let cb = self.layout.cluster_bits;
        let cs = 1u64 << cb;
        let l2_bits = self.header().l2_bits();
        let l1_index = offset >> (cb + l2_bits);
        let table_end = (l1_index + 1) << (cb + l2_bits);
        let max_len = max_len.min(table_end - offset);
        let l1_entry = self.l1.read().get(l1_index as usize).copied();
        let Some(l1_entry) = l1_entry else {
            return Ok((Mapping::Unallocated, max_len));
        };
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((Mapping::Unallocated, max_len));
        }
        if !l2_offset.is_multiple_of(cs) || l1_entry & L1_RESERVED != 0 {
            return Err(corrupt(
                &self.name,
                format!(
                    "L2 table offset {l2_offset:#x} unaligned or L1 entry {l1_entry:#x} invalid (L1 index {l1_index:#x})"
                ),
            ));
        }
        let table = self.l2_table(file, l2_offset).await?;
        let mask = (1u64 << l2_bits) - 1;
        let mut pos = offset;
        let mut first: Option<Mapping> = None;
        let mut covered = 0u64;
        while covered < max_len {
            let l2_index = ((pos >> cb) & mask) as usize;
            let guest_cluster = pos & !(cs - 1);
            let within = pos - guest_cluster;
            let (m, n) = self.cluster_mapping(&table, l2_index, guest_cluster, within)?;
            let continues = match (first, m) {
                (None, _) => true,
                (Some(Mapping::Data { host: h0 }), Mapping::Data { host }) => host == h0 + covered,
                (Some(Mapping::Zero), Mapping::Zero) => true,
                (Some(Mapping::Unallocated), Mapping::Unallocated) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            if first.is_none() {
                first = Some(m);
            }
            covered += n;
            pos += n;
            if matches!(m, Mapping::Compressed { .. }) {
                break;
            }
        }
        Ok((first.expect("at least one cluster"), covered.min(max_len)))
    }

    /// Reads what the layers below show: the backing child, zeroes beyond
    /// its end or without one.
    pub(crate) async fn read_backing(
        &self,
        node: &Node,
        offset: u64,
        mut buf: ReadBuf<'_>,
    ) -> Result<()> {
        let Some(backing) = node.child(Role::Backing) else {
            buf.fill(0);
            return Ok(());
        };
        backing.debug_event(DebugEvent::ReadBackingAio).await;
        let n = backing.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, mut tail) = buf.split_at(n);
        tail.fill(0);
        if n > 0 {
            backing.read(offset, head).await?;
        }
        Ok(())
    }

    /// Decompresses the cluster a compressed mapping points at.
    pub(crate) async fn read_compressed(
        &self,
        file: &Node,
        host: u64,
        len: u64,
        guest: u64,
    ) -> Result<IoBuf> {
        let cs = self.layout.cluster_size();
        file.debug_event(DebugEvent::ReadCompressed).await;
        if host >= file.size() {
            return Err(corrupt(
                &self.name,
                format!(
                    "compressed cluster at guest offset {guest:#x} starts at host offset {host:#x}, past the end of the file"
                ),
            ));
        }
        // The descriptor's width bounds `len` to about two clusters.
        let mut input = IoBuf::zeroed(len as usize);
        read_clipped(file, host, input.as_read_buf()).await?;
        let mut out = IoBuf::zeroed(cs as usize);
        compress::decompress(self.header().compression_type, &input, &mut out).map_err(|e| {
            corrupt(
                &self.name,
                format!(
                    "compressed cluster at guest offset {guest:#x} (host offset {host:#x}, {len} bytes): {e}"
                ),
            )
        })?;
        Ok(out)
    }

    fn writes_unsupported(&self, node: &Node) -> Error {
        Error::NotSupported {
            node: node.name().to_string(),
            driver: "qcow2",
            what: "writing through a qcow2 node opened read-only",
        }
    }
}

/// Reads and checks the snapshot table (as found at open; changes go
/// through [`crate::snapshot`], which reads it again); also returns the table's length
/// in bytes (what its clusters hold, for refcount checks). Without
/// `strict`, a snapshot's L1 table is not checked (the image check
/// reports it as QEMU does).
pub(crate) async fn read_snapshots(
    file: &Node,
    h: &Header,
    name: &str,
    strict: bool,
) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::new();
    let mut at = h.snapshots_offset;
    let mut total = 0u64;
    for i in 0..h.nb_snapshots {
        let fixed = read_meta(
            file,
            at,
            SNAPSHOT_FIXED as u64,
            "snapshot table entry",
            name,
        )
        .await?;
        let (extra, id, sname, entry_len) = snapshot_var_lens(&fixed);
        if extra as u64 > u64::from(crate::format::MAX_SNAPSHOT_EXTRA) {
            return Err(corrupt(
                name,
                format!("snapshot at offset {at:#x}: too much extra data ({extra} bytes)"),
            ));
        }
        total += entry_len as u64;
        if total > MAX_SNAPSHOTS_BYTES {
            return Err(corrupt(
                name,
                format!("snapshot table too large (more than {MAX_SNAPSHOTS_BYTES} bytes at snapshot {i})"),
            ));
        }
        // The last entry's padding need not be in the file.
        let unpadded = (SNAPSHOT_FIXED + extra + id + sname) as u64;
        let entry = read_meta(file, at, unpadded, "snapshot table entry", name).await?;
        let s = crate::format::parse_snapshot(&entry, name, at)?;
        if strict && !s.l1_table_offset.is_multiple_of(h.cluster_size()) {
            return Err(corrupt(
                name,
                format!(
                    "Snapshot L1 table offset invalid: {:#x} (snapshot '{}' at offset {at:#x})",
                    s.l1_table_offset, s.id
                ),
            ));
        }
        if strict && u64::from(s.l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(
                name,
                format!(
                    "Snapshot L1 table too large: {} entries (snapshot '{}' at offset {at:#x})",
                    s.l1_size, s.id
                ),
            ));
        }
        out.push(s);
        at += entry_len as u64;
    }
    Ok((out, total))
}

#[async_trait]
impl BlockDriver for Qcow2Driver {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn filename(&self) -> Option<String> {
        self.filename.clone()
    }

    async fn reopen(&self, node: &Node, read_only: bool) -> Result<()> {
        self.reopen_as(node, read_only).await
    }

    async fn read(&self, node: &Node, offset: u64, mut buf: ReadBuf<'_>) -> Result<()> {
        let file = self.file(node)?;
        let total = buf.len() as u64;
        let mut done = 0u64;
        while done < total {
            let pos = offset + done;
            let (m, n) = self.map(&file, pos, total - done).await?;
            let piece = buf.reborrow().slice(done as usize..(done + n) as usize);
            match m {
                Mapping::Data { host } => {
                    let data = self.data_node(node)?;
                    file.debug_event(DebugEvent::ReadAio).await;
                    read_clipped(&data, host, piece).await?;
                }
                Mapping::Zero => {
                    let mut piece = piece;
                    piece.fill(0);
                }
                Mapping::Unallocated => self.read_backing(node, pos, piece).await?,
                Mapping::Compressed {
                    host,
                    len,
                    guest_cluster,
                } => {
                    let cluster = self
                        .read_compressed(&file, host, len, guest_cluster)
                        .await?;
                    let within = (pos - guest_cluster) as usize;
                    let mut piece = piece;
                    piece.copy_from(&cluster[within..within + n as usize]);
                }
            }
            done += n;
        }
        Ok(())
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        match self.writer.get() {
            Some(w) => w.write(self, node, offset, data, flags).await,
            None => Err(self.writes_unsupported(node)),
        }
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        match self.writer.get() {
            Some(w) => w.write_zeroes(self, node, offset, len, flags).await,
            None => Err(self.writes_unsupported(node)),
        }
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        match self.writer.get() {
            Some(w) => w.discard(self, node, offset, len).await,
            None => Err(self.writes_unsupported(node)),
        }
    }

    async fn flush(&self, node: &Node) -> Result<()> {
        if node.is_read_only() {
            return Ok(());
        }
        let file = self.file(node)?;
        if self.layout.data_file {
            self.data_node(node)?.flush().await?;
        }
        match self.writer.get() {
            // Dirty metadata is written back in order, then the file
            // flushed; the flush of a closing node also clears the
            // header's dirty bit (lazy refcounts).
            Some(w) => w.flush(self, &file, node.is_closed()).await,
            _ => file.flush().await,
        }
    }

    async fn truncate(&self, node: &Node, size: u64, prealloc: &str) -> Result<()> {
        crate::resize::truncate(self, node, size, prealloc).await
    }

    async fn write_compressed(&self, node: &Node, offset: u64, data: IoBytes) -> Result<()> {
        Qcow2Driver::write_compressed(self, node, offset, &data).await
    }

    async fn change_backing_file(
        &self,
        node: &Node,
        backing_file: Option<&str>,
        backing_fmt: Option<&str>,
    ) -> Result<()> {
        crate::header_write::change_backing_file(self, node, backing_file, backing_fmt).await
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        let file = self.file(node)?;
        let (m, n) = self.map(&file, offset, len).await?;
        Ok(match m {
            Mapping::Data { host } => DriverStatus::Data {
                len: n,
                offset: (!self.layout.data_file).then_some(host),
            },
            Mapping::Zero => DriverStatus::Zero {
                len: n,
                offset: None,
            },
            Mapping::Unallocated => DriverStatus::Unallocated { len: n },
            Mapping::Compressed { .. } => DriverStatus::Data {
                len: n,
                offset: None,
            },
        })
    }
}
