//! The qcow2 on-disk format (QEMU's `docs/interop/qcow2.txt`, versions 2
//! and 3): the header and its extensions, L1/L2 entries (standard and
//! extended), compressed cluster descriptors and the snapshot table.
//!
//! Everything here is pure parsing and validation of bytes; nothing does
//! I/O. Every table size is bounded before anything is allocated for it.

use sluice_core::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest and largest cluster size QEMU opens (512 B and 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's implementation limit on the active L1 table (`QCOW_MAX_L1_SIZE`).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (`QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name (`1023` bytes, as the spec says).
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's limits on snapshots (`QCOW_MAX_SNAPSHOTS`, `QCOW_MAX_SNAPSHOTS_SIZE`,
/// `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_SNAPSHOTS_BYTES: u64 = 1024 * 65536;
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Length of the version 2 header, and the least of version 3.
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTL2: u64 = 1 << 4;
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension types.
pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Bits 9-55 of L1 and standard L2 entries: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: reads as zeroes (v3, not extended L2).
pub const ZERO_FLAG: u64 = 1;
/// Bits that must be zero in an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits that must be zero in a standard L2 entry (bit 0 excepted).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// The compression method of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (no zlib header), window 4 KiB, as QEMU writes it.
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// A header extension as found, kept as raw bytes so an unknown or
/// unsupported one survives a header rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The bitmaps extension (kept intact; sluice does not use bitmaps yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
    /// The extension's bytes as found.
    pub raw: Vec<u8>,
}

/// A parsed and validated qcow2 header with its extensions.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Every extension in file order (known ones included).
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExt>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A "this image is broken" error naming the file.
pub fn corrupt(file: &str, msg: impl std::fmt::Display) -> Error {
    Error::Other(format!("qcow2 image '{file}': {msg}"))
}

/// Where the fixed part of a header ends, given its first bytes: the
/// caller reads at least this many (and then the first cluster).
pub fn fixed_header_len(first: &[u8]) -> usize {
    if first.len() >= 8 && be32(first, 4) >= 3 {
        V3_HEADER_LEN as usize
    } else {
        V2_HEADER_LEN as usize
    }
}

