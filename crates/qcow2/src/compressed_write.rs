//! Compressed writes (what `qemu-img convert -c` does): one whole guest
//! cluster without a host cluster yet, compressed with the image's
//! compression type and stored as a compressed cluster; written
//! normally when compression does not make it smaller than a cluster.
//!
//! Compressed streams are packed byte by byte, one after another, into
//! host clusters ([`crate::write::Writer::alloc_compressed`], QEMU's
//! `qcow2_alloc_bytes`): a host cluster is referenced once per
//! compressed cluster whose bytes touch it. The order keeps a crash
//! harmless: the bytes are allocated (their refcounts raised in memory),
//! the stream written, and only then the L2 entry changed in the cached
//! table, which is written back after the refcounts are written and the
//! file flushed (the write side's rule 2). So on disk the entry never
//! points at unwritten or unreferenced bytes; a crash before the entry
//! lands only leaks them.

use crate::compress;
use crate::driver::{Mapping, Qcow2Driver};
use crate::format::COMPRESSED;
use sluice_core::{BlockDriver, DebugEvent, Error, IoBytes, Node, Result, WriteFlags};

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
    /// zeroes, as QEMU does). The cluster must have no host cluster yet
    /// (QEMU: "Compression can't overwrite anything").
    pub(crate) async fn write_compressed(
        &self,
        node: &Node,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
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
        let Some(writer) = self.writer.get() else {
            return Err(Error::NotSupported {
                node: node.name().to_string(),
                driver: "qcow2",
                what: "writing through a qcow2 node opened read-only",
            });
        };
        let file = self.file(node)?;
        // Checked again, under the write side's lock, before allocating.
        let (m, _) = self.map(&file, offset, len).await?;
        if !matches!(m, Mapping::Unallocated | Mapping::Zero) {
            return Err(invalid(format!(
                "Compression can't overwrite anything: the cluster at guest offset {offset:#x} is already allocated"
            )));
        }
        let mut cluster = data.to_vec();
        cluster.resize(cs as usize, 0);
        let packed = compress::compress(self.header().compression_type, &cluster, cs as usize - 1)
            .filter(|c| c.len() as u64 <= len);
        let Some(packed) = packed else {
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
        let slot = writer
            .alloc_compressed(self, node, offset, stream_len)
            .await?;
        // A failed write drops the slot: its bytes leak, nothing maps them.
        file.write(
            slot.host,
            IoBytes::copy_from(&packed),
            WriteFlags::default(),
        )
        .await?;
        let entry = compressed_entry(slot.host, stream_len, self.layout().cluster_bits);
        file.debug_event(DebugEvent::L2UpdateCompressed).await;
        writer.publish_compressed(self, &file, slot, entry).await
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
