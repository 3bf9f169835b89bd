//! `sluice daemon` with throttle groups (`--object`, `object-add`,
//! `object-del`, `qom-get`, `qom-set`) and a `throttle` node, compared with
//! qemu-storage-daemon where both run; and `--daemonize`.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// A group and a throttle node over a RAM disk, exported writable over NBD.
#[test]
fn a_throttle_node_serves_nbd_and_qmp() {
    let dir = temp_dir("objects-nbd");
    let nbd = dir.file("nbd.sock");
    let (_p, mut q) = start_with_monitor(
        sluice(),
        &[
            "daemon",
            "--object",
            "throttle-group,id=tg0,limits.iops-total=1000,limits.bps-total=104857600",
            "--blockdev",
            "driver=memory,node-name=m,size=1048576",
            "--blockdev",
            "driver=throttle,node-name=t,file=m,throttle-group=tg0",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={nbd}"),
            "--export",
            "type=nbd,id=e,node-name=t,writable=on",
        ],
        &dir.0,
    );
    q.negotiate();
    let nodes = q.cmd("query-named-block-nodes", Value::Null).unwrap();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == "t" && n["drv"] == "throttle"),
        "{nodes}"
    );
    let limits = q
        .cmd(
            "qom-get",
            json!({"path": "/objects/tg0", "property": "limits"}),
        )
        .unwrap();
    assert_eq!(limits["iops-total"], 1000);
    assert_eq!(limits["bps-total"], 104857600);
    let uri = format!("nbd+unix:///t?socket={nbd}");
    ok(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0xa5 64k 128k"],
    );
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0xa5 64k 128k",
            "-c",
            "read -P 0 0 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(
        q.cmd("object-del", json!({"id": "tg0"})),
        Err((
            "GenericError".into(),
            "object 'tg0' is in use, can not be deleted".into()
        ))
    );
    assert_eq!(q.cmd("quit", Value::Null), Ok(json!({})));
}

