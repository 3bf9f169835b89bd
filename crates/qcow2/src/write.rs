//! Writes: cluster allocation with refcounts (any width), copy-on-write of
//! partial clusters from what the cluster showed before (backing chain,
//! compressed data, zeroes), the zero flag for write-zeroes and discard.
//!
//! Metadata is cached write-back, as QEMU's `Qcow2Cache` does: refcount
//! blocks (in the writer's `State`) and L2 tables (the driver's
//! [`crate::cache::TableCache`]) are changed in memory and written back
//! lazily — when the caches fill, before clusters are freed, and on a
//! guest flush. Ordering, for crash safety (refcounts never undercount,
//! no L2 entry points at an unreferenced cluster, no L2 entry exposes a
//! cluster before its data):
//!
//! 1. a new refcount block is written and flushed before the refcount
//!    table points at it; a new L2 table is written (zeroed) and its
//!    refcount written back and flushed before the L1 entry points at it;
//! 2. once an L2 table has been changed to publish new clusters (or newly
//!    written subclusters), no dirty L2 table is written back before the
//!    dirty refcount blocks are written and the file is flushed
//!    (`State::l2_depends`, QEMU's `qcow2_cache_set_dependency` of the L2
//!    cache on the refcount cache): that flush also makes the data the
//!    entries point at durable, since it was written before the entries
//!    changed;
//! 3. a cluster an entry stopped using is freed (its refcount dropped,
//!    in memory) only after every dirty L2 table is written back and the
//!    file flushed;
//! 4. a guest flush writes back refcount blocks, flushes, writes back L2
//!    tables and flushes again.
//!
//! A write-back that fails leaves the tables dirty; a later one retries.
//!
//! With lazy refcounts (`lazy_refcounts=on`), rule 2 keeps its flush
//! (the data the entries point at is durable first: an entry pointing
//! past the end of the file after a crash is beyond repair) but not the
//! refcount write-back, as QEMU drops that dependency: the header's
//! dirty bit is set (and flushed) before the first L2 change that
//! publishes clusters whose refcounts are not durable; the bit is
//! cleared when the node closes, after a full write-back. A crash leaves
//! it set, and the next writable open rebuilds the refcounts first
//! (`crate::check::repair_dirty`).
//!
//! Internal snapshots share clusters and L2 tables with the active
//! layer (refcount above one, `COPIED` clear). A shared cluster is never
//! written: the write goes to a new cluster and the old one loses a
//! reference (rule 3). A shared L2 table is copied before it changes:
//! the copy and its refcount are durable before the L1 entry points at
//! it, and that L1 entry before the old table loses a reference.
//!
//! With an external data file, a guest cluster's data lives at the same
//! offset in the data file (as QEMU maps it) and has no refcount; with
//! `data_file_raw`, write-zeroes also zero the data file and discard
//! does nothing, so the data file stays a raw image of the disk.
//!
//! Compressed clusters are packed byte by byte into host clusters
//! (`alloc_bytes`, QEMU's `qcow2_alloc_bytes`): a host cluster holds a
//! reference per compressed cluster whose bytes touch it, and packing
//! resumes only in a cluster that still has one. Their entries are
//! published like new clusters' (rule 2).
//!
//! Resizing moves the active L1 table when it outgrows its clusters
//! (`move_l1`): the new table and its refcounts are durable before the
//! header points at it, and the header before the old table is freed.
//!
//! New clusters are taken from free clusters inside the file (searched
//! from a cursor, as QEMU does) or from its end. A freed cluster is
//! reusable only once the L2 update that stopped using it is durable
//! (rule 3) and no lock-free in-place write that may have mapped it is
//! still running (`Ticket`s), so a crash can at worst leak clusters.
//! Overwrites of clusters this image owns alone (the common case) write
//! in place, with no lock. Allocating writes take the state lock only to
//! map and allocate, and again to publish; their data is written in
//! between, in parallel with other requests, while the guest clusters
//! they allocate are marked in flight (other requests touching those
//! wait). Writes with extended L2 entries and copy-on-read writes still
//! hold the lock throughout. Reads take no lock: a read racing with a
//! discard of the same range may see what a reused cluster holds next.

use crate::driver::{read_clipped, read_meta, Qcow2Driver};
use crate::format::{
    autoclear, corrupt, incompat, Header, L2Entry, COPIED, OFFSET_MASK, ZERO_FLAG,
};
use sluice_core::{DebugEvent, Error, IoBuf, IoBytes, Node, Result, WriteFlags, ZeroFlags};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

/// Bytes of refcount blocks kept in memory by default (QEMU's default
/// `refcount-cache-size` is a quarter of the L2 cache; 1 MiB is about
/// that for the default L2 cache of a large disk). Dirty blocks are
/// written back before they are dropped.
const DEFAULT_REFCOUNT_CACHE: u64 = 1 << 20;

/// A subcluster bitmap saying every subcluster reads as zeroes.
const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// A new cluster written but not yet published in its L2 table.
struct Pending {
    l2_off: u64,
    idx: usize,
    entry: u64,
    /// The subcluster bitmap, with extended L2 entries.
    bitmap: Option<u64>,
    old: L2Entry,
}

/// Epochs of the writes that reach host clusters without the state lock
/// (in-place overwrites): a freed cluster is reused only once every
/// such write that might have mapped it before it was freed is done, or
/// a late write would land in another guest cluster's data.
#[derive(Default)]
struct Tickets {
    current: u64,
    /// Epoch → writes in flight that took their ticket in it.
    live: std::collections::BTreeMap<u64, usize>,
}

/// One lock-free write's ticket, taken before it maps its clusters.
struct Ticket {
    tickets: Arc<parking_lot::Mutex<Tickets>>,
    epoch: u64,
}

impl Ticket {
    fn take(tickets: &Arc<parking_lot::Mutex<Tickets>>) -> Ticket {
        let mut t = tickets.lock();
        let epoch = t.current;
        *t.live.entry(epoch).or_insert(0) += 1;
        Ticket {
            tickets: tickets.clone(),
            epoch,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = self.tickets.lock();
        if let Some(n) = t.live.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                t.live.remove(&self.epoch);
            }
        }
    }
}

pub struct Writer {
    /// Whether the header's autoclear bits were dealt with (mirrors
    /// `State::header_done` for the lock-free path).
    prepared: std::sync::atomic::AtomicBool,
    state: tokio::sync::Mutex<State>,
    /// Guest clusters whose new cluster is being written outside the
    /// state lock and not yet published: nothing else changes their
    /// entries meanwhile (QEMU's in-flight `QCowL2Meta` dependencies).
    inflight: parking_lot::Mutex<HashSet<u64>>,
    /// Woken whenever clusters leave `inflight`.
    settled: tokio::sync::Notify,
    tickets: Arc<parking_lot::Mutex<Tickets>>,
}

/// Takes guest clusters out of [`Writer::inflight`] when dropped (also
/// when the request is cancelled: the new clusters then only leak).
struct InflightGuard<'a> {
    w: &'a Writer,
    guests: Vec<u64>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.guests.is_empty() {
            return;
        }
        {
            let mut set = self.w.inflight.lock();
            for g in &self.guests {
                set.remove(g);
            }
        }
        self.w.settled.notify_waiters();
    }
}

/// The bytes allocated for one compressed cluster, not yet published
/// ([`Writer::alloc_compressed`]): the guest cluster stays in flight
/// (other requests touching it wait) until
/// [`Writer::publish_compressed`]; dropped unpublished, the bytes only
/// leak.
pub(crate) struct CompressedSlot<'a> {
    /// Where the compressed stream goes in the image file.
    pub(crate) host: u64,
    l2_off: u64,
    idx: usize,
    old: L2Entry,
    _guard: InflightGuard<'a>,
}

/// One cluster's part of an allocating write.
enum Piece {
    /// A cluster this image alone owns: written in place.
    InPlace { host: u64, at: usize, n: usize },
    /// A new cluster `host` for the guest cluster `guest`, filled with
    /// what the cluster showed (`old`) and `n` bytes of the request from
    /// `at` at `within`, then published at `idx` of the L2 table `l2_off`.
    New {
        guest: u64,
        host: u64,
        within: usize,
        at: usize,
        n: usize,
        old: L2Entry,
        l2_off: u64,
        idx: usize,
    },
}

struct State {
    reftable: Vec<u64>,
    /// Where the refcount table is now (it moves when it grows).
    rt_offset: u64,
    blocks: HashMap<u64, Vec<u8>>,
    /// Blocks in `blocks` changed since they were last written.
    dirty_blocks: BTreeSet<u64>,
    /// Dirty L2 tables publish clusters whose refcounts (and data) must be
    /// durable before any dirty L2 table is written back.
    l2_depends: bool,
    /// The end of the file: where clusters are allocated when no freed
    /// one is found.
    next_free: u64,
    /// Where the search for a free cluster inside the file resumes
    /// (QEMU's `free_cluster_index`): nothing below it is free, except
    /// clusters freed since, which move it back.
    free_cursor: u64,
    /// Freed extents whose refcounts are not dropped yet: lock-free
    /// in-place writes that may still target them are in flight.
    quarantine: Vec<(u64, u64, u64)>,
    /// The lock-free writers' tickets (shared with [`Writer`]).
    tickets: Arc<parking_lot::Mutex<Tickets>>,
    /// Whether the header's autoclear bits were cleared already.
    header_done: bool,
    /// How many refcount blocks `blocks` may hold.
    max_blocks: usize,
    /// Lazy refcounts: new clusters are published without waiting for
    /// their refcounts, under the header's dirty bit.
    lazy: bool,
    /// Whether the header's dirty bit is set (by this writer).
    dirty: bool,
    /// Where the next compressed cluster's bytes go: the first unused
    /// byte of the host cluster compressed data was last packed into
    /// (QEMU's `free_byte_offset`); 0 when there is none. Only used while
    /// that cluster keeps a reference.
    free_byte: u64,
}

/// The refcount at entry `idx` of a block with `1 << order`-bit entries.
pub(crate) fn rc_get(block: &[u8], idx: u64, order: u32) -> u64 {
    let w = 1u64 << order;
    if w >= 8 {
        let bytes = (w / 8) as usize;
        let at = idx as usize * bytes;
        block[at..at + bytes]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = idx * w;
        let byte = block[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1 << w) - 1)
    }
}

