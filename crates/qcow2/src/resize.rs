//! Resizing a qcow2 image (QEMU's `qcow2_co_truncate`, `qemu-img
//! resize`, `block_resize`).
//!
//! Growing needs more L1 entries only every `cluster_size * l2_entries`
//! bytes of disk. The L1 table owns whole clusters, so it first grows in
//! place, into the unused rest of its last cluster: the new entries are
//! zeroed and flushed before one header write (virtual size, L1 size and
//! offset together, bytes 24..48) publishes them. When that room is too
//! small the table moves ([`crate::write::Writer::move_l1`]): a new
//! contiguous table is allocated through the write side's allocator,
//! written and flushed with its refcounts, published by the same single
//! header write, and only then is the old table freed. A crash at any
//! point leaves the old or the new size, each with a valid table, and
//! at worst leaked clusters.
//!
//! With `preallocation=metadata`, `falloc` or `full` the new area's
//! whole clusters get L2 tables and data clusters at the end of the
//! file, which the file driver extends over them (sparse, `fallocate`d
//! or written with zeroes: the file's own preallocation), as QEMU does.
//!
//! Shrinking refuses when any cluster past the new end is allocated
//! (data, compressed or zero), naming the first one; otherwise only the
//! virtual size changes. The L1 table keeps its size (a longer L1 table
//! than the disk needs is valid), so nothing is freed and nothing leaks.
//!
//! The caller has the node drained: no request runs while the header
//! and the L1 table change. The node's size is set here as soon as the
//! header says it (the caller setting it again is harmless).
//!
//! Growing over a backing file larger than the old size zeroes the new
//! area (QEMU does, so the backing file does not show through) after
//! the header grew: a crash in between leaves the new size with the
//! backing data showing there, as with QEMU.

use crate::driver::{Mapping, Qcow2Driver};
use crate::format::{Header, MAX_L1_BYTES};
use sluice_core::{BlockDriver, Error, IoBytes, Node, Result, Role, WriteFlags, ZeroFlags};

fn invalid(node: &Node, reason: String) -> Error {
    Error::InvalidRequest {
        node: node.name().to_string(),
        reason,
    }
}

