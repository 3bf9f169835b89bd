//! Transactions, permissions and drained sections on real driver nodes.

mod common;

use common::*;
use futures::poll;
use serde_json::json;
use sluice_core::{Error, Graph, GraphSnapshot, Perm, PermPair, Role};
use std::sync::Arc;
use std::task::Poll;

/// base ← mid ← top, a spare overlay `other` over base, a copy-on-read
/// filter `cor` over top (not yet inserted), and a guest root on top.
async fn fixture(graph: &Graph) -> sluice_core::Root {
    let w = graph.writer().await;
    add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": MIB}),
    )
    .await;
    add(
        &w,
        json!({"driver": "memory", "node-name": "mid", "size": MIB, "backing": "base"}),
    )
    .await;
    let top = add(
        &w,
        json!({"driver": "memory", "node-name": "top", "size": MIB, "backing": "mid"}),
    )
    .await;
    add(
        &w,
        json!({"driver": "memory", "node-name": "other", "size": MIB, "backing": "base"}),
    )
    .await;
    add(
        &w,
        json!({"driver": "copy-on-read", "node-name": "cor", "file": "top"}),
    )
    .await;
    drop(w);
    root_on(graph, "guest", &top, PermPair::writer())
        .await
        .unwrap()
}

/// One multi-step change: insert `cor` above `top`, point `top` at `other`,
/// drop `mid`'s backing, delete `mid`. Returns the primitive step count.
async fn big_change(graph: &Graph, fail_at: Option<usize>) -> (Result<(), Error>, usize) {
    let top = graph.node("top").unwrap();
    let cor = graph.node("cor").unwrap();
    let other = graph.node("other").unwrap();
    let mid = graph.node("mid").unwrap();
    let w = graph.writer().await;
    let all = w.drain_all().await;
    let mut tx = w.transaction();
    if let Some(k) = fail_at {
        tx.fail_at_step(k);
    }
    let applied = (|| {
        tx.insert_filter(&all, &top, &cor)?;
        tx.set_backing(&all, &top, Some(&other))?;
        tx.set_backing(&all, &mid, None)?;
        tx.delete_node(&all, &mid)
    })();
    let steps = tx.steps();
    let res = match applied {
        Ok(()) => tx.commit().await,
        Err(e) => Err(e),
    };
    (res, steps + 1)
}

#[tokio::test]
async fn a_failure_at_any_step_leaves_the_graph_identical() {
    // Count the steps of the successful change first.
    let graph = Graph::new();
    let _root = fixture(&graph).await;
    let (ok, steps) = big_change(&graph, None).await;
    ok.unwrap();
    assert!(steps >= 6, "a multi-step change ({steps} steps)");
    let after: GraphSnapshot = graph.snapshot();
    assert!(after.nodes["top"]
        .parents
        .iter()
        .any(|p| p.contains("'cor'")));
    assert!(!after.nodes.contains_key("mid"));

    for k in 0..steps {
        let graph = Graph::new();
        let _root = fixture(&graph).await;
        let before = graph.snapshot();
        let (res, _) = big_change(&graph, Some(k)).await;
        let err = res.expect_err("the injected failure must surface");
        assert!(err.to_string().contains(&format!("step {k}")), "{err}");
        assert_eq!(graph.snapshot(), before, "failure at step {k} left a trace");
        assert!(!graph.node("top").unwrap().is_closed() && !graph.node("mid").unwrap().is_closed());
        assert_eq!(
            graph.node("top").unwrap().quiesce_count(),
            0,
            "drains balanced after rollback at step {k}"
        );
    }
}

#[tokio::test]
async fn a_permission_conflict_at_commit_rolls_everything_back() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let a = add(
        &w,
        json!({"driver": "memory", "node-name": "a", "size": MIB}),
    )
    .await;
    let b = add(
        &w,
        json!({"driver": "memory", "node-name": "b", "size": MIB}),
    )
    .await;
    drop(w);
    let _ra = root_on(&graph, "disk-a", &a, PermPair::writer())
        .await
        .unwrap();
    let _rb = root_on(&graph, "disk-b", &b, PermPair::writer())
        .await
        .unwrap();
    let before = graph.snapshot();
    // Moving disk-a's users onto b would give b two exclusive writers.
    let w = graph.writer().await;
    let drained = w.drain(&a).await;
    let err = w.replace_node(&drained, &a, &b).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::PermissionConflict { .. }), "{msg}");
    assert!(
        msg.contains("block device 'disk-a'") && msg.contains("block device 'disk-b'"),
        "{msg}"
    );
    assert!(
        msg.contains("Conflicts with use by") && msg.contains("which does not allow 'write' on b"),
        "{msg}"
    );
    drop(drained);
    drop(w);
    assert_eq!(graph.snapshot(), before);
}

