//! The io_uring engine.
//!
//! A small fixed set of rings (one per CPU, at most [`MAX_RINGS`]); each
//! thread uses the ring its thread-local index picks, so the threads of a
//! multi-threaded runtime mostly have a ring each.
//!
//! Every operation takes a *slot* of its ring. The slot holds the waker of
//! the awaiting future, the result once the completion arrived, and the
//! resources the kernel uses (the file's `Arc<OwnedFd>` and the buffer's
//! `KeepAlive`). A ring has as many slots as completion-queue entries, so
//! the completion queue cannot overflow; an operation finding no free slot
//! waits for one. A future dropped while its operation is in the kernel
//! leaves its slot *orphaned*: the slot keeps the resources until the
//! completion arrives, then frees itself.
//!
//! Completions are reaped by whoever gets there first: the future itself
//! when it is polled, or a reaper task that waits on an eventfd registered
//! with the ring (`register_eventfd`) through `tokio::io::unix::AsyncFd`.
//! There is one reaper per ring and tokio runtime that used the ring, each
//! with its own `dup` of the eventfd, spawned on first use: so the engine
//! works with current-thread and multi-thread runtimes, and with runtimes
//! created one after another (a reaper dies with its runtime; the next
//! operation on a new runtime starts a new one). Reaping is a loop over the
//! completion queue under the ring's lock; wakers are called after the lock
//! is released, so a completion never runs the next submission inline.
//!
//! Where no reaper can run — outside a tokio runtime, or on a runtime built
//! without I/O (tokio panics when asked to register the eventfd there; the
//! panic is caught once per runtime) — operations go to the thread pool.

use super::{to_off, EngineKind, IoEngine, IoFuture};
use io_uring::{opcode, squeue, types, IoUring, Probe};
use parking_lot::Mutex;
use sluice_core::buf::KeepAlive;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Upper bound on the number of rings.
pub const MAX_RINGS: usize = 8;

/// Submission-queue entries per ring (the completion queue has twice as
/// many, which is also the number of operations a ring keeps in flight).
pub const SQ_ENTRIES: u32 = 128;

/// The io_uring engine: a fixed set of rings.
pub struct UringEngine {
    rings: Box<[Ring]>,
}

struct Ring {
    index: usize,
    inner: Mutex<RingInner>,
    /// Signalled by the kernel for every completion.
    eventfd: OwnedFd,
}

struct RingInner {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Entries that did not fit into the submission queue yet.
    backlog: VecDeque<squeue::Entry>,
    /// Futures waiting for a free slot.
    slot_waiters: Vec<Waker>,
    /// One reaper per runtime that used this ring.
    reapers: Vec<(tokio::runtime::Id, Arc<AtomicBool>)>,
    /// Set when `io_uring_enter` failed in a way that cannot be retried.
    broken: Option<i32>,
}

enum SlotState {
    Free,
    /// Submitted; the future waits.
    Waiting(Option<Waker>),
    /// The completion arrived; the future has not collected it yet.
    Done(i32),
    /// Submitted, and the future was dropped: free the slot on completion.
    Orphaned,
}

struct Slot {
    state: SlotState,
    /// What the kernel uses while the operation runs.
    res: Option<OpRes>,
}

struct OpRes {
    fd: Arc<OwnedFd>,
    keep: Option<KeepAlive>,
}

/// What an operation does; turned into a submission entry when it starts.
#[derive(Clone, Copy)]
enum OpKind {
    /// Buffer addresses are kept as integers so that the future is `Send`.
    Read {
        offset: u64,
        addr: usize,
        len: usize,
    },
    Write {
        offset: u64,
        addr: usize,
        len: usize,
    },
    Sync {
        datasync: bool,
    },
    Fallocate {
        mode: i32,
        offset: u64,
        len: u64,
    },
}

/// One system call moves at most this much (the kernel's own limit is
/// close to 2 GiB); callers loop over short transfers.
const MAX_RW: usize = 1 << 30;

