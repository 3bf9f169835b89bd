//! The `throttle` filter on tokio's paused clock: requests take at least
//! the (virtual) time their group's limits imply, nodes of one group share
//! them, bursts go at once, no limit means no wait, and a drain lets
//! queued requests through instead of waiting for the limits.

mod common;

use common::*;
use futures::future::join_all;
use serde_json::{json, Value};
use sluice_core::{Graph, IoBuf, IoBytes, Node, PermPair, Root, WriteFlags};
use sluice_drivers::filter::throttle::{create_group, remove_group, RemoveError, ThrottleConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Creates group `name` (names are process-wide: each test has its own).
fn group(name: &str, limits: Value) {
    let mut cfg = ThrottleConfig::default();
    cfg.apply_limits(limits.as_object().unwrap(), "limits.", false)
        .unwrap();
    create_group(name, cfg).expect("group names are unique per test");
}

/// A throttle node `name` in `group` over a fresh 1 MiB memory node, with
/// a guest root on it.
async fn throttled(graph: &Graph, name: &str, group: &str) -> (Arc<Node>, Root) {
    let w = graph.writer().await;
    let node = add(
        &w,
        json!({"driver": "throttle", "node-name": name, "throttle-group": group,
               "file": {"driver": "memory", "size": MIB}}),
    )
    .await;
    let root = w
        .add_root("block device", name, &node, PermPair::writer())
        .await
        .unwrap();
    (node, root)
}

/// Issues `n` reads of `len` bytes at once; returns when each finished,
/// counted from the start.
async fn reads(root: &Root, n: usize, len: usize) -> Vec<Duration> {
    let start = Instant::now();
    join_all((0..n).map(|i| async move {
        root.read((i * len) as u64 % MIB, len).await.unwrap();
        start.elapsed()
    }))
    .await
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[tokio::test(start_paused = true)]
async fn iops_limit_spaces_requests() {
    group("t-iops", json!({"iops-total": 10}));
    let graph = Graph::new();
    let (_node, root) = throttled(&graph, "t", "t-iops").await;
    let done = reads(&root, 21, 512).await;
    let last = *done.iter().max().unwrap();
    // 21 operations at 10/s, with a bucket of avg/10 = 1 operation: the
    // last may start once the bucket holds at most 1, i.e. after 1.9 s.
    assert!(last >= secs(1.9), "21 requests at 10 iops took {last:?}");
    assert!(last < secs(2.5), "throttled too much: {last:?}");
}

#[tokio::test(start_paused = true)]
async fn bps_limit_counts_bytes_of_writes() {
    group("t-bps", json!({"bps-write": MIB}));
    let graph = Graph::new();
    let (_node, root) = throttled(&graph, "t", "t-bps").await;
    let start = Instant::now();
    join_all((0..16u64).map(|i| {
        let root = &root;
        async move {
            root.write(
                i * 65536,
                IoBytes::copy_from(&[0x5a; 65536]),
                WriteFlags::default(),
            )
            .await
            .unwrap()
        }
    }))
    .await;
    let t = start.elapsed();
    // 1 MiB at 1 MiB/s with a bucket of 0.1 MiB: the last 64 KiB write
    // starts when at most 0.1 MiB is left of the 15 before it.
    let bound = (15.0 * 65536.0 - 0.1 * MIB as f64) / MIB as f64;
    assert!(t >= secs(bound), "took {t:?}, expected at least {bound} s");
    // Reads are not limited by a write limit.
    let done = reads(&root, 16, 65536).await;
    assert_eq!(*done.iter().max().unwrap(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn iops_size_counts_large_requests_as_several() {
    group("t-size", json!({"iops-total": 10, "iops-size": 4096}));
    let graph = Graph::new();
    let (_node, root) = throttled(&graph, "t", "t-size").await;
    // 11 reads of 16 KiB count as 44 operations.
    let last = *reads(&root, 11, 16384).await.iter().max().unwrap();
    assert!(last >= secs((40.0 - 1.0) / 10.0), "took {last:?}");
}

#[tokio::test(start_paused = true)]
async fn nodes_of_one_group_share_its_limits_fairly() {
    group("t-shared", json!({"iops-total": 10}));
    let graph = Graph::new();
    let (_a, ra) = throttled(&graph, "a", "t-shared").await;
    let (_b, rb) = throttled(&graph, "b", "t-shared").await;
    let (da, db) = tokio::join!(reads(&ra, 10, 512), reads(&rb, 10, 512));
    let (la, lb) = (*da.iter().max().unwrap(), *db.iter().max().unwrap());
    // 20 operations at 10/s in all: 1.8 s at least, where each alone would
    // have needed 0.8 s.
    assert!(la.max(lb) >= secs(1.8), "a: {la:?}, b: {lb:?}");
    // Round-robin: `a` had a head start of the two operations the bucket
    // let go at once, but is not served to the end first (first come,
    // first served would finish `a` at 0.8 s and `b` at 1.8 s).
    let gap = la.abs_diff(lb);
    assert!(gap <= secs(0.3), "a: {la:?}, b: {lb:?}");
}

#[tokio::test(start_paused = true)]
async fn a_burst_goes_at_once_then_the_average_holds() {
    group(
        "t-burst",
        json!({"iops-total": 10, "iops-total-max": 100, "iops-total-max-length": 1}),
    );
    let graph = Graph::new();
    let (_node, root) = throttled(&graph, "t", "t-burst").await;
    // The bucket holds max * max-length = 100 operations.
    let done = reads(&root, 100, 512).await;
    assert_eq!(*done.iter().max().unwrap(), Duration::ZERO);
    // Full now: 10 more take about a second.
    let last = *reads(&root, 10, 512).await.iter().max().unwrap();
    assert!(last >= secs(0.9), "took {last:?}");
}

#[tokio::test(start_paused = true)]
async fn a_long_burst_is_held_to_its_burst_rate() {
    // A 2 s burst at 50/s: the main bucket holds 100 operations, and a
    // second bucket of max/10 = 5 leaking at 50/s keeps the burst rate.
    group(
        "t-long-burst",
        json!({"iops-total": 10, "iops-total-max": 50, "iops-total-max-length": 2}),
    );
    let graph = Graph::new();
    let (_node, root) = throttled(&graph, "t", "t-long-burst").await;
    let last = *reads(&root, 100, 512).await.iter().max().unwrap();
    assert!(last >= secs((100.0 - 1.0 - 5.0) / 50.0), "took {last:?}");
    assert!(
        last < secs(2.5),
        "the burst was throttled to the average: {last:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn no_limit_means_no_wait() {
    group("t-none", json!({}));
    let graph = Graph::new();
    let (_node, root) = throttled(&graph, "t", "t-none").await;
    let done = reads(&root, 1000, 4096).await;
    assert_eq!(*done.iter().max().unwrap(), Duration::ZERO);
}

/// Five 512-byte reads through `root` on tasks of their own, returned
/// once four of them are in flight in the filter `node` (at 1 iops, the
/// first goes at once and the others queue).
async fn five_reads_four_queued(
    root: &Arc<Root>,
    node: &Arc<Node>,
) -> Vec<tokio::task::JoinHandle<IoBuf>> {
    let tasks: Vec<_> = (0..5u64)
        .map(|i| {
            let root = root.clone();
            tokio::spawn(async move { root.read(i * 512, 512).await.unwrap() })
        })
        .collect();
    while node.in_flight() < 4 {
        tokio::task::yield_now().await;
    }
    tasks
}

#[tokio::test(start_paused = true)]
async fn a_drain_lets_queued_requests_through() {
    group("t-drain", json!({"iops-total": 1}));
    let graph = Graph::new();
    let (node, root) = throttled(&graph, "t", "t-drain").await;
    let root = Arc::new(root);
    // The first goes at once; the other four queue in the filter, in flight.
    let tasks = five_reads_four_queued(&root, &node).await;
    let start = Instant::now();
    {
        let w = graph.writer().await;
        let _drained = w.drain(&node).await;
        // At 1 iops the queue would need 4 s; the drain releases it at
        // once (no timer runs: virtual time does not move).
        assert_eq!(start.elapsed(), Duration::ZERO, "the drain waited");
        assert_eq!(node.in_flight(), 0);
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The requests let through were counted: the next one waits again.
    let start = Instant::now();
    root.read(0, 512).await.unwrap();
    assert!(start.elapsed() >= secs(1.0), "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn new_limits_apply_to_queued_requests() {
    group("t-reconfig", json!({"iops-total": 1}));
    let graph = Graph::new();
    let (node, root) = throttled(&graph, "t", "t-reconfig").await;
    let root = Arc::new(root);
    let tasks = five_reads_four_queued(&root, &node).await;
    // `qom-set ... limits`: lifting the limit lets the queue go at once
    // rather than at the old pace (4 s).
    let start = Instant::now();
    let g = sluice_drivers::filter::throttle::find_group("t-reconfig").unwrap();
    g.set_config(ThrottleConfig::default());
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_group_in_use_cannot_be_removed() {
    group("t-use", json!({"iops-total": 100}));
    let graph = Graph::new();
    let (node, root) = throttled(&graph, "t", "t-use").await;
    assert_eq!(remove_group("t-use"), Err(RemoveError::InUse));
    drop(root);
    let w = graph.writer().await;
    let drained = w.drain(&node).await;
    w.delete_node(&drained, &node).await.unwrap();
    drop(drained);
    drop(w);
    assert_eq!(remove_group("t-use"), Ok(()));
    assert_eq!(remove_group("t-use"), Err(RemoveError::NotFound));
}

#[tokio::test]
async fn bad_options_get_qemus_errors() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let err = |opts: Value| {
        let w = &w;
        async move {
            sluice_drivers::blockdev_add(w, opts)
                .await
                .unwrap_err()
                .to_string()
        }
    };
    assert_eq!(
        err(json!({"driver": "throttle", "file": {"driver": "null-co"}})).await,
        "Parameter 'throttle-group' is missing"
    );
    assert_eq!(
        err(json!({"driver": "throttle", "throttle-group": "t-nope",
                   "file": {"driver": "null-co"}}))
        .await,
        "Throttle group 't-nope' does not exist"
    );
    // The nested child opened for the failed node went again.
    assert!(graph.nodes().is_empty());
}
