//! The thread-pool engine: blocking system calls on worker threads.
//!
//! Like QEMU's thread pool: at most [`MAX_WORKERS`] threads, started when
//! work arrives and no worker is idle, and stopped after [`IDLE_TIMEOUT`]
//! without work. The queue is a `Mutex` + `Condvar`; a result goes back
//! through a `tokio::sync::oneshot`, so the pool works with any runtime.
//!
//! A job owns the file descriptor's `Arc` and the buffer's `KeepAlive`; it
//! drops them after the system call and *before* it reports the result, so
//! when an awaiting caller sees the result, the job no longer holds the file
//! open (image locks are released as soon as the caller closes it).

use super::{cvt, to_off, EngineKind, IoEngine, IoFuture};
use parking_lot::{Condvar, Mutex};
use sluice_core::buf::KeepAlive;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// QEMU's thread pool has at most 64 workers.
pub const MAX_WORKERS: usize = 64;

/// A worker with nothing to do for this long exits.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A bounded pool of I/O worker threads.
pub struct ThreadPool {
    state: Mutex<PoolState>,
    work: Condvar,
    max_workers: usize,
}

struct PoolState {
    queue: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    /// Workers alive.
    total: usize,
    /// Jobs being run.
    running: usize,
    spawned: u64,
}

/// The process-wide pool.
pub fn pool() -> &'static ThreadPool {
    static POOL: OnceLock<ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| ThreadPool::new(MAX_WORKERS))
}

impl ThreadPool {
    fn new(max_workers: usize) -> ThreadPool {
        ThreadPool {
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                idle: 0,
                total: 0,
                running: 0,
                spawned: 0,
            }),
            work: Condvar::new(),
            max_workers: max_workers.max(1),
        }
    }

    /// Worker threads alive right now.
    pub fn workers(&self) -> usize {
        self.state.lock().total
    }

    /// Queues `job`, starting a worker if none is free and the pool is not
    /// full.
    fn submit(&'static self, job: Job) {
        let mut st = self.state.lock();
        st.queue.push_back(job);
        if st.queue.len() > st.idle && st.total < self.max_workers {
            st.total += 1;
            st.spawned += 1;
            let n = st.spawned;
            let spawned = std::thread::Builder::new()
                .name(format!("sluice-io-{n}"))
                .spawn(move || self.worker());
            if let Err(e) = spawned {
                st.total -= 1;
                if st.total == 0 {
                    // No worker at all will ever take the job: run it here
                    // rather than lose it.
                    tracing::warn!(
                        "cannot start an I/O worker thread: {e}; running the job inline"
                    );
                    let jobs: Vec<Job> = st.queue.drain(..).collect();
                    drop(st);
                    for job in jobs {
                        job();
                    }
                    return;
                }
            }
        }
        drop(st);
        self.work.notify_one();
    }

    fn worker(&'static self) {
        let mut st = self.state.lock();
        loop {
            if let Some(job) = st.queue.pop_front() {
                st.running += 1;
                drop(st);
                job();
                st = self.state.lock();
                st.running -= 1;
                continue;
            }
            st.idle += 1;
            let timed_out = self.work.wait_for(&mut st, IDLE_TIMEOUT).timed_out();
            st.idle -= 1;
            if timed_out && st.queue.is_empty() {
                st.total -= 1;
                return;
            }
        }
    }

    /// Runs `f` on a worker with the resources it must keep alive; `f`'s
    /// result comes back through the future.
    fn run<R>(
        &'static self,
        res: R,
        f: impl FnOnce(&R) -> io::Result<usize> + Send + 'static,
    ) -> IoFuture
    where
        R: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let out = f(&res);
            // Let go of the fd and the buffer before anyone can see the
            // result.
            drop(res);
            let _ = tx.send(out);
        }));
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(io::Error::other("I/O worker thread lost the request")))
        })
    }
}

/// A raw pointer that may cross to a worker: the caller of the unsafe engine
/// methods guarantees it stays valid while the `KeepAlive` lives.
struct SendPtr(*mut u8);
// SAFETY: see above; the pointer is only used by the one job that owns it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

struct RwRes {
    fd: Arc<OwnedFd>,
    ptr: SendPtr,
    _keep: KeepAlive,
}

fn retry_eintr(mut f: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl IoEngine for ThreadPool {
    fn kind(&self) -> EngineKind {
        EngineKind::Threads
    }

    unsafe fn read_at(
        &self,
        fd: &Arc<OwnedFd>,
        offset: u64,
        ptr: *mut u8,
        len: usize,
        keep: KeepAlive,
    ) -> IoFuture {
        let res = RwRes {
            fd: fd.clone(),
            ptr: SendPtr(ptr),
            _keep: keep,
        };
        pool().run(res, move |r| {
            let off = to_off(offset)?;
            retry_eintr(|| {
                // SAFETY: the caller guarantees `ptr..ptr+len` is writable
                // while the KeepAlive in `r` lives.
                cvt(
                    unsafe { libc::pread(r.fd.as_raw_fd(), r.ptr.0.cast(), len, off) }
                        as libc::c_long,
                )
            })
        })
    }

    unsafe fn write_at(
        &self,
        fd: &Arc<OwnedFd>,
        offset: u64,
        ptr: *const u8,
        len: usize,
        keep: KeepAlive,
    ) -> IoFuture {
        let res = RwRes {
            fd: fd.clone(),
            ptr: SendPtr(ptr.cast_mut()),
            _keep: keep,
        };
        pool().run(res, move |r| {
            let off = to_off(offset)?;
            retry_eintr(|| {
                // SAFETY: as for reads, for reading the bytes.
                cvt(
                    unsafe { libc::pwrite(r.fd.as_raw_fd(), r.ptr.0.cast_const().cast(), len, off) }
                        as libc::c_long,
                )
            })
        })
    }

    fn sync(&self, fd: &Arc<OwnedFd>, datasync: bool) -> IoFuture {
        pool().run(fd.clone(), move |fd| {
            retry_eintr(|| {
                // SAFETY: plain syscalls on a valid fd.
                let ret = unsafe {
                    if datasync {
                        libc::fdatasync(fd.as_raw_fd())
                    } else {
                        libc::fsync(fd.as_raw_fd())
                    }
                };
                cvt(ret.into())
            })
        })
    }

    fn fallocate(&self, fd: &Arc<OwnedFd>, mode: i32, offset: u64, len: u64) -> IoFuture {
        pool().run(fd.clone(), move |fd| {
            let (off, len) = (to_off(offset)?, to_off(len)?);
            retry_eintr(|| {
                // SAFETY: plain syscall on a valid fd.
                cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) }.into())
            })
        })
    }

    fn truncate(&self, fd: &Arc<OwnedFd>, len: u64) -> IoFuture {
        pool().run(fd.clone(), move |fd| {
            let len = to_off(len)?;
            retry_eintr(|| {
                // SAFETY: plain syscall on a valid fd.
                cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }.into())
            })
        })
    }

    fn start_writeback(&self, fd: &Arc<OwnedFd>, offset: u64, len: u64) -> IoFuture {
        pool().run(fd.clone(), move |fd| {
            let (off, len) = (to_off(offset)?, to_off(len)?);
            retry_eintr(|| {
                // SAFETY: plain syscall on a valid fd.
                let ret = unsafe {
                    libc::sync_file_range(fd.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE)
                };
                cvt(ret.into())
            })
        })
    }

    fn pending(&self) -> usize {
        let st = self.state.lock();
        st.queue.len() + st.running
    }
}