impl OpKind {
    fn entry(self, fd: &Arc<OwnedFd>) -> squeue::Entry {
        let fd = types::Fd(fd.as_raw_fd());
        match self {
            OpKind::Read { offset, addr, len } => {
                opcode::Read::new(fd, addr as *mut u8, len.min(MAX_RW) as u32)
                    .offset(offset)
                    .build()
            }
            OpKind::Write { offset, addr, len } => {
                opcode::Write::new(fd, addr as *const u8, len.min(MAX_RW) as u32)
                    .offset(offset)
                    .build()
            }
            OpKind::Sync { datasync } => {
                let flags = if datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(fd).flags(flags).build()
            }
            OpKind::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
    }

    /// The same operation on the thread pool.
    fn on_thread_pool(self, res: OpRes) -> IoFuture {
        let pool = super::threads::pool();
        match (self, res.keep) {
            // SAFETY: the caller of the engine method that made this
            // operation vouched for the buffer while `keep` lives.
            (OpKind::Read { offset, addr, len }, Some(keep)) => unsafe {
                pool.read_at(&res.fd, offset, addr as *mut u8, len, keep)
            },
            // SAFETY: as for reads.
            (OpKind::Write { offset, addr, len }, Some(keep)) => unsafe {
                pool.write_at(&res.fd, offset, addr as *const u8, len, keep)
            },
            (OpKind::Sync { datasync }, _) => pool.sync(&res.fd, datasync),
            (OpKind::Fallocate { mode, offset, len }, _) => {
                pool.fallocate(&res.fd, mode, offset, len)
            }
            _ => ready_err(io::Error::other("read or write without a buffer")),
        }
    }
}

/// Why io_uring cannot be used, computed once.
fn probe_result() -> &'static Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(|| probe_uncached().map_err(|e| e.to_string()))
}

/// Whether io_uring works: a ring can be created, runs a no-op, supports
/// the opcodes the `file` driver uses, and takes an eventfd.
pub fn probe() -> io::Result<()> {
    probe_result().clone().map_err(io::Error::other)
}

fn probe_uncached() -> io::Result<()> {
    let mut ring = IoUring::new(4)?;
    let nop = opcode::Nop::new().build().user_data(0x5115);
    // SAFETY: a no-op references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("submission queue full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion for a no-op"))?;
    if cqe.user_data() != 0x5115 || cqe.result() < 0 {
        return Err(io::Error::other(format!("no-op failed: {}", cqe.result())));
    }
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Read::CODE, "read"),
        (opcode::Write::CODE, "write"),
        (opcode::Fsync::CODE, "fsync"),
        (opcode::Fallocate::CODE, "fallocate"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::other(format!(
                "io_uring does not support {name}"
            )));
        }
    }
    let efd = new_eventfd()?;
    ring.submitter().register_eventfd(efd.as_raw_fd())?;
    Ok(())
}

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The process-wide io_uring engine; an error when io_uring does not work.
pub fn engine() -> io::Result<&'static UringEngine> {
    static ENGINE: OnceLock<Result<UringEngine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| UringEngine::build().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| io::Error::other(format!("Unable to use io_uring: {e}")))
}

impl Ring {
    fn new(index: usize) -> io::Result<Ring> {
        let ring = IoUring::builder().setup_clamp().build(SQ_ENTRIES)?;
        let eventfd = new_eventfd()?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let nslots = ring.params().cq_entries() as usize;
        let slots = (0..nslots)
            .map(|_| Slot {
                state: SlotState::Free,
                res: None,
            })
            .collect();
        Ok(Ring {
            index,
            inner: Mutex::new(RingInner {
                ring,
                slots,
                free: (0..nslots as u32).rev().collect(),
                backlog: VecDeque::new(),
                slot_waiters: Vec::new(),
                reapers: Vec::new(),
                broken: None,
            }),
            eventfd,
        })
    }

