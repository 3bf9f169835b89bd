//! Copy-on-read writes (what a `copy-on-read` filter and the stream job
//! send down): they fill only the clusters the image does not hold yet —
//! a guest write that got there first keeps its data — and the clusters
//! they do fill go out in as few writes as the layout allows, without
//! shifting any data across a cluster they skipped.

mod common;

use common::*;
use sluice_core::{IoBytes, WriteFlags};

const K64: u64 = 64 << 10;

/// Bytes that differ from cluster to cluster and within one.
fn pattern(offset: u64, len: u64, seed: u8) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| ((i / 512) as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn copy_on_read_writes_fill_only_what_is_missing() {
    let dir = TempDir::new("cor-writes");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    create_qcow2(&base, "", "1M");
    qemu_io(&base, &["write -P 0x11 0 1M".into()]);
    create_overlay(&top, &base, "");
    // The guest wrote cluster 1 and cluster 5 before the copy-up.
    qemu_io(
        &top,
        &[
            "write -P 0x22 64k 64k".into(),
            "write -P 0x44 320k 64k".into(),
        ],
    );

    let o = open_image(&top, false).await.unwrap();
    let cor = WriteFlags {
        copy_on_read: true,
        ..WriteFlags::default()
    };
    // One copy-up over clusters 0..8: it must skip 1 and 5.
    let data = IoBytes::copy_from(&pattern(0, 8 * K64, 0x33));
    o.root.write(0, data, cor).await.unwrap();
    let size_after_first = std::fs::metadata(&top).unwrap().len();
    // A second one over the same range finds everything there.
    let again = IoBytes::copy_from(&pattern(0, 8 * K64, 0x55));
    o.root.write(0, again, cor).await.unwrap();
    close(o).await;

    assert_clean(&top);
    assert_eq!(
        std::fs::metadata(&top).unwrap().len(),
        size_after_first,
        "a copy-up over allocated clusters allocated more"
    );
    let raw = qemu_raw(&top);
    for c in 0..8u64 {
        let r = (c * K64) as usize..((c + 1) * K64) as usize;
        let want = match c {
            1 => vec![0x22; K64 as usize],
            5 => vec![0x44; K64 as usize],
            _ => pattern(c * K64, K64, 0x33),
        };
        assert_same(&format!("cluster {c}"), &raw[r], &want);
    }
    // Past the copied range the backing file still shows through.
    assert!(raw[(8 * K64) as usize..].iter().all(|&b| b == 0x11));
}
