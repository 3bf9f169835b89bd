//! Reading what QEMU wrote: images made by `qemu-img create`/`qemu-io`
//! over the layouts qcow2 allows, read through sluice and compared byte
//! for byte with `qemu-img convert -O raw`, and block status compared with
//! `qemu-img map --output=json`.

mod common;

use common::*;
use serde_json::json;

/// Writes, zero writes and discards scattered over an image of `size`
/// bytes with `cs`-byte clusters: partial clusters, unaligned runs across
/// clusters, the last cluster, subcluster-sized pieces.
fn workload(cs: u64, size: u64) -> Vec<String> {
    assert!(size >= 16 * cs);
    vec![
        format!("write -P 0x11 0 {}", cs / 2),
        format!("write -P 0x22 {} {}", cs + 123, 3 * cs),
        format!("write -P 0x33 {} 5000", size / 2 - 1000),
        format!("write -P 0x44 {} {}", size - cs, cs),
        format!("write -P 0x55 {} {}", 6 * cs, 4 * cs),
        format!("write -z {} {}", 6 * cs, 2 * cs),
        format!("write -z {} 1024", 9 * cs + 512),
        format!("write -P 0x66 {} {}", 12 * cs, 3 * cs),
        format!("discard {} {}", 12 * cs, 2 * cs),
        format!("write -P 0x77 {} 777", size / 4 + 7),
        format!("write -P 0x88 {} {}", 10 * cs + cs / 32, cs / 16),
        format!("write -z {} {}", 11 * cs + cs / 8, cs / 4),
    ]
}

fn create(img: &str, opts: &str, size: u64) {
    create_qcow2(img, opts, &size.to_string());
}

/// Reads the image through sluice in two request sizes and compares with
/// QEMU; compares block status too.
async fn check_image(img: &str, odd_chunks: bool) {
    let want = qemu_raw(img);
    let o = open_image(img, true)
        .await
        .unwrap_or_else(|e| panic!("open {img}: {e}"));
    assert_eq!(o.node.driver_name(), "qcow2");
    assert_same(img, &read_all(&o, MIB).await, &want);
    if odd_chunks {
        assert_same(
            &format!("{img} (odd chunks)"),
            &read_all(&o, 100_003).await,
            &want,
        );
    }
    assert_map_matches(img, &o, 512).await;
}

async fn layout_case(dir: &TempDir, name: &str, opts: &str, cs: u64, size: u64) {
    let img = dir.path(name);
    create(&img, opts, size);
    qemu_io(&img, &workload(cs, size));
    check_image(&img, true).await;
}

#[tokio::test]
async fn cluster_sizes() {
    let dir = TempDir::new("clusters");
    for (cs, size) in [
        (512, 2 * MIB),
        (4096, 4 * MIB),
        (65536, 8 * MIB),
        (2 * MIB, 40 * MIB),
    ] {
        layout_case(
            &dir,
            &format!("c{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            cs,
            size,
        )
        .await;
    }
}

#[tokio::test]
async fn refcount_widths() {
    let dir = TempDir::new("refcounts");
    for bits in [1, 16, 64] {
        layout_case(
            &dir,
            &format!("r{bits}.qcow2"),
            &format!("refcount_bits={bits},cluster_size=4096"),
            4096,
            4 * MIB,
        )
        .await;
    }
}

#[tokio::test]
async fn compat_0_10_and_1_1() {
    let dir = TempDir::new("compat");
    for (compat, cs) in [("0.10", 4096), ("0.10", 65536), ("1.1", 65536)] {
        layout_case(
            &dir,
            &format!("v{compat}-{cs}.qcow2"),
            &format!("compat={compat},cluster_size={cs}"),
            cs,
            8 * MIB,
        )
        .await;
    }
}

#[tokio::test]
async fn extended_l2_subclusters() {
    let dir = TempDir::new("extl2");
    for cs in [16384, 65536, 2 * MIB] {
        let size = if cs == 2 * MIB { 40 * MIB } else { 4 * MIB };
        layout_case(
            &dir,
            &format!("x{cs}.qcow2"),
            &format!("extended_l2=on,cluster_size={cs}"),
            cs,
            size,
        )
        .await;
    }
}

async fn compressed_case(dir: &TempDir, ctype: &str, cs: u64, size: u64) {
    let src = dir.path(&format!("src-{ctype}-{cs}.qcow2"));
    create(&src, "cluster_size=65536", size);
    qemu_io(&src, &workload(cs.max(4096), size));
    let img = dir.path(&format!("z-{ctype}-{cs}.qcow2"));
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &format!("compression_type={ctype},cluster_size={cs}"),
        &src,
        &img,
    ]);
    // Compressed clusters must be there: qemu-img map says so.
    let map = qemu_img(&["map", "--output=json", &img]);
    assert!(map.contains("\"compressed\": true"), "{map}");
    check_image(&img, cs <= 65536).await;
}

