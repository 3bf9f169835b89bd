//! Amending a qcow2 image (QEMU's `qcow2_amend_options`, `qemu-img
//! amend -o ...`): the options QEMU can change on an existing image,
//! parsed and refused with QEMU's messages, applied in QEMU's order:
//! upgrade (`compat=1.1`), the header rewrite, `lazy_refcounts`, `size`,
//! downgrade (`compat=0.10`) last.
//!
//! Unlike QEMU, every refusal QEMU could reach is checked before the
//! first write, so a refused amend leaves the image as it was (QEMU may
//! have rewritten the header or expanded zero clusters by then).
//!
//! The header is rewritten as QEMU's `qcow2_update_header` writes it:
//! the whole first cluster, the fixed part (72 bytes for version 2, 112
//! for version 3), then the backing format, the external data file name,
//! the feature name table (version 3 with clusters above 4 KiB), the
//! bitmaps extension (when the image had valid bitmaps), unknown
//! extensions in their order, the end marker and the backing file name.
//!
//! A downgrade turns zero clusters into what version 2 can say (QEMU's
//! `qcow2_expand_zero_clusters`): without a backing file they become
//! unallocated; with one, a plain zero cluster gets a new zeroed cluster
//! and a preallocated one keeps its host cluster, zeroed.
//!
//! The amend works on an image opened detached ([`crate::detached`]):
//! its one qcow2 driver, and a node holding its `file`, `backing` and
//! `data-file` children as the block layer opened them.

use crate::detached::Detached;
use crate::driver::{read_meta, read_words, Mapping, Qcow2Driver};
use crate::format::{
    autoclear, compat, ext, incompat, CompressionType, Extension, Header, OFFSET_MASK,
};
use sluice_core::{Error, IoBytes, Node, Result, Role, WriteFlags};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What `qemu-img amend -o help` prints for qcow2.
pub const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Options of `qemu-img create -f qcow2` that amend refuses.
const CREATE_ONLY: &[&str] = &[
    "encrypt",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
];

/// The amendable options as given (`None`: not given; the last of a
/// repeated option wins, as in QEMU).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// `compat` as given (checked when amending, as QEMU does).
    pub compat: Option<String>,
    pub size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub data_file: Option<String>,
    pub data_file_raw: Option<bool>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: Option<u64>,
    /// Some `encrypt.*` option was given.
    pub encrypt: bool,
}

fn msg(m: impl Into<String>) -> Error {
    Error::Other(m.into())
}