/// Sets entry `idx`; returns the byte range that changed.
pub(crate) fn rc_put(block: &mut [u8], idx: u64, order: u32, v: u64) -> (usize, usize) {
    let w = 1u64 << order;
    if w >= 8 {
        let bytes = (w / 8) as usize;
        let at = idx as usize * bytes;
        for i in 0..bytes {
            block[at + i] = (v >> (8 * (bytes - 1 - i))) as u8;
        }
        (at, bytes)
    } else {
        let bit = idx * w;
        let at = (bit / 8) as usize;
        let shift = bit % 8;
        let mask = (((1u64 << w) - 1) << shift) as u8;
        block[at] = (block[at] & !mask) | (((v << shift) as u8) & mask);
        (at, 1)
    }
}

pub(crate) fn grow(file: &Node, end: u64) {
    if end > file.size() {
        file.set_size(end);
    }
}

impl Writer {
    /// Opens the write side; `refcount_cache` bounds the bytes of refcount
    /// blocks kept in memory (`refcount-cache-size`).
    pub async fn open(
        file: &Arc<Node>,
        h: &Header,
        name: &str,
        refcount_cache: Option<u64>,
        lazy: bool,
    ) -> Result<Writer> {
        let cs = h.cluster_size();
        let bytes = u64::from(h.refcount_table_clusters) * cs;
        let reftable = crate::driver::read_words(
            file,
            h.refcount_table_offset,
            bytes,
            "reference count table",
            name,
        )
        .await?;
        let tickets = Arc::new(parking_lot::Mutex::new(Tickets::default()));
        Ok(Writer {
            tickets: tickets.clone(),
            prepared: std::sync::atomic::AtomicBool::new(false),
            inflight: parking_lot::Mutex::new(HashSet::new()),
            settled: tokio::sync::Notify::new(),
            state: tokio::sync::Mutex::new(State {
                reftable,
                rt_offset: h.refcount_table_offset,
                blocks: HashMap::new(),
                dirty_blocks: BTreeSet::new(),
                l2_depends: false,
                next_free: file.size().div_ceil(cs) * cs,
                free_cursor: 0,
                quarantine: Vec::new(),
                tickets,
                header_done: false,
                max_blocks: (refcount_cache.unwrap_or(DEFAULT_REFCOUNT_CACHE) / cs).max(2) as usize,
                lazy,
                dirty: h.is_dirty(),
                free_byte: 0,
            }),
        })
    }

