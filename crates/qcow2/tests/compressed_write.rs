//! Compressed writes through `Node::write_compressed`, as `sluice img
//! convert -c` makes them: QEMU must read the clusters back (compare),
//! find the image clean (check: a host cluster is referenced once per
//! compressed cluster packed into it) and see them compressed (map);
//! the streams are packed, several to a host cluster; and a crash at
//! any point leaves an image without corruption that holds every
//! flushed cluster.

mod common;
mod crash_recorder;

use common::*;
use crash_recorder::{crash_images, qcow2_on_recorder, Pick, Record};
use serde_json::{json, Value};
use sluice_core::{Graph, IoBytes, Node, Root};
use sluice_qcow2::format::{compressed_descriptor, COMPRESSED};
use std::collections::HashSet;
use std::sync::Arc;

/// Writes `src` into `node` cluster by cluster, compressed, skipping
/// zero clusters (as convert does); returns which clusters were written.
async fn write_all_compressed(node: &Node, src: &[u8], cs: usize) -> Vec<bool> {
    write_compressed_at(node, 0, src, cs).await
}

/// `write_all_compressed` with `src` placed at byte `base` of `node`.
async fn write_compressed_at(node: &Node, base: usize, src: &[u8], cs: usize) -> Vec<bool> {
    let mut written = Vec::new();
    for (i, chunk) in src.chunks(cs).enumerate() {
        let nonzero = chunk.iter().any(|&b| b != 0);
        if nonzero {
            node.write_compressed((base + i * cs) as u64, IoBytes::copy_from(chunk))
                .await
                .unwrap_or_else(|e| panic!("cluster {i}: {e}"));
        }
        written.push(nonzero);
    }
    written
}

/// `qemu-img check` finds `img` clean, and `compare` finds it equal to
/// the raw `raw`.
fn assert_clean_and_same_as(raw: &str, img: &str) {
    assert_clean(img);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", raw, img]);
}

