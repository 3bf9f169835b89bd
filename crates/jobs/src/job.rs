//! Jobs: QEMU's `Job`/`BlockJob` — a task doing long work (copying a
//! backing chain, mirroring a disk) that users pause, resume, cancel,
//! complete, finalize and dismiss, and whose last step changes the graph.
//!
//! The life of a job, as `job.c` has it:
//!
//! * `created` → `running` when started; the driver's [`JobDriver::run`]
//!   does the work, calling [`Job::pause_point`] (or [`Job::rate_limit`],
//!   which is one) between chunks. A user pause parks it there as `paused`
//!   (`standby` when it was `ready`).
//! * When `run` returns, the job is `waiting` for the other jobs of its
//!   transaction ([`JobTxn`]), then `pending`; with `auto-finalize` (or on
//!   `finalize`) every job of the group runs [`JobDriver::prepare`] — the
//!   final graph change, inside a drained section — then `commit` or,
//!   if anything failed, `abort` for all of them; then `clean`.
//! * `concluded` (the result can be read), then `null` once dismissed
//!   (at once with `auto-dismiss`).
//!
//! A drained section on a node a job uses parks the job too: every request
//! of a job enters through one of its [`sluice_core::Root`]s, which queue
//! new requests while drained and hold no in-flight count meanwhile. That
//! pause is not a user pause: it shows in no status and `resume` does not
//! end it, and ending it does not end a user pause.

use crate::events::EventBus;
use crate::status::{JobStatus, JobVerb};
use async_trait::async_trait;
use parking_lot::Mutex;
use serde_json::{json, Value};
use sluice_core::{Error, Graph, Result};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a job does when an I/O request fails (QEMU's `BlockdevOnError`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    Report,
    Ignore,
    Stop,
    Enospc,
}

impl OnError {
    pub fn parse(s: &str) -> Result<OnError> {
        Ok(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "stop" => OnError::Stop,
            "enospc" | "auto" => OnError::Enospc,
            other => {
                return Err(Error::Other(format!(
                    "Parameter 'on-error' does not accept value '{other}'"
                )))
            }
        })
    }
}

/// The decision for one failed request (QEMU's `BlockErrorAction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    /// Fail the job with this error.
    Report,
    /// Carry on; the job still ends with the error.
    Ignore,
    /// The job is paused (as by a user); after `resume` it retries.
    Stop,
}

impl ErrorAction {
    fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// The options every job takes (`job-id`, `auto-finalize`, ...).
#[derive(Clone, Debug)]
pub struct JobOptions {
    pub id: String,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Bytes per second; 0 is unlimited.
    pub speed: u64,
    pub on_error: OnError,
}

impl JobOptions {
    pub fn new(id: &str) -> JobOptions {
        JobOptions {
            id: id.to_string(),
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
            on_error: OnError::Report,
        }
    }
}

/// One kind of job: stream, commit, mirror, backup.
#[async_trait]
pub trait JobDriver: Send + Sync + 'static {
    /// QEMU's `JobType` name: `stream`, `commit`, `mirror`, `backup`,
    /// `create`.
    fn job_type(&self) -> &'static str;

    /// Block jobs (all but `create`) also send the `BLOCK_JOB_*` events
    /// and show in `query-block-jobs`.
    fn is_block_job(&self) -> bool {
        true
    }

    /// The work. Calls `job.pause_point()` (or `job.rate_limit(..)`)
    /// between chunks and returns early once `job.is_cancelled()`.
    async fn run(&self, job: &Arc<Job>) -> Result<()>;

    /// The final graph change, in a drained section, as one transaction.
    /// Runs only when every job of the group succeeded so far.
    async fn prepare(&self, _graph: &Graph) -> Result<()> {
        Ok(())
    }

    /// After every job of the group prepared successfully.
    async fn commit(&self, _graph: &Graph) {}

    /// After a failure or cancellation anywhere in the group.
    async fn abort(&self, _graph: &Graph) {}

    /// Last, either way: drop filters and roots the job added.
    async fn clean(&self, _graph: &Graph) {}

    /// The `complete` verb (only jobs that reach `ready` have it).
    fn complete(&self, job: &Job) -> Result<()> {
        Err(Error::Other(format!(
            "The active block job '{}' cannot be completed",
            job.id()
        )))
    }

    /// A cancel request: returns whether it really cancels (`true`) or,
    /// as for a `ready` mirror, just ends the job early with success.
    fn cancel(&self, _job: &Job, _force: bool) -> bool {
        true
    }
}