    /// Makes sure a reaper runs on the current tokio runtime. `Ok(false)`
    /// when there is none to run it on (no tokio runtime, or one without
    /// I/O): the operation then goes to the thread pool.
    fn ensure_reaper(&'static self, inner: &mut RingInner) -> io::Result<bool> {
        /// Runtimes found to have no I/O driver (tokio panics when asked to
        /// register an fd there; one panic per runtime is enough).
        static NO_IO: Mutex<Vec<tokio::runtime::Id>> = Mutex::new(Vec::new());

        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Ok(false);
        };
        let id = handle.id();
        inner
            .reapers
            .retain(|(_, alive)| alive.load(Ordering::Acquire));
        if inner.reapers.iter().any(|(rt, _)| *rt == id) {
            return Ok(true);
        }
        if NO_IO.lock().contains(&id) {
            return Ok(false);
        }
        // Each reaper watches its own dup of the eventfd, so that two
        // runtimes (or a dying and a new reaper) never share a registration.
        // SAFETY: plain syscall on our own fd.
        let dup = unsafe { libc::fcntl(self.eventfd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        // A runtime without I/O enabled makes tokio panic here.
        let registered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: `dup` is a valid open fd that the AsyncFd owns (and
            // closes) and never replaces.
            unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }
        }));
        let afd = match registered {
            Ok(afd) => afd.map_err(|e| e.into_parts().1)?,
            Err(_) => {
                tracing::warn!(
                    "tokio runtime without I/O: io_uring requests go to the thread pool"
                );
                NO_IO.lock().push(id);
                return Ok(false);
            }
        };
        let alive = Arc::new(AtomicBool::new(true));
        inner.reapers.push((id, alive.clone()));
        handle.spawn(reaper(self, afd, AliveGuard(alive)));
        Ok(true)
    }

    /// Reaps every completion and wakes whoever waits for them.
    fn reap_and_wake(&self) {
        let mut wake = Vec::new();
        let mut drops = Vec::new();
        {
            let mut inner = self.inner.lock();
            inner.reap(&mut wake, &mut drops);
            inner.flush();
        }
        drop(drops);
        for w in wake {
            w.wake();
        }
    }
}

/// Clears its flag when the reaper task ends or is dropped with its runtime.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

async fn reaper(ring: &'static Ring, afd: AsyncFd<OwnedFd>, _alive: AliveGuard) {
    loop {
        let mut guard = match afd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("io_uring reaper of ring {} stops: {e}", ring.index);
                return;
            }
        };
        // Reset the eventfd counter; `try_io` clears the readiness when
        // the counter was already zero, and we wait for the next signal.
        let drained = guard.try_io(|fd| {
            let mut buf = [0u8; 8];
            // SAFETY: reads 8 bytes into a local buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
        match drained {
            Err(_would_block) => continue,
            Ok(Err(e)) => {
                tracing::warn!(
                    "io_uring reaper of ring {} stops: eventfd read failed: {e}",
                    ring.index
                );
                // Let the next operation start a new reaper.
                ring.reap_and_wake();
                return;
            }
            Ok(Ok(())) => {}
        }
        // Completions posted after this reap signal the eventfd again.
        ring.reap_and_wake();
    }
}

impl RingInner {
    /// Moves every completion into its slot. Wakers to call and resources
    /// to drop are handed out, to be dealt with after the lock is released.
    fn reap(&mut self, wake: &mut Vec<Waker>, drops: &mut Vec<OpRes>) {
        let mut freed = false;
        for cqe in self.ring.completion() {
            let Some(slot) = self.slots.get_mut(cqe.user_data() as usize) else {
                tracing::error!(
                    "io_uring completion with unknown user_data {}",
                    cqe.user_data()
                );
                continue;
            };
            drops.extend(slot.res.take());
            match std::mem::replace(&mut slot.state, SlotState::Free) {
                SlotState::Waiting(w) => {
                    slot.state = SlotState::Done(cqe.result());
                    wake.extend(w);
                }
                SlotState::Orphaned => {
                    self.free.push(cqe.user_data() as u32);
                    freed = true;
                }
                other => {
                    tracing::error!("io_uring completion for a slot that was not in flight");
                    slot.state = other;
                }
            }
        }
        if freed {
            wake.append(&mut self.slot_waiters);
        }
    }

