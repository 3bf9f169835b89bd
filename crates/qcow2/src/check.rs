//! `qemu-img check` for qcow2 images, and its repairs (`-r leaks`,
//! `-r all`), classified and counted as QEMU's `qcow2_check_refcounts`
//! does, so that a report equals `qemu-img check --output=json` field by
//! field.
//!
//! The check walks every structure that holds clusters (header, active
//! and snapshot L1/L2 tables, snapshot table, refcount table and blocks,
//! bitmaps) and counts references per cluster in memory; it then compares
//! them with the stored refcounts: a stored count above the references is
//! a leak, one below is a corruption. A cluster referenced but counted
//! zero (or a refcount block that is itself broken) needs the refcount
//! structure rebuilt from the references, which `-r all` does the way
//! QEMU does (same placement of the new blocks and table). Last, the
//! `COPIED` flags of the active tables are checked against the refcounts.
//!
//! References to regions a cluster or more past the end of the file are
//! corruptions and not counted (as in QEMU), so the computed refcounts
//! never span much more than the file.

use crate::driver::{read_clipped, read_header, read_snapshots};
use crate::format::{
    autoclear, corrupt, incompat, Header, Snapshot, COMPRESSED, COPIED, L1_RESERVED, MAX_L1_BYTES,
    OFFSET_MASK, ZERO_FLAG,
};
use crate::write::{grow, rc_get, rc_put};
use sluice_core::{IoBuf, IoBytes, Node, Result, WriteFlags};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What `qemu-img check -r` may repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// `-r leaks`: drop refcounts above the references.
    Leaks,
    /// `-r all`: leaks, refcounts below the references (rebuilding the
    /// refcount structure when needed) and `COPIED` flags.
    All,
}

/// `qemu-img check`'s result, with its JSON fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    pub check_errors: u64,
    pub leaks: u64,
    pub corruptions: u64,
    pub leaks_fixed: u64,
    pub corruptions_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
}

impl CheckReport {
    /// `qemu-img check --output=json`: QEMU's key order, zero counts
    /// left out (`check-errors`, `filename` and `format` always shown).
    pub fn to_json(&self) -> String {
        let mut fields: Vec<(&str, String)> = Vec::new();
        let mut num = |k: &'static str, v: u64, always: bool| {
            if always || v != 0 {
                fields.push((k, v.to_string()));
            }
        };
        num("image-end-offset", self.image_end_offset, false);
        num("compressed-clusters", self.compressed_clusters, false);
        num("total-clusters", self.total_clusters, false);
        num("corruptions", self.corruptions, false);
        num("corruptions-fixed", self.corruptions_fixed, false);
        num("check-errors", self.check_errors, true);
        num("leaks", self.leaks, false);
        num("leaks-fixed", self.leaks_fixed, false);
        num("allocated-clusters", self.allocated_clusters, false);
        let s = |v: &str| serde_json::Value::from(v).to_string();
        fields.push(("filename", s(&self.filename)));
        fields.push(("format", s(&self.format)));
        if self.fragmented_clusters != 0 {
            fields.push(("fragmented-clusters", self.fragmented_clusters.to_string()));
        }
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("    \"{k}\": {v}"))
            .collect();
        format!("{{\n{}\n}}", body.join(",\n"))
    }

    /// `qemu-img check`'s human-readable text (its standard output).
    pub fn human(&self) -> String {
        let mut s = String::new();
        if self.leaks_fixed != 0 || self.corruptions_fixed != 0 {
            let _ = write!(
                s,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            );
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions != 0 {
                let _ = write!(
                    s,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                );
            }
            if self.leaks != 0 {
                let _ = write!(
                    s,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                );
            }
            if self.check_errors != 0 {
                let _ = write!(
                    s,
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                );
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            let _ = writeln!(
                s,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                a * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / a,
                self.compressed_clusters as f64 * 100.0 / a
            );
        }
        if self.image_end_offset != 0 {
            let _ = writeln!(s, "Image end offset: {}", self.image_end_offset);
        }
        s
    }

    /// `qemu-img check`'s exit status: 0 clean, 1 check errors, 2
    /// corruptions, 3 leaks.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors != 0 {
            1
        } else if self.corruptions != 0 {
            2
        } else if self.leaks != 0 {
            3
        } else {
            0
        }
    }
}

/// Checks (and with `repair`, repairs) the qcow2 image in `file`, named
/// `filename` in the report, as `qemu-img check [-r leaks|all]` does: a
/// repair pass, then, when something was fixed, a second check whose
/// counts are reported with the fixed counts of the first.
pub async fn check(file: &Node, filename: &str, repair: Option<Repair>) -> Result<CheckReport> {
    check_logged(file, filename, repair, &mut Vec::new()).await
}

