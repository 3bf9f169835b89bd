//! Granule bitmaps (what a mirror must copy again, what a backup has yet
//! to copy) and the ranges being copied right now.

use parking_lot::Mutex;
use tokio::sync::Notify;

/// One bit per granule of a disk.
pub(crate) struct DirtyBitmap {
    granularity: u64,
    size: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    pub(crate) fn new(size: u64, granularity: u64) -> DirtyBitmap {
        let bits = size.div_ceil(granularity);
        DirtyBitmap {
            granularity,
            size,
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    pub(crate) fn granularity(&self) -> u64 {
        self.granularity
    }

    pub(crate) fn granules(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = (offset + len).min(self.size);
        offset / self.granularity..end.div_ceil(self.granularity)
    }

    pub(crate) fn set(&mut self, offset: u64, len: u64) {
        for g in self.granules(offset, len) {
            self.words[(g / 64) as usize] |= 1 << (g % 64);
        }
    }

    pub(crate) fn clear(&mut self, offset: u64, len: u64) {
        for g in self.granules(offset, len) {
            self.words[(g / 64) as usize] &= !(1 << (g % 64));
        }
    }

    pub(crate) fn is_set(&self, g: u64) -> bool {
        self.words[(g / 64) as usize] & (1 << (g % 64)) != 0
    }

    pub(crate) fn count_bytes(&self) -> u64 {
        let n: u64 = self.words.iter().map(|w| w.count_ones() as u64).sum();
        (n * self.granularity).min(self.size)
    }

    /// The first dirty run at or after `from` (wrapping), at most `max`
    /// bytes long.
    pub(crate) fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let total = self.size.div_ceil(self.granularity);
        if total == 0 {
            return None;
        }
        let start_g = (from / self.granularity) % total;
        let first = (0..total)
            .map(|i| (start_g + i) % total)
            .find(|&g| self.is_set(g))?;
        let max_g = (max / self.granularity).max(1);
        let mut end = first + 1;
        while end < total && end - first < max_g && self.is_set(end) {
            end += 1;
        }
        let off = first * self.granularity;
        let len = (end * self.granularity).min(self.size) - off;
        Some((off, len))
    }
}

/// Ranges being copied by the job or written through to the target by a
/// write-blocking guest write: the two never overlap.
#[derive(Default)]
pub(crate) struct Busy {
    ranges: Mutex<Vec<(u64, u64)>>,
    freed: Notify,
}

pub(crate) struct BusyGuard<'a> {
    busy: &'a Busy,
    range: (u64, u64),
}

impl Busy {
    pub(crate) async fn lock(&self, offset: u64, len: u64) -> BusyGuard<'_> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut r = self.ranges.lock();
                if !r.iter().any(|&(o, l)| o < offset + len && offset < o + l) {
                    r.push((offset, len));
                    return BusyGuard {
                        busy: self,
                        range: (offset, len),
                    };
                }
            }
            freed.await;
        }
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.busy.ranges.lock();
        if let Some(i) = r.iter().position(|&x| x == self.range) {
            r.swap_remove(i);
        }
        drop(r);
        self.busy.freed.notify_waiters();
    }
}
