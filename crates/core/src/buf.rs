//! I/O buffers that belong to the operation.
//!
//! A request future can be dropped while the I/O it started is still running
//! in a thread-pool worker or in the kernel (io_uring). The memory must stay
//! valid until that I/O ends, so buffers are reference-counted aligned
//! allocations: an I/O engine keeps a clone of the allocation's `Arc` for as
//! long as the operation runs, whatever happens to the future.
//!
//! * [`IoBuf`] — an owned, mutable, aligned buffer (what a caller reads into).
//! * [`ReadBuf`] — a borrowed mutable window of an `IoBuf`, passed down the
//!   graph to drivers; it can be split into disjoint windows.
//! * [`IoBytes`] — shared, immutable, cheaply sliced bytes (what a caller
//!   writes); an engine clones it to keep the data alive.
//!
//! Large buffers are recycled through a process-wide pool: a copy loop
//! reads megabytes per request, and a fresh allocation costs page faults
//! and zeroing of every byte — more than the page-cache copy it is for.
//! [`IoBuf::recycled`] hands out such a buffer without clearing it.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every buffer: enough for O_DIRECT on 4 KiB-sector devices.
pub const BUF_ALIGN: usize = 4096;

/// One aligned heap allocation. Never resized; freed (or given back to the
/// [`pool`]) when the last `Arc` goes.
pub struct Alloc {
    ptr: NonNull<u8>,
    len: usize,
    /// Straight from the allocator, so still all zero.
    fresh: bool,
}

// SAFETY: `Alloc` is plain memory; access is coordinated by the buffer types.
unsafe impl Send for Alloc {}
unsafe impl Sync for Alloc {}

impl Alloc {
    fn new_zeroed(len: usize) -> Alloc {
        if len == 0 {
            return Alloc {
                ptr: NonNull::dangling(),
                len: 0,
                fresh: true,
            };
        }
        let layout = Layout::from_size_align(len, BUF_ALIGN).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Alloc {
            ptr,
            len,
            fresh: true,
        }
    }

    /// An allocation of at least `len` bytes from the pool, its contents
    /// whatever its last user left (always initialised: every allocation
    /// starts zeroed).
    fn recycled(len: usize) -> Arc<Alloc> {
        match pool::class_of(len) {
            Some(class) => Arc::new(pool::take(class).unwrap_or_else(|| Alloc::new_zeroed(class))),
            None => Arc::new(Alloc::new_zeroed(len)),
        }
    }
}

impl Drop for Alloc {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let me = Alloc {
            ptr: self.ptr,
            len: self.len,
            fresh: false,
        };
        if let Some(me) = pool::give(me) {
            // Not kept: free it. `me` is forgotten so that this does not recurse.
            let layout = Layout::from_size_align(me.len, BUF_ALIGN).expect("buffer layout");
            let raw = me.ptr.as_ptr();
            std::mem::forget(me);
            // SAFETY: allocated in `new_zeroed` with this layout; `self` is
            // being dropped and `me` was forgotten, so nothing else frees it.
            unsafe { dealloc(raw, layout) }
        }
    }
}

/// The pool of large allocations, by power-of-two size class.
mod pool {
    use super::Alloc;
    use parking_lot::Mutex;

    /// Smaller buffers come cheaply from malloc.
    const MIN_CLASS: usize = 64 << 10;
    /// Larger ones are rare (a single huge request) and not kept.
    const MAX_CLASS: usize = 32 << 20;
    /// At most this many bytes wait in the pool; the rest is freed.
    const MAX_POOLED: usize = 128 << 20;

    const CLASSES: usize = (MAX_CLASS.trailing_zeros() - MIN_CLASS.trailing_zeros() + 1) as usize;

    struct Pool {
        free: [Vec<Alloc>; CLASSES],
        bytes: usize,
    }

    static POOL: Mutex<Pool> = Mutex::new(Pool {
        free: [const { Vec::new() }; CLASSES],
        bytes: 0,
    });

    /// The size class that serves `len` bytes, if pooled.
    pub(super) fn class_of(len: usize) -> Option<usize> {
        let class = len.max(MIN_CLASS).checked_next_power_of_two()?;
        (class <= MAX_CLASS && len > 0).then_some(class)
    }