/// Jobs that finalize, or abort, together (QEMU's `JobTxn`).
#[derive(Default)]
pub struct JobTxn {
    jobs: Mutex<Vec<Arc<Job>>>,
    aborting: AtomicBool,
}

impl JobTxn {
    pub fn new() -> Arc<JobTxn> {
        Arc::new(JobTxn::default())
    }

    fn jobs(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().clone()
    }

    fn remove(&self, job: &Job) {
        self.jobs.lock().retain(|j| !std::ptr::eq(&**j, job));
    }
}

struct State {
    status: JobStatus,
    /// User pauses (at most one) plus error stops; the job parks at its
    /// next pause point while this is above zero.
    pause_count: u32,
    user_paused: bool,
    /// Parked at a pause point right now.
    paused: bool,
    /// Working (not parked, sleeping or waiting to be kicked).
    busy: bool,
    started: bool,
    /// `run` has returned.
    deferred: bool,
    cancel_requested: bool,
    force_cancel: bool,
    ret: Option<String>,
    current: u64,
    total: u64,
    speed: u64,
    auto_finalize: bool,
    auto_dismiss: bool,
    on_error: OnError,
    io_status: &'static str,
    limit: RateLimit,
}

/// QEMU's `RateLimit`: a quota of bytes per 100 ms slice (on tokio's
/// clock, so tests can run it on virtual time).
#[derive(Default)]
struct RateLimit {
    slice_start: Option<Instant>,
    dispatched: u64,
}

const SLICE: Duration = Duration::from_millis(100);

impl RateLimit {
    /// Accounts `n` bytes just sent and says how long to wait before
    /// sending more at `speed` bytes/s: until the slice in which the
    /// quota covers everything sent so far.
    fn delay(&mut self, speed: u64, n: u64) -> Duration {
        if speed == 0 {
            return Duration::ZERO;
        }
        let quota = (speed / 10).max(1);
        let now = Instant::now();
        let start = match self.slice_start {
            Some(s) if self.dispatched > 0 || now < s + SLICE => s,
            _ => {
                self.slice_start = Some(now);
                self.dispatched = 0;
                now
            }
        };
        self.dispatched += n;
        let slices = (self.dispatched / quota) as u32;
        let until = start + SLICE * slices;
        if until <= now {
            // Caught up: the next slice starts afresh.
            self.slice_start = None;
            self.dispatched = 0;
        }
        until.saturating_duration_since(now)
    }
}

/// What every job shares: the graph its last step changes, the event bus,
/// and the list `query-jobs` shows.
pub(crate) struct Shared {
    graph: Graph,
    events: EventBus,
    jobs: Mutex<Vec<Arc<Job>>>,
}

/// The jobs of one graph.
#[derive(Clone)]
pub struct JobManager {
    shared: Arc<Shared>,
}

