//! Whole lifecycles: the events each path sends, in QEMU's order, and the
//! driver callbacks it runs.

mod common;

use common::{assert_names, events, names, Scripted};
use sluice_core::{Error, Graph};
use sluice_jobs::{ErrorAction, Job, JobManager, JobOptions, JobStatus, JobTxn, OnError};
use std::sync::Arc;

fn setup() -> (
    JobManager,
    tokio::sync::mpsc::UnboundedReceiver<sluice_jobs::JobEvent>,
) {
    let jobs = JobManager::new(Graph::new());
    let rx = jobs.events().subscribe();
    (jobs, rx)
}

#[tokio::test]
async fn a_job_that_succeeds_with_auto_finalize_and_dismiss() {
    let (jobs, mut rx) = setup();
    let s = Scripted::new(3);
    s.gate.add_permits(3);
    let job = jobs.spawn(JobOptions::new("j"), s.boxed()).unwrap();
    assert_eq!(job.wait_concluded().await, None);
    job.wait_for(|st| st == JobStatus::Null).await;
    assert_names(
        &mut rx,
        "created running waiting pending BLOCK_JOB_COMPLETED concluded null",
    );
    assert_eq!(*s.calls.lock(), ["prepare", "commit", "clean"]);
    assert!(jobs.get("j").is_none(), "a dismissed job leaves the list");
    assert_eq!(job.progress(), (3, 3));
}

#[tokio::test]
async fn manual_finalize_and_dismiss() {
    let (jobs, mut rx) = setup();
    let s = Scripted::new(0);
    let mut o = JobOptions::new("j");
    o.auto_finalize = false;
    o.auto_dismiss = false;
    let job = jobs.spawn(o, s.boxed()).unwrap();
    job.wait_for(|st| st == JobStatus::Pending).await;
    assert!(
        s.calls.lock().is_empty(),
        "nothing prepared before finalize"
    );
    job.finalize().await.unwrap();
    assert_eq!(job.status(), JobStatus::Concluded);
    assert!(
        jobs.get("j").is_some(),
        "concluded jobs stay until dismissed"
    );
    job.dismiss().unwrap();
    let evs = events(&mut rx);
    let pending = evs.iter().find(|e| e.name == "BLOCK_JOB_PENDING").unwrap();
    assert_eq!(
        pending.data,
        serde_json::json!({"type": "stream", "id": "j"})
    );
    let done = evs
        .iter()
        .find(|e| e.name == "BLOCK_JOB_COMPLETED")
        .unwrap();
    assert_eq!(
        done.data,
        serde_json::json!({"type": "stream", "device": "j", "len": 0, "offset": 0, "speed": 0})
    );
}

#[tokio::test]
async fn cancel_while_running() {
    let (jobs, mut rx) = setup();
    let s = Scripted::new(5);
    let job = jobs.spawn(JobOptions::new("j"), s.boxed()).unwrap();
    job.cancel(false).await.unwrap();
    assert_eq!(
        job.wait_concluded().await.as_deref(),
        Some("Operation canceled")
    );
    job.wait_for(|st| st == JobStatus::Null).await;
    assert_names(
        &mut rx,
        "created running aborting BLOCK_JOB_CANCELLED concluded null",
    );
    assert_eq!(
        *s.calls.lock(),
        ["abort", "clean"],
        "no prepare after a cancel"
    );
}

#[tokio::test]
async fn pause_and_resume_park_at_a_pause_point() {
    let (jobs, mut rx) = setup();
    let s = Scripted::new(3);
    let job = jobs.spawn(JobOptions::new("j"), s.boxed()).unwrap();
    job.pause().unwrap();
    s.gate.add_permits(1);
    job.wait_for(|st| st == JobStatus::Paused).await;
    assert!(job.is_paused());
    assert_eq!(job.block_info()["paused"], true);
    // Paused before its first step (the pause point before `run`), the
    // job takes no permit while parked.
    s.gate.add_permits(2);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(job.progress().0, 0);
    assert_eq!(s.gate.available_permits(), 3);
    job.resume().unwrap();
    job.wait_concluded().await;
    assert_names(
        &mut rx,
        "created running paused running waiting pending BLOCK_JOB_COMPLETED concluded null",
    );
}

#[tokio::test]
async fn ready_standby_and_complete() {
    let (jobs, mut rx) = setup();
    let mut s = Scripted::new(0);
    s.ready = true;
    let job = jobs.spawn(JobOptions::new("j"), s.boxed()).unwrap();
    job.wait_for(|st| st == JobStatus::Ready).await;
    job.pause().unwrap();
    job.kick();
    job.wait_for(|st| st == JobStatus::Standby).await;
    job.resume().unwrap();
    job.wait_for(|st| st == JobStatus::Ready).await;
    job.complete().unwrap();
    assert_eq!(job.wait_concluded().await, None);
    assert_names(&mut rx, "created running ready BLOCK_JOB_READY standby ready waiting pending BLOCK_JOB_COMPLETED concluded null");
}

