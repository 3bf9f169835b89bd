//! Compressed writes, as `qemu-img convert -c` makes them: QEMU must
//! read the clusters back (compare), find the image clean (check) and
//! see them compressed (map).

mod common;

use async_trait::async_trait;
use common::*;
use serde_json::{json, Value};
use sluice_core::{
    BlockDriver, DriverStatus, Graph, IoBytes, Node, NodeSpec, ReadBuf, Result, Role, WriteFlags,
};
use sluice_drivers::open::open_with;
use sluice_drivers::protocol::file::CacheMode;
use sluice_qcow2::Qcow2Driver;
use std::sync::Arc;

/// A qcow2 driver the test keeps a handle on, to call
/// `write_compressed` on the node that uses it.
struct Shared(Arc<Qcow2Driver>);

#[async_trait]
impl BlockDriver for Shared {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }
    async fn read(&self, node: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()> {
        self.0.read(node, offset, buf).await
    }
    async fn write(&self, node: &Node, offset: u64, buf: IoBytes, flags: WriteFlags) -> Result<()> {
        self.0.write(node, offset, buf, flags).await
    }
    async fn flush(&self, node: &Node) -> Result<()> {
        self.0.flush(node).await
    }
    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        self.0.block_status(node, offset, len).await
    }
}

/// Writes `src` into the fresh image `img` cluster by cluster,
/// compressed, skipping zero clusters (as convert does); returns which
/// clusters were written.
async fn convert_compressed(src: &[u8], img: &str) -> Vec<bool> {
    let graph = Graph::new();
    let w = graph.writer().await;
    let file = open_with(
        &w,
        json!({"driver": "file", "filename": img}),
        CacheMode::WRITEBACK,
        false,
    )
    .await
    .unwrap();
    let d = Arc::new(
        Qcow2Driver::open(&file, &Default::default(), false)
            .await
            .unwrap(),
    );
    let node = w
        .add_node(NodeSpec {
            name: None,
            driver: Box::new(Shared(d.clone())),
            size: d.size(),
            read_only: false,
            children: vec![(Role::File, file)],
            implicit: false,
        })
        .await
        .unwrap();
    drop(w);
    let cs = d.header().cluster_size() as usize;
    let mut written = Vec::new();
    for (i, chunk) in src.chunks(cs).enumerate() {
        let nonzero = chunk.iter().any(|&b| b != 0);
        if nonzero {
            d.write_compressed(&node, (i * cs) as u64, chunk)
                .await
                .unwrap_or_else(|e| panic!("{img}: cluster {i}: {e}"));
        }
        written.push(nonzero);
    }
    // Overwriting is refused, and so is a write that is not one cluster.
    if let Some(i) = written.iter().position(|&w| w) {
        let off = (i * cs) as u64;
        let e = d
            .write_compressed(&node, off, &src[i * cs..(i + 1) * cs])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("Compression can't overwrite anything"), "{e}");
    }
    let e = d
        .write_compressed(&node, 512, &src[..cs])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("whole") && e.contains(node.name()), "{e}");
    node.driver().flush(&node).await.unwrap();
    written
}

/// Text-like (compressible), noise (not), zeroes, and a short last
/// cluster, for `clusters` clusters of `cs` bytes plus `tail` bytes.
fn source(cs: usize, clusters: usize, tail: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::new();
    for i in 0..clusters {
        match i % 4 {
            0 | 3 => {
                let words = ["qcow2 ", "sluice ", "cluster ", "compress ", "zlib "];
                while out.len() < (i + 1) * cs {
                    out.extend_from_slice(words[(next() % 5) as usize].as_bytes());
                }
                out.truncate((i + 1) * cs);
            }
            1 => out.extend((0..cs).map(|_| next() as u8)),
            _ => out.resize((i + 1) * cs, 0),
        }
    }
    out.extend((0..tail).map(|k| b"tail"[k % 4]));
    out
}

fn check_clean(img: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", img])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {img}: {text}"
    );
}

async fn case(tag: &str, create_opts: &str, cs: usize, clusters: usize, tail: usize) {
    let seed: u64 = rand::random();
    println!("{tag}: seed {seed}");
    let dir = TempDir::new(&format!("cwrite-{tag}"));
    let raw = dir.path("src.raw");
    let img = dir.path("img.qcow2");
    let src = source(cs, clusters, tail, seed);
    std::fs::write(&raw, &src).unwrap();
    let size = src.len().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        create_opts,
        &img,
        &size,
    ]);
    let written = convert_compressed(&src, &img).await;

    check_clean(&img);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", &raw, &img]);
    let map: Value = serde_json::from_str(&qemu_img(&["map", "--output=json", &img])).unwrap();
    let compressed_at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= off && off < s + e["length"].as_u64().unwrap()
            })
            .map(|e| (e["compressed"] == json!(true), e["data"] == json!(true)))
            .unwrap()
    };
    for (i, &w) in written.iter().enumerate() {
        let off = (i * cs) as u64;
        let (compressed, data) = compressed_at(off);
        let noise = i % 4 == 1 && i < clusters;
        assert_eq!(data, w, "{tag} (seed {seed}): cluster {i} allocation");
        assert_eq!(
            compressed,
            w && !noise,
            "{tag} (seed {seed}): cluster {i} compressed?"
        );
    }
    // Compressed clusters take less room than they map.
    let file_len = std::fs::metadata(&img).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        file_len.blocks() * 512 < src.len() as u64,
        "{tag}: {} bytes allocated for {} of data",
        file_len.blocks() * 512,
        src.len()
    );
    // And sluice reads it back.
    let o = open_image(&img, true).await.unwrap();
    assert_same(tag, &read_all(&o, 1 << 20).await, &src);
}

#[tokio::test]
async fn zlib_default_clusters() {
    case("zlib", "cluster_size=64k", 65536, 16, 0).await;
}

#[tokio::test]
async fn zstd_with_a_short_last_cluster() {
    case("zstd", "compression_type=zstd", 65536, 9, 5120).await;
}

#[tokio::test]
async fn small_clusters_and_extended_l2() {
    case("c4k", "cluster_size=4k", 4096, 40, 1024).await;
    case("extl2", "extended_l2=on,cluster_size=32k", 32768, 12, 0).await;
}
