//! QMP over `--chardev socket,...,server=on,wait=off --monitor chardev=...`:
//! the same command sequence sent to `sluice daemon` and to
//! qemu-storage-daemon gives the same returns and errors (class and
//! description), and the NBD exports it sets up serve real clients.

mod common;

use common::{sluice, start_with_monitor as start, temp_dir, Outcome, Qmp};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A raw NBD client holding a connection to export `name`.
fn hold_nbd(sock: &Path, name: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    s.write_all(&opt).unwrap();
    let mut e = [0u8; 10];
    s.read_exact(&mut e).unwrap();
    s
}

/// The differential sequence; returns every outcome, in order.
fn sequence(q: &mut Qmp, dir: &Path) -> Vec<(String, Outcome)> {
    let nbd_sock = dir.join("nbd.sock");
    let path = nbd_sock.to_str().unwrap();
    let mut out = Vec::new();
    let mut run = |q: &mut Qmp, name: &str, args: Value| {
        let r = q.cmd(name, args.clone());
        out.push((format!("{name} {args}"), r));
    };
    run(q, "query-version", json!({"bogus": 1}));
    run(q, "nope", Value::Null);
    run(
        q,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0", "size": 1048576}),
    );
    run(
        q,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0"}),
    );
    run(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0"}),
    );
    run(
        q,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "path": path}}),
    );
    run(
        q,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": path}}}),
    );
    run(
        q,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": path}}}),
    );
    run(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0", "writable": true}),
    );
    run(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "zz"}),
    );
    run(q, "query-block-exports", Value::Null);
    let held = hold_nbd(&nbd_sock, "n0");
    run(q, "block-export-del", json!({"id": "e0"}));
    run(q, "blockdev-del", json!({"node-name": "n0"}));
    run(q, "blockdev-del", json!({"node-name": "zz"}));
    run(q, "blockdev-del", Value::Null);
    run(q, "block-export-del", json!({"id": "e0", "mode": "hard"}));
    // QEMU finishes a hard removal after its reply; the event says done.
    q.wait_event("BLOCK_EXPORT_DELETED");
    let mut held = held;
    let mut b = [0u8; 1];
    assert!(
        matches!(held.read(&mut b), Ok(0) | Err(_)),
        "hard removal closes clients"
    );
    run(q, "blockdev-del", json!({"node-name": "n0"}));
    run(q, "block-export-del", json!({"id": "e0"}));
    run(q, "nbd-server-stop", Value::Null);
    run(q, "nbd-server-stop", Value::Null);
    run(q, "quit", Value::Null);
    out
}

#[test]
fn the_same_qmp_sequence_gives_the_same_outcomes_as_qemu_storage_daemon() {
    let ours_dir = temp_dir("qmp-ours");
    let (mut p, mut q) = start(sluice(), &["daemon"], &ours_dir.0);
    // Before negotiation, only qmp_capabilities.
    assert_eq!(
        q.cmd("query-version", Value::Null),
        Err((
            "CommandNotFound".into(),
            "Expecting capabilities negotiation with 'qmp_capabilities'".into()
        ))
    );
    assert_eq!(q.cmd("qmp_capabilities", Value::Null), Ok(json!({})));
    let ours = sequence(&mut q, &ours_dir.0);
    assert!(p.0.wait().unwrap().success(), "quit exits 0");
    assert!(!ours_dir.0.join("qmp.sock").exists() && !ours_dir.0.join("pid").exists());
    assert_eq!(q.event_names(), ["BLOCK_EXPORT_DELETED"]);
    for (cmd, r) in &ours {
        eprintln!("sluice: {cmd} -> {r:?}");
    }
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("note: qemu-storage-daemon not installed; differential part skipped");
        return;
    }
    let theirs_dir = temp_dir("qmp-theirs");
    let (mut tp, mut tq) = start(Path::new("qemu-storage-daemon"), &[], &theirs_dir.0);
    tq.cmd("qmp_capabilities", Value::Null).unwrap();
    let theirs = sequence(&mut tq, &theirs_dir.0);
    let _ = tp.0.wait();
    for ((cmd, a), (_, b)) in ours.iter().zip(&theirs) {
        assert_eq!(a, b, "{cmd}");
    }
    assert_eq!(ours.len(), theirs.len());
}

#[test]
fn qmp_sets_up_a_writable_export_that_qemu_io_writes() {
    let dir = temp_dir("qmp-data");
    let (mut p, mut q) = start(sluice(), &["daemon"], &dir.0);
    q.cmd("qmp_capabilities", Value::Null).unwrap();
    q.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "fmt",
               "file": {"driver": "memory", "node-name": "ram", "size": 4194304}}),
    )
    .unwrap();
    // Implicit... no: "ram" was named, but it is a child of "fmt".
    assert_eq!(
        q.cmd("blockdev-del", json!({"node-name": "ram"}))
            .unwrap_err()
            .1,
        "Node ram is not owned by the monitor"
    );
    let sock = dir.0.join("nbd.sock");
    q.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    )
    .unwrap();
    q.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "x", "node-name": "fmt", "name": "disk", "writable": true}),
    )
    .unwrap();
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("read 65536/65536"), "{text}");
    let nodes = q
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fmt", "ram"]);
    assert_eq!(nodes[0]["drv"], "raw");
    assert_eq!(nodes[0]["image"]["virtual-size"], 4194304);
    let cmds = q.cmd("query-commands", Value::Null).unwrap();
    assert!(cmds
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "block-export-add"));
    // Malformed input gets an error; the monitor stays usable.
    q.w.write_all(b"[1, 2]\n{\"execute\": 5}\n").unwrap();
    assert_eq!(q.line()["error"]["desc"], "QMP input must be a JSON object");
    assert_eq!(
        q.line()["error"]["desc"],
        "QMP input member 'execute' must be a string"
    );
    q.cmd("block-export-del", json!({"id": "x"})).unwrap();
    q.cmd("blockdev-del", json!({"node-name": "fmt"})).unwrap();
    assert_eq!(
        q.cmd("query-named-block-nodes", Value::Null).unwrap(),
        json!([])
    );
    q.cmd("quit", Value::Null).unwrap();
    assert!(p.0.wait().unwrap().success());
}