#[tokio::test]
async fn two_writers_on_one_node_are_refused_naming_both() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let n = add(
        &w,
        json!({"driver": "memory", "node-name": "disk", "size": MIB}),
    )
    .await;
    drop(w);
    let _first = root_on(&graph, "vda", &n, PermPair::writer())
        .await
        .unwrap();
    let before = graph.snapshot();
    let err = root_on(&graph, "vdb", &n, PermPair::writer())
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("block device 'vdb'") && msg.contains("block device 'vda' as 'root'"),
        "{msg}"
    );
    assert!(
        msg.contains("which does not allow 'write' on disk"),
        "{msg}"
    );
    assert_eq!(graph.snapshot(), before, "refused root left no edge");
    // A reader that shares everything can still join.
    root_on(&graph, "reader", &n, PermPair::reader_sharing_all())
        .await
        .unwrap();
    // ...but a reader that does not tolerate writers cannot.
    let err = root_on(&graph, "strict", &n, PermPair::reader())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("'write'"), "{err}");
}

#[tokio::test]
async fn a_read_only_node_refuses_a_writer() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let n = add(
        &w,
        json!({"driver": "memory", "node-name": "ro", "size": MIB, "read-only": true}),
    )
    .await;
    drop(w);
    let err = root_on(&graph, "vda", &n, PermPair::writer())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
    assert!(
        err.to_string().contains("Block node is read-only") && err.to_string().contains("'vda'"),
        "{err}"
    );
    root_on(&graph, "viewer", &n, PermPair::reader())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_format_over_a_read_only_file_cannot_be_written() {
    let graph = Graph::new();
    let w = graph.writer().await;
    add(
        &w,
        json!({"driver": "memory", "node-name": "img", "size": MIB, "read-only": true}),
    )
    .await;
    let raw = add(
        &w,
        json!({"driver": "raw", "node-name": "fmt", "file": "img"}),
    )
    .await;
    drop(w);
    let err = root_on(&graph, "vda", &raw, PermPair::writer())
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("read-only") && err.to_string().contains("img"),
        "{err}"
    );
}

#[tokio::test]
async fn drains_nest_and_queued_requests_hold_no_in_flight_count() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let n = add(
        &w,
        json!({"driver": "memory", "node-name": "disk", "size": MIB}),
    )
    .await;
    drop(w);
    let root = Arc::new(
        root_on(&graph, "vda", &n, PermPair::writer())
            .await
            .unwrap(),
    );
    let w = graph.writer().await;
    let d1 = w.drain(&n).await;
    let d2 = w.drain(&n).await;
    assert_eq!(n.quiesce_count(), 2);
    let mut queued = Box::pin({
        let root = root.clone();
        async move { root.read(0, 512).await }
    });
    assert!(
        matches!(poll!(&mut queued), Poll::Pending),
        "a request queues at a drained root"
    );
    assert_eq!(
        root.in_flight(),
        0,
        "a queued request holds no in-flight count"
    );
    // A third drain does not wait on the queued request.
    let d3 = w.drain(&n).await;
    drop(d3);
    drop(d2);
    assert!(
        matches!(poll!(&mut queued), Poll::Pending),
        "still drained by the outer section"
    );
    drop(d1);
    let buf = queued.await.unwrap();
    assert_eq!(buf.len(), 512);
    assert_eq!(n.quiesce_count(), 0);
}

#[tokio::test]
async fn draining_a_node_does_not_drain_its_children() {
    let graph = Graph::new();
    let [base, top] = memory_chain(&graph, ["base", "top"]).await;
    let base_root = root_on(&graph, "base-user", &base, PermPair::reader_sharing_all())
        .await
        .unwrap();
    let top_root = root_on(&graph, "top-user", &top, PermPair::writer())
        .await
        .unwrap();
    let w = graph.writer().await;
    let d = w.drain(&top).await;
    assert!(top_root.is_quiesced());
    assert!(!base_root.is_quiesced(), "a child's other users keep going");
    base_root.read(0, 4096).await.unwrap();
    drop(d);
    let d = w.drain(&base).await;
    assert!(
        top_root.is_quiesced() && base_root.is_quiesced(),
        "draining a node quiesces all its parents"
    );
    drop(d);
}

#[tokio::test]
async fn a_root_attached_to_a_drained_node_starts_quiesced() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let n = add(
        &w,
        json!({"driver": "memory", "node-name": "disk", "size": MIB}),
    )
    .await;
    let d = w.drain(&n).await;
    let late = w
        .add_root("export", "late", &n, PermPair::writer())
        .await
        .unwrap();
    assert!(late.is_quiesced());
    drop(d);
    assert!(!late.is_quiesced());
}

#[tokio::test]
async fn drain_all_quiesces_every_root() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let a = add(&w, json!({"driver": "null-co", "node-name": "a"})).await;
    let b = add(
        &w,
        json!({"driver": "memory", "node-name": "b", "size": MIB}),
    )
    .await;
    drop(w);
    let ra = root_on(&graph, "ra", &a, PermPair::writer()).await.unwrap();
    let rb = root_on(&graph, "rb", &b, PermPair::writer()).await.unwrap();
    let w = graph.writer().await;
    let all = w.drain_all().await;
    assert!(ra.is_quiesced() && rb.is_quiesced());
    drop(all);
    assert!(!ra.is_quiesced() && !rb.is_quiesced());
}

