//! Per-node I/O statistics, with the counters QEMU's `query-blockstats` reports.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct IoStats {
    pub rd_bytes: AtomicU64,
    pub wr_bytes: AtomicU64,
    pub rd_operations: AtomicU64,
    pub wr_operations: AtomicU64,
    pub flush_operations: AtomicU64,
    pub unmap_operations: AtomicU64,
    pub unmap_bytes: AtomicU64,
    pub zone_operations: AtomicU64,
    pub failed_rd_operations: AtomicU64,
    pub failed_wr_operations: AtomicU64,
    pub failed_flush_operations: AtomicU64,
    pub failed_unmap_operations: AtomicU64,
}

/// The kinds of request the statistics tell apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Unmap,
}

impl IoStats {
    pub(crate) fn account(&self, kind: IoKind, bytes: u64, ok: bool) {
        let (ops, by, failed) = match kind {
            IoKind::Read => (
                &self.rd_operations,
                Some(&self.rd_bytes),
                &self.failed_rd_operations,
            ),
            IoKind::Write => (
                &self.wr_operations,
                Some(&self.wr_bytes),
                &self.failed_wr_operations,
            ),
            IoKind::Flush => (&self.flush_operations, None, &self.failed_flush_operations),
            IoKind::Unmap => (
                &self.unmap_operations,
                Some(&self.unmap_bytes),
                &self.failed_unmap_operations,
            ),
        };
        if ok {
            ops.fetch_add(1, Relaxed);
            if let Some(by) = by {
                by.fetch_add(bytes, Relaxed);
            }
        } else {
            failed.fetch_add(1, Relaxed);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