/// [`check`], also collecting the lines QEMU prints to standard error
/// ("ERROR cluster 5 refcount=0 reference=1", "Leaked cluster ...").
pub async fn check_logged(
    file: &Node,
    filename: &str,
    repair: Option<Repair>,
    log: &mut Vec<String>,
) -> Result<CheckReport> {
    let first = check_pass(file, filename, repair, log).await?;
    if first.leaks_fixed == 0 && first.corruptions_fixed == 0 {
        return Ok(first);
    }
    let mut second = check_pass(file, filename, None, log).await?;
    second.leaks_fixed = first.leaks_fixed;
    second.corruptions_fixed = first.corruptions_fixed;
    Ok(second)
}

/// Rebuilds the refcounts of a dirty image (lazy refcounts after a
/// crash) before it is opened writable, as QEMU does: `-r all`, which
/// must finish without check errors.
pub async fn repair_dirty(file: &Node, name: &str) -> Result<CheckReport> {
    let mut log = Vec::new();
    let r = check_pass(file, name, Some(Repair::All), &mut log).await?;
    // As QEMU: corruptions the repair cannot fix (reserved bits, say)
    // do not stop the open; errors that kept the check from finishing do.
    if r.check_errors != 0 {
        let first: Vec<&str> = log.iter().take(5).map(String::as_str).collect();
        return Err(corrupt(
            name,
            format!(
                "Could not repair dirty image ({} corruptions, {} check errors): {}",
                r.corruptions,
                r.check_errors,
                first.join("; ")
            ),
        ));
    }
    tracing::info!(
        image = name,
        leaks_fixed = r.leaks_fixed,
        corruptions_fixed = r.corruptions_fixed,
        "repaired the refcounts of a dirty image"
    );
    Ok(r)
}

/// Refcount table entries: bits 9-63 an offset, 0-8 reserved.
const REFT_OFFSET_MASK: u64 = !0x1ff;
/// A subcluster bitmap with every subcluster allocated.
const ALL_ALLOC: u64 = 0xffff_ffff;
/// Bitmap table entries: reserved bits, and bit 0 (all ones).
const BME_RESERVED: u64 = 0xff00_0000_0000_01fe;
const BME_ALL_ONES: u64 = 1;

#[derive(Clone, Copy, Default)]
struct Fix {
    leaks: bool,
    errors: bool,
}

impl Fix {
    const NONE: Fix = Fix {
        leaks: false,
        errors: false,
    };

    fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// One pass's counts (QEMU's `BdrvCheckResult`).
#[derive(Clone, Copy, Default)]
struct Res {
    check_errors: u64,
    leaks: u64,
    corruptions: u64,
    leaks_fixed: u64,
    corruptions_fixed: u64,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

/// The refcounts computed from the references ("in-memory refcount
/// table"): one counter per cluster of the file (dense, as QEMU's: the
/// clusters lie within the file, whose size bounds it), and how many
/// clusters it spans.
#[derive(Default)]
struct Imrt {
    counts: Vec<u32>,
    nb: u64,
}

impl Imrt {
    fn get(&self, k: u64) -> u64 {
        usize::try_from(k)
            .ok()
            .and_then(|i| self.counts.get(i))
            .map_or(0, |&v| u64::from(v))
    }

    /// The counter of cluster `k`, grown into existence.
    fn slot(&mut self, k: u64) -> &mut u32 {
        let i = k as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        &mut self.counts[i]
    }

    /// Clusters in `range` with a non-zero count, and their counts.
    fn used(&self, range: std::ops::Range<u64>) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = (range.end.min(self.counts.len() as u64)) as usize;
        let start = (range.start as usize).min(end);
        self.counts[start..end]
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0)
            .map(move |(i, &v)| ((start + i) as u64, u64::from(v)))
    }