    fn index(class: usize) -> usize {
        (class.trailing_zeros() - MIN_CLASS.trailing_zeros()) as usize
    }

    pub(super) fn take(class: usize) -> Option<Alloc> {
        let mut p = POOL.lock();
        let mut a = p.free[index(class)].pop()?;
        p.bytes -= a.len;
        a.fresh = false;
        Some(a)
    }

    /// Keeps `a` for reuse if it is of a pooled class and there is room;
    /// otherwise gives it back to be freed.
    pub(super) fn give(a: Alloc) -> Option<Alloc> {
        if class_of(a.len) != Some(a.len) {
            return Some(a);
        }
        let mut p = POOL.lock();
        if p.bytes + a.len > MAX_POOLED {
            return Some(a);
        }
        p.bytes += a.len;
        p.free[index(a.len)].push(a);
        None
    }
}

/// Keeps an allocation alive while an engine operation uses raw pointers
/// into it.
#[derive(Clone)]
pub struct KeepAlive(#[allow(dead_code)] Arc<Alloc>);

/// An owned, zero-initialised, [`BUF_ALIGN`]-aligned byte buffer.
pub struct IoBuf {
    alloc: Arc<Alloc>,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut b = IoBuf::recycled(len);
        if !b.alloc_is_fresh() {
            b.fill(0);
        }
        b
    }

    /// A buffer of `len` bytes whose contents are unspecified: a recycled
    /// allocation, not cleared. For reads, which fill every byte — cheaper
    /// than [`IoBuf::zeroed`] for the multi-MiB buffers of copy loops.
    pub fn recycled(len: usize) -> IoBuf {
        IoBuf {
            alloc: Alloc::recycled(len),
            len,
        }
    }

    /// Whether nobody has written to the allocation yet (it is still zero).
    fn alloc_is_fresh(&self) -> bool {
        self.alloc.fresh
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::recycled(data.len());
        b.copy_from_slice(data);
        b
    }

    /// A buffer of `len` bytes, each `byte`.
    pub fn filled(len: usize, byte: u8) -> IoBuf {
        let mut b = IoBuf::recycled(len);
        b.fill(byte);
        b
    }

    /// The whole buffer as a window to read into.
    pub fn as_read_buf(&mut self) -> ReadBuf<'_> {
        ReadBuf {
            ptr: self.alloc.ptr,
            len: self.len,
            owner: &self.alloc,
            _borrow: PhantomData,
        }
    }

    /// Turns the buffer into shared immutable bytes without copying.
    pub fn freeze(self) -> IoBytes {
        IoBytes {
            start: 0,
            len: self.len,
            alloc: self.alloc,
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation holds `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.alloc.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: `IoBuf` is the unique owner of the bytes for mutation.
        unsafe { std::slice::from_raw_parts_mut(self.alloc.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

/// A mutable window into an [`IoBuf`], handed down the graph for a read.
///
/// Like `&'a mut [u8]`, plus access to the allocation's [`KeepAlive`] so that
/// an engine can hold the memory beyond a dropped future.
pub struct ReadBuf<'a> {
    ptr: NonNull<u8>,
    len: usize,
    owner: &'a Arc<Alloc>,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a `ReadBuf` is an exclusive borrow of plain bytes.
unsafe impl Send for ReadBuf<'_> {}
unsafe impl Sync for ReadBuf<'_> {}

impl<'a> ReadBuf<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: exclusive window of initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// A shorter-lived window over the same bytes.
    pub fn reborrow(&mut self) -> ReadBuf<'_> {
        ReadBuf {
            ptr: self.ptr,
            len: self.len,
            owner: self.owner,
            _borrow: PhantomData,
        }
    }

    /// Splits into `[0, mid)` and `[mid, len)`. `mid` is clamped to `len`.
    pub fn split_at(self, mid: usize) -> (ReadBuf<'a>, ReadBuf<'a>) {
        let mid = mid.min(self.len);
        // SAFETY: both halves lie within the window and do not overlap.
        let tail = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(mid)) };
        (
            ReadBuf {
                ptr: self.ptr,
                len: mid,
                owner: self.owner,
                _borrow: PhantomData,
            },
            ReadBuf {
                ptr: tail,
                len: self.len - mid,
                owner: self.owner,
                _borrow: PhantomData,
            },
        )
    }

    /// The sub-window `range` (relative to this window).
    pub fn slice(self, range: Range<usize>) -> ReadBuf<'a> {
        let (_, rest) = self.split_at(range.start);
        let (mid, _) = rest.split_at(range.end.saturating_sub(range.start));
        mid
    }

    /// Raw pointer for an engine; the engine must also hold [`Self::keep_alive`].
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Keeps the memory valid for an engine operation that outlives the future.
    pub fn keep_alive(&self) -> KeepAlive {
        KeepAlive(self.owner.clone())
    }

    pub fn fill(&mut self, byte: u8) {
        self.as_mut_slice().fill(byte);
    }

    pub fn copy_from(&mut self, src: &[u8]) {
        self.as_mut_slice().copy_from_slice(src);
    }
}

