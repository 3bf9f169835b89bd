//! Internal snapshots, written: create, apply (revert to) and delete, and
//! a temporary read-only load (what `qemu-img convert -l` reads), with
//! the semantics of QEMU's `block/qcow2-snapshot.c`.
//!
//! A snapshot is a copy of the active L1 table plus one more reference
//! to every L2 table and cluster it reaches (QEMU counts references per
//! path: a data cluster in an L2 table that two L1 tables share has
//! refcount 2). An entry whose cluster's refcount is above one loses its
//! `COPIED` flag, so the write side copies before it writes
//! ([`crate::write`]); an entry whose refcount returns to one gets it
//! back.
//!
//! Order, for crash safety (as QEMU): refcounts are raised and made
//! durable before anything points at what they count (the snapshot table
//! at a new L1 copy, the active L1 at a snapshot's tables); the snapshot
//! table is replaced by writing a new one, then switching the header
//! (one 12-byte write of `nb_snapshots` and `snapshots_offset`), then
//! freeing the old one; references are dropped only after what held
//! them is gone from the file. A crash at any point leaks clusters at
//! worst.
//!
//! Every operation here runs on a [`Qcow2Driver`] opened read-write and
//! its image file, with nothing else using the image meanwhile (a tool's
//! own open, or a drained node). The driver's [`Qcow2Driver::snapshots`]
//! stays the list as opened: the operations read the table from the
//! file each time.

use crate::driver::{read_snapshots, read_words, Qcow2Driver};
use crate::format::{
    corrupt, L2Entry, Snapshot, COPIED, MAX_SNAPSHOTS, MAX_SNAPSHOTS_BYTES, OFFSET_MASK,
};
use crate::write::Meta;
use sluice_core::{Error, IoBytes, Node, WriteFlags};

/// Bytes of extra data QEMU writes into every snapshot table entry:
/// `vm_state_size_large`, `disk_size`, `icount`.
pub const EXTRA_WRITTEN: usize = 24;

