//! Every verb in every state: allowed or refused exactly as QEMU's
//! `JobVerbTable`, on real jobs driven into each state; and the tables
//! themselves against `job.c`'s.

mod common;

use common::Scripted;
use sluice_core::Graph;
use sluice_jobs::{Job, JobManager, JobOptions, JobStatus, JobTxn, JobVerb};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// `job.c`'s tables, columns C R P Y S W D X E N (the U column dropped).
const STT: [[u8; 10]; 10] = [
    [0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
    [0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
    [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
];
const VERBS: [[u8; 10]; 7] = [
    [1, 1, 1, 1, 1, 1, 1, 0, 0, 0], // cancel
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // pause
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // resume
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // set-speed
    [0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // complete
    [0, 0, 0, 0, 0, 0, 1, 0, 0, 0], // finalize
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 0], // dismiss
];

#[test]
fn the_tables_are_qemus() {
    for (i, from) in JobStatus::ALL.iter().enumerate() {
        for (j, to) in JobStatus::ALL.iter().enumerate() {
            assert_eq!(from.can_become(*to), STT[i][j] == 1, "{from} -> {to}");
        }
    }
    for (v, verb) in JobVerb::ALL.iter().enumerate() {
        for (i, st) in JobStatus::ALL.iter().enumerate() {
            assert_eq!(st.allows(*verb), VERBS[v][i] == 1, "{verb} in {st}");
        }
    }
}

/// A job brought to `want`, and what keeps it there.
async fn job_in(want: JobStatus) -> (Arc<Job>, JobManager, Vec<Arc<Job>>) {
    let jobs = JobManager::new(Graph::new());
    let mut s = Scripted::new(1);
    let mut opts = JobOptions::new("j");
    let mut keep = Vec::new();
    match want {
        JobStatus::Created => {
            let job = jobs.create(opts, s.boxed(), None).unwrap();
            return (job, jobs, keep);
        }
        JobStatus::Ready | JobStatus::Standby => {
            s.steps = 0;
            s.ready = true;
        }
        JobStatus::Waiting => {
            s.steps = 0;
            let txn = JobTxn::new();
            let other = jobs
                .create(
                    JobOptions::new("other"),
                    Scripted::new(1).boxed(),
                    Some(txn.clone()),
                )
                .unwrap();
            let job = jobs.create(opts, s.boxed(), Some(txn)).unwrap();
            jobs.start(&other);
            jobs.start(&job);
            job.wait_for(|st| st == JobStatus::Waiting).await;
            keep.push(other);
            return (job, jobs, keep);
        }
        JobStatus::Pending => {
            s.steps = 0;
            opts.auto_finalize = false;
        }
        JobStatus::Aborting => {
            s.steps = 0;
            s.fail_run = true;
            s.hold_abort = Some(Arc::new(Semaphore::new(0)));
        }
        JobStatus::Concluded => {
            s.steps = 0;
            opts.auto_dismiss = false;
        }
        JobStatus::Null => s.steps = 0,
        // Paused: the second step parks at the pause point before it.
        JobStatus::Running | JobStatus::Paused => s.steps = 2,
    }
    let job = jobs.spawn(opts, s.boxed()).unwrap();
    match want {
        JobStatus::Paused => {
            job.pause().unwrap();
            s.gate.add_permits(1);
        }
        JobStatus::Standby => {
            job.wait_for(|st| st == JobStatus::Ready).await;
            job.pause().unwrap();
            job.kick();
        }
        _ => {}
    }
    let got = job.wait_for(|st| st == want).await;
    assert_eq!(got, want);
    (job, jobs, keep)
}

async fn apply(job: &Arc<Job>, verb: JobVerb) -> sluice_core::Result<()> {
    match verb {
        JobVerb::Cancel => job.cancel(false).await,
        JobVerb::Pause => job.pause(),
        JobVerb::Resume => job.resume(),
        JobVerb::SetSpeed => job.set_speed(1 << 20),
        JobVerb::Complete => job.complete(),
        JobVerb::Finalize => job.finalize().await,
        JobVerb::Dismiss => job.dismiss(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_verb_in_each_state_is_allowed_or_refused_as_qemu_says() {
    for st in JobStatus::ALL {
        for verb in JobVerb::ALL {
            let (job, _jobs, _keep) = job_in(st).await;
            let r = apply(&job, verb).await;
            let refusal = format!(
                "Job 'j' in state '{}' cannot accept command verb '{}'",
                st.name(),
                verb.name()
            );
            if st.allows(verb) {
                if let Err(e) = &r {
                    assert_ne!(e.to_string(), refusal, "{verb} must be allowed in {st}");
                }
            } else {
                let e = r.expect_err(&format!("{verb} must be refused in {st}"));
                // QEMU checks that a job was paused before the table.
                let not_paused = "Can't resume a job that was not paused";
                if verb == JobVerb::Resume && !job.is_user_paused() {
                    assert_eq!(e.to_string(), not_paused);
                } else {
                    assert_eq!(e.to_string(), refusal);
                }
            }
        }
    }
}

#[tokio::test]
async fn the_verbs_own_checks() {
    // resume of a job that is not paused; pause twice; complete of a job
    // that cannot complete; bad ids.
    let (job, jobs, _k) = job_in(JobStatus::Running).await;
    assert_eq!(
        job.resume().unwrap_err().to_string(),
        "Can't resume a job that was not paused"
    );
    job.pause().unwrap();
    assert_eq!(
        job.pause().unwrap_err().to_string(),
        "Job is already paused"
    );
    assert!(jobs
        .create(JobOptions::new("j"), Scripted::new(1).boxed(), None)
        .unwrap_err()
        .to_string()
        .contains("Job ID 'j' already in use"));
    for bad in ["", "1abc", "a b", "#x"] {
        let e = jobs
            .create(JobOptions::new(bad), Scripted::new(1).boxed(), None)
            .unwrap_err();
        assert_eq!(e.to_string(), format!("Invalid job ID '{bad}'"));
    }
    // A paused ready job cannot be completed.
    let (ready, _j2, _k2) = job_in(JobStatus::Standby).await;
    assert_eq!(
        ready.complete().unwrap_err().to_string(),
        "Job 'j' in state 'standby' cannot accept command verb 'complete'"
    );
}
