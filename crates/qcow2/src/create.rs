//! Creating qcow2 images (QEMU's `qcow2_co_create`, `qemu-img create -f
//! qcow2 -o ...`): the options with QEMU's names and messages, and a
//! fresh image written onto an opened protocol node.
//!
//! The layout is QEMU's: the header in cluster 0, the refcount table from
//! cluster 1, its refcount blocks, the L1 table; with preallocation each
//! L2 table followed by the data clusters it maps. Everything from
//! cluster 0 to the end is in use, so every refcount is 1. The header
//! is written last: until then the file is not a qcow2 image at all.

use crate::format::{
    autoclear, compat, ext, incompat, CompressionType, Extension, Header, COPIED, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
};
use serde_json::{Map, Value};
use sluice_core::{Error, IoBytes, Node, Result, WriteFlags};
use std::sync::Arc;

/// QEMU's `preallocation` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prealloc {
    #[default]
    Off,
    /// L2 tables and data clusters allocated, the data left sparse.
    Metadata,
    /// As `metadata`, the data area allocated with `fallocate`.
    Falloc,
    /// As `metadata`, the data area written with zeroes.
    Full,
}

impl Prealloc {
    pub fn parse(s: &str) -> Option<Prealloc> {
        Some(match s {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// The options of `qemu-img create -f qcow2 -o ...` (QEMU's names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// The virtual size; `None` takes the backing image's.
    pub size: Option<u64>,
    pub cluster_size: u64,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    /// 2 (`compat=0.10`/`v2`) or 3 (`compat=1.1`/`v3`).
    pub version: u32,
    pub lazy_refcounts: bool,
    pub refcount_bits: u64,
    pub preallocation: Prealloc,
    pub extended_l2: bool,
    pub compression_type: CompressionType,
    pub data_file: Option<String>,
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            backing_file: None,
            backing_fmt: None,
            version: 3,
            lazy_refcounts: false,
            refcount_bits: 16,
            preallocation: Prealloc::Off,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
        }
    }
}

fn err(msg: impl Into<String>) -> Error {
    Error::invalid_option("qcow2", msg)
}

fn string(key: &str, v: Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(err(format!(
            "Invalid parameter type for '{key}', expected: string, got {other}"
        ))),
    }
}

/// A size as `qemu-img create -o` takes it
/// ([`crate::options::parse_size`]), or a JSON number.
fn size(key: &str, v: Value) -> Result<u64> {
    let bad = || {
        err(format!(
            "Parameter '{key}' expects a non-negative number below 2^64"
        ))
    };
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(s) => crate::options::parse_size(&s).ok_or_else(bad),
        _ => Err(bad()),
    }
}

fn number(key: &str, v: Value) -> Result<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| err(format!("Parameter '{key}' expects a number")))
}

fn boolean(key: &str, v: Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Some(b),
        Value::String(s) => crate::options::parse_bool(&s),
        _ => None,
    }
    .ok_or_else(|| err(format!("Parameter '{key}' expects 'on' or 'off'")))
}

fn no_value(key: &str, v: &str) -> Error {
    err(format!("Parameter '{key}' does not accept value '{v}'"))
}