impl JobManager {
    pub fn new(graph: Graph) -> JobManager {
        JobManager {
            shared: Arc::new(Shared {
                graph,
                events: EventBus::default(),
                jobs: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn graph(&self) -> &Graph {
        &self.shared.graph
    }

    pub fn events(&self) -> &EventBus {
        &self.shared.events
    }

    /// The job with this id, if it exists and is not dismissed.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.shared.jobs.lock().iter().find(|j| j.id == id).cloned()
    }

    /// Every job not yet dismissed, newest first (as `query-jobs`).
    pub fn list(&self) -> Vec<Arc<Job>> {
        self.shared.jobs.lock().iter().rev().cloned().collect()
    }

    /// Creates a job in state `created` (QEMU's `job_create`). With `txn`
    /// it joins that group; alone it is a group of one.
    pub fn create(
        &self,
        opts: JobOptions,
        driver: Box<dyn JobDriver>,
        txn: Option<Arc<JobTxn>>,
    ) -> Result<Arc<Job>> {
        if !id_wellformed(&opts.id) {
            return Err(Error::Other(format!("Invalid job ID '{}'", opts.id)));
        }
        let mut jobs = self.shared.jobs.lock();
        if jobs.iter().any(|j| j.id == opts.id) {
            return Err(Error::Other(format!("Job ID '{}' already in use", opts.id)));
        }
        let txn = txn.unwrap_or_default();
        let job = Arc::new(Job {
            id: opts.id.clone(),
            driver,
            shared: self.shared.clone(),
            kick: Notify::new(),
            changed: Notify::new(),
            txn: txn.clone(),
            state: Mutex::new(State {
                status: JobStatus::Created,
                pause_count: 1,
                user_paused: false,
                paused: true,
                busy: false,
                started: false,
                deferred: false,
                cancel_requested: false,
                force_cancel: false,
                ret: None,
                current: 0,
                total: 0,
                speed: opts.speed,
                auto_finalize: opts.auto_finalize,
                auto_dismiss: opts.auto_dismiss,
                on_error: opts.on_error,
                io_status: "ok",
                limit: RateLimit::default(),
            }),
        });
        jobs.push(job.clone());
        drop(jobs);
        txn.jobs.lock().push(job.clone());
        job.emit_status(JobStatus::Created);
        Ok(job)
    }

    /// Starts a created job: `running`, and its `run` goes to work.
    pub fn start(&self, job: &Arc<Job>) {
        {
            let mut s = job.state.lock();
            assert!(!s.started, "job '{}' started twice", job.id);
            s.started = true;
            s.busy = true;
            s.pause_count -= 1;
            s.paused = false;
            job.transition(&mut s, JobStatus::Running);
        }
        let job = job.clone();
        tokio::spawn(async move { job.run_task().await });
    }

    /// `create` then `start`: what the QMP commands that make a job do.
    pub fn spawn(&self, opts: JobOptions, driver: Box<dyn JobDriver>) -> Result<Arc<Job>> {
        let job = self.create(opts, driver, None)?;
        self.start(&job);
        Ok(job)
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

/// One job.
pub struct Job {
    id: String,
    driver: Box<dyn JobDriver>,
    shared: Arc<Shared>,
    state: Mutex<State>,
    /// Wakes the job from a pause point or a rate-limit sleep (`job_enter`).
    kick: Notify,
    /// Signalled on every status change, for those waiting on the job.
    changed: Notify,
    txn: Arc<JobTxn>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("type", &self.job_type())
            .field("status", &self.status())
            .finish()
    }
}

impl Job {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn job_type(&self) -> &'static str {
        self.driver.job_type()
    }

    /// Whether this is a block job (see [`JobDriver::is_block_job`]).
    pub fn is_block_job(&self) -> bool {
        self.driver.is_block_job()
    }

    /// Publishes a `BLOCK_JOB_*` event, for block jobs only.
    fn publish_block_event(&self, name: &'static str, data: Value) {
        if self.is_block_job() {
            self.shared.events.publish(name, data);
        }
    }

    pub fn status(&self) -> JobStatus {
        self.state.lock().status
    }

    pub fn graph(&self) -> &Graph {
        &self.shared.graph
    }

    /// The job's error message once it failed or was cancelled.
    pub fn error(&self) -> Option<String> {
        self.state.lock().ret.clone()
    }

    /// `(current, total)` progress in bytes of work.
    pub fn progress(&self) -> (u64, u64) {
        let s = self.state.lock();
        (s.current, s.total)
    }

    pub fn speed(&self) -> u64 {
        self.state.lock().speed
    }

    /// A forced cancel was asked for: the job stops and fails.
    pub fn is_cancelled(&self) -> bool {
        self.state.lock().force_cancel
    }

    /// Any cancel was asked for (a `ready` mirror ends early on a soft one).
    pub fn cancel_requested(&self) -> bool {
        self.state.lock().cancel_requested
    }

    pub fn is_user_paused(&self) -> bool {
        self.state.lock().user_paused
    }

    /// Parked at a pause point right now.
    pub fn is_paused(&self) -> bool {
        self.state.lock().paused
    }

    // ---- the verbs -------------------------------------------------

    fn apply_verb(&self, s: &State, verb: JobVerb) -> Result<()> {
        if s.status.allows(verb) {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "Job '{}' in state '{}' cannot accept command verb '{}'",
                self.id, s.status, verb
            )))
        }
    }

    /// `job-pause`: parks the job at its next pause point.
    pub fn pause(&self) -> Result<()> {
        let mut s = self.state.lock();
        self.apply_verb(&s, JobVerb::Pause)?;
        if s.user_paused {
            return Err(Error::Other("Job is already paused".into()));
        }
        s.user_paused = true;
        s.pause_count += 1;
        Ok(())
    }

