//! Writing the image header: the serialised header area of cluster 0
//! (fixed header, extensions, backing file name), the backing file
//! rewrite (QEMU's `qcow2_change_backing_file`), and [`HeaderCell`], the
//! driver's in-memory header that such rewrites (and resizes) replace.
//!
//! A rewrite starts from the header as it is on disk, not from memory:
//! the write side changes single fields in place (the refcount table
//! offset when the table grows, the autoclear bits), and a rewrite keeps
//! every byte it does not mean to change.

use crate::driver::Qcow2Driver;
use crate::format::{autoclear, corrupt, ext, Extension, Header, MAX_BACKING_NAME, V2_HEADER_LEN};
use sluice_core::{Error, IoBytes, Node, Result, WriteFlags};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Buckets of [`HeaderCell`]: bucket `k` holds `2^k` versions.
const BUCKETS: usize = 40;

/// The driver's header, replaceable while `&Header`s handed out earlier
/// stay valid: versions are kept (append-only, a few hundred bytes each,
/// one per header change) so readers need no lock and no guard that
/// would have to live across an `.await`.
pub struct HeaderCell {
    /// Version `i` lives in bucket `log2(i + 1)` at `i + 1 - 2^k`.
    buckets: [OnceLock<Box<[OnceLock<Header>]>>; BUCKETS],
    current: AtomicUsize,
    /// Serialises [`HeaderCell::set`].
    update: parking_lot::Mutex<()>,
}

impl HeaderCell {
    pub fn new(h: Header) -> HeaderCell {
        let cell = HeaderCell {
            buckets: std::array::from_fn(|_| OnceLock::new()),
            current: AtomicUsize::new(0),
            update: parking_lot::Mutex::new(()),
        };
        cell.slot(0).set(h).expect("a new cell is empty");
        cell
    }

    fn slot(&self, i: usize) -> &OnceLock<Header> {
        let k = (i + 1).ilog2() as usize;
        let bucket =
            self.buckets[k].get_or_init(|| (0..1usize << k).map(|_| OnceLock::new()).collect());
        &bucket[i + 1 - (1 << k)]
    }

    /// The current header.
    pub fn get(&self) -> &Header {
        let i = self.current.load(Ordering::Acquire);
        self.slot(i).get().expect("the current version is set")
    }

    /// Makes `h` the current header.
    pub fn set(&self, h: Header) {
        let _g = self.update.lock();
        let next = self.current.load(Ordering::Acquire) + 1;
        // 2^40 versions cannot be reached by header rewrites.
        assert!(next + 1 < 1 << BUCKETS, "too many header versions");
        if self.slot(next).set(h).is_err() {
            unreachable!("versions are only set under the update lock");
        }
        self.current.store(next, Ordering::Release);
    }
}

impl std::fmt::Debug for HeaderCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// Length of the fixed part of `h` as stored: 72 bytes for version 2,
/// `header_length` for version 3.
pub fn fixed_len(h: &Header) -> usize {
    if h.version >= 3 {
        h.header_length as usize
    } else {
        V2_HEADER_LEN as usize
    }
}