impl CreateOptions {
    /// Parses options as `qemu-img create -o` gives them (strings) or as
    /// JSON values; QAPI's dashed names are accepted too. The size is
    /// rounded up to 512 bytes, as QEMU does. Combinations are checked
    /// ([`CreateOptions::check`]).
    pub fn parse(map: Map<String, Value>) -> Result<CreateOptions> {
        let mut o = CreateOptions::default();
        for (key, value) in map {
            match key.replace('-', "_").as_str() {
                "size" => o.size = Some(size("size", value)?.div_ceil(512) * 512),
                "cluster_size" => o.cluster_size = size("cluster_size", value)?,
                "backing_file" => o.backing_file = Some(string(&key, value)?),
                "backing_fmt" => o.backing_fmt = Some(string(&key, value)?),
                "compat" | "version" => {
                    let v = string(&key, value)?;
                    o.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(no_value("version", &v)),
                    };
                }
                "lazy_refcounts" => o.lazy_refcounts = boolean(&key, value)?,
                "refcount_bits" => o.refcount_bits = number(&key, value)?,
                "preallocation" => {
                    let v = string(&key, value)?;
                    o.preallocation =
                        Prealloc::parse(&v).ok_or_else(|| no_value("preallocation", &v))?;
                }
                "extended_l2" => o.extended_l2 = boolean(&key, value)?,
                "compression_type" => {
                    let v = string(&key, value)?;
                    o.compression_type = match v.as_str() {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => return Err(no_value("compression-type", &v)),
                    };
                }
                "data_file" => o.data_file = Some(string(&key, value)?),
                "data_file_raw" => o.data_file_raw = boolean(&key, value)?,
                "encryption" | "encrypt" => {
                    return Err(err("encrypted qcow2 images are not supported"))
                }
                k if k.starts_with("encrypt.") => {
                    return Err(err("encrypted qcow2 images are not supported"))
                }
                _ => return Err(err(format!("Invalid parameter '{key}'"))),
            }
        }
        o.check()?;
        Ok(o)
    }

    /// log2 of the cluster size, once checked.
    fn cluster_bits(&self) -> u32 {
        self.cluster_size.trailing_zeros()
    }

    /// QEMU's checks of option combinations, with its messages.
    pub fn check(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(err(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(err(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        let v3 = "compatibility level 1.1 and above (use version=v3 or greater)";
        if self.version < 3 && self.lazy_refcounts {
            return Err(err(format!("Lazy refcounts only supported with {v3}")));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(err(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version < 3 && self.refcount_bits != 16 {
            return Err(err(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
            ));
        }
        if self.version < 3 && self.data_file.is_some() {
            return Err(err(format!(
                "External data files are only supported with {v3}"
            )));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(err("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(err(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        if self.version < 3 && self.compression_type != CompressionType::Zlib {
            return Err(err(format!(
                "Non-zlib compression type is only supported with {v3}"
            )));
        }
        if self.version < 3 && self.extended_l2 {
            return Err(err(format!(
                "Extended L2 entries are only supported with {v3}"
            )));
        }
        if self.backing_file.is_some() && self.preallocation != Prealloc::Off && !self.extended_l2 {
            return Err(err(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err(err("Backing format cannot be used without backing file"));
        }
        if let Some(b) = &self.backing_file {
            if b.len() > crate::format::MAX_BACKING_NAME as usize {
                return Err(err(format!(
                    "backing file name of {} bytes is too long",
                    b.len()
                )));
            }
        }
        Ok(())
    }

    /// The preallocation actually done: a raw external data file needs
    /// its mapping in place (QEMU turns `off` into `metadata` there).
    fn effective_prealloc(&self) -> Prealloc {
        if self.data_file_raw && self.preallocation == Prealloc::Off {
            Prealloc::Metadata
        } else {
            self.preallocation
        }
    }
}

/// The virtual size of the backing image `backing` of the image being
/// created in `image` (QEMU opens it to find out).
fn backing_size(image: Option<&str>, backing: &str, fmt: Option<&str>) -> Result<u64> {
    let path = crate::chain::backing_path(image, backing)?;
    let what = |e: Error| {
        Error::Other(format!(
            "Could not open backing image '{path}' to determine size: {e}"
        ))
    };
    let fmt = match fmt {
        Some(f) => f.to_string(),
        None => crate::chain::probe(&path).map_err(what)?.to_string(),
    };
    match fmt.as_str() {
        "qcow2" => Ok(crate::chain::read_header_file(&path).map_err(what)?.size),
        "raw" => std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| what(Error::Other(e.to_string()))),
        other => Err(what(Error::Other(format!("Unknown driver '{other}'")))),
    }
}

/// Where everything of a new image goes, in clusters.
#[derive(Debug)]
struct Plan {
    cs: u64,
    size: u64,
    l1_size: u64,
    /// Clusters of the refcount table, from cluster 1.
    rt_clusters: u64,
    /// Refcount blocks, right after the table.
    rb_clusters: u64,
    /// The L1 table, right after the blocks (none for a zero-sized disk).
    l1_clusters: u64,
    /// L2 tables (with preallocation).
    l2_tables: u64,
    /// Guest clusters preallocated in the image file.
    data_clusters: u64,
    refs_per_block: u64,
}

impl Plan {
    fn new(o: &CreateOptions, size: u64) -> Result<Plan> {
        let cs = o.cluster_size;
        let l2_entries = cs / if o.extended_l2 { 16 } else { 8 };
        let too_large = || {
            err("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
        };
        let l1_size = size.div_ceil(cs.checked_mul(l2_entries).ok_or_else(too_large)?);
        if l1_size * 8 > MAX_L1_BYTES || size > i64::MAX as u64 {
            return Err(too_large());
        }
        let prealloc = o.effective_prealloc() != Prealloc::Off;
        let l2_tables = if prealloc { l1_size } else { 0 };
        let data_clusters = if prealloc && o.data_file.is_none() {
            size.div_ceil(cs)
        } else {
            0
        };
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let refs_per_block = cs * 8 / o.refcount_bits;
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = 1 + rt + rb + l1_clusters + l2_tables + data_clusters;
            let nrb = total.div_ceil(refs_per_block);
            let nrt = (nrb * 8).div_ceil(cs).max(1);
            if (nrt, nrb) == (rt, rb) {
                break;
            }
            (rt, rb) = (nrt, nrb);
        }
        if rt * cs > MAX_REFTABLE_BYTES {
            return Err(too_large());
        }
        Ok(Plan {
            cs,
            size,
            l1_size,
            rt_clusters: rt,
            rb_clusters: rb,
            l1_clusters,
            l2_tables,
            data_clusters,
            refs_per_block,
        })
    }

    fn rt_offset(&self) -> u64 {
        self.cs
    }

    fn rb_offset(&self) -> u64 {
        (1 + self.rt_clusters) * self.cs
    }

    fn l1_offset(&self) -> u64 {
        if self.l1_size == 0 {
            0
        } else {
            (1 + self.rt_clusters + self.rb_clusters) * self.cs
        }
    }

    /// First cluster after the L1 table.
    fn meta_end(&self) -> u64 {
        (1 + self.rt_clusters + self.rb_clusters + self.l1_clusters) * self.cs
    }

    /// Clusters in use (every one with refcount 1).
    fn clusters(&self) -> u64 {
        self.meta_end() / self.cs + self.l2_tables + self.data_clusters
    }

    /// The file's length: the end of the last data cluster, else of the
    /// L1 table's bytes (QEMU does not pad it to a cluster).
    fn file_len(&self) -> u64 {
        if self.l2_tables > 0 {
            self.clusters() * self.cs
        } else if self.l1_size > 0 {
            self.l1_offset() + self.l1_size * 8
        } else {
            self.meta_end()
        }
    }
}

fn table_bytes(words: impl IntoIterator<Item = u64>) -> Vec<u8> {
    words.into_iter().flat_map(u64::to_be_bytes).collect()
}

async fn write_at(file: &Node, offset: u64, bytes: Vec<u8>) -> Result<()> {
    file.write(offset, IoBytes::copy_from(&bytes), WriteFlags::default())
        .await
}

/// Writes a fresh qcow2 image onto `file`, an opened writable protocol
/// node: the file is truncated first, then filled as QEMU would. The
/// external data file, when named, is the caller's to create.
pub async fn create(file: &Arc<Node>, opts: &CreateOptions) -> Result<()> {
    opts.check()?;
    let filename = file.driver().filename();
    let name = filename.clone().unwrap_or_else(|| file.name().to_string());
    let size = match (opts.size, &opts.backing_file) {
        (Some(s), _) => s,
        (None, Some(b)) => backing_size(filename.as_deref(), b, opts.backing_fmt.as_deref())?,
        (None, None) => return Err(err("Image creation needs a size parameter")),
    };
    let prealloc = opts.effective_prealloc();
    if opts.data_file.is_some() && matches!(prealloc, Prealloc::Falloc | Prealloc::Full) {
        return Err(err(format!(
            "preallocation={} with an external data file is not supported yet: sluice does not preallocate the data file",
            prealloc.name()
        )));
    }
    let plan = Plan::new(opts, size)?;
    let cs = plan.cs;

    // An empty file of the final length (preallocated as asked).
    truncate_file(file, 0, "off").await?;
    let file_mode = match prealloc {
        Prealloc::Falloc => "falloc",
        Prealloc::Full => "full",
        Prealloc::Off | Prealloc::Metadata => "off",
    };
    truncate_file(file, plan.file_len(), file_mode).await?;

    // Refcount table and blocks: every cluster in use counts 1.
    let rb_first = plan.rb_offset() / cs;
    let rt = (0..plan.rb_clusters).map(|i| (rb_first + i) * cs);
    let mut rt = table_bytes(rt);
    rt.resize((plan.rt_clusters * cs) as usize, 0);
    write_at(file, plan.rt_offset(), rt).await?;
    let used = plan.clusters();
    let order = opts.refcount_bits.trailing_zeros();
    for b in 0..plan.rb_clusters {
        let first = b * plan.refs_per_block;
        let n = used.saturating_sub(first).min(plan.refs_per_block);
        let block = refcount_block(cs as usize, order, n as usize);
        write_at(file, plan.rb_offset() + b * cs, block).await?;
    }

    // L1 (and with preallocation the L2 tables, each before its data).
    let l2_entries = cs / if opts.extended_l2 { 16 } else { 8 };
    let mut l1 = Vec::with_capacity(plan.l1_size as usize);
    let mut next = plan.meta_end();
    let mut guest = 0u64;
    for _ in 0..plan.l2_tables {
        let l2_off = next;
        next += cs;
        l1.push(l2_off | COPIED);
        let mut words = Vec::with_capacity((cs / 8) as usize);
        for _ in 0..l2_entries {
            let entry = if guest >= size {
                0
            } else if opts.data_file.is_some() {
                // External data: guest offset = host offset, no refcount.
                guest | COPIED
            } else {
                let host = next;
                next += cs;
                host | COPIED
            };
            words.push(entry);
            if opts.extended_l2 {
                // Allocated but no subcluster written: reads go to the
                // backing file, as QEMU preallocates.
                words.push(0);
            }
            guest += cs;
        }
        write_at(file, l2_off, table_bytes(words)).await?;
    }
    if plan.l1_size > 0 {
        l1.resize(plan.l1_size as usize, 0);
        write_at(file, plan.l1_offset(), table_bytes(l1)).await?;
    }

    // The header last.
    let header = new_header(opts, &plan);
    let bytes = crate::header_write::encode(&header, &name)?;
    write_at(file, 0, bytes).await?;
    file.flush().await
}

/// Truncates `file` through its driver and records the new size.
pub(crate) async fn truncate_file(file: &Node, len: u64, prealloc: &str) -> Result<()> {
    file.driver().truncate(file, len, prealloc).await?;
    file.set_size(len);
    Ok(())
}

/// A refcount block whose first `n` entries are 1.
fn refcount_block(cs: usize, order: u32, n: usize) -> Vec<u8> {
    let mut block = vec![0u8; cs];
    for i in 0..n {
        crate::write::rc_put(&mut block, i as u64, order, 1);
    }
    block
}

fn new_header(o: &CreateOptions, plan: &Plan) -> Header {
    let mut extensions = Vec::new();
    let mut incompatible = 0;
    let mut autoclear_bits = 0;
    if let Some(d) = &o.data_file {
        extensions.push(Extension {
            kind: ext::DATA_FILE,
            data: d.as_bytes().to_vec(),
        });
        incompatible |= incompat::DATA_FILE;
        if o.data_file_raw {
            autoclear_bits |= autoclear::DATA_FILE_RAW;
        }
    }
    // QEMU leaves the table out of small header clusters.
    if o.version >= 3 && o.cluster_size > 4096 {
        extensions.push(crate::header_write::feature_table_ext());
    }
    if o.compression_type == CompressionType::Zstd {
        incompatible |= incompat::COMPRESSION;
    }
    if o.extended_l2 {
        incompatible |= incompat::EXTL2;
    }
    Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: o.cluster_bits(),
        size: plan.size,
        crypt_method: 0,
        l1_size: plan.l1_size as u32,
        l1_table_offset: plan.l1_offset(),
        refcount_table_offset: plan.rt_offset(),
        refcount_table_clusters: plan.rt_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if o.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: autoclear_bits,
        refcount_order: o.refcount_bits.trailing_zeros(),
        header_length: crate::header_write::V3_WRITTEN_LEN,
        compression_type: o.compression_type,
        extensions,
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_fmt.clone(),
        data_file: o.data_file.clone(),
        feature_names: Vec::new(),
        bitmaps: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<CreateOptions> {
        CreateOptions::parse(v.as_object().unwrap().clone())
    }

    fn msg(v: Value) -> String {
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn strings_as_qemu_img_gives_them() {
        let o = parse(json!({
            "size": "1.5M", "cluster_size": "4k", "compat": "1.1",
            "refcount_bits": "16", "lazy_refcounts": "off",
            "preallocation": "metadata", "backing_file": "b", "backing_fmt": "raw",
            "extended_l2": "off", "compression_type": "zlib"
        }));
        let e = o.unwrap_err().to_string();
        assert!(e.contains("Backing file and preallocation"), "{e}");
        let o = parse(json!({
            "size": "1000", "cluster-size": 4096, "version": "v3",
            "refcount_bits": 8, "lazy_refcounts": "on", "extended_l2": true,
            "cluster_size": "16k", "compression_type": "zstd"
        }))
        .unwrap();
        assert_eq!(o.size, Some(1024));
        assert_eq!(o.cluster_size, 16384);
        assert_eq!(o.refcount_bits, 8);
        assert!(o.lazy_refcounts && o.extended_l2);
        assert_eq!(o.compression_type, CompressionType::Zstd);
        assert_eq!(parse(json!({"size": "1.5M"})).unwrap().size, Some(3 << 19));
    }

    #[test]
    fn qemu_messages() {
        for (v, want) in [
            (
                json!({"cluster_size": "1000"}),
                "Cluster size must be a power of two between 512 and 2048k",
            ),
            (
                json!({"cluster_size": "4M"}),
                "Cluster size must be a power of two",
            ),
            (
                json!({"cluster_size": "abc"}),
                "Parameter 'cluster_size' expects a non-negative number below 2^64",
            ),
            (
                json!({"size": "-1"}),
                "Parameter 'size' expects a non-negative number",
            ),
            (
                json!({"refcount_bits": "3"}),
                "Refcount width must be a power of two and may not exceed 64 bits",
            ),
            (
                json!({"refcount_bits": "128"}),
                "Refcount width must be a power of two",
            ),
            (
                json!({"refcount_bits": "abc"}),
                "Parameter 'refcount_bits' expects a number",
            ),
            (
                json!({"compat": "0.10", "lazy_refcounts": "on"}),
                "Lazy refcounts only supported with compatibility level 1.1",
            ),
            (
                json!({"compat": "0.10", "refcount_bits": "8"}),
                "Different refcount widths than 16 bits",
            ),
            (
                json!({"compat": "0.10", "extended_l2": "on"}),
                "Extended L2 entries are only supported with compatibility level 1.1",
            ),
            (
                json!({"extended_l2": "on", "cluster_size": "8k"}),
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ),
            (
                json!({"compat": "foo"}),
                "Parameter 'version' does not accept value 'foo'",
            ),
            (
                json!({"compat": "0.10", "compression_type": "zstd"}),
                "Non-zlib compression type",
            ),
            (
                json!({"compat": "0.10", "data_file": "d"}),
                "External data files are only supported",
            ),
            (
                json!({"data_file_raw": "on"}),
                "data-file-raw requires data-file",
            ),
            (
                json!({"data_file_raw": "on", "data_file": "d", "backing_file": "b"}),
                "Backing file and data-file-raw cannot be used at the same time",
            ),
            (
                json!({"preallocation": "bogus"}),
                "Parameter 'preallocation' does not accept value 'bogus'",
            ),
            (
                json!({"compression_type": "lz4"}),
                "Parameter 'compression-type' does not accept value 'lz4'",
            ),
            (
                json!({"lazy_refcounts": "maybe"}),
                "Parameter 'lazy_refcounts' expects 'on' or 'off'",
            ),
            (
                json!({"backing_fmt": "qcow2"}),
                "Backing format cannot be used without backing file",
            ),
            (json!({"bogus": "1"}), "Invalid parameter 'bogus'"),
        ] {
            let m = msg(v.clone());
            assert!(m.contains(want), "{v}: got '{m}', want '{want}'");
        }
    }

    #[test]
    fn plan_is_self_consistent() {
        // Small clusters and narrow refcounts need several blocks and a
        // multi-cluster refcount table for a preallocated disk.
        let o = CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            preallocation: Prealloc::Metadata,
            ..Default::default()
        };
        let p = Plan::new(&o, 4 << 20).unwrap();
        assert!(p.rt_clusters > 1 && p.rb_clusters > 1, "{p:?}");
        assert!(p.rb_clusters * p.refs_per_block >= p.clusters());
        assert!(p.rt_clusters * 64 >= p.rb_clusters);
        assert_eq!(p.file_len(), p.clusters() * 512);
        // Without preallocation: QEMU's four clusters (L1 not padded).
        let p = Plan::new(&CreateOptions::default(), 1 << 30).unwrap();
        assert_eq!(
            (p.rt_offset(), p.rb_offset(), p.l1_offset()),
            (0x10000, 0x20000, 0x30000)
        );
        assert_eq!(p.file_len(), 0x30000 + 16);
    }

    #[test]
    fn refcount_blocks_of_every_width() {
        for order in 0..=6u32 {
            let b = refcount_block(512, order, 5);
            let bits = 1usize << order;
            let ones: usize = b.iter().map(|x| x.count_ones() as usize).sum();
            assert_eq!(ones, 5, "order {order}");
            if bits >= 8 {
                assert_eq!(b[bits / 8 - 1], 1);
            } else {
                assert_eq!(b[0] & 1, 1);
            }
        }
    }
}
