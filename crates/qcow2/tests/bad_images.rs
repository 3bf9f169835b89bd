//! Hostile and broken images: each gets a clear error, never a panic or a
//! huge allocation.

mod common;

use common::*;
use serde_json::json;
use sluice_core::{IoBytes, WriteFlags};

fn make(dir: &TempDir, name: &str, opts: &str, size: &str) -> String {
    let img = dir.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &img, size]);
    img
}

async fn open_err(img: &str, read_only: bool) -> String {
    let opts = json!({"driver": "qcow2", "file": {"driver": "file", "filename": img}});
    match open_opts(opts, read_only).await {
        Ok(_) => panic!("{img}: opened although broken"),
        Err(e) => e.to_string(),
    }
}

fn expect(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} lacks {p:?}");
    }
}

#[tokio::test]
async fn truncated_files() {
    let dir = TempDir::new("trunc");
    let img = make(&dir, "t.qcow2", "cluster_size=65536", "1M");
    let full = std::fs::read(&img).unwrap();
    for len in [0usize, 3, 50, 100] {
        let p = dir.path(&format!("t{len}.qcow2"));
        std::fs::write(&p, &full[..len]).unwrap();
        let e = open_err(&p, true).await;
        assert!(e.contains(&p), "{e}");
        if len >= 4 {
            expect(&e, &["truncated"]);
        } else {
            expect(&e, &["not in qcow2 format"]);
        }
    }
    // Header intact, tables cut off.
    let p = dir.path("t-tables.qcow2");
    std::fs::write(&p, &full[..65536]).unwrap();
    let e = open_err(&p, true).await;
    expect(&e, &["past the end", &p]);
}

#[tokio::test]
async fn bad_magic_and_version() {
    let dir = TempDir::new("magic");
    let img = make(&dir, "m.qcow2", "cluster_size=65536", "1M");
    patch(&img, 0, b"QFI\x00");
    expect(&open_err(&img, true).await, &["not in qcow2 format", &img]);
    let img = make(&dir, "v.qcow2", "cluster_size=65536", "1M");
    patch(&img, 4, &4u32.to_be_bytes());
    expect(
        &open_err(&img, true).await,
        &["Unsupported qcow2 version 4"],
    );
}

#[tokio::test]
async fn absurd_header_fields() {
    let dir = TempDir::new("fields");
    let img = make(&dir, "l1.qcow2", "cluster_size=65536", "1M");
    patch(&img, 36, &u32::MAX.to_be_bytes());
    expect(
        &open_err(&img, true).await,
        &["L1 table too large", "offset 36"],
    );

    let img = make(&dir, "l1small.qcow2", "cluster_size=512", "1G");
    patch(&img, 36, &1u32.to_be_bytes());
    expect(&open_err(&img, true).await, &["L1 table is too small"]);

    let img = make(&dir, "cb.qcow2", "cluster_size=65536", "1M");
    patch(&img, 20, &30u32.to_be_bytes());
    expect(
        &open_err(&img, true).await,
        &["Unsupported cluster size: 2^30"],
    );

    let img = make(&dir, "size.qcow2", "cluster_size=512", "1M");
    patch(&img, 24, &u64::MAX.to_be_bytes());
    expect(&open_err(&img, true).await, &["too big"]);

    let img = make(&dir, "rt0.qcow2", "cluster_size=65536", "1M");
    patch(&img, 48, &0u64.to_be_bytes());
    expect(
        &open_err(&img, true).await,
        &["reference count table", "overlaps the header"],
    );

    let img = make(&dir, "l1hdr.qcow2", "cluster_size=65536", "1M");
    patch(&img, 40, &0u64.to_be_bytes());
    expect(
        &open_err(&img, true).await,
        &["L1 table", "overlaps the header"],
    );

    let img = make(&dir, "l1unal.qcow2", "cluster_size=65536", "1M");
    patch(&img, 40, &0x30200u64.to_be_bytes());
    expect(&open_err(&img, true).await, &["not aligned"]);

    let img = make(&dir, "l1eof.qcow2", "cluster_size=65536", "1M");
    patch(&img, 40, &(1u64 << 40).to_be_bytes());
    expect(&open_err(&img, true).await, &["past the end"]);

    let img = make(&dir, "ro.qcow2", "cluster_size=65536", "1M");
    patch(&img, 96, &7u32.to_be_bytes());
    expect(&open_err(&img, true).await, &["may not exceed 64 bits"]);

    let img = make(&dir, "hl.qcow2", "cluster_size=65536", "1M");
    patch(&img, 100, &200_000u32.to_be_bytes());
    expect(&open_err(&img, true).await, &["exceeds cluster size"]);

    let img = make(&dir, "crypt.qcow2", "cluster_size=65536", "1M");
    patch(&img, 32, &1u32.to_be_bytes());
    expect(&open_err(&img, true).await, &["encrypted"]);

    let img = make(&dir, "snaps.qcow2", "cluster_size=65536", "1M");
    patch(&img, 60, &u32::MAX.to_be_bytes());
    expect(&open_err(&img, true).await, &["Too many snapshots"]);
}

