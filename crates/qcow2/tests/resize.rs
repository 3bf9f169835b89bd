//! Resizing qcow2 images (and the files under them) through sluice,
//! with QEMU's tools as the referee.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_core::{IoBytes, WriteFlags};

/// Resizes the image through its sluice node as `block_resize` does:
/// the driver, then the node's size.
async fn resize(o: &Opened, size: u64, prealloc: &str) -> sluice_core::Result<()> {
    o.node.driver().truncate(&o.node, size, prealloc).await?;
    o.node.set_size(size);
    Ok(())
}

/// How many bytes `qemu-img map` shows as data from 1 MiB on, and the
/// map.
fn data_from_1m(img: &str) -> (u64, Value) {
    let map: Value = serde_json::from_str(&qemu_img(&["map", "--output=json", img])).unwrap();
    let data = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == json!(true) && e["start"].as_u64().unwrap() >= 1 << 20)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    (data, map)
}

#[tokio::test]
async fn grow_keeps_data_and_maps_the_new_area() {
    let dir = TempDir::new("resize-grow");
    let img = dir.path("img.qcow2");
    // 1 GiB: two L1 entries; 3 GiB needs six, inside the L1 cluster.
    create_qcow2(&img, "", "1G");
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
    assert_eq!(qemu_info(&img)["virtual-size"], json!(3u64 << 30));
    assert_clean(&img);
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
    create_qcow2(&base, "", "10M");
    qemu_io(&base, &["write -P 0x11 0 10M".into()]);
    for t in [&top, &qtop] {
        create_overlay(t, &base, "4M");
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
    assert_clean(&top);
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
    create_qcow2(&base, "", "12M");
    qemu_io(&base, &["write -P 0x11 0 12M".into()]);
    let old = (4 << 20) + 512;
    let new = (10 << 20) + 512;
    for t in [&top, &qtop] {
        create_overlay(t, &base, &old.to_string());
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
    assert_clean(&top);
    qemu_img(&["compare", &top, &qtop]);
}

#[tokio::test]
async fn grow_with_full_preallocation() {
    let dir = TempDir::new("resize-full");
    let img = dir.path("img.qcow2");
    create_qcow2(&img, "", "1M");
    let o = open_image(&img, false).await.unwrap();
    resize(&o, 3 << 20, "full").await.unwrap();
    drop(o);
    assert_clean(&img);
    let (allocated, map) = data_from_1m(&img);
    assert_eq!(allocated, 2 << 20, "new area not preallocated: {map}");
    qemu_io(&img, &["read -P 0 0 3M".into()]);
}

#[tokio::test]
async fn shrink_only_past_unallocated_clusters() {
    let dir = TempDir::new("resize-shrink");
    let img = dir.path("img.qcow2");
    create_qcow2(&img, "", "10M");
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
    assert_eq!(qemu_info(&img)["virtual-size"], json!(end));
    assert_clean(&img);
    qemu_io(&img, &["read -P 0x33 1M 4k".into()]);
}

#[tokio::test]
async fn refusals_leave_the_image_alone() {
    let dir = TempDir::new("resize-refuse");
    // Snapshots: no shrinking.
    let snap = dir.path("snap.qcow2");
    create_qcow2(&snap, "", "10M");
    qemu_img(&["snapshot", "-c", "s1", &snap]);
    // Small clusters: an L1 table past the 32 MiB QEMU allows.
    let small = dir.path("small.qcow2");
    create_qcow2(&small, "cluster_size=512", "1M");
    let before = (
        std::fs::read(&snap).unwrap(),
        std::fs::read(&small).unwrap(),
    );

    let o = open_image(&snap, false).await.unwrap();
    let e = resize(&o, 5 << 20, "off").await.unwrap_err().to_string();
    assert!(e.contains("internal snapshots"), "{e}");
    drop(o);
    let o = open_image(&small, false).await.unwrap();
    let e = resize(&o, 1 << 50, "off").await.unwrap_err().to_string();
    assert!(e.contains("too large") && e.contains("L1 table"), "{e}");
    // Within the L1 cluster's room it grows (64 entries of 32 KiB each).
    resize(&o, 2 << 20, "off").await.unwrap();
    drop(o);
    let o = open_image(&snap, true).await.unwrap();
    assert!(resize(&o, 20 << 20, "off").await.is_err());
    drop(o);
    assert_eq!(std::fs::read(&snap).unwrap(), before.0);
    assert_eq!(qemu_info(&small)["virtual-size"], json!(2u64 << 20));
    assert_clean(&small);
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

fn l1_of(img: &str) -> (u64, u64) {
    (read_be(img, 40, 8), read_be(img, 36, 4))
}

/// 512-byte clusters map 32 KiB per L1 entry: 1M fills the L1 table's
/// cluster (32 entries of its 64), 64M needs 2048 entries — the table
/// moves, twice; with a snapshot (whose own L1 table stays) too.
#[tokio::test]
async fn grow_moves_the_l1_table() {
    let dir = TempDir::new("resize-move");
    for snapshot in [false, true] {
        let img = dir.path(&format!("img-{snapshot}.qcow2"));
        create_qcow2(&img, "cluster_size=512", "1M");
        qemu_io(
            &img,
            &[
                "write -P 0x11 0 4k".into(),
                "write -P 0x12 700k 40k".into(),
                "write -P 0x13 1020k 4k".into(),
            ],
        );
        if snapshot {
            qemu_img(&["snapshot", "-c", "s1", &img]);
            qemu_io(&img, &["write -P 0x14 0 1k".into()]);
        }
        let before = l1_of(&img);
        let o = open_image(&img, false).await.unwrap();
        resize(&o, 3 << 20, "off").await.unwrap();
        resize(&o, 64 << 20, "off").await.unwrap();
        o.root
            .write(
                (40 << 20) + 512,
                IoBytes::copy_from(&[0x22; 8192]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        close(o).await;
        let after = l1_of(&img);
        assert_ne!(after.0, before.0, "the L1 table did not move");
        assert_eq!(after.1, 2048);
        assert_eq!(qemu_info(&img)["virtual-size"], json!(64u64 << 20));
        assert_clean(&img);
        let first = if snapshot { 0x14 } else { 0x11 };
        qemu_io(
            &img,
            &[
                format!("read -P {first} 0 1k"),
                "read -P 0x11 1k 3k".into(),
                "read -P 0x12 700k 40k".into(),
                "read -P 0x13 1020k 4k".into(),
                "read -P 0 1M 39M".into(),
                format!("read -P 0x22 {} 8k", (40 << 20) + 512),
            ],
        );
        if snapshot {
            // The snapshot still shows what it saw.
            let snap = dir.path("snap.raw");
            qemu_img(&[
                "convert",
                "-O",
                "raw",
                "-l",
                "snapshot.name=s1",
                &img,
                &snap,
            ]);
            let raw = std::fs::read(&snap).unwrap();
            assert!(raw[..4096].iter().all(|&b| b == 0x11));
        }
    }
}

/// Metadata preallocation as QEMU does it: the new area's clusters are
/// mapped (L2 tables and data clusters), read as zeroes, and the file
/// grows sparse; `falloc` and `full` allocate the file's blocks too.
#[tokio::test]
async fn grow_with_metadata_and_falloc_preallocation() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("resize-prealloc");
    for mode in ["metadata", "falloc", "full"] {
        let img = dir.path(&format!("{mode}.qcow2"));
        let q = dir.path(&format!("q-{mode}.qcow2"));
        for i in [&img, &q] {
            // 4k clusters: 2M per L2 table, so 8M needs new L2 tables.
            create_qcow2(i, "cluster_size=4k", "1M");
            qemu_io(i, &["write -P 0x31 0 64k".into()]);
        }
        qemu_img(&["resize", "-q", &format!("--preallocation={mode}"), &q, "9M"]);
        let o = open_image(&img, false).await.unwrap();
        resize(&o, 9 << 20, mode).await.unwrap();
        close(o).await;
        assert_clean(&img);
        qemu_img(&["compare", &img, &q]);
        let (mapped, map) = data_from_1m(&img);
        assert_eq!(mapped, 8 << 20, "{mode}: new area not preallocated: {map}");
        let m = std::fs::metadata(&img).unwrap();
        assert!(m.len() >= 8 << 20, "{mode}: file of {} bytes", m.len());
        let blocks = m.blocks() * 512;
        if mode == "metadata" {
            assert!(blocks < 4 << 20, "{mode}: {blocks} bytes allocated");
        } else {
            assert!(blocks >= 8 << 20, "{mode}: only {blocks} bytes allocated");
        }
        qemu_io(
            &img,
            &["read -P 0x31 0 64k".into(), "read -P 0 64k 8M".into()],
        );
    }
}

mod crash_recorder;
use crash_recorder::{crash_images, recorded, Pick, Record};

/// Every crash point of `r`, with all, none and random subsets of the
/// unflushed writes on disk: QEMU finds no corruption, the size is
/// `old` or `new` (both occur), and `verify` accepts the image, opened
/// read-only through sluice, at that size. Ends with the image as it is
/// when everything is on disk, which must be clean.
async fn each_crash(
    r: &Record,
    seed: u64,
    path: &str,
    (old, new): (u64, u64),
    verify: impl Fn(&str, u64, &[u8]),
) {
    let mut sizes = std::collections::HashSet::new();
    for (_, what, image) in crash_images(r, seed) {
        std::fs::write(path, &image).unwrap();
        assert_no_corruption(path, &what);
        let size = qemu_info(path)["virtual-size"].as_u64().unwrap();
        assert!(size == old || size == new, "{what}: size {size}");
        sizes.insert(size);
        let o = open_image(path, true)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = o.root.read(0, size as usize).await.unwrap();
        verify(&what, size, &got);
    }
    assert_eq!(sizes.len(), 2, "both sizes must occur");
    let last = r.crash(r.len(), Pick::None);
    std::fs::write(path, &last.image).unwrap();
    assert_clean(path);
}

/// Growing past the L1 table's room moves it; a crash at every point of
/// that leaves the old or the new size, an image QEMU finds free of
/// corruption, and the data. `SLUICE_CRASH_SEED=<seed>` replays a run.
#[tokio::test]
async fn l1_move_survives_a_crash_anywhere() {
    let seed = crash_seed();
    let dir = TempDir::new("resize-move-crash");
    let img = dir.path("img.qcow2");
    create_qcow2(&img, "cluster_size=512", "1M");
    qemu_io(
        &img,
        &["write -P 0x11 0 4k".into(), "write -P 0x12 1020k 4k".into()],
    );
    let r = recorded(&img, |node| async move {
        // Dirty metadata first (a new L2 table and its refcounts), so
        // that the move runs with write-back work pending.
        node.write(
            600 << 10,
            IoBytes::copy_from(&[0x13; 2048]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        node.driver().truncate(&node, 8 << 20, "off").await.unwrap();
    })
    .await;
    let crashed = dir.path("crashed.qcow2");
    each_crash(&r, seed, &crashed, (1 << 20, 8 << 20), |what, _, got| {
        let ok = got[..4096].iter().all(|&b| b == 0x11)
            && got[1020 << 10..1 << 20].iter().all(|&b| b == 0x12);
        let mid = &got[600 << 10..(600 << 10) + 2048];
        let mid_ok = mid.iter().all(|&b| b == 0x13) || mid.iter().all(|&b| b == 0);
        assert!(ok && mid_ok, "{what}: data lost");
        assert!(got[1 << 20..].iter().all(|&b| b == 0), "{what}: new area");
    })
    .await;
}

/// Growing with `preallocation=metadata` over a larger backing file
/// (new L2 tables, data clusters at the end of the file, the partial
/// cluster at the old end zeroed): a crash anywhere leaves no
/// corruption and the old data; the new area reads as zeroes, or as the
/// backing file where the crash came before it was preallocated (as
/// with QEMU, see `resize.rs`).
#[tokio::test]
async fn metadata_preallocation_survives_a_crash_anywhere() {
    let seed = crash_seed();
    let dir = TempDir::new("resize-prealloc-crash");
    let base = dir.path("base.qcow2");
    let img = dir.path("img.qcow2");
    create_qcow2(&base, "", "8M");
    qemu_io(&base, &["write -P 0x44 0 8M".into()]);
    let old = (1 << 20) + 1024;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        &base,
        "-F",
        "qcow2",
        &img,
        &old.to_string(),
    ]);
    qemu_io(&img, &["write -P 0x31 0 64k".into()]);
    let r = recorded(&img, |node| async move {
        node.driver()
            .truncate(&node, 6 << 20, "metadata")
            .await
            .unwrap();
    })
    .await;
    let crashed = dir.path("crashed.qcow2");
    each_crash(&r, seed, &crashed, (old, 6 << 20), |what, size, got| {
        assert!(
            got[..64 << 10].iter().all(|&b| b == 0x31),
            "{what}: data lost"
        );
        assert!(
            got[64 << 10..old as usize].iter().all(|&b| b == 0x44),
            "{what}: backing data lost"
        );
        if size > old {
            let whole = (old as usize).next_multiple_of(4096);
            assert!(
                got[whole..].iter().all(|&b| b == 0 || b == 0x44),
                "{what}: new area"
            );
        }
    })
    .await;
    // Once everything is on disk the new area is mapped and reads as zeroes.
    let o = open_image(&crashed, true).await.unwrap();
    let got = o.root.read(old, (6 << 20) - old as usize).await.unwrap();
    assert!(got.iter().all(|&b| b == 0), "new area");
    drop(o);
    let map: Value = serde_json::from_str(&qemu_img(&["map", "--output=json", &crashed])).unwrap();
    let mapped: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == json!(true) && e["depth"] == json!(0))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        mapped >= (6 << 20) - (2 << 20),
        "new area not mapped: {map}"
    );
}
