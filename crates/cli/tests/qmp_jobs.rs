//! Block jobs over QMP in `sluice daemon`: a qcow2 chain made by QEMU's
//! tools is streamed, or actively committed, while a guest writes through
//! an NBD export; the events, the graph and the images afterwards are what
//! QEMU gives. Also: the verbs against the state machine, `quit` with a
//! job running, and malformed commands.

mod common;

use common::{
    ok, qcow2_overlay, quit, run, sluice, start_with_monitor, temp_dir, Proc, Qmp, TempDir,
};
use serde_json::{json, Value};

const SIZE: &str = "8M";

/// What qemu-io writes into each image before the daemon starts (and into
/// the raw model of what top shows).
const BASE_WRITES: &[&str] = &["write -P 0x11 0 3M", "write -P 0x12 5M 1M"];
const TOP_WRITES: &[&str] = &["write -P 0x22 1M 1M", "write -P 0x23 7M 64k"];
/// What the guest writes through the export while the stream runs: over
/// data only the base holds, over the overlay's own data, and zeroes.
const GUEST_WRITES: &[&str] = &[
    "write -P 0x33 512k 256k",
    "write -P 0x34 5248k 64k",
    "write -P 0x35 1536k 4k",
    "write -z 6M 64k",
];

fn qemu_io(format: &str, target: &str, cmds: &[&str]) {
    let mut args = vec!["-f", format, target];
    for c in cmds {
        args.extend(["-c", c]);
    }
    ok("qemu-io", &args);
}

/// base.qcow2 with data, top.qcow2 over it with data of its own, and a raw
/// model of what top shows.
fn make_chain(dir: &TempDir) {
    let (base, top, model) = (
        dir.file("base.qcow2"),
        dir.file("top.qcow2"),
        dir.file("model.raw"),
    );
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, SIZE]);
    qcow2_overlay(&top, &base);
    ok("qemu-img", &["create", "-q", "-f", "raw", &model, SIZE]);
    qemu_io("qcow2", &base, BASE_WRITES);
    qemu_io("qcow2", &top, TOP_WRITES);
    qemu_io("raw", &model, BASE_WRITES);
    qemu_io("raw", &model, TOP_WRITES);
}

/// A daemon in a fresh directory holding `make_chain`'s images, its
/// monitor negotiated.
fn daemon_with_chain(tag: &str) -> (TempDir, Proc, Qmp) {
    let dir = temp_dir(tag);
    make_chain(&dir);
    let (p, mut q) = start_with_monitor(sluice(), &["daemon"], &dir.0);
    q.negotiate();
    (dir, p, q)
}

/// Opens top.qcow2 as node `top` (its backing opened from the header).
fn add_top(q: &mut Qmp, dir: &TempDir) {
    q.cmd(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "filename": dir.file("top.qcow2")}}),
    )
    .unwrap();
}

/// Exports node `top` writable as `disk` over NBD; returns its URI.
fn export_top(q: &mut Qmp, dir: &TempDir) -> String {
    let sock = dir.file("nbd.sock");
    q.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    )
    .unwrap();
    q.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "exp0", "node-name": "top", "name": "disk", "writable": true}),
    )
    .unwrap();
    format!("nbd+unix:///disk?socket={sock}")
}

/// A stream of `top` as job `id`, held at 1 byte/s.
fn slow_stream(q: &mut Qmp, id: &str) {
    q.cmd(
        "block-stream",
        json!({"job-id": id, "device": "top", "speed": 1}),
    )
    .unwrap();
}

/// `qemu-img check` finds each of `imgs` (in `dir`) clean.
fn check(dir: &TempDir, imgs: &[&str]) {
    for img in imgs {
        ok("qemu-img", &["check", &dir.file(img)]);
    }
}

