//! The `file` protocol driver: I/O on both engines, O_DIRECT, dropped
//! futures, interop and image locking with QEMU's tools, bad input.

mod common;

use common::QemuIo;
use futures::FutureExt;
use sluice_core::buf::IoBuf;
use sluice_core::perm::{Perm, PermPair};
use sluice_core::{
    BlockDriver, DriverStatus, Error, Graph, IoBytes, Node, NodeSpec, Root, WriteFlags, ZeroFlags,
};
use sluice_drivers::protocol::file::engine::{self, EngineKind};
use sluice_drivers::protocol::file::{
    self, parse_cache_mode, Aio, CacheMode, FileDriver, FileOptions, Locking,
};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, size: u64) -> TempFile {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "sluice-file-{tag}-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn fill(&self, byte: u8) {
        let len = std::fs::metadata(&self.0).unwrap().len();
        std::fs::write(&self.0, vec![byte; len as usize]).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether io_uring tests can run; says why not when they cannot.
fn uring_ok(test: &str) -> bool {
    match engine::io_uring_unavailable_reason() {
        None => true,
        Some(why) => {
            eprintln!("{test}: skipped, io_uring is not available here: {why}");
            false
        }
    }
}

fn qemu_io_ok(test: &str) -> bool {
    let ok = Command::new("qemu-io")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("{test}: skipped, qemu-io is not installed");
    }
    ok
}

fn opts(path: &str, aio: Aio) -> FileOptions {
    FileOptions {
        aio: Some(aio),
        ..FileOptions::new(path)
    }
}

/// A graph with one `file` node and a writable root on it.
struct Setup {
    _graph: Graph,
    node: Arc<Node>,
    root: Root,
}