/// Writes `src` into the fresh image `img` through a node opened the
/// ordinary way; checks the refusals; returns which clusters were
/// written.
async fn convert_compressed(src: &[u8], img: &str, cs: usize) -> Vec<bool> {
    let o = open_image(img, false).await.unwrap();
    let node = o.node.clone();
    let written = write_all_compressed(&node, src, cs).await;
    // Overwriting is refused, and so is a write that is not one cluster.
    if let Some(i) = written.iter().position(|&w| w) {
        let e = node
            .write_compressed(
                (i * cs) as u64,
                IoBytes::copy_from(&src[i * cs..(i + 1) * cs]),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("Compression can't overwrite anything"), "{e}");
    }
    let e = node
        .write_compressed(512, IoBytes::copy_from(&src[..cs]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("whole") && e.contains(node.name()), "{e}");
    close(o).await;
    written
}

/// The first word of the L2 entry of guest offset `guest` (standard or
/// extended entries).
fn l2_word(path: &str, guest: u64) -> u64 {
    let cb = read_be(path, 20, 4);
    let ext = read_be(path, 72, 8) & (1 << 4) != 0;
    let esz = if ext { 16 } else { 8 };
    let per = (1u64 << cb) / esz;
    let l1 = read_be(path, 40, 8);
    let l1e = read_be(path, l1 + (guest >> cb) / per * 8, 8);
    let l2 = l1e & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "{path}: guest offset {guest} has no L2 table");
    read_be(path, l2 + ((guest >> cb) % per) * esz, 8)
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

async fn case(tag: &str, create_opts: &str, cs: usize, clusters: usize, tail: usize) {
    case_packed(tag, create_opts, cs, clusters, tail, true).await
}

/// `packs`: whether streams must share host clusters (not with 1-bit
/// refcounts, which count one reference at most).
async fn case_packed(
    tag: &str,
    create_opts: &str,
    cs: usize,
    clusters: usize,
    tail: usize,
    packs: bool,
) {
    let seed: u64 = rand::random();
    println!("{tag}: seed {seed}");
    let dir = TempDir::new(&format!("cwrite-{tag}"));
    let raw = dir.path("src.raw");
    let img = dir.path("img.qcow2");
    let src = source(cs, clusters, tail, seed);
    std::fs::write(&raw, &src).unwrap();
    let size = src.len().to_string();
    create_qcow2(&img, create_opts, &size);
    let written = convert_compressed(&src, &img, cs).await;

    assert_clean(&img);
    // sluice's own check agrees with QEMU's on packed clusters.
    let (_g, file) = open_file_node(&img, true).await;
    let report = sluice_qcow2::check::check(&file, &img, None).await.unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{tag}: sluice check: {report:?}"
    );
    drop(file);
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
    // Compressed streams are packed: fewer host clusters than
    // compressed clusters, and a file smaller than the data it holds.
    let cb = cs.trailing_zeros();
    let mut compressed = 0u64;
    let mut hosts = HashSet::new();
    for (i, _) in written.iter().enumerate().filter(|(_, &w)| w) {
        let e = l2_word(&img, (i * cs) as u64);
        if e & COMPRESSED != 0 {
            let (host, len) = compressed_descriptor(e, cb);
            compressed += 1;
            hosts.extend((host >> cb)..=((host + len - 1) >> cb));
        }
    }
    assert!(
        compressed >= 2,
        "{tag}: only {compressed} compressed clusters"
    );
    assert_eq!(
        (hosts.len() as u64) < compressed,
        packs,
        "{tag}: {compressed} compressed clusters take {} host clusters",
        hosts.len()
    );
    let file_len = std::fs::metadata(&img).unwrap().len();
    assert!(
        !packs || file_len < src.len() as u64,
        "{tag}: a {file_len}-byte file for {} bytes of data",
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

#[tokio::test]
async fn odd_refcount_widths() {
    // One reference at most: every stream gets a host cluster of its own.
    case_packed("rc1", "refcount_bits=1,cluster_size=4k", 4096, 12, 0, false).await;
    case("rc64", "refcount_bits=64,cluster_size=1k", 1024, 24, 512).await;
}

/// Formats without compressed clusters say so; read-only nodes refuse.
#[tokio::test]
async fn node_refusals() {
    let dir = TempDir::new("cwrite-refuse");
    let raw = dir.path("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let o = open_opts(
        json!({"driver": "raw", "file": {"driver": "file", "filename": raw}}),
        false,
    )
    .await
    .unwrap();
    let e = o
        .node
        .write_compressed(0, IoBytes::copy_from(&[1u8; 65536]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, sluice_core::Error::NotSupported { .. }) && e.to_string().contains("compress"),
        "{e}"
    );
    drop(o);
    let img = dir.path("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "1M"]);
    let o = open_image(&img, true).await.unwrap();
    let e = o
        .node
        .write_compressed(0, IoBytes::copy_from(&[1u8; 65536]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("read-only"), "{e}");
    drop(o);
    let o = open_image(&img, false).await.unwrap();
    let e = o
        .node
        .write_compressed(1 << 20, IoBytes::copy_from(&[1u8; 65536]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, sluice_core::Error::OutOfRange { .. }),
        "past the end: {e}"
    );
}

/// A qcow2 node on a recording file holding `img`'s bytes.
async fn on_recorder(img: &str) -> (Graph, Arc<Node>, Root, Arc<crash_recorder::Recorder>) {
    let graph = Graph::new();
    let (node, root, rec) = qcow2_on_recorder(&graph, img, Value::Null).await.unwrap();
    (graph, node, root, rec)
}

/// Compressed (and, for noise, plain) clusters written in batches, each
/// followed by a guest flush; every crash point, with all, none and a
/// random subset of the unflushed writes on disk, must leave an image
/// QEMU finds free of corruption, in which every cluster of a flushed
/// batch reads back and every other cluster reads as before or as
/// written. `SLUICE_CRASH_SEED=<seed>` replays a run.
#[tokio::test]
async fn compressed_writes_survive_a_crash_anywhere() {
    let seed = crash_seed();
    println!("seed {seed}");
    let dir = TempDir::new("cwrite-crash");
    let img = dir.path("img.qcow2");
    let cs = 4096usize;
    let clusters = 24;
    let src = source(cs, clusters, 0, seed);
    create_qcow2(&img, "cluster_size=4k", &src.len().to_string());
    let (_graph, node, root, rec) = on_recorder(&img).await;
    // (events when the flush completed, clusters it made durable)
    let mut flushes = Vec::new();
    for batch in (0..clusters).step_by(8) {
        let part = &src[batch * cs..(batch + 8) * cs];
        write_compressed_at(&node, batch * cs, part, cs).await;
        root.flush().await.unwrap();
        flushes.push((rec.len(), batch + 8));
    }
    drop(root);
    drop(node);
    let r: Record = rec.record();
    println!("{} file events", r.len());
    let crashed = dir.path("crashed.qcow2");
    for (k, what, image) in crash_images(&r, seed) {
        let done = flushes
            .iter()
            .filter(|&&(e, _)| e <= k)
            .map(|&(_, n)| n)
            .max()
            .unwrap_or(0);
        std::fs::write(&crashed, &image).unwrap();
        assert_no_corruption(&crashed, &what);
        let o = open_image(&crashed, true)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = read_all(&o, 1 << 20).await;
        for (i, (g, want)) in got.chunks(cs).zip(src.chunks(cs)).enumerate() {
            let ok = g == want || (i >= done && g.iter().all(|&b| b == 0));
            assert!(
                ok,
                "{what}: cluster {i} (batches durable up to {done}) reads wrong"
            );
        }
    }
    // The last image holds everything, packed.
    let last = r.crash(r.len(), Pick::None);
    std::fs::write(&crashed, &last.image).unwrap();
    assert_clean(&crashed);
}

/// Compressed clusters freed by overwrites and discards give their host
/// clusters back once every stream packed there is gone; packing never
/// resumes in a host cluster that was freed and reused meanwhile.
#[tokio::test]
async fn freeing_packed_clusters() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let dir = TempDir::new("cwrite-free");
    let img = dir.path("img.qcow2");
    let cs = 4096usize;
    let clusters = 16;
    let src = source(cs, clusters, 0, seed);
    create_qcow2(&img, "cluster_size=4k", &(2 * src.len()).to_string());
    let o = open_image(&img, false).await.unwrap();
    let mut model = vec![0u8; 2 * src.len()];
    write_all_compressed(&o.node, &src, cs).await;
    model[..src.len()].copy_from_slice(&src);
    // Every compressed cluster goes: half discarded, half overwritten
    // in part (copy-on-write from the compressed data).
    for i in (0..clusters).filter(|i| i % 4 != 1 && i % 4 != 2) {
        let at = i * cs;
        if i % 2 == 0 {
            o.root.discard(at as u64, cs as u64).await.unwrap();
            model[at..at + cs].fill(0);
        } else {
            let patch = [0xee; 100];
            o.root
                .write(
                    (at + 7) as u64,
                    IoBytes::copy_from(&patch),
                    Default::default(),
                )
                .await
                .unwrap();
            model[at + 7..at + 107].copy_from_slice(&patch);
        }
    }
    o.root.flush().await.unwrap();
    // Plain writes take the freed clusters; new compressed data must not
    // be packed into them.
    let plain: Vec<u8> = (0..4 * cs).map(|k| (k * 7 % 251) as u8).collect();
    o.root
        .write(
            src.len() as u64,
            IoBytes::copy_from(&plain),
            Default::default(),
        )
        .await
        .unwrap();
    model[src.len()..src.len() + plain.len()].copy_from_slice(&plain);
    let again = &src[..4 * cs];
    let base = src.len() + 8 * cs;
    write_compressed_at(&o.node, base, again, cs).await;
    // Zero clusters were skipped, and read as the zeroes the model has.
    model[base..base + again.len()].copy_from_slice(again);
    assert_same("before close", &read_all(&o, 1 << 20).await, &model);
    close(o).await;
    let raw = dir.path("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_clean_and_same_as(&raw, &img);
}

/// Compressed writes running at once (on several threads) share the
/// packing: every stream gets its own bytes, every host cluster the
/// right count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_compressed_writes() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let dir = TempDir::new("cwrite-par");
    let img = dir.path("img.qcow2");
    let raw = dir.path("src.raw");
    let cs = 4096usize;
    let src = source(cs, 64, 0, seed);
    std::fs::write(&raw, &src).unwrap();
    create_qcow2(&img, "cluster_size=4k", &src.len().to_string());
    let o = open_image(&img, false).await.unwrap();
    let src = Arc::new(src);
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let node = o.node.clone();
            let src = src.clone();
            tokio::spawn(async move {
                for i in (t..64).step_by(8) {
                    let c = &src[i * cs..(i + 1) * cs];
                    if c.iter().any(|&b| b != 0) {
                        node.write_compressed((i * cs) as u64, IoBytes::copy_from(c))
                            .await
                            .unwrap_or_else(|e| panic!("cluster {i}: {e}"));
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    close(o).await;
    assert_clean_and_same_as(&raw, &img);
}
