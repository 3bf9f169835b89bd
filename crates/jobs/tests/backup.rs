//! Backup: the target receives the disk as it was at the start while the
//! guest overwrites it (after QEMU's backup iotests).

mod common;
#[path = "../../drivers/tests/common/mod.rs"]
mod dcommon;

use common::{assert_names, contents, job_seed, writes_into};
use dcommon::{base_top, guest_on, memory_node, MIB};
use rand::{rngs::SmallRng, SeedableRng};
use sluice_core::{DriverStatus, Graph, IoBytes, Node, WriteFlags};
use sluice_jobs::backup::{self, BackupParams};
use sluice_jobs::mirror::SyncMode;
use sluice_jobs::{JobManager, JobOptions, JobStatus};
use std::sync::Arc;

/// Starts a backup of `top` onto `target` as job `b`.
async fn start_backup(
    jobs: &JobManager,
    top: &Arc<Node>,
    target: &Arc<Node>,
    sync: SyncMode,
) -> Arc<sluice_jobs::Job> {
    backup::start(
        jobs,
        JobOptions::new("b"),
        BackupParams::new(top, target, sync),
    )
    .await
    .unwrap()
}

/// The guest overwrites the disk while the job is parked before its
/// first copy: every overwritten cluster reaches the target through the
/// filter, with its old contents.
#[tokio::test]
async fn backup_full_is_point_in_time_while_the_guest_overwrites() {
    let seed = job_seed();
    let graph = Graph::new();
    let (_base, top, at_start) = base_top(&graph).await;
    let target = memory_node(&graph, "target", None).await;
    let guest = guest_on(&graph, &top).await;
    let jobs = JobManager::new(graph.clone());
    let mut rx = jobs.events().subscribe();
    let job = start_backup(&jobs, &top, &target, SyncMode::Full).await;
    job.pause().unwrap();
    job.wait_for(|s| s == JobStatus::Paused).await; // parked before its first copy
    let mut now = at_start.clone();
    let mut rng = SmallRng::seed_from_u64(seed);
    writes_into(&guest, &mut rng, 48, &mut now).await;
    assert_eq!(job.progress().0, 0, "the job itself has not copied yet");
    job.resume().unwrap();
    assert_eq!(job.wait_concluded().await, None, "seed {seed}");
    let t = contents(&graph, &target).await;
    if let Some(i) = (0..t.len()).find(|&i| t[i] != at_start[i]) {
        panic!(
            "seed {seed}: target byte {i} is {:#x}; at the start it was {:#x}",
            t[i], at_start[i]
        );
    }
    assert_eq!(
        guest.read(0, MIB as usize).await.unwrap().to_vec(),
        now,
        "the guest sees its writes"
    );
    assert!(graph
        .nodes()
        .iter()
        .all(|n| n.driver_name() != "copy-before-write"));
    assert_names(
        &mut rx,
        "created running paused running waiting pending BLOCK_JOB_COMPLETED concluded null",
    );
}

#[tokio::test]
async fn backup_sync_top_copies_only_the_top_layer() {
    let graph = Graph::new();
    let (_base, top, at_start) = base_top(&graph).await;
    let target = memory_node(&graph, "target", Some("base")).await;
    let jobs = JobManager::new(graph.clone());
    let job = start_backup(&jobs, &top, &target, SyncMode::Top).await;
    assert_eq!(job.wait_concluded().await, None);
    assert_eq!(contents(&graph, &target).await, at_start);
    assert!(matches!(
        target.block_status(0, 4096).await.unwrap(),
        DriverStatus::Unallocated { .. }
    ));
    assert!(matches!(
        target.block_status(256 << 10, 4096).await.unwrap(),
        DriverStatus::Data { .. }
    ));
}

/// `sync: none` (image fleecing): only clusters the guest overwrites are
/// saved; the job runs until cancelled.
#[tokio::test]
async fn backup_sync_none_saves_only_overwritten_clusters() {
    let graph = Graph::new();
    let (_base, top, _at_start) = base_top(&graph).await;
    let target = memory_node(&graph, "target", None).await;
    let guest = guest_on(&graph, &top).await;
    let jobs = JobManager::new(graph.clone());
    let job = start_backup(&jobs, &top, &target, SyncMode::None).await;
    guest
        .write(
            300 << 10,
            IoBytes::copy_from(&[0x99; 4096]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    job.wait_for(|s| s == JobStatus::Running).await;
    job.cancel(true).await.unwrap();
    assert_eq!(
        job.wait_concluded().await.as_deref(),
        Some("Operation canceled")
    );
    let t = contents(&graph, &target).await;
    // The 64 KiB cluster around the write holds the old data, nothing else.
    assert!(t[256 << 10..320 << 10].iter().all(|&b| b == 0x22));
    assert!(t[..256 << 10].iter().all(|&b| b == 0) && t[320 << 10..].iter().all(|&b| b == 0));
}