    /// Frees a slot whose result was collected (or abandoned).
    fn release(&mut self, idx: u32, wake: &mut Vec<Waker>) {
        self.slots[idx as usize].state = SlotState::Free;
        self.free.push(idx);
        wake.append(&mut self.slot_waiters);
    }

    /// Moves backlog entries into the submission queue and submits them.
    fn flush(&mut self) {
        let mut retries = 0u32;
        loop {
            {
                let mut sq = self.ring.submission();
                while let Some(sqe) = self.backlog.front() {
                    // SAFETY: every entry's memory is held by its slot
                    // until its completion arrives.
                    if unsafe { sq.push(sqe) }.is_err() {
                        break;
                    }
                    self.backlog.pop_front();
                }
            }
            if self.ring.submission().is_empty() {
                return;
            }
            match self.ring.submit() {
                Ok(_) => {
                    retries = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                    // The kernel is short of resources or has completions
                    // to hand out first: make room and try again.
                    retries += 1;
                    if retries > 10_000 {
                        self.fail(e.raw_os_error().unwrap_or(libc::EIO));
                        return;
                    }
                    let (mut wake, mut drops) = (Vec::new(), Vec::new());
                    self.reap(&mut wake, &mut drops);
                    // Wakers only schedule tasks; calling them under the
                    // lock is fine on this rare path.
                    for w in wake {
                        w.wake();
                    }
                    drop(drops);
                    std::thread::yield_now();
                }
                Err(e) => {
                    tracing::error!("io_uring_enter failed: {e}");
                    self.fail(e.raw_os_error().unwrap_or(libc::EIO));
                    return;
                }
            }
        }
    }

    /// The ring cannot submit any more: fail the waiting operations. Their
    /// resources stay where they are (the kernel may still see the entries).
    fn fail(&mut self, errno: i32) {
        self.broken = Some(errno);
        for slot in &mut self.slots {
            if let SlotState::Waiting(w) = &mut slot.state {
                if let Some(w) = w.take() {
                    w.wake();
                }
                // The slot keeps its resources (and so is never reused):
                // the kernel may still see the entry.
                slot.state = SlotState::Done(-errno);
            }
        }
    }
}

/// One operation on a ring.
struct UringOp {
    ring: &'static Ring,
    state: OpState,
    /// Submit together with the other operations queued in the same turn
    /// of the event loop rather than at once (see [`BatchedUring`]).
    batch: bool,
}

enum OpState {
    Init(Option<(OpKind, OpRes)>),
    /// In the backlog, to be submitted with the rest of this turn's batch.
    Queued(u32),
    Submitted(u32),
    /// No reaper can run here: the thread pool does the work.
    Fallback(IoFuture),
    Finished,
}

fn to_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