/// The cluster size announced by a header's first bytes, if they are
/// enough to tell and it is in range.
pub fn peek_cluster_bits(first: &[u8]) -> Option<u32> {
    if first.len() < 24 {
        return None;
    }
    let bits = be32(first, 20);
    (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS)
        .contains(&bits)
        .then_some(bits)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn has_extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        if self.has_extended_l2() {
            16
        } else {
            8
        }
    }

    /// log2 of the number of entries in one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.has_extended_l2() { 4 } else { 3 }
    }

    /// Number of L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let shift = self.cluster_bits + self.l2_bits();
        size.div_ceil(1u64 << shift.min(63))
    }

    /// Parses and validates the header in `buf`: the first cluster of the
    /// image (or all of the file when it is shorter). `file_size` bounds
    /// the table offsets. `file` names the image in errors.
    pub fn parse(buf: &[u8], file_size: u64, file: &str) -> Result<Header> {
        if buf.len() < 4 || be32(buf, 0) != MAGIC {
            return Err(corrupt(file, "Image is not in qcow2 format (bad magic)"));
        }
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(corrupt(
                file,
                format!(
                    "file is truncated: {} bytes, shorter than a qcow2 header",
                    buf.len()
                ),
            ));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(corrupt(
                file,
                format!("Unsupported qcow2 version {version} (at offset 4)"),
            ));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(
                file,
                format!(
                    "Unsupported cluster size: 2^{cluster_bits} (cluster_bits at offset 20 must be {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
                ),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
        };
        if version >= 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(corrupt(
                    file,
                    format!(
                        "file is truncated: {} bytes, shorter than a version 3 header",
                        buf.len()
                    ),
                ));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN {
                return Err(corrupt(
                    file,
                    format!(
                        "qcow2 header too short: header_length {} (at offset 100) is less than {V3_HEADER_LEN}",
                        h.header_length
                    ),
                ));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(corrupt(
                    file,
                    format!(
                        "qcow2 header exceeds cluster size: header_length {} > {cluster_size}",
                        h.header_length
                    ),
                ));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(corrupt(
                    file,
                    format!(
                        "header_length {} (at offset 100) is not a multiple of 8",
                        h.header_length
                    ),
                ));
            }
            if h.header_length as usize > buf.len() {
                return Err(corrupt(
                    file,
                    format!(
                        "file is truncated: header_length {} but the file has {} bytes",
                        h.header_length,
                        buf.len()
                    ),
                ));
            }
        }
        if h.refcount_order > 6 {
            return Err(corrupt(
                file,
                format!(
                    "Reference count entry width too large; may not exceed 64 bits (refcount_order {} at offset 96)",
                    h.refcount_order
                ),
            ));
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_offset > cluster_size {
                return Err(corrupt(
                    file,
                    format!(
                        "Invalid backing file offset {} (at offset 8): past the first cluster",
                        h.backing_file_offset
                    ),
                ));
            }
            if h.backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(
                    file,
                    format!(
                        "Backing file name too long: {} bytes (at offset 16), at most {MAX_BACKING_NAME}",
                        h.backing_file_size
                    ),
                ));
            }
        }
        // Extensions: from the end of the header to the backing file name
        // (or the end of the first cluster).
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cluster_size
        }
        .min(buf.len() as u64) as usize;
        h.parse_extensions(buf, h.header_length as usize, ext_end, file)?;
        if h.backing_file_offset != 0 {
            let start = h.backing_file_offset as usize;
            let end = start + h.backing_file_size as usize;
            if end > buf.len() {
                return Err(corrupt(
                    file,
                    format!(
                        "backing file name at offset {start} length {} is past the end of the file",
                        h.backing_file_size
                    ),
                ));
            }
            if h.backing_file_size > 0 {
                let name = String::from_utf8_lossy(&buf[start..end]).into_owned();
                h.backing_file = Some(name);
            }
        }
        h.validate_features(buf, file)?;
        h.validate_tables(file_size, file)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], start: usize, end: usize, file: &str) -> Result<()> {
        let mut at = start;
        let mut count = 0usize;
        while at + 8 <= end {
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            if kind == ext::END {
                return Ok(());
            }
            count += 1;
            if count > 4096 {
                return Err(corrupt(file, "too many header extensions"));
            }
            let data_start = at + 8;
            let data_end = data_start.checked_add(len).filter(|&e| e <= end);
            let Some(data_end) = data_end else {
                return Err(corrupt(
                    file,
                    format!("Invalid extension length: extension {kind:#x} at offset {at} with length {len} runs past the header area (ends at {end})"),
                ));
            };
            let data = buf[data_start..data_end].to_vec();
            match kind {
                ext::BACKING_FORMAT => {
                    if len > 1023 {
                        return Err(corrupt(
                            file,
                            format!("backing format name of {len} bytes at offset {data_start} is too long"),
                        ));
                    }
                    self.backing_format = Some(String::from_utf8_lossy(&data).into_owned());
                }
                ext::FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_bytes = &e[2..48];
                        let n = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
                        });
                    }
                }
                ext::BITMAPS => {
                    if len < 24 {
                        return Err(corrupt(
                            file,
                            format!(
                                "bitmaps extension at offset {at} is {len} bytes, shorter than 24"
                            ),
                        ));
                    }
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(&data, 0),
                        directory_size: be64(&data, 8),
                        directory_offset: be64(&data, 16),
                        raw: data.clone(),
                    });
                }
                ext::CRYPTO => {
                    return Err(corrupt(
                        file,
                        "the image is encrypted (full disk encryption header extension); encrypted qcow2 images are not supported",
                    ));
                }
                ext::DATA_FILE => {
                    if len > 4096 {
                        return Err(corrupt(
                            file,
                            format!("external data file name of {len} bytes is too long"),
                        ));
                    }
                    self.data_file = Some(String::from_utf8_lossy(&data).into_owned());
                }
                _ => {}
            }
            self.extensions.push(Extension { kind, data });
            // Padding to a multiple of 8.
            at = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// The names of `bits` of feature bitmap `kind`, from the image's own
    /// feature name table where it has them (as QEMU reports them).
    pub fn feature_list(&self, kind: u8, bits: u64) -> String {
        let mut names = Vec::new();
        for bit in 0..64u8 {
            if bits & (1u64 << bit) == 0 {
                continue;
            }
            match self
                .feature_names
                .iter()
                .find(|f| f.kind == kind && f.bit == bit)
            {
                Some(f) => names.push(f.name.clone()),
                None => names.push(format!("Unknown incompatible feature: {:x}", 1u64 << bit)),
            }
        }
        names.join(", ")
    }

    fn validate_features(&mut self, buf: &[u8], file: &str) -> Result<()> {
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(corrupt(
                file,
                format!(
                    "Unsupported qcow2 feature(s): {}",
                    self.feature_list(0, unknown)
                ),
            ));
        }
        if self.crypt_method != 0 {
            return Err(corrupt(
                file,
                format!(
                    "the image is encrypted (crypt_method {} at offset 32); encrypted qcow2 images are not supported",
                    self.crypt_method
                ),
            ));
        }
        // Compression type (byte 104, present when header_length > 104).
        let ctype = if self.header_length > V3_HEADER_LEN {
            buf[104]
        } else {
            0
        };
        let has_bit = self.incompatible_features & incompat::COMPRESSION != 0;
        self.compression_type = match (ctype, has_bit) {
            (0, false) => CompressionType::Zlib,
            (0, true) => {
                return Err(corrupt(
                    file,
                    "the compression type bit is set but compression_type (at offset 104) is zlib or absent",
                ))
            }
            (1, true) => CompressionType::Zstd,
            (1, false) => {
                return Err(corrupt(
                    file,
                    "compression_type zstd (at offset 104) without the compression type incompatible bit",
                ))
            }
            (t, _) => {
                return Err(corrupt(
                    file,
                    format!("Unknown compression type {t} (at offset 104)"),
                ))
            }
        };
        if self.has_extended_l2() && self.cluster_bits < 14 {
            return Err(corrupt(
                file,
                format!(
                    "extended L2 entries need clusters of at least 16 KiB, the image has 2^{}",
                    self.cluster_bits
                ),
            ));
        }
        if self.has_data_file() && self.nb_snapshots != 0 {
            // QEMU refuses this combination too.
            return Err(corrupt(
                file,
                "an image with an external data file cannot have internal snapshots",
            ));
        }
        if self.autoclear_features & autoclear::DATA_FILE_RAW != 0 && !self.has_data_file() {
            // QEMU clears the bit on open; reading is not affected.
            self.autoclear_features &= !autoclear::DATA_FILE_RAW;
        }
        Ok(())
    }

    /// Checks that a table of `entries` entries of `entry_size` bytes at
    /// `offset` is cluster aligned, inside the file and clear of the header.
    #[allow(clippy::too_many_arguments)]
    fn check_table(
        &self,
        what: &str,
        field_at: usize,
        offset: u64,
        entries: u64,
        entry_size: u64,
        file_size: u64,
        file: &str,
    ) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        let cs = self.cluster_size();
        if !offset.is_multiple_of(cs) {
            return Err(corrupt(
                file,
                format!("Invalid {what} offset {offset:#x} (at offset {field_at}): not aligned to the {cs}-byte cluster size"),
            ));
        }
        if offset < cs {
            return Err(corrupt(
                file,
                format!("Invalid {what} offset {offset:#x} (at offset {field_at}): overlaps the header cluster"),
            ));
        }
        let bytes = entries * entry_size;
        match offset.checked_add(bytes) {
            Some(end) if end <= file_size => Ok(()),
            _ => Err(corrupt(
                file,
                format!("{what} at offset {offset:#x} ({bytes} bytes) extends past the end of the {file_size}-byte file"),
            )),
        }
    }

    fn validate_tables(&self, file_size: u64, file: &str) -> Result<()> {
        let cs = self.cluster_size();
        // L1 table: bounded by QEMU's limit, large enough for the disk.
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(
                file,
                format!(
                    "Active L1 table too large: l1_size {} (at offset 36) exceeds {} entries",
                    self.l1_size,
                    MAX_L1_BYTES / 8
                ),
            ));
        }
        let needed = self.l1_entries_for(self.size);
        if needed > MAX_L1_BYTES / 8 {
            return Err(corrupt(
                file,
                format!(
                    "Image is too big: virtual size {} (at offset 24) needs {needed} L1 entries",
                    self.size
                ),
            ));
        }
        if u64::from(self.l1_size) < needed {
            return Err(corrupt(
                file,
                format!(
                    "L1 table is too small: l1_size {} (at offset 36) but the virtual size {} needs {needed} entries",
                    self.l1_size, self.size
                ),
            ));
        }
        self.check_table(
            "L1 table",
            40,
            self.l1_table_offset,
            u64::from(self.l1_size),
            8,
            file_size,
            file,
        )?;
        // Refcount table.
        let max_reftable_clusters = MAX_REFTABLE_BYTES / cs;
        if u64::from(self.refcount_table_clusters) > max_reftable_clusters {
            return Err(corrupt(
                file,
                format!(
                    "Reference count table too large: {} clusters (at offset 56), at most {max_reftable_clusters}",
                    self.refcount_table_clusters
                ),
            ));
        }
        if self.refcount_table_clusters == 0 {
            return Err(corrupt(
                file,
                "the refcount table is empty (refcount_table_clusters 0 at offset 56)",
            ));
        }
        if self.refcount_table_offset == 0 {
            return Err(corrupt(
                file,
                "Invalid reference count table offset 0 (at offset 48): overlaps the header",
            ));
        }
        self.check_table(
            "reference count table",
            48,
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters),
            cs,
            file_size,
            file,
        )?;
        // Snapshot table: offset checked here, entries when read.
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(
                file,
                format!(
                    "Too many snapshots: {} (at offset 60), at most {MAX_SNAPSHOTS}",
                    self.nb_snapshots
                ),
            ));
        }
        if self.nb_snapshots > 0 {
            self.check_table(
                "snapshot table",
                64,
                self.snapshots_offset,
                u64::from(self.nb_snapshots),
                40,
                file_size,
                file,
            )?;
        }
        Ok(())
    }
}

