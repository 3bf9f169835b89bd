//! Resizing qcow2 images (and the files under them) through sluice,
//! with QEMU's tools as the referee.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_core::{IoBytes, WriteFlags};

fn info(img: &str) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", img])).unwrap()
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

/// Resizes the image through its sluice node as `block_resize` does:
/// the driver, then the node's size.
async fn resize(o: &Opened, size: u64, prealloc: &str) -> sluice_core::Result<()> {
    o.node.driver().truncate(&o.node, size, prealloc).await?;
    o.node.set_size(size);
    Ok(())
}

#[tokio::test]
async fn grow_keeps_data_and_maps_the_new_area() {
    let dir = TempDir::new("resize-grow");
    let img = dir.path("img.qcow2");
    // 1 GiB: two L1 entries; 3 GiB needs six, inside the L1 cluster.
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "1G"]);
    qemu_io(&img, &["write -P 0x11 1023M 1M".into()]);
    let o = open_image(&img, false).await.unwrap();
    resize(&o, 3 << 30, "off").await.unwrap();
    let at = (5u64 << 29) + 4096;
    o.root
        .write(
            at,
            IoBytes::copy_from(&[0x22; 65536]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    o.root.flush().await.unwrap();
    assert!(o
        .root
        .read(2 << 30, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    drop(o);
    assert_eq!(info(&img)["virtual-size"], json!(3u64 << 30));
    check_clean(&img);
    qemu_io(
        &img,
        &[
            "read -P 0x11 1023M 1M".into(),
            format!("read -P 0x22 {at} 64k"),
            "read -P 0 2G 1M".into(),
        ],
    );
    // And sluice reopens it at the new size.
    let o = open_image(&img, true).await.unwrap();
    assert_eq!(o.node.size(), 3 << 30);
}

#[tokio::test]
async fn grow_over_a_larger_backing_file_reads_zeroes() {
    let dir = TempDir::new("resize-backing");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    let qtop = dir.path("qtop.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "10M"]);
    qemu_io(&base, &["write -P 0x11 0 10M".into()]);
    for t in [&top, &qtop] {
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", t, "4M",
        ]);
    }
    // QEMU's behaviour: the new area does not show the backing file.
    qemu_img(&["resize", "-q", &qtop, "10M"]);
    qemu_io(&qtop, &["read -P 0 4M 6M".into()]);

    let o = open_image(&top, false).await.unwrap();
    resize(&o, 10 << 20, "off").await.unwrap();
    let got = o.root.read(0, 10 << 20).await.unwrap();
    assert!(got[..4 << 20].iter().all(|&b| b == 0x11));
    assert!(
        got[4 << 20..].iter().all(|&b| b == 0),
        "backing shows through"
    );
    drop(o);
    check_clean(&top);
    qemu_io(
        &top,
        &["read -P 0x11 0 4M".into(), "read -P 0 4M 6M".into()],
    );
    qemu_img(&["compare", &top, &qtop]);
}

#[tokio::test]
async fn grow_unaligned_over_a_larger_backing_file() {
    let dir = TempDir::new("resize-unaligned");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    let qtop = dir.path("qtop.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "12M"]);
    qemu_io(&base, &["write -P 0x11 0 12M".into()]);
    let old = (4 << 20) + 512;
    let new = (10 << 20) + 512;
    for t in [&top, &qtop] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &base,
            "-F",
            "qcow2",
            t,
            &old.to_string(),
        ]);
    }
    qemu_img(&["resize", "-q", &qtop, &new.to_string()]);
    let o = open_image(&top, false).await.unwrap();
    resize(&o, new, "off").await.unwrap();
    let got = o.root.read(0, new as usize).await.unwrap();
    assert!(got[..old as usize].iter().all(|&b| b == 0x11));
    assert!(
        got[old as usize..].iter().all(|&b| b == 0),
        "backing shows through"
    );
    drop(o);
    check_clean(&top);
    qemu_img(&["compare", &top, &qtop]);
}

#[tokio::test]
async fn grow_with_full_preallocation() {
    let dir = TempDir::new("resize-full");
    let img = dir.path("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "1M"]);
    let o = open_image(&img, false).await.unwrap();
    resize(&o, 3 << 20, "full").await.unwrap();
    drop(o);
    check_clean(&img);
    let map: Value = serde_json::from_str(&qemu_img(&["map", "--output=json", &img])).unwrap();
    let allocated: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == json!(true) && e["start"].as_u64().unwrap() >= 1 << 20)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(allocated, 2 << 20, "new area not preallocated: {map}");
    qemu_io(&img, &["read -P 0 0 3M".into()]);
}

