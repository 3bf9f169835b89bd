//! Reopening `file` and `qcow2` nodes read-only and read-write on real
//! images, with QEMU's tools as the referee: writes work after a switch to
//! read-write and are refused after a switch back, the image stays clean
//! and holds what was written, a lock held by `qemu-io` refuses the switch,
//! and a failed switch leaves every node as it was.

mod common;

use common::QemuIo;
use serde_json::{json, Value};
use sluice_core::{
    DebugEvent, Error, Graph, IoBytes, Node, Perm, PermPair, Result, Role, Root, WriteFlags,
};
use sluice_drivers::open_with;
use sluice_drivers::protocol::file::CacheMode;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("sluice-reopen-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: QEMU's tools are not installed");
    }
    ok
}

/// Runs a QEMU tool; returns (success, stdout + stderr).
fn tool(prog: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(prog).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn ok(prog: &str, args: &[&str]) -> String {
    let (good, text) = tool(prog, args);
    assert!(good, "{prog} {args:?}: {text}");
    text
}

/// `qemu-img check` finds the image clean (no corruption, no leak).
fn assert_clean(img: &str) {
    let (good, text) = tool("qemu-img", &["check", "-U", img]);
    assert!(good, "qemu-img check {img}: {text}");
    assert!(text.contains("No errors were found"), "{text}");
}

/// The header's incompatible feature bits (dirty: 1, corrupt: 2).
fn incompatible_features(img: &str) -> u64 {
    let b = std::fs::read(img).unwrap();
    u64::from_be_bytes(b[72..80].try_into().unwrap())
}

fn set_incompatible_features(img: &str, bits: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&bits.to_be_bytes(), 72).unwrap();
}

fn qcow2(dir: &TempDir, name: &str, opts: &str) -> String {
    let img = dir.file(name);
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, &img, "4M"],
    );
    ok("qemu-io", &["-c", "write -P 0x11 0 1M", &img]);
    img
}

/// A fresh directory `tag`, or `None` (the test is skipped) without
/// QEMU's tools.
fn scratch(tag: &str) -> Option<TempDir> {
    have_qemu().then(|| TempDir::new(tag))
}

/// `scratch(tag)` holding `a.qcow2` made by `qcow2` with `opts`.
fn qcow2_scratch(tag: &str, opts: &str) -> Option<(TempDir, String)> {
    let dir = scratch(tag)?;
    let img = qcow2(&dir, "a.qcow2", opts);
    Some((dir, img))
}

/// `qemu-io -r [FLAGS] -c CMD... IMG` must succeed (its reads check the
/// pattern).
fn qemu_io_reads(img: &str, flags: &[&str], cmds: &[&str]) {
    let mut args = vec!["-r"];
    args.extend_from_slice(flags);
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img);
    ok("qemu-io", &args);
}

/// A writer root on `node` is refused: the node is read-only.
async fn assert_no_writer(graph: &Graph, node: &Arc<Node>) {
    let Err(err) = root(graph, node, writer_perm()).await else {
        panic!("a writer on a read-only node")
    };
    assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
}

/// A refused reopen left `disk` in `modes` and the graph as `before`.
fn assert_unchanged(
    graph: &Graph,
    disk: &Arc<Node>,
    want: (bool, bool),
    before: &sluice_core::GraphSnapshot,
) {
    assert_eq!(modes(disk), want);
    assert_eq!(&graph.snapshot(), before);
}

async fn open(graph: &Graph, opts: Value, read_only: bool) -> Arc<Node> {
    let w = graph.writer().await;
    open_with(&w, opts, CacheMode::WRITEBACK, read_only)
        .await
        .unwrap()
}

fn qcow2_opts(img: &str) -> Value {
    json!({"driver": "qcow2", "node-name": "disk",
           "file": {"driver": "file", "filename": img}})
}

async fn reopen(graph: &Graph, node: &Arc<Node>, read_only: bool) -> Result<()> {
    let w = graph.writer().await;
    let drained = w.drain_for_reopen(node).await;
    w.reopen_read_only(&drained, node, read_only).await
}

async fn root(graph: &Graph, node: &Arc<Node>, perm: PermPair) -> Result<Root> {
    let w = graph.writer().await;
    w.add_root("block device", "test", node, perm).await
}

