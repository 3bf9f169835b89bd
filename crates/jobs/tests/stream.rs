//! block-stream and block-commit scenarios (after QEMU's iotests 030 and
//! 040), with guest I/O running against a model, and the seed's race as
//! a job test with its negative control.

mod common;
#[path = "../../drivers/tests/common/mod.rs"]
mod dcommon;

use common::{
    assert_guest_view, assert_names, guest_writes, job_seed, names,
    stream_cancelled_at_its_first_copy,
};
use dcommon::{fill, filled_chain, guest_on, memory_chain, root_on, seed_chain, MIB};
use futures::poll;
use rand::{rngs::SmallRng, SeedableRng};
use serde_json::json;
use sluice_core::{DebugEvent, DriverStatus, Error, Graph, Node, PermPair, Role, Root};
use sluice_jobs::commit::{self, CommitParams};
use sluice_jobs::stream::{self, StreamParams};
use sluice_jobs::{JobManager, JobOptions, JobStatus, OnError};
use std::sync::Arc;
use std::task::Poll;

fn backing(n: &Arc<Node>) -> Option<Arc<Node>> {
    n.child(Role::Backing)
}

fn same(a: &Arc<Node>, b: &Arc<Node>) -> bool {
    Arc::ptr_eq(a, b)
}

/// 64 guest writes through `guest`, seeded with `seed`, on a task of
/// their own; `model` keeps up.
fn spawn_writer(
    guest: &Arc<Root>,
    model: &Arc<parking_lot::Mutex<Vec<u8>>>,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    let (guest, model) = (guest.clone(), model.clone());
    tokio::spawn(async move {
        let mut rng = SmallRng::seed_from_u64(seed);
        guest_writes(&guest, MIB as usize, &mut rng, 64, |o, l, b| {
            model.lock()[o..o + l].fill(b)
        })
        .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_to_an_intermediate_base_while_the_guest_writes() {
    let seed = job_seed();
    let graph = Graph::new();
    let ([_base, m1, m2, top], m) = filled_chain(
        &graph,
        ["base", "m1", "m2", "top"],
        &[
            (0, 0, MIB as usize, 0x11),
            (1, 256 << 10, 256 << 10, 0x22),
            (2, 384 << 10, 256 << 10, 0x33),
            (3, 0, 64 << 10, 0x44),
        ],
    )
    .await;
    let model = Arc::new(parking_lot::Mutex::new(m));
    let guest = Arc::new(guest_on(&graph, &top).await);

    let jobs = JobManager::new(graph.clone());
    let mut rx = jobs.events().subscribe();
    let writer = spawn_writer(&guest, &model, seed);
    let job = stream::start(
        &jobs,
        JobOptions::new("s"),
        StreamParams::new(&top, Some(&m1)),
    )
    .await
    .unwrap();
    assert_eq!(job.wait_concluded().await, None, "seed {seed}");
    writer.await.unwrap();

    assert!(same(&backing(&top).unwrap(), &m1), "top now sits on m1");
    assert!(
        graph
            .nodes()
            .iter()
            .all(|n| n.driver_name() != "copy-on-read"),
        "filter gone"
    );
    assert!(
        matches!(
            top.block_status(512 << 10, 4096).await.unwrap(),
            DriverStatus::Data { .. }
        ),
        "m2's data was copied into top"
    );
    assert!(!m2.is_closed(), "a user-owned node stays");
    let want = model.lock().clone();
    assert_guest_view(&guest, &want, seed).await;
    let n = names(&mut rx);
    assert_eq!(n.last().map(String::as_str), Some("null"));
    assert!(n.contains(&"BLOCK_JOB_COMPLETED".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_on_disjoint_parts_of_one_chain() {
    let graph = Graph::new();
    let [a, b, c, d, e] = memory_chain(&graph, ["a", "b", "c", "d", "e"]).await;
    for (i, n) in [&a, &b, &c, &d, &e].into_iter().enumerate() {
        fill(
            &graph,
            n,
            (i as u64) * (128 << 10),
            192 << 10,
            0xA0 + i as u8,
        )
        .await;
    }
    let mut model = vec![0u8; MIB as usize];
    for i in 0..5usize {
        model[i * (128 << 10)..i * (128 << 10) + (192 << 10)].fill(0xA0 + i as u8);
    }
    let mut model_c = vec![0u8; MIB as usize];
    for i in 0..3usize {
        model_c[i * (128 << 10)..i * (128 << 10) + (192 << 10)].fill(0xA0 + i as u8);
    }
    let guest = guest_on(&graph, &e).await;
    let jobs = JobManager::new(graph.clone());
    let upper = stream::start(
        &jobs,
        JobOptions::new("upper"),
        StreamParams::new(&e, Some(&c)),
    )
    .await
    .unwrap();
    let lower = stream::start(
        &jobs,
        JobOptions::new("lower"),
        StreamParams::new(&c, Some(&a)),
    )
    .await
    .unwrap();
    assert_eq!(upper.wait_concluded().await, None);
    assert_eq!(lower.wait_concluded().await, None);
    assert!(same(&backing(&e).unwrap(), &c));
    assert!(same(&backing(&c).unwrap(), &a));
    assert_guest_view(&guest, &model, 0).await;
    let c_view = root_on(&graph, "c-view", &c, PermPair::reader())
        .await
        .unwrap();
    assert_guest_view(&c_view, &model_c, 0).await;
}

/// The job copies four 512 KiB steps at once: 4 MiB is two batches.
const BIG: u64 = 4 * MIB;

/// top ← mid (blkdebug) ← mid-img (data everywhere) ← base, `BIG` bytes.
async fn chain_with_blkdebug(graph: &Graph, inject: serde_json::Value) -> (Arc<Node>, Arc<Node>) {
    let w = graph.writer().await;
    dcommon::add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": BIG}),
    )
    .await;
    dcommon::add(
        &w,
        json!({"driver": "memory", "node-name": "mid-img", "size": BIG, "backing": "base"}),
    )
    .await;
    drop(w);
    let mid_img = graph.node("mid-img").unwrap();
    fill(graph, &mid_img, 0, BIG as usize, 0x5A).await;
    let w = graph.writer().await;
    let top = dcommon::add(&w, json!({
        "driver": "memory", "node-name": "top", "size": BIG,
        "backing": {"driver": "blkdebug", "node-name": "mid", "image": "mid-img", "inject-error": inject}
    })).await;
    (top, graph.node("mid").unwrap())
}

#[tokio::test]
async fn stream_cancelled_half_way_leaves_the_chain_and_data_as_they_were() {
    let graph = Graph::new();
    let (top, mid) = chain_with_blkdebug(&graph, json!([])).await;
    let guest = guest_on(&graph, &top).await;
    let jobs = JobManager::new(graph.clone());
    let mut rx = jobs.events().subscribe();
    // The job's first copy is parked in mid: cancel it there.
    stream_cancelled_at_its_first_copy(&jobs, &top, &mid).await;
    assert!(same(&backing(&top).unwrap(), &mid), "chain unchanged");
    assert!(!mid.is_closed());
    assert!(
        matches!(
            top.block_status(0, 4096).await.unwrap(),
            DriverStatus::Data { .. }
        ),
        "the first batch was copied"
    );
    assert!(
        matches!(
            top.block_status(BIG - 4096, 4096).await.unwrap(),
            DriverStatus::Unallocated { .. }
        ),
        "the last batch was not"
    );
    assert!(
        top.parents().iter().all(|e| e.parent().node().is_none()),
        "the filter is gone"
    );
    assert_guest_view(&guest, &vec![0x5A; BIG as usize], 0).await;
    assert_names(
        &mut rx,
        "created running aborting BLOCK_JOB_CANCELLED concluded null",
    );
}

#[tokio::test]
async fn stream_read_error_with_on_error_stop_then_resume_to_completion() {
    let graph = Graph::new();
    let (top, mid) = chain_with_blkdebug(
        &graph,
        json!([{"event": "read_backing_aio", "errno": 5, "once": true}]),
    )
    .await;
    let guest = guest_on(&graph, &top).await;
    let jobs = JobManager::new(graph.clone());
    let mut rx = jobs.events().subscribe();
    let mut o = JobOptions::new("s");
    o.on_error = OnError::Stop;
    let job = stream::start(&jobs, o, StreamParams::new(&top, None))
        .await
        .unwrap();
    job.wait_for(|s| s == JobStatus::Paused).await;
    assert_eq!(job.block_info()["io-status"], "failed");
    let evs = common::events(&mut rx);
    let err = evs
        .iter()
        .find(|e| e.name == "BLOCK_JOB_ERROR")
        .expect("an error event");
    assert_eq!(
        err.data,
        json!({"device": "s", "operation": "read", "action": "stop"})
    );
    job.resume().unwrap();
    assert_eq!(job.wait_concluded().await, None);
    assert!(backing(&top).is_none(), "streamed the whole chain");
    assert!(
        mid.is_closed(),
        "the implicit blkdebug node went with the chain"
    );
    assert_guest_view(&guest, &vec![0x5A; BIG as usize], 0).await;
}

/// The QEMU thread's race, as a job: a guest read is parked in `mid` when
/// the stream job prepares; the graph change waits, the read returns the
/// right bytes, the job completes.
#[tokio::test]
async fn stream_prepare_waits_for_a_read_parked_in_the_node_it_removes() {
    let (result, job_status) = seed_stream(false).await;
    let data = result.expect("the read succeeds");
    assert!(
        data.iter().all(|&b| b == 0xBB),
        "the read returns base's bytes"
    );
    assert_eq!(job_status, None, "the job completed");
}

/// Negative control: the same with the drain skipped. The change lands
/// while the read is parked, and the read runs into the closed node.
#[tokio::test]
async fn negative_control_stream_without_the_drain_tears_the_read() {
    let (result, _) = seed_stream(true).await;
    match result {
        Err(Error::NodeClosed { node }) => assert_eq!(node, "mid"),
        Ok(_) => panic!("the negative control lost its teeth: the read succeeded"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

async fn seed_stream(
    skip_drain: bool,
) -> (sluice_core::Result<sluice_core::IoBuf>, Option<String>) {
    let graph = Graph::new();
    let (top, mid, base) = seed_chain(&graph).await;
    let jobs = JobManager::new(graph.clone());
    let mut o = JobOptions::new("stream0");
    o.auto_finalize = false;
    let mut p = StreamParams::new(&top, Some(&base));
    p.skip_drain_for_negative_control = skip_drain;
    let job = stream::start(&jobs, o, p).await.unwrap();
    job.wait_for(|s| s == JobStatus::Pending).await;
    // A user that came after the job started (an export, say) reads top
    // directly, not through the job's copy-on-read filter.
    let guest = Arc::new(guest_on(&graph, &top).await);

    let ctl = mid.driver().debug_control().unwrap();
    ctl.set_breakpoint(DebugEvent::ReadBackingAio, "A").unwrap();
    let reader = {
        let guest = guest.clone();
        tokio::spawn(async move { guest.read(0, 65536).await })
    };
    ctl.wait_suspended("A").await;

    let mut fin = Box::pin(job.finalize());
    let first = poll!(&mut fin);
    let landed = first.is_ready();
    if skip_drain {
        assert!(
            matches!(first, Poll::Ready(Ok(()))),
            "without a drain the change lands at once"
        );
        assert!(mid.is_closed());
    } else {
        assert!(first.is_pending(), "prepare must wait for the parked read");
        assert!(top.quiesce_count() > 0, "top is being drained");
        assert_eq!(job.status(), JobStatus::Pending);
        assert!(
            same(&backing(&top).unwrap(), &mid),
            "graph unchanged while the read is in flight"
        );
    }
    ctl.resume("A").unwrap();
    let result = reader.await.unwrap();
    if !landed {
        fin.await.unwrap();
    }
    let status = job.wait_concluded().await;
    if !skip_drain {
        assert!(same(&backing(&top).unwrap(), &base));
        assert!(mid.is_closed() && graph.node("mid-img").is_err());
        let all = guest.read(0, 131072).await.unwrap();
        assert!(all[..65536].iter().all(|&b| b == 0xBB) && all[65536..].iter().all(|&b| b == 0));
    }
    (result, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_commit_while_the_guest_writes() {
    let seed = job_seed();
    let graph = Graph::new();
    let ([base, mid, top], m) = filled_chain(
        &graph,
        ["base", "mid", "top"],
        &[
            (0, 0, MIB as usize, 0x11),
            (1, 128 << 10, 512 << 10, 0x22),
            (2, 0, 64 << 10, 0x33),
        ],
    )
    .await;
    let model = Arc::new(parking_lot::Mutex::new(m));
    let guest = Arc::new(guest_on(&graph, &top).await);
    let jobs = JobManager::new(graph.clone());
    let writer = spawn_writer(&guest, &model, seed);
    let job = commit::start(
        &jobs,
        JobOptions::new("c"),
        CommitParams {
            top: mid.clone(),
            base: base.clone(),
            backing_file: None,
            filter_node_name: Some("commit-filter".into()),
        },
    )
    .await
    .unwrap();
    assert_eq!(job.wait_concluded().await, None, "seed {seed}");
    writer.await.unwrap();
    assert!(same(&backing(&top).unwrap(), &base), "top now sits on base");
    assert!(
        graph.node("commit-filter").is_err(),
        "the named filter is gone"
    );
    let want = model.lock().clone();
    assert_guest_view(&guest, &want, seed).await;
    let base_view = root_on(&graph, "base-view", &base, PermPair::reader())
        .await
        .unwrap();
    let b = base_view.read(0, MIB as usize).await.unwrap();
    assert!(
        b[128 << 10..640 << 10].iter().all(|&x| x == 0x22),
        "mid's data is in base"
    );
    assert!(
        b[..64 << 10].iter().all(|&x| x == 0x11),
        "top's data is not"
    );
}

/// `speed` holds a stream to its rate: on tokio's virtual clock, the
/// first 2 MiB batch at 256 KiB/s costs eight seconds before the next,
/// and without a limit no time passes at all.
#[tokio::test(start_paused = true)]
async fn speed_limits_the_rate_on_virtual_time() {
    for (speed, slow) in [(256u64 << 10, true), (0, false)] {
        let graph = Graph::new();
        let w = graph.writer().await;
        let base = dcommon::add(
            &w,
            json!({"driver": "memory", "node-name": "base", "size": BIG}),
        )
        .await;
        let top = dcommon::add(
            &w,
            json!({"driver": "memory", "node-name": "top", "size": BIG, "backing": "base"}),
        )
        .await;
        drop(w);
        fill(&graph, &base, 0, BIG as usize, 0x11).await;
        let jobs = JobManager::new(graph.clone());
        let mut o = JobOptions::new("s");
        o.speed = speed;
        let t0 = tokio::time::Instant::now();
        let job = stream::start(&jobs, o, StreamParams::new(&top, None))
            .await
            .unwrap();
        assert_eq!(job.wait_concluded().await, None);
        let took = t0.elapsed();
        if slow {
            assert!(
                took >= std::time::Duration::from_millis(1900),
                "took {took:?}"
            );
        } else {
            assert!(
                took < std::time::Duration::from_millis(100),
                "took {took:?}"
            );
        }
    }
}
