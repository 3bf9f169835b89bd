//! `sluice daemon` driven from outside by clients not written here:
//! qemu-io, qemu-img, and (when installed: Debian's libnbd-bin) nbdinfo
//! and nbdcopy. Every daemon is stopped with SIGTERM and must exit 0.

mod common;

use common::{have, ok, run, temp_dir, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running daemon; killed if a test fails before stopping it.
struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("daemon")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Daemon { child: Some(child) }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until `pidfile` exists: the daemon writes it when ready.
    fn wait_ready(&mut self, pidfile: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let mut err = String::new();
                let _ = self
                    .child
                    .as_mut()
                    .unwrap()
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err);
                panic!("daemon exited early ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "daemon not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid: u32 = std::fs::read_to_string(pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid, self.pid());
    }

    /// SIGTERM, then the exit status and stderr.
    fn stop(self) -> (std::process::ExitStatus, String) {
        self.stop_with("-TERM")
    }

    /// Sends `signal` (as `kill` spells it), then the exit status and stderr.
    fn stop_with(mut self, signal: &str) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        (child.wait().unwrap(), err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const MIB: u64 = 1 << 20;

/// A daemon with a 16 MiB memory node "disk" exported writable as "disk"
/// with allocation-depth on, on a Unix socket; returns (daemon, uri, dir).
fn start_unix(tag: &str) -> (Daemon, String, TempDir) {
    let dir = temp_dir(&format!("daemon-{tag}"));
    let sock = dir.0.join("nbd.sock");
    let pidfile = dir.0.join("pid");
    let mut d = Daemon::start(&[
        "--blockdev",
        &format!("driver=memory,node-name=disk,size={}", 16 * MIB),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", sock.display()),
        "--export",
        "type=nbd,id=exp0,node-name=disk,name=disk,writable=on,allocation-depth=on",
        "--pidfile",
        pidfile.to_str().unwrap(),
    ]);
    d.wait_ready(&pidfile);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    (d, uri, dir)
}

#[test]
fn default_daemon_serves_a_ram_disk_and_stops_cleanly_on_sigterm() {
    let mut d = Daemon::start(&[]);
    let stdout = d.child.as_mut().unwrap().stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = Vec::new();
    let sock = loop {
        let line = lines.next().expect("banner").unwrap();
        banner.push(line.clone());
        if let Some(p) = line.strip_prefix("NBD socket: ") {
            break PathBuf::from(p);
        }
    };
    assert!(banner[0].contains("64 MiB RAM disk"), "{banner:?}");
    let rest: Vec<String> = lines
        .map_while(Result::ok)
        .take_while(|l| !l.starts_with("Stop with"))
        .collect();
    assert!(
        rest.iter().any(|l| l.starts_with("QMP socket: ")),
        "{rest:?}"
    );
    assert!(
        rest.iter()
            .any(|l| l.contains("qemu-io -f raw 'nbd+unix:///disk0?socket=")),
        "{rest:?}"
    );
    // The empty export name reaches the only export, as in the brief URI.
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
        ],
    );
    assert!(out.contains("wrote 65536/65536 bytes at offset 0"), "{out}");
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    let info = ok("qemu-img", &["info", "--output=json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB);
    let dir = sock.parent().unwrap().to_path_buf();
    // The QMP monitor of the default sees the export.
    let qmp_line = rest
        .iter()
        .find(|l| l.starts_with("QMP socket: "))
        .expect("QMP line");
    let qmp = UnixStream::connect(qmp_line.trim_start_matches("QMP socket: ")).unwrap();
    qmp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(qmp.try_clone().unwrap());
    let mut w = qmp;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "{line}");
    w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-block-exports\"}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), r#"{"return": {}}"#);
    line.clear();
    r.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["return"][0]["id"], "disk0");
    drop((r, w));
    let (status, err) = d.stop();
    assert!(status.success(), "{status}: {err}");
    assert!(!dir.exists(), "temporary directory removed");
}