/// What a standard (or the first word of an extended) L2 entry says about
/// its cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: the backing file (or zeroes) shows.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocation, if any.
    Zero { host: Option<u64> },
    /// Data at `host` (cluster aligned).
    Normal { host: u64 },
    /// Compressed data: `len` bytes from `host` hold at most one cluster's
    /// compressed stream (the sector-rounded length the descriptor gives).
    Compressed { host: u64, len: u64 },
}

/// The layout facts needed to decode L2 entries.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub cluster_bits: u32,
    pub version: u32,
    pub extended_l2: bool,
    pub data_file: bool,
}

impl Layout {
    pub fn of(h: &Header) -> Layout {
        Layout {
            cluster_bits: h.cluster_bits,
            version: h.version,
            extended_l2: h.has_extended_l2(),
            data_file: h.has_data_file(),
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Decodes the first word of an L2 entry.
    pub fn decode(&self, entry: u64) -> std::result::Result<L2Entry, String> {
        if entry & COMPRESSED != 0 {
            if self.data_file {
                return Err(format!(
                    "compressed cluster (L2 entry {entry:#x}) in an image with an external data file"
                ));
            }
            let (host, len) = compressed_descriptor(entry, self.cluster_bits);
            return Ok(L2Entry::Compressed { host, len });
        }
        let host = entry & OFFSET_MASK;
        let zero = !self.extended_l2 && entry & ZERO_FLAG != 0;
        if zero && self.version < 3 {
            return Err(format!(
                "zero flag set in L2 entry {entry:#x} of a version 2 image"
            ));
        }
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(format!(
                "Cluster allocation offset {host:#x} unaligned (L2 entry {entry:#x})"
            ));
        }
        let allocated = host != 0 || (self.data_file && entry & COPIED != 0);
        Ok(match (zero, allocated) {
            (true, true) => L2Entry::Zero { host: Some(host) },
            (true, false) => L2Entry::Zero { host: None },
            (false, true) => L2Entry::Normal { host },
            (false, false) => L2Entry::Unallocated,
        })
    }
}

/// Host offset and sector-rounded length of a compressed cluster
/// descriptor, for any cluster size: `x = 62 - (cluster_bits - 8)` bits of
/// offset, then the number of additional 512-byte sectors.
pub fn compressed_descriptor(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let desc = entry & ((1u64 << 62) - 1);
    let x = 62 - (cluster_bits - 8);
    let host = desc & ((1u64 << x) - 1);
    let sectors = (desc >> x) + 1;
    let end = (host & !511) + sectors * 512;
    (host, end - host)
}

/// One entry of the snapshot table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    /// The extra data bytes as found.
    pub extra: Vec<u8>,
}

