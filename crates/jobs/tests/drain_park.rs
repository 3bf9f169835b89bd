//! A drained section on a node a job uses parks the job: the drain waits
//! out the job's request in flight, then the job's next request queues
//! at its root holding no in-flight count. A drain pause and a user pause
//! are separate: ending one does not end the other.

mod common;
#[path = "../../drivers/tests/common/mod.rs"]
mod dcommon;

use dcommon::{fill, root_on, MIB};
use futures::poll;
use serde_json::json;
use sluice_core::{DebugEvent, Graph, PermPair};
use sluice_jobs::stream::{self, StreamParams};
use sluice_jobs::{JobManager, JobOptions, JobStatus};

/// Eight batches of the job's steps, so pause points follow the drain.
const SIZE: u64 = 16 * MIB;

/// A stream job over `top` (backed through blkdebug by a filled image)
/// whose first copy is parked at breakpoint "A" on the backing read.
struct Parked {
    graph: Graph,
    top: std::sync::Arc<sluice_core::Node>,
    dbg: std::sync::Arc<sluice_core::Node>,
    job: std::sync::Arc<sluice_jobs::Job>,
    _jobs: JobManager,
}

async fn job_parked_at_its_first_copy() -> Parked {
    let graph = Graph::new();
    let w = graph.writer().await;
    dcommon::add(
        &w,
        json!({"driver": "memory", "node-name": "img", "size": SIZE}),
    )
    .await;
    drop(w);
    fill(&graph, &graph.node("img").unwrap(), 0, SIZE as usize, 0x5A).await;
    let w = graph.writer().await;
    let top = dcommon::add(
        &w,
        json!({"driver": "memory", "node-name": "top", "size": SIZE,
               "backing": {"driver": "blkdebug", "node-name": "dbg", "image": "img"}}),
    )
    .await;
    drop(w);
    let dbg = graph.node("dbg").unwrap();
    dbg.driver()
        .debug_control()
        .unwrap()
        .set_breakpoint(DebugEvent::ReadBackingAio, "A")
        .unwrap();
    let jobs = JobManager::new(graph.clone());
    let job = stream::start(&jobs, JobOptions::new("s"), StreamParams::new(&top, None))
        .await
        .unwrap();
    dbg.driver()
        .debug_control()
        .unwrap()
        .wait_suspended("A")
        .await;
    Parked {
        graph,
        top,
        dbg,
        job,
        _jobs: jobs,
    }
}

#[tokio::test]
async fn a_drain_parks_a_running_job_and_a_user_pause_outlives_it() {
    let Parked {
        graph,
        top,
        dbg,
        job,
        _jobs,
    } = job_parked_at_its_first_copy().await;
    let ctl = dbg.driver().debug_control().unwrap();

    let w = graph.writer().await;
    let mut drain = Box::pin(w.drain(&top));
    assert!(
        poll!(&mut drain).is_pending(),
        "the drain waits for the job's read"
    );
    ctl.resume("A").unwrap();
    let drained = drain.await;
    // Drained: the job's next request queues at its root. Give it every
    // chance to run; it must not get into the node.
    let parked_at = job.progress().0;
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(top.in_flight(), 0, "nothing in flight while drained");
    assert_eq!(
        job.progress().0,
        parked_at,
        "the job made no progress while drained"
    );
    assert_eq!(
        job.status(),
        JobStatus::Running,
        "a drain pause is not a user pause"
    );
    // A user pause while drained, then the drain ends: still paused.
    job.pause().unwrap();
    drop(drained);
    drop(w);
    job.wait_for(|s| s == JobStatus::Paused).await;
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(job.status(), JobStatus::Paused);
    job.resume().unwrap();
    assert_eq!(job.wait_concluded().await, None);
    let guest = root_on(&graph, "guest", &top, PermPair::reader())
        .await
        .unwrap();
    assert!(guest
        .read(0, SIZE as usize)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0x5A));
}

/// Negative control: with the drain skipped, the job's next copy gets
/// into the node while the "drained" section is held — the request the
/// real drain parks at the root.
#[tokio::test]
async fn without_the_drain_the_job_keeps_copying() {
    let Parked {
        graph,
        top,
        dbg,
        job,
        _jobs,
    } = job_parked_at_its_first_copy().await;
    let ctl = dbg.driver().debug_control().unwrap();
    let w = graph.writer().await;
    let not_drained = w.drain_skipped_for_negative_control(&top);
    // The next backing read stops at "B": it can only get there by
    // entering the node that should be quiesced.
    ctl.set_breakpoint(DebugEvent::ReadBackingAio, "B").unwrap();
    ctl.resume("A").unwrap();
    ctl.wait_suspended("B").await;
    assert!(
        top.in_flight() > 0,
        "a job request is in the node during the section"
    );
    ctl.resume("B").unwrap();
    drop(not_drained);
    drop(w);
    assert_eq!(job.wait_concluded().await, None);
}
