//! `qemu-img amend` through sluice (`sluice_qcow2::amend`) on images
//! qemu-img made: version upgrades and downgrades keep every byte the
//! guest sees (zero clusters and backing files included), lazy refcounts
//! go on and off, refusals leave the file as it was, and every result is
//! clean under `qemu-img check`.

mod common;

use common::*;
use serde_json::{json, Value};
use sluice_drivers::open::{image_options, open_qcow2_detached};
use sluice_drivers::protocol::file::CacheMode;
use sluice_qcow2::amend::{amend, AmendOptions};

/// Amends `img` through sluice as `qemu-img amend -o LIST` would: opened
/// writable with its backing chain (detached: one qcow2 driver), amended,
/// closed.
async fn sluice_amend(img: &str, list: &[(&str, &str)]) -> sluice_core::Result<()> {
    let pairs: Vec<(String, String)> = list
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let opts = AmendOptions::parse(&pairs)?;
    let graph = sluice_core::Graph::new();
    let w = graph.writer().await;
    let image = image_options(img, None).map_err(sluice_core::Error::Other)?;
    let mut o = open_qcow2_detached(&w, image, CacheMode::WRITEBACK, false).await?;
    let mut steps = Vec::new();
    let res = amend(&mut o, &opts, false, &mut |d, t| steps.push((d, t))).await;
    let node = o.node.clone();
    drop(o);
    let drained = w.drain(&node).await;
    w.delete_node(&drained, &node)
        .await
        .unwrap_or_else(|e| panic!("closing {img}: {e}"));
    drop(drained);
    // A version change reports its progress to the end.
    if res.is_ok() && opts.compat.is_some() {
        assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "{steps:?}");
        if let Some(&(d, t)) = steps.last() {
            assert_eq!(d, t, "{steps:?}");
        }
    }
    res
}

fn specific(img: &str) -> Value {
    qemu_info(img)["format-specific"]["data"].clone()
}

/// Amends `img` as [`sluice_amend`] does, which must refuse: the file
/// keeps every byte. Returns the message.
async fn refused(img: &str, list: &[(&str, &str)]) -> String {
    let bytes = std::fs::read(img).unwrap();
    let e = sluice_amend(img, list).await.unwrap_err();
    assert_eq!(std::fs::read(img).unwrap(), bytes, "{list:?} wrote");
    e.to_string()
}

/// The map entry covering guest offset `at`.
fn map_at(img: &str, at: u64) -> Value {
    qemu_map(img)
        .into_iter()
        .find(|e| {
            let s = e["start"].as_u64().unwrap();
            s <= at && at < s + e["length"].as_u64().unwrap()
        })
        .unwrap()
}

/// A 64 MiB version 3 image with data, plain zero clusters and a
/// preallocated zero cluster.
fn image_with_zero_clusters(img: &str) {
    create_qcow2(img, "", "64M");
    qemu_io(
        img,
        &[
            "write -P 0x11 0 128k".into(),
            "write -z 128k 128k".into(),
            "write -P 0x22 1M 64k".into(),
            // Over allocated data: a zero cluster keeping its host cluster.
            "write -z 1M 64k".into(),
            "write -P 0x33 5M 192k".into(),
        ],
    );
    let zero = map_at(img, 1 << 20);
    assert_eq!(
        (zero["zero"].clone(), zero["present"].clone()),
        (json!(true), json!(true)),
        "fixture: {zero}"
    );
    assert!(zero["offset"].is_u64(), "fixture: preallocated zero {zero}");
}