/// Why a snapshot operation failed.
#[derive(Debug)]
pub enum SnapshotError {
    /// No snapshot matches (`ENOENT`).
    NotFound,
    /// The image cannot do it (`ENOTSUP`): it has an external data file,
    /// or it would have to resize a version 2 image with snapshots.
    NotSupported,
    /// Too many snapshots, or a snapshot table too large (`EFBIG`).
    TooBig,
    /// A refcount would overflow its width (`EINVAL`).
    RefcountOverflow,
    /// A request QEMU refuses with its own words.
    Refused(&'static str),
    /// I/O errors and corruption, naming the image.
    Block(Error),
}

impl From<Error> for SnapshotError {
    fn from(e: Error) -> Self {
        SnapshotError::Block(e)
    }
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::NotFound => f.write_str("No such file or directory"),
            SnapshotError::NotSupported => f.write_str("Operation not supported"),
            SnapshotError::TooBig => f.write_str("File too large"),
            SnapshotError::RefcountOverflow => f.write_str("Invalid argument"),
            SnapshotError::Refused(s) => f.write_str(s),
            SnapshotError::Block(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SnapshotError {}

pub type SnapshotResult<T> = std::result::Result<T, SnapshotError>;

/// The index of the first snapshot with this id and name (either may be
/// left out), as QEMU's `find_snapshot_by_id_and_name`.
pub fn find_by_id_and_name(
    snaps: &[Snapshot],
    id: Option<&str>,
    name: Option<&str>,
) -> Option<usize> {
    if id.is_none() && name.is_none() {
        return None;
    }
    snaps
        .iter()
        .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
}

/// A snapshot by id, else by name (QEMU's `find_snapshot_by_id_or_name`).
pub fn find_by_id_or_name(snaps: &[Snapshot], id_or_name: &str) -> Option<usize> {
    find_by_id_and_name(snaps, Some(id_or_name), None)
        .or_else(|| find_by_id_and_name(snaps, None, Some(id_or_name)))
}

/// C's `strtoul(s, NULL, 10)`: leading blanks, a sign, digits; 0 when
/// there are none, the largest value on overflow, a negated value
/// wrapping around.
fn strtoul(s: &str) -> u64 {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let mut v: u64 = 0;
    for b in t.bytes().take_while(u8::is_ascii_digit) {
        match v
            .checked_mul(10)
            .and_then(|x| x.checked_add(u64::from(b - b'0')))
        {
            Some(x) => v = x,
            None => return u64::MAX,
        }
    }
    if neg {
        v.wrapping_neg()
    } else {
        v
    }
}

/// The id QEMU gives a new snapshot: one more than the largest numeric
/// id (`find_new_snapshot_id`).
pub fn new_snapshot_id(snaps: &[Snapshot]) -> String {
    let max = snaps.iter().map(|s| strtoul(&s.id)).max().unwrap_or(0);
    max.wrapping_add(1).to_string()
}

/// The current time as a snapshot's date: seconds and nanoseconds (of
/// whole microseconds, as qemu-img takes it).
pub fn now() -> (u32, u32) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_secs() as u32, t.subsec_micros() * 1000)
}

/// The `icount` a snapshot's extra data holds (`u64::MAX`, QEMU's "none",
/// when it is too short to hold one).
fn icount(s: &Snapshot) -> u64 {
    match s.extra.get(16..24) {
        Some(b) => u64::from_be_bytes(b.try_into().expect("8 bytes")),
        None => u64::MAX,
    }
}

/// Serialises the snapshot table as QEMU writes it: each entry 8-byte
/// aligned, at least [`EXTRA_WRITTEN`] bytes of extra data (known fields
/// rewritten, unknown ones kept), no padding after the last entry. A
/// snapshot without a disk size gets `disk_size`.
fn encode_table(snaps: &[Snapshot], disk_size: u64) -> SnapshotResult<Vec<u8>> {
    let mut out = Vec::new();
    for s in snaps {
        out.resize(out.len().div_ceil(8) * 8, 0);
        let extra_len = s.extra.len().max(EXTRA_WRITTEN);
        let (id, name) = (s.id.as_bytes(), s.name.as_bytes());
        if id.len() > usize::from(u16::MAX) || name.len() > usize::from(u16::MAX) {
            return Err(SnapshotError::TooBig);
        }
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        // Older readers take a VM state that does not fit as none.
        let small = u32::try_from(s.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small.to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&s.vm_state_size.to_be_bytes());
        out.extend_from_slice(&s.disk_size.unwrap_or(disk_size).to_be_bytes());
        out.extend_from_slice(&icount(s).to_be_bytes());
        if s.extra.len() > EXTRA_WRITTEN {
            out.extend_from_slice(&s.extra[EXTRA_WRITTEN..]);
        }
        out.extend_from_slice(id);
        out.extend_from_slice(name);
        if out.len() as u64 > MAX_SNAPSHOTS_BYTES {
            return Err(SnapshotError::TooBig);
        }
    }
    Ok(out)
}

/// The image's snapshot table as it is in the file now, with its length.
async fn current_table(d: &Qcow2Driver, file: &Node) -> SnapshotResult<(Vec<Snapshot>, u64)> {
    Ok(read_snapshots(file, d.header(), d.name(), true).await?)
}

/// The writer, or QEMU's refusal to change a read-only image.
fn writer(d: &Qcow2Driver) -> SnapshotResult<std::sync::Arc<crate::write::Writer>> {
    d.writer
        .get()
        .ok_or(SnapshotError::Block(Error::NotSupported {
            node: d.name().to_string(),
            driver: "qcow2",
            what: "changing the snapshots of a read-only qcow2 image",
        }))
}

fn no_data_file(d: &Qcow2Driver) -> SnapshotResult<()> {
    if d.header().has_data_file() {
        return Err(SnapshotError::NotSupported);
    }
    Ok(())
}

/// Reads an L1 table of `len` entries at `offset`.
async fn read_l1(
    d: &Qcow2Driver,
    file: &Node,
    offset: u64,
    len: u32,
    what: &str,
) -> SnapshotResult<Vec<u64>> {
    Ok(read_words(file, offset, u64::from(len) * 8, what, d.name()).await?)
}

/// Writes an L1 table at `offset` and flushes.
async fn write_l1(file: &Node, offset: u64, l1: &[u64]) -> SnapshotResult<()> {
    if l1.is_empty() {
        return Ok(());
    }
    let raw: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    crate::write::grow(file, offset + raw.len() as u64);
    file.write(offset, IoBytes::copy_from(&raw), WriteFlags::default())
        .await?;
    file.flush().await?;
    Ok(())
}

/// One more reference to every cluster of `[host, host + len)`.
async fn take_refs(m: &mut Meta<'_>, cb: u32, host: u64, len: u64) -> SnapshotResult<()> {
    let first = host >> cb;
    let last = (host + len.max(1) - 1) >> cb;
    for c in first..=last {
        let rc = m.refcount(c << cb).await?;
        if rc >= m.refcount_max() {
            return Err(SnapshotError::RefcountOverflow);
        }
        m.set_refcount(c << cb, rc + 1).await?;
    }
    Ok(())
}

/// QEMU's `qcow2_update_snapshot_refcount`: adds `addend` (-1, 0 or 1)
/// to the refcount of every L2 table `l1` reaches and of every cluster
/// those map, and sets each entry's `COPIED` flag by the refcount that
/// results (L2 entries in the cached tables; `l1` in place). Tables whose
/// last reference goes are not changed. Returns whether `l1` changed.
async fn update_refcounts(
    d: &Qcow2Driver,
    file: &Node,
    m: &mut Meta<'_>,
    l1: &mut [u64],
    addend: i64,
) -> SnapshotResult<bool> {
    let h = d.header();
    let cb = h.cluster_bits;
    let cs = h.cluster_size();
    let step = if d.layout().extended_l2 { 2 } else { 1 };
    let mut l1_changed = false;
    for (i, e) in l1.iter_mut().enumerate() {
        let l2 = *e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !l2.is_multiple_of(cs) {
            return Err(corrupt(
                d.name(),
                format!("L2 table offset {l2:#x} unaligned (L1 index: {i:#x})"),
            )
            .into());
        }
        let table = d.l2_table(file, l2).await?;
        let mut changes = Vec::new();
        for j in (0..table.len()).step_by(step) {
            let word = table[j];
            let entry = word & !COPIED;
            let decoded = d.layout().decode(entry).map_err(|err| {
                corrupt(
                    d.name(),
                    format!("{err} (L2 table {l2:#x}, index {:#x})", j / step),
                )
            })?;
            let rc = match decoded {
                // Compressed clusters are never written in place.
                L2Entry::Compressed { host, len } => {
                    match addend {
                        1 => take_refs(m, cb, host, len).await?,
                        -1 => m.drop_refs(host, len).await?,
                        _ => {}
                    }
                    2
                }
                L2Entry::Normal { host } | L2Entry::Zero { host: Some(host) } => {
                    match addend {
                        1 => take_refs(m, cb, host, cs).await?,
                        -1 => m.drop_refs(host, cs).await?,
                        _ => {}
                    }
                    m.refcount(host).await?
                }
                L2Entry::Zero { host: None } | L2Entry::Unallocated => 0,
            };
            let new = if rc == 1 { entry | COPIED } else { entry };
            if new != word {
                changes.push((j, new));
            }
        }
        drop(table);
        match addend {
            1 => take_refs(m, cb, l2, cs).await?,
            -1 => m.drop_refs(l2, cs).await?,
            _ => {}
        }
        let rc = m.refcount(l2).await?;
        if rc > 0 {
            for (j, v) in changes {
                m.set_l2_word(l2, j, v).await?;
            }
        }
        let new = if rc == 1 { l2 | COPIED } else { l2 };
        if new != *e {
            *e = new;
            l1_changed = true;
        }
    }
    Ok(l1_changed)
}

/// Writes `snaps` as the new snapshot table (new clusters, then the
/// header, then the old table freed), as QEMU's `qcow2_write_snapshots`.
async fn write_table(
    d: &Qcow2Driver,
    file: &Node,
    m: &mut Meta<'_>,
    snaps: &[Snapshot],
    old_len: u64,
) -> SnapshotResult<()> {
    let h = d.header().clone();
    let cs = h.cluster_size();
    let raw = encode_table(snaps, h.size)?;
    let new_off = if snaps.is_empty() {
        0
    } else {
        m.alloc_clusters((raw.len() as u64).div_ceil(cs)).await?
    };
    // The new clusters' refcounts (and everything before) are durable
    // before anything points at them.
    m.write_back().await?;
    if !raw.is_empty() {
        file.write(new_off, IoBytes::copy_from(&raw), WriteFlags::default())
            .await?;
        file.flush().await?;
    }
    let mut hdr = [0u8; 12];
    hdr[..4].copy_from_slice(&(snaps.len() as u32).to_be_bytes());
    hdr[4..].copy_from_slice(&new_off.to_be_bytes());
    file.write(60, IoBytes::copy_from(&hdr), WriteFlags::default())
        .await?;
    file.flush().await?;
    d.set_header(crate::format::Header {
        nb_snapshots: snaps.len() as u32,
        snapshots_offset: new_off,
        ..h.clone()
    });
    if h.nb_snapshots > 0 && old_len > 0 {
        m.drop_refs(h.snapshots_offset, old_len).await?;
    }
    Ok(())
}

/// Creates an internal snapshot named `name` of the active layer, dated
/// `date` (seconds, nanoseconds), as QEMU's `qcow2_snapshot_create`
/// (with qemu-img's VM state size, VM clock and icount: 0). Returns it.
pub async fn create(
    d: &Qcow2Driver,
    file: &Node,
    name: &str,
    date: (u32, u32),
) -> SnapshotResult<Snapshot> {
    let w = writer(d)?;
    let (mut snaps, old_len) = current_table(d, file).await?;
    if snaps.len() as u64 >= u64::from(MAX_SNAPSHOTS) {
        return Err(SnapshotError::TooBig);
    }
    no_data_file(d)?;
    let mut m = w.meta(d, file).await?;
    m.write_back().await?;
    let h = d.header().clone();
    let cs = h.cluster_size();
    let mut l1 = d.l1.read().clone();
    // The copy of the active L1 table, as it is (COPIED flags included).
    let l1_off = if l1.is_empty() {
        0
    } else {
        let off = m.alloc_clusters((l1.len() as u64 * 8).div_ceil(cs)).await?;
        write_l1(file, off, &l1).await?;
        off
    };
    // Every table and cluster gains the snapshot's reference, durably,
    // before the snapshot table points at the copy.
    let changed = update_refcounts(d, file, &mut m, &mut l1, 1).await?;
    m.write_back().await?;
    if changed {
        write_l1(file, h.l1_table_offset, &l1).await?;
        *d.l1.write() = l1.clone();
    }
    let mut extra = vec![0u8; EXTRA_WRITTEN];
    extra[8..16].copy_from_slice(&h.size.to_be_bytes());
    let sn = Snapshot {
        l1_table_offset: l1_off,
        l1_size: l1.len() as u32,
        id: new_snapshot_id(&snaps),
        name: name.to_string(),
        date_sec: date.0,
        date_nsec: date.1,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: Some(h.size),
        extra,
    };
    snaps.push(sn.clone());
    write_table(d, file, &mut m, &snaps, old_len).await?;
    m.write_back().await?;
    Ok(sn)
}

/// Reverts the active layer to the snapshot with id, else name,
/// `id_or_name`, as QEMU's `qcow2_snapshot_goto`: the virtual size
/// becomes the snapshot's, the snapshot's L1 table is copied over the
/// active one (its clusters gain a reference first; the old active
/// clusters lose theirs after), and the COPIED flags are set again.
pub async fn apply(d: &Qcow2Driver, file: &Node, id_or_name: &str) -> SnapshotResult<Snapshot> {
    let w = writer(d)?;
    no_data_file(d)?;
    let (snaps, _) = current_table(d, file).await?;
    let sn = snaps[find_by_id_or_name(&snaps, id_or_name).ok_or(SnapshotError::NotFound)?].clone();
    let h = d.header().clone();
    let cs = h.cluster_size();
    let disk_size = sn.disk_size.unwrap_or(h.size);
    if disk_size != h.size && h.version < 3 {
        // QEMU: "Can't resize a v2 image which has snapshots".
        return Err(SnapshotError::NotSupported);
    }
    // Room for the snapshot's L1 table (and the new size) in the active
    // one, and the new size, first (QEMU truncates, then grows the L1).
    let cur = u64::from(h.l1_size);
    let mut need = cur.max(u64::from(sn.l1_size));
    if disk_size > h.size {
        need = need.max(h.l1_entries_for(disk_size));
    }
    let capacity = (cur * 8).div_ceil(cs) * cs / 8;
    if need > capacity {
        w.move_l1(d, file, need, disk_size).await?;
    } else if need > cur || disk_size != h.size {
        if need > cur {
            let zeroes = vec![0u64; (need - cur) as usize];
            write_l1(file, h.l1_table_offset + cur * 8, &zeroes).await?;
            d.l1.write().resize(need as usize, 0);
        }
        crate::resize::write_header_size(d, file, disk_size, need as u32, h.l1_table_offset)
            .await?;
    }
    let h = d.header().clone();
    let mut m = w.meta(d, file).await?;
    m.write_back().await?;
    let mut sn_l1 = read_l1(d, file, sn.l1_table_offset, sn.l1_size, "snapshot L1 table").await?;
    let mut new_l1 = sn_l1.clone();
    new_l1.resize(h.l1_size as usize, 0);
    // The snapshot's clusters gain the active layer's reference, durably,
    // before the active L1 table points at them.
    if update_refcounts(d, file, &mut m, &mut sn_l1, 1).await? {
        m.write_back().await?;
        write_l1(file, sn.l1_table_offset, &sn_l1).await?;
    }
    m.write_back().await?;
    write_l1(file, h.l1_table_offset, &new_l1).await?;
    // The old active clusters lose their reference.
    let mut old = d.l1.read().clone();
    *d.l1.write() = new_l1.clone();
    update_refcounts(d, file, &mut m, &mut old, -1).await?;
    // COPIED flags by the refcounts that result.
    if update_refcounts(d, file, &mut m, &mut new_l1, 0).await? {
        m.write_back().await?;
        write_l1(file, h.l1_table_offset, &new_l1).await?;
        *d.l1.write() = new_l1;
    }
    m.write_back().await?;
    Ok(sn)
}

/// Deletes the snapshot with this id and name (either may be left out),
/// as QEMU's `qcow2_snapshot_delete`: the table entry goes first, then
/// the snapshot's references and its L1 table; active entries whose
/// clusters it no longer shares get their COPIED flags back.
pub async fn delete(
    d: &Qcow2Driver,
    file: &Node,
    id: Option<&str>,
    name: Option<&str>,
) -> SnapshotResult<Snapshot> {
    let w = writer(d)?;
    no_data_file(d)?;
    let (mut snaps, old_len) = current_table(d, file).await?;
    let i = find_by_id_and_name(&snaps, id, name).ok_or(SnapshotError::NotFound)?;
    let sn = snaps.remove(i);
    let mut m = w.meta(d, file).await?;
    m.write_back().await?;
    let mut sn_l1 = read_l1(d, file, sn.l1_table_offset, sn.l1_size, "snapshot L1 table").await?;
    write_table(d, file, &mut m, &snaps, old_len).await?;
    // Nothing points at the snapshot's L1 table any more.
    update_refcounts(d, file, &mut m, &mut sn_l1, -1).await?;
    if sn.l1_size > 0 {
        m.drop_refs(sn.l1_table_offset, u64::from(sn.l1_size) * 8)
            .await?;
    }
    let mut l1 = d.l1.read().clone();
    if update_refcounts(d, file, &mut m, &mut l1, 0).await? {
        m.write_back().await?;
        write_l1(file, d.header().l1_table_offset, &l1).await?;
        *d.l1.write() = l1;
    }
    m.write_back().await?;
    Ok(sn)
}

/// Writes everything back and marks the image clean, as a close does
/// (for a driver opened only to change snapshots).
pub async fn close(d: &Qcow2Driver, file: &Node) -> sluice_core::Result<()> {
    match d.writer.get() {
        Some(w) => w.flush(d, file, true).await,
        None => Ok(()),
    }
}

impl Qcow2Driver {
    /// Makes this read-only driver read the snapshot with this id and
    /// name (either may be left out) instead of the active layer, as
    /// QEMU's `qcow2_snapshot_load_tmp`: only the L1 table changes; the
    /// virtual size and the backing file stay.
    pub async fn load_snapshot(
        &self,
        file: &Node,
        id: Option<&str>,
        name: Option<&str>,
    ) -> SnapshotResult<Snapshot> {
        if id.is_none() && name.is_none() {
            return Err(SnapshotError::Refused("snapshot_id and name are both NULL"));
        }
        if self.writer.get().is_some() {
            return Err(SnapshotError::Refused("Device is not readonly"));
        }
        let (snaps, _) = current_table(self, file).await?;
        let i = find_by_id_and_name(&snaps, id, name)
            .ok_or(SnapshotError::Refused("Can't find snapshot"))?;
        let sn = snaps[i].clone();
        let l1 = read_l1(
            self,
            file,
            sn.l1_table_offset,
            sn.l1_size,
            "snapshot L1 table",
        )
        .await?;
        *self.l1.write() = l1;
        Ok(sn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0x30000,
            l1_size: 1,
            id: id.into(),
            name: name.into(),
            date_sec: 1,
            date_nsec: 2,
            vm_clock_nsec: 3,
            vm_state_size: 0,
            disk_size: None,
            extra: vec![],
        }
    }

