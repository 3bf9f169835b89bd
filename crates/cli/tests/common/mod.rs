//! Helpers shared by the tests that drive `sluice daemon` and
//! qemu-storage-daemon from outside: scratch directories, running tools,
//! and a QMP client.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a test waits for a reply or event before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// `name` in this directory, as a string for command lines.
    pub fn file(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory for a test; `tag` keeps the tests of a process apart.
pub fn temp_dir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("sluice-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// Runs a tool that must succeed; returns its stdout.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A tool's output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command line: the program, then its arguments.
pub type Line = Vec<String>;

pub fn line(words: &[&str]) -> Line {
    words.iter().map(|w| w.to_string()).collect()
}

/// Runs a command line that must succeed; returns its stdout.
pub fn ok_line(l: &[String]) -> String {
    let args: Vec<&str> = l[1..].iter().map(String::as_str).collect();
    ok(&l[0], &args)
}

/// `qemu-img create -q -f FMT [-o OPTS] IMG SIZE` (no `-o` when `opts`
/// is empty).
pub fn img_create(fmt: &str, opts: &str, img: &str, size: &str) -> Line {
    let mut l = line(&["qemu-img", "create", "-q", "-f", fmt]);
    if !opts.is_empty() {
        l.extend(line(&["-o", opts]));
    }
    l.extend(line(&[img, size]));
    l
}

/// `qemu-img create -q -f qcow2 -b BACKING -F qcow2 IMG`, which must
/// succeed: a qcow2 overlay of the qcow2 image `backing`.
pub fn qcow2_overlay(img: &str, backing: &str) {
    ok(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", img,
        ],
    );
}

/// `qemu-io -f qcow2 -c CMD... IMG`.
pub fn qemu_io(img: &str, cmds: &[&str]) -> Line {
    let mut l = line(&["qemu-io", "-f", "qcow2"]);
    for c in cmds {
        l.extend(line(&["-c", c]));
    }
    l.push(img.to_string());
    l
}

/// `qemu-img info --output=json [ARGS] IMG`, which must succeed.
pub fn qemu_info(img: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Value {
    let img = img.as_ref();
    let o = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .args(args)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img info {img:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `qemu-img check IMG` finds no errors (and no leaks).
pub fn assert_clean(img: impl AsRef<std::ffi::OsStr>) {
    let img = img.as_ref();
    let o = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .unwrap();
    assert!(
        o.status.success() && text(&o.stdout).contains("No errors were found"),
        "qemu-img check {img:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// qemu-img's run (`q`) and sluice's (`s`) ended alike: exit code,
/// stdout and stderr.
pub fn same_outcome(q: &Output, s: &Output, what: &str) {
    assert_eq!(
        (q.status.code(), text(&q.stdout), text(&q.stderr)),
        (s.status.code(), text(&s.stdout), text(&s.stderr)),
        "{what}: qemu-img (left) and sluice (right) differ"
    );
}

/// Whether `tool` is installed; says so when it is not.
pub fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("note: {tool} is not installed; skipping its checks");
    }
    found
}

/// A child process, killed if a test fails before it exits.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `quit` and waits for the process to exit successfully.
pub fn quit(q: &mut Qmp, p: &mut Proc) {
    q.cmd("quit", Value::Null).unwrap();
    assert!(p.0.wait().unwrap().success());
}

/// Starts `cmd pre...` with a QMP monitor on `dir/qmp.sock`, waits for the
/// pid file (written once the daemon is ready), and connects.
pub fn start_with_monitor(cmd: &Path, pre: &[&str], dir: &Path) -> (Proc, Qmp) {
    let qmp_sock = dir.join("qmp.sock");
    let pidfile = dir.join("pid");
    let child = Command::new(cmd)
        .args(pre)
        .args([
            "--chardev",
            &format!(
                "socket,id=m0,path={},server=on,wait=off",
                qmp_sock.display()
            ),
            "--monitor",
            "chardev=m0",
            "--pidfile",
            pidfile.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        assert!(
            p.0.try_wait().unwrap().is_none(),
            "{} exited early",
            cmd.display()
        );
        assert!(Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    (p, connect_qmp(&qmp_sock))
}

/// Connects to the QMP monitor on `sock` and reads its greeting.
pub fn connect_qmp(sock: &Path) -> Qmp {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut q = Qmp {
        r: BufReader::new(s.try_clone().unwrap()),
        w: s,
        events: Vec::new(),
    };
    let greeting = q.line();
    assert!(
        greeting["QMP"]["version"]["qemu"]["major"].is_u64(),
        "{greeting}"
    );
    q
}

/// A tool's error message without its `tool: ` prefix (`sluice: ...`,
/// `qemu-storage-daemon: ...`), for comparing the two.
pub fn error_message(o: &Output) -> String {
    let text = String::from_utf8_lossy(&o.stderr);
    let line = text.lines().next().unwrap_or_default();
    line.split_once(": ")
        .map(|(_, m)| m)
        .unwrap_or(line)
        .to_string()
}

/// Whether process `pid` runs (exists and is not a zombie waiting for a
/// parent that may never reap it).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until process `pid` (not a child of ours) has exited.
pub fn wait_gone(pid: i32) {
    let deadline = Instant::now() + TIMEOUT;
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `sluice daemon`, the binary under test.
pub fn sluice() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sluice"))
}

/// A QMP client; keeps every event it reads, in order.
pub struct Qmp {
    pub r: BufReader<UnixStream>,
    pub w: UnixStream,
    pub events: Vec<Value>,
}

/// A command's outcome: `Ok(return)` or `Err((class, desc))`.
pub type Outcome = Result<Value, (String, String)>;

impl Qmp {
    pub fn line(&mut self) -> Value {
        let mut l = String::new();
        assert!(self.r.read_line(&mut l).unwrap() > 0, "monitor closed");
        serde_json::from_str(&l).unwrap()
    }

    /// The names of the events read so far.
    pub fn event_names(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["event"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits for event `name` (it may have come already); returns it.
    pub fn wait_event(&mut self, name: &str) -> Value {
        loop {
            if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
                return e.clone();
            }
            let v = self.line();
            assert!(v.get("event").is_some(), "unexpected message {v}");
            self.events.push(v);
        }
    }

    /// The statuses of job `id` in the JOB_STATUS_CHANGE events read so far.
    pub fn job_statuses(&self, id: &str) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["id"] == id)
            .map(|e| e["data"]["status"].as_str().unwrap().to_string())
            .collect()
    }

    /// Reads events until job `id` has reached `status`.
    pub fn wait_job_status(&mut self, id: &str, status: &str) {
        while !self.job_statuses(id).iter().any(|s| s == status) {
            let v = self.line();
            assert!(v.get("event").is_some(), "unexpected message {v}");
            self.events.push(v);
        }
    }

    /// Sends a command and returns its outcome; events read meanwhile are kept.
    pub fn cmd(&mut self, execute: &str, args: Value) -> Outcome {
        let mut m = json!({"execute": execute});
        if !args.is_null() {
            m["arguments"] = args;
        }
        self.w.write_all(format!("{m}\n").as_bytes()).unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            let e = &v["error"];
            return Err((
                e["class"].as_str().unwrap().to_string(),
                e["desc"].as_str().unwrap().to_string(),
            ));
        }
    }

    /// Negotiates capabilities.
    pub fn negotiate(&mut self) {
        assert_eq!(self.cmd("qmp_capabilities", Value::Null), Ok(json!({})));
    }
}