impl Future for UringOp {
    type Output = io::Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let ring = this.ring;
        let mut wake = Vec::new();
        let mut drops = Vec::new();
        let out = {
            let mut inner = ring.inner.lock();
            if let OpState::Queued(idx) = this.state {
                inner.flush();
                this.state = OpState::Submitted(idx);
            }
            match &mut this.state {
                OpState::Finished => Poll::Ready(Err(io::Error::other(
                    "io_uring operation polled after completion",
                ))),
                OpState::Queued(_) => unreachable!("queued operations are submitted above"),
                OpState::Fallback(fut) => {
                    drop(inner);
                    fut.as_mut().poll(cx)
                }
                OpState::Init(op) => {
                    let reaper = ring.ensure_reaper(&mut inner);
                    if let Some(errno) = inner.broken {
                        Poll::Ready(Err(io::Error::from_raw_os_error(errno)))
                    } else if let Err(e) = reaper {
                        Poll::Ready(Err(e))
                    } else if let Ok(false) = reaper {
                        drop(inner);
                        let (kind, res) = op.take().expect("operation started twice");
                        let mut fut = kind.on_thread_pool(res);
                        let out = fut.as_mut().poll(cx);
                        this.state = OpState::Fallback(fut);
                        out
                    } else if let Some(idx) = inner.free.pop() {
                        let (kind, res) = op.take().expect("operation submitted twice");
                        let sqe = kind.entry(&res.fd);
                        let slot = &mut inner.slots[idx as usize];
                        slot.state = SlotState::Waiting(Some(cx.waker().clone()));
                        slot.res = Some(res);
                        inner.backlog.push_back(sqe.user_data(u64::from(idx)));
                        if this.batch && inner.slots.len() - inner.free.len() > 1 {
                            // Others are in flight: submit on the next poll,
                            // with whatever else this turn queues.
                            this.state = OpState::Queued(idx);
                            cx.waker().wake_by_ref();
                            Poll::Pending
                        } else {
                            inner.flush();
                            this.state = OpState::Submitted(idx);
                            // It may have completed already.
                            inner.reap(&mut wake, &mut drops);
                            take_done(&mut inner, idx, &mut wake)
                        }
                    } else {
                        inner.slot_waiters.push(cx.waker().clone());
                        Poll::Pending
                    }
                }
                OpState::Submitted(idx) => {
                    let idx = *idx;
                    let mut out = take_done(&mut inner, idx, &mut wake);
                    if out.is_pending() {
                        inner.reap(&mut wake, &mut drops);
                        out = take_done(&mut inner, idx, &mut wake);
                    }
                    if out.is_pending() {
                        if let SlotState::Waiting(w) = &mut inner.slots[idx as usize].state {
                            match w {
                                Some(w) if w.will_wake(cx.waker()) => {}
                                _ => *w = Some(cx.waker().clone()),
                            }
                        }
                    }
                    out
                }
            }
        };
        if out.is_ready() {
            this.state = OpState::Finished;
        }
        drop(drops);
        for w in wake {
            w.wake();
        }
        out
    }
}

/// The result of slot `idx` if its completion arrived (freeing the slot).
fn take_done(inner: &mut RingInner, idx: u32, wake: &mut Vec<Waker>) -> Poll<io::Result<usize>> {
    match inner.slots[idx as usize].state {
        SlotState::Done(res) => {
            if inner.slots[idx as usize].res.is_some() {
                // A failed ring keeps the resources; so does the slot.
                return Poll::Ready(to_result(res));
            }
            inner.release(idx, wake);
            Poll::Ready(to_result(res))
        }
        _ => Poll::Pending,
    }
}

impl Drop for UringOp {
    fn drop(&mut self) {
        let (OpState::Submitted(idx) | OpState::Queued(idx)) = self.state else {
            return;
        };
        let mut wake = Vec::new();
        {
            let mut inner = self.ring.inner.lock();
            if matches!(self.state, OpState::Queued(_)) {
                // Its entry is still in the backlog: send it on its way.
                inner.flush();
            }
            let slot = &mut inner.slots[idx as usize];
            match slot.state {
                SlotState::Waiting(_) => slot.state = SlotState::Orphaned,
                SlotState::Done(_) if slot.res.is_none() => inner.release(idx, &mut wake),
                _ => {}
            }
        }
        for w in wake {
            w.wake();
        }
    }
}

thread_local! {
    static RING_INDEX: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

impl UringEngine {
    fn build() -> io::Result<UringEngine> {
        probe()?;
        let n = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_RINGS);
        let rings = (0..n).map(Ring::new).collect::<io::Result<Vec<_>>>()?;
        Ok(UringEngine {
            rings: rings.into_boxed_slice(),
        })
    }

    fn ring(&'static self) -> &'static Ring {
        let i = RING_INDEX.with(|i| *i);
        &self.rings[i % self.rings.len()]
    }

    /// How many rings the engine has.
    pub fn rings(&self) -> usize {
        self.rings.len()
    }

    fn op(&'static self, kind: OpKind, fd: &Arc<OwnedFd>, keep: Option<KeepAlive>) -> IoFuture {
        self.op_batched(kind, fd, keep, false)
    }

    fn op_batched(
        &'static self,
        kind: OpKind,
        fd: &Arc<OwnedFd>,
        keep: Option<KeepAlive>,
        batch: bool,
    ) -> IoFuture {
        Box::pin(UringOp {
            ring: self.ring(),
            batch,
            state: OpState::Init(Some((
                kind,
                OpRes {
                    fd: fd.clone(),
                    keep,
                },
            ))),
        })
    }

    fn this() -> &'static UringEngine {
        engine().expect("the io_uring engine exists once an instance is in use")
    }
}

