//! The `nbd` client driver against QEMU's servers (`qemu-nbd`,
//! `qemu-storage-daemon`) and against fake servers that break the
//! protocol: data written by QEMU's tools reads back, data written through
//! sluice is what `qemu-io` and `qemu-img compare` find, block status
//! matches `qemu-img map`, and a dead or misbehaving server gives clean
//! errors, never a panic or a hang.

mod common;

use common::root_on;
use serde_json::{json, Value};
use sluice_core::status::map_range;
use sluice_core::{Error, Graph, IoBytes, Node, Perm, PermPair, Root, WriteFlags, ZeroFlags};
use sluice_drivers::blockdev_add;
use sluice_drivers::protocol::nbd::proto::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const MIB: u64 = 1 << 20;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d =
            std::env::temp_dir().join(format!("sluice-nbd-client-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a QEMU tool; returns its exit status and output.
fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn must(cmd: &str, args: &[&str]) -> String {
    let (ok, text) = tool(cmd, args);
    assert!(ok, "{cmd} {args:?} failed: {text}");
    text
}

/// A QEMU NBD server process, killed when dropped.
struct Server {
    child: Child,
    cmd: &'static str,
    args: Vec<String>,
    ready: Ready,
    log: PathBuf,
}

#[derive(Clone)]
enum Ready {
    Unix(PathBuf),
    Tcp(u16),
}

impl Server {
    fn start(cmd: &'static str, args: Vec<String>, ready: Ready, log: PathBuf) -> Server {
        let child = spawn(cmd, &args, &log);
        let mut s = Server {
            child,
            cmd,
            args,
            ready,
            log,
        };
        s.wait_ready();
        s
    }

    /// `qemu-nbd` serving `img` as `export` on the Unix socket `sock`.
    fn qemu_nbd(dir: &TempDir, sock: &Path, img: &Path, fmt: &str, extra: &[&str]) -> Server {
        let mut args: Vec<String> = ["-k", s(sock), "-f", fmt, "--persistent", "-e", "8"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(s(img).to_string());
        Server::start(
            "qemu-nbd",
            args,
            Ready::Unix(sock.to_path_buf()),
            dir.path("server.log"),
        )
    }

    /// Waits until the server accepts connections (bounded: a guard
    /// against a server that never comes up, not an ordering device).
    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            let up = match &self.ready {
                Ready::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                Ready::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            };
            if up {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("{} exited with {status} before listening: {log}", self.cmd);
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{} did not start listening",
                self.cmd
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.cmd, &self.args, &self.log);
        self.wait_ready();
    }
}

fn spawn(cmd: &str, args: &[String], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"))
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `qemu-io -f FMT -c CMD... IMG`, which must succeed.
fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(s(img));
    must("qemu-io", &args);
}

/// `dir/NAME`, a new image of `fmt` and `size` with `writes` by qemu-io.
fn image(dir: &TempDir, name: &str, fmt: &str, size: &str, writes: &[&str]) -> PathBuf {
    let img = dir.path(name);
    must("qemu-img", &["create", "-q", "-f", fmt, s(&img), size]);
    if !writes.is_empty() {
        qemu_io(fmt, &img, writes);
    }
    img
}

/// A raw `img.raw` of `size` with `writes`, served by qemu-nbd (with
/// `extra` options) on `nbd.sock` in a fresh directory `tag`.
struct Served {
    dir: TempDir,
    img: PathBuf,
    sock: PathBuf,
    server: Server,
}

fn served(tag: &str, size: &str, writes: &[&str], extra: &[&str]) -> Served {
    let dir = TempDir::new(tag);
    let img = image(&dir, "img.raw", "raw", size, writes);
    let sock = dir.path("nbd.sock");
    let server = Server::qemu_nbd(&dir, &sock, &img, "raw", extra);
    Served {
        dir,
        img,
        sock,
        server,
    }
}

/// `unix_opts` for node `nbd0` on the default export, with `key` set to
/// `value`.
fn nbd0_with(sock: &Path, key: &str, value: Value) -> Value {
    let mut opts = unix_opts("nbd0", sock, "");
    opts[key] = value;
    opts
}

/// `len` bytes at `offset` read through `root` all hold `byte`.
async fn assert_reads(root: &Root, offset: u64, len: usize, byte: u8) {
    let b = root.read(offset, len).await.unwrap();
    assert!(b.iter().all(|&x| x == byte), "at {offset}: not {byte:#x}");
}

fn unix_opts(name: &str, sock: &Path, export: &str) -> Value {
    json!({
        "driver": "nbd",
        "node-name": name,
        "server": {"type": "unix", "path": s(sock)},
        "export": export,
    })
}

async fn open(graph: &Graph, opts: Value) -> sluice_core::Result<Arc<Node>> {
    let w = graph.writer().await;
    blockdev_add(&w, opts).await
}

async fn rw_root(graph: &Graph, node: &Arc<Node>) -> Root {
    root_on(
        graph,
        "test",
        node,
        PermPair::new(Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL),
    )
    .await
    .unwrap()
}

async fn ro_root(graph: &Graph, node: &Arc<Node>) -> Root {
    root_on(
        graph,
        "test",
        node,
        PermPair::new(Perm::CONSISTENT_READ, Perm::ALL),
    )
    .await
    .unwrap()
}

fn pattern(byte: u8, len: usize) -> IoBytes {
    IoBytes::copy_from(&vec![byte; len])
}

/// Runs of (start, length, data, zero), merged where neighbours agree.
type Runs = Vec<(u64, u64, bool, bool)>;

fn push_run(runs: &mut Runs, start: u64, len: u64, data: bool, zero: bool) {
    if let Some(last) = runs.last_mut() {
        if last.0 + last.1 == start && last.2 == data && last.3 == zero {
            last.1 += len;
            return;
        }
    }
    runs.push((start, len, data, zero));
}

fn qemu_map(img: &Path, fmt: &str) -> Runs {
    let out = must("qemu-img", &["map", "--output=json", "-f", fmt, s(img)]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut runs = Runs::new();
    for e in v.as_array().unwrap() {
        push_run(
            &mut runs,
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
        );
    }
    runs
}

async fn sluice_map(node: &Arc<Node>) -> Runs {
    let mut runs = Runs::new();
    for e in map_range(node, 0, node.size()).await.unwrap() {
        push_run(&mut runs, e.start, e.length, e.data, e.zero);
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_what_qemu_io_wrote_and_block_status_matches_qemu_img_map() {
    let dir = TempDir::new("read");
    let img = image(
        &dir,
        "img.qcow2",
        "qcow2",
        "8M",
        &[
            "write -P 0xaa 0 64k",
            "write -P 0x55 1M 192k",
            "write -z 3M 64k",
            "write -P 0x11 5M 4k",
        ],
    );
    let expected_map = qemu_map(&img, "qcow2");
    let sock = dir.path("nbd.sock");
    let _server = Server::qemu_nbd(&dir, &sock, &img, "qcow2", &["-x", "disk"]);

    let graph = Graph::new();
    let mut opts = unix_opts("nbd0", &sock, "disk");
    opts["read-only"] = json!(true);
    let node = open(&graph, opts).await.unwrap();
    assert_eq!(node.size(), 8 * MIB);
    assert_eq!(
        node.driver().filename().unwrap(),
        format!("nbd+unix:///disk?socket={}", s(&sock))
    );
    let root = ro_root(&graph, &node).await;

    let all = root.read(0, 8 * MIB as usize).await.unwrap();
    let mut want = vec![0u8; 8 * MIB as usize];
    want[..64 << 10].fill(0xaa);
    want[MIB as usize..(MIB as usize + (192 << 10))].fill(0x55);
    want[5 * MIB as usize..(5 * MIB as usize + 4096)].fill(0x11);
    assert!(
        all[..] == want[..],
        "the export's data differs from what qemu-io wrote"
    );

    // An unaligned read across the edge of a written range.
    let part = root.read(MIB - 100, 300).await.unwrap();
    assert_eq!(&part[..100], &[0u8; 100][..]);
    assert_eq!(&part[100..], &[0x55u8; 200][..]);

    assert_eq!(sluice_map(&node).await, expected_map);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_sluice_are_what_qemu_finds_in_the_image() {
    let Served {
        dir,
        img,
        sock,
        mut server,
    } = served("write", "4M", &[], &["--discard=unmap"]);
    let reference = image(&dir, "ref.raw", "raw", "4M", &[]);

    let graph = Graph::new();
    let node = open(&graph, unix_opts("nbd0", &sock, "")).await.unwrap();
    let root = rw_root(&graph, &node).await;
    let fua = WriteFlags {
        fua: true,
        ..WriteFlags::default()
    };
    root.write(0, pattern(0xaa, 128 << 10), fua).await.unwrap();
    root.write(MIB + 512, pattern(0x5c, 3000), WriteFlags::default())
        .await
        .unwrap();
    let unmap = ZeroFlags {
        may_unmap: true,
        ..ZeroFlags::default()
    };
    root.write_zeroes(64 << 10, 32 << 10, unmap).await.unwrap();
    let no_hole = ZeroFlags {
        fua: true,
        ..ZeroFlags::default()
    };
    root.write_zeroes(96 << 10, 4096, no_hole).await.unwrap();
    root.write(2 * MIB, pattern(0x77, 64 << 10), WriteFlags::default())
        .await
        .unwrap();
    root.discard(2 * MIB, 64 << 10).await.unwrap();

    // Many requests in flight on the one connection: 64 writers, then 64
    // readers, each with its own pattern.
    let root = Arc::new(root);
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let root = root.clone();
        tasks.push(tokio::spawn(async move {
            root.write(
                3 * MIB + i * 4096,
                pattern(i as u8 + 1, 4096),
                WriteFlags::default(),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let root = root.clone();
        tasks.push(tokio::spawn(async move {
            let b = root.read(3 * MIB + i * 4096, 4096).await.unwrap();
            assert!(
                b.iter().all(|&x| x == i as u8 + 1),
                "block {i} read back wrong"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    root.flush().await.unwrap();
    drop(root);
    drop(graph);
    server.kill();

    let mut cmds = vec![
        "write -P 0xaa 0 128k".to_string(),
        "write -P 0x5c 1049088 3000".to_string(),
        "write -z 64k 36k".to_string(),
    ];
    for i in 0..64u64 {
        cmds.push(format!("write -P {} {} 4k", i + 1, 3 * MIB + i * 4096));
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("raw", &reference, &cmds);
    qemu_io(
        "raw",
        &img,
        &[
            "read -P 0xaa 0 64k",
            "read -P 0 64k 36k",
            "read -P 0x5c 1049088 3000",
            "read -P 0 2M 64k",
        ],
    );
    let out = must(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&img), s(&reference)],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_storage_daemon_export_takes_requests_larger_than_its_payload_limit() {
    let dir = TempDir::new("qsd");
    let img = image(&dir, "img.qcow2", "qcow2", "64M", &[]);
    let sock = dir.path("qsd.sock");
    let args = vec![
        "--blockdev".to_string(),
        format!("driver=file,filename={},node-name=file0", s(&img)),
        "--blockdev".to_string(),
        "driver=qcow2,file=file0,node-name=fmt0".to_string(),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", s(&sock)),
        "--export".to_string(),
        "type=nbd,id=e0,node-name=fmt0,name=vm,writable=on".to_string(),
    ];
    let mut server = Server::start(
        "qemu-storage-daemon",
        args,
        Ready::Unix(sock.clone()),
        dir.path("qsd.log"),
    );

    let graph = Graph::new();
    let node = open(&graph, unix_opts("nbd0", &sock, "vm")).await.unwrap();
    assert_eq!(node.size(), 64 * MIB);
    let root = rw_root(&graph, &node).await;
    // 40 MiB: more than the 32 MiB a request may carry, so it is split.
    let len = 40 * MIB as usize;
    let data: Vec<u8> = (0..len).map(|i| (i / 4096) as u8 ^ 0x3c).collect();
    root.write(MIB, IoBytes::copy_from(&data), WriteFlags::default())
        .await
        .unwrap();
    let back = root.read(MIB, len).await.unwrap();
    assert!(back[..] == data[..], "a split write or read lost data");
    root.flush().await.unwrap();
    drop(root);
    drop(graph);
    server.kill();
    // Blocks 0 and 255 of the written range hold 0x3c and 0xc3.
    qemu_io(
        "qcow2",
        &img,
        &[
            "read -P 0x3c 1M 4k",
            "read -P 0xc3 2093056 4k",
            "read -P 0 0 1M",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_export_refuses_writers() {
    let sv = served("ro", "1M", &["write -P 0x42 0 4k"], &["-r"]);
    let sock = &sv.sock;

    let graph = Graph::new();
    let err = open(&graph, unix_opts("nbd0", sock, ""))
        .await
        .expect_err("a writable node on a read-only export");
    let msg = err.to_string();
    assert!(msg.contains("read-only") && msg.contains(s(sock)), "{msg}");

    let opts = nbd0_with(sock, "read-only", json!(true));
    let node = open(&graph, opts).await.unwrap();
    let root = ro_root(&graph, &node).await;
    assert_reads(&root, 0, 4096, 0x42).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_requests_without_reconnect_delay() {
    let mut sv = served("kill", "1M", &[], &[]);
    let graph = Graph::new();
    let node = open(&graph, unix_opts("victim", &sv.sock, ""))
        .await
        .unwrap();
    let root = rw_root(&graph, &node).await;
    root.read(0, 4096).await.unwrap();

    sv.server.kill();
    let err = root.read(4096, 4096).await.expect_err("the server is gone");
    let msg = err.to_string();
    assert!(msg.contains("victim") && msg.contains(s(&sv.sock)), "{msg}");
    assert_eq!(err.errno(), libc::EIO);
    // Later requests fail at once, even with a server back.
    sv.server.restart();
    let start = Instant::now();
    let err = root
        .write(0, pattern(1, 4096), WriteFlags::default())
        .await
        .expect_err("no reconnect without reconnect-delay");
    assert!(err.to_string().contains("victim"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_delay_carries_requests_over_a_server_restart() {
    let mut sv = served("reconnect", "1M", &[], &[]);
    let graph = Graph::new();
    let opts = nbd0_with(&sv.sock, "reconnect-delay", json!(60));
    let node = open(&graph, opts).await.unwrap();
    let root = Arc::new(rw_root(&graph, &node).await);
    root.write(0, pattern(0x61, 4096), WriteFlags::default())
        .await
        .unwrap();
    root.flush().await.unwrap();

    sv.server.kill();
    let r = root.clone();
    let pending = tokio::spawn(async move { r.read(0, 4096).await });
    sv.server.restart();
    let b = pending
        .await
        .unwrap()
        .expect("the read waits for the reconnect");
    assert!(b.iter().all(|&x| x == 0x61));
    root.write(8192, pattern(0x62, 4096), WriteFlags::default())
        .await
        .unwrap();
    assert_reads(&root, 8192, 4096, 0x62).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_delay_ends_and_requests_fail() {
    let mut sv = served("giveup", "1M", &[], &[]);
    let graph = Graph::new();
    let opts = nbd0_with(&sv.sock, "reconnect-delay", json!(1));
    let node = open(&graph, opts).await.unwrap();
    let root = ro_root(&graph, &node).await;
    sv.server.kill();
    let start = Instant::now();
    let err = root.read(0, 4096).await.expect_err("nobody serves");
    let msg = err.to_string();
    assert!(
        msg.contains("no reconnect within 1 s") && msg.contains(s(&sv.sock)),
        "{msg}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_urls_open_through_image_options() {
    let dir = TempDir::new("url");
    let img = image(&dir, "img.raw", "raw", "1M", &["write -P 0x33 4k 4k"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sock = dir.path("nbd.sock");
    let _unix = Server::qemu_nbd(&dir, &sock, &img, "raw", &["-x", "d", "-r"]);
    let args: Vec<String> = [
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-x",
        "d",
        "-f",
        "raw",
        "-r",
        "--persistent",
        s(&img),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let _tcp = Server::start("qemu-nbd", args, Ready::Tcp(port), dir.path("tcp.log"));

    let graph = Graph::new();
    for url in [
        format!("nbd+unix:///d?socket={}", s(&sock)),
        format!("nbd://127.0.0.1:{port}/d"),
    ] {
        let opts = sluice_drivers::open::image_options(&url, None).unwrap();
        assert_eq!(opts["driver"], "raw");
        let node = {
            let w = graph.writer().await;
            sluice_drivers::open::open_with(&w, opts, Default::default(), true)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"))
        };
        let root = ro_root(&graph, &node).await;
        let b = root.read(4096, 4096).await.unwrap();
        assert!(b.iter().all(|&x| x == 0x33), "{url}");
        drop(root);
        let w = graph.writer().await;
        let d = w.drain(&node).await;
        w.delete_node(&d, &node).await.unwrap();
    }
}

// Fake servers: a task that speaks just enough NBD to reach the part it
// then breaks.

/// Requests a fake server saw.
type Seen = Arc<std::sync::Mutex<Vec<RequestHeader>>>;

/// What a fake server does wrong (or, for the last two, differently).
#[derive(Clone, Debug)]
enum Fault {
    /// Greets with the wrong magic.
    BadGreeting,
    /// Hangs up in the middle of option haggling.
    HangUpInHandshake,
    /// Announces a minimum block size that is not a power of two.
    BadBlockSize,
    /// Answers the first request with a garbage magic.
    BadReplyMagic,
    /// Answers with a handle that was never sent.
    UnknownHandle,
    /// Claims a 4 GiB data chunk for a small read.
    HugeChunk,
    /// Answers the first read with an EPERM error chunk, then behaves.
    ErrorThenData,
    /// Sends a hole outside the request.
    HoleOutside,
    /// Offers every command and flag and records the requests it gets.
    Record(Seen),
    /// Knows no `NBD_OPT_GO`: the client falls back to `EXPORT_NAME`.
    NoGo,
    /// The first connection hangs up on its first request unanswered;
    /// later ones behave. Counts connections.
    DropFirstRequest(Arc<std::sync::atomic::AtomicUsize>),
}

const FAKE_SIZE: u64 = MIB;

async fn reply(s: &mut UnixStream, opt: u32, rep: u32, data: &[u8]) {
    let h = OptionReply {
        opt,
        rep,
        len: data.len() as u32,
    };
    s.write_all(&h.encode()).await.unwrap();
    s.write_all(data).await.unwrap();
}

/// One client connection of a fake server. Errors mean the client went
/// away, which the test then checks from its side.
async fn fake_conn(mut s: UnixStream, fault: Fault) -> std::io::Result<()> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    let magic = if matches!(fault, Fault::BadGreeting) {
        0x1234_5678u64
    } else {
        IHAVEOPT
    };
    hello.extend_from_slice(&magic.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    let _cflags = s.read_u32().await?;
    loop {
        let _magic = s.read_u64().await?;
        let opt = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0u8; len.min(1 << 16) as usize];
        s.read_exact(&mut data).await?;
        if matches!(fault, Fault::HangUpInHandshake) {
            return Ok(());
        }
        let flags = match fault {
            Fault::Record(_) => {
                FLAG_HAS_FLAGS
                    | FLAG_SEND_FLUSH
                    | FLAG_SEND_FUA
                    | FLAG_SEND_TRIM
                    | FLAG_SEND_WRITE_ZEROES
                    | FLAG_SEND_FAST_ZERO
            }
            _ => FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
        };
        match opt {
            OPT_GO if matches!(fault, Fault::NoGo) => reply(&mut s, opt, REP_ERR_UNSUP, &[]).await,
            OPT_EXPORT_NAME => {
                s.write_all(&FAKE_SIZE.to_be_bytes()).await?;
                s.write_all(&flags.to_be_bytes()).await?;
                break;
            }
            OPT_STRUCTURED_REPLY => reply(&mut s, opt, REP_ACK, &[]).await,
            OPT_SET_META_CONTEXT => {
                let mut d = 7u32.to_be_bytes().to_vec();
                d.extend_from_slice(CTX_BASE_ALLOCATION.as_bytes());
                reply(&mut s, opt, REP_META_CONTEXT, &d).await;
                reply(&mut s, opt, REP_ACK, &[]).await;
            }
            OPT_GO => {
                let min: u32 = if matches!(fault, Fault::BadBlockSize) {
                    3
                } else {
                    1
                };
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [min, 4096, MAX_PAYLOAD] {
                    d.extend_from_slice(&v.to_be_bytes());
                }
                reply(&mut s, opt, REP_INFO, &d).await;
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&FAKE_SIZE.to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
                reply(&mut s, opt, REP_INFO, &d).await;
                reply(&mut s, opt, REP_ACK, &[]).await;
                break;
            }
            _ => reply(&mut s, opt, REP_ERR_UNSUP, &[]).await,
        }
    }
    if let Fault::DropFirstRequest(conns) = &fault {
        conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    let mut first = true;
    loop {
        let mut h = [0u8; RequestHeader::LEN];
        s.read_exact(&mut h).await?;
        let req = RequestHeader::decode(&h).expect("the client sends valid requests");
        if req.ty == CMD_DISC {
            return Ok(());
        }
        if let Fault::DropFirstRequest(conns) = &fault {
            if conns.load(std::sync::atomic::Ordering::SeqCst) == 1 {
                return Ok(());
            }
        }
        if let Fault::Record(seen) = &fault {
            seen.lock().unwrap().push(req);
            if req.ty == CMD_WRITE {
                let mut payload = vec![0u8; req.len as usize];
                s.read_exact(&mut payload).await?;
            }
            if req.ty != CMD_READ {
                s.write_all(&simple_reply(0, req.handle)).await?;
                continue;
            }
        }
        let chunk = |ty: u16, handle: u64, len: u32| {
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                ty,
                handle,
                len,
            }
            .encode()
        };
        let mut out = Vec::new();
        match (&fault, first) {
            (Fault::BadReplyMagic, _) => out.extend_from_slice(&[0xde; 32]),
            (Fault::UnknownHandle, _) => out.extend_from_slice(&simple_reply(0, req.handle + 1000)),
            (Fault::HugeChunk, _) => {
                out.extend_from_slice(&chunk(REPLY_TYPE_OFFSET_DATA, req.handle, u32::MAX));
                out.extend_from_slice(&req.offset.to_be_bytes());
            }
            (Fault::HoleOutside, _) => {
                out.extend_from_slice(&chunk(REPLY_TYPE_OFFSET_HOLE, req.handle, 12));
                out.extend_from_slice(&(req.offset + u64::from(req.len)).to_be_bytes());
                out.extend_from_slice(&4096u32.to_be_bytes());
            }
            (Fault::ErrorThenData, true) => {
                let msg = b"not today";
                out.extend_from_slice(&chunk(REPLY_TYPE_ERROR, req.handle, 6 + msg.len() as u32));
                out.extend_from_slice(&EPERM.to_be_bytes());
                out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                out.extend_from_slice(msg);
            }
            _ => {
                out.extend_from_slice(&chunk(REPLY_TYPE_OFFSET_DATA, req.handle, 8 + req.len));
                out.extend_from_slice(&req.offset.to_be_bytes());
                out.extend_from_slice(&vec![0x5a; req.len as usize]);
            }
        }
        first = false;
        s.write_all(&out).await?;
    }
}

/// Starts a fake server on `sock`; it serves every connection with `fault`.
fn fake_server(sock: &Path, fault: Fault) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(sock).unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let fault = fault.clone();
            tokio::spawn(async move {
                let _ = fake_conn(conn, fault).await;
            });
        }
    })
}

async fn fake_open(tag: &str, fault: Fault) -> (TempDir, Graph, sluice_core::Result<Arc<Node>>) {
    let dir = TempDir::new(tag);
    let sock = dir.path("fake.sock");
    let writable = matches!(fault, Fault::Record(_));
    let _server = fake_server(&sock, fault);
    let graph = Graph::new();
    let mut opts = unix_opts("fake0", &sock, "");
    opts["read-only"] = json!(!writable);
    let node = open(&graph, opts).await;
    (dir, graph, node)
}

fn open_error(r: sluice_core::Result<Arc<Node>>) -> String {
    match r {
        Err(e @ Error::Open { .. }) => e.to_string(),
        Err(e) => panic!("expected an open error, got {e:?}"),
        Ok(_) => panic!("opening a broken server succeeded"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_handshakes_fail_the_open_cleanly() {
    let (_d, _g, r) = fake_open("greet", Fault::BadGreeting).await;
    let msg = open_error(r);
    assert!(msg.contains("not a newstyle NBD server"), "{msg}");
    let (_d, _g, r) = fake_open("hangup", Fault::HangUpInHandshake).await;
    let msg = open_error(r);
    assert!(
        msg.contains("closed the connection during negotiation"),
        "{msg}"
    );
    let (_d, _g, r) = fake_open("blocksize", Fault::BadBlockSize).await;
    let msg = open_error(r);
    assert!(msg.contains("minimum block size 3"), "{msg}");
}

/// Reads from a fake server that breaks the protocol: the read fails with
/// an error naming the node, the server and the fault, and so does the
/// next request (the connection is gone).
async fn read_fails(tag: &str, fault: Fault, why: &str) {
    let (dir, graph, node) = fake_open(tag, fault.clone()).await;
    let node = node.unwrap();
    let root = ro_root(&graph, &node).await;
    let err = root.read(0, 4096).await.expect_err("a broken reply");
    let msg = err.to_string();
    let sock = dir.path("fake.sock");
    assert!(
        msg.contains("fake0") && msg.contains(s(&sock)) && msg.contains(why),
        "{fault:?}: {msg}"
    );
    let err = root
        .read(8192, 4096)
        .await
        .expect_err("the connection is gone");
    assert!(err.to_string().contains(why), "{fault:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_fail_requests_cleanly() {
    read_fails("magic", Fault::BadReplyMagic, "invalid reply magic").await;
    read_fails("handle", Fault::UnknownHandle, "unknown handle").await;
    read_fails("huge", Fault::HugeChunk, "outside the request").await;
    read_fails("hole", Fault::HoleOutside, "outside the request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_maps_to_its_errno_and_the_connection_carries_on() {
    let (_dir, graph, node) = fake_open("errno", Fault::ErrorThenData).await;
    let node = node.unwrap();
    let root = ro_root(&graph, &node).await;
    let err = root.read(0, 4096).await.expect_err("EPERM");
    assert_eq!(err.errno(), libc::EPERM, "{err}");
    let b = root.read(0, 4096).await.unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_go_is_opened_with_export_name() {
    let (_dir, graph, node) = fake_open("nogo", Fault::NoGo).await;
    let node = node.unwrap();
    assert_eq!(node.size(), FAKE_SIZE);
    let root = ro_root(&graph, &node).await;
    let b = root.read(4096, 4096).await.unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_the_flags_the_block_layer_asked_for() {
    let seen = Seen::default();
    let (_dir, graph, node) = fake_open("flags", Fault::Record(seen.clone())).await;
    let node = node.unwrap();
    let root = rw_root(&graph, &node).await;
    let fua = WriteFlags {
        fua: true,
        ..WriteFlags::default()
    };
    root.write(0, pattern(1, 4096), fua).await.unwrap();
    root.write(4096, pattern(1, 4096), WriteFlags::default())
        .await
        .unwrap();
    let zero = |may_unmap, no_fallback| ZeroFlags {
        may_unmap,
        no_fallback,
        fua: false,
    };
    root.write_zeroes(8192, 4096, zero(false, false))
        .await
        .unwrap();
    root.write_zeroes(8192, 4096, zero(true, false))
        .await
        .unwrap();
    root.write_zeroes(8192, 4096, zero(true, true))
        .await
        .unwrap();
    root.discard(0, 65536).await.unwrap();
    root.flush().await.unwrap();
    let got: Vec<(u16, u16, u64, u32)> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.ty, r.flags, r.offset, r.len))
        .collect();
    assert_eq!(
        got,
        vec![
            (CMD_WRITE, CMD_FLAG_FUA, 0, 4096),
            (CMD_WRITE, 0, 4096, 4096),
            (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 8192, 4096),
            (CMD_WRITE_ZEROES, 0, 8192, 4096),
            (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 8192, 4096),
            (CMD_TRIM, 0, 0, 65536),
            (CMD_FLUSH, 0, 0, 0),
        ]
    );
}

/// A whole server conversation for one 4 KiB read at offset 0: the
/// handshake replies in the order the client asks, and the read's reply
/// (handle 1: the first request of a connection) as a data chunk, a hole
/// chunk and a final `none` chunk.
fn scripted_conversation() -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::new();
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    let mut rep = |opt: u32, rep: u32, data: &[u8]| {
        let h = OptionReply {
            opt,
            rep,
            len: data.len() as u32,
        };
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(data);
    };
    rep(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    let mut ctx = 3u32.to_be_bytes().to_vec();
    ctx.extend_from_slice(CTX_BASE_ALLOCATION.as_bytes());
    rep(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
    rep(OPT_SET_META_CONTEXT, REP_ACK, &[]);
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [512u32, 4096, 1 << 20] {
        sizes.extend_from_slice(&v.to_be_bytes());
    }
    rep(OPT_GO, REP_INFO, &sizes);
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&FAKE_SIZE.to_be_bytes());
    export.extend_from_slice(&FLAG_HAS_FLAGS.to_be_bytes());
    rep(OPT_GO, REP_INFO, &export);
    rep(OPT_GO, REP_ACK, &[]);
    let chunk = |flags, ty, len| {
        ChunkHeader {
            flags,
            ty,
            handle: 1,
            len,
        }
        .encode()
    };
    let mut reply = Vec::new();
    reply.extend_from_slice(&chunk(0, REPLY_TYPE_OFFSET_DATA, 8 + 2048));
    reply.extend_from_slice(&0u64.to_be_bytes());
    reply.extend_from_slice(&[0x5a; 2048]);
    reply.extend_from_slice(&chunk(0, REPLY_TYPE_OFFSET_HOLE, 12));
    reply.extend_from_slice(&2048u64.to_be_bytes());
    reply.extend_from_slice(&2048u32.to_be_bytes());
    reply.extend_from_slice(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0));
    (out, reply)
}

/// Serves one client: writes `handshake`; then, if there is a `reply`,
/// waits for the client's first request and writes it; then ends its
/// side and reads what the client sends until it hangs up.
async fn serve_script(listener: &UnixListener, handshake: &[u8], reply: Option<&[u8]>) {
    let (mut conn, _) = listener.accept().await.unwrap();
    let _ = conn.write_all(handshake).await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    if let Some(reply) = reply {
        let magic = REQUEST_MAGIC.to_be_bytes();
        while !seen.windows(4).any(|w| w == magic) {
            match conn.read(&mut buf).await {
                Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        let _ = conn.write_all(reply).await;
    }
    let _ = conn.shutdown().await;
    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// Opens the scripted server and reads 4 KiB at offset 0.
async fn scripted_read(
    sock: &Path,
    handshake: Vec<u8>,
    reply: Option<Vec<u8>>,
) -> sluice_core::Result<Vec<u8>> {
    let listener = UnixListener::bind(sock).unwrap();
    let server =
        tokio::spawn(async move { serve_script(&listener, &handshake, reply.as_deref()).await });
    let graph = Graph::new();
    let mut opts = unix_opts("fuzz0", sock, "");
    opts["read-only"] = json!(true);
    let res = async {
        let node = open(&graph, opts).await?;
        let root = ro_root(&graph, &node).await;
        Ok(root.read(0, 4096).await?.to_vec())
    }
    .await;
    drop(graph);
    server.await.unwrap();
    let _ = std::fs::remove_file(sock);
    res
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_server_conversations_end_in_a_result_never_a_hang() {
    use rand::{Rng, SeedableRng};
    let dir = TempDir::new("fuzz");
    let sock = dir.path("fuzz.sock");
    let (handshake, reply) = scripted_conversation();
    // The control: the script as written is a good server.
    let data = scripted_read(&sock, handshake.clone(), Some(reply.clone()))
        .await
        .unwrap();
    assert!(data[..2048].iter().all(|&x| x == 0x5a));
    assert!(data[2048..].iter().all(|&x| x == 0));
    let mut failed = 0;
    for seed in 0..1000u64 {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut all = [handshake.clone(), reply.clone()].concat();
        let mut in_handshake = false;
        // The data payload is left alone: any bytes are valid data.
        let payload = handshake.len() + ChunkHeader::LEN + 8;
        for _ in 0..rng.gen_range(1..=3) {
            let mut i = rng.gen_range(0..all.len() - 2048);
            if i >= payload {
                i += 2048;
            }
            all[i] ^= rng.gen_range(1..=255u8);
            in_handshake |= i < handshake.len();
        }
        let (hs, rep) = all.split_at(handshake.len());
        // A broken handshake gets no reply: the client may never ask.
        let rep = (!in_handshake).then(|| rep.to_vec());
        // A panic in the client's tasks would leave the read waiting:
        // the timeout turns it into a failure.
        let res = tokio::time::timeout(
            Duration::from_secs(20),
            scripted_read(&sock, hs.to_vec(), rep),
        )
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the client hung"));
        failed += usize::from(res.is_err());
    }
    // Most mutations break something the client checks.
    assert!(failed > 500, "only {failed} of 1000 mutations were noticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_to_a_server_that_keeps_breaking_gives_up_after_the_delay() {
    let dir = TempDir::new("flaky");
    let sock = dir.path("fake.sock");
    let _server = fake_server(&sock, Fault::BadReplyMagic);
    let graph = Graph::new();
    let mut opts = unix_opts("fake0", &sock, "");
    opts["read-only"] = json!(true);
    opts["reconnect-delay"] = json!(1);
    let node = open(&graph, opts).await.unwrap();
    let root = ro_root(&graph, &node).await;
    let start = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), root.read(0, 4096))
        .await
        .expect("the request gives up")
        .expect_err("every reply is bad");
    let msg = err.to_string();
    assert!(
        msg.contains("invalid reply magic") && msg.contains("fake0"),
        "{msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_timeout_waits_for_a_server_that_is_still_starting() {
    let dir = TempDir::new("opentimeout");
    let img = dir.path("img.raw");
    must("qemu-img", &["create", "-q", "-f", "raw", s(&img), "1M"]);
    must(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 0 4k", s(&img)],
    );
    let sock = dir.path("nbd.sock");
    let graph = Graph::new();

    // Without open-timeout one attempt is made, and its error says where.
    let err = open(&graph, unix_opts("nbd0", &sock, ""))
        .await
        .expect_err("no server");
    let msg = err.to_string();
    assert!(
        msg.contains(s(&sock)) && msg.contains("No such file"),
        "{msg}"
    );

    let mut opts = unix_opts("nbd0", &sock, "");
    opts["open-timeout"] = json!("60");
    let graph = Arc::new(graph);
    let g = graph.clone();
    let opening = tokio::spawn(async move { open(&g, opts).await });
    let _server = Server::qemu_nbd(&dir, &sock, &img, "raw", &[]);
    let node = opening
        .await
        .unwrap()
        .expect("the open retries until the server listens");
    let root = ro_root(&graph, &node).await;
    assert!(root.read(0, 4096).await.unwrap().iter().all(|&x| x == 0x44));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filename_option_names_the_export_too() {
    let dir = TempDir::new("filenameopt");
    let img = dir.path("img.raw");
    must("qemu-img", &["create", "-q", "-f", "raw", s(&img), "1M"]);
    must(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x45 4k 4k", s(&img)],
    );
    let sock = dir.path("nbd.sock");
    let _server = Server::qemu_nbd(&dir, &sock, &img, "raw", &["-x", "e"]);
    let graph = Graph::new();
    let url = format!("nbd+unix:///e?socket={}", s(&sock));
    let err = open(
        &graph,
        json!({"driver": "nbd", "filename": url, "export": "e", "read-only": true}),
    )
    .await
    .expect_err("filename and export together");
    assert!(
        err.to_string().contains("'filename' cannot be used"),
        "{err}"
    );
    let node = open(
        &graph,
        json!({"driver": "nbd", "filename": url, "read-only": true, "reconnect-delay": "5"}),
    )
    .await
    .unwrap();
    let root = ro_root(&graph, &node).await;
    assert!(root
        .read(4096, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0x45));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_when_the_connection_drops_is_sent_again() {
    for delay in [0, 30] {
        let dir = TempDir::new(&format!("resend{delay}"));
        let sock = dir.path("fake.sock");
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let _server = fake_server(&sock, Fault::DropFirstRequest(conns.clone()));
        let graph = Graph::new();
        let mut opts = unix_opts("fake0", &sock, "");
        opts["read-only"] = json!(true);
        opts["reconnect-delay"] = json!(delay);
        let node = open(&graph, opts).await.unwrap();
        let root = ro_root(&graph, &node).await;
        let res = root.read(0, 4096).await;
        if delay == 0 {
            let err = res.expect_err("no reconnect without reconnect-delay");
            assert!(err.to_string().contains("closed the connection"), "{err}");
            assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
        } else {
            let b = res.expect("sent again on the new connection");
            assert!(b.iter().all(|&x| x == 0x5a));
            assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
        }
    }
}