/// `qemu-img compare` finds the qcow2 `img` equal to the raw `model`.
fn assert_compare(img: &str, model: &str) {
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", img, model],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn block_stream_under_guest_writes_ends_with_qemus_chain_and_events() {
    let (dir, mut p, mut q) = daemon_with_chain("jobs-stream");
    add_top(&mut q, &dir);
    let uri = export_top(&mut q, &dir);

    // A speed of 1 byte/s holds the job after its first chunk: the guest
    // writes below land while it runs, whatever the machine's speed.
    slow_stream(&mut q, "s0");
    qemu_io("raw", &uri, GUEST_WRITES);
    qemu_io("raw", &dir.file("model.raw"), GUEST_WRITES);
    let jobs = q.cmd("query-block-jobs", Value::Null).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(jobs[0]["device"], "s0");
    assert_eq!(jobs[0]["type"], "stream");
    assert_eq!(jobs[0]["status"], "running", "{jobs}");
    assert_eq!(jobs[0]["speed"], 1);
    let graph = q.cmd("x-debug-query-block-graph", Value::Null).unwrap();
    assert!(
        graph["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "block-job" && n["name"] == "s0"),
        "{graph}"
    );
    // A second job on the same chain is refused while the first runs.
    assert_eq!(
        q.cmd("block-stream", json!({"job-id": "s1", "device": "top"})),
        Err((
            "GenericError".into(),
            "Node 'top' is busy: block device is in use by block job: stream".into()
        ))
    );

    q.cmd("block-job-set-speed", json!({"device": "s0", "speed": 0}))
        .unwrap();
    let done = q.wait_event("BLOCK_JOB_COMPLETED");
    assert_eq!(done["data"]["device"], "s0");
    assert_eq!(done["data"]["type"], "stream");
    assert_eq!(done["data"]["len"], 8 << 20);
    assert_eq!(done["data"]["offset"], 8 << 20);
    assert!(done["data"].get("error").is_none(), "{done}");
    q.wait_job_status("s0", "null");
    assert_eq!(
        q.job_statuses("s0"),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    assert_eq!(q.cmd("query-jobs", Value::Null), Ok(json!([])));

    // The chain is now top alone, over its file node.
    let nodes = q.cmd("query-named-block-nodes", Value::Null).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let top = nodes.iter().find(|n| n["node-name"] == "top").unwrap();
    assert_eq!(top["backing_file_depth"], 0, "{top}");
    assert!(top.get("backing_file").is_none(), "{top}");
    assert!(
        nodes
            .iter()
            .all(|n| !n["file"].as_str().unwrap().ends_with("base.qcow2")),
        "{nodes:?}"
    );
    let stats = q
        .cmd("query-blockstats", json!({"query-nodes": true}))
        .unwrap();
    let top_stats = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["node-name"] == "top")
        .unwrap();
    assert!(
        top_stats["stats"]["wr_bytes"].as_u64().unwrap() >= 256 << 10,
        "{top_stats}"
    );

    // The export still holds top; once it is gone, top can go.
    assert_eq!(
        q.cmd("blockdev-del", json!({"node-name": "top"})),
        Err(("GenericError".into(), "Node top is in use".into()))
    );
    q.cmd("block-export-del", json!({"id": "exp0"})).unwrap();
    q.wait_event("BLOCK_EXPORT_DELETED");
    q.cmd("blockdev-del", json!({"node-name": "top"})).unwrap();
    quit(&mut q, &mut p);

    let info = ok(
        "qemu-img",
        &[
            "info",
            "--backing-chain",
            "--output=json",
            &dir.file("top.qcow2"),
        ],
    );
    let info: Value = serde_json::from_str(&info).unwrap();
    let chain = info.as_array().unwrap();
    assert_eq!(chain.len(), 1, "{info}");
    assert!(chain[0].get("backing-filename").is_none(), "{info}");
    check(&dir, &["top.qcow2", "base.qcow2"]);
    assert_compare(&dir.file("top.qcow2"), &dir.file("model.raw"));
    // The base is as qemu-io left it: streaming only reads it.
    let base_model = dir.file("base.raw");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", &base_model, SIZE],
    );
    qemu_io("raw", &base_model, BASE_WRITES);
    assert_compare(&dir.file("base.qcow2"), &base_model);
}

