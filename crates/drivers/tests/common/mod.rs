//! Helpers shared by the graph tests: building chains of memory nodes and
//! reading/writing them through temporary roots.
#![allow(dead_code)]

use serde_json::json;
use sluice_core::{Graph, GraphWriter, IoBytes, Node, PermPair, Result, Root, WriteFlags};
use sluice_drivers::blockdev_add;
use std::sync::Arc;

pub const MIB: u64 = 1 << 20;

pub async fn add(w: &GraphWriter<'_>, opts: serde_json::Value) -> Arc<Node> {
    blockdev_add(w, opts.clone())
        .await
        .unwrap_or_else(|e| panic!("blockdev_add {opts}: {e}"))
}

/// Writes `byte` over `[offset, offset + len)` of `node` through a
/// short-lived root.
pub async fn fill(graph: &Graph, node: &Arc<Node>, offset: u64, len: usize, byte: u8) {
    let root = {
        let w = graph.writer().await;
        w.add_root(
            "test",
            "filler",
            node,
            PermPair::new(
                sluice_core::Perm::WRITE | sluice_core::Perm::CONSISTENT_READ,
                sluice_core::Perm::ALL,
            ),
        )
        .await
        .unwrap()
    };
    root.write(
        offset,
        IoBytes::copy_from(&vec![byte; len]),
        WriteFlags::default(),
    )
    .await
    .unwrap();
}

pub async fn root_on(graph: &Graph, name: &str, node: &Arc<Node>, perm: PermPair) -> Result<Root> {
    let w = graph.writer().await;
    w.add_root("block device", name, node, perm).await
}

/// The seed's chain: `base` (user-owned, 0xBB in its first 64 KiB) under an
/// implicit `mid` (a blkdebug filter over the implicit overlay `mid-img`)
/// under `top`.
pub async fn seed_chain(graph: &Graph) -> (Arc<Node>, Arc<Node>, Arc<Node>) {
    let w = graph.writer().await;
    let base = add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": MIB}),
    )
    .await;
    drop(w);
    fill(graph, &base, 0, 65536, 0xBB).await;
    let w = graph.writer().await;
    let top = add(
        &w,
        json!({
            "driver": "memory", "node-name": "top", "size": MIB,
            "backing": {
                "driver": "blkdebug", "node-name": "mid",
                "image": {"driver": "memory", "node-name": "mid-img", "size": MIB, "backing": "base"}
            }
        }),
    )
    .await;
    let mid = graph.node("mid").unwrap();
    (top, mid, base)
}

/// User-owned 1 MiB memory nodes named `names`, each backed by the one
/// before it (`names[0]` has no backing): a backing chain, base first.
pub async fn memory_chain<const N: usize>(graph: &Graph, names: [&str; N]) -> [Arc<Node>; N] {
    let w = graph.writer().await;
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    for name in names {
        let mut opts = json!({"driver": "memory", "node-name": name, "size": MIB});
        if let Some(below) = nodes.last() {
            opts["backing"] = json!(below.name());
        }
        nodes.push(add(&w, opts).await);
    }
    nodes.try_into().expect("one node per name")
}
