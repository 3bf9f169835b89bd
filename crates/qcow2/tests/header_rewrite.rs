//! Backing file rewrites (`change_backing_file`) of images qemu-img made:
//! QEMU's tools must see the new link, find the image clean, and keep
//! every other header extension; sluice must reopen the new chain.

mod common;

use async_trait::async_trait;
use common::*;
use serde_json::{json, Value};
use sluice_core::{
    BlockDriver, DriverStatus, Graph, IoBytes, Node, NodeSpec, ReadBuf, Result, Role, WriteFlags,
    ZeroFlags,
};
use sluice_drivers::open::open_with;
use sluice_drivers::protocol::file::CacheMode;
use sluice_qcow2::Qcow2Driver;
use std::sync::Arc;

/// A qcow2 driver the test keeps a handle on, to look at its in-memory
/// header while the node uses it.
struct Shared(Arc<Qcow2Driver>);

#[async_trait]
impl BlockDriver for Shared {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }
    fn supports_backing(&self) -> bool {
        true
    }
    async fn read(&self, node: &Node, offset: u64, buf: ReadBuf<'_>) -> Result<()> {
        self.0.read(node, offset, buf).await
    }
    async fn write(&self, node: &Node, offset: u64, buf: IoBytes, flags: WriteFlags) -> Result<()> {
        self.0.write(node, offset, buf, flags).await
    }
    async fn write_zeroes(&self, node: &Node, off: u64, len: u64, f: ZeroFlags) -> Result<()> {
        self.0.write_zeroes(node, off, len, f).await
    }
    async fn flush(&self, node: &Node) -> Result<()> {
        self.0.flush(node).await
    }
    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        self.0.block_status(node, offset, len).await
    }
    async fn change_backing_file(
        &self,
        node: &Node,
        file: Option<&str>,
        fmt: Option<&str>,
    ) -> Result<()> {
        self.0.change_backing_file(node, file, fmt).await
    }
}

/// The image `img` as a qcow2 node (without its backing chain) whose
/// driver the test can inspect.
struct Handle {
    _graph: Graph,
    node: Arc<Node>,
    d: Arc<Qcow2Driver>,
}

async fn open_shared(img: &str, read_only: bool) -> Handle {
    let graph = Graph::new();
    let (node, d) = {
        let w = graph.writer().await;
        let file = open_with(
            &w,
            json!({"driver": "file", "filename": img}),
            CacheMode::WRITEBACK,
            read_only,
        )
        .await
        .unwrap();
        let d = Arc::new(
            Qcow2Driver::open(&file, &Default::default(), read_only)
                .await
                .unwrap(),
        );
        let node = w
            .add_node(NodeSpec {
                name: None,
                driver: Box::new(Shared(d.clone())),
                size: d.size(),
                read_only,
                children: vec![(Role::File, file)],
                implicit: false,
            })
            .await
            .unwrap();
        (node, d)
    };
    Handle {
        _graph: graph,
        node,
        d,
    }
}

/// Two base images with different contents and an overlay on the first.
fn chain(dir: &TempDir, overlay_opts: &str) -> (String, String, String) {
    let b1 = dir.path("base1.qcow2");
    let b2 = dir.path("base2.qcow2");
    let top = dir.path("top.qcow2");
    for (b, pat) in [(&b1, 0x11), (&b2, 0x22)] {
        qemu_img(&["create", "-q", "-f", "qcow2", b, "4M"]);
        qemu_io(b, &[format!("write -P {pat} 0 64k")]);
    }
    let mut args = vec!["create", "-q", "-f", "qcow2", "-b", &b1, "-F", "qcow2"];
    if !overlay_opts.is_empty() {
        args.extend(["-o", overlay_opts]);
    }
    args.push(&top);
    qemu_img(&args);
    (b1, b2, top)
}

async fn first_byte_through_sluice(img: &str) -> u8 {
    let o = open_image(img, true).await.unwrap();
    o.root.read(0, 512).await.unwrap()[0]
}

