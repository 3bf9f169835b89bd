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

/// A user-owned 1 MiB memory node `name`, backed by `backing` if given.
pub async fn memory_node(graph: &Graph, name: &str, backing: Option<&str>) -> Arc<Node> {
    let mut opts = json!({"driver": "memory", "node-name": name, "size": MIB});
    if let Some(b) = backing {
        opts["backing"] = json!(b);
    }
    let w = graph.writer().await;
    add(&w, opts).await
}

/// `memory_chain(names)` with `fills`, `(layer, offset, len, byte)`,
/// written bottom layer first; returns the nodes and the model of what
/// the top shows.
pub async fn filled_chain<const N: usize>(
    graph: &Graph,
    names: [&str; N],
    fills: &[(usize, usize, usize, u8)],
) -> ([Arc<Node>; N], Vec<u8>) {
    let nodes = memory_chain(graph, names).await;
    let mut model = vec![0u8; MIB as usize];
    for &(layer, offset, len, byte) in fills {
        fill(graph, &nodes[layer], offset as u64, len, byte).await;
        model[offset..offset + len].fill(byte);
    }
    (nodes, model)
}

/// `base` (0x11 everywhere) ← `top` (0x22 in its second quarter), and
/// the model of what `top` shows.
pub async fn base_top(graph: &Graph) -> (Arc<Node>, Arc<Node>, Vec<u8>) {
    let ([base, top], m) = filled_chain(
        graph,
        ["base", "top"],
        &[(0, 0, MIB as usize, 0x11), (1, 256 << 10, 256 << 10, 0x22)],
    )
    .await;
    (base, top, m)
}

/// A writer root `guest` on `node`.
pub async fn guest_on(graph: &Graph, node: &Arc<Node>) -> Root {
    root_on(graph, "guest", node, PermPair::writer())
        .await
        .unwrap()
}

/// `qemu-io ARGS` running interactively, holding its image (and the
/// image's locks) until it quits, or is dropped.
pub struct QemuIo(std::process::Child);

impl QemuIo {
    pub fn hold(args: &[&str]) -> QemuIo {
        use std::io::Read;
        use std::process::{Command, Stdio};
        let mut child = Command::new("qemu-io")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The prompt comes once the image is open and locked.
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"qemu-io> ") {
            match out.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => {
                    let mut err = String::new();
                    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                    panic!(
                        "qemu-io exited early: {}{err}",
                        String::from_utf8_lossy(&seen)
                    );
                }
            }
        }
        child.stdout = Some(out);
        QemuIo(child)
    }

    /// Quits and waits for qemu-io to exit (as a drop does).
    pub fn quit(self) {
        drop(self);
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        use std::io::Write;
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.0.wait();
    }
}