#[tokio::test]
async fn compressed_zlib() {
    let dir = TempDir::new("zlib");
    compressed_case(&dir, "zlib", 512, 2 * MIB).await;
    compressed_case(&dir, "zlib", 4096, 4 * MIB).await;
    compressed_case(&dir, "zlib", 65536, 4 * MIB).await;
    compressed_case(&dir, "zlib", 2 * MIB, 32 * MIB).await;
}

#[tokio::test]
async fn compressed_zstd() {
    let dir = TempDir::new("zstd");
    compressed_case(&dir, "zstd", 4096, 4 * MIB).await;
    compressed_case(&dir, "zstd", 65536, 4 * MIB).await;
    compressed_case(&dir, "zstd", 2 * MIB, 32 * MIB).await;
}

#[tokio::test]
async fn internal_snapshots_are_listed_and_kept() {
    let dir = TempDir::new("snap");
    let img = dir.path("s.qcow2");
    create(&img, "cluster_size=65536", 8 * MIB);
    qemu_io(&img, &workload(65536, 8 * MIB));
    qemu_img(&["snapshot", "-c", "first", &img]);
    qemu_io(
        &img,
        &[
            "write -P 0x99 0 100000".into(),
            "write -z 2097152 65536".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "second", &img]);
    qemu_io(&img, &["write -P 0xaa 4096 4096".into()]);
    check_image(&img, false).await;

    // The driver lists them as qemu-img does.
    let o = open_opts(json!({"driver": "file", "filename": img}), true)
        .await
        .unwrap();
    let d = sluice_qcow2::Qcow2Driver::open(&o.node, &Default::default(), true)
        .await
        .unwrap();
    let names: Vec<&str> = d.snapshots().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(d.snapshots()[0].id, "1");
    assert_eq!(d.snapshots()[1].disk_size, Some(8 * MIB));
    assert_eq!(d.header().nb_snapshots, 2);
}

#[tokio::test]
async fn chain_of_three() {
    let dir = TempDir::new("chain");
    let base = dir.path("base.qcow2");
    let mid = dir.path("mid.qcow2");
    let top = dir.path("top.qcow2");
    create(&base, "cluster_size=65536", 4 * MIB);
    qemu_io(&base, &workload(65536, 4 * MIB));
    // Relative backing names: resolved against the image's directory.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &mid,
        "6M",
    ]);
    qemu_io(
        &mid,
        &[
            "write -P 0xa1 70000 9000".into(),
            "write -z 300000 8192".into(),
            "discard 1048576 65536".into(),
            "write -P 0xa2 5000000 4096".into(),
        ],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536,extended_l2=on",
        "-b",
        &mid,
        "-F",
        "qcow2",
        &top,
        "8M",
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0xb1 3000 1000".into(),
            "write -z 131072 2048".into(),
            "write -P 0xb2 7000000 70000".into(),
        ],
    );
    check_image(&top, true).await;
    let o = open_image(&top, true).await.unwrap();
    let mid_node = o.node.child(sluice_core::Role::Backing).unwrap();
    assert!(mid_node.is_implicit() && mid_node.is_read_only());
    let base_node = mid_node.child(sluice_core::Role::Backing).unwrap();
    assert_eq!(base_node.size(), 4 * MIB);
    assert!(base_node.child(sluice_core::Role::Backing).is_none());
}