/// Appends the extensions and the end marker, each padded to 8 bytes.
pub fn push_extensions(out: &mut Vec<u8>, exts: &[Extension]) {
    for e in exts {
        out.extend_from_slice(&e.kind.to_be_bytes());
        out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out.extend_from_slice(&[0u8; 8]);
}

/// Where the used part of the header area of `h` ends: after the end
/// marker of its extensions, or after its backing file name.
pub fn used_len(h: &Header) -> usize {
    let mut area = Vec::new();
    push_extensions(&mut area, &h.extensions);
    let ext_end = fixed_len(h) + area.len();
    let name_end = if h.backing_file_offset != 0 {
        (h.backing_file_offset + u64::from(h.backing_file_size)) as usize
    } else {
        0
    };
    ext_end.max(name_end)
}

/// The header area of cluster 0 with a new backing file link: the fixed
/// header bytes of `raw` (as on disk) with the backing name offset and
/// size set, the extensions of `h` (parsed from `raw`) with the backing
/// format extension replaced, added (first, where QEMU puts it) or
/// dropped, the end marker and the name. `None` for the file drops the
/// format too. An error when it does not fit in one cluster.
pub fn with_backing(
    raw: &[u8],
    h: &Header,
    backing_file: Option<&str>,
    backing_fmt: Option<&str>,
    file: &str,
) -> Result<Vec<u8>> {
    let fixed = fixed_len(h);
    let mut out = raw[..fixed].to_vec();
    let mut exts: Vec<Extension> = Vec::with_capacity(h.extensions.len() + 1);
    if let (Some(_), Some(fmt)) = (backing_file, backing_fmt) {
        exts.push(Extension {
            kind: ext::BACKING_FORMAT,
            data: fmt.as_bytes().to_vec(),
        });
    }
    exts.extend(
        h.extensions
            .iter()
            .filter(|e| e.kind != ext::BACKING_FORMAT)
            .cloned(),
    );
    push_extensions(&mut out, &exts);
    let (offset, size) = match backing_file {
        Some(name) => {
            let at = out.len() as u64;
            out.extend_from_slice(name.as_bytes());
            (at, name.len() as u32)
        }
        None => (0, 0),
    };
    out[8..16].copy_from_slice(&offset.to_be_bytes());
    out[16..20].copy_from_slice(&size.to_be_bytes());
    let cs = h.cluster_size();
    if out.len() as u64 > cs {
        return Err(corrupt(
            file,
            format!(
                "cannot change the backing file: the header, its extensions and the backing file name need {} bytes, more than the {cs}-byte first cluster holds",
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// Checks a new backing link as QEMU does before writing anything.
fn check_backing(
    h: &Header,
    backing_file: Option<&str>,
    backing_fmt: Option<&str>,
    node: &str,
) -> Result<()> {
    let bad = |msg: String| Error::InvalidRequest {
        node: node.to_string(),
        reason: msg,
    };
    match backing_file {
        None if backing_fmt.is_some() => Err(bad(
            "a backing format needs a backing file (none was given)".into(),
        )),
        Some(name) if name.len() > MAX_BACKING_NAME as usize => Err(bad(format!(
            "backing file name of {} bytes is too long (at most {MAX_BACKING_NAME})",
            name.len()
        ))),
        Some(_) if h.autoclear_features & autoclear::DATA_FILE_RAW != 0 => Err(bad(
            "cannot add a backing file to an image whose external data file is raw (data_file_raw): the data file alone would no longer show the disk"
                .into(),
        )),
        Some(_) if backing_fmt.is_some_and(|f| f.len() > 1023) => {
            Err(bad("backing format name is too long".into()))
        }
        _ => Ok(()),
    }
}

/// Rewrites the backing file link of the image under `node` (QEMU's
/// `qcow2_change_backing_file`): one write of cluster 0's used area,
/// then a flush, then the in-memory header. The caller has the node
/// drained (a job's last step), so no request changes the header
/// meanwhile.
pub async fn change_backing_file(
    d: &Qcow2Driver,
    node: &Node,
    backing_file: Option<&str>,
    backing_fmt: Option<&str>,
) -> Result<()> {
    if node.is_read_only() {
        return Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: "qcow2",
            what: "changing the backing file of a read-only qcow2 node",
        });
    }
    let file = d.file(node)?;
    let name = d.name();
    let cs = d.header().cluster_size();
    let len = cs.min(file.size());
    let raw = file.read_to_vec(0, len as usize).await?;
    let cur = Header::parse(&raw, file.size(), name)?;
    check_backing(&cur, backing_file, backing_fmt, node.name())?;
    let mut new = with_backing(&raw, &cur, backing_file, backing_fmt, name)?;
    // The old name and extensions beyond the new end are cleared.
    let old_end = used_len(&cur);
    if new.len() < old_end {
        new.resize(old_end, 0);
    }
    // Check what is written before writing it.
    let parsed = Header::parse(&new, file.size().max(new.len() as u64), name)?;
    let end = new.len() as u64;
    if end > file.size() {
        file.set_size(end);
    }
    file.write(0, IoBytes::copy_from(&new), WriteFlags::default())
        .await?;
    file.flush().await?;
    d.set_header(parsed);
    Ok(())
}

/// QEMU's feature name table, which it writes into every version 3
/// image it creates: (type, bit, name).
pub const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The feature name table extension of [`FEATURE_NAMES`].
pub fn feature_table_ext() -> Extension {
    let mut data = Vec::with_capacity(FEATURE_NAMES.len() * 48);
    for (kind, bit, name) in FEATURE_NAMES {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&e);
    }
    Extension {
        kind: ext::FEATURE_TABLE,
        data,
    }
}

/// Length of the version 3 header QEMU writes: the 104 mandatory bytes,
/// the compression type byte and padding to 8.
pub const V3_WRITTEN_LEN: u32 = 112;

/// Serialises `h` into the header area of cluster 0: the fixed fields,
/// `h.extensions` in order, the end marker and `h.backing_file`
/// (whose offset and size are computed here). An error when it does not
/// fit in one cluster.
pub fn encode(h: &Header, file: &str) -> Result<Vec<u8>> {
    let fixed = if h.version >= 3 {
        h.header_length.max(V3_WRITTEN_LEN) as usize
    } else {
        V2_HEADER_LEN as usize
    };
    let mut out = vec![0u8; fixed];
    let put32 =
        |out: &mut [u8], at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |out: &mut [u8], at: usize, v: u64| out[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut out, 0, crate::format::MAGIC);
    put32(&mut out, 4, h.version);
    put32(&mut out, 20, h.cluster_bits);
    put64(&mut out, 24, h.size);
    put32(&mut out, 32, h.crypt_method);
    put32(&mut out, 36, h.l1_size);
    put64(&mut out, 40, h.l1_table_offset);
    put64(&mut out, 48, h.refcount_table_offset);
    put32(&mut out, 56, h.refcount_table_clusters);
    put32(&mut out, 60, h.nb_snapshots);
    put64(&mut out, 64, h.snapshots_offset);
    if h.version >= 3 {
        put64(&mut out, 72, h.incompatible_features);
        put64(&mut out, 80, h.compatible_features);
        put64(&mut out, 88, h.autoclear_features);
        put32(&mut out, 96, h.refcount_order);
        put32(&mut out, 100, fixed as u32);
        out[104] = match h.compression_type {
            crate::format::CompressionType::Zlib => 0,
            crate::format::CompressionType::Zstd => 1,
        };
    }
    with_backing(
        &out,
        &Header {
            header_length: fixed as u32,
            ..h.clone()
        },
        h.backing_file.as_deref(),
        h.backing_format.as_deref(),
        file,
    )
}