    #[test]
    fn ids_and_lookups_are_qemus() {
        assert_eq!(strtoul(" 12abc"), 12);
        assert_eq!(strtoul("x"), 0);
        assert_eq!(strtoul("-1"), u64::MAX);
        assert_eq!(strtoul("99999999999999999999999"), u64::MAX);
        let s = vec![snap("1", "a"), snap("7", "b"), snap("b", "1")];
        assert_eq!(new_snapshot_id(&s), "8");
        assert_eq!(new_snapshot_id(&[]), "1");
        // By id first, then by name.
        assert_eq!(find_by_id_or_name(&s, "1"), Some(0));
        assert_eq!(find_by_id_or_name(&s, "b"), Some(2));
        assert_eq!(find_by_id_or_name(&s, "a"), Some(0));
        assert_eq!(find_by_id_or_name(&s, "zz"), None);
        assert_eq!(find_by_id_and_name(&s, Some("1"), Some("b")), None);
        assert_eq!(find_by_id_and_name(&s, Some("b"), Some("1")), Some(2));
        assert_eq!(find_by_id_and_name(&s, None, None), None);
    }

    #[test]
    fn entries_are_encoded_as_qemu_writes_them() {
        let mut a = snap("1", "first");
        a.extra = vec![0; 16];
        let mut b = snap("2", "x");
        b.extra = vec![0xab; 30];
        let raw = encode_table(&[a, b], 1 << 20).unwrap();
        // 40 + 24 + 1 + 5 = 70, padded to 72; then 40 + 30 + 1 + 1.
        assert_eq!(raw.len(), 72 + 72);
        let (extra, id, name, total) = crate::format::snapshot_var_lens(&raw);
        assert_eq!((extra, id, name, total), (24, 1, 5, 72));
        let p = crate::format::parse_snapshot(&raw, "t", 0).unwrap();
        assert_eq!(p.disk_size, Some(1 << 20));
        assert_eq!(icount(&p), u64::MAX);
        let q = crate::format::parse_snapshot(&raw[72..], "t", 72).unwrap();
        assert_eq!(q.extra.len(), 30);
        assert_eq!(&q.extra[24..], &[0xab; 6]);
        assert_eq!(q.name, "x");
    }
}