#[tokio::test]
async fn raw_base_and_probed_backing_format() {
    let dir = TempDir::new("rawbase");
    let base = dir.path("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", &base, "2M"]);
    run(
        "qemu-io",
        &["-f", "raw", &base, "-c", "write -P 0x5a 1000 300000"],
    );
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &top, "3M",
    ]);
    qemu_io(&top, &["write -P 0x6b 65536 1000".into()]);
    check_image(&top, true).await;

    // Without a backing format in the header, the base is probed.
    let base2 = dir.path("base2.qcow2");
    create(&base2, "cluster_size=4096", 2 * MIB);
    qemu_io(&base2, &["write -P 0x7c 0 10000".into()]);
    let top2 = dir.path("top2.qcow2");
    create_overlay(&top2, "base2.qcow2", "2M");
    let h = sluice_qcow2::chain::read_header_file(&top2).unwrap();
    assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
    // Rename the backing format extension to an unknown type.
    let raw = std::fs::read(&top2).unwrap();
    let at = raw
        .windows(4)
        .position(|w| w == 0xe279_2acau32.to_be_bytes())
        .unwrap();
    patch(&top2, at as u64, &0x1234_5678u32.to_be_bytes());
    let h = sluice_qcow2::chain::read_header_file(&top2).unwrap();
    assert_eq!(h.backing_format, None);
    let o = open_image(&top2, true).await.unwrap();
    let b = o.node.child(sluice_core::Role::Backing).unwrap();
    assert_eq!(b.driver_name(), "qcow2");
    let want = qemu_raw(&top2);
    assert_same("probed chain", &read_all(&o, MIB).await, &want);
}

#[tokio::test]
async fn backing_option_overrides_the_header() {
    let dir = TempDir::new("override");
    let base = dir.path("base.qcow2");
    create(&base, "cluster_size=4096", MIB);
    qemu_io(&base, &["write -P 0x31 0 4096".into()]);
    let top = dir.path("top.qcow2");
    create_overlay(&top, &base, "1M");
    // backing: null — no backing file, the unallocated parts read zeroes.
    let o = open_opts(
        json!({"driver": "qcow2", "backing": null, "file": {"driver": "file", "filename": top}}),
        true,
    )
    .await
    .unwrap();
    assert!(o.node.child(sluice_core::Role::Backing).is_none());
    assert!(o.root.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    // backing: nested options.
    let o = open_opts(
        json!({"driver": "qcow2", "file": {"driver": "file", "filename": top},
               "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": base}}}),
        true,
    )
    .await
    .unwrap();
    assert!(o
        .root
        .read(0, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0x31));
}

#[tokio::test]
async fn external_data_file() {
    let dir = TempDir::new("datafile");
    for raw in ["off", "on"] {
        let img = dir.path(&format!("d-{raw}.qcow2"));
        let data = dir.path(&format!("d-{raw}.data"));
        create(
            &img,
            &format!("data_file={data},data_file_raw={raw},cluster_size=65536"),
            4 * MIB,
        );
        qemu_io(&img, &workload(65536, 4 * MIB));
        let want = qemu_raw(&img);
        let o = open_image(&img, true).await.unwrap();
        assert!(o.node.child(sluice_core::Role::Data).is_some());
        assert_same(&img, &read_all(&o, 100_003).await, &want);
        // Given explicitly.
        let o = open_opts(
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": img},
                   "data-file": {"driver": "file", "filename": data}}),
            true,
        )
        .await
        .unwrap();
        assert_same(&img, &read_all(&o, MIB).await, &want);
    }
    // data-file for an image without one is refused.
    let img = dir.path("plain.qcow2");
    create(&img, "cluster_size=65536", MIB);
    let e = open_opts(
        json!({"driver": "qcow2", "file": {"driver": "file", "filename": img},
               "data-file": {"driver": "file", "filename": img}}),
        true,
    )
    .await
    .err()
    .unwrap();
    assert!(e.to_string().contains("data-file"), "{e}");
}

#[tokio::test]
async fn cache_options_are_accepted() {
    let dir = TempDir::new("cacheopts");
    let img = dir.path("c.qcow2");
    create(&img, "cluster_size=512", 2 * MIB);
    qemu_io(&img, &workload(512, 2 * MIB));
    let want = qemu_raw(&img);
    // A tiny L2 cache (two tables) still reads everything right.
    let o = open_opts(
        json!({"driver": "qcow2", "l2-cache-size": 1024, "refcount-cache-size": 1024,
               "cache-clean-interval": 0, "file": {"driver": "file", "filename": img}}),
        true,
    )
    .await
    .unwrap();
    assert_same("small cache", &read_all(&o, 100_003).await, &want);
    let e = open_opts(
        json!({"driver": "qcow2", "l2-cache-sise": 1, "file": {"driver": "file", "filename": img}}),
        true,
    )
    .await
    .err()
    .unwrap();
    assert!(e.to_string().contains("l2-cache-sise"), "{e}");
}
