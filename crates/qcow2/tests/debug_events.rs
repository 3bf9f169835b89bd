//! The driver raises QEMU's debug events where QEMU does, so blkdebug
//! breakpoints park its requests: `read_aio` on the file before data
//! reads, `read_backing_aio` on the backing child, `l2_load` on the file.

mod common;

use common::*;
use serde_json::json;
use sluice_core::{find_debug_control, DebugEvent};
use std::time::Duration;

async fn parked_read(o: &Opened, event: DebugEvent, offset: u64, want: u8) {
    let ctl_node = find_debug_control(&o.node).expect("a blkdebug node");
    let ctl = ctl_node.driver().debug_control().unwrap();
    ctl.set_breakpoint(event, "t").unwrap();
    let read = o.root.read(offset, 4096);
    tokio::pin!(read);
    tokio::select! {
        _ = &mut read => panic!("the read did not stop at {event:?}"),
        _ = ctl.wait_suspended("t") => {}
    }
    // Still parked.
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut read)
        .await
        .is_err());
    ctl.resume("t").unwrap();
    let buf = read.await.unwrap();
    assert!(buf.iter().all(|&b| b == want), "{event:?}");
}

#[tokio::test]
async fn events_on_the_file_child() {
    let dir = TempDir::new("events");
    let img = dir.path("e.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "1M"]);
    qemu_io(&img, &["write -P 0x61 0 65536".into()]);
    let opts = json!({"driver": "qcow2", "file": {"driver": "blkdebug",
        "image": {"driver": "file", "filename": img}}});
    let o = open_opts(opts.clone(), true).await.unwrap();
    parked_read(&o, DebugEvent::L2Load, 0, 0x61).await;
    parked_read(&o, DebugEvent::ReadAio, 0, 0x61).await;
}

#[tokio::test]
async fn read_backing_aio_on_the_backing_child() {
    let dir = TempDir::new("events-b");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "1M"]);
    qemu_io(&base, &["write -P 0x62 0 65536".into()]);
    create_overlay(&top, &base, "1M");
    let opts = json!({"driver": "qcow2", "file": {"driver": "file", "filename": top},
        "backing": {"driver": "blkdebug", "image": {"driver": "qcow2",
            "file": {"driver": "file", "filename": base}}}});
    let o = open_opts(opts, true).await.unwrap();
    parked_read(&o, DebugEvent::ReadBackingAio, 4096, 0x62).await;
}
