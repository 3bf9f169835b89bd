//! Helpers for the qcow2 interop tests: temporary directories, QEMU's
//! tools as the referee, and reading images through sluice.
#![allow(dead_code)]

use serde_json::Value;
use sluice_core::status::map_range;
use sluice_core::{Graph, Node, PermPair, Result, Root};
use sluice_drivers::open::{image_options, open_with};
use sluice_drivers::protocol::file::CacheMode;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "sluice-qcow2-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command; panics with its output if it fails.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs qemu-io commands on a qcow2 image.
pub fn qemu_io(img: &str, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), "qcow2".to_string(), img.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {args:?}: {out}"
    );
}

/// `qemu-img create -q -f qcow2 [-o OPTS] IMG SIZE` (no `-o` when `opts`
/// is empty).
pub fn create_qcow2(img: &str, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img, size]);
    qemu_img(&args);
}

/// `qemu-img create -q -f qcow2 -b BACKING -F qcow2 IMG [SIZE]`: an
/// overlay of the qcow2 `backing` (its size when `size` is empty).
pub fn create_overlay(img: &str, backing: &str, size: &str) {
    let mut args = vec![
        "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", img,
    ];
    if !size.is_empty() {
        args.push(size);
    }
    qemu_img(&args);
}

/// What `qemu-img convert ARGS -O raw` makes of the image (written to
/// `{img}.{tag}.raw`, then removed).
fn convert_raw(img: &str, args: &[&str], tag: &str) -> Vec<u8> {
    let out = format!("{img}.{tag}.raw");
    let mut a = vec!["convert"];
    a.extend_from_slice(args);
    a.extend(["-O", "raw", img, &out]);
    qemu_img(&a);
    let data = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    data
}

/// What `qemu-img convert -O raw` makes of the image.
pub fn qemu_raw(img: &str) -> Vec<u8> {
    convert_raw(img, &[], "ref")
}

/// The raw contents of internal snapshot `name`, as `qemu-img convert
/// -l` reads it.
pub fn snapshot_raw(img: &str, name: &str) -> Vec<u8> {
    convert_raw(img, &["-l", &format!("snapshot.name={name}")], name)
}

/// An image opened through sluice as `qemu-img` would: probed format, a
/// read-only (or writable) root on it.
pub struct Opened {
    pub graph: Graph,
    pub node: Arc<Node>,
    pub root: Root,
}

pub async fn open_image(img: &str, read_only: bool) -> Result<Opened> {
    let opts = image_options(img, None).map_err(sluice_core::Error::Other)?;
    open_opts(opts, read_only).await
}

pub async fn open_opts(opts: Value, read_only: bool) -> Result<Opened> {
    let graph = Graph::new();
    let (node, root) = {
        let w = graph.writer().await;
        let node = open_with(&w, opts, CacheMode::WRITEBACK, read_only).await?;
        let perm = if read_only {
            PermPair::reader()
        } else {
            PermPair::writer()
        };
        let root = w.add_root("block device", "test", &node, perm).await?;
        (node, root)
    };
    Ok(Opened { graph, node, root })
}

/// Reads the whole image through sluice in `chunk`-byte requests.
pub async fn read_all(o: &Opened, chunk: u64) -> Vec<u8> {
    let size = o.node.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos);
        let buf = o
            .root
            .read(pos, n as usize)
            .await
            .unwrap_or_else(|e| panic!("read at {pos} length {n}: {e}"));
        out.extend_from_slice(&buf);
        pos += n;
    }
    out
}

/// Compares two images' bytes, naming the first difference.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} ({:#x}): sluice {:#04x}, qemu {:#04x}",
            i, got[i], want[i]
        );
    }
}

/// Per-`unit` status: (present, zero, data, depth if present, offset).
type Unit = (bool, bool, bool, Option<u32>, Option<u64>);

fn expand(out: &mut [Unit], unit: u64, start: u64, len: u64, u: Unit) {
    let mut pos = start;
    while pos < start + len {
        let i = (pos / unit) as usize;
        if i < out.len() {
            let mut v = u;
            v.4 = u.4.map(|o| o + (pos - start));
            out[i] = v;
        }
        pos += unit;
    }
}

/// Block status through sluice against `qemu-img map --output=json`,
/// per `unit` bytes: allocation, zero, data, depth (where allocated) and
/// offset (where both tell).
pub async fn assert_map_matches(img: &str, o: &Opened, unit: u64) {
    let size = o.node.size();
    let n = size.div_ceil(unit) as usize;
    let mut want = vec![(false, false, false, None, None); n];
    for e in qemu_map(img) {
        let present = e["present"].as_bool().unwrap();
        let u = (
            present,
            e["zero"].as_bool().unwrap(),
            e["data"].as_bool().unwrap(),
            present.then(|| e["depth"].as_u64().unwrap() as u32),
            e["offset"].as_u64(),
        );
        expand(
            &mut want,
            unit,
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            u,
        );
    }
    let mut got = vec![(false, false, false, None, None); n];
    for e in map_range(&o.node, 0, size).await.unwrap() {
        let u = (
            e.present,
            e.zero,
            e.data,
            e.present.then_some(e.depth),
            e.offset,
        );
        expand(&mut got, unit, e.start, e.length, u);
    }
    for i in 0..n {
        let (g, w) = (got[i], want[i]);
        let offsets_agree = match (g.4, w.4) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        assert!(
            g.0 == w.0 && g.1 == w.1 && g.2 == w.2 && g.3 == w.3 && offsets_agree,
            "{img}: block status at {:#x}: sluice {g:?}, qemu-img map {w:?}",
            i as u64 * unit
        );
    }
}

