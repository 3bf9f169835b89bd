//! Compressed writes (what `qemu-img convert -c` does): one whole guest
//! cluster, not yet allocated, compressed with the image's compression
//! type and stored as a compressed cluster; written normally when
//! compression does not make it smaller than a cluster.
//!
//! The write side has no allocator for byte ranges (QEMU packs several
//! compressed clusters into one host cluster); until it has, the
//! compressed stream goes through an ordinary allocating write into a
//! fresh host cluster of its own, the L2 entry is then turned into a
//! compressed descriptor of that cluster, and the unused rest of the
//! cluster is punched out of the file. The refcounts stay right (the
//! descriptor covers that one cluster), the data is readable by QEMU,
//! and the file holds only the compressed bytes.
//!
//! Between the two steps the entry briefly maps the compressed bytes as
//! plain data; a crash right then (after a write-back of that L2 table)
//! leaves that one cluster showing them. The caller (convert) writes
//! each cluster once, and nothing else reads or writes that cluster
//! while its compressed write runs.

use crate::compress;
use crate::driver::{Mapping, Qcow2Driver};
use crate::format::{corrupt, COMPRESSED, OFFSET_MASK};
use sluice_core::{BlockDriver, DebugEvent, Error, IoBytes, Node, Result, WriteFlags};
use std::sync::atomic::Ordering::SeqCst;

/// The L2 entry of a compressed cluster whose stream is `len` bytes at
/// `host` (the inverse of [`crate::format::compressed_descriptor`]).
pub fn compressed_entry(host: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let extra_sectors = ((host + len - 1) >> 9) - (host >> 9);
    COMPRESSED | (extra_sectors << x) | host
}

impl Qcow2Driver {
    /// Writes the guest cluster at `offset` compressed. `data` is one
    /// cluster, or less for the last cluster of the disk (padded with
    /// zeroes, as QEMU does). The cluster must not be allocated yet
    /// (QEMU: "Compression can't overwrite anything").
    pub async fn write_compressed(&self, node: &Node, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.layout().cluster_size();
        let size = self.size();
        let len = data.len() as u64;
        let invalid = |reason: String| Error::InvalidRequest {
            node: node.name().to_string(),
            reason,
        };
        if !offset.is_multiple_of(cs)
            || len > cs
            || len == 0
            || (len < cs && offset.checked_add(len) != Some(size))
            || offset.saturating_add(len) > size
        {
            return Err(invalid(format!(
                "a compressed write must cover one whole {cs}-byte cluster (or the end of the disk): offset {offset:#x} length {len}"
            )));
        }
        if self.layout().data_file {
            return Err(invalid(
                "compressed writes are not possible with an external data file".into(),
            ));
        }
        let file = self.file(node)?;
        let (m, _) = self.map(&file, offset, len).await?;
        if m != Mapping::Unallocated {
            return Err(invalid(format!(
                "Compression can't overwrite anything: the cluster at guest offset {offset:#x} is already allocated"
            )));
        }
        let mut cluster = data.to_vec();
        cluster.resize(cs as usize, 0);
        let packed = compress::compress(self.header().compression_type, &cluster, cs as usize - 1)
            .filter(|c| c.len() as u64 <= len);
        let Some(mut packed) = packed else {
            return self
                .write(
                    node,
                    offset,
                    IoBytes::copy_from(data),
                    WriteFlags::default(),
                )
                .await;
        };
        let stream_len = packed.len() as u64;
        file.debug_event(DebugEvent::WriteCompressed).await;
        packed.resize(len as usize, 0);
        self.write(
            node,
            offset,
            IoBytes::copy_from(&packed),
            WriteFlags::default(),
        )
        .await?;
        let (m, _) = self.map(&file, offset, 1).await?;
        let Mapping::Data { host } = m else {
            return Err(corrupt(
                self.name(),
                format!("guest cluster {offset:#x} is not mapped after a compressed write"),
            ));
        };
        file.debug_event(DebugEvent::L2UpdateCompressed).await;
        self.set_compressed_entry(
            &file,
            offset,
            compressed_entry(host, stream_len, self.layout().cluster_bits),
        )
        .await?;
        // Only the compressed bytes need to stay in the file.
        let align = file.request_alignment().max(512);
        let start = (host + stream_len).div_ceil(align) * align;
        let end = (host + cs).min(file.size());
        if start < end {
            file.discard(start, end - start).await?;
        }
        Ok(())
    }

    /// Replaces the L2 entry of the guest cluster at `guest` (in the
    /// cache; written back with the other tables) by `entry`, with an
    /// empty subcluster bitmap where entries are extended.
    async fn set_compressed_entry(&self, file: &Node, guest: u64, entry: u64) -> Result<()> {
        let cb = self.layout().cluster_bits;
        let l2_bits = self.header().l2_bits();
        let l1_index = (guest >> (cb + l2_bits)) as usize;
        let l2_off = self.l1.read().get(l1_index).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_off == 0 {
            return Err(corrupt(
                self.name(),
                format!("no L2 table for guest offset {guest:#x} after writing it"),
            ));
        }
        let idx = ((guest >> cb) & ((1u64 << l2_bits) - 1)) as usize;
        let (at, words): (usize, &[u64]) = if self.layout().extended_l2 {
            (2 * idx, &[entry, 0])
        } else {
            (idx, &[entry])
        };
        let set = |t: &mut [u64]| t[at..at + words.len()].copy_from_slice(words);
        self.l2_epoch.fetch_add(1, SeqCst);
        if !self.l2_cache.modify_cached(l2_off, set) {
            let base = self.l2_table(file, l2_off).await?;
            self.l2_epoch.fetch_add(1, SeqCst);
            self.l2_cache.modify(l2_off, &base, set);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::compressed_descriptor;

    #[test]
    fn entries_round_trip_through_the_descriptor() {
        for cb in 9..=21u32 {
            let cs = 1u64 << cb;
            for (host, len) in [(cs * 3, 1), (cs * 7, cs - 1), (cs * 5, 513), (cs * 9, 512)] {
                let e = compressed_entry(host, len, cb);
                let (h, l) = compressed_descriptor(e, cb);
                assert_eq!(h, host, "cluster bits {cb}");
                // The descriptor gives whole sectors that cover the stream.
                assert!(
                    l >= len && l < len + 512,
                    "cluster bits {cb}: {l} for {len}"
                );
            }
        }
    }
}
