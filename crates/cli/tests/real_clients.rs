//! Clients and servers none of which were written here: fio's NBD engine
//! writes and verifies through a `sluice daemon` export, and sluice's NBD
//! client reads and writes an `nbdkit` server (checked with libnbd's
//! `nbdcopy`). `.ci/run` installs fio, nbdkit and libnbd-bin where they
//! are missing.

mod common;

use common::{have, ok, run, sluice, start_with_monitor, temp_dir, Proc};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn fio_writes_and_verifies_through_a_sluice_export() {
    if !have("fio") {
        return;
    }
    let dir = temp_dir("fio");
    let img = dir.file("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "32M"]);
    let sock = dir.path("nbd.sock");
    let (mut p, mut q) = start_with_monitor(
        sluice(),
        &[
            "daemon",
            "--blockdev",
            &format!("driver=qcow2,node-name=disk,file.driver=file,file.filename={img}"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "type=nbd,id=e,node-name=disk,name=disk,writable=on",
        ],
        &dir.0,
    );
    q.negotiate();
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    // Random writes with checksummed blocks, 16 in flight, then every
    // block read back and verified; any mismatch fails fio.
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randseed=42",
            // No verify-state file left in the working directory.
            "--verify_state_save=0",
        ],
    );
    assert!(
        out.status.success(),
        "fio failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    q.cmd("quit", json!(null)).unwrap();
    assert!(p.0.wait().unwrap().success());
    // What fio wrote is in the image, and the image is clean.
    ok("qemu-img", &["check", &img]);
    let map = ok("qemu-img", &["map", "--output=json", &img]);
    assert!(map.contains("\"data\": true"), "{map}");
}

#[test]
fn sluice_reads_and_writes_an_nbdkit_server() {
    if !have("nbdkit") || !have("nbdcopy") {
        return;
    }
    let dir = temp_dir("nbdkit");
    let sock = dir.path("kit.sock");
    let kit = Command::new("nbdkit")
        .args(["--foreground", "-U", sock.to_str().unwrap(), "memory", "8M"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _kit = Proc(kit);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let sluice_io = sluice().to_str().unwrap();
    // Write with sluice's NBD client, including zeroes and a discard.
    ok(
        sluice_io,
        &[
            "io",
            "-f",
            "raw",
            "-c",
            "write -P 0x42 0 1M",
            "-c",
            "write -P 0x43 3M 64k",
            "-c",
            "write -z 512k 64k",
            "-c",
            "read -P 0x42 0 512k",
            "-c",
            "read -P 0 512k 64k",
            &url,
        ],
    );
    // Read it back with libnbd's nbdcopy, independently of sluice.
    let raw = dir.file("copy.raw");
    ok("nbdcopy", &[&url, &raw]);
    let data = std::fs::read(&raw).unwrap();
    assert_eq!(data.len(), 8 << 20);
    assert!(data[..512 << 10].iter().all(|&b| b == 0x42));
    assert!(data[512 << 10..576 << 10].iter().all(|&b| b == 0));
    assert!(data[576 << 10..1 << 20].iter().all(|&b| b == 0x42));
    assert!(data[3 << 20..(3 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x43));
}
