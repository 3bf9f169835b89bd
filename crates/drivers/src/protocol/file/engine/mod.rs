//! I/O engines: how the `file` driver's system calls are carried out.
//!
//! Two engines implement [`IoEngine`]:
//!
//! * [`threads`] — a bounded pool of worker threads (at most 64, as QEMU's
//!   thread pool) doing `pread`/`pwrite`/`fdatasync`/`fallocate`;
//! * [`uring`] — io_uring rings whose completions are reaped through an
//!   eventfd watched by a tokio task.
//!
//! [`probe`] picks io_uring when the kernel lets us create a ring and run a
//! no-op on it, the thread pool otherwise. Each engine is one process-wide
//! instance ([`engine`]).
//!
//! # Ownership of buffers
//!
//! An operation owns what it touches: it holds a clone of the file's
//! `Arc<OwnedFd>` and the buffer's [`KeepAlive`] until the system call (or
//! the io_uring completion) has finished — whether or not anyone still awaits
//! its future. Dropping the future never cancels I/O that already started.

pub mod threads;
pub mod uring;

use sluice_core::buf::KeepAlive;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

/// The future of one engine operation: the byte count (reads and writes) or
/// 0 (sync, fallocate, truncate).
pub type IoFuture = Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'static>>;

/// Which engine carries out a file's I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// The worker thread pool (QEMU's `aio=threads`).
    Threads,
    /// io_uring (QEMU's `aio=io_uring`).
    IoUring,
}

impl EngineKind {
    /// QEMU's name for the engine (`aio=` value).
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Threads => "threads",
            EngineKind::IoUring => "io_uring",
        }
    }
}

/// Positional file I/O, asynchronous. Object safe: drivers hold a
/// `&'static dyn IoEngine`.
///
/// Every method starts (or queues) the operation and returns its future.
/// A single call does one system call's worth of work: reads and writes may
/// complete short and may fail with `EINTR`; the caller loops.
pub trait IoEngine: Send + Sync + 'static {
    fn kind(&self) -> EngineKind;

    /// Reads up to `len` bytes at `offset` into `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for writes of `len` bytes for as long as `keep`
    /// is alive (the engine holds `keep` until the read has finished, even
    /// if the future is dropped), and nothing else may access those bytes
    /// until the returned future completes.
    unsafe fn read_at(
        &self,
        fd: &Arc<OwnedFd>,
        offset: u64,
        ptr: *mut u8,
        len: usize,
        keep: KeepAlive,
    ) -> IoFuture;

    /// Writes up to `len` bytes from `ptr` at `offset`.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads of `len` bytes for as long as `keep`
    /// is alive, and the bytes must not change until the write finished.
    unsafe fn write_at(
        &self,
        fd: &Arc<OwnedFd>,
        offset: u64,
        ptr: *const u8,
        len: usize,
        keep: KeepAlive,
    ) -> IoFuture;

    /// `fdatasync` (`datasync`) or `fsync`.
    fn sync(&self, fd: &Arc<OwnedFd>, datasync: bool) -> IoFuture;

    /// `fallocate(fd, mode, offset, len)`.
    fn fallocate(&self, fd: &Arc<OwnedFd>, mode: i32, offset: u64, len: u64) -> IoFuture;

    /// `ftruncate(fd, len)`.
    fn truncate(&self, fd: &Arc<OwnedFd>, len: u64) -> IoFuture;

    /// Starts writeback of the dirty pages of `[offset, offset + len)`
    /// without waiting for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
    fn start_writeback(&self, fd: &Arc<OwnedFd>, offset: u64, len: u64) -> IoFuture;

    /// Operations started and not finished yet, including those whose
    /// futures were dropped (a diagnostic; other users of the process-wide
    /// engine count too).
    fn pending(&self) -> usize;
}

/// Finds out whether io_uring works here: creates a ring, runs a no-op and
/// checks that the opcodes the `file` driver needs are supported. The
/// answer is computed once per process.
pub fn probe() -> EngineKind {
    static PROBED: OnceLock<EngineKind> = OnceLock::new();
    *PROBED.get_or_init(|| match uring::engine() {
        Ok(_) => EngineKind::IoUring,
        Err(e) => {
            tracing::debug!("using the thread pool: {e}");
            EngineKind::Threads
        }
    })
}

/// Why io_uring cannot be used, or `None` when it can.
pub fn io_uring_unavailable_reason() -> Option<String> {
    uring::engine().err().map(|e| e.to_string())
}

/// The process-wide engine of `kind`.
pub fn engine(kind: EngineKind) -> io::Result<&'static dyn IoEngine> {
    match kind {
        EngineKind::Threads => Ok(threads::pool()),
        EngineKind::IoUring => uring::plain().map(|e| e as &'static dyn IoEngine),
    }
}

/// Turns a `-1`/errno return into an `io::Result`.
pub(crate) fn cvt(ret: libc::c_long) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `u64` to `off_t`, refusing offsets the kernel cannot take.
pub(crate) fn to_off(x: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(x).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}
