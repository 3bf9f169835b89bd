//! Block status through backing chains, and blkdebug's error injection.

mod common;

use common::*;
use serde_json::json;
use sluice_core::status::map_range;
use sluice_core::{DebugEvent, Error, Graph, PermPair, ZeroFlags};

#[tokio::test]
async fn block_status_reports_depth_through_a_chain() {
    let graph = Graph::new();
    let [base, mid, top] = memory_chain(&graph, ["base", "mid", "top"]).await;
    fill(&graph, &base, 0, 65536, 1).await;
    fill(&graph, &mid, 65536, 65536, 2).await;
    fill(&graph, &top, 131072, 4096, 3).await;
    let r = root_on(&graph, "vda", &top, PermPair::writer())
        .await
        .unwrap();
    r.write_zeroes(135168, 4096, ZeroFlags::default())
        .await
        .unwrap();
    let map = map_range(&top, 0, MIB).await.unwrap();
    let got: Vec<(u64, u64, u32, bool, bool, bool)> = map
        .iter()
        .map(|e| (e.start, e.length, e.depth, e.present, e.data, e.zero))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 65536, 2, true, true, false),
            (65536, 65536, 1, true, true, false),
            (131072, 4096, 0, true, true, false),
            (135168, 4096, 0, true, false, true),
            (139264, MIB - 139264, 2, false, false, true),
        ]
    );
    // Through a raw filter-like layer the depth does not change.
    let w = graph.writer().await;
    let raw = add(
        &w,
        json!({"driver": "raw", "node-name": "fmt", "file": "top"}),
    )
    .await;
    drop(w);
    let e = sluice_core::status::block_status_chain(&raw, 65536, 4096)
        .await
        .unwrap();
    assert_eq!((e.depth, e.data, e.length), (1, true, 4096));
}

#[tokio::test]
async fn blkdebug_injects_an_error_after_its_event_once() {
    let graph = Graph::new();
    let w = graph.writer().await;
    add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": MIB}),
    )
    .await;
    let top = add(
        &w,
        json!({"driver": "memory", "node-name": "top", "size": MIB, "backing": {
            "driver": "blkdebug", "node-name": "dbg", "image": "base",
            "inject-error": [{"event": "read_backing_aio", "errno": 28, "once": true}]
        }}),
    )
    .await;
    drop(w);
    let r = root_on(&graph, "vda", &top, PermPair::writer())
        .await
        .unwrap();
    let err = r.read(0, 4096).await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert!(
        matches!(err, Error::Io { ref node, .. } if node == "dbg"),
        "{err}"
    );
    r.read(0, 4096).await.expect("a once rule fires once");
}