#[tokio::test]
async fn downgrade_and_upgrade_keep_the_data() {
    let dir = TempDir::new("amend-roundtrip");
    let img = dir.path("img.qcow2");
    image_with_zero_clusters(&img);
    let before = qemu_raw(&img);

    sluice_amend(&img, &[("compat", "0.10")]).await.unwrap();
    assert_eq!(specific(&img)["compat"], json!("0.10"));
    assert_eq!(read_be(&img, 4, 4), 2);
    assert_clean(&img);
    assert_same("after the downgrade", &qemu_raw(&img), &before);
    // Without a backing file, zero clusters became unallocated; the
    // preallocated one is data (zeroed) at the same host offset.
    assert_eq!(map_at(&img, 128 << 10)["present"], json!(false));
    let pre = map_at(&img, 1 << 20);
    assert_eq!(
        (pre["data"].clone(), pre["zero"].clone()),
        (json!(true), json!(false)),
        "{pre}"
    );
    assert!(qemu_map(&img)
        .iter()
        .all(|e| e["zero"] == json!(false) || e["present"] == json!(false)));
    // sluice reads the version 2 image as qemu-img does.
    let o = open_image(&img, true).await.unwrap();
    assert_same("sluice read", &read_all(&o, 1 << 20).await, &before);
    drop(o);

    sluice_amend(&img, &[("compat", "1.1")]).await.unwrap();
    let spec = specific(&img);
    assert_eq!(spec["compat"], json!("1.1"));
    assert_eq!(spec["lazy-refcounts"], json!(false));
    assert_eq!(read_be(&img, 100, 4), 112, "header length");
    assert_clean(&img);
    assert_same("after the upgrade", &qemu_raw(&img), &before);
}

#[tokio::test]
async fn upgrade_matches_a_fresh_version_3_image() {
    let dir = TempDir::new("amend-upgrade");
    let v2 = dir.path("v2.qcow2");
    let v3 = dir.path("v3.qcow2");
    create_qcow2(&v2, "compat=0.10", "64M");
    create_qcow2(&v3, "", "64M");
    sluice_amend(&v2, &[("compat", "1.1")]).await.unwrap();
    // The header qemu-img writes: v3 fields, 112 bytes, the feature table.
    assert_eq!(std::fs::read(&v2).unwrap(), std::fs::read(&v3).unwrap());
}

#[tokio::test]
async fn downgrade_over_a_backing_file_writes_zeroes() {
    let dir = TempDir::new("amend-backing");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    create_qcow2(&base, "", "64M");
    qemu_io(&base, &["write -P 0x55 0 4M".into()]);
    create_overlay(&top, &base, "");
    qemu_io(
        &top,
        &[
            "write -z 0 128k".into(),
            "write -P 0x66 1M 64k".into(),
            "write -z 1M 64k".into(),
            "write -P 0x77 2M 64k".into(),
        ],
    );
    let before = qemu_raw(&top);
    assert!(before[..128 << 10].iter().all(|&b| b == 0));
    sluice_amend(&top, &[("compat", "0.10")]).await.unwrap();
    assert_eq!(specific(&top)["compat"], json!("0.10"));
    assert_clean(&top);
    assert_same("downgraded top", &qemu_raw(&top), &before);
    // The zero clusters are data of the top image now (depth 0): the
    // backing file must not show through.
    for at in [0u64, 64 << 10, 1 << 20] {
        let e = map_at(&top, at);
        assert_eq!(
            (e["depth"].clone(), e["data"].clone()),
            (json!(0), json!(true)),
            "{at:#x}: {e}"
        );
    }
    assert_eq!(map_at(&top, 3 << 20)["depth"], json!(1));
    // And back.
    sluice_amend(&top, &[("compat", "1.1")]).await.unwrap();
    assert_clean(&top);
    assert_same("upgraded top", &qemu_raw(&top), &before);
    assert_eq!(qemu_info(&top)["backing-filename"], json!(base));
}