#[tokio::test]
async fn shrink_only_past_unallocated_clusters() {
    let dir = TempDir::new("resize-shrink");
    let img = dir.path("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "10M"]);
    qemu_io(
        &img,
        &["write -P 0x33 1M 64k".into(), "write -z 6M 64k".into()],
    );
    let o = open_image(&img, false).await.unwrap();
    let node = o.node.name().to_string();
    // A zero cluster at 6M is in the way.
    let e = resize(&o, 5 << 20, "off").await.unwrap_err().to_string();
    assert!(e.contains(&node) && e.contains("0x600000"), "{e}");
    // 7M is past it.
    resize(&o, 7 << 20, "off").await.unwrap();
    // Data at 1M blocks a shrink to 512K.
    let e = resize(&o, 512 << 10, "off").await.unwrap_err().to_string();
    assert!(e.contains(&node) && e.contains("0x100000"), "{e}");
    // An unaligned end inside the zero cluster is fine.
    let end = (6 << 20) + 4096;
    resize(&o, end, "off").await.unwrap();
    let e = resize(&o, 1000, "off").await.unwrap_err().to_string();
    assert!(e.contains("multiple of 512"), "{e}");
    let e = resize(&o, 512 << 10, "full").await.unwrap_err().to_string();
    assert!(
        e.contains("Preallocation can't be used for shrinking"),
        "{e}"
    );
    assert_eq!(o.node.size(), end);
    drop(o);
    assert_eq!(info(&img)["virtual-size"], json!(end));
    check_clean(&img);
    qemu_io(&img, &["read -P 0x33 1M 4k".into()]);
}

#[tokio::test]
async fn refusals_leave_the_image_alone() {
    let dir = TempDir::new("resize-refuse");
    // Snapshots: no shrinking.
    let snap = dir.path("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &snap, "10M"]);
    qemu_img(&["snapshot", "-c", "s1", &snap]);
    // Small clusters: 1M needs more L1 entries than one 512-byte cluster
    // holds, and the L1 table cannot move yet.
    let small = dir.path("small.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        &small,
        "1M",
    ]);
    let before = (
        std::fs::read(&snap).unwrap(),
        std::fs::read(&small).unwrap(),
    );

    let o = open_image(&snap, false).await.unwrap();
    let e = resize(&o, 5 << 20, "off").await.unwrap_err().to_string();
    assert!(e.contains("internal snapshots"), "{e}");
    drop(o);
    let o = open_image(&small, false).await.unwrap();
    let e = resize(&o, 64 << 20, "off").await.unwrap_err().to_string();
    assert!(e.contains("L1 table"), "{e}");
    // Within the L1 cluster's room it grows (64 entries of 32 KiB each).
    resize(&o, 2 << 20, "off").await.unwrap();
    drop(o);
    let o = open_image(&snap, true).await.unwrap();
    assert!(resize(&o, 20 << 20, "off").await.is_err());
    drop(o);
    assert_eq!(std::fs::read(&snap).unwrap(), before.0);
    assert_eq!(info(&small)["virtual-size"], json!(2u64 << 20));
    check_clean(&small);
}

/// The `file` protocol's resize: plain, `falloc` and `full`.
#[tokio::test]
async fn file_protocol_truncate() {
    let dir = TempDir::new("resize-file");
    let f = dir.path("f.raw");
    std::fs::write(&f, [0x44u8; 4096]).unwrap();
    let o = open_opts(json!({"driver": "file", "filename": f}), false)
        .await
        .unwrap();
    let blocks = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    resize(&o, 1 << 20, "off").await.unwrap();
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 1 << 20);
    assert!(blocks(&f) < 1 << 20, "off must not allocate");
    resize(&o, 2 << 20, "falloc").await.unwrap();
    assert!(blocks(&f) >= 1 << 20, "falloc must allocate the new area");
    resize(&o, 3 << 20, "full").await.unwrap();
    assert!(blocks(&f) >= 2 << 20, "full must allocate the new area");
    let e = resize(&o, 4096, "full").await.unwrap_err().to_string();
    assert!(e.contains("Cannot use preallocation for shrinking"), "{e}");
    let e = resize(&o, 4 << 20, "metadata")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Unsupported preallocation mode: metadata"),
        "{e}"
    );
    resize(&o, 4096, "off").await.unwrap();
    drop(o);
    assert_eq!(std::fs::read(&f).unwrap(), vec![0x44u8; 4096]);
}