/// Object commands, good and bad, each with its outcome.
fn object_sequence(q: &mut Qmp) -> Vec<(String, Outcome)> {
    let tg = |id: &str, extra: Value| {
        let mut v = json!({"qom-type": "throttle-group", "id": id});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let cmds: Vec<(&str, Value)> = vec![
        (
            "object-add",
            tg("tg1", json!({"limits": {"iops-total": 10}})),
        ),
        (
            "object-add",
            tg("tg1", json!({"limits": {"iops-total": 10}})),
        ),
        ("object-add", tg("tg0", json!({}))),
        ("object-add", json!({"qom-type": "nope", "id": "x"})),
        ("object-add", json!({"qom-type": "throttle-group"})),
        ("object-add", json!({"id": "x"})),
        ("object-add", tg("1bad", json!({}))),
        ("object-add", json!({"qom-type": "throttle-group", "id": 5})),
        ("object-add", tg("tg2", json!({"limits": 5}))),
        (
            "object-add",
            tg("tg2", json!({"limits": {"iops-total": 10, "iops-read": 5}})),
        ),
        (
            "object-add",
            tg("tg2", json!({"limits": {"iops-size": 10}})),
        ),
        (
            "object-add",
            tg("tg2", json!({"limits": {"iops-total": -1}})),
        ),
        (
            "object-add",
            tg(
                "tg2",
                json!({"limits": {"bps-total": 1_000_000_000_000_001u64}}),
            ),
        ),
        (
            "object-add",
            tg(
                "tg2",
                json!({"limits": {"iops-total": 10, "iops-total-max": 5}}),
            ),
        ),
        (
            "object-add",
            tg("tg2", json!({"limits": {"iops-total-max": 5}})),
        ),
        (
            "object-add",
            tg(
                "tg2",
                json!({"limits": {"iops-total": 10, "iops-total-max-length": 5}}),
            ),
        ),
        (
            "object-add",
            tg(
                "tg2",
                json!({"limits": {"iops-total": 10, "iops-total-max-length": 0}}),
            ),
        ),
        (
            "object-add",
            tg(
                "tg2",
                json!({"limits": {"iops-total": 10, "iops-total-max-length": 5_000_000_000u64}}),
            ),
        ),
        ("object-add", tg("tg2", json!({"limits": {"bogus": 10}}))),
        (
            "object-add",
            tg("tg2", json!({"limits": {"iops-total": "x"}})),
        ),
        ("object-add", tg("tg2", json!({"x-iops-total": "5"}))),
        ("object-add", tg("tg2", json!({"x-iops-total": -7}))),
        (
            "object-add",
            tg("tg2", json!({"x-iops-total-max-length": 5_000_000_000u64})),
        ),
        (
            "object-add",
            tg("tg2", json!({"x-iops-total": 10, "x-iops-read": 5})),
        ),
        ("object-add", tg("tg2", json!({"bogus": 7}))),
        ("object-add", tg("tg2", json!({"x-iops-total": 7}))),
        ("object-add", tg("tg3", json!({"limits": {"bps-total": 9}}))),
        ("qom-get", json!({"path": "tg2", "property": "limits"})),
        (
            "qom-get",
            json!({"path": "/objects/tg3", "property": "x-bps-total"}),
        ),
        ("qom-get", json!({"path": "tg3", "property": "type"})),
        (
            "qom-set",
            json!({"path": "tg3", "property": "limits", "value": {"iops-write": 50}}),
        ),
        ("qom-get", json!({"path": "tg3", "property": "limits"})),
        (
            "qom-set",
            json!({"path": "tg3", "property": "limits", "value": {"bps-read": 4}}),
        ),
        (
            "qom-set",
            json!({"path": "tg3", "property": "limits", "value": {"bogus": 1}}),
        ),
        (
            "qom-set",
            json!({"path": "tg3", "property": "limits", "value": 5}),
        ),
        (
            "qom-set",
            json!({"path": "tg3", "property": "x-bps-total", "value": 3}),
        ),
        (
            "qom-set",
            json!({"path": "tg3", "property": "type", "value": "x"}),
        ),
        ("qom-get", json!({"path": "nope", "property": "limits"})),
        (
            "qom-get",
            json!({"path": "/objects/nope", "property": "limits"}),
        ),
        ("qom-get", json!({"path": "tg3", "property": "nope"})),
        (
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "t0", "file": "n0"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "t0", "file": "n0",
                                "throttle-group": "nope"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "t0", "file": "n0",
                                "throttle-group": "tg0"}),
        ),
        ("object-del", json!({"id": "tg0"})),
        ("object-del", json!({"id": "nope"})),
        ("object-del", json!({})),
        ("object-del", json!({"id": "tg1", "x": 1})),
        ("blockdev-del", json!({"node-name": "t0"})),
        ("object-del", json!({"id": "tg0"})),
        ("object-del", json!({"id": "tg0"})),
        ("object-del", json!({"id": "tg1"})),
    ];
    cmds.into_iter()
        .map(|(name, args)| {
            let r = q.cmd(name, args.clone());
            (format!("{name} {args}"), r)
        })
        .collect()
}

fn run_objects(cmd: &Path, tag: &str) -> Vec<(String, Outcome)> {
    let dir = temp_dir(tag);
    let mut args = vec![
        "--object",
        "throttle-group,id=tg0,limits.iops-total=100",
        "--blockdev",
        "driver=null-co,node-name=n0",
    ];
    if cmd == sluice() {
        args.insert(0, "daemon");
    }
    let (_p, mut q) = start_with_monitor(cmd, &args, &dir.0);
    q.negotiate();
    let out = object_sequence(&mut q);
    assert_eq!(q.cmd("quit", Value::Null), Ok(json!({})));
    out
}

#[test]
fn object_commands_answer_as_qemu_does() {
    let ours = run_objects(sluice(), "objects-sluice");
    // Whatever QEMU says, these hold.
    let find = |prefix: &str| {
        ours.iter()
            .find(|(c, _)| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}"))
            .1
            .clone()
    };
    assert_eq!(find("object-add {\"id\":\"tg1\""), Ok(json!({})));
    assert_eq!(
        find("object-del {\"id\":\"tg0\"}"),
        Err((
            "GenericError".into(),
            "object 'tg0' is in use, can not be deleted".into()
        ))
    );
    if !have("qemu-storage-daemon") {
        return;
    }
    let theirs = run_objects(Path::new("qemu-storage-daemon"), "objects-qemu");
    for ((cmd, a), (_, b)) in ours.iter().zip(&theirs) {
        assert_eq!(a, b, "{cmd}: sluice (left) and QEMU (right) differ");
    }
    assert_eq!(ours.len(), theirs.len());
}