fn writer_perm() -> PermPair {
    PermPair::new(Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
}

async fn write(r: &Root, offset: u64, len: usize, byte: u8) -> Result<()> {
    r.write(
        offset,
        IoBytes::copy_from(&vec![byte; len]),
        WriteFlags::default(),
    )
    .await
}

/// Closes `node` (and its implicit children) as `blockdev-del` does.
async fn close(graph: &Graph, node: &Arc<Node>) {
    let w = graph.writer().await;
    let drained = w.drain(node).await;
    w.delete_node(&drained, node).await.unwrap();
}

/// The flags of `node` and of its `file` child.
fn modes(node: &Arc<Node>) -> (bool, bool) {
    let file = node.child(Role::File).unwrap();
    (node.is_read_only(), file.is_read_only())
}

#[tokio::test]
async fn read_only_to_read_write_then_writes_work() {
    let Some((_dir, img)) = qcow2_scratch("ro-rw", "cluster_size=65536") else {
        return;
    };
    let graph = Graph::new();
    let disk = open(&graph, qcow2_opts(&img), true).await;
    assert_eq!(modes(&disk), (true, true));
    assert_no_writer(&graph, &disk).await;

    reopen(&graph, &disk, false).await.unwrap();
    assert_eq!(modes(&disk), (false, false));
    let r = root(&graph, &disk, writer_perm()).await.unwrap();
    write(&r, 2 * MIB, 65536 + 512, 0x22).await.unwrap();
    r.flush().await.unwrap();
    // Switching again to the mode it has is nothing to do.
    reopen(&graph, &disk, false).await.unwrap();
    drop(r);
    close(&graph, &disk).await;

    assert_clean(&img);
    qemu_io_reads(
        &img,
        &[],
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 2M 66048",
            "read -P 0 1M 1M",
        ],
    );
}

#[tokio::test]
async fn read_write_to_read_only_flushes_and_refuses_writes() {
    // Lazy refcounts: writes set the dirty bit, which a switch to
    // read-only must clear (as a close does).
    let Some((_dir, img)) = qcow2_scratch("rw-ro", "lazy_refcounts=on") else {
        return;
    };
    let graph = Graph::new();
    let disk = open(&graph, qcow2_opts(&img), false).await;
    let r = root(&graph, &disk, writer_perm()).await.unwrap();
    write(&r, MIB, 3 * 65536, 0x33).await.unwrap();
    assert_eq!(incompatible_features(&img) & 1, 1, "a write marks it dirty");

    // A writer still uses it: refused, and nothing changed.
    let before = graph.snapshot();
    let err = reopen(&graph, &disk, true).await.unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
    assert_unchanged(&graph, &disk, (false, false), &before);
    write(&r, 3 * MIB, 4096, 0x44).await.unwrap();
    drop(r);

    reopen(&graph, &disk, true).await.unwrap();
    assert_eq!(modes(&disk), (true, true));
    assert_eq!(incompatible_features(&img), 0, "marked clean");
    assert_no_writer(&graph, &disk).await;
    let err = disk
        .write(0, IoBytes::copy_from(&[0u8; 512]), WriteFlags::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
    // Still open in sluice, read-only: the image on disk is whole.
    assert_clean(&img);
    qemu_io_reads(
        &img,
        &["-U"],
        &["read -P 0x33 1M 196608", "read -P 0x44 3M 4096"],
    );
    let r = root(&graph, &disk, PermPair::reader()).await.unwrap();
    let got = r.read(MIB, 512).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x33));
}

#[tokio::test]
async fn qemu_io_holding_the_image_refuses_read_write() {
    let Some((_dir, img)) = qcow2_scratch("conflict", "cluster_size=65536") else {
        return;
    };
    let graph = Graph::new();
    let disk = open(&graph, qcow2_opts(&img), true).await;
    let r = root(&graph, &disk, PermPair::reader()).await.unwrap();
    // qemu-io reading the image does not share writing it.
    let q = QemuIo::hold(&["-r", "-f", "qcow2", &img]);
    let before = graph.snapshot();
    let err = reopen(&graph, &disk, false).await.unwrap_err().to_string();
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    assert!(err.contains("Is another process using the image"), "{err}");
    assert_unchanged(&graph, &disk, (true, true), &before);
    let got = r.read(0, 4096).await.unwrap();
    assert!(got.iter().all(|&b| b == 0x11), "still reads");
    drop(q);
    reopen(&graph, &disk, false).await.unwrap();
    assert_eq!(modes(&disk), (false, false));
    drop(r);
    // Read-write now: qemu-io can no longer write it.
    let (good, text) = tool("qemu-io", &["-c", "read 0 512", &img]);
    assert!(!good && text.contains("lock"), "{text}");
}