    /// QEMU's `alloc_clusters_imrt`: the first run of `count` free
    /// clusters from `*ffc` on (growing the span past the end when there
    /// is none), taken with refcount 1.
    fn alloc(&mut self, count: u64, ffc: &mut u64, cb: u32) -> u64 {
        let mut pos = *ffc;
        let mut first_gap = true;
        let mut found = None;
        for (k, _) in self.used(pos..self.nb) {
            if k > pos {
                if first_gap {
                    *ffc = pos;
                    first_gap = false;
                }
                if k - pos >= count {
                    found = Some(pos);
                    break;
                }
            }
            pos = k + 1;
        }
        let start = match found {
            Some(s) => s,
            None => {
                if pos < self.nb && first_gap {
                    *ffc = pos;
                }
                if self.nb.saturating_sub(pos) < count {
                    self.nb = pos + count;
                }
                pos
            }
        };
        for c in start..start + count {
            *self.slot(c) = 1;
        }
        start << cb
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

struct Ck<'a> {
    file: &'a Node,
    name: String,
    h: Header,
    cs: u64,
    cb: u32,
    order: u32,
    /// log2 of the entries per refcount block.
    rb_bits: u32,
    ext: bool,
    data_file: bool,
    reftable: Vec<u64>,
    /// Refcount blocks read so far, by offset (kept as on disk).
    blocks: BTreeMap<u64, Vec<u8>>,
    l1: Vec<u64>,
    snapshots: Vec<Snapshot>,
    snapshots_size: u64,
    log: &'a mut Vec<String>,
}

async fn read_vec(file: &Node, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = IoBuf::zeroed(len as usize);
    read_clipped(file, offset, buf.as_read_buf()).await?;
    Ok(buf.to_vec())
}

fn be_words(raw: &[u8]) -> Vec<u64> {
    crate::driver::decode_words(raw)
}

async fn write_at(file: &Node, offset: u64, bytes: &[u8]) -> Result<()> {
    grow(file, offset + bytes.len() as u64);
    file.write(offset, IoBytes::copy_from(bytes), WriteFlags::default())
        .await
}

async fn check_pass(
    file: &Node,
    filename: &str,
    repair: Option<Repair>,
    log: &mut Vec<String>,
) -> Result<CheckReport> {
    let name = file.driver().filename().unwrap_or_else(|| filename.into());
    let h = read_header(file, &name).await?;
    let cs = h.cluster_size();
    let reftable = be_words(
        &read_vec(
            file,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        )
        .await?,
    );
    let l1 = be_words(&read_vec(file, h.l1_table_offset, u64::from(h.l1_size) * 8).await?);
    let (snapshots, snapshots_size) = read_snapshots(file, &h, &name, false).await?;
    let fix = match repair {
        None => Fix::NONE,
        Some(Repair::Leaks) => Fix {
            leaks: true,
            errors: false,
        },
        Some(Repair::All) => Fix {
            leaks: true,
            errors: true,
        },
    };
    let total_clusters = h.size.div_ceil(512) * 512;
    let total_clusters = total_clusters.div_ceil(cs);
    let mut ck = Ck {
        file,
        name,
        cs,
        cb: h.cluster_bits,
        order: h.refcount_order,
        rb_bits: h.cluster_bits + 3 - h.refcount_order,
        ext: h.has_extended_l2(),
        data_file: h.has_data_file(),
        reftable,
        blocks: BTreeMap::new(),
        l1,
        snapshots,
        snapshots_size,
        log,
        h,
    };
    let (res, end) = ck.check_refcounts(fix).await?;
    if fix.any() && res.check_errors == 0 && res.corruptions == 0 {
        ck.mark_clean().await?;
    }
    Ok(CheckReport {
        filename: filename.to_string(),
        format: "qcow2".into(),
        check_errors: res.check_errors,
        leaks: res.leaks,
        corruptions: res.corruptions,
        leaks_fixed: res.leaks_fixed,
        corruptions_fixed: res.corruptions_fixed,
        image_end_offset: end,
        total_clusters,
        allocated_clusters: res.allocated,
        fragmented_clusters: res.fragmented,
        compressed_clusters: res.compressed,
    })
}

impl Ck<'_> {
    fn say(&mut self, msg: String) {
        tracing::debug!(image = %self.name, "{msg}");
        self.log.push(msg);
    }