#[test]
fn qemu_io_writes_and_qemu_img_map_matches_the_allocation() {
    let (d, uri, _dir) = start_unix("map");
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0x01 1M 4k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0x01 1M 4k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "flush",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let map = ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let got: Vec<(u64, u64, bool, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    // The node holds data at [0, 64k) and [1M, 1M+4k); the rest reads as
    // zeroes (unallocated, or written as zeroes).
    let k64 = 65536;
    assert_eq!(
        got,
        [
            (0, k64, true, false),
            (k64, MIB - k64, false, true),
            (MIB, 4096, true, false),
            (MIB + 4096, 15 * MIB - 4096, false, true),
        ]
    );
    let info = ok("qemu-img", &["info", "--output=json", "-f", "raw", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB);
    assert_eq!(info["format"], "raw");
    let (status, err) = d.stop();
    assert!(status.success(), "{status}: {err}");
}

#[test]
fn nbdinfo_and_nbdcopy_when_installed() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let (d, uri, dir) = start_unix("libnbd");
    ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0xcd 4k 8k"]);
    let info = ok("nbdinfo", &["--json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 16 * MIB);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_df"], true);
    let map = ok("nbdinfo", &["--map", &uri]);
    let rows: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "4096", "3"]);
    assert_eq!(rows[1][..3], ["4096", "8192", "0"]);
    assert_eq!(
        rows[2][..3],
        ["12288", &(16 * MIB - 12288).to_string(), "3"]
    );
    let depth = ok("nbdinfo", &["--map=qemu:allocation-depth", &uri]);
    assert!(depth.lines().nth(1).unwrap().contains("local"), "{depth}");
    // Copy out, check; copy a file in, copy out again, compare.
    let out = dir.0.join("out.raw");
    ok("nbdcopy", &[&uri, out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len() as u64, 16 * MIB);
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    assert!(bytes[4096..12288].iter().all(|&b| b == 0xcd));
    assert!(bytes[12288..].iter().all(|&b| b == 0));
    let src = dir.0.join("in.raw");
    let pattern: Vec<u8> = (0..16 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &pattern).unwrap();
    ok("nbdcopy", &[src.to_str().unwrap(), &uri]);
    ok("nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == pattern, "copy round trip");
    let (status, err) = d.stop();
    assert!(status.success(), "{status}: {err}");
}

#[test]
fn tcp_export_read_only_over_loopback() {
    let dir = temp_dir("daemon-tcp");
    let pidfile = dir.0.join("pid");
    // A free port: bind, note, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut d = Daemon::start(&[
        "--blockdev",
        r#"{"driver": "raw", "node-name": "fmt", "file": {"driver": "memory", "size": 1048576}}"#,
        "--nbd-server",
        &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=4"),
        "--export",
        "nbd,id=e,node-name=fmt,name=ro",
        "--pidfile",
        pidfile.to_str().unwrap(),
    ]);
    d.wait_ready(&pidfile);
    let uri = format!("nbd://127.0.0.1:{port}/ro");
    let out = ok(
        "qemu-io",
        &["-f", "raw", "-r", &uri, "-c", "read -P 0 0 64k"],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    let o = run("qemu-io", &["-f", "raw", &uri, "-c", "write 0 4k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !text.contains("wrote 4096/4096"),
        "write to a read-only export: {text}"
    );
    let (status, err) = d.stop_with("-INT");
    assert!(status.success(), "{status}: {err}");
}

#[test]
fn a_client_that_breaks_the_protocol_does_not_disturb_others() {
    let (d, uri, dir) = start_unix("violation");
    let sock = dir.0.join("nbd.sock");
    let mut bad = UnixStream::connect(&sock).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    bad.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // Fixed newstyle, then EXPORT_NAME "disk", then a request with a bad magic.
    bad.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"disk");
    bad.write_all(&opt).unwrap();
    let mut export = [0u8; 10];
    bad.read_exact(&mut export).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        16 * MIB
    );
    let out = ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x11 0 4k"]);
    assert!(out.contains("wrote 4096/4096"), "{out}");
    bad.write_all(&[0xffu8; 28]).unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(bad.read(&mut b), Ok(0) | Err(_)),
        "connection closed"
    );
    let out = ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x11 0 4k"]);
    assert!(out.contains("read 4096/4096"), "{out}");
    let (status, err) = d.stop();
    assert!(status.success(), "{status}: {err}");
}

/// The message after the program name: `sluice: X` / `qemu-storage-daemon: X`.
fn message(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err.lines().next().unwrap_or("").to_string();
    line.split_once(": ")
        .map(|(_, m)| m.to_string())
        .unwrap_or(line)
}

#[test]
fn command_line_errors_match_qemu_storage_daemon() {
    let dir = temp_dir("daemon-errors");
    let sock = dir.0.join("s");
    let sock_opt = format!("addr.type=unix,addr.path={}", sock.display());
    let cases: Vec<Vec<String>> = vec![
        vec!["--bogus".into()],
        vec!["--export".into()],
        vec!["--nbd-server".into(), "addr.type=unix".into()],
        vec!["--nbd-server".into(), "addr.type=foo".into()],
        vec![
            "--nbd-server".into(),
            "addr.type=inet,addr.host=127.0.0.1".into(),
        ],
        vec!["--nbd-server".into(), format!("{sock_opt},bogus=1")],
        vec!["--export".into(), "type=nbd,id=e,node-name=x,name=n".into()],
        vec![
            "--blockdev".into(),
            "driver=null-co,node-name=a".into(),
            "--export".into(),
            "type=nbd,id=e,node-name=a".into(),
        ],
        vec![
            "--blockdev".into(),
            "driver=null-co,node-name=a".into(),
            "--nbd-server".into(),
            sock_opt.clone(),
            "--export".into(),
            "type=nbd,id=e,node-name=a,writable=maybe".into(),
        ],
    ];
    let have_qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok();
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ours = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("daemon")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(ours.status.code(), Some(1), "{args:?}");
        assert!(!sock.exists(), "socket removed after a failed start");
        if have_qsd {
            let theirs = run("qemu-storage-daemon", &args);
            let _ = std::fs::remove_file(&sock);
            assert_eq!(theirs.status.code(), Some(1), "{args:?}");
            assert_eq!(message(&ours), message(&theirs), "{args:?}");
        }
    }
}
