//! Writes to images with internal snapshots: clusters and L2 tables
//! shared with a snapshot are copied, never changed; their refcounts
//! drop as the active layer stops using them. QEMU is the referee: the
//! image checks clean, the active layer equals the model, and every
//! snapshot (read with `qemu-img convert -l`, and applied with
//! `qemu-img snapshot -a` on a copy) holds what it held before.

mod common;
mod crash_recorder;

use common::*;
use sluice_core::{IoBytes, WriteFlags, ZeroFlags};

async fn writes_over_snapshots(opts: &str) {
    let dir = TempDir::new("snapw");
    let img = dir.path("s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &img, "32M"]);
    qemu_io(
        &img,
        &[
            "write -P 1 0 4M".into(),
            "write -c -P 2 8M 128k".into(),
            "write -P 5 12M 256k".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "s1", &img]);
    qemu_io(&img, &["write -P 3 1M 1M".into()]);
    qemu_img(&["snapshot", "-c", "s2", &img]);
    let s1 = snapshot_raw(&img, "s1");
    let s2 = snapshot_raw(&img, "s2");
    let mut model = qemu_raw(&img);
    {
        let o = open_image(&img, false).await.unwrap();
        let put = |off: u64, data: Vec<u8>, model: &mut Vec<u8>| {
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            data
        };
        for (off, len, b) in [
            // Partial writes into shared clusters (copy-on-write).
            (100_000u64, 10_000usize, 0x44u8),
            (MIB + 4096, 70_000, 0x45),
            // Whole clusters, a compressed cluster, fresh space.
            (2 * MIB, 128 * KIB as usize, 0x46),
            (8 * MIB + 1000, 5000, 0x47),
            (20 * MIB, 300_000, 0x48),
        ] {
            let data = put(off, vec![b; len], &mut model);
            o.root
                .write(off, IoBytes::copy_from(&data), WriteFlags::default())
                .await
                .unwrap_or_else(|e| panic!("{opts}: write at {off:#x}: {e}"));
        }
        // The same shared cluster written twice: the second write is in
        // place (the copy is this image's alone).
        let data = put(100_500, vec![0x49; 100], &mut model);
        o.root
            .write(100_500, IoBytes::copy_from(&data), WriteFlags::default())
            .await
            .unwrap();
        // Without a backing file, discarded clusters read as zeroes
        // (zero flag in version 3, unallocated in version 2).
        o.root.discard(3 * MIB, 256 * KIB).await.unwrap();
        model[3 * MIB as usize..(3 * MIB + 256 * KIB) as usize].fill(0);
        o.root
            .write_zeroes(12 * MIB + 4096, 128 * KIB, ZeroFlags::default())
            .await
            .unwrap();
        model[(12 * MIB + 4096) as usize..(12 * MIB + 4096 + 128 * KIB) as usize].fill(0);
        assert_same(opts, &read_all(&o, MIB).await, &model);
        close(o).await;
    }
    let (code, text) = qemu_check_text(&img);
    assert!(
        code == 0 && !text.contains("leak"),
        "{opts}: qemu-img check: {text}"
    );
    let raw = dir.path("model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &img, &raw]);
    assert_same(
        &format!("{opts}: snapshot s1"),
        &snapshot_raw(&img, "s1"),
        &s1,
    );
    assert_same(
        &format!("{opts}: snapshot s2"),
        &snapshot_raw(&img, "s2"),
        &s2,
    );
    // Going back to s1 on a copy shows s1, and that image checks clean.
    let copy = dir.path("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", "s1", &copy]);
    assert_same(&format!("{opts}: applied s1"), &qemu_raw(&copy), &s1);
    let (code, text) = qemu_check_text(&copy);
    assert_eq!(code, 0, "{opts}: after snapshot -a: {text}");
}

#[tokio::test]
async fn writes_over_snapshots_64k() {
    writes_over_snapshots("cluster_size=65536").await;
}

#[tokio::test]
async fn writes_over_snapshots_extended_l2() {
    writes_over_snapshots("cluster_size=65536,extended_l2=on").await;
}

#[tokio::test]
async fn writes_over_snapshots_small_clusters() {
    // Many L2 tables, each shared with both snapshots.
    writes_over_snapshots("cluster_size=4096,refcount_bits=8").await;
}

#[tokio::test]
async fn writes_over_snapshots_version_2() {
    writes_over_snapshots("compat=0.10").await;
}

#[tokio::test]
async fn writes_over_snapshots_lazy_refcounts() {
    writes_over_snapshots("cluster_size=65536,lazy_refcounts=on").await;
}

/// Crash consistency with snapshots and cluster reuse: a seeded workload
/// (partial and whole-cluster writes into shared clusters and tables,
/// rewrites, discards that free clusters for reuse, flushes) on a
/// recording file; at sampled crash points the image as it could be on
/// disk has no corruption (`qemu-img check`; leaks allowed) and the
/// snapshot holds exactly what it held; a crash right after a guest
/// flush holds exactly what was flushed. `SLUICE_CRASH_SEED` replays.
#[tokio::test]
async fn crash_points_keep_snapshots_intact() {
    use crash_recorder::{qcow2_on_recorder, sampled_crashes, Pick};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use sluice_core::Graph;

    let seed = crash_seed_or(3);
    let dir = TempDir::new("snapcrash");
    let img = dir.path("c.qcow2");
    let cs = 4096u64;
    // Four L2 tables, each shared with the snapshot.
    let size = 8 * MIB;
    create_qcow2(&img, "cluster_size=4096", &size.to_string());
    qemu_io(&img, &[format!("write -P 0x31 0 {}", size * 3 / 4)]);
    qemu_img(&["snapshot", "-c", "s1", &img]);
    let s1 = snapshot_raw(&img, "s1");
    let mut model = qemu_raw(&img);
    // (events recorded, active layer) right after each guest flush.
    let mut flushed: Vec<(usize, Vec<u8>)> = Vec::new();
    let graph = Graph::new();
    let (_node, root, rec) = qcow2_on_recorder(&graph, &img, serde_json::Value::Null)
        .await
        .unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    for op in 0..100 {
        let off = rng.gen_range(0..size / 512) * 512;
        let len = rng.gen_range(1..=3 * cs / 512).min((size - off) / 512) * 512;
        let what = rng.gen_range(0..10);
        let r = if what < 6 {
            let b: u8 = rng.gen();
            model[off as usize..(off + len) as usize].fill(b);
            root.write(
                off,
                IoBytes::copy_from(&vec![b; len as usize]),
                WriteFlags::default(),
            )
            .await
        } else if what < 8 {
            // Whole clusters read as zeroes after a discard.
            let (a, e) = (off.div_ceil(cs) * cs, (off + len) / cs * cs);
            if a < e {
                model[a as usize..e as usize].fill(0);
            }
            root.discard(off, len).await
        } else {
            let r = root.flush().await;
            flushed.push((rec.len(), model.clone()));
            r
        };
        r.unwrap_or_else(|e| panic!("seed {seed}: op {op}: {e}"));
    }
    root.flush().await.unwrap();
    flushed.push((rec.len(), model.clone()));
    let record = rec.record();
    let n = record.len();
    let crash_img = dir.path("crash.qcow2");
    // A crash right after a guest flush keeps exactly what was flushed.
    for (k, want) in &flushed {
        let crash = record.crash(*k, Pick::None);
        std::fs::write(&crash_img, &crash.image).unwrap();
        assert_same(
            &format!("seed {seed}: crash after the flush at {k}/{n}"),
            &qemu_raw(&crash_img),
            want,
        );
    }
    for (k, pick, image) in sampled_crashes(&record, 50, seed) {
        std::fs::write(&crash_img, &image).unwrap();
        let (code, json) = qemu_check_json(&crash_img, &[]);
        let v: serde_json::Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("seed {seed} k {k}: check output {json:?}: {e}"));
        assert!(
            (code == 0 || code == 3) && v.get("corruptions").is_none() && v["check-errors"] == 0,
            "seed {seed}: crash at {k}/{n} ({pick:?}): {json}"
        );
        if pick == Pick::All {
            continue;
        }
        assert_same(
            &format!("seed {seed}: crash at {k}/{n} ({pick:?}): snapshot s1"),
            &snapshot_raw(&crash_img, "s1"),
            &s1,
        );
    }
}