/// Overwrites bytes of a file.
pub fn patch(path: &str, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

pub fn exists(p: &str) -> bool {
    Path::new(p).exists()
}

/// The protocol (`file`) node of an image, for tools that work below the
/// format (check, repair); the graph keeps it open.
pub async fn open_file_node(path: &str, read_only: bool) -> (Graph, Arc<Node>) {
    let graph = Graph::new();
    let node = {
        let w = graph.writer().await;
        let opts = serde_json::json!({"driver": "file", "filename": path});
        open_with(&w, opts, CacheMode::WRITEBACK, read_only)
            .await
            .unwrap_or_else(|e| panic!("{path}: open: {e}"))
    };
    (graph, node)
}

/// `qemu-img check [args] --output=json img`: its exit status and JSON.
pub fn qemu_check_json(img: &str, args: &[&str]) -> (i32, String) {
    let mut a = vec!["check", "--output=json"];
    a.extend_from_slice(args);
    a.push(img);
    let out = Command::new("qemu-img").args(&a).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
    )
}

/// Big-endian fields of a file.
pub fn read_be(path: &str, offset: u64, len: usize) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{path}: {len} bytes at {offset}: {e}"));
    buf.iter().fold(0, |a, &b| (a << 8) | u64::from(b))
}

/// The refcount block that holds the `bytes`-byte refcount of cluster
/// `k` (0: none), and the refcount's offset in it.
fn refcount_slot(path: &str, k: u64, bytes: u64) -> (u64, u64) {
    let cb = read_be(path, 20, 4);
    let rt = read_be(path, 48, 8);
    let per = (1u64 << cb) / bytes;
    let block = read_be(path, rt + (k / per) * 8, 8);
    (block, (k % per) * bytes)
}

/// Sets the 16-bit refcount of cluster `k` of a qcow2 image (default
/// refcount width) in place, bypassing everything.
pub fn poke_refcount16(path: &str, k: u64, v: u16) {
    let (block, at) = refcount_slot(path, k, 2);
    assert_ne!(block, 0, "{path}: no refcount block for cluster {k}");
    patch(path, block + at, &v.to_be_bytes());
}

/// The stored 16-bit refcount of cluster `k`.
pub fn peek_refcount16(path: &str, k: u64) -> u64 {
    peek_refcount_bytes(path, k, 2)
}

fn peek_refcount_bytes(path: &str, k: u64, bytes: u64) -> u64 {
    let (block, at) = refcount_slot(path, k, bytes);
    read_be(path, block + at, bytes as usize)
}

/// The stored refcount of cluster `k`, of the image's width (16 bits
/// for version 2; the test images use 8 or 16).
pub fn peek_refcount(path: &str, k: u64) -> u64 {
    let order = read_be(path, 96, 4);
    if read_be(path, 4, 4) < 3 || order == 4 {
        return peek_refcount16(path, k);
    }
    assert_eq!(order, 3, "test images use 8 or 16-bit refcounts");
    peek_refcount_bytes(path, k, 1)
}

/// Offset of the L2 entry for guest offset `guest` (standard entries).
pub fn l2_entry_at(path: &str, guest: u64) -> u64 {
    let cb = read_be(path, 20, 4);
    let l1 = read_be(path, 40, 8);
    let per = 1u64 << (cb - 3);
    let l1e = read_be(path, l1 + (guest >> cb) / per * 8, 8);
    let l2 = l1e & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "{path}: guest offset {guest} has no L2 table");
    l2 + ((guest >> cb) % per) * 8
}

/// Closes an image the clean way (as `qemu-img` ends): the root goes,
/// the node is deleted, which flushes it as it closes.
pub async fn close(o: Opened) {
    let Opened { graph, node, root } = o;
    drop(root);
    let w = graph.writer().await;
    let d = w.drain(&node).await;
    w.delete_node(&d, &node)
        .await
        .unwrap_or_else(|e| panic!("closing {}: {e}", node.name()));
}

/// Whether the header's dirty bit (incompatible feature bit 0) is set.
pub fn is_dirty(path: &str) -> bool {
    read_be(path, 72, 8) & 1 != 0
}

/// `qemu-img check img`: exit status and all it printed.
pub fn qemu_check_text(img: &str) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", img])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `qemu-img info --output=json`.
pub fn qemu_info(img: &str) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", img])).unwrap()
}

/// `qemu-img map --output=json`'s entries.
pub fn qemu_map(img: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&qemu_img(&["map", "--output=json", img])).unwrap();
    v.as_array().unwrap().clone()
}

/// `qemu-img check` finds no errors and no leaks.
pub fn assert_clean(img: &str) {
    let (code, text) = qemu_check_text(img);
    assert!(
        code == 0 && text.contains("No errors were found"),
        "qemu-img check {img}: {text}"
    );
}

/// `qemu-img check` finds no corruption (leaked clusters are allowed
/// after a crash).
pub fn assert_no_corruption(img: &str, what: &str) {
    let (code, text) = qemu_check_text(img);
    assert!(
        matches!(code, 0 | 3) && !text.contains("ERROR"),
        "{what}: qemu-img check: {text}"
    );
}

/// A crash test's seed: `SLUICE_CRASH_SEED` replays one, else random;
/// printed either way.
pub fn crash_seed() -> u64 {
    let seed = env_crash_seed().unwrap_or_else(rand::random);
    println!("seed {seed}");
    seed
}

/// `SLUICE_CRASH_SEED` if set, else `default`.
pub fn crash_seed_or(default: u64) -> u64 {
    env_crash_seed().unwrap_or(default)
}

fn env_crash_seed() -> Option<u64> {
    std::env::var("SLUICE_CRASH_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
}
