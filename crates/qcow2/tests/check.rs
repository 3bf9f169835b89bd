//! `sluice_qcow2::check` against `qemu-img check`: images made by QEMU,
//! damaged on purpose, checked and repaired by both on copies of the
//! same file; reports must be equal (JSON text and human text), and after
//! sluice's repair `qemu-img check` finds the image clean with the data
//! QEMU's own repair keeps.

mod common;

use common::*;
use sluice_qcow2::check::{check, check_logged, Repair};
use std::process::Command;

const CS: u64 = 65536;

/// An image with data, a compressed cluster, a zero cluster and a
/// discarded (freed) cluster; with `snapshot`, an internal snapshot of
/// part of it and more writes after.
fn base_image(dir: &TempDir, name: &str, opts: &str, snapshot: bool) -> String {
    let img = dir.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &img, "16M"]);
    qemu_io(
        &img,
        &[
            "write -P 1 0 256k".into(),
            "write -c -P 2 1M 64k".into(),
            "write -P 3 4M 128k".into(),
            "write -z 2M 64k".into(),
            "discard 64k 64k".into(),
        ],
    );
    if snapshot {
        qemu_img(&["snapshot", "-c", "snap1", &img]);
        qemu_io(
            &img,
            &["write -P 4 128k 64k".into(), "write -P 5 8M 64k".into()],
        );
    }
    img
}

fn file_clusters(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().len().div_ceil(CS)
}

/// The host cluster index of guest offset `guest`.
fn host_cluster(path: &str, guest: u64) -> u64 {
    (read_be(path, l2_entry_at(path, guest), 8) & 0x00ff_ffff_ffff_fe00) / CS
}

/// Damage kinds: what each does to an image.
fn damage(kind: &str, path: &str) {
    match kind {
        "none" => {}
        "leak" => {
            // A free cluster inside the file gets counted.
            let k = (1..file_clusters(path))
                .find(|&k| peek_refcount16(path, k) == 0)
                .expect("a free cluster inside the file");
            poke_refcount16(path, k, 1);
        }
        "leak_used" => {
            let k = host_cluster(path, 0);
            poke_refcount16(path, k, 2);
        }
        "refcount_zero" => {
            let k = host_cluster(path, 4 * MIB);
            poke_refcount16(path, k, 0);
        }
        "refcount_low" => {
            // A cluster shared with a snapshot counted once.
            let k = host_cluster(path, 0);
            assert_eq!(peek_refcount16(path, k), 2);
            poke_refcount16(path, k, 1);
        }
        "past_eof" => {
            let at = l2_entry_at(path, 4 * MIB);
            let past = (file_clusters(path) + 7) * CS;
            patch(path, at, &(past | 1 << 63).to_be_bytes());
        }
        "copied" => {
            let at = l2_entry_at(path, 0);
            let e = read_be(path, at, 8);
            patch(path, at, &(e & !(1u64 << 63)).to_be_bytes());
        }
        "reserved" => {
            let at = l2_entry_at(path, 4 * MIB + CS);
            let e = read_be(path, at, 8);
            patch(path, at, &(e | 2).to_be_bytes());
        }
        "refblock_zero" => {
            // The first refcount block counts itself zero times.
            let rt = read_be(path, 48, 8);
            let block = read_be(path, rt, 8);
            poke_refcount16(path, block / CS, 0);
        }
        "reftable_unaligned" => {
            let rt = read_be(path, 48, 8);
            let block = read_be(path, rt, 8);
            patch(path, rt, &(block + 512).to_be_bytes());
        }
        "l1_reserved" => {
            let l1 = read_be(path, 40, 8);
            let e = read_be(path, l1, 8);
            patch(path, l1, &(e | 1 << 62).to_be_bytes());
        }
        "l2_unaligned" => {
            let at = l2_entry_at(path, 4 * MIB);
            let e = read_be(path, at, 8);
            patch(path, at, &(e + 512).to_be_bytes());
        }
        "snap_l1_unaligned" => {
            let table = read_be(path, 64, 8);
            let l1 = read_be(path, table, 8);
            patch(path, table, &(l1 + 512).to_be_bytes());
        }
        _ => unreachable!("{kind}"),
    }
}