#[test]
fn job_verbs_follow_the_state_machine_and_name_missing_jobs_as_qemu() {
    let (dir, mut p, mut q) = daemon_with_chain("jobs-verbs");
    add_top(&mut q, &dir);
    let err = |class: &str, desc: &str| Err((class.to_string(), desc.to_string()));
    assert_eq!(
        q.cmd("job-pause", json!({"id": "zz"})),
        err("GenericError", "Job not found")
    );
    assert_eq!(
        q.cmd("block-job-cancel", json!({"device": "zz"})),
        err("DeviceNotActive", "Block job 'zz' not found")
    );
    assert_eq!(
        q.cmd("block-stream", json!({"device": "top"})),
        err("GenericError", "Invalid job ID ''")
    );
    assert_eq!(
        q.cmd("block-stream", json!({"job-id": "j", "device": "nope"})),
        err(
            "GenericError",
            "Cannot find device='nope' nor node-name='nope'"
        )
    );
    assert_eq!(
        q.cmd("block-commit", json!({"job-id": "c", "device": "nope"})),
        err("DeviceNotFound", "Device 'nope' not found")
    );
    assert_eq!(
        q.cmd(
            "block-stream",
            json!({"job-id": "j", "device": "top", "speed": "fast"})
        ),
        err(
            "GenericError",
            "Invalid parameter type for 'speed', expected: integer"
        )
    );
    q.cmd(
        "block-stream",
        json!({"job-id": "j", "device": "top", "speed": 1, "auto-dismiss": false}),
    )
    .unwrap();
    assert_eq!(
        q.cmd("job-complete", json!({"id": "j"})),
        err(
            "GenericError",
            "Job 'j' in state 'running' cannot accept command verb 'complete'"
        )
    );
    assert_eq!(
        q.cmd("job-resume", json!({"id": "j"})),
        err("GenericError", "Can't resume a job that was not paused")
    );
    q.cmd("job-pause", json!({"id": "j"})).unwrap();
    assert_eq!(
        q.cmd("block-job-pause", json!({"device": "j"})),
        err("GenericError", "Job is already paused")
    );
    assert_eq!(
        q.cmd("block-job-cancel", json!({"device": "j"})),
        err(
            "GenericError",
            "The block job for device 'j' is currently paused"
        )
    );
    let jobs = q.cmd("query-block-jobs", Value::Null).unwrap();
    assert_eq!(jobs[0]["paused"], true, "{jobs}");
    q.cmd("block-job-resume", json!({"device": "j"})).unwrap();
    // A forced cancel ends it; the job stays until dismissed.
    q.cmd("block-job-cancel", json!({"device": "j", "force": true}))
        .unwrap();
    let cancelled = q.wait_event("BLOCK_JOB_CANCELLED");
    assert_eq!(cancelled["data"]["device"], "j");
    q.wait_job_status("j", "concluded");
    let jobs = q.cmd("query-jobs", Value::Null).unwrap();
    assert_eq!(jobs[0]["status"], "concluded", "{jobs}");
    assert_eq!(jobs[0]["error"], "Operation canceled", "{jobs}");
    q.cmd("block-job-dismiss", json!({"id": "j"})).unwrap();
    assert_eq!(q.cmd("query-jobs", Value::Null), Ok(json!([])));
    // The cancelled stream left the chain as it was.
    let nodes = q.cmd("query-named-block-nodes", Value::Null).unwrap();
    let top = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "top")
        .unwrap()
        .clone();
    assert_eq!(top["backing_file_depth"], 1, "{top}");
    quit(&mut q, &mut p);
    assert_compare(&dir.file("top.qcow2"), &dir.file("model.raw"));
}

#[test]
fn quit_with_a_running_job_exits_cleanly_and_leaves_the_chain_whole() {
    let (dir, mut p, mut q) = daemon_with_chain("jobs-quit");
    add_top(&mut q, &dir);
    slow_stream(&mut q, "s");
    quit(&mut q, &mut p);
    // The stream stopped before its graph change: top still has its base,
    // shows the same data, and both images are clean.
    let info = ok(
        "qemu-img",
        &["info", "--output=json", &dir.file("top.qcow2")],
    );
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename"], dir.file("base.qcow2"), "{info}");
    check(&dir, &["top.qcow2", "base.qcow2"]);
    assert_compare(&dir.file("top.qcow2"), &dir.file("model.raw"));
}

