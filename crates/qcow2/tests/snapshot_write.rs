//! Internal snapshots written by sluice (`sluice_qcow2::snapshot`):
//! create, apply and delete on images QEMU made, with QEMU as the
//! referee: `qemu-img check` finds every result clean, `qemu-img convert
//! -l` reads each snapshot as it was, data written after a snapshot is
//! copied (the snapshot keeps the old data), apply brings it back, and
//! delete gives the clusters back.

mod common;

use common::*;
use sluice_core::{IoBytes, Node, WriteFlags};
use sluice_qcow2::format::Snapshot;
use sluice_qcow2::snapshot::{self, SnapshotError, SnapshotResult};
use sluice_qcow2::{Qcow2Driver, Qcow2Options};
use std::sync::Arc;

/// Runs `op` on a qcow2 driver of its own over `img`'s file (as `sluice
/// img snapshot` does), then closes it.
async fn on_image<T>(
    img: &str,
    read_only: bool,
    op: impl AsyncFnOnce(&Qcow2Driver, &Arc<Node>) -> SnapshotResult<T>,
) -> SnapshotResult<T> {
    let (graph, file) = open_file_node(img, read_only).await;
    let opts = Qcow2Options {
        file: serde_json::Value::String(file.name().to_string()),
        ..Default::default()
    };
    let d = Qcow2Driver::open(&file, &opts, read_only)
        .await
        .unwrap_or_else(|e| panic!("{img}: {e}"));
    let res = op(&d, &file).await;
    snapshot::close(&d, &file).await.unwrap();
    drop(d);
    let w = graph.writer().await;
    let drained = w.drain(&file).await;
    w.delete_node(&drained, &file).await.unwrap();
    res
}

async fn create(img: &str, name: &str) -> Snapshot {
    on_image(img, false, async |d, f| {
        snapshot::create(d, f, name, snapshot::now()).await
    })
    .await
    .unwrap_or_else(|e| panic!("{img}: create {name}: {e}"))
}

async fn apply(img: &str, name: &str) -> SnapshotResult<Snapshot> {
    on_image(img, false, async |d, f| snapshot::apply(d, f, name).await).await
}

async fn delete(img: &str, id: Option<&str>, name: Option<&str>) -> SnapshotResult<Snapshot> {
    on_image(img, false, async |d, f| {
        snapshot::delete(d, f, id, name).await
    })
    .await
}

/// Creating snapshot "x" through a driver of its own, which must fail.
async fn create_err(img: &str, read_only: bool) -> SnapshotError {
    on_image(img, read_only, async |d, f| {
        snapshot::create(d, f, "x", (0, 0)).await
    })
    .await
    .unwrap_err()
}

/// `load_snapshot` (what `-l` opens) through a driver of its own.
async fn load(
    img: &str,
    read_only: bool,
    id: Option<&str>,
    name: Option<&str>,
) -> SnapshotResult<Snapshot> {
    on_image(img, read_only, async |d, f| {
        d.load_snapshot(f, id, name).await
    })
    .await
}