    /// `job-resume`: ends a user pause (or a stop after an error).
    pub fn resume(&self) -> Result<()> {
        let mut s = self.state.lock();
        if !s.user_paused || s.pause_count == 0 {
            return Err(Error::Other(
                "Can't resume a job that was not paused".into(),
            ));
        }
        self.apply_verb(&s, JobVerb::Resume)?;
        s.user_paused = false;
        s.io_status = "ok";
        s.pause_count -= 1;
        if s.pause_count == 0 {
            self.kick.notify_one();
        }
        Ok(())
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, speed: u64) -> Result<()> {
        let mut s = self.state.lock();
        self.apply_verb(&s, JobVerb::SetSpeed)?;
        s.speed = speed;
        s.limit = RateLimit::default();
        // A job sleeping for the old speed recalculates.
        self.kick.notify_one();
        Ok(())
    }

    /// `job-complete`: a `ready` job finishes (a mirror pivots).
    pub fn complete(&self) -> Result<()> {
        {
            let s = self.state.lock();
            self.apply_verb(&s, JobVerb::Complete)?;
            if s.pause_count > 0 || s.cancel_requested {
                return Err(Error::Other(format!(
                    "The active block job '{}' cannot be completed",
                    self.id
                )));
            }
        }
        self.driver.complete(self)?;
        self.kick.notify_one();
        Ok(())
    }

    /// `job-cancel`. `force` is `block-job-cancel`'s: a `ready` mirror
    /// without it completes early, leaving a consistent copy, unpivoted.
    pub async fn cancel(self: &Arc<Self>, force: bool) -> Result<()> {
        {
            let s = self.state.lock();
            self.apply_verb(&s, JobVerb::Cancel)?;
        }
        self.do_cancel(force).await;
        Ok(())
    }

    /// `job-finalize`: a `pending` group runs its final graph changes.
    pub async fn finalize(self: &Arc<Self>) -> Result<()> {
        {
            let s = self.state.lock();
            self.apply_verb(&s, JobVerb::Finalize)?;
        }
        self.do_finalize().await;
        Ok(())
    }

    /// `job-dismiss`: a `concluded` job leaves the job list.
    pub fn dismiss(&self) -> Result<()> {
        {
            let s = self.state.lock();
            self.apply_verb(&s, JobVerb::Dismiss)?;
        }
        self.do_dismiss();
        Ok(())
    }

    // ---- what drivers call while running ----------------------------

    /// A point where the job may park: while paused (by a user or an error
    /// stop) it waits here, showing `paused` (`standby` if `ready`).
    pub async fn pause_point(&self) {
        let mut parked_from = None;
        loop {
            let kicked = self.kick.notified();
            tokio::pin!(kicked);
            kicked.as_mut().enable();
            {
                let mut s = self.state.lock();
                if s.pause_count == 0 || s.force_cancel {
                    if let Some(prev) = parked_from {
                        s.paused = false;
                        s.busy = true;
                        self.transition(&mut s, prev);
                    }
                    return;
                }
                if parked_from.is_none() {
                    let prev = s.status;
                    let to = if prev == JobStatus::Ready {
                        JobStatus::Standby
                    } else {
                        JobStatus::Paused
                    };
                    s.paused = true;
                    s.busy = false;
                    self.transition(&mut s, to);
                    parked_from = Some(prev);
                }
            }
            kicked.await;
        }
    }

    /// Accounts `n` bytes against `speed` and sleeps as long as the limit
    /// says; a pause point either way.
    pub async fn rate_limit(&self, n: u64) {
        let delay = {
            let mut s = self.state.lock();
            let speed = s.speed;
            s.limit.delay(speed, n)
        };
        self.sleep(delay).await;
    }

