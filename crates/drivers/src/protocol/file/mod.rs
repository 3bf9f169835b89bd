//! The `file` protocol driver: an image in a regular file, as QEMU's
//! `block/file-posix.c`.
//!
//! * Options are QEMU's `BlockdevOptionsFile` ([`FileOptions`]); the cache
//!   mode comes from the caller ([`CacheMode`], [`parse_cache_mode`]).
//! * I/O goes through an [`IoEngine`] (thread pool or io_uring, see
//!   [`engine`]), never through `tokio::fs`. Reads and writes loop over
//!   short transfers and `EINTR`; a read that meets the end of the file
//!   zero-fills the rest of the buffer.
//! * With `O_DIRECT` (cache modes `none` and `directsync`) the request
//!   alignment is probed at open; buffers whose address does not suit the
//!   device go through an aligned bounce buffer.
//! * Image locking uses QEMU's lock bytes, so sluice and QEMU's tools see
//!   each other's locks ([`lock`]).

pub mod engine;
pub mod lock;

pub use engine::{EngineKind, IoEngine};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use sluice_core::buf::IoBuf;
use sluice_core::perm::{Perm, PermPair};
use sluice_core::{
    BlockDriver, DriverStatus, Error, IoBytes, Node, ReadBuf, Result, WriteFlags, ZeroFlags,
};
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

/// How the cache is used: QEMU's `cache.direct` and `cache.no-flush`, plus
/// whether the write cache is off (`writethrough`: every write is followed
/// by a flush, as QEMU does by making every write FUA).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheMode {
    /// Open with `O_DIRECT`, bypassing the host page cache.
    pub direct: bool,
    /// Ignore flushes (`cache=unsafe`).
    pub no_flush: bool,
    /// Flush after every write (`cache=writethrough`, `cache=directsync`).
    pub writethrough: bool,
}

impl CacheMode {
    pub const WRITEBACK: CacheMode = CacheMode {
        direct: false,
        no_flush: false,
        writethrough: false,
    };
    pub const NONE: CacheMode = CacheMode {
        direct: true,
        no_flush: false,
        writethrough: false,
    };
    pub const WRITETHROUGH: CacheMode = CacheMode {
        direct: false,
        no_flush: false,
        writethrough: true,
    };
    pub const DIRECTSYNC: CacheMode = CacheMode {
        direct: true,
        no_flush: false,
        writethrough: true,
    };
    pub const UNSAFE: CacheMode = CacheMode {
        direct: false,
        no_flush: true,
        writethrough: false,
    };
}

/// Parses a cache mode name as `qemu-img -t` / `qemu-io -t` take it:
/// `none` (or `off`), `writeback`, `writethrough`, `directsync`, `unsafe`.
pub fn parse_cache_mode(s: &str) -> Result<CacheMode> {
    match s {
        "none" | "off" => Ok(CacheMode::NONE),
        "writeback" => Ok(CacheMode::WRITEBACK),
        "writethrough" => Ok(CacheMode::WRITETHROUGH),
        "directsync" => Ok(CacheMode::DIRECTSYNC),
        "unsafe" => Ok(CacheMode::UNSAFE),
        _ => Err(Error::Other(format!("Invalid cache option: {s}"))),
    }
}

/// QEMU's `aio` option values for the `file` driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Aio {
    #[serde(rename = "threads")]
    Threads,
    #[serde(rename = "io_uring")]
    IoUring,
    /// Linux AIO in QEMU; sluice uses io_uring for it.
    #[serde(rename = "native")]
    Native,
}

impl Aio {
    pub fn engine_kind(self) -> EngineKind {
        match self {
            Aio::Threads => EngineKind::Threads,
            Aio::IoUring | Aio::Native => EngineKind::IoUring,
        }
    }
}

/// QEMU's `locking` option (`OnOffAuto`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Locking {
    /// Lock when the kernel and file system support OFD locks.
    #[default]
    Auto,
    On,
    Off,
}

/// The options of a `file` node (QEMU's `BlockdevOptionsFile`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileOptions {
    pub filename: String,
    /// The I/O engine; by default what [`engine::probe`] chose.
    #[serde(default)]
    pub aio: Option<Aio>,
    #[serde(default)]
    pub locking: Locking,
    /// Accepted and ignored (a batching hint for Linux AIO in QEMU).
    #[serde(default)]
    pub aio_max_batch: Option<u64>,
    /// Accepted and ignored (cache dropping on migration in QEMU).
    #[serde(default)]
    pub drop_cache: Option<bool>,
    /// Accepted and ignored.
    #[serde(default)]
    pub x_check_cache_dropped: Option<bool>,
}