fn qemu_human(img: &str, args: &[&str]) -> String {
    let mut a = vec!["check"];
    a.extend_from_slice(args);
    a.push(img);
    let out = Command::new("qemu-img").args(&a).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks `img` (already damaged) with both tools, with `repair`, on two
/// copies; compares reports; after a repair, compares what both left.
async fn compare_case(dir: &TempDir, case: &str, img: &str, repair: Option<Repair>) {
    let tag = match repair {
        None => "check",
        Some(Repair::Leaks) => "leaks",
        Some(Repair::All) => "all",
    };
    let q = dir.path(&format!("{case}-{tag}-qemu.qcow2"));
    let s = dir.path(&format!("{case}-{tag}-sluice.qcow2"));
    std::fs::copy(img, &q).unwrap();
    std::fs::copy(img, &s).unwrap();
    let args: &[&str] = match repair {
        None => &[],
        Some(Repair::Leaks) => &["-r", "leaks"],
        Some(Repair::All) => &["-r", "all"],
    };
    let human_q = dir.path(&format!("{case}-{tag}-qemu-human.qcow2"));
    std::fs::copy(img, &human_q).unwrap();
    let want_human = qemu_human(&human_q, args);
    let (code, want) = qemu_check_json(&q, args);
    let (_g, file) = open_file_node(&s, repair.is_none()).await;
    let mut log = Vec::new();
    let got = check_logged(&file, &q, repair, &mut log).await;
    let what = format!("{case} ({tag}); sluice said: {}", log.join(" | "));
    if want.is_empty() {
        // qemu-img could not finish: a repair it refuses, or (an
        // unaligned refcount table entry) one it gives up on after
        // marking the image corrupt. sluice refuses too, or repairs.
        assert_eq!(code, 1, "{what}: qemu-img exit {code}");
        if got.is_ok() {
            assert!(repair.is_some(), "{what}: sluice reported {got:?}");
            drop(file);
            drop(_g);
            let (sc, sj) = qemu_check_json(&s, &[]);
            assert_eq!(sc, 0, "{what}: not clean after sluice's repair: {sj}");
        }
        return;
    }
    let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got.to_json(), want, "{what}: JSON report");
    assert_eq!(got.exit_code(), code, "{what}: exit status");
    let human = got.human();
    assert_eq!(human, want_human, "{what}: human report");
    drop(file);
    drop(_g);
    if repair.is_none() {
        return;
    }
    // What sluice repaired checks as what QEMU repaired and, when that
    // is clean, holds the same data.
    let (qc, _) = qemu_check_json(&q, &[]);
    let (sc, sj) = qemu_check_json(&s, &[]);
    assert_eq!(sc, qc, "{what}: qemu-img check after repair: {sj}");
    if qc == 0 {
        qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", &q, &s]);
    }
    // QEMU's -r all leaves reserved bits and entries past the end of
    // the file (it cannot tell what they should be); all else is fixed.
    if repair == Some(Repair::All)
        && !matches!(
            case,
            "reserved"
                | "past_eof"
                | "l1_reserved"
                | "l2_unaligned"
                | "reftable_unaligned"
                | "snap_l1_unaligned"
        )
    {
        assert_eq!(sc, 0, "{what}: not clean after -r all: {sj}");
    }
}

async fn run_damage(kind: &str, snapshot: bool) {
    let dir = TempDir::new(&format!("check-{kind}"));
    let img = base_image(
        &dir,
        &format!("{kind}.qcow2"),
        "cluster_size=65536",
        snapshot,
    );
    let original = qemu_raw(&img);
    damage(kind, &img);
    for repair in [None, Some(Repair::Leaks), Some(Repair::All)] {
        compare_case(&dir, kind, &img, repair).await;
    }
    // Repairs other than past-EOF entries keep every byte.
    if !matches!(kind, "past_eof" | "l2_unaligned") {
        let s = dir.path(&format!("{kind}-all-sluice.qcow2"));
        assert_same(kind, &qemu_raw(&s), &original);
    }
}