    fn refcount_max(&self) -> u64 {
        if self.order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    fn kind(&self, e: u64) -> Kind {
        if e & COMPRESSED != 0 {
            Kind::Compressed
        } else if e & ZERO_FLAG != 0 && !self.ext {
            if e & OFFSET_MASK != 0 {
                Kind::ZeroAlloc
            } else {
                Kind::ZeroPlain
            }
        } else if e & OFFSET_MASK == 0 {
            if self.data_file && e & COPIED != 0 {
                Kind::Normal
            } else {
                Kind::Unallocated
            }
        } else {
            Kind::Normal
        }
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: one more reference to every
    /// cluster of `[offset, offset + size)`.
    fn inc(&mut self, res: &mut Res, imrt: &mut Imrt, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        // The last cluster may lie partly past the end of the file, no more.
        let over = i128::from(offset) + i128::from(size) - i128::from(self.file.size());
        if over >= i128::from(self.cs) {
            res.corruptions += 1;
            self.say(format!("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"));
            return;
        }
        let mask = !(self.cs - 1);
        let start = offset & mask;
        let last = offset.saturating_add(size - 1) & mask;
        let max = self.refcount_max();
        let mut c = start;
        loop {
            let k = c >> self.cb;
            if k >= imrt.nb {
                imrt.nb = k + 1;
            }
            let v = imrt.slot(k);
            if u64::from(*v) == max || *v == u32::MAX {
                res.corruptions += 1;
                self.say(format!("ERROR: overflow cluster offset=0x{c:x}\nUse qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"));
            } else {
                *v += 1;
            }
            if c >= last {
                break;
            }
            c += self.cs;
        }
    }

    /// The stored refcount of cluster `k`; `None` when its refcount
    /// block cannot be read (an unaligned refcount table entry).
    async fn stored(&mut self, k: u64) -> Result<Option<u64>> {
        let bi = k >> self.rb_bits;
        let Some(&e) = self.reftable.get(bi as usize) else {
            return Ok(Some(0));
        };
        let boff = e & REFT_OFFSET_MASK;
        if boff == 0 {
            return Ok(Some(0));
        }
        if !boff.is_multiple_of(self.cs) {
            return Ok(None);
        }
        let (idx, order) = (k & ((1 << self.rb_bits) - 1), self.order);
        let block = self.block(boff).await?;
        Ok(Some(rc_get(block, idx, order)))
    }

    async fn block(&mut self, boff: u64) -> Result<&mut Vec<u8>> {
        if !self.blocks.contains_key(&boff) {
            let b = read_vec(self.file, boff, self.cs).await?;
            self.blocks.insert(boff, b);
        }
        Ok(self.blocks.get_mut(&boff).expect("loaded"))
    }

    /// Writes cluster `k`'s refcount (its refcount block exists).
    async fn set_stored(&mut self, k: u64, v: u64) -> Result<()> {
        let bi = (k >> self.rb_bits) as usize;
        let boff = self.reftable.get(bi).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        if boff == 0 || !boff.is_multiple_of(self.cs) {
            return Err(corrupt(
                &self.name,
                format!("no usable refcount block for cluster {k}"),
            ));
        }
        let (order, idx) = (self.order, k & ((1 << self.rb_bits) - 1));
        let file = self.file;
        let block = self.block(boff).await?;
        let (at, n) = rc_put(block, idx, order, v);
        let bytes = block[at..at + n].to_vec();
        write_at(file, boff + at as u64, &bytes).await
    }

    /// QEMU's `calculate_refcounts`: the references of every structure.
    async fn calculate(
        &mut self,
        res: &mut Res,
        imrt: &mut Imrt,
        fix: Fix,
        rebuild: &mut bool,
    ) -> Result<()> {
        self.inc(res, imrt, 0, self.cs);
        let (l1_off, l1_size) = (self.h.l1_table_offset, self.h.l1_size);
        self.check_l1(res, imrt, l1_off, l1_size, true, fix, true)
            .await?;
        if self.data_file && !self.snapshots.is_empty() {
            res.corruptions += 1;
            let n = self.snapshots.len();
            self.say(format!("ERROR {n} snapshots in image with data file"));
        }
        for s in self.snapshots.clone() {
            if !s.l1_table_offset.is_multiple_of(self.cs) {
                res.corruptions += 1;
                self.say(format!("ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted", s.id, s.name, s.l1_table_offset));
                continue;
            }
            if u64::from(s.l1_size) * 8 > MAX_L1_BYTES {
                res.corruptions += 1;
                self.say(format!("ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted", s.id, s.name, s.l1_size));
                continue;
            }
            self.check_l1(res, imrt, s.l1_table_offset, s.l1_size, false, fix, false)
                .await?;
        }
        let (so, ss) = (self.h.snapshots_offset, self.snapshots_size);
        self.inc(res, imrt, so, ss);
        let rt = (self.h.refcount_table_offset, self.reftable.len() as u64 * 8);
        self.inc(res, imrt, rt.0, rt.1);
        self.check_bitmaps(res, imrt).await?;
        self.check_refblocks(res, imrt, fix, rebuild).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn check_l1(
        &mut self,
        res: &mut Res,
        imrt: &mut Imrt,
        l1_off: u64,
        l1_size: u32,
        frag: bool,
        fix: Fix,
        active: bool,
    ) -> Result<()> {
        let bytes = u64::from(l1_size) * 8;
        if bytes == 0 {
            return Ok(());
        }
        self.inc(res, imrt, l1_off, bytes);
        let l1 = be_words(&read_vec(self.file, l1_off, bytes).await?);
        for e in l1 {
            if e == 0 {
                continue;
            }
            if e & L1_RESERVED != 0 {
                res.corruptions += 1;
                self.say(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            let l2 = e & OFFSET_MASK;
            self.inc(res, imrt, l2, self.cs);
            if !l2.is_multiple_of(self.cs) {
                res.corruptions += 1;
                self.say(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.check_l2(res, imrt, l2, frag, fix, active).await?;
        }
        Ok(())
    }

    async fn check_l2(
        &mut self,
        res: &mut Res,
        imrt: &mut Imrt,
        l2: u64,
        frag: bool,
        fix: Fix,
        _active: bool,
    ) -> Result<()> {
        let t = be_words(&read_vec(self.file, l2, self.cs).await?);
        let esz = if self.ext { 2 } else { 1 };
        let mut next_contiguous = 0u64;
        for i in 0..t.len() / esz {
            let e = t[i * esz];
            let bitmap = if self.ext { t[i * esz + 1] } else { 0 };
            let kind = self.kind(e);
            if kind != Kind::Compressed && e & crate::format::L2_RESERVED != 0 {
                res.corruptions += 1;
                self.say(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
            }
            match kind {
                Kind::Compressed => {
                    let (host, len) = crate::format::compressed_descriptor(e, self.cb);
                    if e & COPIED != 0 {
                        res.corruptions += 1;
                        self.say(format!("ERROR: coffset=0x{host:x}: copied flag must never be set for compressed clusters"));
                    }
                    if self.data_file {
                        res.corruptions += 1;
                        self.say(format!(
                            "ERROR compressed cluster {i} with data file, entry=0x{e:x}"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        res.corruptions += 1;
                        self.say(format!("ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{e:x}"));
                        continue;
                    }
                    self.inc(res, imrt, host, len);
                    if frag {
                        res.allocated += 1;
                        res.compressed += 1;
                        res.fragmented += 1;
                    }
                }
                Kind::ZeroAlloc | Kind::Normal => {
                    let off = e & OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        res.corruptions += 1;
                        self.say(format!("ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"));
                    }
                    if !off.is_multiple_of(self.cs) {
                        res.corruptions += 1;
                        let data = if self.ext {
                            bitmap & ALL_ALLOC != 0
                        } else {
                            e & ZERO_FLAG == 0
                        };
                        if !data {
                            let what = if fix.errors { "Repairing" } else { "ERROR" };
                            self.say(format!("{what} offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."));
                            if fix.errors {
                                self.zero_entry(l2, i, bitmap).await?;
                                res.corruptions -= 1;
                                res.corruptions_fixed += 1;
                                continue;
                            }
                        } else {
                            self.say(format!("ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."));
                        }
                    }
                    if frag {
                        res.allocated += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            res.fragmented += 1;
                        }
                        next_contiguous = off + self.cs;
                    }
                    if !self.data_file {
                        self.inc(res, imrt, off, self.cs);
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if bitmap & ALL_ALLOC != 0 {
                        res.corruptions += 1;
                        self.say(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// QEMU's `fix_l2_entry_by_zero`: a misaligned preallocation becomes
    /// a plain zero cluster.
    async fn zero_entry(&mut self, l2: u64, i: usize, bitmap: u64) -> Result<()> {
        let words: Vec<u64> = if self.ext {
            let b = (bitmap | (bitmap << 32)) & !ALL_ALLOC;
            vec![0, b]
        } else {
            vec![ZERO_FLAG]
        };
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        write_at(self.file, l2 + (i * words.len() * 8) as u64, &bytes).await
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`: the bitmap directory, the
    /// bitmap tables and their data clusters (only while the bitmaps
    /// extension is valid: its autoclear bit set).
    async fn check_bitmaps(&mut self, res: &mut Res, imrt: &mut Imrt) -> Result<()> {
        let Some(bm) = self.h.bitmaps.clone() else {
            return Ok(());
        };
        if self.h.autoclear_features & autoclear::BITMAPS == 0 || bm.nb_bitmaps == 0 {
            return Ok(());
        }
        self.inc(res, imrt, bm.directory_offset, bm.directory_size);
        // QEMU bounds the directory by its own limits; the file bounds it here.
        if bm.directory_size > self.file.size().max(1 << 20) {
            res.corruptions += 1;
            return Ok(());
        }
        let dir = read_vec(self.file, bm.directory_offset, bm.directory_size).await?;
        let mut at = 0usize;
        let mut tables = Vec::new();
        for _ in 0..bm.nb_bitmaps {
            if at + 24 > dir.len() {
                res.corruptions += 1;
                return Ok(());
            }
            let e = &dir[at..];
            let toff = u64::from_be_bytes(e[0..8].try_into().expect("8"));
            let tsize = u32::from_be_bytes(e[8..12].try_into().expect("4"));
            let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
            let extra = u32::from_be_bytes(e[20..24].try_into().expect("4")) as usize;
            tables.push((toff, tsize));
            at += (24 + extra + name_size).div_ceil(8) * 8;
        }
        for (toff, tsize) in tables {
            let bytes = u64::from(tsize) * 8;
            self.inc(res, imrt, toff, bytes);
            if !toff.is_multiple_of(self.cs) || bytes > self.file.size() {
                res.corruptions += 1;
                break;
            }
            let table = be_words(&read_vec(self.file, toff, bytes).await?);
            for entry in table {
                let off = entry & OFFSET_MASK;
                let bad = entry & BME_RESERVED != 0
                    || (off != 0 && (entry & BME_ALL_ONES != 0 || !off.is_multiple_of(self.cs)));
                if bad {
                    res.corruptions += 1;
                    continue;
                }
                if off != 0 {
                    self.inc(res, imrt, off, self.cs);
                }
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`: the refcount blocks themselves.
    async fn check_refblocks(
        &mut self,
        res: &mut Res,
        imrt: &mut Imrt,
        fix: Fix,
        rebuild: &mut bool,
    ) -> Result<()> {
        for i in 0..self.reftable.len() {
            let e = self.reftable[i];
            let off = e & REFT_OFFSET_MASK;
            let cluster = off >> self.cb;
            if e & !REFT_OFFSET_MASK != 0 {
                res.corruptions += 1;
                *rebuild = true;
                self.say(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            if !off.is_multiple_of(self.cs) {
                res.corruptions += 1;
                *rebuild = true;
                self.say(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                continue;
            }
            if cluster >= imrt.nb {
                res.corruptions += 1;
                let what = if fix.errors { "Repairing" } else { "ERROR" };
                self.say(format!("{what} refcount block {i} is outside image"));
                if fix.errors {
                    // The file grows to hold the block (reading zeroes).
                    write_at(self.file, off, &vec![0u8; self.cs as usize]).await?;
                    self.blocks.remove(&off);
                    imrt.nb = imrt.nb.max(self.file.size().div_ceil(self.cs));
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                    self.inc(res, imrt, off, self.cs);
                }
                continue;
            }
            if off != 0 {
                self.inc(res, imrt, off, self.cs);
                let v = imrt.get(cluster);
                if v != 1 {
                    res.corruptions += 1;
                    *rebuild = true;
                    self.say(format!("ERROR refcount block {i} refcount={v}"));
                }
            }
        }
        Ok(())
    }

    /// QEMU's `compare_refcounts`: stored against computed refcounts of
    /// every cluster either says is used; returns the highest such.
    async fn compare(
        &mut self,
        res: &mut Res,
        fix: Fix,
        rebuild: &mut bool,
        imrt: &Imrt,
    ) -> Result<u64> {
        let nb = imrt.nb;
        // Clusters either side counts, in order (dense: `nb` is bounded by
        // the file, like `imrt`).
        let mut todo = vec![false; nb as usize];
        for (k, _) in imrt.used(0..nb) {
            todo[k as usize] = true;
        }
        let per = 1u64 << self.rb_bits;
        for bi in 0..self.reftable.len() {
            let first = bi as u64 * per;
            if first >= nb {
                break;
            }
            let boff = self.reftable[bi] & REFT_OFFSET_MASK;
            if boff == 0 {
                continue;
            }
            let end = (first + per).min(nb);
            if !boff.is_multiple_of(self.cs) {
                todo[first as usize..end as usize].fill(true);
                continue;
            }
            let order = self.order;
            let block = self.block(boff).await?;
            for k in first..end {
                if rc_get(block, k - first, order) != 0 {
                    todo[k as usize] = true;
                }
            }
        }
        let mut highest = 0;
        let todo = todo
            .iter()
            .enumerate()
            .filter(|(_, &t)| t)
            .map(|(k, _)| k as u64);
        for k in todo {
            let Some(r1) = self.stored(k).await? else {
                res.check_errors += 1;
                self.say(format!(
                    "Can't get refcount for cluster {k}: Input/output error"
                ));
                continue;
            };
            let r2 = imrt.get(k);
            if r1 > 0 || r2 > 0 {
                highest = k;
            }
            if r1 == r2 {
                continue;
            }
            let fixing = if r1 == 0 {
                *rebuild = true;
                false
            } else {
                (r1 > r2 && fix.leaks) || (r1 < r2 && fix.errors)
            };
            let what = if fixing {
                "Repairing"
            } else if r1 < r2 {
                "ERROR"
            } else {
                "Leaked"
            };
            self.say(format!("{what} cluster {k} refcount={r1} reference={r2}"));
            if fixing {
                match self.set_stored(k, r2).await {
                    Ok(()) => {
                        if r1 > r2 {
                            res.leaks_fixed += 1;
                        } else {
                            res.corruptions_fixed += 1;
                        }
                        continue;
                    }
                    Err(e) => self.say(format!("ERROR fixing cluster {k}: {e}")),
                }
            }
            if r1 < r2 {
                res.corruptions += 1;
            } else {
                res.leaks += 1;
            }
        }
        Ok(highest)
    }

    /// Checks the refcounts; returns the counts and the image end offset.
    async fn check_refcounts(&mut self, fix: Fix) -> Result<(Res, u64)> {
        let mut res = Res::default();
        let mut imrt = Imrt {
            counts: Vec::new(),
            nb: self.file.size().div_ceil(self.cs),
        };
        let mut rebuild = false;
        self.calculate(&mut res, &mut imrt, fix, &mut rebuild)
            .await?;
        let pre = res;
        let mut highest = self
            .compare(&mut res, Fix::NONE, &mut rebuild, &imrt)
            .await?;
        if rebuild && fix.errors {
            let old = res;
            self.say("Rebuilding refcount structure".into());
            self.rebuild(&mut imrt).await?;
            res.corruptions = 0;
            res.leaks = 0;
            rebuild = false;
            imrt.counts.clear();
            self.calculate(&mut res, &mut imrt, Fix::NONE, &mut rebuild)
                .await?;
            let mut fresh = 0;
            if fix.leaks {
                let saved = res;
                let mut tmp = Res::default();
                highest = self
                    .compare(
                        &mut tmp,
                        Fix {
                            leaks: true,
                            errors: false,
                        },
                        &mut rebuild,
                        &imrt,
                    )
                    .await?;
                if rebuild {
                    self.say("ERROR rebuilt refcount structure is still broken".into());
                }
                fresh = tmp.leaks;
                res = saved;
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh;
        } else if fix.any() {
            if rebuild {
                self.say("ERROR need to rebuild refcount structures".into());
                return Err(corrupt(
                    &self.name,
                    "Check failed: the refcount structure needs a rebuild (repair with -r all)",
                ));
            }
            if res.leaks != 0 || res.corruptions != 0 {
                res = pre;
                highest = self.compare(&mut res, fix, &mut rebuild, &imrt).await?;
            }
        }
        self.check_copied(&mut res, fix).await?;
        Ok((res, (highest + 1) * self.cs))
    }

    /// QEMU's `rebuild_refcount_structure`: new refcount blocks and table
    /// from the computed refcounts, in free clusters (found as QEMU finds
    /// them), then the header switched to the new table. The old
    /// structure's clusters are leaked (the caller fixes that).
    async fn rebuild(&mut self, imrt: &mut Imrt) -> Result<()> {
        self.blocks.clear();
        let mut table = Vec::new();
        let nb = imrt.nb;
        self.write_refblocks(imrt, 0, nb, &mut table).await?;
        let (rt_off, clusters) = loop {
            let clusters = (table.len() as u64 * 8).div_ceil(self.cs);
            let mut ffc = 0;
            let off = imrt.alloc(clusters, &mut ffc, self.cb);
            let s = off >> self.cb;
            let grown = self
                .write_refblocks(imrt, s, s + clusters, &mut table)
                .await?;
            if !grown {
                break (off, clusters);
            }
            for c in s..s + clusters {
                *imrt.slot(c) = 0;
            }
        };
        if clusters * self.cs > crate::format::MAX_REFTABLE_BYTES {
            return Err(corrupt(
                &self.name,
                "the rebuilt refcount table is too large",
            ));
        }
        let raw: Vec<u8> = table.iter().flat_map(|w| w.to_be_bytes()).collect();
        write_at(self.file, rt_off, &raw).await?;
        self.file.flush().await?;
        let mut hdr = rt_off.to_be_bytes().to_vec();
        hdr.extend_from_slice(&(clusters as u32).to_be_bytes());
        write_at(self.file, 48, &hdr).await?;
        self.file.flush().await?;
        self.reftable = table;
        self.reftable.resize((clusters * self.cs / 8) as usize, 0);
        self.h.refcount_table_offset = rt_off;
        self.h.refcount_table_clusters = clusters as u32;
        Ok(())
    }

    /// QEMU's `rebuild_refcounts_write_refblocks`: writes the refcount
    /// blocks covering used clusters of `[first, end)`, allocating those
    /// missing from `table`; true when `table` had to grow.
    async fn write_refblocks(
        &mut self,
        imrt: &mut Imrt,
        first: u64,
        mut end: u64,
        table: &mut Vec<u64>,
    ) -> Result<bool> {
        let per = 1u64 << self.rb_bits;
        let entries_per_cluster = (self.cs / 8) as usize;
        let mut ffc = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            let next = imrt.used(cluster..end).next().map(|(k, _)| k);
            let Some(c) = next else { break };
            let bi = (c >> self.rb_bits) as usize;
            let start = bi as u64 * per;
            let boff = if bi < table.len() && table[bi] != 0 {
                table[bi]
            } else {
                ffc = ffc.max(start);
                let off = imrt.alloc(1, &mut ffc, self.cb);
                end = end.max((off >> self.cb) + 1);
                if table.len() <= bi {
                    let n = (bi + 1).div_ceil(entries_per_cluster) * entries_per_cluster;
                    table.resize(n, 0);
                    grown = true;
                }
                table[bi] = off;
                off
            };
            let mut block = vec![0u8; self.cs as usize];
            for (k, v) in imrt.used(start..start + per) {
                rc_put(&mut block, k - start, self.order, v);
            }
            write_at(self.file, boff, &block).await?;
            cluster = start + per;
        }
        Ok(grown)
    }

    /// QEMU's `check_oflag_copied`: `COPIED` set exactly on the active
    /// tables' entries whose cluster has refcount 1.
    async fn check_copied(&mut self, res: &mut Res, fix: Fix) -> Result<()> {
        let repair = fix.errors
            || (fix.leaks && res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0);
        let what = if repair { "Repairing" } else { "ERROR" };
        let esz = if self.ext { 2 } else { 1 };
        for i in 0..self.l1.len() {
            let l1e = self.l1[i];
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let Some(rc) = self.stored(l2 >> self.cb).await? else {
                continue;
            };
            if (rc == 1) != (l1e & COPIED != 0) {
                res.corruptions += 1;
                self.say(format!(
                    "{what} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                ));
                if repair {
                    let new = if rc == 1 { l1e | COPIED } else { l1e & !COPIED };
                    let at = self.h.l1_table_offset + i as u64 * 8;
                    write_at(self.file, at, &new.to_be_bytes()).await?;
                    self.l1[i] = new;
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                }
            }
            let mut t = be_words(&read_vec(self.file, l2, self.cs).await?);
            let mut dirty = 0;
            for j in 0..t.len() / esz {
                let e = t[j * esz];
                if !matches!(self.kind(e), Kind::Normal | Kind::ZeroAlloc) {
                    continue;
                }
                let rc = if self.data_file {
                    1
                } else {
                    match self.stored((e & OFFSET_MASK) >> self.cb).await? {
                        Some(v) => v,
                        None => continue,
                    }
                };
                if (rc == 1) != (e & COPIED != 0) {
                    res.corruptions += 1;
                    self.say(format!(
                        "{what} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                    ));
                    if repair {
                        t[j * esz] = if rc == 1 { e | COPIED } else { e & !COPIED };
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                let raw: Vec<u8> = t.iter().flat_map(|w| w.to_be_bytes()).collect();
                write_at(self.file, l2, &raw).await?;
                res.corruptions -= dirty;
                res.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }

    /// Clears the dirty and corrupt bits after a successful repair.
    async fn mark_clean(&mut self) -> Result<()> {
        let bits = incompat::DIRTY | incompat::CORRUPT;
        if self.h.version < 3 || self.h.incompatible_features & bits == 0 {
            self.file.flush().await?;
            return Ok(());
        }
        // Everything repaired is durable before the header says so.
        self.file.flush().await?;
        let v = self.h.incompatible_features & !bits;
        write_at(self.file, 72, &v.to_be_bytes()).await?;
        self.file.flush().await?;
        self.h.incompatible_features = v;
        Ok(())
    }
}