#[tokio::test]
async fn soft_cancel_of_a_ready_job_completes_it() {
    let (jobs, mut rx) = setup();
    let mut s = Scripted::new(0);
    s.ready = true;
    let job = jobs.spawn(JobOptions::new("j"), s.boxed()).unwrap();
    job.wait_for(|st| st == JobStatus::Ready).await;
    job.cancel(false).await.unwrap();
    assert_eq!(job.wait_concluded().await, None, "not an error");
    let n = names(&mut rx);
    assert!(n.contains(&"BLOCK_JOB_COMPLETED".to_string()), "{n:?}");
    assert!(!n.contains(&"BLOCK_JOB_CANCELLED".to_string()), "{n:?}");
}

#[tokio::test]
async fn a_failed_prepare_aborts_the_job() {
    let (jobs, mut rx) = setup();
    let mut s = Scripted::new(0);
    s.fail_prepare = true;
    let job = jobs.spawn(JobOptions::new("j"), s.boxed()).unwrap();
    assert_eq!(
        job.wait_concluded().await.as_deref(),
        Some("scripted prepare failure")
    );
    assert_eq!(*s.calls.lock(), ["prepare", "abort", "clean"]);
    let evs = events(&mut rx);
    let done = evs
        .iter()
        .find(|e| e.name == "BLOCK_JOB_COMPLETED")
        .unwrap();
    assert_eq!(done.data["error"], "scripted prepare failure");
    let statuses: Vec<_> = evs
        .iter()
        .filter(|e| e.name == "JOB_STATUS_CHANGE")
        .map(|e| e.data["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        statuses,
        [
            "created",
            "running",
            "waiting",
            "pending",
            "aborting",
            "concluded",
            "null"
        ]
    );
}

/// Jobs `a` and `b` running `a` and `b`, created in one transaction on a
/// fresh manager (returned with its events), then started.
fn started_group(
    a: &Scripted,
    b: &Scripted,
) -> (
    JobManager,
    tokio::sync::mpsc::UnboundedReceiver<sluice_jobs::JobEvent>,
    Arc<Job>,
    Arc<Job>,
) {
    let (jobs, rx) = setup();
    let txn = JobTxn::new();
    let ja = jobs
        .create(JobOptions::new("a"), a.boxed(), Some(txn.clone()))
        .unwrap();
    let jb = jobs
        .create(JobOptions::new("b"), b.boxed(), Some(txn))
        .unwrap();
    jobs.start(&ja);
    jobs.start(&jb);
    (jobs, rx, ja, jb)
}

#[tokio::test]
async fn a_group_finalizes_together_and_aborts_together() {
    // Success: the first job to finish waits for the second.
    let a = Scripted::new(0);
    let b = Scripted::new(1);
    let (_jobs, _rx, ja, jb) = started_group(&a, &b);
    ja.wait_for(|st| st == JobStatus::Waiting).await;
    assert!(a.calls.lock().is_empty(), "a waits for b before preparing");
    b.gate.add_permits(1);
    ja.wait_concluded().await;
    jb.wait_concluded().await;
    assert_eq!(*a.calls.lock(), ["prepare", "commit", "clean"]);
    assert_eq!(*b.calls.lock(), ["prepare", "commit", "clean"]);

    // Failure of one: the other is cancelled and both abort.
    let mut a = Scripted::new(0);
    a.fail_run = true;
    let b = Scripted::new(10);
    let (_jobs, _rx, ja, jb) = started_group(&a, &b);
    assert_eq!(
        ja.wait_concluded().await.as_deref(),
        Some("scripted failure")
    );
    assert_eq!(
        jb.wait_concluded().await.as_deref(),
        Some("Operation canceled")
    );
    assert_eq!(*a.calls.lock(), ["abort", "clean"]);
    assert_eq!(*b.calls.lock(), ["abort", "clean"]);
}

#[tokio::test]
async fn on_error_stop_pauses_the_job_until_resume() {
    let (jobs, mut rx) = setup();
    let mut o = JobOptions::new("j");
    o.on_error = OnError::Stop;
    let job = jobs.spawn(o, Scripted::new(1).boxed()).unwrap();
    let err = Error::Other("boom".into());
    assert_eq!(job.error_action(true, &err), ErrorAction::Stop);
    assert!(job.is_user_paused());
    assert_eq!(job.block_info()["io-status"], "failed");
    job.kick();
    job.wait_for(|st| st == JobStatus::Paused).await;
    job.resume().unwrap();
    assert_eq!(job.block_info()["io-status"], "ok");
    let evs = events(&mut rx);
    let e = evs.iter().find(|e| e.name == "BLOCK_JOB_ERROR").unwrap();
    assert_eq!(
        e.data,
        serde_json::json!({"device": "j", "operation": "read", "action": "stop"})
    );
    // The policies map as QEMU's: enospc stops only for ENOSPC.
    for (policy, errno_enospc, want) in [
        (OnError::Report, false, ErrorAction::Report),
        (OnError::Ignore, false, ErrorAction::Ignore),
        (OnError::Enospc, false, ErrorAction::Report),
        (OnError::Enospc, true, ErrorAction::Stop),
    ] {
        let mut o = JobOptions::new(&format!("p{policy:?}{errno_enospc}"));
        o.on_error = policy;
        let j = jobs.spawn(o, Scripted::new(1).boxed()).unwrap();
        let e = if errno_enospc {
            Error::Io {
                node: "n".into(),
                op: "write",
                offset: 0,
                len: 512,
                source: std::io::Error::from_raw_os_error(28),
            }
        } else {
            Error::Other("x".into())
        };
        assert_eq!(j.error_action(false, &e), want, "{policy:?}");
    }
}