/// `--object` errors on the command line, as qemu-storage-daemon words them.
#[test]
fn object_option_errors_match_qemu() {
    let cases = [
        "nope,id=x",
        "throttle-group",
        "id=tg0",
        "throttle-group,id=tg0,bogus=1",
        "throttle-group,id=tg0,limits.iops-total=x",
        "throttle-group,id=tg0,limits.iops-total=-1",
        "throttle-group,id=tg0,limits.iops-total=10,limits.iops-read=3",
        "throttle-group,id=tg0,x-iops-total=-1",
    ];
    let qemu = have("qemu-storage-daemon");
    for case in cases {
        let ours = Command::new(sluice())
            .args(["daemon", "--object", case])
            .output()
            .unwrap();
        assert_eq!(ours.status.code(), Some(1), "{case}");
        let msg = error_message(&ours);
        assert!(msg.starts_with(&format!("--object {case}: ")), "{msg}");
        if qemu {
            let theirs = run("qemu-storage-daemon", &["--object", case]);
            assert_eq!(theirs.status.code(), Some(1), "{case}");
            assert_eq!(msg, error_message(&theirs), "{case}");
        }
    }
    // The same id twice: the second is refused.
    let o = run(
        sluice().to_str().unwrap(),
        &[
            "daemon",
            "--object",
            "throttle-group,id=a",
            "--object",
            "throttle-group,id=a",
        ],
    );
    assert_eq!(
        error_message(&o),
        "--object throttle-group,id=a: attempt to add duplicate property 'a' to object (type 'container')"
    );
}

/// The arguments that start a daemon with a monitor on `dir/qmp.sock` and
/// a pid file `dir/pid`.
fn daemon_args(dir: &TempDir) -> Vec<String> {
    vec![
        "--daemonize".into(),
        "--blockdev".into(),
        "driver=null-co,node-name=n0".into(),
        "--chardev".into(),
        format!(
            "socket,id=m0,path={},server=on,wait=off",
            dir.file("qmp.sock")
        ),
        "--monitor".into(),
        "chardev=m0".into(),
        "--pidfile".into(),
        dir.file("pid"),
    ]
}

#[test]
fn daemonize_returns_once_the_daemon_is_ready() {
    let dir = temp_dir("daemonize");
    // `output` returns once the parent has exited and the daemon has let
    // go of stdout and stderr.
    let o = Command::new(sluice())
        .arg("daemon")
        .args(daemon_args(&dir))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Ready means: pid file written, monitor listening.
    let pid: i32 = std::fs::read_to_string(dir.path("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(pid));
    let mut q = connect_qmp(&dir.path("qmp.sock"));
    q.negotiate();
    // Detached: its own session, in `/`, stdin on /dev/null.
    // SAFETY: getsid only reads process attributes.
    let (its, ours) = unsafe { (libc::getsid(pid), libc::getsid(0)) };
    assert_ne!(its, ours);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/")
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(),
        Path::new("/dev/null")
    );
    assert_eq!(q.cmd("quit", Value::Null), Ok(json!({})));
    wait_gone(pid);
    assert!(!dir.path("pid").exists(), "the pid file is removed at exit");
}

#[test]
fn daemonize_reports_failures_to_the_caller() {
    let dir = temp_dir("daemonize-bad");
    // Refused while the command line is read, before the fork.
    let o = run(
        sluice().to_str().unwrap(),
        &["daemon", "--daemonize", "--bogus"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(error_message(&o), "unrecognized option '--bogus'");
    // Refused by the daemon while it sets up: the parent exits 1 and the
    // daemon's message reaches the caller's stderr.
    let mut args = daemon_args(&dir);
    args.extend(["--blockdev".into(), "driver=nope,node-name=x".into()]);
    let o = Command::new(sluice())
        .arg("daemon")
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        error_message(&o).starts_with("--blockdev driver=nope,node-name=x: "),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!dir.path("pid").exists());
    if have("qemu-storage-daemon") {
        let theirs = Command::new("qemu-storage-daemon")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(theirs.status.code(), Some(1));
    }
}