/// Fixed part of a snapshot table entry.
pub const SNAPSHOT_FIXED: usize = 40;

/// Lengths of the variable part of a snapshot entry whose fixed part is
/// `fixed`: (extra, id, name, total entry length with padding).
pub fn snapshot_var_lens(fixed: &[u8]) -> (usize, usize, usize, usize) {
    let id = be16(fixed, 12) as usize;
    let name = be16(fixed, 14) as usize;
    let extra = be32(fixed, 36) as usize;
    let total = (SNAPSHOT_FIXED + extra + id + name).div_ceil(8) * 8;
    (extra, id, name, total)
}

/// Parses one snapshot entry from `entry` (its full padded bytes).
pub fn parse_snapshot(entry: &[u8], file: &str, at: u64) -> Result<Snapshot> {
    let (extra_len, id_len, name_len, _) = snapshot_var_lens(entry);
    if extra_len as u32 > MAX_SNAPSHOT_EXTRA {
        return Err(corrupt(
            file,
            format!("snapshot at offset {at:#x}: too much extra data ({extra_len} bytes)"),
        ));
    }
    let extra = entry[SNAPSHOT_FIXED..SNAPSHOT_FIXED + extra_len].to_vec();
    let id_at = SNAPSHOT_FIXED + extra_len;
    let name_at = id_at + id_len;
    let mut vm_state_size = u64::from(be32(entry, 32));
    if extra.len() >= 8 {
        vm_state_size = be64(&extra, 0);
    }
    let disk_size = (extra.len() >= 16).then(|| be64(&extra, 8));
    Ok(Snapshot {
        l1_table_offset: be64(entry, 0),
        l1_size: be32(entry, 8),
        id: String::from_utf8_lossy(&entry[id_at..name_at]).into_owned(),
        name: String::from_utf8_lossy(&entry[name_at..name_at + name_len]).into_owned(),
        date_sec: be32(entry, 16),
        date_nsec: be32(entry, 20),
        vm_clock_nsec: be64(entry, 24),
        vm_state_size,
        disk_size,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_header() -> Vec<u8> {
        let mut b = vec![0u8; 65536 * 4];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn parses_a_minimal_v3_header() {
        let b = v3_header();
        let h = Header::parse(&b[..65536], b.len() as u64, "t").unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.l1_size, 2);
        assert_eq!(h.compression_type, CompressionType::Zlib);
    }

    #[test]
    fn unknown_incompatible_bits_are_named() {
        let mut b = v3_header();
        b[72..80].copy_from_slice(&(1u64 << 7).to_be_bytes());
        // A feature name table naming bit 7.
        b[112..116].copy_from_slice(&ext::FEATURE_TABLE.to_be_bytes());
        b[116..120].copy_from_slice(&48u32.to_be_bytes());
        b[120] = 0;
        b[121] = 7;
        b[122..128].copy_from_slice(b"future");
        let e = Header::parse(&b[..65536], b.len() as u64, "t").unwrap_err();
        assert!(
            e.to_string()
                .contains("Unsupported qcow2 feature(s): future"),
            "{e}"
        );
        b[112..170].fill(0);
        let e = Header::parse(&b[..65536], b.len() as u64, "t").unwrap_err();
        assert!(
            e.to_string().contains("Unknown incompatible feature: 80"),
            "{e}"
        );
    }

    #[test]
    fn extensions_are_parsed_and_unknown_ones_kept() {
        let mut b = v3_header();
        let mut at = 112;
        let mut put = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b[at..at + 4].copy_from_slice(&kind.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            b[at + 8..at + 8 + data.len()].copy_from_slice(data);
            at += 8 + data.len().div_ceil(8) * 8;
        };
        put(&mut b, ext::BACKING_FORMAT, b"raw");
        put(&mut b, 0x1234_5678, b"opaque bytes");
        let mut bm = vec![0u8; 24];
        bm[3] = 2;
        bm[23] = 0x40;
        put(&mut b, ext::BITMAPS, &bm);
        put(&mut b, ext::DATA_FILE, b"data.img");
        let h = Header::parse(&b[..65536], b.len() as u64, "t").unwrap();
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.data_file.as_deref(), Some("data.img"));
        let bitmaps = h.bitmaps.as_ref().unwrap();
        assert_eq!((bitmaps.nb_bitmaps, bitmaps.directory_offset), (2, 0x40));
        assert_eq!(bitmaps.raw, bm);
        let kinds: Vec<u32> = h.extensions.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                ext::BACKING_FORMAT,
                0x1234_5678,
                ext::BITMAPS,
                ext::DATA_FILE
            ]
        );
        assert_eq!(h.extensions[1].data, b"opaque bytes");
        // An extension running past the header area is an error.
        b[116..120].copy_from_slice(&100_000u32.to_be_bytes());
        let e = Header::parse(&b[..65536], b.len() as u64, "t").unwrap_err();
        assert!(e.to_string().contains("Invalid extension length"), "{e}");
        // Full disk encryption is refused clearly.
        let mut b = v3_header();
        b[112..116].copy_from_slice(&ext::CRYPTO.to_be_bytes());
        b[116..120].copy_from_slice(&16u32.to_be_bytes());
        let e = Header::parse(&b[..65536], b.len() as u64, "t").unwrap_err();
        assert!(e.to_string().contains("encrypted"), "{e}");
    }

    #[test]
    fn compressed_descriptors_for_every_cluster_size() {
        for bits in 9..=21u32 {
            let x = 62 - (bits - 8);
            let host = 0x1234_5678u64 & ((1u64 << x) - 1);
            let extra = 3u64.min((1 << (bits - 8)) - 1);
            let entry = COMPRESSED | (extra << x) | host;
            let (h, len) = compressed_descriptor(entry, bits);
            assert_eq!(h, host);
            assert_eq!(len, (host & !511) + (extra + 1) * 512 - host);
        }
    }

    #[test]
    fn bad_tables_are_refused() {
        let mut b = v3_header();
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = Header::parse(&b[..65536], b.len() as u64, "t").unwrap_err();
        assert!(e.to_string().contains("L1 table too large"), "{e}");
        let mut b = v3_header();
        b[48..56].copy_from_slice(&0u64.to_be_bytes());
        let e = Header::parse(&b[..65536], b.len() as u64, "t").unwrap_err();
        assert!(e.to_string().contains("overlaps the header"), "{e}");
        let mut b = v3_header();
        b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let e = Header::parse(&b[..65536], b.len() as u64, "t").unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
    }
}