#[tokio::test]
async fn lazy_refcounts_on_and_off() {
    let dir = TempDir::new("amend-lazy");
    let img = dir.path("img.qcow2");
    create_qcow2(&img, "", "64M");
    sluice_amend(&img, &[("lazy_refcounts", "on")])
        .await
        .unwrap();
    assert_eq!(specific(&img)["lazy-refcounts"], json!(true));
    assert_clean(&img);
    // Lazy writes through sluice, then turned off again.
    let o = open_image(&img, false).await.unwrap();
    o.root
        .write(
            0,
            sluice_core::IoBytes::copy_from(&[0x42; 65536 * 3]),
            sluice_core::WriteFlags::default(),
        )
        .await
        .unwrap();
    o.root.flush().await.unwrap();
    close(o).await;
    sluice_amend(&img, &[("lazy_refcounts", "off")])
        .await
        .unwrap();
    assert_eq!(specific(&img)["lazy-refcounts"], json!(false));
    assert!(!is_dirty(&img));
    assert_clean(&img);
    qemu_io(&img, &["read -P 0x42 0 192k".into()]);

    // A version 2 image has no lazy refcounts: QEMU's message, nothing
    // written.
    let v2 = dir.path("v2.qcow2");
    create_qcow2(&v2, "compat=0.10", "64M");
    assert_eq!(
        refused(&v2, &[("lazy_refcounts", "on")]).await,
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"
    );
    // Upgraded in the same amend, they may.
    sluice_amend(&v2, &[("compat", "1.1"), ("lazy_refcounts", "on")])
        .await
        .unwrap();
    let spec = specific(&v2);
    assert_eq!(
        (spec["compat"].clone(), spec["lazy-refcounts"].clone()),
        (json!("1.1"), json!(true))
    );
    assert_clean(&v2);
}

/// A dirty image (lazy refcounts, the writer killed): turning lazy
/// refcounts off, or downgrading, leaves it clean and its data whole.
#[tokio::test]
async fn a_dirty_image_is_made_clean() {
    let dir = TempDir::new("amend-dirty");
    for (i, list) in [&[("lazy_refcounts", "off")][..], &[("compat", "0.10")][..]]
        .into_iter()
        .enumerate()
    {
        let img = dir.path(&format!("img{i}.qcow2"));
        create_qcow2(&img, "lazy_refcounts=on", "64M");
        let out = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x24 0 1M",
                "-c",
                "write -z 1M 1M",
            ])
            .args(["-c", "abort", &img])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(is_dirty(&img), "fixture: the image must be dirty");
        sluice_amend(&img, list).await.unwrap();
        assert!(!is_dirty(&img), "{list:?}");
        let spec = specific(&img);
        assert_ne!(spec["lazy-refcounts"], json!(true), "{list:?}: {spec}");
        assert_clean(&img);
        qemu_io(
            &img,
            &["read -P 0x24 0 1M".into(), "read -P 0 1M 1M".into()],
        );
    }
}

#[tokio::test]
async fn size_grows_and_shrinks() {
    let dir = TempDir::new("amend-size");
    let img = dir.path("img.qcow2");
    create_qcow2(&img, "", "64M");
    qemu_io(&img, &["write -P 0x12 1M 1M".into()]);
    sluice_amend(&img, &[("size", "3G")]).await.unwrap();
    assert_eq!(qemu_info(&img)["virtual-size"], json!(3u64 << 30));
    assert_clean(&img);
    sluice_amend(&img, &[("size", "32M")]).await.unwrap();
    assert_eq!(qemu_info(&img)["virtual-size"], json!(32u64 << 20));
    assert_clean(&img);
    qemu_io(&img, &["read -P 0x12 1M 1M".into()]);
    assert_eq!(
        refused(&img, &[("size", "1000")]).await,
        "The new size must be a multiple of 512"
    );
}

/// A refused amend: the `qemu-img create -o` options (`DATA` standing for
/// a data file's name), the amend options, QEMU's message.
type Refusal<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