impl FileOptions {
    /// Options with `filename` and every default.
    pub fn new(filename: impl Into<String>) -> FileOptions {
        FileOptions {
            filename: filename.into(),
            aio: None,
            locking: Locking::Auto,
            aio_max_batch: None,
            drop_cache: None,
            x_check_cache_dropped: None,
        }
    }
}

/// The permissions a `file` node takes at open, before its parents say
/// more through [`FileDriver::apply_perms`]: a writable node holds consistent
/// read, write and resize and shares only consistent read and unchanged
/// writes (what QEMU's qcow2 takes on its file); a read-only node holds
/// consistent read and shares everything (what `qemu-io -r` takes on a raw
/// image).
pub fn default_perms(read_only: bool) -> PermPair {
    if read_only {
        PermPair::new(Perm::CONSISTENT_READ, Perm::ALL)
    } else {
        PermPair::new(
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
    }
}

/// An open `file` node.
pub struct FileDriver {
    filename: String,
    /// Swapped by a reopen (drained); an operation keeps the descriptor it
    /// started with.
    fd: RwLock<Arc<OwnedFd>>,
    engine: &'static dyn IoEngine,
    /// The engine for writes. Without an `aio` option, buffered writes go
    /// to the thread pool even when io_uring is chosen: io_uring hands
    /// buffered writes to kernel workers on common file systems (ext4), and
    /// that measured slower than the pool (BENCHMARKS.md).
    write_engine: &'static dyn IoEngine,
    cache: CacheMode,
    read_only: AtomicBool,
    /// Offsets and lengths of requests are multiples of this.
    align: u32,
    /// With `O_DIRECT`, buffer addresses must be multiples of this.
    mem_align: usize,
    use_lock: bool,
    lock: Mutex<lock::LockState>,
    has_write_zeroes: AtomicBool,
    has_discard: AtomicBool,
    /// errno of a failed `fdatasync` in buffered mode: the page cache may
    /// have dropped data, so every later flush fails too (as QEMU does).
    page_cache_inconsistent: AtomicI32,
    /// Writes past the end of the file (a growing qcow2 image, a copy
    /// into a new file) find their blocks already allocated up to here:
    /// see [`FileDriver::reserve_ahead`].
    reserved_end: AtomicU64,
    /// Cleared when the file system cannot reserve (or is full).
    reserve_ok: AtomicBool,
    /// Large writes are parts of one bulk copy: see [`set_bulk_copy`].
    bulk: bool,
    /// With `bulk`, start writeback of each write at once (the cache mode
    /// flushes, and not through `O_DIRECT`).
    write_behind: bool,
    /// The end of the file as far as this driver knows (its length at
    /// open, after truncations, and the end of every write): a bulk write
    /// below it may fill a hole, one past it is an append.
    known_end: AtomicU64,
}

static BULK_COPY: AtomicBool = AtomicBool::new(false);

/// Large writes (at least this) of a bulk copy allocate their blocks first.
const BULK_ALLOC_MIN: u64 = 256 << 10;

/// Makes `file` nodes opened from now on in this process treat their
/// writes as one bulk copy (`qemu-img convert`, `commit`, `rebase`), two
/// ways:
/// * a large write into a hole first allocates its blocks in one
///   `fallocate` (cheaper on ext4 than allocating page by page as the
///   data arrives; the write then covers them all, so nothing reads
///   differently and no more space is used);
/// * when the cache mode flushes, each write's writeback starts at once,
///   so the disk writes while the copy goes on rather than all at the
///   final flush.
///
/// Not for guests (the daemon), whose small rewrites of the same blocks
/// the page cache absorbs.
pub fn set_bulk_copy(on: bool) {
    BULK_COPY.store(on, Ordering::Relaxed);
}

/// How far past an appending write the file is reserved: an eighth of
/// the file, between these bounds.
const RESERVE_MIN: u64 = 8 << 20;
const RESERVE_MAX: u64 = 64 << 20;

impl fmt::Debug for FileDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileDriver")
            .field("filename", &self.filename)
            .field("engine", &self.engine.kind())
            .field("cache", &self.cache)
            .field("read_only", &self.is_read_only())
            .field("align", &self.align)
            .finish()
    }
}