    /// Sleeps (woken early by cancel, set-speed, resume), then a pause point.
    pub async fn sleep(&self, delay: Duration) {
        if self.is_cancelled() {
            return;
        }
        if !delay.is_zero() && self.state.lock().pause_count == 0 {
            self.state.lock().busy = false;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.kick.notified() => {}
            }
            self.state.lock().busy = true;
        }
        self.pause_point().await;
    }

    /// Waits until something wakes the job (complete, cancel, resume,
    /// set-speed) — for a `ready` job with nothing to do.
    pub async fn yield_until_kicked(&self) {
        if self.is_cancelled() {
            return;
        }
        self.state.lock().busy = false;
        self.kick.notified().await;
        self.state.lock().busy = true;
    }

    /// Wakes the job from `yield_until_kicked` or a sleep.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    pub fn progress_update(&self, done: u64) {
        self.state.lock().current += done;
    }

    pub fn progress_set_remaining(&self, remaining: u64) {
        let mut s = self.state.lock();
        s.total = s.current + remaining;
    }

    pub fn progress_increase_remaining(&self, delta: u64) {
        self.state.lock().total += delta;
    }

    /// In sync: `ready`, with `BLOCK_JOB_READY`.
    pub fn transition_to_ready(&self) {
        let mut s = self.state.lock();
        self.transition(&mut s, JobStatus::Ready);
        let data = self.block_event_data(&s);
        self.publish_block_event("BLOCK_JOB_READY", data);
    }

    /// What to do about a failed request (`block_job_error_action`):
    /// publishes `BLOCK_JOB_ERROR`, and on `stop` pauses the job as a user
    /// pause would, to be resumed by `resume`.
    pub fn error_action(&self, is_read: bool, err: &Error) -> ErrorAction {
        let mut s = self.state.lock();
        let enospc = err.errno() == libc::ENOSPC;
        let action = match s.on_error {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc if enospc => ErrorAction::Stop,
            OnError::Enospc => ErrorAction::Report,
        };
        self.publish_block_event(
            "BLOCK_JOB_ERROR",
            json!({
                "device": self.id,
                "operation": if is_read { "read" } else { "write" },
                "action": action.name(),
            }),
        );
        if action == ErrorAction::Stop {
            if !s.user_paused {
                s.pause_count += 1;
                s.user_paused = true;
            }
            s.io_status = if enospc { "nospace" } else { "failed" };
        }
        action
    }

    // ---- QMP views ----------------------------------------------------

    /// `query-jobs`' `JobInfo`.
    pub fn info(&self) -> Value {
        let s = self.state.lock();
        let mut v = json!({
            "id": self.id,
            "type": self.job_type(),
            "status": s.status.name(),
            "current-progress": s.current,
            "total-progress": s.total,
        });
        if let Some(e) = &s.ret {
            v["error"] = json!(e);
        }
        v
    }

    /// `query-block-jobs`' `BlockJobInfo`.
    pub fn block_info(&self) -> Value {
        let s = self.state.lock();
        let mut v = json!({
            "type": self.job_type(),
            "device": self.id,
            "len": s.total,
            "offset": s.current,
            "busy": s.busy && !s.deferred,
            "paused": s.pause_count > 0,
            "speed": s.speed,
            "io-status": s.io_status,
            "ready": s.status.is_ready(),
            "status": s.status.name(),
            "auto-finalize": s.auto_finalize,
            "auto-dismiss": s.auto_dismiss,
        });
        if let Some(e) = &s.ret {
            v["error"] = json!(e);
        }
        v
    }

    // ---- waiting on a job ---------------------------------------------

    /// Resolves once `pred` holds for the job's status.
    pub async fn wait_for(&self, pred: impl Fn(JobStatus) -> bool) -> JobStatus {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let st = self.status();
            if pred(st) {
                return st;
            }
            changed.await;
        }
    }

    /// Resolves once the job reached `concluded` or `null`; gives its error.
    pub async fn wait_concluded(&self) -> Option<String> {
        self.wait_for(|s| matches!(s, JobStatus::Concluded | JobStatus::Null))
            .await;
        self.error()
    }

    // ---- the machinery (job.c) ---------------------------------------

    fn emit_status(&self, status: JobStatus) {
        self.shared.events.publish(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id, "status": status.name()}),
        );
        self.changed.notify_waiters();
    }

    fn transition(&self, s: &mut State, to: JobStatus) {
        let from = s.status;
        debug_assert!(
            from.can_become(to),
            "job '{}': transition {from} -> {to} is not in the state table",
            self.id
        );
        s.status = to;
        if from != to {
            self.emit_status(to);
        }
    }

    fn set_status(&self, to: JobStatus) {
        let mut s = self.state.lock();
        self.transition(&mut s, to);
    }

    fn block_event_data(&self, s: &State) -> Value {
        json!({
            "type": self.job_type(),
            "device": self.id,
            "len": s.total,
            "offset": s.current,
            "speed": s.speed,
        })
    }

    async fn run_task(self: Arc<Self>) {
        self.pause_point().await;
        let result = if self.is_cancelled() {
            Ok(())
        } else {
            self.driver.run(&self).await
        };
        {
            let mut s = self.state.lock();
            if let Err(e) = result {
                s.ret.get_or_insert_with(|| e.to_string());
            }
            s.deferred = true;
        }
        self.completed().await;
    }

    /// Sets the error of a cancelled job and moves a failed one to
    /// `aborting` (`job_update_rc`). Returns whether the job failed.
    fn update_rc(&self) -> bool {
        let mut s = self.state.lock();
        if s.ret.is_none() && s.force_cancel {
            s.ret = Some("Operation canceled".into());
        }
        if s.ret.is_some() {
            self.transition(&mut s, JobStatus::Aborting);
            true
        } else {
            false
        }
    }

    async fn completed(self: &Arc<Self>) {
        if self.update_rc() {
            self.txn_abort().await;
        } else {
            self.txn_success().await;
        }
    }

    async fn txn_success(self: &Arc<Self>) {
        self.set_status(JobStatus::Waiting);
        let group = self.txn.jobs();
        if group.iter().any(|j| !j.status().is_completed()) {
            return; // the last job of the group to finish carries on
        }
        for j in &group {
            j.transition_to_pending();
        }
        if group.iter().all(|j| j.state.lock().auto_finalize) {
            self.do_finalize().await;
        }
    }

    fn transition_to_pending(&self) {
        let mut s = self.state.lock();
        self.transition(&mut s, JobStatus::Pending);
        if !s.auto_finalize {
            self.publish_block_event(
                "BLOCK_JOB_PENDING",
                json!({"type": self.job_type(), "id": self.id}),
            );
        }
    }

    async fn do_finalize(self: &Arc<Self>) {
        let group = self.txn.jobs();
        let mut failed = false;
        for j in &group {
            if j.prepare().await {
                failed = true;
                break;
            }
        }
        if failed {
            self.txn_abort().await;
        } else {
            for j in &group {
                j.finalize_single().await;
            }
        }
    }

    /// Runs the driver's prepare unless the job already failed; returns
    /// whether it has failed.
    async fn prepare(self: &Arc<Self>) -> bool {
        if self.state.lock().ret.is_none() {
            if let Err(e) = self.driver.prepare(&self.shared.graph).await {
                self.state.lock().ret = Some(e.to_string());
            }
        }
        self.update_rc()
    }

    async fn finalize_single(self: &Arc<Self>) {
        let graph = &self.shared.graph;
        if self.update_rc() {
            self.driver.abort(graph).await;
        } else {
            self.driver.commit(graph).await;
        }
        self.driver.clean(graph).await;
        {
            let s = self.state.lock();
            if s.started {
                let mut data = self.block_event_data(&s);
                if s.force_cancel {
                    self.publish_block_event("BLOCK_JOB_CANCELLED", data);
                } else {
                    if let Some(e) = &s.ret {
                        data["error"] = json!(e);
                    }
                    self.publish_block_event("BLOCK_JOB_COMPLETED", data);
                }
            }
        }
        self.txn.remove(self);
        let dismiss = {
            let mut s = self.state.lock();
            self.transition(&mut s, JobStatus::Concluded);
            s.auto_dismiss || !s.started
        };
        if dismiss {
            self.do_dismiss();
        }
    }

    fn do_dismiss(&self) {
        self.txn.remove(self);
        self.set_status(JobStatus::Null);
        self.shared
            .jobs
            .lock()
            .retain(|j| !std::ptr::eq(&**j, self));
    }

    fn cancel_async(&self, force: bool) {
        let mut s = self.state.lock();
        if s.user_paused {
            s.user_paused = false;
            s.pause_count -= 1;
        }
        s.cancel_requested = true;
        s.force_cancel |= force;
    }

    async fn do_cancel(self: &Arc<Self>, force: bool) {
        if self.status() == JobStatus::Concluded {
            self.do_dismiss();
            return;
        }
        let force = self.driver.cancel(self, force);
        self.cancel_async(force);
        let (started, deferred) = {
            let s = self.state.lock();
            (s.started, s.deferred)
        };
        if !started {
            self.completed().await;
        } else if deferred {
            if self.status().is_completed() {
                self.txn_abort().await;
            }
        } else {
            self.kick.notify_one();
        }
    }

    /// Fails the whole group: cancels the others, waits for them to stop,
    /// then aborts and cleans every job (`job_completed_txn_abort`).
    async fn txn_abort(self: &Arc<Self>) {
        if self.txn.aborting.swap(true, SeqCst) {
            return; // another job of the group is doing it
        }
        for j in self.txn.jobs() {
            if !Arc::ptr_eq(&j, self) {
                j.cancel_async(true);
                j.kick.notify_one();
            }
        }
        loop {
            let Some(j) = self.txn.jobs().first().cloned() else {
                break;
            };
            if !j.state.lock().started {
                j.update_rc(); // never ran: nothing to wait for
            } else if !j.status().is_completed() {
                j.wait_for(JobStatus::is_completed).await;
            }
            j.finalize_single().await;
        }
    }
}