/// What QEMU refuses is refused with its message, and the file keeps
/// every byte.
#[tokio::test]
async fn refusals_write_nothing() {
    let dir = TempDir::new("amend-refuse");
    let downgrade: &[(&str, &str)] = &[("compat", "0.10")];
    let cases: &[Refusal] = &[
        (
            "extended_l2=on",
            downgrade,
            "Cannot downgrade an image with incompatible features 0x10 set",
        ),
        ("refcount_bits=8", downgrade, "compat=0.10 requires refcount_bits=16"),
        ("data_file=DATA", downgrade, "Cannot downgrade an image with a data file"),
        (
            "compat=1.1",
            &[("backing_file", "other.qcow2")],
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ),
        (
            "compat=1.1",
            &[("refcount_bits", "3")],
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            "compat=1.1",
            &[("refcount_bits", "8"), ("compat", "0.10")],
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ),
        ("compat=1.1", &[("compat", "2")], "Unknown compatibility level 2"),
        (
            "compat=1.1",
            &[("data_file", "x")],
            "data-file can only be set for images that use an external data file",
        ),
        (
            "compat=1.1",
            &[("lazy_refcounts", "on"), ("size", "1000")],
            "The new size must be a multiple of 512",
        ),
    ];
    for (i, (create, list, want)) in cases.iter().enumerate() {
        let img = dir.path(&format!("img{i}.qcow2"));
        let data = dir.path(&format!("img{i}.data"));
        create_qcow2(&img, &create.replace("DATA", &data), "64M");
        assert_eq!(refused(&img, list).await, *want, "{list:?}");
    }
    // zstd with compressed clusters cannot go back to version 2.
    let img = dir.path("zstd.qcow2");
    create_qcow2(&img, "compression_type=zstd", "64M");
    qemu_io(&img, &["write -c -P 7 0 64k".into()]);
    assert_eq!(
        refused(&img, downgrade).await,
        "Cannot downgrade an image with zstd compression type and existing compressed clusters"
    );
    // Without compressed clusters it can (as zlib).
    let img = dir.path("zstd-empty.qcow2");
    create_qcow2(&img, "compression_type=zstd", "64M");
    sluice_amend(&img, downgrade).await.unwrap();
    assert_eq!(specific(&img)["compression-type"], json!("zlib"));
    assert_clean(&img);
}

/// `refcount_bits` rebuilds the refcount structure with the new width:
/// data, snapshots' shared clusters and all stay, the image is clean;
/// a width too narrow for a refcount is refused with QEMU's message
/// before anything is written.
#[tokio::test]
async fn refcount_width_changes() {
    let dir = TempDir::new("amend-refcount");
    let img = dir.path("img.qcow2");
    create_qcow2(&img, "", "64M");
    qemu_io(
        &img,
        &["write -P 0x31 0 3M".into(), "write -z 3M 1M".into()],
    );
    qemu_img(&["snapshot", "-c", "s1", &img]);
    qemu_io(&img, &["write -P 0x32 0 1M".into()]);
    let before = qemu_raw(&img);
    for bits in [8u64, 64, 2, 16] {
        sluice_amend(&img, &[("refcount_bits", &bits.to_string())])
            .await
            .unwrap();
        assert_eq!(specific(&img)["refcount-bits"], json!(bits));
        assert_eq!(read_be(&img, 96, 4), u64::from(bits.trailing_zeros()));
        assert_clean(&img);
        assert_same(&format!("{bits} bits"), &qemu_raw(&img), &before);
    }
    // The snapshot still reads as it was.
    qemu_img(&["snapshot", "-a", "s1", &img]);
    qemu_io(&img, &["read -P 0x31 0 3M".into()]);
    // Clusters shared with the snapshots have refcounts above one: one
    // bit cannot hold them.
    qemu_img(&["snapshot", "-c", "s2", &img]);
    let e = refused(&img, &[("refcount_bits", "1")]).await;
    assert!(
        e.starts_with("Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x")
            && e.contains(" has a refcount of "),
        "{e}"
    );
    // Widened and downgraded in one amend (16 bits again first).
    let r8 = dir.path("r8.qcow2");
    create_qcow2(&r8, "refcount_bits=8", "64M");
    qemu_io(&r8, &["write -P 0x41 0 2M".into()]);
    sluice_amend(&r8, &[("compat", "0.10"), ("refcount_bits", "16")])
        .await
        .unwrap();
    let spec = specific(&r8);
    assert_eq!(
        (spec["compat"].clone(), spec["refcount-bits"].clone()),
        (json!("0.10"), json!(16))
    );
    assert_clean(&r8);
    qemu_io(&r8, &["read -P 0x41 0 2M".into()]);
}