impl Drop for FileDriver {
    /// Releases the lock bytes explicitly rather than by closing the fd:
    /// a child process forked elsewhere in this process between `fork` and
    /// `exec` shares the open file description, and with it the locks, for
    /// a moment; in-flight operations of dropped futures may also still
    /// hold the fd.
    fn drop(&mut self) {
        self.release_reserve();
        if self.use_lock {
            lock::release(self.fd().as_raw_fd(), &mut self.lock.lock());
        }
    }
}

fn errno_is_not_supported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV) | Some(libc::ENOTTY)
    )
}

/// Opens the image file `opts.filename`; returns the driver and the file
/// size.
pub async fn open(
    opts: &FileOptions,
    cache: CacheMode,
    read_only: bool,
) -> Result<(FileDriver, u64)> {
    let open_err = |source: io::Error| Error::Open {
        file: opts.filename.clone(),
        source,
    };
    let kind = opts.aio.map_or_else(engine::probe, Aio::engine_kind);
    let engine: &'static dyn IoEngine = match kind {
        // O_DIRECT requests gain from batched submission (the block layer
        // merges neighbours); page-cache hits do not.
        EngineKind::IoUring if cache.direct => engine::uring::batched()
            .map(|e| e as &'static dyn IoEngine)
            .map_err(|e| Error::invalid_option("file", e.to_string()))?,
        _ => engine::engine(kind).map_err(|e| Error::invalid_option("file", e.to_string()))?,
    };
    let write_engine = if opts.aio.is_none() && !cache.direct {
        engine::engine(EngineKind::Threads)
            .map_err(|e| Error::invalid_option("file", e.to_string()))?
    } else {
        engine
    };

    let (fd, st) = open_fd(&opts.filename, read_only, cache.direct)?;
    let size = st.st_size as u64;

    let use_lock = match opts.locking {
        Locking::Off => false,
        Locking::Auto => lock::ofd_supported(fd.as_raw_fd()),
        Locking::On => {
            if !lock::ofd_supported(fd.as_raw_fd()) {
                return Err(open_err(io::Error::other(
                    "File lock requested but OFD locking is unavailable",
                )));
            }
            true
        }
    };

    let fd = Arc::new(fd);
    let (align, mem_align) = if cache.direct {
        probe_alignment(engine, &fd).await
    } else {
        (1, 1)
    };

    let driver = FileDriver {
        filename: opts.filename.clone(),
        fd: RwLock::new(fd),
        engine,
        write_engine,
        cache,
        read_only: AtomicBool::new(read_only),
        align,
        mem_align,
        use_lock,
        lock: Mutex::new(lock::LockState::default()),
        has_write_zeroes: AtomicBool::new(true),
        has_discard: AtomicBool::new(true),
        page_cache_inconsistent: AtomicI32::new(0),
        reserved_end: AtomicU64::new(size),
        reserve_ok: AtomicBool::new(!read_only),
        bulk: BULK_COPY.load(Ordering::Relaxed),
        write_behind: BULK_COPY.load(Ordering::Relaxed) && !cache.no_flush && !cache.direct,
        known_end: AtomicU64::new(size),
    };
    driver
        .lock_perms(default_perms(read_only))
        .map_err(|msg| open_err(io::Error::new(io::ErrorKind::WouldBlock, msg)))?;
    Ok((driver, size))
}