#[tokio::test]
async fn filters_insert_and_drop_around_a_node() {
    let graph = Graph::new();
    let [base, top] = memory_chain(&graph, ["base", "top"]).await;
    fill(&graph, &base, 0, 8192, 0x5A).await;
    let root = root_on(&graph, "vda", &top, PermPair::writer())
        .await
        .unwrap();
    let w = graph.writer().await;
    let cor = add(
        &w,
        json!({"driver": "copy-on-read", "node-name": "cor", "file": "top"}),
    )
    .await;
    let d = w.drain(&top).await;
    w.insert_filter(&d, &top, &cor).await.unwrap();
    drop(d);
    drop(w);
    assert_eq!(root.node().name(), "cor");
    let data = root.read(0, 8192).await.unwrap();
    assert!(data.iter().all(|&b| b == 0x5A));
    // The read was copied into top.
    let st = top.block_status(0, 8192).await.unwrap();
    assert!(
        matches!(st, sluice_core::DriverStatus::Data { .. }),
        "{st:?}"
    );
    let w = graph.writer().await;
    let d = w.drain(&cor).await;
    w.drop_filter(&d, &cor).await.unwrap();
    drop(d);
    assert_eq!(root.node().name(), "top");
    assert!(cor.is_closed() && graph.node("cor").is_err());
}

#[tokio::test]
async fn loops_and_nodes_in_use_are_refused() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let base = add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": MIB}),
    )
    .await;
    let top = add(
        &w,
        json!({"driver": "memory", "node-name": "top", "size": MIB, "backing": "base"}),
    )
    .await;
    let d = w.drain(&base).await;
    let err = w.set_backing(&d, &base, Some(&top)).await.unwrap_err();
    assert!(err.to_string().contains("loop"), "{err}");
    drop(d);
    let d = w.drain(&base).await;
    let err = w.delete_node(&d, &base).await.unwrap_err();
    assert!(
        err.to_string().contains("used as 'backing' by node 'top'"),
        "{err}"
    );
    drop(d);
    let d = w.drain(&top).await;
    w.delete_node(&d, &top).await.unwrap();
    drop(d);
    let d = w.drain(&base).await;
    w.delete_node(&d, &base).await.unwrap();
    drop(d);
    assert!(graph.nodes().is_empty());
    assert_eq!(Role::Backing.name(), "backing");
    let _ = Perm::ALL;
}

#[tokio::test]
async fn deleting_a_node_flushes_it_through_its_children_first() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let img = add(
        &w,
        json!({"driver": "memory", "node-name": "img", "size": MIB}),
    )
    .await;
    let fmt = add(
        &w,
        json!({"driver": "raw", "node-name": "fmt", "file": "img"}),
    )
    .await;
    let d = w.drain(&fmt).await;
    w.delete_node(&d, &fmt).await.unwrap();
    drop(d);
    assert_eq!(
        sluice_core::stats::IoStats::get(&img.stats().flush_operations),
        1,
        "the format's flush reached its file before it was detached"
    );
    assert!(img.parents().is_empty() && fmt.is_closed());
}

/// A drain of `mid` covers `top` above it. The first step of
/// `set_backing(top, base)` cuts the path top → mid that quiesced top;
/// the transaction still holds top quiesced until it ends, so a queued
/// guest request cannot run into the half-done change. (Found by the
/// commit job on qcow2 files: a guest write released mid-transaction
/// saw top with no backing and copied zeroes.)
#[tokio::test]
async fn a_change_keeps_the_changed_node_quiesced_after_cutting_its_drained_path() {
    let graph = Graph::new();
    let [base, mid, top] = memory_chain(&graph, ["base", "mid", "top"]).await;
    let root = guest_on(&graph, &top).await;
    let w = graph.writer().await;
    let drained = w.drain(&mid).await;
    assert!(root.is_quiesced());
    let mut tx = w.transaction();
    tx.set_backing(&drained, &top, Some(&base)).unwrap();
    assert!(
        Arc::ptr_eq(&top.child(Role::Backing).unwrap(), &base),
        "the step is applied"
    );
    assert!(
        root.is_quiesced(),
        "the guest must stay queued until the transaction ends"
    );
    tx.commit().await.unwrap();
    drop(drained);
    drop(w);
    assert!(!root.is_quiesced());
    assert_eq!(top.quiesce_count(), 0);
    assert_eq!(mid.quiesce_count(), 0);
}

/// Negative control of the test above: without the pin, the same step
/// releases the guest while the transaction is still open.
#[tokio::test]
async fn negative_control_without_the_pin_the_cut_path_releases_the_guest() {
    let graph = Graph::new();
    let [base, mid, top] = memory_chain(&graph, ["base", "mid", "top"]).await;
    let root = guest_on(&graph, &top).await;
    let w = graph.writer().await;
    let drained = w.drain(&mid).await;
    let mut tx = w.transaction();
    tx.skip_pins_for_negative_control();
    tx.set_backing(&drained, &top, Some(&base)).unwrap();
    assert!(
        !root.is_quiesced(),
        "the negative control lost its teeth: the guest stayed queued without the pin"
    );
    drop(tx);
    drop(drained);
}