/// A read or write on the shared rings, after checking the offset fits the
/// kernel's `off_t`.
fn rw(kind: OpKind, fd: &Arc<OwnedFd>, keep: KeepAlive, batch: bool) -> IoFuture {
    let offset = match kind {
        OpKind::Read { offset, .. } | OpKind::Write { offset, .. } => offset,
        _ => 0,
    };
    if let Err(e) = to_off(offset) {
        return ready_err(e);
    }
    UringEngine::this().op_batched(kind, fd, Some(keep), batch)
}

fn ready_err(e: io::Error) -> IoFuture {
    Box::pin(std::future::ready(Err(e)))
}

impl UringEngine {
    /// Operations on the rings not yet completed and collected.
    pub fn pending(&self) -> usize {
        self.rings
            .iter()
            .map(|r| {
                let inner = r.inner.lock();
                inner.slots.len() - inner.free.len()
            })
            .sum()
    }
}

/// The io_uring [`IoEngine`]: a handle on the shared rings of [`engine`].
///
/// With `BATCH`, a read or write that finds others in flight is queued and
/// submitted with the rest of its event-loop turn in one `io_uring_enter`,
/// as QEMU's io_uring code does. For O_DIRECT that lets the block layer
/// plug and merge neighbouring requests (BENCHMARKS.md: 100000 sequential
/// 4k reads at depth 64 reached the disk as 1665 requests from qemu-img and
/// 100000 from sluice without it). Buffered I/O does not gain (page-cache
/// hits complete at submission) and submits at once.
pub struct Uring<const BATCH: bool>;

static PLAIN: Uring<false> = Uring;
static BATCHED: Uring<true> = Uring;

/// io_uring with immediate submission.
pub fn plain() -> io::Result<&'static Uring<false>> {
    engine().map(|_| &PLAIN)
}

/// io_uring with batched submission of reads and writes.
pub fn batched() -> io::Result<&'static Uring<true>> {
    engine().map(|_| &BATCHED)
}

impl<const BATCH: bool> IoEngine for Uring<BATCH> {
    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }

    unsafe fn read_at(
        &self,
        fd: &Arc<OwnedFd>,
        offset: u64,
        ptr: *mut u8,
        len: usize,
        keep: KeepAlive,
    ) -> IoFuture {
        let kind = OpKind::Read {
            offset,
            addr: ptr as usize,
            len,
        };
        rw(kind, fd, keep, BATCH)
    }

    unsafe fn write_at(
        &self,
        fd: &Arc<OwnedFd>,
        offset: u64,
        ptr: *const u8,
        len: usize,
        keep: KeepAlive,
    ) -> IoFuture {
        let kind = OpKind::Write {
            offset,
            addr: ptr as usize,
            len,
        };
        rw(kind, fd, keep, BATCH)
    }

    fn sync(&self, fd: &Arc<OwnedFd>, datasync: bool) -> IoFuture {
        UringEngine::this().op(OpKind::Sync { datasync }, fd, None)
    }

    fn fallocate(&self, fd: &Arc<OwnedFd>, mode: i32, offset: u64, len: u64) -> IoFuture {
        if let Err(e) = to_off(offset).and_then(|_| to_off(len)) {
            return ready_err(e);
        }
        UringEngine::this().op(OpKind::Fallocate { mode, offset, len }, fd, None)
    }

    fn truncate(&self, fd: &Arc<OwnedFd>, len: u64) -> IoFuture {
        // IORING_OP_FTRUNCATE is recent (Linux 6.9): use the thread pool.
        super::threads::pool().truncate(fd, len)
    }

    fn start_writeback(&self, fd: &Arc<OwnedFd>, offset: u64, len: u64) -> IoFuture {
        // Rare enough (bulk copies) not to need its own opcode here.
        super::threads::pool().start_writeback(fd, offset, len)
    }

    fn pending(&self) -> usize {
        UringEngine::this().pending()
    }
}
