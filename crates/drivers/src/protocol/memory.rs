//! `memory`: a sparse RAM disk. With a `backing` child it is a RAM overlay
//! whose unallocated parts read through to the backing chain, like the
//! temporary overlay of QEMU's `-snapshot`.
//!
//! Storage is kept in 4 KiB clusters; a partial write to an unallocated
//! cluster of an overlay copies the rest of the cluster up from the backing
//! chain first (copy-on-write), serialised with other allocating writes.

use async_trait::async_trait;
use parking_lot::RwLock;
use sluice_core::{
    BlockDriver, DebugEvent, DriverStatus, Error, IoBuf, IoBytes, Node, ReadBuf, Result, Role,
    WriteFlags, ZeroFlags,
};
use std::collections::BTreeMap;

/// Allocation unit of the RAM disk.
pub const CLUSTER: u64 = 4096;

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MemoryOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Optional backing node: a node-name, or nested options.
    #[serde(default)]
    pub backing: Option<serde_json::Value>,
}

enum Cluster {
    Data(Box<[u8]>),
    Zero,
}

pub struct MemoryDriver {
    clusters: RwLock<BTreeMap<u64, Cluster>>,
    /// Serialises writes that allocate clusters (copy-on-write from backing).
    alloc: tokio::sync::Mutex<()>,
}

impl Default for MemoryDriver {
    fn default() -> Self {
        MemoryDriver::new()
    }
}

impl MemoryDriver {
    pub fn new() -> MemoryDriver {
        MemoryDriver {
            clusters: RwLock::new(BTreeMap::new()),
            alloc: tokio::sync::Mutex::new(()),
        }
    }

    /// Bytes of RAM holding data (for tests and `info`).
    pub fn allocated_bytes(&self) -> u64 {
        self.clusters
            .read()
            .values()
            .filter(|c| matches!(c, Cluster::Data(_)))
            .count() as u64
            * CLUSTER
    }

    /// Reads what the layers below show for `[offset, offset + buf.len())`.
    /// The backing edge is loaded first and a `read_backing_aio` event is
    /// raised on it before the read goes down: blkdebug can park it there.
    async fn read_backing(&self, node: &Node, offset: u64, mut buf: ReadBuf<'_>) -> Result<()> {
        let Some(backing) = node.child(Role::Backing) else {
            buf.fill(0);
            return Ok(());
        };
        backing.debug_event(DebugEvent::ReadBackingAio).await;
        let bsize = backing.size();
        let n = (bsize.saturating_sub(offset)).min(buf.len() as u64) as usize;
        let (head, mut tail) = buf.split_at(n);
        tail.fill(0);
        if n > 0 {
            backing.read(offset, head).await?;
        }
        Ok(())
    }

    fn cluster_range(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        // (cluster index, offset within cluster, length in this cluster)
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = pos / CLUSTER;
            let within = pos % CLUSTER;
            let n = (CLUSTER - within).min(end - pos);
            pos += n;
            Some((idx, within, n))
        })
    }
}