    /// Locks the state once no cluster of `[offset, offset + len)` is
    /// being allocated outside the lock.
    async fn lock_range(
        &self,
        offset: u64,
        len: u64,
        cs: u64,
    ) -> tokio::sync::MutexGuard<'_, State> {
        loop {
            let settled = self.settled.notified();
            let st = self.state.lock().await;
            let busy = {
                let set = self.inflight.lock();
                set.iter()
                    .any(|&g| g < offset.saturating_add(len) && g + cs > offset)
            };
            if !busy {
                return st;
            }
            drop(st);
            settled.await;
        }
    }

    /// Locks the state for the one guest cluster at `guest` (header
    /// prepared): with the L2 table that maps it (allocated if need be)
    /// and the cluster's index in it.
    async fn lock_cluster(
        &self,
        d: &Qcow2Driver,
        file: &Node,
        guest: u64,
    ) -> Result<(tokio::sync::MutexGuard<'_, State>, u64, usize)> {
        let cs = d.header().cluster_size();
        let mut st = self.lock_range(guest, cs, cs).await;
        Self::prepare(d, file, &mut st).await?;
        self.prepared.store(true, SeqCst);
        let (l2_off, idx) = Self::l2_for_write(d, file, &mut st, guest).await?;
        Ok((st, l2_off, idx))
    }

    fn rb_bits(d: &Qcow2Driver) -> u32 {
        let h = d.header();
        h.cluster_bits + 3 - h.refcount_order
    }

    /// Where cluster `off`'s refcount lives: (table index, entry index).
    fn rc_pos(d: &Qcow2Driver, off: u64) -> (usize, u64) {
        let c = off >> d.header().cluster_bits;
        let rb = Self::rb_bits(d);
        ((c >> rb) as usize, c & ((1u64 << rb) - 1))
    }

    async fn load_block(d: &Qcow2Driver, file: &Node, st: &mut State, boff: u64) -> Result<()> {
        if st.blocks.contains_key(&boff) {
            return Ok(());
        }
        Self::block_room(d, file, st).await?;
        file.debug_event(DebugEvent::RefblockLoad).await;
        let cs = d.header().cluster_size();
        let raw = read_meta(file, boff, cs, "refcount block", d.name()).await?;
        st.blocks.insert(boff, raw.to_vec());
        Ok(())
    }

    async fn refcount(d: &Qcow2Driver, file: &Node, st: &mut State, off: u64) -> Result<u64> {
        let (bi, idx) = Self::rc_pos(d, off);
        let boff = st.reftable.get(bi).copied().unwrap_or(0) & OFFSET_MASK;
        if boff == 0 {
            return Ok(0);
        }
        Self::load_block(d, file, st, boff).await?;
        Ok(rc_get(&st.blocks[&boff], idx, d.header().refcount_order))
    }

    /// Makes sure the refcount block covering `off` exists; a new one is
    /// placed at `st.next_free` (which is then `off` itself: the block
    /// counts itself).
    async fn ensure_block(d: &Qcow2Driver, file: &Node, st: &mut State, off: u64) -> Result<()> {
        let (bi, _) = Self::rc_pos(d, off);
        if bi >= st.reftable.len() {
            // The table moves and the allocation pointer with it: the
            // caller starts over at the new `next_free`.
            return Self::grow_reftable(d, file, st, bi).await;
        }
        if st.reftable[bi] & OFFSET_MASK != 0 {
            return Ok(());
        }
        let b = st.next_free;
        let (bbi, bidx) = Self::rc_pos(d, b);
        if bbi != bi {
            return Err(Error::Other(format!(
                "{}: internal error: new refcount block at {b:#x} outside its own range",
                d.name()
            )));
        }
        let cs = d.header().cluster_size();
        file.debug_event(DebugEvent::RefblockAlloc).await;
        let mut block = vec![0u8; cs as usize];
        rc_put(&mut block, bidx, d.header().refcount_order, 1);
        grow(file, b + cs);
        file.write(b, IoBytes::copy_from(&block), WriteFlags::default())
            .await?;
        file.flush().await?;
        let rt = st.rt_offset + bi as u64 * 8;
        file.debug_event(DebugEvent::RefblockAllocHookup).await;
        file.write(
            rt,
            IoBytes::copy_from(&b.to_be_bytes()),
            WriteFlags::default(),
        )
        .await?;
        st.reftable[bi] = b;
        Self::block_room(d, file, st).await?;
        st.blocks.insert(b, block);
        st.next_free = b + cs;
        Ok(())
    }

    /// Grows the refcount table to cover table index `bi`: the new table
    /// and the refcount blocks it needs for itself go at the end of the
    /// file, are written and flushed, then the header is switched to it
    /// and flushed, and only then the old table is freed.
    async fn grow_reftable(d: &Qcow2Driver, file: &Node, st: &mut State, bi: usize) -> Result<()> {
        let h = d.header();
        let cs = h.cluster_size();
        let cb = h.cluster_bits;
        let per_cluster = (cs / 8) as usize;
        let want = (bi + 1).max(st.reftable.len() * 2);
        let new_len = want.div_ceil(per_cluster) * per_cluster;
        let ntc = (new_len / per_cluster) as u64;
        if ntc * cs > crate::format::MAX_REFTABLE_BYTES {
            return Err(Error::Other(format!(
                "{}: the refcount table would exceed {} bytes",
                d.name(),
                crate::format::MAX_REFTABLE_BYTES
            )));
        }
        file.debug_event(DebugEvent::ReftableGrow).await;
        let t = st.next_free;
        let rb = Self::rb_bits(d);
        let block_of = |off: u64| ((off >> cb) >> rb) as usize;
        let has_block = |st: &State, b: usize| st.reftable.get(b).is_some_and(|&e| e != 0);
        // New blocks go right after the table; find how many are needed
        // to count the table and themselves.
        let mut nb = 0u64;
        let new_blocks: Vec<usize> = loop {
            let end = t + (ntc + nb) * cs;
            let mut need: Vec<usize> = Vec::new();
            let mut c = t;
            while c < end {
                let b = block_of(c);
                if !has_block(st, b) && !need.contains(&b) {
                    need.push(b);
                }
                c += cs;
            }
            if need.len() as u64 == nb {
                break need;
            }
            nb = need.len() as u64;
        };
        let end = t + (ntc + nb) * cs;
        let mut table = st.reftable.clone();
        table.resize(new_len, 0);
        let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for (k, &b) in new_blocks.iter().enumerate() {
            if b >= new_len {
                return Err(Error::Other(format!(
                    "{}: internal error: growing the refcount table",
                    d.name()
                )));
            }
            let boff = t + (ntc + k as u64) * cs;
            table[b] = boff;
            blocks.push((boff, vec![0u8; cs as usize]));
        }
        // Count every cluster of [t, end): in a new block, or in an old one.
        let mut c = t;
        while c < end {
            let (b, idx) = Self::rc_pos(d, c);
            if let Some(k) = new_blocks.iter().position(|&x| x == b) {
                rc_put(&mut blocks[k].1, idx, h.refcount_order, 1);
            } else {
                Self::set_refcount(d, file, st, c, 1).await?;
            }
            c += cs;
        }
        // The old blocks' counts of the new table reach the file first.
        Self::write_refblocks(d, file, st).await?;
        grow(file, end);
        for (boff, block) in &blocks {
            file.write(*boff, IoBytes::copy_from(block), WriteFlags::default())
                .await?;
        }
        let mut raw = Vec::with_capacity(new_len * 8);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        file.write(t, IoBytes::copy_from(&raw), WriteFlags::default())
            .await?;
        file.flush().await?;
        // Switch the header to the new table.
        let mut hdr = Vec::with_capacity(12);
        hdr.extend_from_slice(&t.to_be_bytes());
        hdr.extend_from_slice(&(ntc as u32).to_be_bytes());
        file.debug_event(DebugEvent::ReftableUpdate).await;
        file.write(48, IoBytes::copy_from(&hdr), WriteFlags::default())
            .await?;
        file.flush().await?;
        let old = (st.rt_offset, st.reftable.len() as u64 * 8);
        st.reftable = table;
        st.rt_offset = t;
        let mut h = d.header().clone();
        h.refcount_table_offset = t;
        h.refcount_table_clusters = ntc as u32;
        d.set_header(h);
        for (boff, block) in blocks {
            Self::block_room(d, file, st).await?;
            st.blocks.insert(boff, block);
        }
        st.next_free = end;
        // The old table is no longer referenced by the (durable) header.
        let cb_mask = cs - 1;
        let old_len = (old.1 + cb_mask) & !cb_mask;
        let mut c = old.0;
        while c < old.0 + old_len {
            let rc = Self::refcount(d, file, st, c).await?;
            if rc > 0 {
                Self::set_refcount(d, file, st, c, rc - 1).await?;
            }
            c += cs;
        }
        Ok(())
    }

    async fn set_refcount(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        off: u64,
        v: u64,
    ) -> Result<()> {
        let order = d.header().refcount_order;
        if order < 6 && v >> (1u32 << order) != 0 {
            return Err(Error::Other(format!(
                "{}: refcount of cluster {off:#x} would overflow {} bits",
                d.name(),
                1u32 << order
            )));
        }
        let (bi, idx) = Self::rc_pos(d, off);
        let boff = st.reftable.get(bi).copied().unwrap_or(0) & OFFSET_MASK;
        if boff == 0 {
            return Err(corrupt(
                d.name(),
                format!("no refcount block for cluster {off:#x}"),
            ));
        }
        Self::load_block(d, file, st, boff).await?;
        let block = st.blocks.get_mut(&boff).expect("loaded");
        rc_put(block, idx, order, v);
        st.dirty_blocks.insert(boff);
        Ok(())
    }

    /// Makes room for one more refcount block in memory: clean blocks go
    /// first; when every block is dirty, they are written back. (Refcount
    /// blocks may always be written: increments only leak until the L2
    /// entries are written, and decrements are made after the entries
    /// that stopped using the clusters are durable.)
    async fn block_room(d: &Qcow2Driver, file: &Node, st: &mut State) -> Result<()> {
        if st.blocks.len() < st.max_blocks {
            return Ok(());
        }
        let dirty = &st.dirty_blocks;
        st.blocks.retain(|b, _| dirty.contains(b));
        if st.blocks.len() >= st.max_blocks {
            Self::write_refblocks(d, file, st).await?;
            st.blocks.clear();
        }
        Ok(())
    }

    /// Writes every dirty refcount block back (no flush).
    async fn write_refblocks(_d: &Qcow2Driver, file: &Node, st: &mut State) -> Result<()> {
        while let Some(&boff) = st.dirty_blocks.first() {
            let bytes = IoBytes::copy_from(&st.blocks[&boff]);
            file.debug_event(DebugEvent::RefblockUpdate).await;
            file.write(boff, bytes, WriteFlags::default()).await?;
            st.dirty_blocks.remove(&boff);
        }
        Ok(())
    }

    /// Writes dirty metadata back in crash-safe order: refcount blocks,
    /// a flush (when dirty L2 tables publish new clusters), L2 tables;
    /// with `sync`, then a flush, so that all of it is durable.
    async fn write_back(d: &Qcow2Driver, file: &Node, st: &mut State, sync: bool) -> Result<()> {
        let tables = d.l2_cache.dirty_tables();
        if !tables.is_empty() && st.l2_depends {
            // Lazy refcounts: the data first, the refcounts may lag.
            if !st.lazy {
                Self::write_refblocks(d, file, st).await?;
            }
            file.flush().await?;
            st.l2_depends = false;
        }
        for (off, t) in tables {
            let mut raw = IoBuf::zeroed(t.len() * 8);
            for (chunk, w) in raw.chunks_exact_mut(8).zip(t.iter()) {
                chunk.copy_from_slice(&w.to_be_bytes());
            }
            file.debug_event(DebugEvent::L2Update).await;
            file.write(off, raw.freeze(), WriteFlags::default()).await?;
            // Readers that loaded the table from the file before this
            // write do not cache what they read.
            d.l2_epoch.fetch_add(1, SeqCst);
            d.l2_cache.mark_clean(off, &t);
        }
        if sync {
            Self::write_refblocks(d, file, st).await?;
            file.flush().await?;
        }
        Ok(())
    }

    /// Writes back every dirty table and flushes the file (a guest flush);
    /// when `closing`, then clears the header's dirty bit: the refcounts
    /// on disk are exact again.
    pub async fn flush(&self, d: &Qcow2Driver, file: &Node, closing: bool) -> Result<()> {
        let mut st = self.state.lock().await;
        // Freed clusters still quarantined would otherwise stay counted
        // (leak) when no allocation follows; at close none is in flight.
        Self::release_quarantine(d, file, &mut st).await?;
        Self::write_back(d, file, &mut st, true).await?;
        if closing && st.dirty {
            Self::set_dirty_bit(d, file, &mut st, false).await?;
        }
        Ok(())
    }

    /// Turns lazy refcounts on or off for what this writer does next
    /// (`qemu-img amend -o lazy_refcounts=...`, or a downgrade to version
    /// 2, which has no dirty bit). Turning them off, the caller has made
    /// the image clean first ([`Writer::flush`] closing).
    pub(crate) async fn set_lazy(&self, on: bool) {
        self.state.lock().await.lazy = on;
    }

    /// Turns the zero cluster of the active layer at guest offset `guest`
    /// into what a version 2 image can say (QEMU's
    /// `expand_zero_clusters_in_l1`, for a downgrade): without a backing
    /// file (`backing` false) a plain zero cluster becomes unallocated;
    /// with one it gets a new cluster, zeroed; a preallocated zero
    /// cluster keeps its host cluster, zeroed. The new entry is published
    /// as new clusters are (rule 2). Other entries are left alone.
    pub(crate) async fn expand_zero_cluster(
        &self,
        d: &Qcow2Driver,
        node: &Node,
        guest: u64,
        backing: bool,
    ) -> Result<()> {
        let file = d.file(node)?;
        let cs = d.header().cluster_size();
        let (mut st, l2_off, idx) = self.lock_cluster(d, &file, guest).await?;
        let word = d.l2_table(&file, l2_off).await?[idx];
        let mut to_free = Vec::new();
        match Self::decode(d, word, guest)? {
            L2Entry::Zero { host: None } if !backing => {
                Self::set_l2_entry(d, &file, &mut st, l2_off, idx, 0).await?;
            }
            old @ L2Entry::Zero { host: None } => {
                let host = Self::alloc(d, &file, &mut st).await?;
                grow(&file, host + cs);
                file.write_zeroes(host, cs, ZeroFlags::default()).await?;
                let pending = vec![Pending {
                    l2_off,
                    idx,
                    entry: host | COPIED,
                    bitmap: None,
                    old,
                }];
                Self::publish(d, &file, &mut st, pending, &mut to_free).await?;
            }
            L2Entry::Zero { host: Some(host) } => {
                grow(&file, host + cs);
                file.write_zeroes(host, cs, ZeroFlags::default()).await?;
                Self::l2_depends_on_refcounts(d, &file, &mut st).await?;
                Self::set_l2_entry(d, &file, &mut st, l2_off, idx, word & !ZERO_FLAG).await?;
            }
            _ => {}
        }
        Self::free_all(d, &file, &mut st, to_free).await
    }

    /// Sets or clears the header's dirty bit, durably (QEMU's
    /// `qcow2_mark_dirty` / `qcow2_mark_clean`).
    async fn set_dirty_bit(d: &Qcow2Driver, file: &Node, st: &mut State, on: bool) -> Result<()> {
        let mut h = d.header().clone();
        if on {
            h.incompatible_features |= incompat::DIRTY;
        } else {
            h.incompatible_features &= !incompat::DIRTY;
        }
        file.write(
            72,
            IoBytes::copy_from(&h.incompatible_features.to_be_bytes()),
            WriteFlags::default(),
        )
        .await?;
        file.flush().await?;
        d.set_header(h);
        st.dirty = on;
        Ok(())
    }

    /// Dirty L2 tables now publish clusters (or subclusters) whose
    /// refcounts and data are not yet durable: no L2 table is written
    /// back before those are. With lazy refcounts the refcounts may lag
    /// (the image is marked dirty first: a crash then means a refcount
    /// rebuild at the next writable open); the data may not, or a crash
    /// could leave entries pointing past the end of the file, which no
    /// repair can mend.
    async fn l2_depends_on_refcounts(d: &Qcow2Driver, file: &Node, st: &mut State) -> Result<()> {
        if st.lazy && !st.dirty {
            Self::set_dirty_bit(d, file, st, true).await?;
        }
        st.l2_depends = true;
        Ok(())
    }

    /// Writes L2 tables back when more are dirty than the cache holds
    /// (the cache then holds at most one table more than its capacity).
    async fn bound_dirty_l2(d: &Qcow2Driver, file: &Node, st: &mut State) -> Result<()> {
        if d.l2_cache.dirty_len() > d.l2_cache.capacity() {
            Self::write_back(d, file, st, false).await?;
        }
        Ok(())
    }

    /// Allocates one cluster (refcount 1): a free one inside the file,
    /// searched from the cursor on (QEMU's `alloc_clusters_noref`), or
    /// one at the end of the file.
    async fn alloc(d: &Qcow2Driver, file: &Node, st: &mut State) -> Result<u64> {
        let cs = d.header().cluster_size();
        file.debug_event(DebugEvent::ClusterAlloc).await;
        Self::release_quarantine(d, file, st).await?;
        // A range without a refcount block has nothing to reuse (a new
        // block only goes at the end of the file).
        let block_span = 1u64 << (d.header().cluster_bits + Self::rb_bits(d));
        while st.free_cursor < st.next_free {
            let c = st.free_cursor;
            let (bi, _) = Self::rc_pos(d, c);
            if st.reftable.get(bi).copied().unwrap_or(0) & OFFSET_MASK == 0 {
                st.free_cursor = (c / block_span + 1) * block_span;
                continue;
            }
            st.free_cursor = c + cs;
            if Self::refcount(d, file, st, c).await? == 0 {
                Self::set_refcount(d, file, st, c, 1).await?;
                return Ok(c);
            }
        }
        Self::alloc_end(d, file, st).await
    }

    /// Allocates one cluster (refcount 1) at the end of the file: it
    /// reads as zeroes until written.
    async fn alloc_end(d: &Qcow2Driver, file: &Node, st: &mut State) -> Result<u64> {
        let cs = d.header().cluster_size();
        loop {
            let off = st.next_free;
            Self::ensure_block(d, file, st, off).await?;
            if st.next_free != off {
                continue;
            }
            if Self::refcount(d, file, st, off).await? != 0 {
                st.next_free += cs;
                continue;
            }
            Self::set_refcount(d, file, st, off, 1).await?;
            st.next_free = off + cs;
            st.free_cursor = st.next_free;
            return Ok(off);
        }
    }

    /// The host cluster for new data of the guest cluster `guest`: in an
    /// external data file the guest offset itself (as QEMU maps them;
    /// such clusters have no refcounts), else a newly allocated cluster.
    async fn alloc_data(
        d: &Qcow2Driver,
        file: &Node,
        dnode: &Node,
        st: &mut State,
        guest: u64,
    ) -> Result<u64> {
        let host = if d.layout().data_file {
            guest
        } else {
            Self::alloc(d, file, st).await?
        };
        grow(dnode, host + d.header().cluster_size());
        Ok(host)
    }

    /// Whether the external data file is kept a raw image of the disk.
    fn data_file_raw(d: &Qcow2Driver) -> bool {
        d.layout().data_file && d.header().autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Flushes the external data file, if there is one (FUA writes).
    async fn flush_data(d: &Qcow2Driver, node: &Node) -> Result<()> {
        if d.layout().data_file {
            d.data_node(node)?.flush().await?;
        }
        Ok(())
    }

    /// Drops the refcounts of quarantined extents that no lock-free
    /// write can still reach.
    async fn release_quarantine(d: &Qcow2Driver, file: &Node, st: &mut State) -> Result<()> {
        if st.quarantine.is_empty() {
            return Ok(());
        }
        let oldest = st.tickets.lock().live.keys().next().copied();
        let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut st.quarantine)
            .into_iter()
            .partition(|&(_, _, tag)| oldest.is_none_or(|o| tag < o));
        st.quarantine = wait;
        for (host, len, _) in ready {
            Self::drop_refs(d, file, st, host, len).await?;
        }
        Ok(())
    }

    /// Drops one reference to every cluster of `[host, host + len)`.
    async fn drop_refs(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        host: u64,
        len: u64,
    ) -> Result<()> {
        let cb = d.header().cluster_bits;
        let first = host >> cb;
        let last = (host + len.max(1) - 1) >> cb;
        for c in first..=last {
            let off = c << cb;
            let rc = Self::refcount(d, file, st, off).await?;
            if rc == 0 {
                return Err(corrupt(
                    d.name(),
                    format!("freeing cluster {off:#x}, whose refcount is already 0"),
                ));
            }
            file.debug_event(DebugEvent::ClusterFree).await;
            Self::set_refcount(d, file, st, off, rc - 1).await?;
            if rc == 1 && off < st.free_cursor {
                st.free_cursor = off;
            }
            // A free cluster may be reused whole: compressed data is no
            // longer packed into it.
            if rc == 1 && st.free_byte >> cb == c {
                st.free_byte = 0;
            }
        }
        Ok(())
    }

    /// Drops one reference to every cluster of `[host, host + len)`, after
    /// the entries that used them are durably gone.
    async fn free_all(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        to_free: Vec<(u64, u64)>,
    ) -> Result<()> {
        if to_free.is_empty() {
            return Ok(());
        }
        // The entries that used the clusters are durably gone first.
        Self::write_back(d, file, st, true).await?;
        // Lock-free writes that took their ticket before now may still
        // target these clusters: they stay referenced until those end.
        let tag = {
            let mut t = st.tickets.lock();
            t.current += 1;
            t.current - 1
        };
        for (host, len) in to_free {
            st.quarantine.push((host, len, tag));
        }
        Self::release_quarantine(d, file, st).await
    }

    /// Clears autoclear bits before the first change (bitmaps and other
    /// extensions sluice does not keep up to date become invalid, as the
    /// spec asks).
    async fn prepare(d: &Qcow2Driver, file: &Node, st: &mut State) -> Result<()> {
        if st.header_done {
            return Ok(());
        }
        // The raw data file bit stays: writes keep the data file raw.
        let keep = d.header().autoclear_features & autoclear::DATA_FILE_RAW;
        if d.header().version >= 3 && d.header().autoclear_features != keep {
            file.write(
                88,
                IoBytes::copy_from(&keep.to_be_bytes()),
                WriteFlags::default(),
            )
            .await?;
            file.flush().await?;
            let mut h = d.header().clone();
            h.autoclear_features = keep;
            d.set_header(h);
        }
        st.header_done = true;
        Ok(())
    }

    /// Sets a standard L2 entry (in the cache; written back later).
    async fn set_l2_entry(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        l2_off: u64,
        idx: usize,
        val: u64,
    ) -> Result<()> {
        Self::set_l2_words(d, file, st, l2_off, idx, &[val]).await
    }

    /// Sets consecutive 64-bit words of an L2 table from word `at` on (an
    /// entry, a subcluster bitmap, or both): the cached table changes and
    /// is dirty until written back.
    async fn set_l2_words(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        l2_off: u64,
        at: usize,
        words: &[u64],
    ) -> Result<()> {
        Self::set_l2_words_mem(d, file, l2_off, at, words).await?;
        Self::bound_dirty_l2(d, file, st).await
    }

    /// [`Self::set_l2_words`] without writing anything back.
    async fn set_l2_words_mem(
        d: &Qcow2Driver,
        file: &Node,
        l2_off: u64,
        at: usize,
        words: &[u64],
    ) -> Result<()> {
        d.l2_epoch.fetch_add(1, SeqCst);
        let set = |t: &mut [u64]| t[at..at + words.len()].copy_from_slice(words);
        if !d.l2_cache.modify_cached(l2_off, set) {
            let base = d.l2_table(file, l2_off).await?;
            d.l2_epoch.fetch_add(1, SeqCst);
            d.l2_cache.modify(l2_off, &base, set);
        }
        Ok(())
    }

    /// The L2 table mapping `guest`, allocated (and owned by this image
    /// alone) for a write; returns its offset and the entry index.
    async fn l2_for_write(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        guest: u64,
    ) -> Result<(u64, usize)> {
        let h = d.header();
        let cb = h.cluster_bits;
        let l2_bits = h.l2_bits();
        let cs = h.cluster_size();
        let l1_idx = (guest >> (cb + l2_bits)) as usize;
        let idx = ((guest >> cb) & ((1u64 << l2_bits) - 1)) as usize;
        let l1e = d.l1.read().get(l1_idx).copied().ok_or_else(|| {
            corrupt(
                d.name(),
                format!("guest offset {guest:#x} is beyond the L1 table"),
            )
        })?;
        let old = l1e & OFFSET_MASK;
        if old != 0 && !old.is_multiple_of(cs) {
            return Err(corrupt(
                d.name(),
                format!("L2 table offset {old:#x} unaligned (L1 index {l1_idx:#x})"),
            ));
        }
        if old != 0 {
            if l1e & COPIED == 0 {
                // Only an L2 table this image alone uses may change in
                // place; one shared with a snapshot is copied first.
                match Self::refcount(d, file, st, old).await? {
                    0 => {
                        return Err(corrupt(
                            d.name(),
                            format!("L2 table {old:#x} (L1 index {l1_idx:#x}) has refcount 0"),
                        ))
                    }
                    1 => Self::set_l1_entry(d, file, l1_idx, old | COPIED).await?,
                    rc => {
                        let new = Self::copy_l2(d, file, st, l1_idx, old, rc).await?;
                        return Ok((new, idx));
                    }
                }
            }
            return Ok((old, idx));
        }
        let new = Self::alloc(d, file, st).await?;
        file.debug_event(DebugEvent::L2AllocWrite).await;
        grow(file, new + cs);
        file.write(
            new,
            IoBuf::zeroed(cs as usize).freeze(),
            WriteFlags::default(),
        )
        .await?;
        // The table's refcount and its zeroes are durable before the L1
        // entry points at it.
        Self::write_refblocks(d, file, st).await?;
        file.flush().await?;
        d.l2_epoch.fetch_add(1, SeqCst);
        let words = (cs / 8) as usize;
        d.l2_cache
            .insert_written(new, std::sync::Arc::from(vec![0u64; words]));
        Self::set_l1_entry(d, file, l1_idx, new | COPIED).await?;
        Ok((new, idx))
    }

    /// Copies the L2 table at `old` (referenced `rc` times: shared with
    /// snapshots) for the active L1 entry `l1_idx` alone (QEMU's COW of
    /// L2 tables). The copy and its refcount are durable before the L1
    /// entry points at it, and the L1 entry before the old table loses
    /// its reference. Clusters the copy maps stay shared: the number of
    /// tables mapping them does not change, and their COPIED flags stay
    /// clear.
    async fn copy_l2(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        l1_idx: usize,
        old: u64,
        rc: u64,
    ) -> Result<u64> {
        let cs = d.header().cluster_size();
        let step = if d.layout().extended_l2 { 2 } else { 1 };
        let mut copy = d.l2_table(file, old).await?.to_vec();
        for w in copy.iter_mut().step_by(step) {
            *w &= !COPIED;
        }
        let new = Self::alloc(d, file, st).await?;
        file.debug_event(DebugEvent::L2AllocWrite).await;
        grow(file, new + cs);
        let raw: Vec<u8> = copy.iter().flat_map(|w| w.to_be_bytes()).collect();
        file.write(new, IoBytes::copy_from(&raw), WriteFlags::default())
            .await?;
        Self::write_refblocks(d, file, st).await?;
        file.flush().await?;
        d.l2_epoch.fetch_add(1, SeqCst);
        d.l2_cache.insert_written(new, std::sync::Arc::from(copy));
        Self::set_l1_entry(d, file, l1_idx, new | COPIED).await?;
        file.flush().await?;
        Self::set_refcount(d, file, st, old, rc - 1).await?;
        Ok(new)
    }

    async fn set_l1_entry(d: &Qcow2Driver, file: &Node, l1_idx: usize, val: u64) -> Result<()> {
        file.debug_event(DebugEvent::L1Update).await;
        file.write(
            d.header().l1_table_offset + l1_idx as u64 * 8,
            IoBytes::copy_from(&val.to_be_bytes()),
            WriteFlags::default(),
        )
        .await?;
        d.l1.write()[l1_idx] = val;
        Ok(())
    }

    fn decode(d: &Qcow2Driver, word: u64, guest: u64) -> Result<L2Entry> {
        d.layout()
            .decode(word)
            .map_err(|e| corrupt(d.name(), format!("{e} at guest offset {guest:#x}")))
    }

    /// Writes `bytes` at `within` of the guest cluster at `guest`.
    #[allow(clippy::too_many_arguments)]
    async fn write_cluster(
        d: &Qcow2Driver,
        node: &Node,
        file: &Node,
        st: &mut State,
        guest: u64,
        within: usize,
        bytes: IoBytes,
        copy_on_read: bool,
        pending: &mut Vec<Pending>,
    ) -> Result<()> {
        if d.layout().extended_l2 {
            return Self::write_cluster_ext(
                d,
                node,
                file,
                st,
                guest,
                within,
                bytes,
                copy_on_read,
                pending,
            )
            .await;
        }
        let dnode = d.data_node(node)?;
        let (l2_off, idx) = Self::l2_for_write(d, file, st, guest).await?;
        let word = d.l2_table(file, l2_off).await?[idx];
        let entry = Self::decode(d, word, guest)?;
        if copy_on_read && entry != L2Entry::Unallocated {
            return Ok(());
        }
        if let L2Entry::Normal { host } = entry {
            if word & COPIED != 0 {
                file.debug_event(DebugEvent::WriteAio).await;
                return dnode
                    .write(host + within as u64, bytes, WriteFlags::default())
                    .await;
            }
        }
        // A new cluster: what the cluster showed, with the new bytes over it.
        let buf = Self::cow_buffer(d, node, file, guest, entry, within, &bytes).await?;
        let new = Self::alloc_data(d, file, &dnode, st, guest).await?;
        file.debug_event(DebugEvent::CowWrite).await;
        dnode
            .write(new, buf.freeze(), WriteFlags::default())
            .await?;
        pending.push(Pending {
            l2_off,
            idx,
            entry: new | COPIED,
            bitmap: None,
            old: entry,
        });
        Ok(())
    }

    /// A new cluster's contents: what the guest cluster at `guest` showed
    /// (its entry `entry`), with `bytes` over it at `within`.
    async fn cow_buffer(
        d: &Qcow2Driver,
        node: &Node,
        file: &Node,
        guest: u64,
        entry: L2Entry,
        within: usize,
        bytes: &[u8],
    ) -> Result<IoBuf> {
        let cs = d.header().cluster_size();
        let mut buf = IoBuf::zeroed(cs as usize);
        if bytes.len() < cs as usize {
            match entry {
                L2Entry::Normal { host } => {
                    file.debug_event(DebugEvent::CowRead).await;
                    read_clipped(&*d.data_node(node)?, host, buf.as_read_buf()).await?;
                }
                L2Entry::Compressed { host, len } => {
                    buf = d.read_compressed(file, host, len, guest).await?;
                }
                L2Entry::Zero { .. } => {}
                L2Entry::Unallocated => {
                    file.debug_event(DebugEvent::CowRead).await;
                    let visible = cs.min(node.size() - guest) as usize;
                    d.read_backing(node, guest, buf.as_read_buf().slice(0..visible))
                        .await?;
                }
            }
        }
        buf[within..within + bytes.len()].copy_from_slice(bytes);
        Ok(buf)
    }

    /// [`Self::write_cluster`] with extended L2 entries: only the
    /// subclusters the write touches are allocated; the edges of the write
    /// are filled from what those subclusters showed before.
    #[allow(clippy::too_many_arguments)]
    async fn write_cluster_ext(
        d: &Qcow2Driver,
        node: &Node,
        file: &Node,
        st: &mut State,
        guest: u64,
        within: usize,
        bytes: IoBytes,
        copy_on_read: bool,
        pending: &mut Vec<Pending>,
    ) -> Result<()> {
        let cs = d.header().cluster_size() as usize;
        let sc_bits = d.header().cluster_bits - 5;
        let scs = 1usize << sc_bits;
        let n = bytes.len();
        let dnode = d.data_node(node)?;
        let (l2_off, idx) = Self::l2_for_write(d, file, st, guest).await?;
        let t = d.l2_table(file, l2_off).await?;
        let (word, bitmap) = (t[2 * idx], t[2 * idx + 1]);
        drop(t);
        let entry = Self::decode(d, word, guest)?;
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        let first = within >> sc_bits;
        let last = (within + n - 1) >> sc_bits;
        let mask = (((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1)) as u32;
        if copy_on_read
            && (matches!(entry, L2Entry::Compressed { .. }) || (alloc | zero) & mask != 0)
        {
            return Ok(());
        }
        if let L2Entry::Compressed { host, len } = entry {
            let mut buf = d.read_compressed(file, host, len, guest).await?;
            buf[within..within + n].copy_from_slice(&bytes);
            let new = Self::alloc_data(d, file, &dnode, st, guest).await?;
            file.debug_event(DebugEvent::CowWrite).await;
            dnode
                .write(new, buf.freeze(), WriteFlags::default())
                .await?;
            pending.push(Pending {
                l2_off,
                idx,
                entry: new | COPIED,
                bitmap: Some(0xffff_ffff),
                old: entry,
            });
            return Ok(());
        }
        let host = match entry {
            L2Entry::Normal { host } => Some(host),
            _ => None,
        };
        // A cluster shared with a snapshot is never written: the write
        // goes to a copy of it.
        let shared = host.is_some() && word & COPIED == 0;
        if host.is_none() && alloc != 0 {
            return Err(corrupt(
                d.name(),
                format!("subclusters allocated at guest offset {guest:#x} in a cluster without a host offset"),
            ));
        }
        if let Some(h) = host.filter(|_| !shared) {
            if alloc & mask == mask {
                file.debug_event(DebugEvent::WriteAio).await;
                return dnode
                    .write(h + within as u64, bytes, WriteFlags::default())
                    .await;
            }
        }
        // Whole subclusters: the edges the write covers only in part keep
        // what they showed.
        let rs = first << sc_bits;
        let re = (last + 1) << sc_bits;
        let mut buf = IoBuf::zeroed(re - rs);
        let mut edges = vec![first];
        if last != first {
            edges.push(last);
        }
        for sc in edges {
            let s0 = sc << sc_bits;
            let s1 = s0 + scs;
            if within <= s0 && within + n >= s1 {
                continue;
            }
            let dst = buf.as_read_buf().slice(s0 - rs..s1 - rs);
            if (alloc >> sc) & 1 == 1 {
                read_clipped(&dnode, host.expect("checked") + s0 as u64, dst).await?;
            } else if (zero >> sc) & 1 == 0 {
                let g = guest + s0 as u64;
                let visible = (scs as u64).min(node.size().saturating_sub(g)) as usize;
                if visible > 0 {
                    file.debug_event(DebugEvent::CowRead).await;
                    d.read_backing(node, g, dst.slice(0..visible)).await?;
                }
            }
        }
        buf[within - rs..within - rs + n].copy_from_slice(&bytes);
        let new_bitmap = u64::from(alloc | mask) | (u64::from(zero & !mask) << 32);
        match host {
            Some(h) if !shared => {
                file.debug_event(DebugEvent::WriteAio).await;
                dnode
                    .write(h + rs as u64, buf.freeze(), WriteFlags::default())
                    .await?;
                // The bitmap exposes the data just written: it waits for
                // a flush like a new cluster's entry.
                Self::l2_depends_on_refcounts(d, file, st).await?;
                Self::set_l2_words(d, file, st, l2_off, 2 * idx + 1, &[new_bitmap]).await?;
            }
            // A new cluster: a copy of the shared one, or fresh.
            _ => {
                let new = Self::alloc_data(d, file, &dnode, st, guest).await?;
                let mut full = IoBuf::zeroed(cs);
                if let Some(h) = host {
                    file.debug_event(DebugEvent::CowRead).await;
                    read_clipped(&dnode, h, full.as_read_buf()).await?;
                }
                full[rs..re].copy_from_slice(&buf);
                let event = if host.is_some() {
                    DebugEvent::CowWrite
                } else {
                    DebugEvent::WriteAio
                };
                file.debug_event(event).await;
                dnode
                    .write(new, full.freeze(), WriteFlags::default())
                    .await?;
                pending.push(Pending {
                    l2_off,
                    idx,
                    entry: new | COPIED,
                    bitmap: Some(new_bitmap),
                    old: entry,
                });
            }
        }
        Ok(())
    }

    /// Sets the zero bits (and clears the allocation bits) of the
    /// subclusters `mask` of the cluster at `guest`.
    async fn zero_subclusters(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        guest: u64,
        mask: u32,
    ) -> Result<()> {
        let (l2_off, idx) = Self::l2_for_write(d, file, st, guest).await?;
        let bitmap = d.l2_table(file, l2_off).await?[2 * idx + 1];
        let alloc = bitmap as u32 & !mask;
        let zero = (bitmap >> 32) as u32 | mask;
        let new = u64::from(alloc) | (u64::from(zero) << 32);
        if new != bitmap {
            Self::set_l2_words(d, file, st, l2_off, 2 * idx + 1, &[new]).await?;
        }
        Ok(())
    }

    /// Publishes new clusters (written already): the cached L2 entries
    /// point at them, and no dirty L2 table is written back before their
    /// refcounts and contents are flushed; what the entries used before
    /// is queued for freeing.
    async fn publish(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        pending: Vec<Pending>,
        to_free: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        Self::l2_depends_on_refcounts(d, file, st).await?;
        let cs = d.header().cluster_size();
        for p in pending {
            let words = match p.bitmap {
                Some(b) => vec![p.entry, b],
                None => vec![p.entry],
            };
            let at = if p.bitmap.is_some() { 2 * p.idx } else { p.idx };
            Self::set_l2_words_mem(d, file, p.l2_off, at, &words).await?;
            Self::release(d, p.old, cs, to_free);
        }
        Self::bound_dirty_l2(d, file, st).await
    }

    /// Where each cluster piece of `[offset, offset + len)` lies, if every
    /// one is a normal cluster with refcount one (writable in place).
    async fn in_place(
        d: &Qcow2Driver,
        file: &Node,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, usize)>>> {
        let h = d.header();
        let cb = h.cluster_bits;
        let cs = h.cluster_size();
        let l2_bits = h.l2_bits();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let within = pos % cs;
            let n = (cs - within).min(offset + len - pos);
            let l1_idx = (pos >> (cb + l2_bits)) as usize;
            let l1e = d.l1.read().get(l1_idx).copied().unwrap_or(0);
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 || l1e & COPIED == 0 || !l2_off.is_multiple_of(cs) {
                return Ok(None);
            }
            let idx = ((pos >> cb) & ((1u64 << l2_bits) - 1)) as usize;
            let t = d.l2_table(file, l2_off).await?;
            let ext = d.layout().extended_l2;
            let word = if ext { t[2 * idx] } else { t[idx] };
            if ext {
                let sc_bits = cb - 5;
                let first = within >> sc_bits;
                let last = (within + n - 1) >> sc_bits;
                let mask = (((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1)) as u32;
                if (t[2 * idx + 1] as u32) & mask != mask {
                    return Ok(None);
                }
            }
            match Self::decode(d, word, pos - within)? {
                L2Entry::Normal { host } if word & COPIED != 0 => {
                    // Clusters that follow each other in the file go out
                    // as one write.
                    match out.last_mut() {
                        Some((at, len)) if *at + *len as u64 == host + within => *len += n as usize,
                        _ => out.push((host + within, n as usize)),
                    }
                }
                _ => return Ok(None),
            }
            pos += n;
        }
        Ok(Some(out))
    }

    /// Remembers the clusters `entry` used, to free once it is replaced
    /// (clusters of an external data file have no refcounts).
    fn release(d: &Qcow2Driver, entry: L2Entry, cs: u64, to_free: &mut Vec<(u64, u64)>) {
        if d.layout().data_file {
            return;
        }
        match entry {
            L2Entry::Normal { host } | L2Entry::Zero { host: Some(host) } => {
                to_free.push((host, cs))
            }
            L2Entry::Compressed { host, len } => to_free.push((host, len)),
            L2Entry::Zero { host: None } | L2Entry::Unallocated => {}
        }
    }

    /// Points the whole guest cluster at `guest` to `new_entry` (zero or
    /// unallocated), freeing what it used.
    async fn unmap_cluster(
        d: &Qcow2Driver,
        file: &Node,
        st: &mut State,
        guest: u64,
        new_entry: u64,
        to_free: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let (l2_off, idx) = Self::l2_for_write(d, file, st, guest).await?;
        let t = d.l2_table(file, l2_off).await?;
        let (word, bitmap) = if d.layout().extended_l2 {
            (t[2 * idx], t[2 * idx + 1])
        } else {
            (t[idx], 0)
        };
        // Not held while the cached table changes (that would copy it).
        drop(t);
        if d.layout().extended_l2 {
            // Every subcluster reads as zeroes; the host cluster goes.
            let words = [0, ALL_ZERO];
            if [word, bitmap] == words {
                return Ok(());
            }
            let entry = Self::decode(d, word, guest)?;
            Self::set_l2_words(d, file, st, l2_off, 2 * idx, &words).await?;
            Self::release(d, entry, d.header().cluster_size(), to_free);
            return Ok(());
        }
        if word == new_entry {
            return Ok(());
        }
        let entry = Self::decode(d, word, guest)?;
        Self::set_l2_entry(d, file, st, l2_off, idx, new_entry).await?;
        Self::release(d, entry, d.header().cluster_size(), to_free);
        Ok(())
    }

    /// The largest refcount an entry of this image holds.
    fn refcount_max(d: &Qcow2Driver) -> u64 {
        match d.header().refcount_order {
            o if o >= 6 => u64::MAX,
            o => (1u64 << (1u32 << o)) - 1,
        }
    }

    /// Allocates `size` bytes (at most a cluster) for compressed data
    /// (QEMU's `qcow2_alloc_bytes`): right after the bytes packed last,
    /// when they fit in the rest of that host cluster or run on into a
    /// new cluster that follows it; else at the start of a new cluster.
    /// Every host cluster the bytes touch gains one reference, so a
    /// host cluster's refcount is the number of compressed clusters in
    /// it, and it is free once they all are.
    async fn alloc_bytes(d: &Qcow2Driver, file: &Node, st: &mut State, size: u64) -> Result<u64> {
        let cs = d.header().cluster_size();
        if size == 0 || size > cs {
            return Err(Error::Other(format!(
                "{}: internal error: {size} bytes of compressed data for {cs}-byte clusters",
                d.name()
            )));
        }
        file.debug_event(DebugEvent::ClusterAllocBytes).await;
        let mut off = st.free_byte;
        if off != 0 {
            let rc = Self::refcount(d, file, st, off).await?;
            if rc == 0 || rc >= Self::refcount_max(d) {
                off = 0;
            }
        }
        let start = if off != 0 && cs - off % cs >= size {
            off
        } else {
            let new = Self::alloc(d, file, st).await?;
            // Freeing (of quarantined clusters) may have emptied the old
            // cluster meanwhile: then nothing is packed into it.
            if off != 0 && st.free_byte == off && new == off.next_multiple_of(cs) {
                off
            } else {
                new
            }
        };
        if off != 0 && start == off {
            // Read again: freeing during `alloc` may have changed it.
            let rc = Self::refcount(d, file, st, off).await?;
            Self::set_refcount(d, file, st, off, rc + 1).await?;
        }
        st.free_byte = if (start + size).is_multiple_of(cs) {
            0
        } else {
            start + size
        };
        grow(file, start + size);
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (refcount 1 each) at the end of
    /// the file.
    async fn alloc_run(d: &Qcow2Driver, file: &Node, st: &mut State, n: u64) -> Result<u64> {
        let cs = d.header().cluster_size();
        Self::release_quarantine(d, file, st).await?;
        let mut run: Vec<u64> = Vec::new();
        let mut gave_back = u64::MAX;
        while (run.len() as u64) < n.max(1) {
            let c = Self::alloc_end(d, file, st).await?;
            if run.last().is_some_and(|&l| c != l + cs) {
                // A refcount block (or a moved refcount table) came in
                // between: the run starts over after it, and what it
                // held is free again (nothing points at it).
                for r in run.drain(..) {
                    Self::set_refcount(d, file, st, r, 0).await?;
                    gave_back = gave_back.min(r);
                }
            }
            run.push(c);
        }
        st.free_cursor = st.free_cursor.min(gave_back);
        Ok(run[0])
    }

    /// Allocates `len` bytes for the compressed stream of the guest
    /// cluster at `guest`, which must have no host cluster yet (QEMU:
    /// "Compression can't overwrite anything"; unallocated, or zero
    /// without preallocation). Write the stream at the slot's `host`,
    /// then [`Writer::publish_compressed`] it.
    pub(crate) async fn alloc_compressed(
        &self,
        d: &Qcow2Driver,
        node: &Node,
        guest: u64,
        len: u64,
    ) -> Result<CompressedSlot<'_>> {
        let file = d.file(node)?;
        let (mut st, l2_off, idx) = self.lock_cluster(d, &file, guest).await?;
        let step = if d.layout().extended_l2 { 2 } else { 1 };
        let word = d.l2_table(&file, l2_off).await?[step * idx];
        let old = Self::decode(d, word, guest)?;
        if !matches!(old, L2Entry::Unallocated | L2Entry::Zero { host: None }) {
            return Err(Error::InvalidRequest {
                node: node.name().to_string(),
                reason: format!(
                    "Compression can't overwrite anything: the cluster at guest offset {guest:#x} is already allocated"
                ),
            });
        }
        let host = Self::alloc_bytes(d, &file, &mut st, len).await?;
        self.inflight.lock().insert(guest);
        Ok(CompressedSlot {
            host,
            l2_off,
            idx,
            old,
            _guard: InflightGuard {
                w: self,
                guests: vec![guest],
            },
        })
    }

    /// Publishes a compressed cluster whose stream is written: its L2
    /// entry becomes `entry` (with an empty subcluster bitmap where
    /// entries are extended) in the cached table, which is written back
    /// only after the refcounts and the stream are flushed (rule 2), so
    /// the entry never points at unwritten or unreferenced bytes.
    pub(crate) async fn publish_compressed(
        &self,
        d: &Qcow2Driver,
        file: &Node,
        slot: CompressedSlot<'_>,
        entry: u64,
    ) -> Result<()> {
        let mut st = self.state.lock().await;
        let pending = vec![Pending {
            l2_off: slot.l2_off,
            idx: slot.idx,
            entry,
            bitmap: d.layout().extended_l2.then_some(0),
            old: slot.old,
        }];
        let mut to_free = Vec::new();
        let res = Self::publish(d, file, &mut st, pending, &mut to_free).await;
        drop(slot);
        res?;
        Self::free_all(d, file, &mut st, to_free).await
    }

    /// Moves the active L1 table to new contiguous clusters, grown to
    /// `new_len` entries, and publishes it and the virtual size `size`
    /// in one header write ([`crate::resize::write_header_size`]). The
    /// new table and its refcounts are durable before the header points
    /// at it; the old table is freed only once the header is durable (a
    /// crash in between leaks it, nothing worse). The node is drained.
    pub(crate) async fn move_l1(
        &self,
        d: &Qcow2Driver,
        file: &Node,
        new_len: u64,
        size: u64,
    ) -> Result<()> {
        let mut st = self.state.lock().await;
        let h = d.header().clone();
        let cs = h.cluster_size();
        let clusters = (new_len * 8).div_ceil(cs);
        file.debug_event(DebugEvent::L1GrowAllocTable).await;
        let new_off = Self::alloc_run(d, file, &mut st, clusters).await?;
        let mut table = d.l1.read().clone();
        table.resize(new_len as usize, 0);
        let mut raw = vec![0u8; (clusters * cs) as usize];
        for (chunk, e) in raw.chunks_exact_mut(8).zip(&table) {
            chunk.copy_from_slice(&e.to_be_bytes());
        }
        file.debug_event(DebugEvent::L1GrowWriteTable).await;
        grow(file, new_off + clusters * cs);
        file.write(new_off, IoBytes::copy_from(&raw), WriteFlags::default())
            .await?;
        Self::write_refblocks(d, file, &mut st).await?;
        file.flush().await?;
        file.debug_event(DebugEvent::L1GrowActivateTable).await;
        crate::resize::write_header_size(d, file, size, new_len as u32, new_off).await?;
        *d.l1.write() = table;
        if h.l1_size > 0 {
            Self::drop_refs(
                d,
                file,
                &mut st,
                h.l1_table_offset,
                u64::from(h.l1_size) * 8,
            )
            .await?;
        }
        Ok(())
    }

    /// The refcount and table machinery under the state lock, for a
    /// whole-image metadata operation (internal snapshots). The caller
    /// has the node drained (or owns the image alone): no lock-free write
    /// is in flight, so freed clusters need no quarantine.
    pub(crate) async fn meta<'a>(&'a self, d: &'a Qcow2Driver, file: &'a Node) -> Result<Meta<'a>> {
        let mut st = self.state.lock().await;
        Self::prepare(d, file, &mut st).await?;
        self.prepared.store(true, SeqCst);
        Ok(Meta { d, file, st })
    }

    /// Preallocates every guest cluster of `[start, end)` (`start`
    /// cluster aligned) that has no host cluster (QEMU's
    /// `preallocate_co`), one L2 table at a time: the table, then data
    /// clusters one after another at the end of the file, which is
    /// extended over them with the file driver's `file_prealloc` (`off`:
    /// sparse; `falloc`; `full`) before the entries map them, so they
    /// read as zeroes and never lie past the end of the file. The entries
    /// are published as new clusters are (rule 2). The node is drained.
    pub(crate) async fn preallocate(
        &self,
        d: &Qcow2Driver,
        node: &Node,
        start: u64,
        end: u64,
        file_prealloc: &str,
    ) -> Result<()> {
        let file = d.file(node)?;
        let cs = d.header().cluster_size();
        let span = cs << d.header().l2_bits();
        let ext = d.layout().extended_l2;
        let mut st = self.state.lock().await;
        Self::prepare(d, &file, &mut st).await?;
        self.prepared.store(true, SeqCst);
        let mut to_free = Vec::new();
        let mut g = start;
        while g < end {
            let table_end = ((g / span + 1) * span).min(end);
            let mut pending = Vec::new();
            let mut runs: Vec<(u64, u64)> = Vec::new();
            while g < table_end {
                let (l2_off, idx) = Self::l2_for_write(d, &file, &mut st, g).await?;
                let word = d.l2_table(&file, l2_off).await?[if ext { 2 * idx } else { idx }];
                let old = Self::decode(d, word, g)?;
                if matches!(old, L2Entry::Unallocated | L2Entry::Zero { host: None }) {
                    let host = Self::alloc_end(d, &file, &mut st).await?;
                    match runs.last_mut() {
                        Some((s, n)) if *s + *n == host => *n += cs,
                        _ => runs.push((host, cs)),
                    }
                    pending.push(Pending {
                        l2_off,
                        idx,
                        entry: host | COPIED,
                        bitmap: ext.then_some(0xffff_ffff),
                        old,
                    });
                }
                g += cs;
            }
            Self::extend_over(&file, &runs, file_prealloc).await?;
            Self::publish(d, &file, &mut st, pending, &mut to_free).await?;
        }
        Self::free_all(d, &file, &mut st, to_free).await?;
        Self::write_back(d, &file, &mut st, true).await
    }

    /// Makes the new, never written clusters `runs` (offset, length) part
    /// of the file, preallocated as `file_prealloc` says: the file is
    /// extended over the last; runs that a refcount block written after
    /// them left inside the file are holes, preallocated in place.
    async fn extend_over(file: &Node, runs: &[(u64, u64)], file_prealloc: &str) -> Result<()> {
        let file_end = file.size();
        if file_prealloc != "off" {
            for &(s, n) in runs.iter().filter(|&&(s, _)| s < file_end) {
                file.write_zeroes(s, n.min(file_end - s), ZeroFlags::default())
                    .await?;
            }
        }
        let data_end = runs.last().map_or(0, |&(s, n)| s + n);
        if data_end <= file_end {
            return Ok(());
        }
        match crate::create::truncate_file(file, data_end, file_prealloc).await {
            // A protocol that cannot resize grows as it is written.
            Err(Error::NotSupported { .. }) if file_prealloc == "off" => {
                let (s, n) = *runs.last().expect("data_end > 0");
                grow(file, data_end);
                file.write_zeroes(s, n, ZeroFlags::default()).await
            }
            other => other,
        }
    }

    pub async fn write(
        &self,
        d: &Qcow2Driver,
        node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        let file = d.file(node)?;
        let cs = d.header().cluster_size();
        let len = data.len() as u64;
        // Overwrites of clusters this image alone owns need no metadata
        // change and no lock. A cluster freed meanwhile (a racing discard)
        // is not reused before this write ends: it only loses the write.
        if !flags.copy_on_read && self.prepared.load(SeqCst) {
            let ticket = Ticket::take(&self.tickets);
            if let Some(hosts) = Self::in_place(d, &file, offset, len).await? {
                let dnode = d.data_node(node)?;
                let mut done = 0usize;
                for (host, n) in hosts {
                    file.debug_event(DebugEvent::WriteAio).await;
                    dnode
                        .write(host, data.slice(done..done + n), WriteFlags::default())
                        .await?;
                    done += n;
                }
                drop(ticket);
                if flags.fua {
                    // The mapping may still be in a dirty L2 table.
                    Self::flush_data(d, node).await?;
                    self.flush(d, &file, false).await?;
                }
                return Ok(());
            }
        }
        if !d.layout().extended_l2 {
            return self.write_alloc(d, node, &file, offset, data, flags).await;
        }
        let mut st = self.lock_range(offset, len, cs).await;
        Self::prepare(d, &file, &mut st).await?;
        self.prepared.store(true, SeqCst);
        let mut to_free = Vec::new();
        let mut pending = Vec::new();
        let mut done = 0u64;
        let mut res = Ok(());
        while done < len {
            let pos = offset + done;
            let within = pos % cs;
            let n = (cs - within).min(len - done);
            let piece = data.slice(done as usize..(done + n) as usize);
            res = Self::write_cluster(
                d,
                node,
                &file,
                &mut st,
                pos - within,
                within as usize,
                piece,
                flags.copy_on_read,
                &mut pending,
            )
            .await;
            if res.is_err() {
                break;
            }
            done += n;
        }
        // Clusters already written are published even when a later piece
        // failed: their refcounts are taken.
        Self::publish(d, &file, &mut st, pending, &mut to_free).await?;
        Self::free_all(d, &file, &mut st, to_free).await?;
        res?;
        if flags.fua {
            Self::flush_data(d, node).await?;
            Self::write_back(d, &file, &mut st, true).await?;
        }
        Ok(())
    }

    /// An allocating write in two phases, as QEMU does it: under the
    /// state lock the clusters are mapped and new ones allocated; the data
    /// (with what partial clusters showed before) is written without the
    /// lock, so allocating writes run in parallel; then, under the lock
    /// again, the new clusters are published in the cached L2 tables.
    /// Guest clusters being allocated are in `inflight`: other requests
    /// touching them wait.
    async fn write_alloc(
        &self,
        d: &Qcow2Driver,
        node: &Node,
        file: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        let cs = d.header().cluster_size();
        let len = data.len() as u64;
        let dnode = d.data_node(node)?;
        let mut plan = Vec::new();
        let mut guard = InflightGuard {
            w: self,
            guests: Vec::new(),
        };
        // In-place pieces are written without the lock: their clusters
        // are not reused before they are done.
        let ticket;
        {
            let mut st = self.lock_range(offset, len, cs).await;
            ticket = Ticket::take(&self.tickets);
            Self::prepare(d, file, &mut st).await?;
            self.prepared.store(true, SeqCst);
            let mut done = 0u64;
            while done < len {
                let pos = offset + done;
                let within = pos % cs;
                let guest = pos - within;
                let n = (cs - within).min(len - done) as usize;
                let at = done as usize;
                let (l2_off, idx) = Self::l2_for_write(d, file, &mut st, guest).await?;
                let word = d.l2_table(file, l2_off).await?[idx];
                let entry = Self::decode(d, word, guest)?;
                match entry {
                    L2Entry::Normal { host } if word & COPIED != 0 && !flags.copy_on_read => plan
                        .push(Piece::InPlace {
                            host: host + within,
                            at,
                            n,
                        }),
                    // A copy-on-read write fills only what the image does
                    // not hold yet: a guest write may have got there first.
                    _ if flags.copy_on_read && entry != L2Entry::Unallocated => {}
                    old => {
                        // A cluster's refcount may reach the file before
                        // its entry does (a leak at worst), never after.
                        let host = Self::alloc_data(d, file, &dnode, &mut st, guest).await?;
                        plan.push(Piece::New {
                            guest,
                            host,
                            within: within as usize,
                            at,
                            n,
                            old,
                            l2_off,
                            idx,
                        });
                    }
                }
                done += n as u64;
            }
            let mut set = self.inflight.lock();
            for p in &plan {
                if let Piece::New { guest, .. } = p {
                    set.insert(*guest);
                    guard.guests.push(*guest);
                }
            }
        }
        // The data, without the lock; runs of whole new clusters that lie
        // one after another in the file go in one write.
        let mut written = 0;
        let mut res = Ok(());
        while written < plan.len() {
            let (step, r) = match plan[written] {
                Piece::InPlace { host, at, n } => {
                    // Neighbours in the request and in the file: one write.
                    let (mut k, mut len) = (1, n);
                    while let Some(Piece::InPlace {
                        host: h,
                        at: a,
                        n: m,
                    }) = plan.get(written + k)
                    {
                        if *h != host + len as u64 || *a != at + len {
                            break;
                        }
                        len += m;
                        k += 1;
                    }
                    file.debug_event(DebugEvent::WriteAio).await;
                    let r = dnode
                        .write(host, data.slice(at..at + len), WriteFlags::default())
                        .await;
                    (k, r)
                }
                Piece::New { host, at, n, .. } if n as u64 == cs => {
                    let mut k = 1;
                    while let Some(Piece::New {
                        host: h,
                        at: a,
                        n: m,
                        ..
                    }) = plan.get(written + k)
                    {
                        // Whole clusters next to each other both in the
                        // file and in the request (a copy-on-read write
                        // skips clusters already there).
                        if *m as u64 != cs || *h != host + k as u64 * cs || *a != at + k * n {
                            break;
                        }
                        k += 1;
                    }
                    file.debug_event(DebugEvent::CowWrite).await;
                    let r = dnode
                        .write(host, data.slice(at..at + k * n), WriteFlags::default())
                        .await;
                    (k, r)
                }
                Piece::New {
                    guest,
                    host,
                    within,
                    at,
                    n,
                    old,
                    ..
                } => {
                    let bytes = data.slice(at..at + n);
                    let r = match Self::cow_buffer(d, node, file, guest, old, within, &bytes).await
                    {
                        Ok(buf) => {
                            file.debug_event(DebugEvent::CowWrite).await;
                            dnode.write(host, buf.freeze(), WriteFlags::default()).await
                        }
                        Err(e) => Err(e),
                    };
                    (1, r)
                }
            };
            if r.is_err() {
                res = r;
                break;
            }
            written += step;
        }
        drop(ticket);
        // Publish what was written (a cluster whose data failed only
        // leaks), then let waiters on these clusters go.
        let mut st = self.state.lock().await;
        let pending: Vec<Pending> = plan[..written]
            .iter()
            .filter_map(|p| match *p {
                Piece::New {
                    host,
                    old,
                    l2_off,
                    idx,
                    ..
                } => Some(Pending {
                    l2_off,
                    idx,
                    entry: host | COPIED,
                    bitmap: None,
                    old,
                }),
                Piece::InPlace { .. } => None,
            })
            .collect();
        let mut to_free = Vec::new();
        let published = Self::publish(d, file, &mut st, pending, &mut to_free).await;
        drop(guard);
        published?;
        Self::free_all(d, file, &mut st, to_free).await?;
        res?;
        if flags.fua {
            Self::flush_data(d, node).await?;
            Self::write_back(d, file, &mut st, true).await?;
        }
        Ok(())
    }

    pub async fn write_zeroes(
        &self,
        d: &Qcow2Driver,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        if d.header().version < 3 {
            return Err(Error::NotSupported {
                node: node.name().to_string(),
                driver: "qcow2",
                what: "zero clusters in a version 2 image",
            });
        }
        self.unmap_range(d, node, offset, len, ZERO_FLAG, true)
            .await?;
        if Self::data_file_raw(d) {
            // The data file stays a raw image of the disk.
            let dnode = d.data_node(node)?;
            grow(&dnode, offset + len);
            dnode
                .write_zeroes(offset, len, ZeroFlags::default())
                .await?;
        }
        if flags.fua {
            Self::flush_data(d, node).await?;
            self.flush(d, &*d.file(node)?, false).await?;
        }
        Ok(())
    }

    pub async fn discard(&self, d: &Qcow2Driver, node: &Node, offset: u64, len: u64) -> Result<()> {
        // As QEMU: version 3 discarded clusters read as zeroes; version 2
        // ones become unallocated, unless a backing file would show
        // through (discard is advisory: then nothing changes). A raw data
        // file would no longer show the disk: nothing changes either.
        if Self::data_file_raw(d) {
            Ok(())
        } else if d.header().version >= 3 {
            self.unmap_range(d, node, offset, len, ZERO_FLAG, false)
                .await
        } else if node.child(sluice_core::Role::Backing).is_some() {
            Ok(())
        } else {
            self.unmap_range(d, node, offset, len, 0, false).await
        }
    }

    /// Zeroes `[within, within + n)` of the cluster at `guest` with
    /// extended L2 entries: whole subclusters by their zero bits, the
    /// edges by writing zeroes.
    #[allow(clippy::too_many_arguments)]
    async fn zero_partial_ext(
        &self,
        d: &Qcow2Driver,
        node: &Node,
        file: &Node,
        st: &mut State,
        guest: u64,
        within: u64,
        n: u64,
        pending: &mut Vec<Pending>,
        to_free: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let scs = 1u64 << (d.header().cluster_bits - 5);
        let a = within.div_ceil(scs) * scs;
        let b = (within + n) / scs * scs;
        let mut pieces = Vec::new();
        // A compressed cluster has no subclusters: it is rewritten whole.
        let (l2_off, idx) = Self::l2_for_write(d, file, st, guest).await?;
        let word = d.l2_table(file, l2_off).await?[2 * idx];
        let compressed = matches!(Self::decode(d, word, guest)?, L2Entry::Compressed { .. });
        if a < b && !compressed {
            let m = (((1u64 << (b / scs)) - 1) & !((1u64 << (a / scs)) - 1)) as u32;
            Self::zero_subclusters(d, file, st, guest, m).await?;
            if within < a {
                pieces.push((within, a - within));
            }
            if b < within + n {
                pieces.push((b, within + n - b));
            }
        } else {
            pieces.push((within, n));
        }
        for (at, len) in pieces {
            let zeroes = IoBuf::zeroed(len as usize).freeze();
            Self::write_cluster(
                d,
                node,
                file,
                st,
                guest,
                at as usize,
                zeroes,
                false,
                pending,
            )
            .await?;
            // A cluster allocated for the head must be published before
            // the tail looks at the same entry.
            Self::publish(d, file, st, std::mem::take(pending), to_free).await?;
        }
        Ok(())
    }

    /// Sets every whole cluster of the range to `new_entry`; partial
    /// clusters get written zeroes when `zero_partial`, else stay.
    async fn unmap_range(
        &self,
        d: &Qcow2Driver,
        node: &Node,
        offset: u64,
        len: u64,
        new_entry: u64,
        zero_partial: bool,
    ) -> Result<()> {
        let file = d.file(node)?;
        let cs = d.header().cluster_size();
        let mut st = self.lock_range(offset, len, cs).await;
        Self::prepare(d, &file, &mut st).await?;
        let mut to_free = Vec::new();
        let mut pending = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        let mut res = Ok(());
        while pos < end {
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            let guest = pos - within;
            // The last cluster of a disk whose size is not cluster aligned
            // is whole when the range reaches the disk's end.
            let whole = within == 0 && (n == cs || pos + n == node.size());
            let ext = d.layout().extended_l2;
            res = if whole {
                Self::unmap_cluster(d, &file, &mut st, guest, new_entry, &mut to_free).await
            } else if zero_partial && ext {
                self.zero_partial_ext(
                    d,
                    node,
                    &file,
                    &mut st,
                    guest,
                    within,
                    n,
                    &mut pending,
                    &mut to_free,
                )
                .await
            } else if zero_partial {
                let zeroes = IoBuf::zeroed(n as usize).freeze();
                Self::write_cluster(
                    d,
                    node,
                    &file,
                    &mut st,
                    guest,
                    within as usize,
                    zeroes,
                    false,
                    &mut pending,
                )
                .await
            } else {
                Ok(())
            };
            if res.is_err() {
                break;
            }
            pos += n;
        }
        Self::publish(d, &file, &mut st, pending, &mut to_free).await?;
        Self::free_all(d, &file, &mut st, to_free).await?;
        res
    }
}

