//! Helpers for the job tests: a scripted job driver that a test steps
//! through every state, and a readable log of the events a job sends.
#![allow(dead_code)]

use async_trait::async_trait;
use parking_lot::Mutex;
use sluice_core::{Error, Graph, Result};
use sluice_jobs::{Job, JobDriver, JobEvent};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Semaphore;

/// A job that does `steps` units of work, one per permit of `gate`, then
/// optionally becomes `ready` until completed; it can fail in `run` or
/// `prepare` and hold in `abort` until `hold_abort` gives a permit.
#[derive(Clone)]
pub struct Scripted {
    pub steps: u64,
    pub gate: Arc<Semaphore>,
    pub ready: bool,
    pub fail_run: bool,
    pub fail_prepare: bool,
    pub hold_abort: Option<Arc<Semaphore>>,
    pub completed: Arc<AtomicBool>,
    /// `prepare`, `commit`, `abort`, `clean`, in the order they ran.
    pub calls: Arc<Mutex<Vec<&'static str>>>,
}

impl Scripted {
    pub fn new(steps: u64) -> Scripted {
        Scripted {
            steps,
            gate: Arc::new(Semaphore::new(0)),
            ready: false,
            fail_run: false,
            fail_prepare: false,
            hold_abort: None,
            completed: Arc::new(AtomicBool::new(false)),
            calls: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn boxed(&self) -> Box<dyn JobDriver> {
        Box::new(self.clone())
    }
}

#[async_trait]
impl JobDriver for Scripted {
    fn job_type(&self) -> &'static str {
        "stream"
    }

    async fn run(&self, job: &Arc<Job>) -> Result<()> {
        job.progress_set_remaining(self.steps);
        let mut done = 0;
        while done < self.steps {
            job.pause_point().await;
            if job.is_cancelled() {
                return Ok(());
            }
            tokio::select! {
                p = self.gate.acquire() => p.expect("gate open").forget(),
                _ = job.yield_until_kicked() => continue,
            }
            done += 1;
            job.progress_update(1);
        }
        if self.fail_run {
            return Err(Error::Other("scripted failure".into()));
        }
        if self.ready {
            job.transition_to_ready();
            while !self.completed.load(SeqCst) && !job.cancel_requested() {
                job.yield_until_kicked().await;
                job.pause_point().await;
            }
        }
        Ok(())
    }

    async fn prepare(&self, _graph: &Graph) -> Result<()> {
        self.calls.lock().push("prepare");
        if self.fail_prepare {
            return Err(Error::Other("scripted prepare failure".into()));
        }
        Ok(())
    }

    async fn commit(&self, _graph: &Graph) {
        self.calls.lock().push("commit");
    }

    async fn abort(&self, _graph: &Graph) {
        self.calls.lock().push("abort");
        if let Some(h) = &self.hold_abort {
            h.acquire().await.expect("hold open").forget();
        }
    }

    async fn clean(&self, _graph: &Graph) {
        self.calls.lock().push("clean");
    }

    fn complete(&self, job: &Job) -> Result<()> {
        if !self.ready {
            return Err(Error::Other(format!(
                "The active block job '{}' cannot be completed",
                job.id()
            )));
        }
        self.completed.store(true, SeqCst);
        Ok(())
    }

    fn cancel(&self, job: &Job, force: bool) -> bool {
        // Like mirror: a soft cancel of a ready job completes it early.
        force || !job.status().is_ready()
    }
}

/// Events received so far, as `NAME` or `JOB_STATUS_CHANGE:status`.
pub fn names(rx: &mut UnboundedReceiver<JobEvent>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(match e.name {
            "JOB_STATUS_CHANGE" => e.data["status"].as_str().unwrap().to_string(),
            n => n.to_string(),
        });
    }
    out
}

/// Events received so far, whole.
pub fn events(rx: &mut UnboundedReceiver<JobEvent>) -> Vec<JobEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// The seed of a randomized job test: `SLUICE_JOB_SEED` replays one, else
/// random; printed either way (and named in every failure message).
pub fn job_seed() -> u64 {
    let seed = std::env::var("SLUICE_JOB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (SLUICE_JOB_SEED={seed} replays it)");
    seed
}