/// Opens `filename` read-only or read-write (and `O_DIRECT`) as QEMU's
/// file-posix does; it must be a regular file. Returns the descriptor and
/// what `fstat` says of it.
fn open_fd(filename: &str, read_only: bool, direct: bool) -> Result<(OwnedFd, libc::stat)> {
    let open_err = |source: io::Error| Error::Open {
        file: filename.to_string(),
        source,
    };
    let path = CString::new(filename.as_bytes())
        .map_err(|_| open_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
    let mut flags = libc::O_CLOEXEC
        | if read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
    if direct {
        flags |= libc::O_DIRECT;
    }
    let fd = loop {
        // SAFETY: `path` is a valid C string.
        let fd = unsafe { libc::open(path.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: a fresh fd nobody else owns.
            break unsafe { OwnedFd::from_raw_fd(fd) };
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // As QEMU: a read-only file system is a permission problem.
            Some(libc::EROFS) => return Err(open_err(io::Error::from_raw_os_error(libc::EACCES))),
            _ => return Err(open_err(e)),
        }
    };
    let st = fstat(fd.as_raw_fd()).map_err(open_err)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::invalid_option(
            "file",
            format!("'file' driver requires '{filename}' to be a regular file"),
        ));
    }
    Ok((fd, st))
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain data, filled in by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and buffer.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// `O_DIRECT` alignment: what `statx(STATX_DIOALIGN)` says, else QEMU's
/// probe (an aligned `pread` at offset 0 of 512, then 4096 bytes; `EINVAL`
/// means too small), else 4096. Returns (request, buffer) alignment.
async fn probe_alignment(engine: &'static dyn IoEngine, fd: &Arc<OwnedFd>) -> (u32, usize) {
    if let Some((mem, off)) = statx_dio_align(fd.as_raw_fd()) {
        return (off, mem as usize);
    }
    let mut buf = IoBuf::zeroed(4096);
    for align in [512u32, 4096] {
        let mut rb = buf.as_read_buf();
        let (ptr, keep) = (rb.as_mut_ptr(), rb.keep_alive());
        // SAFETY: `buf` is 4096 bytes and `keep` holds it.
        let r = unsafe { engine.read_at(fd, 0, ptr, align as usize, keep) }.await;
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            _ => return (align, align as usize),
        }
    }
    (4096, 4096)
}