/// [`Writer::meta`]: the writer's state, locked, with the operations a
/// whole-image metadata change needs (each the writer's own).
pub(crate) struct Meta<'a> {
    d: &'a Qcow2Driver,
    file: &'a Node,
    st: tokio::sync::MutexGuard<'a, State>,
}

impl Meta<'_> {
    pub(crate) async fn refcount(&mut self, off: u64) -> Result<u64> {
        Writer::refcount(self.d, self.file, &mut self.st, off).await
    }

    /// The largest refcount the image's refcount width holds.
    pub(crate) fn refcount_max(&self) -> u64 {
        Writer::refcount_max(self.d)
    }

    /// Sets the refcount of the cluster at `off` (in the refcount cache).
    pub(crate) async fn set_refcount(&mut self, off: u64, v: u64) -> Result<()> {
        Writer::set_refcount(self.d, self.file, &mut self.st, off, v).await
    }

    /// Drops one reference to every cluster of `[host, host + len)`
    /// (what nothing reachable uses any more becomes free).
    pub(crate) async fn drop_refs(&mut self, host: u64, len: u64) -> Result<()> {
        Writer::drop_refs(self.d, self.file, &mut self.st, host, len).await
    }

    /// Allocates `n` contiguous clusters (refcount 1 each): a free one
    /// inside the file when one is enough, else at the end of the file.
    pub(crate) async fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        let off = if n <= 1 {
            Writer::alloc(self.d, self.file, &mut self.st).await?
        } else {
            Writer::alloc_run(self.d, self.file, &mut self.st, n).await?
        };
        grow(self.file, off + n.max(1) * self.d.header().cluster_size());
        Ok(off)
    }

    /// Sets word `idx` of the L2 table at `l2_off` (cached, written back
    /// by [`Meta::write_back`]).
    pub(crate) async fn set_l2_word(&mut self, l2_off: u64, idx: usize, v: u64) -> Result<()> {
        Writer::set_l2_words(self.d, self.file, &mut self.st, l2_off, idx, &[v]).await
    }

    /// Makes every change so far durable: refcount blocks first, then a
    /// flush, then the L2 tables, then a flush.
    pub(crate) async fn write_back(&mut self) -> Result<()> {
        Writer::write_refblocks(self.d, self.file, &mut self.st).await?;
        self.file.flush().await?;
        Writer::write_back(self.d, self.file, &mut self.st, true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_of_every_width() {
        for order in 0..=6u32 {
            let w = 1u64 << order;
            let max = if w == 64 { u64::MAX } else { (1 << w) - 1 };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / w;
            for i in 0..n {
                rc_put(&mut block, i, order, (i * 7919) & max);
            }
            for i in 0..n {
                assert_eq!(
                    rc_get(&block, i, order),
                    (i * 7919) & max,
                    "order {order} idx {i}"
                );
            }
        }
        // 1-bit entries are least significant bit first, as QEMU packs them.
        let mut b = vec![0u8; 1];
        rc_put(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        rc_put(&mut b, 3, 0, 1);
        assert_eq!(b[0], 0b1001);
    }
}
