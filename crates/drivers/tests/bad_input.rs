//! Bad input gets a clear error, never a panic.

mod common;

use common::*;
use serde_json::json;
use sluice_core::graph::MAX_REQUEST_BYTES;
use sluice_core::{Error, Graph, IoBytes, PermPair, WriteFlags, ZeroFlags};
use sluice_drivers::blockdev_add;

async fn disk(graph: &Graph) -> sluice_core::Root {
    let w = graph.writer().await;
    let n = add(
        &w,
        json!({"driver": "memory", "node-name": "disk", "size": MIB}),
    )
    .await;
    drop(w);
    root_on(graph, "vda", &n, PermPair::writer()).await.unwrap()
}

#[tokio::test]
async fn requests_past_the_end_are_refused() {
    let graph = Graph::new();
    let root = disk(&graph).await;
    let err = root.read(MIB - 512, 1024).await.unwrap_err();
    assert!(
        matches!(err, Error::OutOfRange { offset, len: 1024, size, .. } if offset == MIB - 512 && size == MIB),
        "{err}"
    );
    assert!(
        err.to_string().contains("disk") && err.to_string().contains("past the end"),
        "{err}"
    );
    let err = root
        .write(MIB, IoBytes::copy_from(&[1]), WriteFlags::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    assert!(root
        .write_zeroes(MIB - 1, 2, ZeroFlags::default())
        .await
        .is_err());
    assert!(root.discard(2 * MIB, 1).await.is_err());
    assert!(root.block_status(MIB, 1).await.is_err());
}

#[tokio::test]
async fn overflowing_and_absurd_requests_are_refused() {
    let graph = Graph::new();
    let root = disk(&graph).await;
    let err = root
        .write_zeroes(u64::MAX - 10, 100, ZeroFlags::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
    let err = root.discard(0, u64::MAX).await.unwrap_err();
    assert!(err.to_string().contains("maximum request size"), "{err}");
    let err = root
        .write_zeroes(0, MAX_REQUEST_BYTES + 1, ZeroFlags::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRequest { .. }), "{err}");
}

#[tokio::test]
async fn zero_length_requests_are_refused() {
    let graph = Graph::new();
    let root = disk(&graph).await;
    for err in [
        root.read(0, 0).await.unwrap_err(),
        root.write(0, IoBytes::copy_from(&[]), WriteFlags::default())
            .await
            .unwrap_err(),
        root.write_zeroes(0, 0, ZeroFlags::default())
            .await
            .unwrap_err(),
        root.discard(0, 0).await.unwrap_err(),
        root.block_status(0, 0).await.unwrap_err(),
    ] {
        assert!(err.to_string().contains("zero-length"), "{err}");
        assert_eq!(err.errno(), libc::EINVAL);
    }
}

#[tokio::test]
async fn writes_through_a_reader_root_are_refused() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let n = add(
        &w,
        json!({"driver": "memory", "node-name": "disk", "size": MIB}),
    )
    .await;
    drop(w);
    let r = root_on(&graph, "viewer", &n, PermPair::reader_sharing_all())
        .await
        .unwrap();
    let err = r
        .write(0, IoBytes::copy_from(&[1]), WriteFlags::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("'write' permission"), "{err}");
}

#[tokio::test]
async fn bad_node_names_are_refused() {
    let graph = Graph::new();
    let w = graph.writer().await;
    for bad in [
        "",
        "1disk",
        "disk name",
        "#block1",
        "a-very-long-node-name-that-is-too-long",
    ] {
        let err = blockdev_add(&w, json!({"driver": "null-co", "node-name": bad}))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidNodeName { .. }), "{bad}: {err}");
    }
    add(&w, json!({"driver": "null-co", "node-name": "dup"})).await;
    let err = blockdev_add(&w, json!({"driver": "null-co", "node-name": "dup"}))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Duplicate nodes with node-name='dup'"),
        "{err}"
    );
}

#[tokio::test]
async fn bad_driver_options_are_refused() {
    let graph = Graph::new();
    let w = graph.writer().await;
    let cases = [
        (json!({"node-name": "x"}), "Parameter 'driver' is missing"),
        (json!({"driver": "nosuch"}), "Unknown driver 'nosuch'"),
        (json!({"driver": "null-co", "size": "big"}), "\"big\""),
        (
            json!({"driver": "null-co", "sise": 5}),
            "unknown field `sise`",
        ),
        (json!({"driver": "memory"}), "missing field `size`"),
        (
            json!({"driver": "memory", "size": 1024, "backing": "nonexistent"}),
            "Cannot find node 'nonexistent'",
        ),
        (
            json!({"driver": "raw", "file": {"driver": "memory", "size": 100}, "offset": 200}),
            "has to be smaller or equal",
        ),
        (
            json!({"driver": "raw", "file": {"driver": "memory", "size": 100}, "offset": 50, "size": 51}),
            "has to be smaller or equal",
        ),
        (
            json!({"driver": "blkdebug", "image": {"driver": "null-co"}, "align": 3}),
            "align",
        ),
        (
            json!({"driver": "blkdebug", "image": {"driver": "null-co"}, "inject-error": [{"event": "bogus"}]}),
            "Invalid event name",
        ),
        (
            json!({"driver": "null-co", "read-only": 7}),
            "expected: boolean",
        ),
        (
            json!({"driver": "null-co", "cache": {"direct": true, "bogus": 1}}),
            "cache.bogus",
        ),
        (json!("not an object"), "must be a JSON object"),
        (
            json!({"driver": "file", "filename": "/nonexistent/dir/image.raw"}),
            "Could not open '/nonexistent/dir/image.raw'",
        ),
    ];
    for (opts, want) in cases {
        let err = blockdev_add(&w, opts.clone()).await.unwrap_err();
        assert!(
            err.to_string().contains(want),
            "{opts}: got '{err}', want '{want}'"
        );
    }
    assert!(
        graph.nodes().is_empty(),
        "failed opens leave no nodes behind"
    );
}