#[async_trait]
impl BlockDriver for MemoryDriver {
    fn driver_name(&self) -> &'static str {
        "memory"
    }

    /// Memory is as writable as the node says: nothing to switch.
    async fn reopen(&self, _node: &Node, _read_only: bool) -> Result<()> {
        Ok(())
    }

    fn supports_backing(&self) -> bool {
        true
    }

    async fn read(&self, node: &Node, offset: u64, mut buf: ReadBuf<'_>) -> Result<()> {
        let len = buf.len() as u64;
        // Runs of unallocated clusters are read from the backing chain
        // after the lock is released.
        let mut holes: Vec<(u64, u64)> = Vec::new();
        {
            let map = self.clusters.read();
            let out = buf.as_mut_slice();
            let mut pos = 0usize;
            for (idx, within, n) in Self::cluster_range(offset, len) {
                let dst = &mut out[pos..pos + n as usize];
                match map.get(&idx) {
                    Some(Cluster::Data(d)) => {
                        dst.copy_from_slice(&d[within as usize..(within + n) as usize])
                    }
                    Some(Cluster::Zero) => dst.fill(0),
                    None => match holes.last_mut() {
                        Some((s, l)) if *s + *l == pos as u64 => *l += n,
                        _ => holes.push((pos as u64, n)),
                    },
                }
                pos += n as usize;
            }
        }
        for (rel, n) in holes {
            let piece = buf.reborrow().slice(rel as usize..(rel + n) as usize);
            self.read_backing(node, offset + rel, piece).await?;
        }
        Ok(())
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        let mut pos = 0usize;
        for (idx, within, n) in Self::cluster_range(offset, data.len() as u64) {
            let src = &data[pos..pos + n as usize];
            pos += n as usize;
            {
                let mut map = self.clusters.write();
                if flags.copy_on_read && map.contains_key(&idx) {
                    // Allocated meanwhile: a guest write got here first.
                    continue;
                }
                if let Some(Cluster::Data(d)) = map.get_mut(&idx) {
                    d[within as usize..(within + n) as usize].copy_from_slice(src);
                    continue;
                }
                if n == CLUSTER {
                    map.insert(idx, Cluster::Data(src.into()));
                    continue;
                }
            }
            // Partial write to a cluster that is unallocated or zero: fill
            // the rest from what it showed before, under the allocation lock.
            let _alloc = self.alloc.lock().await;
            let was_zero = match self.clusters.read().get(&idx) {
                Some(Cluster::Data(_)) => None,
                Some(Cluster::Zero) => Some(true),
                None => Some(false),
            };
            let mut cluster = IoBuf::zeroed(CLUSTER as usize);
            match was_zero {
                None => {}
                Some(true) => {}
                Some(false) => {
                    node.debug_event(DebugEvent::CowRead).await;
                    let cstart = idx * CLUSTER;
                    let clen = CLUSTER.min(node.size() - cstart) as usize;
                    let piece = cluster.as_read_buf().slice(0..clen);
                    self.read_backing(node, cstart, piece).await?;
                }
            }
            let mut map = self.clusters.write();
            match map.get_mut(&idx) {
                Some(_) if flags.copy_on_read => {}
                Some(Cluster::Data(d)) => {
                    d[within as usize..(within + n) as usize].copy_from_slice(src)
                }
                _ => {
                    cluster[within as usize..(within + n) as usize].copy_from_slice(src);
                    map.insert(idx, Cluster::Data(cluster.to_vec().into_boxed_slice()));
                }
            }
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        let zero_data = IoBuf::zeroed(CLUSTER as usize).freeze();
        for (idx, within, n) in Self::cluster_range(offset, len) {
            if n == CLUSTER {
                self.clusters.write().insert(idx, Cluster::Zero);
            } else {
                let piece = zero_data.slice(0..n as usize);
                let wflags = WriteFlags {
                    fua: flags.fua,
                    ..WriteFlags::default()
                };
                self.write(node, idx * CLUSTER + within, piece, wflags)
                    .await?;
            }
        }
        Ok(())
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        // Dropping a cluster of an overlay would let the backing show
        // through; such clusters become zero clusters instead.
        let has_backing = node.child(Role::Backing).is_some();
        let mut map = self.clusters.write();
        for (idx, _, n) in Self::cluster_range(offset, len) {
            if n == CLUSTER {
                if has_backing {
                    map.insert(idx, Cluster::Zero);
                } else {
                    map.remove(&idx);
                }
            }
        }
        Ok(())
    }

    async fn flush(&self, _node: &Node) -> Result<()> {
        Ok(())
    }

    async fn block_status(&self, _node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        let map = self.clusters.read();
        let mut kind = None;
        let mut covered = 0u64;
        for (idx, _, n) in Self::cluster_range(offset, len) {
            let k = match map.get(&idx) {
                Some(Cluster::Data(_)) => 0u8,
                Some(Cluster::Zero) => 1,
                None => 2,
            };
            match kind {
                None => kind = Some(k),
                Some(prev) if prev != k => break,
                _ => {}
            }
            covered += n;
        }
        Ok(match kind {
            Some(0) => DriverStatus::Data {
                len: covered,
                offset: None,
            },
            Some(1) => DriverStatus::Zero {
                len: covered,
                offset: None,
            },
            _ => DriverStatus::Unallocated { len: covered },
        })
    }
}

/// Checks a memory disk's size.
pub fn validate(opts: &MemoryOptions) -> Result<()> {
    if opts.size > (1u64 << 62) {
        return Err(Error::invalid_option(
            "memory",
            format!("size {} is too large", opts.size),
        ));
    }
    Ok(())
}