#[tokio::test]
async fn rewrite_backing_of_qemu_image_keeps_extensions() {
    let dir = TempDir::new("hdr-rewrite");
    let (_b1, b2, top) = chain(&dir, "");
    // A bitmap adds the bitmaps extension and an autoclear bit that must
    // survive the rewrite.
    qemu_img(&["bitmap", "--add", &top, "dirty0"]);
    let before = qemu_info(&top);
    assert_eq!(first_byte_through_sluice(&top).await, 0x11);

    let h = open_shared(&top, false).await;
    h.node
        .driver()
        .change_backing_file(&h.node, Some(&b2), Some("qcow2"))
        .await
        .unwrap();
    assert_eq!(h.d.header().backing_file.as_deref(), Some(b2.as_str()));
    assert_eq!(h.d.header().backing_format.as_deref(), Some("qcow2"));
    assert!(h.d.header().bitmaps.is_some());
    drop(h);

    let after = qemu_info(&top);
    assert_eq!(after["backing-filename"], json!(b2));
    assert_eq!(after["backing-filename-format"], json!("qcow2"));
    let fs = |v: &Value| v["format-specific"]["data"].clone();
    assert!(fs(&before)["bitmaps"].is_array(), "{before}");
    assert_eq!(
        fs(&after)["bitmaps"],
        fs(&before)["bitmaps"],
        "bitmaps extension kept"
    );
    assert_eq!(fs(&after)["compat"], json!("1.1"));
    assert_clean(&top);
    assert_eq!(first_byte_through_sluice(&top).await, 0x22);
}

#[tokio::test]
async fn remove_backing_then_add_again() {
    let dir = TempDir::new("hdr-remove");
    let (b1, _b2, top) = chain(&dir, "");
    let h = open_shared(&top, false).await;
    h.d.change_backing_file(&h.node, None, None).await.unwrap();
    assert_eq!(h.d.header().backing_file, None);
    assert_eq!(h.d.header().backing_format, None);
    assert_eq!(h.d.header().backing_file_offset, 0);
    drop(h);
    let i = qemu_info(&top);
    assert!(i.get("backing-filename").is_none(), "{i}");
    assert!(i.get("backing-filename-format").is_none(), "{i}");
    assert_clean(&top);
    assert_eq!(first_byte_through_sluice(&top).await, 0);

    // Back again, without a format this time.
    let h = open_shared(&top, false).await;
    h.d.change_backing_file(&h.node, Some(&b1), None)
        .await
        .unwrap();
    drop(h);
    let i = qemu_info(&top);
    assert_eq!(i["backing-filename"], json!(b1));
    assert!(i.get("backing-filename-format").is_none(), "{i}");
    assert_clean(&top);
}

#[tokio::test]
async fn shorter_name_clears_the_old_one() {
    let dir = TempDir::new("hdr-clear");
    let (_b1, b2, top) = chain(&dir, "");
    let long = format!("{}/{}", dir.0.display(), "x".repeat(600));
    let h = open_shared(&top, false).await;
    h.d.change_backing_file(&h.node, Some(&long), Some("raw"))
        .await
        .unwrap();
    h.d.change_backing_file(&h.node, Some(&b2), Some("qcow2"))
        .await
        .unwrap();
    let used = {
        let hd = h.d.header();
        (hd.backing_file_offset + u64::from(hd.backing_file_size)) as usize
    };
    drop(h);
    // Nothing of the long name is left behind the new one.
    let raw = std::fs::read(&top).unwrap();
    assert_eq!(&raw[used - b2.len()..used], b2.as_bytes());
    assert!(
        raw[used..4096].iter().all(|&b| b == 0),
        "bytes after the new name were not cleared"
    );
    let i = qemu_info(&top);
    assert_eq!(i["backing-filename"], json!(b2));
    assert_clean(&top);
    assert_eq!(first_byte_through_sluice(&top).await, 0x22);
}

#[tokio::test]
async fn version_2_image() {
    let dir = TempDir::new("hdr-v2");
    let (_b1, b2, top) = chain(&dir, "compat=0.10");
    let h = open_shared(&top, false).await;
    h.d.change_backing_file(&h.node, Some(&b2), Some("qcow2"))
        .await
        .unwrap();
    drop(h);
    let i = qemu_info(&top);
    assert_eq!(i["format-specific"]["data"]["compat"], json!("0.10"));
    assert_eq!(i["backing-filename"], json!(b2));
    assert_eq!(i["backing-filename-format"], json!("qcow2"));
    assert_clean(&top);
    assert_eq!(first_byte_through_sluice(&top).await, 0x22);
}

#[tokio::test]
async fn refused_changes_leave_the_image_alone() {
    let dir = TempDir::new("hdr-refuse");
    let (b1, _b2, top) = chain(&dir, "cluster_size=512");
    let original = std::fs::read(&top).unwrap();
    let h = open_shared(&top, false).await;
    // Header, extensions and name do not fit in a 512-byte cluster.
    let long = "y".repeat(600);
    let e =
        h.d.change_backing_file(&h.node, Some(&long), Some("qcow2"))
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("first cluster") && e.contains(&top), "{e}");
    // Longer than the spec allows.
    let e =
        h.d.change_backing_file(&h.node, Some(&"z".repeat(1024)), None)
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("too long"), "{e}");
    // A format without a file.
    let e =
        h.d.change_backing_file(&h.node, None, Some("qcow2"))
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("needs a backing file"), "{e}");
    assert_eq!(h.d.header().backing_file.as_deref(), Some(b1.as_str()));
    drop(h);
    assert_eq!(std::fs::read(&top).unwrap(), original, "image changed");

    // A read-only node does not change its image.
    let h = open_shared(&top, true).await;
    assert!(h.d.change_backing_file(&h.node, None, None).await.is_err());
    drop(h);
    assert_eq!(std::fs::read(&top).unwrap(), original, "image changed");
}

