//! Backup: the target receives the disk as it was at the start while the
//! guest overwrites it (after QEMU's backup iotests).

mod common;
#[path = "../../drivers/tests/common/mod.rs"]
mod dcommon;

use common::{contents, names};
use dcommon::{add, fill, memory_chain, root_on, MIB};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde_json::json;
use sluice_core::{DriverStatus, Graph, IoBytes, Node, PermPair, WriteFlags};
use sluice_jobs::backup::{self, BackupParams};
use sluice_jobs::mirror::SyncMode;
use sluice_jobs::{JobManager, JobOptions, JobStatus};
use std::sync::Arc;

/// base (0x11) ← top (0x22 in [256K, 512K)), an empty target.
async fn setup(graph: &Graph) -> (Arc<Node>, Arc<Node>, Vec<u8>) {
    let [base, top] = memory_chain(graph, ["base", "top"]).await;
    fill(graph, &base, 0, MIB as usize, 0x11).await;
    fill(graph, &top, 256 << 10, 256 << 10, 0x22).await;
    let mut m = vec![0x11u8; MIB as usize];
    m[256 << 10..512 << 10].fill(0x22);
    (base, top, m)
}

/// The guest overwrites the disk while the job is parked before its
/// first copy: every overwritten cluster reaches the target through the
/// filter, with its old contents.
#[tokio::test]
async fn backup_full_is_point_in_time_while_the_guest_overwrites() {
    let seed: u64 = std::env::var("SLUICE_JOB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let graph = Graph::new();
    let (_base, top, at_start) = setup(&graph).await;
    let w = graph.writer().await;
    let target = add(
        &w,
        json!({"driver": "memory", "node-name": "target", "size": MIB}),
    )
    .await;
    drop(w);
    let guest = root_on(&graph, "guest", &top, PermPair::writer())
        .await
        .unwrap();
    let jobs = JobManager::new(graph.clone());
    let mut rx = jobs.events().subscribe();
    let job = backup::start(
        &jobs,
        JobOptions::new("b"),
        BackupParams::new(&top, &target, SyncMode::Full),
    )
    .await
    .unwrap();
    job.pause().unwrap();
    job.wait_for(|s| s == JobStatus::Paused).await; // parked before its first copy
    let mut now = at_start.clone();
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..48 {
        let len = rng.gen_range(1..=8) * 4096;
        let off = rng.gen_range(0..(MIB as usize - len) / 4096) * 4096;
        let byte: u8 = rng.gen();
        guest
            .write(
                off as u64,
                IoBytes::copy_from(&vec![byte; len]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        now[off..off + len].fill(byte);
    }
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
    let n = names(&mut rx);
    assert_eq!(
        n,
        [
            "created",
            "running",
            "paused",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
}

#[tokio::test]
async fn backup_sync_top_copies_only_the_top_layer() {
    let graph = Graph::new();
    let (_base, top, at_start) = setup(&graph).await;
    let w = graph.writer().await;
    let target = add(
        &w,
        json!({"driver": "memory", "node-name": "target", "size": MIB, "backing": "base"}),
    )
    .await;
    drop(w);
    let jobs = JobManager::new(graph.clone());
    let job = backup::start(
        &jobs,
        JobOptions::new("b"),
        BackupParams::new(&top, &target, SyncMode::Top),
    )
    .await
    .unwrap();
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
    let (_base, top, _at_start) = setup(&graph).await;
    let w = graph.writer().await;
    let target = add(
        &w,
        json!({"driver": "memory", "node-name": "target", "size": MIB}),
    )
    .await;
    drop(w);
    let guest = root_on(&graph, "guest", &top, PermPair::writer())
        .await
        .unwrap();
    let jobs = JobManager::new(graph.clone());
    let job = backup::start(
        &jobs,
        JobOptions::new("b"),
        BackupParams::new(&top, &target, SyncMode::None),
    )
    .await
    .unwrap();
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
