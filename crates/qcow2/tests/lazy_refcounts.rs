//! Lazy refcounts: with `lazy_refcounts=on`, new clusters are published
//! without waiting for their refcounts, under the header's dirty bit; a
//! clean close clears it; after a crash the next writable open rebuilds
//! the refcounts (as QEMU does), a read-only open reads as is.

mod common;
mod crash_recorder;

use common::*;
use sluice_core::{IoBytes, WriteFlags};

const CS: u64 = 4096;
const SIZE: u64 = 16 * MIB;

fn lazy_image(dir: &TempDir, name: &str) -> String {
    let img = dir.path(name);
    create_qcow2(
        &img,
        "cluster_size=4096,lazy_refcounts=on",
        &SIZE.to_string(),
    );
    img
}

/// Opens writable with a two-table L2 cache, so that L2 tables are
/// written back (without their refcounts) while the image is open.
async fn open_small_cache(img: &str) -> Opened {
    let mut opts = sluice_drivers::open::image_options(img, None).unwrap();
    opts["l2-cache-size"] = serde_json::json!(2 * CS);
    opts["refcount-cache-size"] = serde_json::json!(64 * CS);
    open_opts(opts, false).await.unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

#[tokio::test]
async fn dirty_while_open_clean_after_close() {
    let dir = TempDir::new("lazy-close");
    let img = lazy_image(&dir, "a.qcow2");
    let o = open_small_cache(&img).await;
    assert!(!is_dirty(&img), "dirty before any write");
    let data = pattern(7, 3 * MIB as usize);
    o.root
        .write(MIB, IoBytes::copy_from(&data), WriteFlags::default())
        .await
        .unwrap();
    assert!(
        is_dirty(&img),
        "lazy refcounts: a write must set the dirty bit"
    );
    o.root.flush().await.unwrap();
    assert!(
        is_dirty(&img),
        "a guest flush keeps the dirty bit (as QEMU)"
    );
    close(o).await;
    assert!(!is_dirty(&img), "a clean close clears the dirty bit");
    let (code, text) = qemu_check_text(&img);
    assert_eq!(code, 0, "{text}");
    let raw = qemu_raw(&img);
    assert_same("data", &raw[MIB as usize..4 * MIB as usize], &data);
}

#[tokio::test]
async fn crash_leaves_dirty_bit_and_reopen_repairs() {
    let dir = TempDir::new("lazy-crash");
    let img = lazy_image(&dir, "a.qcow2");
    let flushed = pattern(3, 2 * MIB as usize);
    let marker = pattern(44, CS as usize);
    let piece = 64 * KIB;
    // Unflushed writes: four rounds over the L2 tables of 4M..16M.
    let mut unflushed = Vec::new();
    for round in 0..4u64 {
        for table in 2..8u64 {
            let off = table * 2 * MIB + CS + round * piece;
            unflushed.push((off, pattern((round * 8 + table) as u8, piece as usize)));
        }
    }
    {
        let o = open_small_cache(&img).await;
        o.root
            .write(0, IoBytes::copy_from(&flushed), WriteFlags::default())
            .await
            .unwrap();
        // Every L2 table exists before the crash window.
        for table in 2..8u64 {
            o.root
                .write(
                    table * 2 * MIB,
                    IoBytes::copy_from(&marker),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
        }
        o.root.flush().await.unwrap();
        // A small L2 cache: tables are written back, the refcounts of
        // their new clusters are not.
        for (off, data) in &unflushed {
            o.root
                .write(*off, IoBytes::copy_from(data), WriteFlags::default())
                .await
                .unwrap();
        }
        // The crash: the driver goes without a close.
        drop(o);
    }
    assert!(is_dirty(&img), "a crash leaves the dirty bit");
    let (code, text) = qemu_check_text(&img);
    assert_ne!(
        code, 0,
        "refcounts should lag behind the L2 tables written back: {text}"
    );
    assert!(text.contains("refcount=0 reference=1"), "{text}");
    // QEMU repairs its copy on a writable open; sluice repairs the other.
    let theirs = dir.path("qemu.qcow2");
    std::fs::copy(&img, &theirs).unwrap();
    qemu_io(&theirs, &["read 0 512".into()]);
    // A read-only open reads the dirty image as it is.
    {
        let o = open_image(&img, true).await.unwrap();
        let got = o.root.read(0, flushed.len()).await.unwrap();
        assert_same("read-only", &got, &flushed);
        assert!(is_dirty(&img), "a read-only open does not repair");
    }
    let o = open_small_cache(&img).await;
    assert!(!is_dirty(&img), "the writable open repaired the image");
    let got = o.root.read(0, flushed.len()).await.unwrap();
    assert_same("flushed data after the repair", &got, &flushed);
    close(o).await;
    let (code, text) = qemu_check_text(&img);
    assert_eq!(code, 0, "after sluice's repair: {text}");
    let (code, text) = qemu_check_text(&theirs);
    assert_eq!(code, 0, "after QEMU's repair: {text}");
    qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", &img, &theirs]);
    // What was flushed is there; what was not shows per cluster either
    // as written or as never written.
    let raw = qemu_raw(&img);
    for table in 2..8u64 {
        let at = (table * 2 * MIB) as usize;
        assert_same("marker", &raw[at..at + CS as usize], &marker);
    }
    for (off, data) in &unflushed {
        for (i, c) in data.chunks(CS as usize).enumerate() {
            let at = *off as usize + i * CS as usize;
            let got = &raw[at..at + CS as usize];
            assert!(
                got == c || got.iter().all(|&b| b == 0),
                "cluster at {at:#x}: neither the data written nor zeroes"
            );
        }
    }
}

/// At every sampled crash point of a lazy-refcounts workload, the image
/// is either marked dirty (and QEMU's repair makes it clean) or free of
/// corruption: the dirty bit is durable before any L2 table that runs
/// ahead of its refcounts. `SLUICE_CRASH_SEED` replays.
#[tokio::test]
async fn crash_points_are_dirty_or_consistent() {
    use crash_recorder::{qcow2_on_recorder, sampled_crashes};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use sluice_core::Graph;

    let seed = crash_seed_or(9);
    let dir = TempDir::new("lazy-crashpoints");
    let img = lazy_image(&dir, "c.qcow2");
    let graph = Graph::new();
    let (_node, root, rec) =
        qcow2_on_recorder(&graph, &img, serde_json::json!({"l2-cache-size": 2 * CS}))
            .await
            .unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    for op in 0..60 {
        let off = rng.gen_range(0..SIZE / CS) * CS;
        let len = rng.gen_range(1..=8u64).min((SIZE - off) / CS) * CS;
        let r = match rng.gen_range(0..10) {
            0..=6 => {
                let b: u8 = rng.gen();
                root.write(
                    off,
                    IoBytes::copy_from(&vec![b; len as usize]),
                    WriteFlags::default(),
                )
                .await
            }
            7 => root.discard(off, len).await,
            _ => root.flush().await,
        };
        r.unwrap_or_else(|e| panic!("seed {seed}: op {op}: {e}"));
    }
    root.flush().await.unwrap();
    let record = rec.record();
    let n = record.len();
    let crash_img = dir.path("crash.qcow2");
    let mut dirty_points = 0;
    for (k, pick, image) in sampled_crashes(&record, 40, seed) {
        std::fs::write(&crash_img, &image).unwrap();
        let what = format!("seed {seed}: crash at {k}/{n} ({pick:?})");
        if is_dirty(&crash_img) {
            dirty_points += 1;
            let (code, json) = qemu_check_json(&crash_img, &["-r", "all"]);
            assert!(code == 0, "{what}: repair left: {json}");
        } else {
            let (code, json) = qemu_check_json(&crash_img, &[]);
            assert!(code == 0 || code == 3, "{what}: not dirty, yet: {json}");
        }
    }
    assert!(dirty_points > 0, "seed {seed}: no crash point was dirty");
}
