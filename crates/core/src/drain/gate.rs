//! The in-flight / quiesce primitive under every node and root.
//!
//! A [`Gate`] counts requests in flight and drains that are active. Requests
//! entering through a root wait while the gate is quiesced; requests inside
//! the graph are only counted. A drainer waits until the count is zero.
//!
//! The fast path is two sequentially consistent atomics (Dekker style): a
//! request increments `in_flight` then reads `quiesce`; a drainer increments
//! `quiesce` then reads `in_flight`. At least one of them sees the other, so
//! a request can never slip in unseen after a drainer found the gate idle.
//! Waiting uses a waker list behind a mutex, touched only on the slow path.
//!
//! This module is model-checked with loom (`RUSTFLAGS="--cfg loom"`, see
//! `tests/loom_gate.rs`): begin/end nesting, a request entering while a drain
//! begins, and a request completing while a drain waits.

// `Arc` stays std's under loom: `loom::sync::Arc` cannot be a method receiver
// (`self: &Arc<Self>`) on stable Rust, and callers hold `std::sync::Arc<Gate>`.
// Its reference count is not part of the protocol being checked.
#[cfg(loom)]
use loom::sync::{
    atomic::{AtomicUsize, Ordering::SeqCst},
    Mutex,
};
use std::sync::Arc;
#[cfg(not(loom))]
use std::sync::{
    atomic::{AtomicUsize, Ordering::SeqCst},
    Mutex,
};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Waiters {
    /// Drainers waiting for `in_flight == 0`.
    idle: Vec<Waker>,
    /// Queued requests waiting for `quiesce == 0`.
    resume: Vec<Waker>,
}

fn register(list: &mut Vec<Waker>, waker: &Waker) {
    if !list.iter().any(|w| w.will_wake(waker)) {
        list.push(waker.clone());
    }
}

/// In-flight count, drain counter and their waiters, for one node or root.
pub struct Gate {
    in_flight: AtomicUsize,
    quiesce: AtomicUsize,
    waiters: Mutex<Waiters>,
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            in_flight: AtomicUsize::new(0),
            quiesce: AtomicUsize::new(0),
            waiters: Mutex::new(Waiters::default()),
        }
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(SeqCst)
    }

    /// Drains currently active (nested count).
    pub fn quiesce_count(&self) -> usize {
        self.quiesce.load(SeqCst)
    }

    pub fn is_quiesced(&self) -> bool {
        self.quiesce_count() > 0
    }

    /// Counts a request without ever blocking it: used inside the graph,
    /// where new work can only arrive from a quiesced parent.
    pub fn enter_counted(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, SeqCst);
        InFlight { gate: self.clone() }
    }

    /// Admits a request at a root: waits while the gate is quiesced. A
    /// waiting request holds no in-flight count, so drains never wait on it.
    pub async fn enter(self: &Arc<Self>) -> InFlight {
        loop {
            self.in_flight.fetch_add(1, SeqCst);
            if self.quiesce.load(SeqCst) == 0 {
                return InFlight { gate: self.clone() };
            }
            self.leave();
            WaitResumed { gate: self }.await;
        }
    }

    /// Starts (or nests) a drain of this gate.
    pub fn begin_quiesce(&self) {
        self.begin_quiesce_n(1);
    }

    /// Ends one drain; the last one lets queued requests go.
    pub fn end_quiesce(&self) {
        self.end_quiesce_n(1);
    }

    /// Starts `n` nested drains at once (a parent inheriting a child's drains).
    pub fn begin_quiesce_n(&self, n: usize) {
        if n > 0 {
            self.quiesce.fetch_add(n, SeqCst);
        }
    }

    /// Ends `n` nested drains at once.
    pub fn end_quiesce_n(&self, n: usize) {
        if n == 0 {
            return;
        }
        let prev = self.quiesce.fetch_sub(n, SeqCst);
        debug_assert!(prev >= n, "end_quiesce without begin_quiesce");
        if prev == n {
            let wakers = std::mem::take(&mut self.waiters.lock().unwrap().resume);
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    /// Resolves once no request is in flight.
    pub fn wait_idle(&self) -> WaitIdle<'_> {
        WaitIdle { gate: self }
    }

    fn leave(&self) {
        let prev = self.in_flight.fetch_sub(1, SeqCst);
        debug_assert!(prev > 0);
        if prev == 1 && self.quiesce.load(SeqCst) > 0 {
            let wakers = std::mem::take(&mut self.waiters.lock().unwrap().idle);
            wakers.into_iter().for_each(Waker::wake);
        }
    }
}

/// RAII in-flight count: dropping it ends the request's stay in the gate.
pub struct InFlight {
    gate: Arc<Gate>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

/// Future of [`Gate::wait_idle`].
pub struct WaitIdle<'a> {
    gate: &'a Gate,
}

impl Future for WaitIdle<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.gate.in_flight.load(SeqCst) == 0 {
            return Poll::Ready(());
        }
        let mut w = self.gate.waiters.lock().unwrap();
        register(&mut w.idle, cx.waker());
        drop(w);
        if self.gate.in_flight.load(SeqCst) == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

struct WaitResumed<'a> {
    gate: &'a Gate,
}

impl Future for WaitResumed<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.gate.quiesce.load(SeqCst) == 0 {
            return Poll::Ready(());
        }
        let mut w = self.gate.waiters.lock().unwrap();
        register(&mut w.resume, cx.waker());
        drop(w);
        if self.gate.quiesce.load(SeqCst) == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}