fn statx_dio_align(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: `statx` is plain data, filled in by the kernel.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: valid fd, path and buffer.
    let ret = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret < 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let (mem, off) = (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    let ok = |x: u32| x > 0 && x.is_power_of_two() && x <= 1 << 16;
    (ok(mem) && ok(off)).then_some((mem, off))
}

impl FileDriver {
    /// The engine this file's I/O goes through.
    pub fn engine_kind(&self) -> EngineKind {
        self.engine.kind()
    }

    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// The descriptor I/O goes through now.
    fn fd(&self) -> Arc<OwnedFd> {
        self.fd.read().clone()
    }

    /// Whether image locking is in effect (`locking=off` or no OFD locks:
    /// no).
    pub fn locking_enabled(&self) -> bool {
        self.use_lock
    }

    /// The permissions the lock bytes stand for now.
    pub fn perms(&self) -> PermPair {
        self.lock.lock().perms
    }

    /// Moves the image's lock bytes to `perms`, as QEMU does when the
    /// permissions on a `file` node change: fails without changing anything
    /// if another process holds a conflicting lock, with QEMU's message
    /// (`Failed to get "write" lock` / `Failed to get shared "write" lock`,
    /// then `Is another process using the image [...]?`).
    pub fn apply_perms(&self, perms: PermPair) -> Result<()> {
        self.lock_perms(perms).map_err(Error::Other)
    }

    fn lock_perms(&self, perms: PermPair) -> Result<(), String> {
        if !self.use_lock {
            self.lock.lock().perms = perms;
            return Ok(());
        }
        let mut st = self.lock.lock();
        lock::apply(self.fd().as_raw_fd(), &mut st, perms, &self.filename)
    }

    /// Reopens the file read-only or read-write, as QEMU's
    /// `raw_reopen_prepare`/`commit`: a new descriptor of the same file
    /// with the new mode takes over the lock bytes, then replaces the old
    /// one (the node is drained, so no request uses it). Read-write takes
    /// the locks a read-write open takes, so another process holding a
    /// conflicting lock refuses it, with QEMU's message; read-only gives
    /// up the write locks, keeping what `users` (the node's users) need
    /// otherwise. On error nothing changed.
    pub fn reopen(&self, read_only: bool, users: PermPair) -> Result<()> {
        if self.is_read_only() == read_only {
            return Ok(());
        }
        if read_only {
            self.release_reserve();
        }
        let (new, st) = open_fd(&self.filename, read_only, self.cache.direct)?;
        let cur = self.fd();
        let old_st = fstat(cur.as_raw_fd()).map_err(|e| Error::Open {
            file: self.filename.clone(),
            source: e,
        })?;
        if (st.st_dev, st.st_ino) != (old_st.st_dev, old_st.st_ino) {
            return Err(Error::Other(format!(
                "Could not reopen '{}': the path names another file now",
                self.filename
            )));
        }
        let mut locks = self.lock.lock();
        if self.use_lock {
            let before = locks.perms;
            if !read_only {
                let rw = default_perms(false);
                let want = PermPair::new(before.perm | rw.perm, before.shared & rw.shared);
                lock::apply(cur.as_raw_fd(), &mut locks, want, &self.filename)
                    .map_err(Error::Other)?;
            }
            if let Err(e) = lock::transfer(cur.as_raw_fd(), new.as_raw_fd(), &locks) {
                if let Err(e) = lock::apply(cur.as_raw_fd(), &mut locks, before, &self.filename) {
                    tracing::warn!("{}: {e}", self.filename);
                }
                return Err(Error::Other(format!("{}: {e}", self.filename)));
            }
        }
        *self.fd.write() = Arc::new(new);
        self.read_only.store(read_only, Ordering::Release);
        self.reserve_ok.store(!read_only, Ordering::Relaxed);
        if self.use_lock && read_only {
            let writes = Perm::WRITE | Perm::WRITE_UNCHANGED | Perm::RESIZE;
            let relaxed = PermPair::new(users.perm - writes, users.shared);
            // Only gives bytes up: a failure keeps more than needed.
            if let Err(e) = lock::apply(self.fd().as_raw_fd(), &mut locks, relaxed, &self.filename)
            {
                tracing::warn!("{}: {e}", self.filename);
            }
        }
        Ok(())
    }

    /// Current length of the file.
    pub fn length(&self) -> Result<u64> {
        fstat(self.fd().as_raw_fd())
            .map(|st| st.st_size as u64)
            .map_err(|e| Error::io(&self.filename, "stat", 0, 0, e))
    }

    /// Bytes allocated on the host (`qemu-img info`'s "disk size").
    pub fn allocated_size(&self) -> Result<u64> {
        fstat(self.fd().as_raw_fd())
            .map(|st| st.st_blocks as u64 * 512)
            .map_err(|e| Error::io(&self.filename, "stat", 0, 0, e))
    }

    /// Sets the file's length (`ftruncate`). The caller updates the node's
    /// size.
    pub async fn resize(&self, size: u64) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly {
                node: self.filename.clone(),
                user: "resize request".into(),
                perm: "resize",
            });
        }
        // Blocks reserved past the end would stay allocated (reading as
        // zeroes) inside a grown file: drop them first. Callers resize
        // with the node drained (block_resize, the tools), so no append
        // is in flight to race the release.
        self.release_reserve();
        self.engine
            .truncate(&self.fd(), size)
            .await
            .map_err(|e| Error::io(&self.filename, "truncate", size, 0, e))?;
        self.reserved_end.store(size, Ordering::Release);
        self.known_end.store(size, Ordering::Release);
        Ok(())
    }

    /// Whether an `O_DIRECT` transfer needs a bounce buffer (both
    /// alignments are powers of two).
    fn misaligned(&self, addr: usize, offset: u64, len: usize) -> bool {
        let align = self.align as usize;
        self.cache.direct
            && ((addr & (self.mem_align - 1))
                | (offset as usize & (align - 1))
                | (len & (align - 1)))
                != 0
    }

    /// Reads `buf.len()` bytes at `offset`, zero-filling past the end of
    /// the file.
    async fn read_buf(&self, offset: u64, mut buf: ReadBuf<'_>) -> io::Result<()> {
        let len = buf.len();
        if len == 0 {
            return Ok(());
        }
        if !self.misaligned(buf.as_mut_ptr() as usize, offset, len) {
            let (ptr, keep) = (buf.as_mut_ptr(), buf.keep_alive());
            // SAFETY: `buf` is ours for the duration of the call, `keep`
            // holds its memory for the engine.
            let got = unsafe { self.read_full(offset, ptr as usize, len, &keep) }.await?;
            buf.as_mut_slice()[got..].fill(0);
            return Ok(());
        }
        let a = u64::from(self.align);
        let start = offset - offset % a;
        let end = (offset + len as u64).div_ceil(a) * a;
        let mut bounce = IoBuf::zeroed((end - start) as usize);
        let mut rb = bounce.as_read_buf();
        let (ptr, keep) = (rb.as_mut_ptr(), rb.keep_alive());
        // SAFETY: as above, for the bounce buffer.
        let got =
            unsafe { self.read_full(start, ptr as usize, (end - start) as usize, &keep) }.await?;
        bounce[got..].fill(0);
        let skip = (offset - start) as usize;
        buf.copy_from(&bounce[skip..skip + len]);
        Ok(())
    }

    /// Reads until `len` bytes or the end of the file; returns the count.
    ///
    /// # Safety
    ///
    /// `addr..addr+len` is valid for writes while `keep` lives. (An address,
    /// not a pointer, so that the future is `Send`.)
    async unsafe fn read_full(
        &self,
        offset: u64,
        addr: usize,
        len: usize,
        keep: &sluice_core::buf::KeepAlive,
    ) -> io::Result<usize> {
        let mut done = 0usize;
        while done < len {
            // SAFETY: within the caller's buffer.
            let r = unsafe {
                self.engine.read_at(
                    &self.fd(),
                    offset + done as u64,
                    (addr + done) as *mut u8,
                    len - done,
                    keep.clone(),
                )
            }
            .await;
            match r {
                Ok(0) => break,
                Ok(n) => done += n.min(len - done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // After a short O_DIRECT read at an unaligned end of file,
                // the next read starts unaligned and fails: the end.
                Err(e)
                    if e.raw_os_error() == Some(libc::EINVAL) && self.cache.direct && done > 0 =>
                {
                    break
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    async fn write_bytes(&self, offset: u64, data: &IoBytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.misaligned(data.as_ptr() as usize, 0, 0) {
            // Only the address can be off: the node aligns offsets and
            // lengths. Copy into an aligned buffer.
            let bounce = IoBytes::copy_from(data);
            return self.write_full(offset, &bounce).await;
        }
        self.write_full(offset, data).await
    }

    async fn write_full(&self, offset: u64, data: &IoBytes) -> io::Result<()> {
        let len = data.len();
        let mut done = 0usize;
        while done < len {
            // SAFETY: `data` is immutable and its KeepAlive goes with the
            // operation.
            let r = unsafe {
                self.write_engine.write_at(
                    &self.fd(),
                    offset + done as u64,
                    data.as_ptr().add(done),
                    len - done,
                    data.keep_alive(),
                )
            }
            .await;
            match r {
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                Ok(n) => done += n.min(len - done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Allocates the blocks past the end of the file that a write ending
    /// at `end` and the writes after it will fill, in one
    /// `FALLOC_FL_KEEP_SIZE` call: the file's length does not change, but
    /// the file system no longer allocates (ext4: reserves delayed
    /// blocks) page by page as appending writes arrive — about a third
    /// of the cost of a buffered append on ext4 (BENCHMARKS.md). What is
    /// left unused goes back when the node closes
    /// ([`FileDriver::release_reserve`]) or the file is truncated.
    async fn reserve_ahead(&self, end: u64) {
        let from = self.reserved_end.load(Ordering::Acquire);
        if end <= from || !self.reserve_ok.load(Ordering::Relaxed) {
            return;
        }
        let to = end + (end / 8).clamp(RESERVE_MIN, RESERVE_MAX);
        match self.allocate_blocks(from, to - from).await {
            Ok(()) => {
                self.reserved_end.fetch_max(to, Ordering::AcqRel);
            }
            // Unsupported, or no room: writes allocate as they go.
            Err(_) => self.reserve_ok.store(false, Ordering::Relaxed),
        }
    }

    /// Allocates the blocks of `[offset, offset + len)` without changing
    /// the file's length (`FALLOC_FL_KEEP_SIZE`), on the write engine:
    /// io_uring would hand `fallocate` to its worker threads.
    async fn allocate_blocks(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_engine
            .fallocate(&self.fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len)
            .await
            .map(drop)
    }

    /// Frees the blocks reserved past the end of the file: a truncation
    /// to the current length drops every block beyond it.
    fn release_reserve(&self) {
        let fd = self.fd();
        let Ok(st) = fstat(fd.as_raw_fd()) else {
            return;
        };
        let len = st.st_size as u64;
        if self.reserved_end.swap(len, Ordering::AcqRel) > len && !self.is_read_only() {
            // SAFETY: a plain syscall on an fd we own; no request is in
            // flight (the node is closing or becoming read-only).
            if unsafe { libc::ftruncate(fd.as_raw_fd(), st.st_size) } != 0 {
                tracing::warn!(
                    "{}: could not free the blocks reserved past the end: {}",
                    self.filename,
                    io::Error::last_os_error()
                );
            }
        }
    }

    /// `fdatasync`, unless flushes are ignored (`cache=unsafe`).
    async fn sync_data(&self) -> io::Result<()> {
        if self.cache.no_flush {
            return Ok(());
        }
        let bad = self.page_cache_inconsistent.load(Ordering::Acquire);
        if bad != 0 {
            return Err(io::Error::from_raw_os_error(bad));
        }
        loop {
            match self.engine.sync(&self.fd(), true).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Without O_DIRECT the kernel may have dropped the dirty
                    // pages after the error: a later flush that succeeds
                    // would lie.
                    if !self.cache.direct {
                        self.page_cache_inconsistent
                            .store(e.raw_os_error().unwrap_or(libc::EIO), Ordering::Release);
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        loop {
            match self.engine.fallocate(&self.fd(), mode, offset, len).await {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other.map(drop),
            }
        }
    }

    /// Zeroes without writing data: punch (with `may_unmap`) or
    /// `FALLOC_FL_ZERO_RANGE`, else punch and re-allocate. `Ok(false)` when
    /// the file system can do none of it.
    async fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<bool> {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if may_unmap && self.has_discard.load(Ordering::Relaxed) {
            match self.fallocate(punch, offset, len).await {
                Ok(()) => return Ok(true),
                Err(e) if errno_is_not_supported(&e) => {
                    self.has_discard.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(e),
            }
        }
        if self.has_write_zeroes.load(Ordering::Relaxed) {
            match self
                .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
                .await
            {
                Ok(()) => return Ok(true),
                Err(e) if errno_is_not_supported(&e) => {
                    self.has_write_zeroes.store(false, Ordering::Relaxed)
                }
                // Some file systems refuse the mode with EINVAL.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        if self.has_discard.load(Ordering::Relaxed) {
            match self.fallocate(punch, offset, len).await {
                Ok(()) => {
                    // Keep the range allocated, as a write would.
                    return match self.fallocate(0, offset, len).await {
                        Ok(()) => Ok(true),
                        Err(e) if errno_is_not_supported(&e) => Ok(true),
                        Err(e) => Err(e),
                    };
                }
                Err(e) if errno_is_not_supported(&e) => {
                    self.has_discard.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// The allocation status at `offset` from `SEEK_DATA`/`SEEK_HOLE`.
    fn find_allocation(&self, offset: u64, len: u64) -> DriverStatus {
        let owner = self.fd();
        let fd = owner.as_raw_fd();
        let end = offset.saturating_add(len);
        let data_all = DriverStatus::Data {
            len,
            offset: Some(offset),
        };
        let Ok(off) = libc::off_t::try_from(offset) else {
            return data_all;
        };
        // SAFETY: plain syscall.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            return if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                // In the hole at the end of the file, or past its end.
                DriverStatus::Zero {
                    len,
                    offset: Some(offset),
                }
            } else {
                data_all
            };
        }
        let data = data as u64;
        if data > offset {
            return DriverStatus::Zero {
                len: data.min(end) - offset,
                offset: Some(offset),
            };
        }
        // SAFETY: plain syscall.
        let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        if hole < 0 || (hole as u64) <= offset {
            return data_all;
        }
        DriverStatus::Data {
            len: (hole as u64).min(end) - offset,
            offset: Some(offset),
        }
    }

    async fn after_write(&self, fua: bool) -> io::Result<()> {
        if fua || self.cache.writethrough {
            self.sync_data().await
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl BlockDriver for FileDriver {
    fn driver_name(&self) -> &'static str {
        "file"
    }

    fn set_perm(&self, _node: &Node, cumulative: PermPair) -> Result<()> {
        // The image locks follow what the graph's users need, as QEMU's
        // file-posix does.
        self.apply_perms(cumulative)
    }

    fn request_alignment(&self) -> u32 {
        self.align
    }

    async fn reopen(&self, node: &Node, read_only: bool) -> Result<()> {
        FileDriver::reopen(self, read_only, node.cumulative_perm())
    }

    fn filename(&self) -> Option<String> {
        Some(self.filename.clone())
    }

    async fn read(&self, node: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()> {
        let len = buf.len() as u64;
        self.read_buf(offset, buf)
            .await
            .map_err(|e| Error::io(node.name(), "read", offset, len, e))
    }

    async fn write(&self, node: &Node, offset: u64, buf: IoBytes, flags: WriteFlags) -> Result<()> {
        let len = buf.len() as u64;
        self.reserve_ahead(offset + len).await;
        if self.bulk && len >= BULK_ALLOC_MIN {
            if offset + len <= self.known_end.load(Ordering::Acquire) {
                // Best effort: the write allocates what this did not.
                let _ = self.allocate_blocks(offset, len).await;
            }
            self.known_end.fetch_max(offset + len, Ordering::AcqRel);
        }
        self.write_bytes(offset, &buf)
            .await
            .map_err(|e| Error::io(node.name(), "write", offset, len, e))?;
        if self.write_behind {
            // Only a head start for the flush to come: an error here shows
            // again there.
            let _ = self
                .write_engine
                .start_writeback(&self.fd(), offset, len)
                .await;
        }
        drop(buf);
        self.after_write(flags.fua)
            .await
            .map_err(|e| Error::io(node.name(), "flush", offset, len, e))
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        let done = self
            .zero_range(offset, len, flags.may_unmap)
            .await
            .map_err(|e| Error::io(node.name(), "write-zeroes", offset, len, e))?;
        if !done {
            return Err(Error::NotSupported {
                node: node.name().to_string(),
                driver: "file",
                what: "efficient write-zeroes",
            });
        }
        self.after_write(flags.fua)
            .await
            .map_err(|e| Error::io(node.name(), "flush", offset, len, e))
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        if !self.has_discard.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self
            .fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno_is_not_supported(&e) => {
                self.has_discard.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(Error::io(node.name(), "discard", offset, len, e)),
        }
    }

    async fn flush(&self, node: &Node) -> Result<()> {
        self.sync_data()
            .await
            .map_err(|e| Error::io(node.name(), "flush", 0, 0, e))
    }

    async fn block_status(&self, _node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(self.find_allocation(offset, len))
    }

    /// `ftruncate`, as QEMU's file-posix: `falloc` allocates the new area
    /// with `fallocate`, `full` writes zeroes over it and syncs; both
    /// only grow. On a failed preallocation the old length comes back.
    async fn truncate(&self, node: &Node, size: u64, prealloc: &str) -> Result<()> {
        let old = self.length()?;
        let io_err = |op, e| Error::io(node.name(), op, old, size.saturating_sub(old), e);
        match prealloc {
            "off" => return self.resize(size).await,
            "falloc" | "full" if size < old => {
                return Err(Error::InvalidRequest {
                    node: node.name().to_string(),
                    reason: format!(
                        "Cannot use preallocation for shrinking files (from {old} to {size} bytes)"
                    ),
                })
            }
            "falloc" | "full" => {}
            other => {
                return Err(Error::InvalidRequest {
                    node: node.name().to_string(),
                    reason: format!("Unsupported preallocation mode: {other}"),
                })
            }
        }
        if size == old {
            return Ok(());
        }
        let res = if prealloc == "falloc" {
            self.fallocate(0, old, size - old)
                .await
                .map_err(|e| io_err("preallocate", e))
        } else {
            // The final length first, so the file system can allocate in
            // few extents; then zeroes written over the new area.
            self.resize(size).await?;
            const CHUNK: u64 = 1 << 20;
            let zeroes = IoBuf::zeroed(CHUNK as usize).freeze();
            let mut at = old;
            let mut res = Ok(());
            while at < size && res.is_ok() {
                let n = CHUNK.min(size - at);
                let chunk = zeroes.slice(0..n as usize);
                res = self
                    .write_full(at, &chunk)
                    .await
                    .map_err(|e| Error::io(node.name(), "preallocate", at, n, e));
                at += n;
            }
            match res {
                Ok(()) => self.sync_data().await.map_err(|e| io_err("flush", e)),
                e => e,
            }
        };
        if res.is_err() {
            // Best effort: the error that matters is the preallocation's.
            let _ = self.resize(old).await;
        }
        res
    }

    fn close(&self) {
        self.release_reserve();
        if self.use_lock {
            lock::release(self.fd().as_raw_fd(), &mut self.lock.lock());
        }
    }
}