pub async fn truncate(d: &Qcow2Driver, node: &Node, size: u64, prealloc: &str) -> Result<()> {
    if node.is_read_only() {
        return Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: "qcow2",
            what: "resizing a read-only qcow2 node",
        });
    }
    let h = d.header().clone();
    let old = h.size;
    if !size.is_multiple_of(512) {
        return Err(invalid(
            node,
            format!("The new size must be a multiple of 512 (asked for {size})"),
        ));
    }
    if h.nb_snapshots > 0 && h.version < 3 {
        return Err(invalid(
            node,
            "Can't resize a v2 image which has snapshots".into(),
        ));
    }
    if h.has_data_file() {
        return Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: "qcow2",
            what: "resizing a qcow2 image with an external data file",
        });
    }
    if !matches!(prealloc, "off" | "metadata" | "falloc" | "full") {
        return Err(invalid(
            node,
            format!("Parameter 'preallocation' does not accept value '{prealloc}'"),
        ));
    }
    if size == old {
        return Ok(());
    }
    let file = d.file(node)?;
    if size < old {
        if prealloc != "off" {
            return Err(invalid(
                node,
                "Preallocation can't be used for shrinking an image".into(),
            ));
        }
        if h.nb_snapshots > 0 {
            return Err(invalid(
                node,
                "Can't shrink an image with internal snapshots".into(),
            ));
        }
        check_nothing_past(d, node, &file, size, old).await?;
        // Dirty L2 tables and refcounts reach the file before the header
        // changes.
        d.flush(node).await?;
        write_header_size(d, &file, size, h.l1_size, h.l1_table_offset).await?;
        node.set_size(size);
        return Ok(());
    }
    let needed = h.l1_entries_for(size);
    if needed * 8 > MAX_L1_BYTES {
        return Err(invalid(
            node,
            format!("The image size {size} is too large for file format 'qcow2' (its L1 table would exceed {MAX_L1_BYTES} bytes)"),
        ));
    }
    let Some(writer) = d.writer.get() else {
        return Err(Error::NotSupported {
            node: node.name().to_string(),
            driver: "qcow2",
            what: "resizing a read-only qcow2 node",
        });
    };
    let cs = h.cluster_size();
    let l1_size = u64::from(h.l1_size);
    let capacity = if l1_size == 0 {
        0
    } else {
        (l1_size * 8).div_ceil(cs) * cs / 8
    };
    d.flush(node).await?;
    if needed > capacity {
        writer.move_l1(d, &file, needed, size).await?;
    } else {
        let new_l1 = l1_size.max(needed);
        if new_l1 > l1_size {
            // The new entries are zero on disk before the header counts them.
            let start = h.l1_table_offset + l1_size * 8;
            let zeroes = vec![0u8; ((new_l1 - l1_size) * 8) as usize];
            crate::write::grow(&file, start + zeroes.len() as u64);
            file.write(start, IoBytes::copy_from(&zeroes), WriteFlags::default())
                .await?;
            file.flush().await?;
            d.l1.write().resize(new_l1 as usize, 0);
        }
        write_header_size(d, &file, size, new_l1 as u32, h.l1_table_offset).await?;
    }
    // The write side bounds copy-on-write by the node's size, which the
    // caller would only set on return: the new area is written below.
    node.set_size(size);
    // The new area must read as zeroes: a larger backing file would show
    // through it. With preallocation its whole clusters are allocated
    // (and read as zeroes); only the partial cluster at the old end is
    // left to zero.
    let backing_shows = node.child(Role::Backing).is_some_and(|b| b.size() > old);
    let first_whole = old.next_multiple_of(cs);
    let zero_end = if prealloc == "off" {
        size
    } else {
        first_whole.min(size)
    };
    if backing_shows && old < zero_end {
        d.write_zeroes(node, old, zero_end - old, ZeroFlags::default())
            .await?;
    }
    if prealloc != "off" && first_whole < size {
        // The file's own preallocation fills the data clusters.
        let file_prealloc = if prealloc == "metadata" {
            "off"
        } else {
            prealloc
        };
        writer
            .preallocate(d, node, first_whole, size, file_prealloc)
            .await?;
    }
    d.flush(node).await
}

/// Fails with the first guest offset in `[new, old)` whose cluster is
/// allocated in this image.
async fn check_nothing_past(
    d: &Qcow2Driver,
    node: &Node,
    file: &Node,
    new: u64,
    old: u64,
) -> Result<()> {
    let cs = d.header().cluster_size();
    let mut pos = new.div_ceil(cs) * cs;
    while pos < old {
        let (m, n) = d.map(file, pos, old - pos).await?;
        if m != Mapping::Unallocated {
            let what = match m {
                Mapping::Zero => "a zero cluster",
                Mapping::Compressed { .. } => "a compressed cluster",
                _ => "data",
            };
            return Err(invalid(
                node,
                format!(
                    "cannot shrink to {new} bytes: {what} is allocated at guest offset {pos:#x}, past the new end (discard it first)"
                ),
            ));
        }
        pos += n;
    }
    Ok(())
}

/// Publishes the virtual size, the L1 table's size and its offset in
/// one header write (bytes 24..48, inside one sector: all or nothing),
/// then flushes; the in-memory header follows.
pub(crate) async fn write_header_size(
    d: &Qcow2Driver,
    file: &Node,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
) -> Result<()> {
    let h = d.header().clone();
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&size.to_be_bytes());
    bytes[8..12].copy_from_slice(&h.crypt_method.to_be_bytes());
    bytes[12..16].copy_from_slice(&l1_size.to_be_bytes());
    bytes[16..].copy_from_slice(&l1_offset.to_be_bytes());
    file.write(24, IoBytes::copy_from(&bytes), WriteFlags::default())
        .await?;
    file.flush().await?;
    d.set_header(Header {
        size,
        l1_size,
        l1_table_offset: l1_offset,
        ..h
    });
    Ok(())
}