/// QemuOpts' boolean spellings.
fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(msg(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

/// QemuOpts' numbers (`strtou64` with base 0).
fn parse_number(key: &str, v: &str) -> Result<u64> {
    let t = v.trim();
    let n = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()
    } else {
        t.parse().ok()
    };
    n.ok_or_else(|| msg(format!("Parameter '{key}' expects a number")))
}

fn parse_size(key: &str, v: &str) -> Result<u64> {
    crate::options::parse_size(v).ok_or_else(|| {
        msg(format!(
            "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        ))
    })
}

impl AmendOptions {
    /// Parses `key=value` pairs in order, as QEMU's option parser does
    /// with qcow2's amend option list: the first bad one is the error.
    pub fn parse(pairs: &[(String, String)]) -> Result<AmendOptions> {
        let mut o = AmendOptions::default();
        for (k, v) in pairs {
            match k.as_str() {
                "size" => o.size = Some(parse_size(k, v)?),
                "compat" => o.compat = Some(v.clone()),
                "backing_file" => o.backing_file = Some(v.clone()),
                "backing_fmt" => o.backing_fmt = Some(v.clone()),
                "data_file" => o.data_file = Some(v.clone()),
                "data_file_raw" => o.data_file_raw = Some(parse_bool(k, v)?),
                "lazy_refcounts" => o.lazy_refcounts = Some(parse_bool(k, v)?),
                "refcount_bits" => o.refcount_bits = Some(parse_number(k, v)?),
                "encrypt.keyslot" | "encrypt.iter-time" => {
                    parse_number(k, v)?;
                    o.encrypt = true;
                }
                "encrypt.state" | "encrypt.old-secret" | "encrypt.new-secret" => o.encrypt = true,
                k if CREATE_ONLY.contains(&k) => {
                    return Err(msg(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                k => return Err(msg(format!("Invalid parameter '{k}'"))),
            }
        }
        Ok(o)
    }
}

/// A progress report of a version change, as QEMU's status callback
/// gives it: (done, total) — an upgrade in two steps, a downgrade per L1
/// entry (the snapshots' included). Nothing else reports progress.
pub type ProgressFn<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// QEMU's messages for errors of the layers below (resize): the reason
/// alone, without the node name.
fn plain(e: Error) -> Error {
    match e {
        Error::InvalidRequest { reason, .. } => Error::Other(reason),
        e => e,
    }
}

/// Amends the qcow2 image `img` (opened writable, with its backing
/// chain) as `qemu-img amend -o ...` does. `force` is QEMU's `--force`
/// (it only matters for encryption, which sluice does not support).
/// Refusals carry QEMU's messages and write nothing. `img`'s driver is
/// the only one on the image file: a change of version or refcount
/// width opens it again (the old one dropped first).
pub async fn amend(
    img: &mut Detached,
    o: &AmendOptions,
    _force: bool,
    progress: ProgressFn<'_>,
) -> Result<()> {
    let node = img.node.clone();
    let node = &*node;
    let file = img.file()?;
    let Some(mut writer) = img.driver.writer.get() else {
        return Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: "qcow2",
            what: "amending a read-only qcow2 node",
        });
    };
    let d = &img.driver;
    let mut plan = Plan::new(d, node, &file, o).await?;

    // Bitmaps QEMU loaded at open survive its header rewrites.
    let h0 = d.header().clone();
    let keep_bitmaps = h0.autoclear_features & autoclear::BITMAPS != 0
        && h0.bitmaps.as_ref().is_some_and(|b| b.nb_bitmaps > 0);
    let raw0 = read_meta(
        &file,
        0,
        h0.cluster_size().min(file.size()),
        "header",
        d.name(),
    )
    .await?
    .to_vec();

    if plan.new_version > plan.old_version {
        progress(0, 2);
        // (Snapshot tables needing the version 3 extra data were refused.)
        progress(1, 2);
        let mut h = d.header().clone();
        h.version = 3;
        h.header_length = crate::header_write::V3_WRITTEN_LEN;
        h.refcount_order = 4;
        h.compression_type = CompressionType::Zlib;
        update_header(d, &file, h, keep_bitmaps, &raw0).await?;
        progress(2, 2);
    }
    let new_refcounts = plan.refcounts.is_some();
    if let Some((order, counts)) = plan.refcounts.take() {
        writer.flush(d, &file, true).await?;
        change_refcount_order(d, &file, counts, order, keep_bitmaps, &raw0).await?;
    }
    if plan.new_version > plan.old_version || new_refcounts {
        // The driver starts over on the new header (its L2 entry layout
        // and refcount structure).
        writer.flush(d, &file, true).await?;
        drop(writer);
        // The old driver writes nothing more (everything is written back
        // and the image clean): no second writer meets the new one.
        img.driver.writer.set(None);
        img.driver = Qcow2Driver::open(&file, &img.options, false).await?;
        writer = img.driver.writer.get().ok_or_else(|| Error::NodeClosed {
            node: node.name().to_string(),
        })?;
    }
    let d = &img.driver;

    // The data file settings, then QEMU's unconditional header rewrite.
    let mut h = d.header().clone();
    if plan.data_file_raw {
        h.autoclear_features |= autoclear::DATA_FILE_RAW;
    } else {
        h.autoclear_features &= !autoclear::DATA_FILE_RAW;
    }
    if let Some(df) = &o.data_file {
        h.data_file = (!df.is_empty()).then(|| df.clone());
    }
    update_header(d, &file, h, keep_bitmaps, &raw0).await?;

    if plan.lazy != plan.old_lazy {
        let mut h = d.header().clone();
        if plan.lazy {
            h.compatible_features |= compat::LAZY_REFCOUNTS;
        } else {
            // The image is made clean first.
            writer.flush(d, &file, true).await?;
            h = d.header().clone();
            h.compatible_features &= !compat::LAZY_REFCOUNTS;
        }
        update_header(d, &file, h, keep_bitmaps, &raw0).await?;
        writer.set_lazy(plan.lazy).await;
    }

    if let Some(size) = plan.size {
        crate::resize::truncate(d, node, size, "off")
            .await
            .map_err(plain)?;
        node.set_size(size);
    }

    if plan.new_version < plan.old_version {
        downgrade(d, node, &file, &writer, keep_bitmaps, &raw0, progress).await?;
    }

    writer.flush(d, &file, true).await
}

/// What an amend will do, every refusal checked first (in the order
/// QEMU reaches them).
struct Plan {
    old_version: u32,
    new_version: u32,
    old_lazy: bool,
    lazy: bool,
    data_file_raw: bool,
    size: Option<u64>,
    /// A new refcount order, with every cluster's refcount (QEMU's
    /// `qcow2_change_refcount_order`).
    refcounts: Option<(u32, BTreeMap<u64, u64>)>,
}

impl Plan {
    async fn new(d: &Qcow2Driver, node: &Node, file: &Arc<Node>, o: &AmendOptions) -> Result<Plan> {
        let h = d.header();
        let old_version = h.version;
        let old_lazy = h.version >= 3 && h.compatible_features & compat::LAZY_REFCOUNTS != 0;
        let old_raw = h.has_data_file() && h.autoclear_features & autoclear::DATA_FILE_RAW != 0;
        // QEMU's option loop, in the order of its option list.
        if o.encrypt {
            return Err(msg(
                "Can't amend encryption options - encryption not present",
            ));
        }
        let new_version = match o.compat.as_deref() {
            None => old_version,
            Some("0.10" | "v2") => 2,
            Some("1.1" | "v3") => 3,
            Some(c) => return Err(msg(format!("Unknown compatibility level {c}"))),
        };
        let refcount_bits = o.refcount_bits.unwrap_or(u64::from(h.refcount_bits()));
        if refcount_bits == 0 || refcount_bits > 64 || !refcount_bits.is_power_of_two() {
            return Err(msg(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if o.data_file.is_some() && !h.has_data_file() {
            return Err(msg(
                "data-file can only be set for images that use an external data file",
            ));
        }
        let data_file_raw = o.data_file_raw.unwrap_or(old_raw);
        if data_file_raw && !old_raw {
            return Err(msg("data-file-raw cannot be set on existing images"));
        }
        if new_version > old_version {
            // Version 3 needs each snapshot's 64-bit VM state size and
            // disk size; QEMU rewrites the snapshot table for that.
            if d.snapshots().iter().any(|s| s.extra.len() < 16) {
                return Err(msg(
                    "Cannot upgrade this image: its internal snapshots lack the extra data version 3 requires, and rewriting the snapshot table is not supported by sluice yet",
                ));
            }
        }
        if refcount_bits != u64::from(h.refcount_bits()) {
            // The change itself comes after the upgrade, as in QEMU.
            if new_version < 3 && refcount_bits != 16 {
                return Err(msg(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
        }
        let refcounts = if refcount_bits != u64::from(h.refcount_bits()) {
            let counts = read_refcounts(d, file).await?;
            let order = refcount_bits.trailing_zeros();
            let max = if order >= 6 {
                u64::MAX
            } else {
                (1u64 << refcount_bits) - 1
            };
            if let Some((k, v)) = counts.iter().find(|(_, &v)| v > max) {
                return Err(msg(format!(
                    "Cannot decrease refcount entry width to {refcount_bits} bits: Cluster at offset {:#x} has a refcount of {v}",
                    k << h.cluster_bits
                )));
            }
            Some((order, counts))
        } else {
            None
        };
        if (o.backing_file.is_some() || o.backing_fmt.is_some())
            && (o.backing_file != h.backing_file || o.backing_fmt != h.backing_format)
        {
            return Err(msg(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
            ));
        }
        let lazy = o.lazy_refcounts.unwrap_or(old_lazy);
        if lazy && !old_lazy && new_version < 3 {
            return Err(msg(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        // `size=0` means no change, as in QEMU.
        let size = o.size.filter(|&s| s != 0);
        if let Some(s) = size {
            if !s.is_multiple_of(512) {
                return Err(msg("The new size must be a multiple of 512"));
            }
        }
        let final_size = size.unwrap_or(node.size());
        if new_version < old_version {
            downgrade_refusal(d, file, final_size, refcount_bits).await?;
        }
        Ok(Plan {
            old_version,
            new_version,
            old_lazy,
            lazy,
            data_file_raw,
            size,
            refcounts,
        })
    }
}

/// Why a downgrade to version 2 is refused (QEMU's `qcow2_downgrade`
/// checks, its zstd check included), if it is. `size` is the virtual
/// size the image will have then.
async fn downgrade_refusal(
    d: &Qcow2Driver,
    file: &Node,
    size: u64,
    refcount_bits: u64,
) -> Result<()> {
    let h = d.header();
    if refcount_bits != 16 {
        return Err(msg("compat=0.10 requires refcount_bits=16"));
    }
    if h.has_data_file() {
        return Err(msg("Cannot downgrade an image with a data file"));
    }
    if d.snapshots()
        .iter()
        .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size.unwrap_or(size) != size)
    {
        return Err(msg("Internal snapshots prevent downgrade of image"));
    }
    // The dirty bit is cleared first; a compression type goes later.
    let left = h.incompatible_features & !(incompat::DIRTY | incompat::COMPRESSION);
    if left != 0 {
        return Err(msg(format!(
            "Cannot downgrade an image with incompatible features {left:#x} set"
        )));
    }
    if h.incompatible_features & incompat::COMPRESSION != 0
        && h.compression_type != CompressionType::Zlib
        && has_compressed_clusters(d, file, h.size).await?
    {
        return Err(msg(
            "Cannot downgrade an image with zstd compression type and existing compressed clusters",
        ));
    }
    // QEMU expands zero clusters of snapshot tables too; sluice only
    // those of the active layer.
    for s in d.snapshots() {
        let l1 = read_words(
            file,
            s.l1_table_offset,
            u64::from(s.l1_size) * 8,
            "snapshot L1 table",
            d.name(),
        )
        .await?;
        for e in l1 {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let table = d.l2_table(file, l2).await?;
            let zero = table.iter().any(|&w| {
                matches!(
                    d.layout().decode(w),
                    Ok(crate::format::L2Entry::Zero { .. })
                )
            });
            if zero {
                return Err(msg(format!(
                    "Cannot downgrade this image: internal snapshot '{}' has zero clusters, and expanding those is not supported by sluice yet",
                    s.name
                )));
            }
        }
    }
    Ok(())
}

/// Whether the active layer maps any compressed cluster.
async fn has_compressed_clusters(d: &Qcow2Driver, file: &Node, size: u64) -> Result<bool> {
    let mut pos = 0;
    while pos < size {
        let (m, n) = d.map(file, pos, size - pos).await?;
        if matches!(m, Mapping::Compressed { .. }) {
            return Ok(true);
        }
        pos += n;
    }
    Ok(false)
}

/// The downgrade itself (checked already): the image made clean, zero
/// clusters expanded, everything written back, then the version 2
/// header.
async fn downgrade(
    d: &Qcow2Driver,
    node: &Node,
    file: &Node,
    writer: &crate::write::Writer,
    keep_bitmaps: bool,
    raw0: &[u8],
    progress: ProgressFn<'_>,
) -> Result<()> {
    writer.flush(d, file, true).await?;
    // Nothing this writer does from here may set the dirty bit, which a
    // version 2 header does not have.
    writer.set_lazy(false).await;
    let backing = node.child(Role::Backing).is_some();
    let h = d.header().clone();
    let cs = h.cluster_size();
    let span = cs << h.l2_bits();
    // Progress counts L1 entries, the snapshots' included, as QEMU's.
    let total = u64::from(h.l1_size)
        + d.snapshots()
            .iter()
            .map(|s| u64::from(s.l1_size))
            .sum::<u64>();
    let mut visited = 0;
    for i in 0..u64::from(h.l1_size) {
        let end = ((i + 1) * span).min(h.size);
        let mut pos = i * span;
        while pos < end {
            let (m, n) = d.map(file, pos, end - pos).await?;
            if m == Mapping::Zero {
                let mut g = pos & !(cs - 1);
                while g < pos + n {
                    writer.expand_zero_cluster(d, node, g, backing).await?;
                    g += cs;
                }
            }
            pos += n;
        }
        visited += 1;
        progress(visited, total);
    }
    // The snapshots' tables have no zero clusters (checked).
    while visited < total {
        visited += 1;
        progress(visited, total);
    }
    writer.flush(d, file, true).await?;
    let mut h = d.header().clone();
    h.version = 2;
    h.header_length = crate::format::V2_HEADER_LEN;
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.compression_type = CompressionType::Zlib;
    update_header(d, file, h, keep_bitmaps, raw0).await
}

/// The refcount table's entries: the offsets of the refcount blocks (0
/// where there is none).
async fn refcount_table(d: &Qcow2Driver, file: &Node) -> Result<Vec<u64>> {
    let h = d.header();
    let table = read_words(
        file,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * h.cluster_size(),
        "reference count table",
        d.name(),
    )
    .await?;
    Ok(table.into_iter().map(|e| e & OFFSET_MASK).collect())
}

/// Every cluster's refcount as the image's refcount structure stores it
/// (clusters with refcount 0 left out).
async fn read_refcounts(d: &Qcow2Driver, file: &Node) -> Result<BTreeMap<u64, u64>> {
    let h = d.header();
    let cs = h.cluster_size();
    let order = h.refcount_order;
    let per = cs * 8 / u64::from(h.refcount_bits());
    let mut counts = BTreeMap::new();
    for (i, b) in refcount_table(d, file).await?.into_iter().enumerate() {
        if b == 0 {
            continue;
        }
        let block = read_meta(file, b, cs, "refcount block", d.name()).await?;
        for j in 0..per {
            let v = crate::write::rc_get(&block, j, order);
            if v != 0 {
                counts.insert(i as u64 * per + j, v);
            }
        }
    }
    Ok(counts)
}

/// Rebuilds the refcount structure with `1 << order`-bit entries (QEMU's
/// `qcow2_change_refcount_order`), from `counts` (every cluster's
/// refcount, read from the old structure of the clean image): the old
/// table and blocks lose their references, new blocks (covering every
/// cluster up to their own end) and a new table go past the end of
/// everything in use and are written and flushed, then one header
/// rewrite switches to them. A crash before that leaves the old
/// structure in charge (the new clusters past its end are ignored).
async fn change_refcount_order(
    d: &Qcow2Driver,
    file: &Node,
    mut counts: BTreeMap<u64, u64>,
    order: u32,
    keep_bitmaps: bool,
    raw0: &[u8],
) -> Result<()> {
    let mut h = d.header().clone();
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let mut release = |k: u64| {
        if let Some(v) = counts.get_mut(&k) {
            *v -= 1;
            if *v == 0 {
                counts.remove(&k);
            }
        }
    };
    let rt = refcount_table(d, file).await?;
    for c in 0..u64::from(h.refcount_table_clusters) {
        release((h.refcount_table_offset >> cb) + c);
    }
    for b in rt {
        if b != 0 {
            release(b >> cb);
        }
    }
    let per = (cs * 8) >> order;
    let used_end = counts.keys().next_back().map_or(0, |k| k + 1);
    let start = used_end.max(file.size().div_ceil(cs));
    let (mut nb, mut nt) = (0u64, 0u64);
    loop {
        let end = start + nb + nt;
        let nb2 = end.div_ceil(per).max(1);
        let nt2 = (nb2 * 8).div_ceil(cs);
        if (nb2, nt2) == (nb, nt) {
            break;
        }
        (nb, nt) = (nb2, nt2);
    }
    if nt * cs > crate::format::MAX_REFTABLE_BYTES {
        return Err(msg(
            "This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting",
        ));
    }
    for c in start..start + nb + nt {
        counts.insert(c, 1);
    }
    let mut blocks = vec![0u8; (nb * cs) as usize];
    for (&k, &v) in &counts {
        let (bi, j) = (k / per, k % per);
        let at = (bi * cs) as usize;
        crate::write::rc_put(&mut blocks[at..at + cs as usize], j, order, v);
    }
    let mut table = vec![0u8; (nt * cs) as usize];
    for bi in 0..nb {
        let at = (bi * 8) as usize;
        table[at..at + 8].copy_from_slice(&((start + bi) << cb).to_be_bytes());
    }
    crate::write::grow(file, (start + nb + nt) << cb);
    file.write(
        start << cb,
        IoBytes::copy_from(&blocks),
        WriteFlags::default(),
    )
    .await?;
    file.write(
        (start + nb) << cb,
        IoBytes::copy_from(&table),
        WriteFlags::default(),
    )
    .await?;
    file.flush().await?;
    h.refcount_order = order;
    h.refcount_table_offset = (start + nb) << cb;
    h.refcount_table_clusters = nt as u32;
    update_header(d, file, h, keep_bitmaps, raw0).await
}

/// QEMU's `qcow2_update_header`: the first cluster rewritten from `h`
/// (extensions in QEMU's order, the rest of the cluster zeroed), then a
/// flush; the driver's header follows. `raw0` is the first cluster as
/// it was when the amend began (for unknown version 3 header fields).
async fn update_header(
    d: &Qcow2Driver,
    file: &Node,
    mut h: Header,
    keep_bitmaps: bool,
    raw0: &[u8],
) -> Result<()> {
    let cs = h.cluster_size();
    let mut exts = Vec::new();
    if h.has_data_file() {
        if let Some(df) = &h.data_file {
            exts.push(Extension {
                kind: ext::DATA_FILE,
                data: df.as_bytes().to_vec(),
            });
        }
    }
    if h.version >= 3 && cs > 4096 {
        exts.push(crate::header_write::feature_table_ext());
    }
    if keep_bitmaps {
        if let Some(b) = &h.bitmaps {
            exts.push(Extension {
                kind: ext::BITMAPS,
                data: b.raw.clone(),
            });
        }
    }
    const KNOWN: [u32; 5] = [
        ext::BACKING_FORMAT,
        ext::FEATURE_TABLE,
        ext::BITMAPS,
        ext::CRYPTO,
        ext::DATA_FILE,
    ];
    exts.extend(
        h.extensions
            .iter()
            .filter(|e| !KNOWN.contains(&e.kind))
            .cloned(),
    );
    h.extensions = exts;
    // Unknown fields past QEMU's 112 bytes stay (version 3 only).
    let unknown = if h.version >= 3 && raw0.len() >= 104 {
        let old_len = u32::from_be_bytes(raw0[100..104].try_into().expect("4 bytes"));
        let v3 = u32::from_be_bytes(raw0[4..8].try_into().expect("4 bytes")) >= 3;
        if v3 && old_len > crate::header_write::V3_WRITTEN_LEN && old_len as usize <= raw0.len() {
            raw0[crate::header_write::V3_WRITTEN_LEN as usize..old_len as usize].to_vec()
        } else {
            Vec::new()
        }
    } else {
        Vec::new()
    };
    h.header_length = if h.version >= 3 {
        crate::header_write::V3_WRITTEN_LEN + unknown.len() as u32
    } else {
        crate::format::V2_HEADER_LEN
    };
    let mut bytes = crate::header_write::encode(&h, d.name())?;
    if !unknown.is_empty() {
        let at = crate::header_write::V3_WRITTEN_LEN as usize;
        bytes[at..at + unknown.len()].copy_from_slice(&unknown);
    }
    let parsed = Header::parse(&bytes, file.size().max(bytes.len() as u64), d.name())?;
    bytes.resize(cs as usize, 0);
    crate::write::grow(file, cs);
    file.write(0, IoBytes::copy_from(&bytes), WriteFlags::default())
        .await?;
    file.flush().await?;
    d.set_header(parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_parse_with_qemu_messages() {
        let o = AmendOptions::parse(&pairs(&[
            ("compat", "0.10"),
            ("size", "1M"),
            ("lazy_refcounts", "y"),
            ("refcount_bits", "0x10"),
        ]))
        .unwrap();
        assert_eq!(o.compat.as_deref(), Some("0.10"));
        assert_eq!(o.size, Some(1 << 20));
        assert_eq!(o.lazy_refcounts, Some(true));
        assert_eq!(o.refcount_bits, Some(16));
        for (p, want) in [
            (("cluster_size", "4k"), "Invalid parameter 'cluster_size'\nThis option is only supported for image creation"),
            (("bogus", "1"), "Invalid parameter 'bogus'"),
            (("lazy_refcounts", "maybe"), "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
            (("refcount_bits", "abc"), "Parameter 'refcount_bits' expects a number"),
            (("size", "abc"), "Parameter 'size' expects a non-negative number below 2^64"),
            (("encrypt.keyslot", "x"), "Parameter 'encrypt.keyslot' expects a number"),
        ] {
            let e = AmendOptions::parse(&pairs(&[p])).unwrap_err().to_string();
            assert!(e.starts_with(want), "{p:?}: {e}");
        }
    }
}
