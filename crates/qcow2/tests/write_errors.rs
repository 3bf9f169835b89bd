//! I/O errors in the middle of qcow2 writes (injected by blkdebug after
//! each metadata event in turn) fail the request cleanly and leave an
//! image that `qemu-img check` finds free of corruption (leaks allowed),
//! with every write that succeeded readable.

mod common;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sluice_core::{IoBytes, WriteFlags, ZeroFlags};

const EVENTS: &[&str] = &[
    "cluster_alloc",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_update",
    "l2_alloc_write",
    "l1_update",
    "l2_update",
    "cow_read",
    "cow_write",
    "write_aio",
    "cluster_free",
    "reftable_grow",
];

#[tokio::test]
async fn errors_after_every_metadata_event() {
    let dir = TempDir::new("errors");
    for (n, event) in EVENTS.iter().enumerate() {
        let base = dir.path(&format!("b{n}.qcow2"));
        create_qcow2(&base, "cluster_size=4096", "1M");
        qemu_io(&base, &["write -P 0x19 0 1048576".into()]);
        let img = dir.path(&format!("e{n}.qcow2"));
        // 512-byte clusters with 64-bit refcounts: the refcount table grows
        // within a MiB of writes.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            "-b",
            &base,
            "-F",
            "qcow2",
            &img,
            "1M",
        ]);
        let mut model = qemu_raw(&img);
        let mut failed = 0;
        let mut rng = SmallRng::seed_from_u64(n as u64);
        // Each session fails one request: the first after `event`.
        for _session in 0..4 {
            let opts = json!({"driver": "qcow2",
                "file": {"driver": "blkdebug",
                    "inject-error": [{"event": event, "once": true}],
                    "image": {"driver": "file", "filename": img}}});
            let o = open_opts(opts, false).await.unwrap();
            for _ in 0..40 {
                let off = rng.gen_range(0..MIB);
                let len = rng.gen_range(1..=(8 * KIB).min(MIB - off));
                let res = if rng.gen_range(0..4) == 0 {
                    o.root
                        .write_zeroes(off, len, ZeroFlags::default())
                        .await
                        .map(|_| vec![0; len as usize])
                } else {
                    let data = vec![rng.gen::<u8>() | 1; len as usize];
                    o.root
                        .write(off, IoBytes::copy_from(&data), WriteFlags::default())
                        .await
                        .map(|_| data)
                };
                match res {
                    Ok(data) => model[off as usize..(off + len) as usize].copy_from_slice(&data),
                    Err(_) => {
                        failed += 1;
                        // What the range holds now is either; take it.
                        let now = o.root.read(off, len as usize).await;
                        if let Ok(now) = now {
                            model[off as usize..(off + len) as usize].copy_from_slice(&now);
                        }
                    }
                }
            }
            // Metadata is cached write-back: a flush that failed (the
            // injected error may hit its write-back) leaves it dirty, and
            // the next one writes it; the image is then dropped.
            if o.root.flush().await.is_err() {
                o.root.flush().await.unwrap();
            }
        }
        assert!(failed > 0, "{event}: no request failed");
        let out = std::process::Command::new("qemu-img")
            .args(["check", &img])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // 0: clean; 3: leaked clusters only.
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "{event}: qemu-img check ({code:?}): {text}"
        );
        let raw = dir.path("model.raw");
        std::fs::write(&raw, &model).unwrap();
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &img, &raw]);
    }
}