/// Shared, immutable, aligned-at-allocation bytes: the payload of a write.
#[derive(Clone)]
pub struct IoBytes {
    alloc: Arc<Alloc>,
    start: usize,
    len: usize,
}

impl IoBytes {
    pub fn copy_from(data: &[u8]) -> IoBytes {
        IoBuf::copy_from(data).freeze()
    }

    /// A sub-range sharing the same allocation.
    pub fn slice(&self, range: Range<usize>) -> IoBytes {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "IoBytes::slice out of range"
        );
        IoBytes {
            alloc: self.alloc.clone(),
            start: self.start + range.start,
            len: range.end - range.start,
        }
    }

    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: start is within the allocation.
        unsafe { self.alloc.ptr.as_ptr().add(self.start) }
    }

    pub fn keep_alive(&self) -> KeepAlive {
        KeepAlive(self.alloc.clone())
    }
}

impl Deref for IoBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: immutable initialised bytes within the allocation.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for IoBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_split_disjointly() {
        let mut b = IoBuf::zeroed(8192);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        let rb = b.as_read_buf();
        let (mut head, mut tail) = rb.split_at(4096);
        head.fill(1);
        tail.fill(2);
        assert!(b[..4096].iter().all(|&x| x == 1));
        assert!(b[4096..].iter().all(|&x| x == 2));
    }

    #[test]
    fn large_buffers_are_recycled_and_small_ones_are_not() {
        // The largest class: no other test here uses it.
        const LEN: usize = (32 << 20) - 5;
        let b = IoBuf::filled(LEN, 0xa5);
        let addr = b.as_ptr() as usize;
        drop(b);
        // The same class comes back from the pool, unchanged.
        let again = IoBuf::recycled(LEN);
        assert_eq!(again.as_ptr() as usize, addr);
        assert!(again.iter().all(|&x| x == 0xa5));
        // A frozen buffer goes back when its last slice goes.
        let bytes = again.freeze();
        let part = bytes.slice(0..10);
        drop(bytes);
        drop(part);
        let third = IoBuf::recycled(LEN);
        assert_eq!(third.as_ptr() as usize, addr);
        drop(third);
        // Zeroed buffers are zero whatever the pool holds.
        drop(IoBuf::filled(LEN, 0xff));
        let z = IoBuf::zeroed(LEN);
        assert_eq!(z.as_ptr() as usize, addr);
        assert!(z.iter().all(|&x| x == 0));
        assert_eq!(pool::class_of(100), Some(64 << 10));
        assert_eq!(pool::class_of(0), None);
        assert_eq!(pool::class_of(usize::MAX), None);
        assert_eq!(pool::class_of((32 << 20) + 1), None);
    }

    #[test]
    fn slices_share_the_allocation() {
        let bytes = IoBuf::filled(100, 7).freeze();
        let s = bytes.slice(10..20);
        assert_eq!(s.len(), 10);
        assert!(s.iter().all(|&x| x == 7));
    }

    #[test]
    fn keep_alive_outlives_the_buffer() {
        let mut b = IoBuf::filled(64, 3);
        let mut rb = b.as_read_buf();
        let ptr = rb.as_mut_ptr();
        let keep = rb.keep_alive();
        drop(b);
        // SAFETY: `keep` holds the allocation.
        assert_eq!(unsafe { *ptr }, 3);
        drop(keep);
    }
}