#[tokio::test]
async fn qemu_io_writing_a_raw_file_refuses_read_write() {
    let Some(dir) = scratch("conflict-raw") else {
        return;
    };
    let img = dir.file("a.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", &img, "1M"]);
    let graph = Graph::new();
    let file = open(
        &graph,
        json!({"driver": "file", "node-name": "f", "filename": img}),
        true,
    )
    .await;
    let r = root(&graph, &file, PermPair::reader_sharing_all())
        .await
        .unwrap();
    let q = QemuIo::hold(&["-f", "raw", &img]);
    // qemu-io writes and shares writing; a writable open does not share.
    let err = reopen(&graph, &file, false).await.unwrap_err().to_string();
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    assert!(file.is_read_only());
    r.read(0, 512).await.unwrap();
    drop(q);
    reopen(&graph, &file, false).await.unwrap();
    assert!(!file.is_read_only());
    drop(r);
    let r = root(&graph, &file, writer_perm()).await.unwrap();
    write(&r, 0, 512, 0x55).await.unwrap();
    r.flush().await.unwrap();
    drop(r);
    close(&graph, &file).await;
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x55 0 512", &img]);
}

#[tokio::test]
async fn a_failing_step_rolls_everything_back() {
    let Some((_dir, img)) = qcow2_scratch("rollback", "cluster_size=65536") else {
        return;
    };
    set_incompatible_features(&img, 2);
    let graph = Graph::new();
    let disk = open(&graph, qcow2_opts(&img), true).await;
    let r = root(&graph, &disk, PermPair::reader()).await.unwrap();
    let before = graph.snapshot();
    // The file switches first, then qcow2 refuses the corrupt image: the
    // file is switched back.
    let err = reopen(&graph, &disk, false).await.unwrap_err().to_string();
    assert!(
        err.contains("Image is corrupt; cannot be opened read/write"),
        "{err}"
    );
    assert_unchanged(&graph, &disk, (true, true), &before);
    r.read(0, 4096).await.unwrap();
    // The file is read-only again and holds no write lock: qemu-io may
    // open it (read-only, as the corrupt image allows).
    qemu_io_reads(&img, &[], &["read -P 0x11 0 4096"]);
    assert_eq!(incompatible_features(&img), 2, "nothing written");
}

#[tokio::test]
async fn a_dirty_image_is_repaired_when_it_becomes_writable() {
    let Some(dir) = scratch("dirty") else {
        return;
    };
    let img = dir.file("a.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            &img,
            "4M",
        ],
    );
    // A crash after a write leaves the dirty bit and refcounts behind.
    let _ = tool(
        "qemu-io",
        &["-c", "write -P 0x66 0 256k", "-c", "abort", &img],
    );
    assert_eq!(incompatible_features(&img) & 1, 1);
    let graph = Graph::new();
    let disk = open(&graph, qcow2_opts(&img), true).await;
    reopen(&graph, &disk, false).await.unwrap();
    assert_eq!(incompatible_features(&img) & 1, 0, "repaired");
    let r = root(&graph, &disk, writer_perm()).await.unwrap();
    write(&r, MIB, 65536, 0x77).await.unwrap();
    drop(r);
    close(&graph, &disk).await;
    assert_clean(&img);
    qemu_io_reads(&img, &[], &["read -P 0x66 0 256k", "read -P 0x77 1M 64k"]);
}

#[tokio::test]
async fn the_drain_must_cover_every_node_switched() {
    let Some((_dir, img)) = qcow2_scratch("drain", "cluster_size=65536") else {
        return;
    };
    let graph = Graph::new();
    let disk = open(&graph, qcow2_opts(&img), true).await;
    let w = graph.writer().await;
    // Draining the qcow2 node does not cover its file child below.
    let drained = w.drain(&disk).await;
    let err = w
        .reopen_read_only(&drained, &disk, false)
        .await
        .unwrap_err();
    let file = disk.child(Role::File).unwrap();
    assert!(
        matches!(&err, Error::WrongDrain { node, .. } if node == file.name()),
        "{err}"
    );
    assert_eq!(modes(&disk), (true, true));
}

