//! The race from the QEMU thread, made deterministic.
//!
//! A read through `top` needs data from `base`. It is parked by a blkdebug
//! breakpoint in `mid` (the node the stream job removes), after `top` has
//! picked its backing edge and before it reads through it. Then
//! `set_backing(top, base)` starts: `mid` loses its last user and is closed.
//!
//! With the drain, the change waits for the read, the read returns base's
//! bytes, then the change lands. The negative control skips the drain: the
//! change lands at once and the parked read, resumed, runs into the closed
//! node — the torn graph the QEMU reporter saw as a NULL backing pointer.

mod common;

use common::*;
use futures::poll;
use sluice_core::{DebugEvent, Error, Graph, PermPair, Role};
use std::sync::Arc;
use std::task::Poll;

#[tokio::test]
async fn set_backing_waits_for_the_parked_read_and_the_read_sees_the_old_chain() {
    let graph = Graph::new();
    let (top, mid, base) = seed_chain(&graph).await;
    let root = Arc::new(
        root_on(&graph, "guest", &top, PermPair::writer())
            .await
            .unwrap(),
    );

    let ctl = mid.driver().debug_control().expect("mid is blkdebug");
    ctl.set_breakpoint(DebugEvent::ReadBackingAio, "A").unwrap();
    let reader = {
        let root = root.clone();
        tokio::spawn(async move { root.read(0, 65536).await })
    };
    ctl.wait_suspended("A").await;
    assert_eq!(top.in_flight(), 1, "the parked read is inside top");

    let w = graph.writer().await;
    let mut change = Box::pin(async {
        let drained = w.drain(&top).await;
        w.set_backing(&drained, &top, Some(&base)).await
    });
    assert!(
        matches!(poll!(&mut change), Poll::Pending),
        "the change must wait for the read"
    );
    assert!(
        root.is_quiesced(),
        "the root queues new requests while drained"
    );
    assert!(
        Arc::ptr_eq(&top.child(Role::Backing).unwrap(), &mid),
        "graph unchanged while the read is in flight"
    );

    ctl.resume("A").unwrap();
    let data = reader.await.unwrap().expect("the read succeeds");
    assert!(
        data.iter().all(|&b| b == 0xBB),
        "the read returns base's bytes"
    );

    change.await.expect("the change lands after the read");
    assert!(Arc::ptr_eq(&top.child(Role::Backing).unwrap(), &base));
    assert!(mid.is_closed(), "mid lost its last user and was closed");
    assert!(graph.node("mid").is_err() && graph.node("mid-img").is_err());
    drop(w);
    assert!(!root.is_quiesced());
    let again = root.read(0, 65536).await.unwrap();
    assert!(
        again.iter().all(|&b| b == 0xBB),
        "the new chain shows the same data"
    );
}

#[tokio::test]
async fn negative_control_without_the_drain_the_read_sees_a_torn_graph() {
    let graph = Graph::new();
    let (top, mid, base) = seed_chain(&graph).await;
    let root = Arc::new(
        root_on(&graph, "guest", &top, PermPair::writer())
            .await
            .unwrap(),
    );

    let ctl = mid.driver().debug_control().expect("mid is blkdebug");
    ctl.set_breakpoint(DebugEvent::ReadBackingAio, "A").unwrap();
    let reader = {
        let root = root.clone();
        tokio::spawn(async move { root.read(0, 65536).await })
    };
    ctl.wait_suspended("A").await;

    let w = graph.writer().await;
    let mut change = Box::pin(async {
        let not_drained = w.drain_skipped_for_negative_control(&top);
        w.set_backing(&not_drained, &top, Some(&base)).await
    });
    match poll!(&mut change) {
        Poll::Ready(r) => r.expect("without a drain the change lands at once"),
        Poll::Pending => panic!("the negative control lost its teeth: the change waited"),
    }
    assert!(mid.is_closed());

    ctl.resume("A").unwrap();
    let torn = reader.await.unwrap();
    match torn {
        Err(Error::NodeClosed { node }) => assert_eq!(node, "mid"),
        Ok(data) => panic!(
            "expected the read to run into the removed node; it returned {} bytes ({})",
            data.len(),
            if data.iter().all(|&b| b == 0xBB) {
                "correct"
            } else {
                "wrong"
            }
        ),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn a_guard_for_another_node_is_refused_and_nothing_changes() {
    let graph = Graph::new();
    let (top, mid, base) = seed_chain(&graph).await;
    let w = graph.writer().await;
    let other = add(
        &w,
        serde_json::json!({"driver": "null-co", "node-name": "other"}),
    )
    .await;
    let before = graph.snapshot();
    // A drain of a node unrelated to top proves nothing about top.
    let drained_other = w.drain(&other).await;
    let err = w
        .set_backing(&drained_other, &top, Some(&base))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongDrain { .. }), "{err}");
    assert!(
        err.to_string().contains("'top'") && err.to_string().contains("'other'"),
        "{err}"
    );
    drop(drained_other);
    // A drain of a node *below* top covers top: draining it quiesced top.
    let drained_base = w.drain(&base).await;
    assert!(sluice_core::DrainProof::covers(&drained_base, &top));
    drop(drained_base);
    drop(w);
    assert_eq!(graph.snapshot(), before);
    assert!(Arc::ptr_eq(&top.child(Role::Backing).unwrap(), &mid));
}