#[tokio::test]
async fn blkdebug_reads_qemu_config_files_and_states() {
    let dir = std::env::temp_dir().join(format!("sluice-blkdebug-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("blkdebug.conf");
    // The error only applies in state 2, which read_backing_aio enters.
    std::fs::write(
        &cfg,
        "[set-state]\nstate = \"1\"\nevent = \"read_backing_aio\"\nnew_state = \"2\"\n\n[inject-error]\nstate = \"2\"\nevent = \"read_backing_aio\"\nerrno = \"5\"\n",
    )
    .unwrap();
    let graph = Graph::new();
    let w = graph.writer().await;
    add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": MIB}),
    )
    .await;
    let top = add(
        &w,
        json!({"driver": "memory", "node-name": "top", "size": MIB,
               "backing": {"driver": "blkdebug", "config": cfg.to_str().unwrap(), "image": "base"}}),
    )
    .await;
    drop(w);
    let r = root_on(&graph, "vda", &top, PermPair::writer())
        .await
        .unwrap();
    r.read(0, 512).await.expect("state 1: no error yet");
    let err = r.read(0, 512).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn breakpoints_are_one_shot_and_unknown_tags_are_errors() {
    let graph = Graph::new();
    let w = graph.writer().await;
    add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": MIB}),
    )
    .await;
    let top = add(&w, json!({"driver": "memory", "node-name": "top", "size": MIB,
                             "backing": {"driver": "blkdebug", "node-name": "dbg", "image": "base"}})).await;
    drop(w);
    let dbg = sluice_core::find_debug_control(&top).expect("blkdebug below top");
    assert_eq!(dbg.name(), "dbg");
    let ctl = dbg.driver().debug_control().unwrap();
    assert!(ctl.resume("nothing").is_err());
    assert!(ctl.remove_breakpoint("nothing").is_err());
    ctl.set_breakpoint(DebugEvent::ReadBackingAio, "t").unwrap();
    let r = std::sync::Arc::new(
        root_on(&graph, "vda", &top, PermPair::writer())
            .await
            .unwrap(),
    );
    let first = {
        let r = r.clone();
        tokio::spawn(async move { r.read(0, 512).await })
    };
    ctl.wait_suspended("t").await;
    // The breakpoint fired once; a second read passes through.
    r.read(512, 512).await.unwrap();
    ctl.remove_breakpoint("t").unwrap();
    first.await.unwrap().unwrap();
}

#[tokio::test]
async fn nodes_count_their_requests() {
    use sluice_core::stats::IoStats;
    let graph = Graph::new();
    let w = graph.writer().await;
    let n = add(
        &w,
        json!({"driver": "memory", "node-name": "disk", "size": MIB}),
    )
    .await;
    drop(w);
    let r = root_on(&graph, "vda", &n, PermPair::writer())
        .await
        .unwrap();
    r.write(
        0,
        sluice_core::IoBytes::copy_from(&[1; 1000]),
        sluice_core::WriteFlags::default(),
    )
    .await
    .unwrap();
    r.read(0, 512).await.unwrap();
    r.read(512, 512).await.unwrap();
    r.flush().await.unwrap();
    r.discard(0, 8192).await.unwrap();
    let _ = r.read(MIB, 1).await.unwrap_err();
    let s = n.stats();
    assert_eq!(IoStats::get(&s.wr_operations), 1);
    assert_eq!(IoStats::get(&s.wr_bytes), 1000);
    assert_eq!(IoStats::get(&s.rd_operations), 2);
    assert_eq!(IoStats::get(&s.rd_bytes), 1024);
    assert_eq!(IoStats::get(&s.flush_operations), 1);
    assert_eq!(IoStats::get(&s.unmap_operations), 1);
    assert_eq!(IoStats::get(&s.unmap_bytes), 8192);
    assert_eq!(n.in_flight(), 0);
}

#[tokio::test]
async fn past_the_backing_end_the_top_decides_as_qemu_map_does() {
    // qemu-img map of a 2 MiB overlay over a 1 MiB base: depth 1 over the
    // base, depth 0 past its end.
    let graph = Graph::new();
    let w = graph.writer().await;
    add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": MIB}),
    )
    .await;
    let top = add(
        &w,
        json!({"driver": "memory", "node-name": "top", "size": 2 * MIB, "backing": "base"}),
    )
    .await;
    drop(w);
    let map = map_range(&top, 0, 2 * MIB).await.unwrap();
    let got: Vec<(u64, u64, u32, bool)> = map
        .iter()
        .map(|e| (e.start, e.length, e.depth, e.present))
        .collect();
    assert_eq!(got, vec![(0, MIB, 1, false), (MIB, MIB, 0, false)]);
}

/// Status queries longer than a request may be (2 GiB) are answered for
/// their start rather than refused, so a whole large disk can be mapped.
#[tokio::test]
async fn block_status_of_a_disk_larger_than_a_request() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let big = 6u64 << 30;
    let node = add(
        &w,
        serde_json::json!({"driver": "memory", "node-name": "big", "size": big}),
    )
    .await;
    drop(w);
    fill(&graph, &node, (5 << 30) + 4096, 4096, 0x7e).await;
    let first = sluice_core::status::block_status_chain(&node, 0, big)
        .await
        .unwrap();
    assert!(first.length > 0 && first.length <= sluice_core::graph::MAX_REQUEST_BYTES);
    let map = map_range(&node, 0, big).await.unwrap();
    assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), big);
    let data: Vec<_> = map.iter().filter(|e| e.data).collect();
    assert_eq!(data.len(), 1, "{map:?}");
    assert_eq!((data[0].start, data[0].length), ((5 << 30) + 4096, 4096));
}