#[tokio::test]
async fn protocol_and_filter_nodes_switch_both_ways() {
    let graph = Graph::new();
    let opts = json!({"driver": "raw", "node-name": "r",
                      "file": {"driver": "null-co", "size": 1048576}});
    let raw = open(&graph, opts, true).await;
    reopen(&graph, &raw, false).await.unwrap();
    assert_eq!(modes(&raw), (false, false));
    let r = root(&graph, &raw, writer_perm()).await.unwrap();
    write(&r, 0, 512, 1).await.unwrap();
    drop(r);
    reopen(&graph, &raw, true).await.unwrap();
    assert_eq!(modes(&raw), (true, true));
    let mem = open(
        &graph,
        json!({"driver": "memory", "node-name": "m", "size": 65536}),
        true,
    )
    .await;
    reopen(&graph, &mem, false).await.unwrap();
    assert!(!mem.is_read_only());
}

/// qcow2 over a blkdebug filter over the image, opened read-only, with a
/// guest read parked at `read_aio` inside it.
async fn parked_read(
    graph: &Graph,
    img: &str,
) -> (
    Arc<Node>,
    tokio::task::JoinHandle<Result<sluice_core::IoBuf>>,
) {
    let opts = json!({"driver": "qcow2", "node-name": "disk",
                      "file": {"driver": "blkdebug",
                               "image": {"driver": "file", "filename": img}}});
    let disk = open(graph, opts, true).await;
    let r = root(graph, &disk, PermPair::reader()).await.unwrap();
    let dbg = disk.child(Role::File).unwrap();
    let ctl = dbg.driver().debug_control().unwrap();
    ctl.set_breakpoint(DebugEvent::ReadAio, "r").unwrap();
    let read = tokio::spawn(async move { r.read(0, 4096).await });
    ctl.wait_suspended("r").await;
    (disk, read)
}

/// The image file under the blkdebug filter.
fn image_file(disk: &Arc<Node>) -> Arc<Node> {
    disk.child(Role::File).unwrap().child(Role::File).unwrap()
}

fn resume(disk: &Arc<Node>) {
    let dbg = disk.child(Role::File).unwrap();
    dbg.driver().debug_control().unwrap().resume("r").unwrap();
}

#[tokio::test]
async fn a_reopen_waits_for_requests_in_flight() {
    let Some((_dir, img)) = qcow2_scratch("in-flight", "cluster_size=65536") else {
        return;
    };
    let graph = Graph::new();
    let (disk, read) = parked_read(&graph, &img).await;
    let (g, d) = (graph.clone(), disk.clone());
    let reopening = tokio::spawn(async move { reopen(&g, &d, false).await });
    // Without the drain the image file (switched first, without waiting
    // for any I/O) would be read-write after a few turns.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!reopening.is_finished());
    assert!(image_file(&disk).is_read_only() && disk.is_read_only());
    resume(&disk);
    let got = read.await.unwrap().unwrap();
    assert!(got.iter().all(|&b| b == 0x11));
    reopening.await.unwrap().unwrap();
    assert!(!image_file(&disk).is_read_only() && !disk.is_read_only());
}

/// The negative control: the same reopen under a guard that skipped the
/// drain switches every node while the read is still inside them.
#[tokio::test]
async fn without_the_drain_a_reopen_runs_under_requests_in_flight() {
    let Some((_dir, img)) = qcow2_scratch("in-flight-control", "cluster_size=65536") else {
        return;
    };
    let graph = Graph::new();
    let (disk, read) = parked_read(&graph, &img).await;
    {
        let w = graph.writer().await;
        let skipped = w.drain_skipped_for_negative_control(&image_file(&disk));
        w.reopen_read_only(&skipped, &disk, false).await.unwrap();
    }
    assert!(!read.is_finished(), "the read is still parked");
    assert!(!image_file(&disk).is_read_only() && !disk.is_read_only());
    resume(&disk);
    read.await.unwrap().unwrap();
}
