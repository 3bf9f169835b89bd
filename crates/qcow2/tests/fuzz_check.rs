//! Seeded random corruption of a qcow2 image's metadata (header, L1/L2
//! tables, refcount table and blocks, snapshot table, bitmaps): check,
//! repair, reads and writes through sluice end with a result or an error,
//! never a panic or a hang. `SLUICE_FUZZ_SEED=n` replays one seed.

mod common;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_core::{IoBytes, WriteFlags};
use sluice_qcow2::check::{check, Repair};
use std::time::Duration;

const CS: u64 = 4096;

/// The offsets of the image's metadata clusters, as QEMU wrote them.
fn metadata_clusters(img: &str) -> Vec<u64> {
    let mut out = vec![0];
    let l1 = read_be(img, 40, 8);
    let l1_size = read_be(img, 36, 4);
    out.push(l1);
    for i in 0..l1_size {
        let e = read_be(img, l1 + i * 8, 8) & 0x00ff_ffff_ffff_fe00;
        if e != 0 {
            out.push(e);
        }
    }
    let rt = read_be(img, 48, 8);
    out.push(rt);
    for i in 0..CS / 8 {
        let e = read_be(img, rt + i * 8, 8);
        if e != 0 {
            out.push(e);
        }
    }
    let snaps = read_be(img, 64, 8);
    if snaps != 0 {
        out.push(snaps);
    }
    out
}

/// Corrupts `img` in place: random bytes and random 64-bit words in
/// metadata clusters.
fn corrupt(img: &str, meta: &[u64], rng: &mut SmallRng) {
    let len = std::fs::metadata(img).unwrap().len();
    for _ in 0..rng.gen_range(1..=6) {
        let cluster = meta[rng.gen_range(0..meta.len())];
        let at = cluster + rng.gen_range(0..CS / 8) * 8;
        if at + 8 > len {
            continue;
        }
        let word: u64 = match rng.gen_range(0..5) {
            0 => rng.gen(),
            1 => rng.gen::<u64>() & 0x00ff_ffff_ffff_fe00,
            2 => (len + rng.gen_range(0..8) * CS) | (1 << 63),
            3 => read_be(img, at, 8) ^ (1 << rng.gen_range(0..64)),
            _ => 0,
        };
        patch(img, at, &word.to_be_bytes());
    }
    // Now and then, a header field itself.
    if rng.gen_bool(0.3) {
        let at = [20u64, 24, 36, 40, 48, 56, 60, 64, 72, 96][rng.gen_range(0..10)];
        let b: u8 = rng.gen();
        patch(img, at + rng.gen_range(0..4), &[b]);
    }
}

/// Everything a tool might do with the corrupted image; errors are fine.
/// Returns how many of check, repair, read-only and writable open got
/// through (so the test shows it reaches past the first error).
async fn exercise(img: String) -> [bool; 4] {
    let mut got = [false; 4];
    let copy = format!("{img}.repair");
    std::fs::copy(&img, &copy).unwrap();
    {
        let (_g, file) = open_file_node(&img, true).await;
        got[0] = check(&file, &img, None).await.is_ok();
    }
    {
        let (_g, file) = open_file_node(&copy, false).await;
        got[1] = check(&file, &copy, Some(Repair::All)).await.is_ok();
    }
    if let Ok(o) = open_image(&img, true).await {
        got[2] = true;
        let size = o.node.size().min(4 * MIB);
        let mut pos = 0;
        while pos < size {
            let n = (256 * KIB).min(size - pos);
            let _ = o.root.read(pos, n as usize).await;
            pos += n;
        }
    }
    if let Ok(o) = open_image(&img, false).await {
        got[3] = true;
        let size = o.node.size();
        if size > 0 {
            for off in [0, size / 3, size.saturating_sub(8192)] {
                let n = 8192.min(size - off) as usize;
                let _ = o
                    .root
                    .write(
                        off,
                        IoBytes::copy_from(&vec![0x5a; n]),
                        WriteFlags::default(),
                    )
                    .await;
                let _ = o.root.discard(off, n as u64).await;
            }
            let _ = o.root.flush().await;
        }
        close(o).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_metadata_never_panics() {
    let dir = TempDir::new("fuzz");
    let base = dir.path("base.qcow2");
    create_qcow2(&base, "cluster_size=4096", "8M");
    qemu_io(
        &base,
        &[
            "write -P 1 0 300k".into(),
            "write -c -P 2 1M 8k".into(),
            "write -z 2M 16k".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "s1", &base]);
    qemu_io(
        &base,
        &["write -P 3 100k 64k".into(), "write -P 4 6M 64k".into()],
    );
    qemu_img(&["bitmap", "--add", &base, "b0"]);
    let meta = metadata_clusters(&base);
    let seeds: Vec<u64> = match std::env::var("SLUICE_FUZZ_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..200).collect(),
    };
    let mut reached = [0usize; 4];
    let n = seeds.len();
    for seed in seeds {
        let img = dir.path(&format!("f{seed}.qcow2"));
        std::fs::copy(&base, &img).unwrap();
        let mut rng = SmallRng::seed_from_u64(seed);
        corrupt(&img, &meta, &mut rng);
        let run = tokio::spawn(exercise(img.clone()));
        match tokio::time::timeout(Duration::from_secs(60), run).await {
            Err(_) => panic!("seed {seed}: hung (SLUICE_FUZZ_SEED={seed} replays it)"),
            Ok(Err(e)) if e.is_panic() => {
                panic!("seed {seed}: panicked (SLUICE_FUZZ_SEED={seed} replays it)")
            }
            Ok(Err(e)) => panic!("seed {seed}: {e}"),
            Ok(Ok(got)) => {
                for (r, g) in reached.iter_mut().zip(got) {
                    *r += usize::from(g);
                }
            }
        }
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(format!("{img}.repair"));
    }
    eprintln!("of {n} images: checked, repaired, opened read-only, opened writable: {reached:?}");
    if n > 1 {
        assert!(
            reached.iter().all(|&r| r * 4 >= n),
            "most corruptions stop everything at the start: {reached:?}"
        );
    }
}