#[test]
fn active_commit_under_guest_writes_pivots_the_export_to_the_base() {
    let (dir, mut p, mut q) = daemon_with_chain("jobs-active-commit");
    // Opened node by node so that the base is writable, as a commit needs.
    for (node, backing) in [("base", None), ("top", Some("base"))] {
        let mut args = json!({"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": dir.file(&format!("{node}.qcow2"))}});
        if let Some(b) = backing {
            args["backing"] = json!(b);
        }
        q.cmd("blockdev-add", args).unwrap();
    }
    let uri = export_top(&mut q, &dir);
    let model = dir.file("model.raw");
    let guest = |cmds: &[&str]| {
        qemu_io("raw", &uri, cmds);
        qemu_io("raw", &model, cmds);
    };

    // Held at 1 byte/s while it copies. Guest writes wake it (they make
    // more to copy), so it may get in sync meanwhile; it cannot finish
    // before `job-complete`.
    q.cmd(
        "block-commit",
        json!({"job-id": "a", "device": "top", "speed": 1}),
    )
    .unwrap();
    guest(GUEST_WRITES);
    let jobs = q.cmd("query-jobs", Value::Null).unwrap();
    assert!(
        jobs[0]["status"] == "running" || jobs[0]["status"] == "ready",
        "{jobs}"
    );
    assert_eq!(jobs[0]["type"], "commit", "{jobs}");
    q.cmd("block-job-set-speed", json!({"device": "a", "speed": 0}))
        .unwrap();
    let ready = q.wait_event("BLOCK_JOB_READY");
    assert_eq!(ready["data"]["type"], "commit");
    // In sync: writes now reach the base as well before the pivot.
    guest(&["write -P 0x44 2M 128k", "write -P 0x45 7M 4k"]);
    q.cmd("job-complete", json!({"id": "a"})).unwrap();
    q.wait_job_status("a", "null");
    assert_eq!(
        q.job_statuses("a"),
        [
            "created",
            "running",
            "ready",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    let done = q.wait_event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    // The export reads and writes the base now.
    guest(&["write -P 0x46 3M 64k"]);
    q.cmd("block-export-del", json!({"id": "exp0"})).unwrap();
    q.wait_event("BLOCK_EXPORT_DELETED");
    quit(&mut q, &mut p);

    check(&dir, &["base.qcow2", "top.qcow2"]);
    assert_compare(&dir.file("base.qcow2"), &model);
}

#[test]
fn malformed_job_commands_get_errors_and_the_daemon_carries_on() {
    let (dir, mut p, mut q) = daemon_with_chain("jobs-malformed");
    add_top(&mut q, &dir);
    // A job for the verbs to act on, held at 1 byte/s.
    slow_stream(&mut q, "s");
    let junk = [
        json!({}),
        json!({"bogus": true}),
        json!({"job-id": 5, "device": "top"}),
        json!({"device": ["top"], "id": {}}),
        json!({"device": "s", "id": "s", "speed": "fast"}),
        json!({"device": "s", "id": "s", "speed": 1.5}),
        json!({"device": "s", "id": "s", "speed": u64::MAX}),
        json!({"device": "", "target": "", "sync": "", "id": ""}),
        json!({"device": "top", "target": "top", "sync": "sideways"}),
        json!({"device": "top", "job-id": "x", "on-error": "explode"}),
        json!({"device": "top", "job-id": "x", "base-node": "top"}),
        json!({"device": "top", "job-id": "x", "bottom": "nope"}),
        json!({"node-name": "top", "size": -5}),
        json!({"node-name": "top", "size": "big"}),
        json!({"query-nodes": "yes"}),
    ];
    let commands = [
        "block-stream",
        "block-commit",
        "blockdev-mirror",
        "blockdev-backup",
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-finalize",
        "job-dismiss",
        "block-job-pause",
        "block-job-resume",
        "block-job-cancel",
        "block-job-complete",
        "block-job-finalize",
        "block-job-dismiss",
        "block-job-set-speed",
        "query-jobs",
        "query-block-jobs",
        "x-debug-query-block-graph",
        "query-blockstats",
        "block_resize",
    ];
    let mut errors = 0;
    for c in commands {
        for args in &junk {
            if let Err((class, desc)) = q.cmd(c, args.clone()) {
                assert!(!class.is_empty() && !desc.is_empty(), "{c} {args}");
                errors += 1;
            }
        }
    }
    assert!(errors > commands.len() * (junk.len() - 2), "{errors}");
    // The monitor answers, and the job is still there to be cancelled.
    assert!(q.cmd("query-version", Value::Null).is_ok());
    let jobs = q.cmd("query-jobs", Value::Null).unwrap();
    assert_eq!(jobs[0]["id"], "s", "{jobs}");
    q.cmd("job-cancel", json!({"id": "s"})).unwrap();
    q.wait_job_status("s", "null");
    quit(&mut q, &mut p);
    check(&dir, &["top.qcow2"]);
}