#[tokio::test]
async fn clean_image() {
    run_damage("none", false).await;
}

#[tokio::test]
async fn leaked_free_cluster() {
    run_damage("leak", false).await;
}

#[tokio::test]
async fn leaked_used_cluster_and_copied_flag() {
    run_damage("leak_used", false).await;
}

#[tokio::test]
async fn refcount_zero_needs_a_rebuild() {
    run_damage("refcount_zero", false).await;
}

#[tokio::test]
async fn refcount_too_low_with_a_snapshot() {
    run_damage("refcount_low", true).await;
}

#[tokio::test]
async fn l2_entry_past_the_end() {
    run_damage("past_eof", false).await;
}

#[tokio::test]
async fn copied_flag_cleared() {
    run_damage("copied", false).await;
}

#[tokio::test]
async fn reserved_bits_in_an_l2_entry() {
    run_damage("reserved", false).await;
}

/// Clean images of every layout: same report as qemu-img.
#[tokio::test]
async fn clean_layouts() {
    let dir = TempDir::new("check-layouts");
    for (i, opts) in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=4096,refcount_bits=8",
        "cluster_size=4096,refcount_bits=64",
        "cluster_size=65536,extended_l2=on",
        "cluster_size=512",
        "compat=0.10",
        "cluster_size=65536,lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        for snapshot in [false, true] {
            if snapshot && opts.contains("refcount_bits=1") {
                continue;
            }
            let img = base_image(&dir, &format!("l{i}-{snapshot}.qcow2"), opts, snapshot);
            let (code, want) = qemu_check_json(&img, &[]);
            let (_g, file) = open_file_node(&img, true).await;
            let got = check(&file, &img, None).await.unwrap();
            assert_eq!(got.to_json(), want, "{opts} snapshot {snapshot}");
            assert_eq!(got.exit_code(), code, "{opts}");
        }
    }
    // An external data file: its clusters have no refcounts.
    let img = dir.path("ext.qcow2");
    let data = dir.path("ext.data");
    create_qcow2(&img, &format!("data_file={data}"), "16M");
    qemu_io(
        &img,
        &["write -P 1 0 300k".into(), "write -z 4M 64k".into()],
    );
    let (_, want) = qemu_check_json(&img, &[]);
    let (_g, file) = open_file_node(&img, true).await;
    let got = check(&file, &img, None).await.unwrap();
    assert_eq!(got.to_json(), want, "with a data file");
    // A persistent dirty bitmap: its directory, table and data clusters
    // are counted.
    let img = base_image(&dir, "bitmap.qcow2", "cluster_size=65536", false);
    qemu_img(&["bitmap", "--add", &img, "b0"]);
    qemu_io(&img, &["write -P 9 0 1M".into()]);
    let (_, want) = qemu_check_json(&img, &[]);
    let (_g, file) = open_file_node(&img, true).await;
    let got = check(&file, &img, None).await.unwrap();
    assert_eq!(got.to_json(), want, "with a bitmap");
    assert_eq!(got.exit_code(), 0, "with a bitmap: {want}");
}

#[tokio::test]
async fn refcount_block_counted_zero() {
    run_damage("refblock_zero", false).await;
}

#[tokio::test]
async fn refcount_table_entry_unaligned() {
    run_damage("reftable_unaligned", false).await;
}

#[tokio::test]
async fn reserved_bits_in_an_l1_entry() {
    run_damage("l1_reserved", false).await;
}

#[tokio::test]
async fn l2_entry_unaligned() {
    run_damage("l2_unaligned", false).await;
}

#[tokio::test]
async fn snapshot_l1_table_unaligned() {
    run_damage("snap_l1_unaligned", true).await;
}