/// (id, name, disk size) of every snapshot, as `qemu-img info` lists them.
fn qemu_snapshots(img: &str) -> Vec<(String, String, u64)> {
    let info = qemu_info(img);
    info["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap().to_string(),
                        s["name"].as_str().unwrap().to_string(),
                        s["vm-state-size"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn allocated_clusters(img: &str) -> u64 {
    let (code, json) = qemu_check_json(img, &[]);
    assert_eq!(code, 0, "{img}: {json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["allocated-clusters"].as_u64().unwrap()
}

/// Writes through sluice's own write path (which copies what a snapshot
/// shares) and updates the model.
async fn write(img: &str, model: &mut [u8], writes: &[(u64, usize, u8)]) {
    let o = open_image(img, false).await.unwrap();
    for &(off, len, b) in writes {
        let data = vec![b; len];
        model[off as usize..off as usize + len].copy_from_slice(&data);
        o.root
            .write(off, IoBytes::copy_from(&data), WriteFlags::default())
            .await
            .unwrap_or_else(|e| panic!("{img}: write at {off:#x}: {e}"));
    }
    close(o).await;
}

const COPIED: u64 = 1 << 63;

async fn round_trip(opts: &str) {
    let dir = TempDir::new("snapwrite");
    let img = dir.path("s.qcow2");
    create_qcow2(&img, opts, "8M");
    qemu_io(
        &img,
        &[
            "write -P 1 0 1M".into(),
            "write -c -P 2 2M 64k".into(),
            "write -P 3 4M 128k".into(),
        ],
    );
    let before = allocated_clusters(&img);
    let s1_data = qemu_raw(&img);
    let cluster0 = read_be(&img, l2_entry_at(&img, 0), 8);
    assert_ne!(cluster0 & COPIED, 0, "{opts}: a fresh cluster is COPIED");
    let host0 = cluster0 & 0x00ff_ffff_ffff_fe00;
    let cb = read_be(&img, 20, 4);

    let sn = create(&img, "s1").await;
    assert_eq!((sn.id.as_str(), sn.name.as_str()), ("1", "s1"));
    assert_clean(&img);
    assert_eq!(
        qemu_snapshots(&img),
        vec![("1".to_string(), "s1".to_string(), 0)]
    );
    let info = qemu_info(&img);
    assert_eq!(info["snapshots"][0]["vm-clock-nsec"], 0);
    // The cluster is shared: refcount 2, no COPIED flag.
    assert_eq!(peek_refcount16(&img, host0 >> cb), 2, "{opts}");
    assert_eq!(read_be(&img, l2_entry_at(&img, 0), 8) & COPIED, 0, "{opts}");
    assert_same(&format!("{opts}: s1"), &snapshot_raw(&img, "s1"), &s1_data);

    // Writes after the snapshot go to new clusters; s1 keeps the old.
    let mut model = s1_data.clone();
    write(
        &img,
        &mut model,
        &[
            (4096, 10_000, 0x41),
            (64 * KIB, 64 * KIB as usize, 0x42),
            (2 * MIB + 100, 1000, 0x43),
            (6 * MIB, 70_000, 0x44),
        ],
    )
    .await;
    assert_clean(&img);
    assert_same(&format!("{opts}: active"), &qemu_raw(&img), &model);
    assert_same(
        &format!("{opts}: s1 after writes"),
        &snapshot_raw(&img, "s1"),
        &s1_data,
    );

    // A second snapshot, of the written state; then back to s1.
    let sn2 = create(&img, "s2").await;
    assert_eq!(sn2.id, "2");
    assert_clean(&img);
    let applied = apply(&img, "s1").await.unwrap();
    assert_eq!(applied.id, "1");
    assert_clean(&img);
    assert_same(&format!("{opts}: applied s1"), &qemu_raw(&img), &s1_data);
    assert_same(&format!("{opts}: s2"), &snapshot_raw(&img, "s2"), &model);
    // By id too: back to s2.
    apply(&img, "2").await.unwrap();
    assert_clean(&img);
    assert_same(&format!("{opts}: applied 2"), &qemu_raw(&img), &model);
    apply(&img, "s1").await.unwrap();

    // Deleting both gives every cluster back and the flags with it.
    delete(&img, Some("2"), Some("s2")).await.unwrap();
    assert_clean(&img);
    assert_eq!(
        qemu_snapshots(&img),
        vec![("1".to_string(), "s1".to_string(), 0)]
    );
    delete(&img, None, Some("s1")).await.unwrap();
    assert_clean(&img);
    assert!(qemu_snapshots(&img).is_empty());
    assert_eq!(read_be(&img, 60, 4), 0, "{opts}: nb_snapshots");
    assert_eq!(read_be(&img, 64, 8), 0, "{opts}: snapshots_offset");
    assert_same(&format!("{opts}: after delete"), &qemu_raw(&img), &s1_data);
    assert_eq!(peek_refcount(&img, host0 >> cb), 1, "{opts}");
    assert_ne!(read_be(&img, l2_entry_at(&img, 0), 8) & COPIED, 0, "{opts}");
    assert_eq!(allocated_clusters(&img), before, "{opts}: clusters freed");
}

#[tokio::test]
async fn round_trip_64k() {
    round_trip("cluster_size=65536").await;
}

#[tokio::test]
async fn round_trip_version_2() {
    round_trip("compat=0.10").await;
}

/// After snapshot `name` of `data` was taken: `writes` through sluice,
/// the snapshot still reads as `data`, applying it brings `data` back,
/// and deleting it (by `id`, else by name) leaves the image clean.
async fn write_apply_delete(
    img: &str,
    name: &str,
    data: &[u8],
    writes: &[(u64, usize, u8)],
    id: Option<&str>,
) {
    let mut model = data.to_vec();
    write(img, &mut model, writes).await;
    assert_clean(img);
    assert_same("snapshot", &snapshot_raw(img, name), data);
    apply(img, name).await.unwrap();
    assert_clean(img);
    assert_same("applied", &qemu_raw(img), data);
    delete(img, id, id.is_none().then_some(name)).await.unwrap();
    assert_clean(img);
}

/// A snapshot "a" of an 8 MiB image made with `opts` and `setup`'s
/// qemu-io commands, then [`write_apply_delete`].
async fn short_round_trip(
    tag: &str,
    opts: &str,
    setup: &[&str],
    writes: &[(u64, usize, u8)],
    id: Option<&str>,
) {
    let dir = TempDir::new(tag);
    let img = dir.path("s.qcow2");
    create_qcow2(&img, opts, "8M");
    qemu_io(
        &img,
        &setup.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
    );
    let s1 = qemu_raw(&img);
    create(&img, "a").await;
    assert_clean(&img);
    write_apply_delete(&img, "a", &s1, writes, id).await;
}

#[tokio::test]
async fn round_trip_small_clusters_8bit_refcounts() {
    // 4 KiB clusters: several L2 tables, each shared with the snapshots.
    short_round_trip(
        "snapwrite8",
        "cluster_size=4096,refcount_bits=8",
        &["write -P 7 0 3M", "write -c -P 8 5M 4k"],
        &[(100, 5000, 9), (2 * MIB + 10, 300_000, 10)],
        Some("1"),
    )
    .await;
}

#[tokio::test]
async fn round_trip_extended_l2() {
    short_round_trip(
        "snapwriteext",
        "extended_l2=on",
        &["write -P 7 0 1M", "write -P 8 3M 4k"],
        &[(100, 5000, 9), (3 * MIB + 8192, 4096, 10)],
        None,
    )
    .await;
}

#[tokio::test]
async fn compressed_clusters_are_shared_and_freed() {
    let dir = TempDir::new("snapcomp");
    let img = dir.path("c.qcow2");
    create_qcow2(&img, "", "4M");
    // Several compressed clusters packed into one host cluster.
    qemu_io(
        &img,
        &[
            "write -c -P 1 0 64k".into(),
            "write -c -P 2 64k 64k".into(),
            "write -c -P 3 128k 64k".into(),
        ],
    );
    let data = qemu_raw(&img);
    let entry = read_be(&img, l2_entry_at(&img, 0), 8);
    assert_ne!(entry & (1 << 62), 0, "a compressed cluster");
    // 64 KiB clusters: 62 - (16 - 8) = 54 offset bits.
    let host = entry & ((1u64 << 54) - 1);
    let k = host >> 16;
    let rc = peek_refcount16(&img, k);
    create(&img, "c").await;
    assert_clean(&img);
    assert_eq!(
        peek_refcount16(&img, k),
        rc + 3,
        "one more per compressed cluster"
    );
    // Overwriting a compressed cluster copies it out; the snapshot keeps it.
    write_apply_delete(&img, "c", &data, &[(1000, 10, 0x55)], None).await;
    assert_eq!(peek_refcount16(&img, k), rc);
}

#[tokio::test]
async fn apply_takes_the_snapshots_size() {
    let dir = TempDir::new("snapsize");
    let img = dir.path("z.qcow2");
    create_qcow2(&img, "cluster_size=4096", "1M");
    qemu_io(&img, &["write -P 1 0 512k".into()]);
    let small = qemu_raw(&img);
    create(&img, "small").await;
    // Grown past what the L1 table's cluster holds: the active L1 moves.
    qemu_img(&["resize", "-q", &img, "700M"]);
    qemu_io(&img, &["write -P 2 600M 64k".into()]);
    create(&img, "big").await;
    assert_clean(&img);
    apply(&img, "small").await.unwrap();
    assert_clean(&img);
    assert_eq!(qemu_info(&img)["virtual-size"], MIB);
    assert_same("small", &qemu_raw(&img), &small);
    apply(&img, "big").await.unwrap();
    assert_clean(&img);
    assert_eq!(qemu_info(&img)["virtual-size"], 700 * MIB);
    let big = qemu_raw(&img);
    assert!(big[600 * MIB as usize..600 * MIB as usize + 65536]
        .iter()
        .all(|&b| b == 2));
    assert_same("big's start", &big[..MIB as usize], &small);
}

#[tokio::test]
async fn ids_follow_qemu_and_errors_are_qemus() {
    let dir = TempDir::new("snapids");
    let img = dir.path("i.qcow2");
    create_qcow2(&img, "", "1M");
    qemu_img(&["snapshot", "-c", "q1", &img]);
    assert_eq!(create(&img, "a").await.id, "2");
    assert_eq!(create(&img, "a").await.id, "3", "names may repeat");
    delete(&img, Some("2"), None).await.unwrap();
    assert_eq!(create(&img, "b").await.id, "4");
    assert_clean(&img);
    let ids: Vec<String> = qemu_snapshots(&img).into_iter().map(|s| s.0).collect();
    assert_eq!(ids, ["1", "3", "4"]);
    for res in [
        apply(&img, "nope").await,
        delete(&img, None, Some("nope")).await,
        delete(&img, Some("3"), Some("b")).await,
    ] {
        assert!(matches!(res, Err(SnapshotError::NotFound)), "{res:?}");
    }
    // A read-only driver changes nothing; a writable one loads nothing.
    let e = create_err(&img, true).await;
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = load(&img, false, Some("1"), None).await.unwrap_err();
    assert_eq!(e.to_string(), "Device is not readonly");
    let e = load(&img, true, None, Some("zz")).await.unwrap_err();
    assert_eq!(e.to_string(), "Can't find snapshot");
    let sn = load(&img, true, None, Some("b")).await.unwrap();
    assert_eq!(sn.id, "4");
    assert_clean(&img);
}

#[tokio::test]
async fn refused_where_qemu_refuses() {
    let dir = TempDir::new("snaprefuse");
    // An external data file: no snapshots.
    let img = dir.path("d.qcow2");
    let data = dir.path("d.raw");
    create_qcow2(&img, &format!("data_file={data}"), "1M");
    let e = create_err(&img, false).await;
    assert!(matches!(e, SnapshotError::NotSupported), "{e}");
    assert_eq!(e.to_string(), "Operation not supported");
    // 1-bit refcounts cannot count a second reference: QEMU's EINVAL,
    // and only the new L1 copy leaks.
    let one = dir.path("one.qcow2");
    create_qcow2(&one, "refcount_bits=1", "1M");
    qemu_io(&one, &["write 0 64k".into()]);
    let e = create_err(&one, false).await;
    assert_eq!(e.to_string(), "Invalid argument");
    assert_no_corruption(&one, "after a refused snapshot");
    assert!(qemu_snapshots(&one).is_empty());
}
