//! Cluster reuse: clusters freed by discards and copy-on-write are
//! allocated again (the file stops growing), never while a racing
//! lock-free overwrite may still land in them, and `qemu-img check`
//! stays clean.

mod common;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sluice_core::{find_debug_control, DebugEvent};
use sluice_core::{IoBytes, WriteFlags};
use std::sync::Arc;

const CS: u64 = 65536;

fn image(dir: &TempDir, size: u64) -> String {
    let img = dir.path("r.qcow2");
    create_qcow2(&img, "cluster_size=65536", &size.to_string());
    img
}

fn file_len(p: &str) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// `img` opened over blkdebug; after a first write (which readies the
/// lock-free path) an overwrite of guest cluster 0 is parked at
/// `write_aio` (breakpoint `t`), after it mapped its cluster, and the
/// cluster is then discarded. Returns the image, the blkdebug node and
/// the parked write.
async fn park_an_overwrite(
    img: &str,
) -> (
    Arc<Opened>,
    Arc<sluice_core::Node>,
    tokio::task::JoinHandle<sluice_core::Result<()>>,
) {
    let opts = json!({"driver": "qcow2", "file": {"driver": "blkdebug",
        "image": {"driver": "file", "filename": img}}});
    let o = Arc::new(open_opts(opts, false).await.unwrap());
    o.root
        .write(0, IoBytes::copy_from(&[0x22; 4096]), WriteFlags::default())
        .await
        .unwrap();
    let ctl_node = find_debug_control(&o.node).expect("a blkdebug node");
    let ctl = ctl_node.driver().debug_control().unwrap();
    ctl.set_breakpoint(DebugEvent::WriteAio, "t").unwrap();
    let parked = {
        let o = o.clone();
        tokio::spawn(async move {
            o.root
                .write(
                    4096,
                    IoBytes::copy_from(&[0xaa; 4096]),
                    WriteFlags::default(),
                )
                .await
        })
    };
    ctl.wait_suspended("t").await;
    o.root.discard(0, CS).await.unwrap();
    (o, ctl_node, parked)
}

/// Closes the only user of `o`; `qemu-img check` finds `img` clean.
async fn close_and_check(o: Arc<Opened>, img: &str) {
    let o = Arc::try_unwrap(o).ok().expect("one user");
    close(o).await;
    let (code, text) = qemu_check_text(img);
    assert_eq!(code, 0, "{text}");
}

#[tokio::test]
async fn write_discard_cycles_keep_the_file_bounded() {
    let seed = 11;
    let dir = TempDir::new("reuse-cycles");
    let size = 64 * MIB;
    let img = image(&dir, size);
    let mut model = vec![0u8; size as usize];
    let mut rng = SmallRng::seed_from_u64(seed);
    let region = 8 * MIB;
    let mut after_first = 0;
    {
        let o = open_image(&img, false).await.unwrap();
        for cycle in 0..20u64 {
            let off = rng.gen_range(0..(size - region) / CS) * CS;
            let b: u8 = rng.gen();
            let data: Vec<u8> = (0..region)
                .map(|i| b.wrapping_add((i / 4096) as u8))
                .collect();
            o.root
                .write(off, IoBytes::copy_from(&data), WriteFlags::default())
                .await
                .unwrap();
            model[off as usize..(off + region) as usize].copy_from_slice(&data);
            // Keep a little of each cycle; discard the rest.
            let keep = CS;
            o.root.discard(off + keep, region - keep).await.unwrap();
            model[(off + keep) as usize..(off + region) as usize].fill(0);
            o.root.flush().await.unwrap();
            if cycle == 0 {
                after_first = file_len(&img);
            }
        }
        assert_same(
            &format!("seed {seed}: image"),
            &read_all(&o, 4 * MIB).await,
            &model,
        );
        close(o).await;
    }
    // Without reuse the file would hold 20 regions (160 MiB).
    let end = file_len(&img);
    assert!(
        end <= after_first + 2 * MIB,
        "seed {seed}: the file grew from {after_first} to {end} bytes"
    );
    let (code, text) = qemu_check_text(&img);
    assert_eq!(code, 0, "seed {seed}: {text}");
    let raw = dir.path("model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &img, &raw]);
}

/// A lock-free overwrite parked (blkdebug `write_aio`) after it mapped
/// its cluster X; X is discarded and a cluster allocated meanwhile: it
/// must not be X (the late write would land in it) but the next free
/// one. Once the overwrite is done, X is reused.
#[tokio::test]
async fn a_parked_overwrite_keeps_its_cluster_from_reuse() {
    let dir = TempDir::new("reuse-race");
    let img = image(&dir, 32 * MIB);
    // Cluster X holds guest cluster 0; Y, after it, is free (the file
    // does not grow under blkdebug: every allocation here reuses).
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 64k".into(),
            "write -P 0x12 1M 64k".into(),
            "discard 1M 64k".into(),
        ],
    );
    let (o, ctl_node, parked) = park_an_overwrite(&img).await;
    let ctl = ctl_node.driver().debug_control().unwrap();
    let b = vec![0x55; CS as usize];
    o.root
        .write(4 * MIB, IoBytes::copy_from(&b), WriteFlags::default())
        .await
        .unwrap();
    ctl.resume("t").unwrap();
    parked.await.unwrap().unwrap();
    let got = o.root.read(4 * MIB, CS as usize).await.unwrap();
    assert_same("the new cluster after the parked write", &got, &b);
    // Now the freed cluster is free for good: the next allocation takes
    // it instead of growing the file.
    let before = file_len(&img);
    let c = vec![0x66; CS as usize];
    o.root
        .write(8 * MIB, IoBytes::copy_from(&c), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(file_len(&img), before, "the freed cluster was not reused");
    for (off, want) in [(4 * MIB, &b), (8 * MIB, &c)] {
        let got = o.root.read(off, CS as usize).await.unwrap();
        assert_same(&format!("at {off:#x}"), &got, want);
    }
    close_and_check(o, &img).await;
}

/// A cluster freed while an overwrite that mapped it was parked, with
/// no allocation after: the close still drops its refcount (no leak).
#[tokio::test]
async fn a_cluster_freed_under_a_parked_overwrite_is_not_leaked() {
    let dir = TempDir::new("reuse-leak");
    let img = image(&dir, 32 * MIB);
    qemu_io(&img, &["write -P 0x11 0 64k".into()]);
    let (o, ctl_node, parked) = park_an_overwrite(&img).await;
    let ctl = ctl_node.driver().debug_control().unwrap();
    ctl.resume("t").unwrap();
    parked.await.unwrap().unwrap();
    close_and_check(o, &img).await;
}
