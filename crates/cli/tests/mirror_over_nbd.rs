//! A disk mirrored to another host's storage through the NBD client
//! driver: `sluice daemon` mirrors its disk to a second `sluice daemon`
//! (and to `qemu-nbd`), a guest writes over NBD meanwhile, the job pivots,
//! and the copy is equal to the source.

mod common;

use common::{have, ok, sluice, start_with_monitor, temp_dir, Proc, Qmp, TempDir};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Daemon A serves `src.qcow2` as export `src` and mirrors it into the
/// NBD export at `target_sock`/`target_export`, with qemu-io writing into
/// `src` through A's export while the job runs; completes the job.
fn mirror_to(dir: &TempDir, target_sock: &Path, target_export: &str) {
    let a_sock = dir.path("a.sock");
    let (mut a, mut q): (Proc, Qmp) = start_with_monitor(
        sluice(),
        &[
            "daemon",
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
                dir.file("src.qcow2")
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", a_sock.display()),
            "--export",
            "type=nbd,id=e,node-name=src,name=src,writable=on",
        ],
        &dir.0,
    );
    q.negotiate();
    q.cmd(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "remote", "export": target_export,
               "server": {"type": "unix", "path": target_sock}}),
    )
    .unwrap();
    q.cmd(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "remote", "sync": "full"}),
    )
    .unwrap();
    q.wait_event("BLOCK_JOB_READY");
    // The guest keeps writing; the mirror keeps the copy in step.
    let url = format!("nbd+unix:///src?socket={}", a_sock.display());
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5c 1M 192k",
            "-c",
            "write -P 0x5d 6M 4k",
            &url,
        ],
    );
    q.cmd("job-complete", json!({"id": "m"})).unwrap();
    q.wait_job_status("m", "null");
    assert!(
        q.event_names().contains(&"BLOCK_JOB_COMPLETED".to_string()),
        "{:?}",
        q.event_names()
    );
    // The export now serves the remote copy: a read through it proves the pivot.
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5c 1M 192k", &url],
    );
    q.cmd("quit", json!(null)).unwrap();
    assert!(a.0.wait().unwrap().success());
}

fn make_images(dir: &TempDir, target: &str) {
    let src = dir.file("src.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &src, "8M"]);
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 3M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 0x22 7M 512k",
            &src,
        ],
    );
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &dir.file(target), "8M"],
    );
}

#[test]
fn sluice_mirrors_to_another_sluice_daemon_over_nbd_and_pivots() {
    let dir = temp_dir("mirror-nbd-sluice");
    make_images(&dir, "dst.qcow2");
    let b_dir = TempDir(dir.path("b"));
    std::fs::create_dir_all(&b_dir.0).unwrap();
    let b_sock = dir.path("b.sock");
    let (mut b, mut qb) = start_with_monitor(
        sluice(),
        &[
            "daemon",
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=dst,file.driver=file,file.filename={}",
                dir.file("dst.qcow2")
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", b_sock.display()),
            "--export",
            "type=nbd,id=e,node-name=dst,name=dst,writable=on",
        ],
        &b_dir.0,
    );
    qb.negotiate();
    mirror_to(&dir, &b_sock, "dst");
    qb.cmd("quit", json!(null)).unwrap();
    assert!(b.0.wait().unwrap().success());
    ok("qemu-img", &["check", &dir.file("dst.qcow2")]);
    ok(
        "qemu-img",
        &["compare", &dir.file("src.qcow2"), &dir.file("dst.qcow2")],
    );
}

#[test]
fn sluice_mirrors_to_qemu_nbd_and_pivots() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = temp_dir("mirror-nbd-qemu");
    make_images(&dir, "dst2.qcow2");
    let sock = dir.path("q.sock");
    let q = Command::new("qemu-nbd")
        .args([
            "-k",
            sock.to_str().unwrap(),
            "-f",
            "qcow2",
            "-x",
            "dst2",
            "--cache=none",
        ])
        .arg(dir.file("dst2.qcow2"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut qemu_nbd = Proc(q);
    wait_for_socket(&sock);
    mirror_to(&dir, &sock, "dst2");
    // qemu-nbd exits when its one client disconnects (no --persistent).
    let _ = qemu_nbd.0.wait();
    ok("qemu-img", &["check", &dir.file("dst2.qcow2")]);
    ok(
        "qemu-img",
        &["compare", &dir.file("src.qcow2"), &dir.file("dst2.qcow2")],
    );
}
