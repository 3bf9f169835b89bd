//! Copy-on-read must never undo a guest write that lands between the
//! copy-up's read and its write. A blkdebug breakpoint parks the copy-up
//! exactly there (`cor_write`), the guest writes, the copy-up resumes.

mod common;

use common::*;
use serde_json::json;
use sluice_core::{DebugEvent, Graph, IoBytes, Perm, PermPair, WriteFlags};
use std::sync::Arc;

/// base (0xBB) ← top, with `cor` over a blkdebug `dbg` over `top`; a guest
/// root on `cor` that shares writes with the copier.
async fn setup(
    graph: &Graph,
) -> (
    Arc<sluice_core::Node>,
    Arc<sluice_core::Root>,
    sluice_core::Root,
) {
    let w = graph.writer().await;
    let base = add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": MIB}),
    )
    .await;
    drop(w);
    fill(graph, &base, 0, 65536, 0xBB).await;
    let w = graph.writer().await;
    add(
        &w,
        json!({"driver": "memory", "node-name": "top", "size": MIB, "backing": "base"}),
    )
    .await;
    let dbg = add(
        &w,
        json!({"driver": "blkdebug", "node-name": "dbg", "image": "top"}),
    )
    .await;
    let cor = add(
        &w,
        json!({"driver": "copy-on-read", "node-name": "cor", "file": "dbg"}),
    )
    .await;
    let shared = PermPair::new(Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL);
    let guest = Arc::new(
        w.add_root("block device", "guest", &cor, shared)
            .await
            .unwrap(),
    );
    let raw_top = w
        .add_root("test", "top-writer", &graph.node("top").unwrap(), shared)
        .await
        .unwrap();
    drop(w);
    (dbg, guest, raw_top)
}

#[tokio::test]
async fn a_guest_write_during_copy_up_survives() {
    let graph = Graph::new();
    let (dbg, guest, _) = setup(&graph).await;
    let ctl = dbg.driver().debug_control().unwrap();
    ctl.set_breakpoint(DebugEvent::CorWrite, "cor").unwrap();
    let copier = {
        let guest = guest.clone();
        tokio::spawn(async move { guest.read(0, 4096).await })
    };
    ctl.wait_suspended("cor").await;
    guest
        .write(0, IoBytes::copy_from(&[0xEE; 4096]), WriteFlags::default())
        .await
        .unwrap();
    ctl.resume("cor").unwrap();
    let old = copier.await.unwrap().unwrap();
    assert!(
        old.iter().all(|&b| b == 0xBB),
        "the read itself saw the chain before the write"
    );
    let now = guest.read(0, 4096).await.unwrap();
    assert!(
        now.iter().all(|&b| b == 0xEE),
        "the copy-up must not undo the guest write"
    );
    // Unwritten data was copied up into top.
    let top = graph.node("top").unwrap();
    let st = top.block_status(4096, 4096).await.unwrap();
    assert!(
        matches!(st, sluice_core::DriverStatus::Unallocated { .. }),
        "only the read range is copied: {st:?}"
    );
}

#[tokio::test]
async fn negative_control_a_plain_write_as_copy_up_loses_the_guest_write() {
    // The same interleaving with the copy-up done as an ordinary write,
    // which is what a copy-on-read without the copy-up flag would do.
    let graph = Graph::new();
    let (_dbg, guest, raw_top) = setup(&graph).await;
    let stale = guest.read(4096, 4096).await.unwrap(); // copied up: read already allocated it
    assert!(stale.iter().all(|&b| b == 0xBB));
    let chain_view = raw_top.read(8192, 4096).await.unwrap(); // read through, no copy
    guest
        .write(
            8192,
            IoBytes::copy_from(&[0xEE; 4096]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    raw_top
        .write(8192, chain_view.freeze(), WriteFlags::default())
        .await
        .unwrap();
    let now = guest.read(8192, 4096).await.unwrap();
    assert!(
        now.iter().all(|&b| b == 0xBB),
        "without the flag the guest write is lost"
    );
}

#[tokio::test]
async fn bottom_limits_what_is_copied_inclusively() {
    let graph = Graph::new();
    let [base, mid, top] = memory_chain(&graph, ["base", "mid", "top"]).await;
    fill(&graph, &base, 0, 4096, 1).await;
    fill(&graph, &mid, 4096, 4096, 2).await;
    let w = graph.writer().await;
    let cor = add(
        &w,
        json!({"driver": "copy-on-read", "node-name": "cor", "file": "top", "bottom": "mid"}),
    )
    .await;
    let r = w
        .add_root("job", "stream", &cor, PermPair::reader_sharing_all())
        .await
        .unwrap();
    drop(w);
    let data = r.read(0, 8192).await.unwrap();
    assert!(data[..4096].iter().all(|&b| b == 1) && data[4096..].iter().all(|&b| b == 2));
    let below_bottom = top.block_status(0, 4096).await.unwrap();
    let in_bottom = top.block_status(4096, 4096).await.unwrap();
    assert!(
        matches!(below_bottom, sluice_core::DriverStatus::Unallocated { .. }),
        "base's data is not copied: {below_bottom:?}"
    );
    assert!(
        matches!(in_bottom, sluice_core::DriverStatus::Data { .. }),
        "mid's data is copied: {in_bottom:?}"
    );
}

#[tokio::test]
async fn raw_shows_a_window_of_its_file() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let img = add(
        &w,
        json!({"driver": "memory", "node-name": "img", "size": MIB}),
    )
    .await;
    drop(w);
    fill(&graph, &img, 4096, 4096, 9).await;
    let w = graph.writer().await;
    let raw = add(
        &w,
        json!({"driver": "raw", "node-name": "win", "file": "img", "offset": 4096, "size": 8192}),
    )
    .await;
    drop(w);
    assert_eq!(raw.size(), 8192);
    let r = root_on(&graph, "vda", &raw, PermPair::writer())
        .await
        .unwrap();
    let d = r.read(0, 8192).await.unwrap();
    assert!(d[..4096].iter().all(|&b| b == 9) && d[4096..].iter().all(|&b| b == 0));
    r.write(4096, IoBytes::copy_from(&[7; 4096]), WriteFlags::default())
        .await
        .unwrap();
    let raw_img = root_on(&graph, "whole", &img, PermPair::reader_sharing_all())
        .await
        .unwrap();
    let whole = raw_img.read(8192, 4096).await.unwrap();
    assert!(
        whole.iter().all(|&b| b == 7),
        "the write landed at offset + 4096 in the file"
    );
    assert!(
        r.read(4096, 8192).await.is_err(),
        "the window ends at its size"
    );
}