mod crash_recorder;
use crash_recorder::{recorded, Durable, Pick, Record};

/// Every crash point of `r`, with all, none and random subsets of the
/// unflushed writes on disk, written to `path` in turn for `verify`.
fn each_crash(r: &Record, seed: u64, path: &str, mut verify: impl FnMut(&str)) {
    let mut durable = Durable::new(r);
    for k in 0..=r.len() {
        durable.advance_to(r, r.durable_at(k));
        for (i, pick) in [Pick::All, Pick::None, Pick::Random(seed ^ k as u64)]
            .into_iter()
            .enumerate()
        {
            let crash = r.crash_from(&durable.image, k, pick);
            std::fs::write(path, &crash.image).unwrap();
            let what = format!(
                "crash at event {k} of {}, pick {pick} ({i}), seed {seed}",
                r.len()
            );
            verify(&what);
        }
    }
}

#[tokio::test]
async fn backing_rewrite_survives_a_crash_anywhere() {
    let seed: u64 = rand::random();
    let dir = TempDir::new("hdr-crash");
    let (b1, b2, top) = chain(&dir, "");
    qemu_io(&top, &["write -P 0x33 64k 64k".into()]);
    let b2c = b2.clone();
    let r = recorded(&top, |node| async move {
        node.driver()
            .change_backing_file(&node, Some(&b2c), Some("qcow2"))
            .await
            .unwrap();
    })
    .await;
    let crashed = dir.path("crashed.qcow2");
    let mut seen = std::collections::HashSet::new();
    each_crash(&r, seed, &crashed, |what| {
        assert_no_corruption(&crashed, what);
        let i = qemu_info(&crashed);
        let link = (
            i["backing-filename"].as_str().unwrap_or("").to_string(),
            i["backing-filename-format"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
        assert!(
            link == (b1.clone(), "qcow2".into()) || link == (b2.clone(), "qcow2".into()),
            "{what}: backing link {link:?}"
        );
        seen.insert(link.0);
        qemu_io(&crashed, &["read -P 0x33 64k 64k".into()]);
    });
    assert_eq!(seen.len(), 2, "both the old and the new link must occur");
}

#[tokio::test]
async fn resize_survives_a_crash_anywhere() {
    let seed: u64 = rand::random();
    let dir = TempDir::new("resize-crash");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "3G"]);
    qemu_io(
        &base,
        &["write -P 0x11 0 64k".into(), "write -P 0x11 2G 64k".into()],
    );
    // 1G: two L1 entries; growing to 3G needs six and zeroes the new
    // area over the larger backing file.
    create_overlay(&top, &base, "1G");
    qemu_io(&top, &["write -P 0x22 1M 64k".into()]);
    // Garbage in the L1 cluster past the table's two entries (QEMU never
    // reads it): the new entries must be zeroed before the header counts
    // them.
    let raw = std::fs::read(&top).unwrap();
    let l1 = u64::from_be_bytes(raw[40..48].try_into().unwrap());
    patch(&top, l1 + 16, &[0xa5; 64]);
    assert_clean(&top);
    let r = recorded(&top, |node| async move {
        node.driver().truncate(&node, 3 << 30, "off").await.unwrap();
    })
    .await;
    let crashed = dir.path("crashed.qcow2");
    let mut sizes = std::collections::HashSet::new();
    each_crash(&r, seed, &crashed, |what| {
        assert_no_corruption(&crashed, what);
        let size = qemu_info(&crashed)["virtual-size"].as_u64().unwrap();
        assert!(size == 1 << 30 || size == 3 << 30, "{what}: size {size}");
        sizes.insert(size);
        qemu_io(
            &crashed,
            &["read -P 0x11 0 64k".into(), "read -P 0x22 1M 64k".into()],
        );
    });
    assert_eq!(sizes.len(), 2, "both sizes must occur");
    // Once everything is durable, the new area reads as zeroes.
    let last = r.crash(r.len(), Pick::All);
    std::fs::write(&crashed, &last.image).unwrap();
    qemu_io(&crashed, &["read -P 0 2G 64k".into()]);
}