async fn setup(path: &str, aio: Aio, cache: CacheMode) -> Setup {
    let (drv, size) = file::open(&opts(path, aio), cache, false).await.unwrap();
    assert_eq!(drv.engine_kind(), aio.engine_kind());
    let graph = Graph::new();
    let w = graph.writer().await;
    let node = w
        .add_node(NodeSpec {
            name: None,
            driver: Box::new(drv),
            size,
            read_only: false,
            children: vec![],
            implicit: false,
        })
        .await
        .unwrap();
    let root = w
        .add_root("block device", "test", &node, PermPair::writer())
        .await
        .unwrap();
    drop(w);
    Setup {
        _graph: graph,
        node,
        root,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------
// Basic I/O on both engines

async fn basic_io(aio: Aio) {
    let f = TempFile::new("basic", MIB);
    let s = setup(f.path(), aio, CacheMode::WRITEBACK).await;
    let root = &s.root;
    assert_eq!(s.node.driver_name(), "file");
    assert_eq!(s.node.driver().filename().as_deref(), Some(f.path()));
    assert_eq!(s.node.request_alignment(), 1);

    // A fresh sparse file: all zero, all hole.
    assert!(root.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
    let st = s.node.block_status(0, MIB).await.unwrap();
    assert_eq!(
        st,
        DriverStatus::Zero {
            len: MIB,
            offset: Some(0)
        }
    );

    // Writes (plain, FUA, unaligned) read back.
    let a = pattern(64 * KIB as usize, 1);
    root.write(0, IoBytes::copy_from(&a), WriteFlags::default())
        .await
        .unwrap();
    let b = pattern(5000, 2);
    root.write(
        100_003,
        IoBytes::copy_from(&b),
        WriteFlags {
            fua: true,
            ..WriteFlags::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(&root.read(0, a.len()).await.unwrap()[..], &a[..]);
    assert_eq!(&root.read(100_003, b.len()).await.unwrap()[..], &b[..]);
    root.flush().await.unwrap();

    // Block status: data where written, holes elsewhere.
    match s.node.block_status(0, MIB).await.unwrap() {
        DriverStatus::Data {
            len,
            offset: Some(0),
        } => assert!((64 * KIB..100_000).contains(&len), "{len}"),
        other => panic!("{other:?}"),
    }
    match s.node.block_status(64 * KIB, MIB - 64 * KIB).await.unwrap() {
        DriverStatus::Zero {
            len,
            offset: Some(o),
        } => {
            assert_eq!(o, 64 * KIB);
            assert!(64 * KIB + len <= 100_003, "{len}");
        }
        other => panic!("{other:?}"),
    }
    let st = s.node.block_status(100_003, 10).await.unwrap();
    assert_eq!(
        st,
        DriverStatus::Data {
            len: 10,
            offset: Some(100_003)
        }
    );

    // Write-zeroes, without and with unmap.
    root.write_zeroes(4096, 8192, ZeroFlags::default())
        .await
        .unwrap();
    let r = root.read(0, 16384).await.unwrap();
    assert_eq!(&r[..4096], &a[..4096]);
    assert!(r[4096..12288].iter().all(|&x| x == 0));
    assert_eq!(&r[12288..], &a[12288..16384]);
    root.write_zeroes(
        32 * KIB,
        16 * KIB,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(root
        .read(32 * KIB, 16 * KIB as usize)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    assert_eq!(
        s.node.block_status(32 * KIB, 16 * KIB).await.unwrap(),
        DriverStatus::Zero {
            len: 16 * KIB,
            offset: Some(32 * KIB)
        }
    );
    root.write_zeroes(
        0,
        4096,
        ZeroFlags {
            fua: true,
            no_fallback: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(root.read(0, 4096).await.unwrap().iter().all(|&x| x == 0));

    // Discard punches a hole that reads as zeroes.
    root.discard(48 * KIB, 16 * KIB).await.unwrap();
    assert!(root
        .read(48 * KIB, 16 * KIB as usize)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    assert!(matches!(
        s.node.block_status(48 * KIB, 16 * KIB).await.unwrap(),
        DriverStatus::Zero { .. }
    ));
    root.flush().await.unwrap();

    // The bytes are really in the file.
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(on_disk.len() as u64, MIB);
    assert_eq!(&on_disk[100_003..105_003], &b[..]);
    assert_eq!(&on_disk[16384..32768], &a[16384..32768]);
}

#[tokio::test]
async fn basic_io_threads() {
    basic_io(Aio::Threads).await;
}

#[tokio::test]
async fn basic_io_io_uring() {
    if uring_ok("basic_io_io_uring") {
        basic_io(Aio::IoUring).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_io_io_uring_multi_thread() {
    if uring_ok("basic_io_io_uring_multi_thread") {
        basic_io(Aio::IoUring).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_io_threads_multi_thread() {
    basic_io(Aio::Threads).await;
}

/// Many requests at once from several tasks (more than a ring has slots),
/// checked against what was written.
async fn concurrent_io(aio: Aio) {
    let f = TempFile::new("concurrent", 8 * MIB);
    let s = setup(f.path(), aio, CacheMode::WRITEBACK).await;
    let root = Arc::new(s.root);
    let mut tasks = Vec::new();
    for i in 0..512u64 {
        let root = root.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(16 * KIB as usize, i as u8);
            root.write(
                i * 16 * KIB,
                IoBytes::copy_from(&data),
                WriteFlags::default(),
            )
            .await
            .unwrap();
            let back = root.read(i * 16 * KIB, data.len()).await.unwrap();
            assert_eq!(&back[..], &data[..], "request {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    root.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_io_threads() {
    concurrent_io(Aio::Threads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_io_io_uring() {
    if uring_ok("concurrent_io_io_uring") {
        concurrent_io(Aio::IoUring).await;
    }
}

async fn resize_and_length(aio: Aio) {
    let f = TempFile::new("resize", MIB);
    let (drv, size) = file::open(&opts(f.path(), aio), CacheMode::WRITEBACK, false)
        .await
        .unwrap();
    assert_eq!(size, MIB);
    drv.resize(3 * MIB).await.unwrap();
    assert_eq!(drv.length().unwrap(), 3 * MIB);
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 3 * MIB);
    drv.resize(MIB / 2).await.unwrap();
    assert_eq!(drv.length().unwrap(), MIB / 2);
    assert!(drv.allocated_size().unwrap() < MIB);

    let (ro, _) = file::open(&opts(f.path(), aio), CacheMode::WRITEBACK, true)
        .await
        .unwrap();
    assert!(matches!(ro.resize(MIB).await, Err(Error::ReadOnly { .. })));
}

/// Appending writes find their blocks reserved past the end of the file
/// (one `fallocate` rather than allocation page by page); the reservation
/// never changes the file's length, a file grown by truncation keeps none
/// of it inside (it would stay allocated there), and closing frees it.
async fn appends_reserve_ahead(aio: Aio) {
    use std::os::unix::fs::MetadataExt;
    let f = TempFile::new("reserve", 0);
    let allocated = || std::fs::metadata(f.path()).unwrap().blocks() * 512;
    let s = setup(f.path(), aio, CacheMode::WRITEBACK).await;
    for i in 0..4 {
        s.node.set_size((i + 1) * MIB);
        let data = IoBytes::copy_from(&pattern(MIB as usize, i as u8));
        s.root
            .write(i * MIB, data, WriteFlags::default())
            .await
            .unwrap();
    }
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 4 * MIB);
    assert!(
        allocated() >= 8 * MIB,
        "nothing reserved past the end: {} bytes allocated",
        allocated()
    );
    // Growing by truncation drops what was reserved.
    s.node
        .driver()
        .truncate(&s.node, 16 * MIB, "off")
        .await
        .unwrap();
    assert!(allocated() < 5 * MIB, "{} bytes allocated", allocated());
    // Appends reserve again; closing frees the reservation.
    s.node.set_size(17 * MIB);
    let data = IoBytes::copy_from(&pattern(MIB as usize, 9));
    s.root
        .write(16 * MIB, data, WriteFlags::default())
        .await
        .unwrap();
    assert!(allocated() >= 8 * MIB);
    let node = s.node.clone();
    drop(s);
    node.driver().close();
    assert!(allocated() < 6 * MIB, "{} bytes allocated", allocated());
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 17 * MIB);
    let back = std::fs::read(f.path()).unwrap();
    for i in 0..4u64 {
        let r = (i * MIB) as usize..((i + 1) * MIB) as usize;
        assert!(
            back[r] == pattern(MIB as usize, i as u8)[..],
            "MiB {i} changed"
        );
    }
    assert!(back[4 * MIB as usize..16 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(back[16 * MIB as usize..] == pattern(MIB as usize, 9)[..]);
}

#[tokio::test]
async fn appends_reserve_ahead_threads() {
    appends_reserve_ahead(Aio::Threads).await;
}

#[tokio::test]
async fn appends_reserve_ahead_io_uring() {
    if uring_ok("appends_reserve_ahead_io_uring") {
        appends_reserve_ahead(Aio::IoUring).await;
    }
}

#[tokio::test]
async fn resize_threads() {
    resize_and_length(Aio::Threads).await;
}

#[tokio::test]
async fn resize_io_uring() {
    if uring_ok("resize_io_uring") {
        resize_and_length(Aio::IoUring).await;
    }
}

/// Reads past the end of the file (the node is larger than the file, as
/// after an outside truncate) read zeroes.
async fn reads_past_eof_are_zero(aio: Aio) {
    let f = TempFile::new("eof", 0);
    std::fs::write(f.path(), vec![0x5au8; 3000]).unwrap();
    let (drv, size) = file::open(&opts(f.path(), aio), CacheMode::WRITEBACK, false)
        .await
        .unwrap();
    assert_eq!(size, 3000);
    let graph = Graph::new();
    let w = graph.writer().await;
    let node = w
        .add_node(NodeSpec {
            name: None,
            driver: Box::new(drv),
            size: 8192,
            read_only: false,
            children: vec![],
            implicit: false,
        })
        .await
        .unwrap();
    drop(w);
    let mut buf = IoBuf::filled(8192, 0xff);
    node.read(0, buf.as_read_buf()).await.unwrap();
    assert!(buf[..3000].iter().all(|&b| b == 0x5a));
    assert!(buf[3000..].iter().all(|&b| b == 0));
    assert_eq!(
        node.block_status(4096, 4096).await.unwrap(),
        DriverStatus::Zero {
            len: 4096,
            offset: Some(4096)
        }
    );
}

#[tokio::test]
async fn reads_past_eof_are_zero_threads() {
    reads_past_eof_are_zero(Aio::Threads).await;
}

#[tokio::test]
async fn reads_past_eof_are_zero_io_uring() {
    if uring_ok("reads_past_eof_are_zero_io_uring") {
        reads_past_eof_are_zero(Aio::IoUring).await;
    }
}

// ---------------------------------------------------------------------------
// O_DIRECT

async fn direct_io(aio: Aio) {
    let f = TempFile::new("direct", MIB);
    let s = setup(f.path(), aio, CacheMode::NONE).await;
    let root = &s.root;
    let align = s.node.request_alignment();
    assert!(align >= 512 && align.is_power_of_two(), "alignment {align}");
    let mut model = vec![0u8; MIB as usize];

    // Unaligned writes and reads: the node does read-modify-write.
    for (i, &(off, len)) in [
        (1000u64, 100usize),
        (4095, 2),
        (7, 70_000),
        (MIB - 333, 333),
        (65_536, 4096),
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(len, i as u8 + 10);
        root.write(off, IoBytes::copy_from(&data), WriteFlags::default())
            .await
            .unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    for &(off, len) in &[
        (990u64, 130usize),
        (0, 100_000),
        (MIB - 1000, 1000),
        (4094, 5),
    ] {
        let got = root.read(off, len).await.unwrap();
        assert_eq!(
            &got[..],
            &model[off as usize..off as usize + len],
            "read {off}+{len}"
        );
    }
    root.flush().await.unwrap();

    // Aligned offsets, misaligned memory: the driver bounces.
    let big = IoBuf::filled(8193, 0x5a).freeze();
    root.write(
        0,
        big.slice(1..4097),
        WriteFlags {
            fua: true,
            ..WriteFlags::default()
        },
    )
    .await
    .unwrap();
    model[..4096].fill(0x5a);
    let mut target = IoBuf::zeroed(4097);
    let (_, tail) = target.as_read_buf().split_at(1);
    s.node.read(0, tail).await.unwrap();
    assert!(target[1..].iter().all(|&b| b == 0x5a));

    // Write-zeroes and discard through O_DIRECT.
    root.write_zeroes(8192, 8192, ZeroFlags::default())
        .await
        .unwrap();
    model[8192..16384].fill(0);
    root.discard(16384, 16384).await.unwrap();
    let got = root.read(0, 65536).await.unwrap();
    assert_eq!(&got[..16384], &model[..16384]);
    // Discard is advisory, but the file system punched a hole.
    assert!(got[16384..32768].iter().all(|&b| b == 0));
    model[16384..32768].fill(0);

    // What is in the file agrees.
    drop(s);
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[..], &model[..]);
}

#[tokio::test]
async fn direct_io_threads() {
    direct_io(Aio::Threads).await;
}

#[tokio::test]
async fn direct_io_io_uring() {
    if uring_ok("direct_io_io_uring") {
        direct_io(Aio::IoUring).await;
    }
}

/// A file whose size is not a multiple of the O_DIRECT alignment: the
/// aligned read of its last block comes back short and is zero-filled.
async fn direct_unaligned_tail(aio: Aio) {
    let f = TempFile::new("direct-tail", 0);
    let content = pattern(10_000, 3);
    std::fs::write(f.path(), &content).unwrap();
    let s = setup(f.path(), aio, CacheMode::DIRECTSYNC).await;
    assert_eq!(s.node.size(), 10_000);
    let got = s.root.read(0, 10_000).await.unwrap();
    assert_eq!(&got[..], &content[..]);
    let got = s.root.read(9_000, 1_000).await.unwrap();
    assert_eq!(&got[..], &content[9_000..]);
    // A write of the tail goes through (writethrough: flushed).
    s.root
        .write(9_990, IoBytes::copy_from(&[7u8; 10]), WriteFlags::default())
        .await
        .unwrap();
    let got = s.root.read(9_980, 20).await.unwrap();
    assert_eq!(&got[..10], &content[9_980..9_990]);
    assert_eq!(&got[10..], &[7u8; 10]);
}

#[tokio::test]
async fn direct_unaligned_tail_threads() {
    direct_unaligned_tail(Aio::Threads).await;
}

#[tokio::test]
async fn direct_unaligned_tail_io_uring() {
    if uring_ok("direct_unaligned_tail_io_uring") {
        direct_unaligned_tail(Aio::IoUring).await;
    }
}

// ---------------------------------------------------------------------------
// Dropped futures

/// Starts reads and writes, drops their futures (and buffers) while the I/O
/// is in flight, then checks that fresh buffers are not written behind our
/// back and that normal operation carries on.
async fn dropped_futures(aio: Aio) {
    let f = TempFile::new("dropped", 4 * MIB);
    f.fill(0x11);
    // O_DIRECT, so that reads go to the device and are still in flight
    // when dropped (page-cache hits complete at submission).
    let s = setup(f.path(), aio, CacheMode::NONE).await;
    let eng = engine::engine(aio.engine_kind()).unwrap();
    let mut started = 0;
    for round in 0..4u64 {
        for i in 0..64u64 {
            let off = ((round * 64 + i) % 64) * 64 * KIB;
            if s.root.read(off, 64 * KIB as usize).now_or_never().is_none() {
                started += 1;
            }
        }
        // Fresh buffers of the same size, likely to reuse freed memory if
        // an engine let go of a buffer too early.
        let canaries: Vec<IoBuf> = (0..64)
            .map(|_| IoBuf::filled(64 * KIB as usize, 0x77))
            .collect();
        // Writes whose futures are dropped still complete with their data.
        let data = IoBytes::copy_from(&[0x22u8; 4096]);
        let _ = s
            .root
            .write(MIB + round * 4096, data, WriteFlags::default())
            .now_or_never();
        // Let the dropped operations finish (no sleeping: yield until the
        // engine is idle; other tests may add to the count for a while).
        while eng.pending() > 0 {
            tokio::task::yield_now().await;
            std::thread::yield_now();
        }
        for c in &canaries {
            assert!(
                c.iter().all(|&b| b == 0x77),
                "a dropped read wrote into freed memory"
            );
        }
    }
    eprintln!("{started} reads were still in flight when dropped");
    // Normal operation continues.
    let got = s.root.read(0, 4 * MIB as usize).await.unwrap();
    assert!(got[..MIB as usize].iter().all(|&b| b == 0x11));
    assert!(got[MIB as usize..MIB as usize + 4 * 4096]
        .iter()
        .all(|&b| b == 0x22));
    assert!(got[MIB as usize + 4 * 4096..].iter().all(|&b| b == 0x11));
    s.root
        .write(0, IoBytes::copy_from(&[0x33; 512]), WriteFlags::default())
        .await
        .unwrap();
    assert!(s
        .root
        .read(0, 512)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0x33));
}

#[tokio::test]
async fn dropped_futures_threads() {
    dropped_futures(Aio::Threads).await;
}

#[tokio::test]
async fn dropped_futures_io_uring() {
    if uring_ok("dropped_futures_io_uring") {
        dropped_futures(Aio::IoUring).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_futures_io_uring_multi_thread() {
    if uring_ok("dropped_futures_io_uring_multi_thread") {
        dropped_futures(Aio::IoUring).await;
    }
}

/// Runtimes made one after another (and one kept alive but idle while the
/// next runs) all get their completions.
#[test]
fn io_uring_across_runtimes() {
    if !uring_ok("io_uring_across_runtimes") {
        return;
    }
    let f = TempFile::new("runtimes", MIB);
    let path = f.path().to_string();
    let roundtrip = |rt: &tokio::runtime::Runtime, byte: u8| {
        rt.block_on(async {
            let s = setup(&path, Aio::IoUring, CacheMode::WRITEBACK).await;
            s.root
                .write(0, IoBytes::copy_from(&[byte; 4096]), WriteFlags::default())
                .await
                .unwrap();
            assert!(s
                .root
                .read(0, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == byte));
            s.root.flush().await.unwrap();
        })
    };
    for i in 0..3u8 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        roundtrip(&rt, i);
    }
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    roundtrip(&idle, 10);
    let next = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    roundtrip(&next, 11);
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    roundtrip(&multi, 12);
    drop(idle);
    roundtrip(&next, 13);
}

/// Without a tokio reactor to reap completions (a runtime without I/O, or
/// no tokio at all) the io_uring engine hands requests to the thread pool.
#[test]
fn io_uring_without_a_reactor_falls_back_to_threads() {
    if !uring_ok("io_uring_without_a_reactor_falls_back_to_threads") {
        return;
    }
    let f = TempFile::new("no-reactor", MIB);
    let path = f.path().to_string();
    let roundtrip = |byte: u8| {
        let path = path.clone();
        async move {
            let s = setup(&path, Aio::IoUring, CacheMode::NONE).await;
            s.root
                .write(
                    512,
                    IoBytes::copy_from(&[byte; 4096]),
                    WriteFlags {
                        fua: true,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert!(s
                .root
                .read(512, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == byte));
            s.root
                .write_zeroes(8192, 4096, ZeroFlags::default())
                .await
                .unwrap();
            s.root.flush().await.unwrap();
        }
    };
    let no_io = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    no_io.block_on(roundtrip(1));
    no_io.block_on(roundtrip(2));
    futures::executor::block_on(roundtrip(3));
}

// ---------------------------------------------------------------------------
// Interop with qemu-io

#[tokio::test]
async fn reads_what_qemu_io_wrote_and_qemu_io_reads_ours() {
    if !qemu_io_ok("interop") {
        return;
    }
    let f = TempFile::new("interop", MIB);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 0 64k", f.path()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for aio in [Aio::Threads, Aio::IoUring] {
        if aio == Aio::IoUring && !uring_ok("interop (io_uring)") {
            continue;
        }
        for cache in [CacheMode::WRITEBACK, CacheMode::NONE] {
            let s = setup(f.path(), aio, cache).await;
            let got = s.root.read(0, 64 * KIB as usize).await.unwrap();
            assert!(got.iter().all(|&b| b == 0xab), "{aio:?} {cache:?}");
            s.root
                .write(
                    64 * KIB,
                    IoBytes::copy_from(&[0xcd; 4096]),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
            s.root.flush().await.unwrap();
            drop(s);
            let out = Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    "read -P 0xcd 64k 4k",
                    "-c",
                    "read -P 0xab 0 64k",
                    f.path(),
                ])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{stdout}{stderr}");
            assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
            assert!(
                stdout.contains("read 4096/4096 bytes at offset 65536"),
                "{stdout}{stderr}"
            );
            assert!(
                stdout.contains("read 65536/65536 bytes at offset 0"),
                "{stdout}{stderr}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Locking

#[tokio::test]
async fn sluice_cannot_write_an_image_qemu_io_holds() {
    if !qemu_io_ok("locking") {
        return;
    }
    let f = TempFile::new("lock-qemu", MIB);
    let q = QemuIo::hold(&["-f", "raw", f.path()]);
    let err = file::open(&FileOptions::new(f.path()), CacheMode::WRITEBACK, false)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Open { ref file, .. } if file == f.path()),
        "{msg}"
    );
    // qemu-io holds write and shares everything; we do not share write.
    assert!(msg.contains("Failed to get shared \"write\" lock"), "{msg}");
    assert!(
        msg.contains(&format!(
            "Is another process using the image [{}]?",
            f.path()
        )),
        "{msg}"
    );
    // Read-only, or without locking, it opens.
    file::open(&FileOptions::new(f.path()), CacheMode::WRITEBACK, true)
        .await
        .unwrap();
    let off = FileOptions {
        locking: Locking::Off,
        ..FileOptions::new(f.path())
    };
    file::open(&off, CacheMode::WRITEBACK, false).await.unwrap();
    q.quit();
    // Once qemu-io is gone, the image is ours.
    file::open(&FileOptions::new(f.path()), CacheMode::WRITEBACK, false)
        .await
        .unwrap();
}

#[tokio::test]
async fn qemu_io_cannot_write_an_image_sluice_holds() {
    if !qemu_io_ok("locking") {
        return;
    }
    let f = TempFile::new("lock-sluice", MIB);
    let (drv, _) = file::open(&FileOptions::new(f.path()), CacheMode::WRITEBACK, false)
        .await
        .unwrap();
    assert!(drv.locking_enabled());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 512", f.path()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("Failed to get \"write\" lock"), "{stderr}");
    assert!(
        stderr.contains("Is another process using the image"),
        "{stderr}"
    );
    // With -U (force-share, read-only) it may read.
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "raw", "-c", "read 0 512", f.path()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Closing the node releases the locks.
    drv.close();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 512", f.path()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(drv);
}

#[tokio::test]
async fn two_sluice_opens_see_each_others_locks() {
    let f = TempFile::new("lock-self", MIB);
    let (w, _) = file::open(&FileOptions::new(f.path()), CacheMode::WRITEBACK, false)
        .await
        .unwrap();
    assert_eq!(w.perms(), file::default_perms(false));
    let err = file::open(&FileOptions::new(f.path()), CacheMode::WRITEBACK, false)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("Failed to get \"write\" lock"),
        "{err}"
    );

    // A read-only open shares everything: it coexists with the writer...
    let (r, _) = file::open(&FileOptions::new(f.path()), CacheMode::WRITEBACK, true)
        .await
        .unwrap();
    // ...but cannot stop sharing write while the writer is there, and
    // keeps its old locks when refused.
    let err = r.apply_perms(PermPair::reader()).unwrap_err();
    assert!(
        err.to_string()
            .contains("Failed to get shared \"write\" lock"),
        "{err}"
    );
    assert_eq!(r.perms(), file::default_perms(true));
    // The writer cannot give its permissions to another while r reads...
    let err = r
        .apply_perms(PermPair::new(
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL,
        ))
        .unwrap_err();
    assert!(
        err.to_string().contains("Failed to get \"write\" lock"),
        "{err}"
    );
    // ...and the writer can drop to reading, after which r may restrict.
    w.apply_perms(PermPair::reader_sharing_all()).unwrap();
    r.apply_perms(PermPair::reader()).unwrap();
    let err = w.apply_perms(file::default_perms(false)).unwrap_err();
    assert!(
        err.to_string().contains("Failed to get \"write\" lock"),
        "{err}"
    );
    drop(r);
    w.apply_perms(file::default_perms(false)).unwrap();
}

// ---------------------------------------------------------------------------
// Options and bad input

#[test]
fn options_parse_like_qemu() {
    let o: FileOptions = serde_json::from_value(serde_json::json!({
        "filename": "/x", "aio": "native", "locking": "off", "aio-max-batch": 32, "drop-cache": true
    }))
    .unwrap();
    assert_eq!(o.aio.map(Aio::engine_kind), Some(EngineKind::IoUring));
    assert_eq!(o.locking, Locking::Off);
    let o: FileOptions =
        serde_json::from_value(serde_json::json!({"filename": "/x", "aio": "threads"})).unwrap();
    assert_eq!(o.aio, Some(Aio::Threads));
    assert_eq!(o.locking, Locking::Auto);

    let err =
        serde_json::from_value::<FileOptions>(serde_json::json!({"filename": "/x", "bogus": 1}))
            .unwrap_err();
    assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
    let err = serde_json::from_value::<FileOptions>(
        serde_json::json!({"filename": "/x", "aio": "posix"}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("posix"), "{err}");
    let err =
        serde_json::from_value::<FileOptions>(serde_json::json!({"aio": "threads"})).unwrap_err();
    assert!(err.to_string().contains("filename"), "{err}");

    assert_eq!(parse_cache_mode("none").unwrap(), CacheMode::NONE);
    assert_eq!(parse_cache_mode("writeback").unwrap(), CacheMode::WRITEBACK);
    assert_eq!(
        parse_cache_mode("writethrough").unwrap(),
        CacheMode::WRITETHROUGH
    );
    assert_eq!(
        parse_cache_mode("directsync").unwrap(),
        CacheMode::DIRECTSYNC
    );
    assert_eq!(parse_cache_mode("unsafe").unwrap(), CacheMode::UNSAFE);
    let err = parse_cache_mode("fast").unwrap_err();
    assert!(err.to_string().contains("fast"), "{err}");
}

#[tokio::test]
async fn missing_file_and_non_files_are_refused() {
    let missing =
        std::env::temp_dir().join(format!("sluice-file-missing-{}.img", std::process::id()));
    let missing = missing.to_str().unwrap();
    let err = file::open(&FileOptions::new(missing), CacheMode::WRITEBACK, false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Open { file, source } if file == missing && source.raw_os_error() == Some(libc::ENOENT)),
        "{err}"
    );
    // QEMU: "Could not open 'x': No such file or directory".
    assert!(
        err.to_string().starts_with(&format!(
            "Could not open '{missing}': No such file or directory"
        )),
        "{err}"
    );

    let dir = std::env::temp_dir();
    let err = file::open(
        &FileOptions::new(dir.to_str().unwrap()),
        CacheMode::WRITEBACK,
        true,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("regular file"), "{err}");
}

#[tokio::test]
async fn unsafe_cache_ignores_flushes_and_probe_picks_an_engine() {
    let kind = engine::probe();
    eprintln!("probe chose {}", kind.name());
    assert_eq!(
        kind == EngineKind::IoUring,
        engine::io_uring_unavailable_reason().is_none()
    );
    let f = TempFile::new("unsafe", MIB);
    let (drv, _) = file::open(&FileOptions::new(f.path()), CacheMode::UNSAFE, false)
        .await
        .unwrap();
    assert_eq!(drv.engine_kind(), kind);
    let g = Graph::new();
    let w = g.writer().await;
    let node = w
        .add_node(NodeSpec {
            name: None,
            driver: Box::new(drv),
            size: MIB,
            read_only: false,
            children: vec![],
            implicit: false,
        })
        .await
        .unwrap();
    drop(w);
    node.write(
        0,
        IoBytes::copy_from(&[1; 512]),
        WriteFlags {
            fua: true,
            ..WriteFlags::default()
        },
    )
    .await
    .unwrap();
    node.flush().await.unwrap();
}

/// `FileDriver` is a `BlockDriver` that a graph can own.
#[test]
fn file_driver_is_a_block_driver() {
    fn boxed(d: FileDriver) -> Box<dyn BlockDriver> {
        Box::new(d)
    }
    let _ = boxed;
}