#[tokio::test]
async fn unknown_incompatible_feature() {
    let dir = TempDir::new("feat");
    let img = make(&dir, "f.qcow2", "cluster_size=65536", "1M");
    let mut bits = [0u8; 8];
    bits[7] = 1 << 6; // bit 6
    patch(&img, 72, &bits);
    let e = open_err(&img, true).await;
    expect(
        &e,
        &[
            "Unsupported qcow2 feature(s)",
            "Unknown incompatible feature: 40",
        ],
    );
    // qemu-img refuses it the same way.
    let out = std::process::Command::new("qemu-img")
        .args(["info", &img])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unsupported qcow2 feature(s)"));
}

/// `img` opens (`read_only` or not) and its first 4 KiB read as 0x42.
async fn opens_and_reads_0x42(img: &str, read_only: bool) {
    let o = open_image(img, read_only).await.unwrap();
    assert!(o
        .root
        .read(0, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0x42));
}

#[tokio::test]
async fn corrupt_and_dirty_bits() {
    let dir = TempDir::new("bits");
    for (bit, word) in [(1u8, "corrupt"), (0u8, "dirty")] {
        let img = make(&dir, &format!("{word}.qcow2"), "cluster_size=65536", "1M");
        qemu_io(&img, &["write -P 0x42 0 4096".into()]);
        let mut bits = [0u8; 8];
        bits[7] = 1 << bit;
        patch(&img, 72, &bits);
        // Read-only: allowed, and reads right.
        opens_and_reads_0x42(&img, true).await;
        if word == "corrupt" {
            // Writable: refused.
            let e = open_err(&img, false).await;
            expect(&e, &[word, &img]);
        } else {
            // Writable: the refcounts are rebuilt first, as QEMU does,
            // and the image is marked clean again.
            opens_and_reads_0x42(&img, false).await;
            let header = std::fs::read(&img).unwrap();
            assert_eq!(header[79] & 1, 0, "dirty bit cleared");
            qemu_img(&["check", &img]);
        }
    }
}

#[tokio::test]
async fn read_only_nodes_refuse_writes() {
    let dir = TempDir::new("ro");
    // Read-only nodes refuse before the driver is asked.
    let img = make(&dir, "w.qcow2", "cluster_size=65536", "1M");
    let o = open_image(&img, true).await.unwrap();
    let e = o
        .node
        .write(0, IoBytes::copy_from(&[1; 512]), WriteFlags::default())
        .await
        .unwrap_err();
    expect(&e.to_string(), &["read-only"]);
}

#[tokio::test]
async fn backing_loops_and_deep_chains() {
    let dir = TempDir::new("loops");
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    let u = |img: &str, backing: &str| {
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", img, "1M",
        ]);
    };
    u(&a, "b.qcow2");
    u(&b, "a.qcow2");
    let e = open_err(&a, true).await;
    expect(&e, &["loops", "a.qcow2"]);
    let s = dir.path("self.qcow2");
    u(&s, "self.qcow2");
    expect(&open_err(&s, true).await, &["loops"]);

    // 300 deep: refused before anything is opened.
    let mut prev = dir.path("d0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &prev, "1M"]);
    for i in 1..300 {
        let next = dir.path(&format!("d{i}.qcow2"));
        u(&next, &format!("d{}.qcow2", i - 1));
        prev = next;
    }
    expect(&open_err(&prev, true).await, &["deeper than 256"]);
    // 100 deep opens and reads.
    let top = dir.path("d100.qcow2");
    qemu_io(&dir.path("d0.qcow2"), &["write -P 0x17 0 512".into()]);
    let o = open_image(&top, true).await.unwrap();
    assert!(o
        .root
        .read(0, 512)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0x17));

    // A missing backing file.
    let m = dir.path("missing.qcow2");
    u(&m, "nonexistent.qcow2");
    expect(&open_err(&m, true).await, &["nonexistent.qcow2"]);
}

