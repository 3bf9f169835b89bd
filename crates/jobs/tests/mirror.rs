//! Mirror and active commit (after QEMU's iotests 041 and 040), with the
//! guest writing against a model the whole time.

mod common;
#[path = "../../drivers/tests/common/mod.rs"]
mod dcommon;

use common::{
    assert_guest_view, assert_names, assert_same, contents, names, seeded_rng,
    writes_around_ready_then_complete, writes_into,
};
use dcommon::{base_top, filled_chain, guest_on, memory_node, MIB};
use sluice_core::{Graph, IoBytes, Node, Root, WriteFlags};
use sluice_jobs::mirror::{self, CopyMode, MirrorParams, SyncMode};
use sluice_jobs::{JobManager, JobOptions, JobStatus};
use std::sync::Arc;

/// base (0x11 everywhere) ← top (0x22 in its second quarter), a guest on
/// top, and an empty target.
async fn setup(graph: &Graph) -> (Arc<Node>, Arc<Node>, Arc<Node>, Root, Vec<u8>) {
    let (base, top, m) = base_top(graph).await;
    let target = memory_node(graph, "target", None).await;
    let guest = guest_on(graph, &top).await;
    (base, top, target, guest, m)
}

/// Starts a mirror of `top` onto `target` as job `m`.
async fn start_mirror(
    jobs: &JobManager,
    top: &Arc<Node>,
    target: &Arc<Node>,
    sync: SyncMode,
) -> Arc<sluice_jobs::Job> {
    mirror::start(
        jobs,
        JobOptions::new("m"),
        MirrorParams::new(top, target, sync),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_full_ready_then_complete_while_writing() {
    let (seed, mut rng) = seeded_rng();
    let graph = Graph::new();
    let (_base, top, target, guest, mut model) = setup(&graph).await;
    let jobs = JobManager::new(graph.clone());
    let mut rx = jobs.events().subscribe();
    let job = start_mirror(&jobs, &top, &target, SyncMode::Full).await;
    writes_around_ready_then_complete(&job, &guest, &mut rng, 32, &mut model, seed).await;
    assert!(
        Arc::ptr_eq(&guest.node(), &target),
        "the guest now writes to the target"
    );
    assert!(graph
        .nodes()
        .iter()
        .all(|n| n.driver_name() != "mirror_top"));
    assert_guest_view(&guest, &model, seed).await;
    assert_same(&contents(&graph, &target).await, &model, "target", seed);
    assert_names(
        &mut rx,
        "created running ready BLOCK_JOB_READY waiting pending BLOCK_JOB_COMPLETED concluded null",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_cancel_after_ready_leaves_a_consistent_copy_unpivoted() {
    let (seed, mut rng) = seeded_rng();
    let graph = Graph::new();
    let (_base, top, target, guest, mut model) = setup(&graph).await;
    let jobs = JobManager::new(graph.clone());
    let mut rx = jobs.events().subscribe();
    let job = start_mirror(&jobs, &top, &target, SyncMode::Full).await;
    job.wait_for(|s| s == JobStatus::Ready).await;
    writes_into(&guest, &mut rng, 48, &mut model).await;
    job.cancel(false).await.unwrap();
    assert_eq!(
        job.wait_concluded().await,
        None,
        "a soft cancel is a success"
    );
    assert!(Arc::ptr_eq(&guest.node(), &top), "no pivot");
    assert_same(&contents(&graph, &target).await, &model, "target", seed);
    let n = names(&mut rx);
    assert!(
        n.contains(&"BLOCK_JOB_COMPLETED".into()) && !n.contains(&"BLOCK_JOB_CANCELLED".into()),
        "{n:?}"
    );
}

/// With `write-blocking`, a guest write reaches the target before it
/// completes, even while the job itself is paused. In `background` mode
/// the same write waits for the job: the check tells the modes apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_blocking_mode_writes_through_to_the_target() {
    for mode in [CopyMode::WriteBlocking, CopyMode::Background] {
        let graph = Graph::new();
        let (_base, top, target, guest, _model) = setup(&graph).await;
        let jobs = JobManager::new(graph.clone());
        let mut p = MirrorParams::new(&top, &target, SyncMode::Full);
        p.copy_mode = mode;
        let job = mirror::start(&jobs, JobOptions::new("m"), p).await.unwrap();
        job.wait_for(|s| s == JobStatus::Ready).await;
        job.pause().unwrap();
        job.kick();
        job.wait_for(|s| s == JobStatus::Standby).await;
        guest
            .write(
                8192,
                IoBytes::copy_from(&[0xEE; 4096]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        let t = contents(&graph, &target).await;
        let through = t[8192..12288].iter().all(|&b| b == 0xEE);
        assert_eq!(through, mode == CopyMode::WriteBlocking, "{mode:?}");
        job.resume().unwrap();
        job.wait_for(|s| s == JobStatus::Ready).await;
        job.complete().unwrap();
        assert_eq!(job.wait_concluded().await, None);
        assert!(contents(&graph, &target).await[8192..12288]
            .iter()
            .all(|&b| b == 0xEE));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_sync_top_onto_a_target_sharing_the_base() {
    let graph = Graph::new();
    let (_base, top, _t, guest, mut model) = setup(&graph).await;
    let target = memory_node(&graph, "target2", Some("base")).await;
    let jobs = JobManager::new(graph.clone());
    let job = start_mirror(&jobs, &top, &target, SyncMode::Top).await;
    job.wait_for(|s| s == JobStatus::Ready).await;
    guest
        .write(
            768 << 10,
            IoBytes::copy_from(&[0x44; 4096]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    model[768 << 10..(768 << 10) + 4096].fill(0x44);
    job.complete().unwrap();
    assert_eq!(job.wait_concluded().await, None);
    assert!(Arc::ptr_eq(&guest.node(), &target));
    assert_guest_view(&guest, &model, 0).await;
    // Only top's layer and the new write were copied: base's part stays
    // base's, unallocated in the target.
    for (off, copied) in [
        (0, false),
        (256 << 10, true),
        (768 << 10, true),
        (900 << 10, false),
    ] {
        let st = target.block_status(off, 4096).await.unwrap();
        let unalloc = matches!(st, sluice_core::DriverStatus::Unallocated { .. });
        assert_eq!(!unalloc, copied, "offset {off}: {st:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_sync_none_copies_only_new_writes() {
    let graph = Graph::new();
    let (_base, top, target, guest, _model) = setup(&graph).await;
    let jobs = JobManager::new(graph.clone());
    let job = start_mirror(&jobs, &top, &target, SyncMode::None).await;
    job.wait_for(|s| s == JobStatus::Ready).await;
    guest
        .write(0, IoBytes::copy_from(&[0x77; 4096]), WriteFlags::default())
        .await
        .unwrap();
    job.cancel(false).await.unwrap();
    job.wait_concluded().await;
    let t = contents(&graph, &target).await;
    assert!(
        t[..4096].iter().all(|&b| b == 0x77),
        "the new write was copied"
    );
    assert!(
        t[256 << 10..512 << 10].iter().all(|&b| b == 0),
        "old data was not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_commit_pivots_the_guest_onto_the_base() {
    let (seed, mut rng) = seeded_rng();
    let graph = Graph::new();
    let ([base, mid, top], mut model) = filled_chain(
        &graph,
        ["base", "mid", "top"],
        &[
            (0, 0, MIB as usize, 0x11),
            (1, 128 << 10, 256 << 10, 0x22),
            (2, 512 << 10, 128 << 10, 0x33),
        ],
    )
    .await;
    let guest = guest_on(&graph, &top).await;
    let jobs = JobManager::new(graph.clone());
    let mut rx = jobs.events().subscribe();
    let job = mirror::start_active_commit(&jobs, JobOptions::new("c"), &top, &base, None)
        .await
        .unwrap();
    assert_eq!(job.job_type(), "commit");
    writes_around_ready_then_complete(&job, &guest, &mut rng, 16, &mut model, seed).await;
    assert!(Arc::ptr_eq(&guest.node(), &base), "the guest now uses base");
    assert_guest_view(&guest, &model, seed).await;
    let n = names(&mut rx);
    assert!(n.contains(&"BLOCK_JOB_READY".into()) && n.contains(&"BLOCK_JOB_COMPLETED".into()));
    drop(mid);
}
