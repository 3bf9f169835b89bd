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