/// `count` guest writes of 4–32 KiB at seeded random places in the first
/// `disk` bytes through `root`; `record(offset, len, byte)` keeps the
/// model. Yields between writes so a job runs alongside.
pub async fn guest_writes(
    root: &sluice_core::Root,
    disk: usize,
    rng: &mut rand::rngs::SmallRng,
    count: usize,
    mut record: impl FnMut(usize, usize, u8),
) {
    use rand::Rng;
    for _ in 0..count {
        let len = rng.gen_range(1..=8) * 4096;
        let off = rng.gen_range(0..(disk - len) / 4096) * 4096;
        let byte: u8 = rng.gen();
        root.write(
            off as u64,
            sluice_core::IoBytes::copy_from(&vec![byte; len]),
            sluice_core::WriteFlags::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("guest write at {off}: {e}"));
        record(off, len, byte);
        tokio::task::yield_now().await;
    }
}

/// Everything `node` shows, read through a short-lived root.
pub async fn contents(graph: &Graph, node: &Arc<sluice_core::Node>) -> Vec<u8> {
    let w = graph.writer().await;
    let r = w
        .add_root(
            "test",
            "check",
            node,
            sluice_core::PermPair::reader_sharing_all(),
        )
        .await
        .unwrap();
    drop(w);
    r.read(0, node.size() as usize).await.unwrap().to_vec()
}

/// `got` equals the model; else the first differing byte and the seed.
pub fn assert_same(got: &[u8], want: &[u8], what: &str, seed: u64) {
    assert_eq!(got.len(), want.len(), "seed {seed}: {what}: length");
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "seed {seed}: {what}: byte {i} is {:#x}, the model says {:#x}",
            got[i], want[i]
        );
    }
}

/// `guest_writes` over the whole of `model`, which it keeps up to date.
pub async fn writes_into(
    root: &sluice_core::Root,
    rng: &mut rand::rngs::SmallRng,
    count: usize,
    model: &mut [u8],
) {
    let disk = model.len();
    guest_writes(root, disk, rng, count, |o, l, b| model[o..o + l].fill(b)).await;
}

/// Guest writes (`count` before the job is ready, `count` after), then
/// completes the job: it concludes without error.
pub async fn writes_around_ready_then_complete(
    job: &Arc<Job>,
    guest: &sluice_core::Root,
    rng: &mut rand::rngs::SmallRng,
    count: usize,
    model: &mut [u8],
    seed: u64,
) {
    writes_into(guest, rng, count, model).await;
    job.wait_for(|s| s == sluice_jobs::JobStatus::Ready).await;
    writes_into(guest, rng, count, model).await;
    job.complete().unwrap();
    assert_eq!(job.wait_concluded().await, None, "seed {seed}");
}

/// The guest reads all of `want` (see `assert_same`).
pub async fn assert_guest_view(guest: &sluice_core::Root, want: &[u8], seed: u64) {
    assert_same(
        &guest.read(0, want.len()).await.unwrap(),
        want,
        "guest view",
        seed,
    );
}

/// The events received so far (see `names`) are `want`, written as one
/// string of names separated by spaces.
pub fn assert_names(rx: &mut UnboundedReceiver<JobEvent>, want: &str) {
    let want: Vec<&str> = want.split_whitespace().collect();
    assert_eq!(names(rx), want);
}

/// Starts stream `s` of `top` (to the bottom of its chain) and cancels it,
/// forced, while its first copy is parked at breakpoint `A` on
/// `read_backing_aio` in the blkdebug node `dbg`; the job ends
/// cancelled.
pub async fn stream_cancelled_at_its_first_copy(
    jobs: &sluice_jobs::JobManager,
    top: &Arc<sluice_core::Node>,
    dbg: &Arc<sluice_core::Node>,
) {
    use sluice_jobs::stream::{self, StreamParams};
    let ctl = dbg.driver().debug_control().unwrap();
    ctl.set_breakpoint(sluice_core::DebugEvent::ReadBackingAio, "A")
        .unwrap();
    let job = stream::start(
        jobs,
        sluice_jobs::JobOptions::new("s"),
        StreamParams::new(top, None),
    )
    .await
    .unwrap();
    ctl.wait_suspended("A").await;
    job.cancel(true).await.unwrap();
    ctl.resume("A").unwrap();
    assert_eq!(
        job.wait_concluded().await.as_deref(),
        Some("Operation canceled")
    );
}

/// `job_seed()` and a random generator seeded with it.
pub fn seeded_rng() -> (u64, rand::rngs::SmallRng) {
    use rand::SeedableRng;
    let seed = job_seed();
    (seed, rand::rngs::SmallRng::seed_from_u64(seed))
}
