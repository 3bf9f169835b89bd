//! Compressed output for `convert -c`: whole clusters through
//! `Node::write_compressed` (the qcow2 driver compresses them).

use super::convert::is_zero;
use sluice_core::{IoBytes, Root, ZeroFlags};

/// Writes `data` at `off` (cluster-aligned) as compressed clusters of
/// `cluster` bytes. All-zero clusters are skipped when the target reads
/// as zeroes, else written as zeroes.
pub async fn write_clusters(
    dst: &Root,
    off: u64,
    data: &IoBytes,
    cluster: usize,
    target_zero: bool,
) -> Result<(), String> {
    let node = dst.node();
    for (i, c) in data.chunks(cluster).enumerate() {
        let at = off + (i * cluster) as u64;
        if is_zero(c) {
            if !target_zero {
                node.write_zeroes(at, c.len() as u64, ZeroFlags::default())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            continue;
        }
        // A short last piece (a source shorter than the target's whole
        // sectors) is padded with zeroes to the cluster or the disk's end.
        let want = (cluster as u64).min(node.size() - at) as usize;
        let padded;
        let c = if c.len() < want {
            let mut v = c.to_vec();
            v.resize(want, 0);
            padded = v;
            &padded[..]
        } else {
            c
        };
        node.write_compressed(at, IoBytes::copy_from(c))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