#[tokio::test]
async fn bad_compressed_cluster() {
    let dir = TempDir::new("badz");
    let src = dir.path("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &src, "1M"]);
    qemu_io(&src, &["write -P 0x12 0 65536".into()]);
    let img = dir.path("z.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", &src, &img]);
    // Find the compressed stream through L1 and L2 and garble it.
    let raw = std::fs::read(&img).unwrap();
    let l1 = u64::from_be_bytes(raw[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(raw[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = u64::from_be_bytes(raw[l2..l2 + 8].try_into().unwrap());
    assert!(entry & (1 << 62) != 0, "cluster 0 is not compressed");
    let (host, len) = sluice_qcow2::format::compressed_descriptor(entry, 16);
    let n = len.min(raw.len() as u64 - host);
    patch(&img, host, &vec![0xff; n as usize]);
    let o = open_image(&img, true).await.unwrap();
    let e = o.root.read(0, 65536).await.unwrap_err().to_string();
    expect(&e, &["compressed cluster", "guest offset 0x0"]);
    // The rest of the image still reads.
    assert!(o
        .root
        .read(65536, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[tokio::test]
async fn bad_l2_entries() {
    let dir = TempDir::new("badl2");
    let img = make(&dir, "l2.qcow2", "cluster_size=65536", "1M");
    qemu_io(&img, &["write -P 0x12 0 4096".into()]);
    // The L1 table is at the offset in the header; its first entry points
    // at the L2 table; make that L2 table's first entry unaligned.
    let raw = std::fs::read(&img).unwrap();
    let l1 = u64::from_be_bytes(raw[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(raw[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = u64::from_be_bytes(raw[l2..l2 + 8].try_into().unwrap());
    patch(&img, l2 as u64, &(e | 0x200).to_be_bytes());
    let o = open_image(&img, true).await.unwrap();
    let err = o.root.read(0, 512).await.unwrap_err().to_string();
    expect(&err, &["unaligned", &img]);
    // An L1 entry pointing past the end of the file.
    patch(&img, l2 as u64, &e.to_be_bytes());
    patch(&img, l1 as u64, &(1u64 << 40).to_be_bytes());
    let o = open_image(&img, true).await.unwrap();
    let err = o.root.read(0, 512).await.unwrap_err().to_string();
    expect(&err, &["L2 table", "past the end"]);
}

#[tokio::test]
async fn a_broken_image_mid_chain_leaves_no_nodes_behind() {
    let dir = TempDir::new("midchain");
    let base = dir.path("base.qcow2");
    let mid = dir.path("mid.qcow2");
    let top = dir.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "1M"]);
    create_overlay(&mid, "base.qcow2", "1M");
    create_overlay(&top, "mid.qcow2", "1M");
    // Break mid so that its header passes (the chain walk reads it) but
    // opening fails: a snapshot entry with too much extra data, in the
    // L1 table's cluster past its one entry.
    let raw = std::fs::read(&mid).unwrap();
    let l1 = u64::from_be_bytes(raw[40..48].try_into().unwrap());
    patch(&mid, 60, &1u32.to_be_bytes());
    patch(&mid, 64, &l1.to_be_bytes());
    patch(&mid, l1 + 36, &0xffffu32.to_be_bytes());
    assert!(sluice_qcow2::chain::read_header_file(&mid).is_ok());
    let graph = sluice_core::Graph::new();
    let w = graph.writer().await;
    let opts = json!({"driver": "qcow2", "file": {"driver": "file", "filename": top}});
    let e = sluice_drivers::open::open_with(
        &w,
        opts,
        sluice_drivers::protocol::file::CacheMode::WRITEBACK,
        true,
    )
    .await
    .err()
    .unwrap()
    .to_string();
    expect(&e, &["extra data", "mid.qcow2"]);
    drop(w);
    let left: Vec<String> = graph.nodes().iter().map(|n| n.name().to_string()).collect();
    assert!(left.is_empty(), "nodes left behind: {left:?}");
}
