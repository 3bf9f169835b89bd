//! The same QMP job sequence sent to qemu-storage-daemon and to
//! `sluice daemon`, each on its own copy of one qcow2 chain: the same
//! outcomes (returns, error classes and messages), the same events in the
//! same order, and images that `qemu-img compare` finds equal afterwards.

mod common;

use common::{
    have, ok, qcow2_overlay, run, sluice, start_with_monitor, temp_dir, Outcome, Qmp, TempDir,
};
use serde_json::{json, Value};
use std::path::Path;

/// base.qcow2 <- mid.qcow2 <- top.qcow2, each layer with data of its own.
fn make_chain(dir: &TempDir) {
    let (base, mid, top) = (
        dir.file("base.qcow2"),
        dir.file("mid.qcow2"),
        dir.file("top.qcow2"),
    );
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "4M"]);
    qcow2_overlay(&mid, &base);
    qcow2_overlay(&top, &mid);
    ok("qemu-io", &["-c", "write -P 0x11 0 2M", &base]);
    ok("qemu-io", &["-c", "write -P 0x22 1M 2M", &mid]);
    ok("qemu-io", &["-c", "write -P 0x33 3M 64k", &top]);
}

/// What a comparison looks at in `query-jobs` and `query-block-jobs`
/// replies: progress numbers depend on timing and chunk sizes, and error
/// texts on the layer that failed; the rest must match.
fn normalize(cmd: &str, r: Outcome) -> Outcome {
    let keys: &[&str] = match cmd {
        "query-jobs" => &["id", "type", "status"],
        "query-block-jobs" => &["device", "type", "status", "paused", "io-status", "ready"],
        _ => return r,
    };
    let Ok(Value::Array(jobs)) = r else { return r };
    Ok(Value::Array(
        jobs.into_iter()
            .map(|j| {
                let mut v: serde_json::Map<String, Value> = keys
                    .iter()
                    .map(|k| (k.to_string(), j[*k].clone()))
                    .collect();
                v.insert("failed".into(), json!(j.get("error").is_some()));
                Value::Object(v)
            })
            .collect(),
    ))
}

/// A `run(q, name, args)` that sends the command and records it with its
/// outcome (normalized) in `out`.
fn recording(out: &mut Vec<(String, Outcome)>) -> impl FnMut(&mut Qmp, &str, Value) + '_ {
    move |q, name, args| {
        let r = normalize(name, q.cmd(name, args.clone()));
        out.push((format!("{name} {args}"), r));
    }
}

/// A stream held at 1 byte/s, then finalized and dismissed by hand, and
/// the errors around it; returns each command with its outcome.
fn stream_sequence(q: &mut Qmp, dir: &TempDir) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    let mut run = recording(&mut out);
    run(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "filename": dir.file("top.qcow2")}}),
    );
    run(q, "block-stream", json!({"job-id": "j", "device": "nope"}));
    run(q, "block-stream", json!({"device": "top"}));
    run(
        q,
        "block-stream",
        json!({"job-id": "j", "device": "top", "base": "nope.qcow2"}),
    );
    // Streams mid into top; base (named relative to the overlay's
    // directory) stays. Held at 1 byte/s until set-speed.
    run(
        q,
        "block-stream",
        json!({"job-id": "j", "device": "top", "base": "base.qcow2",
               "speed": 1, "auto-finalize": false, "auto-dismiss": false}),
    );
    run(q, "block-stream", json!({"job-id": "j", "device": "top"}));
    run(q, "block-stream", json!({"job-id": "k", "device": "top"}));
    run(q, "job-finalize", json!({"id": "j"}));
    run(q, "job-complete", json!({"id": "j"}));
    run(q, "query-jobs", Value::Null);
    run(
        q,
        "block-job-set-speed",
        json!({"device": "j", "speed": -1}),
    );
    run(q, "block-job-set-speed", json!({"device": "j", "speed": 0}));
    q.wait_event("BLOCK_JOB_PENDING");
    run(q, "query-jobs", Value::Null);
    run(q, "job-dismiss", json!({"id": "j"}));
    run(q, "job-finalize", json!({"id": "j"}));
    // The events a command causes come before its reply.
    assert_eq!(
        q.job_statuses("j").last().map(String::as_str),
        Some("concluded")
    );
    run(q, "query-jobs", Value::Null);
    run(q, "job-dismiss", json!({"id": "j"}));
    run(q, "job-dismiss", json!({"id": "j"}));
    run(q, "block-job-pause", json!({"device": "j"}));
    run(q, "block-commit", json!({"job-id": "c", "device": "nope"}));
    run(q, "query-jobs", Value::Null);
    run(q, "block_resize", json!({"node-name": "top", "size": -1}));
    run(q, "block_resize", json!({"device": "top", "size": 8 << 20}));
    run(
        q,
        "block_resize",
        json!({"node-name": "top", "size": 8 << 20}),
    );
    run(q, "blockdev-del", json!({"node-name": "top"}));
    run(q, "quit", Value::Null);
    drop(run);
    out
}

/// Event names in order; a status change carries its job and status.
fn event_trace(q: &Qmp) -> Vec<String> {
    q.events
        .iter()
        .map(|e| match e["event"].as_str().unwrap() {
            "JOB_STATUS_CHANGE" => format!(
                "JOB_STATUS_CHANGE {} {}",
                e["data"]["id"].as_str().unwrap(),
                e["data"]["status"].as_str().unwrap()
            ),
            name => name.to_string(),
        })
        .collect()
}

type Sequence = fn(&mut Qmp, &TempDir) -> Vec<(String, Outcome)>;

fn drive(
    cmd: &Path,
    pre: &[&str],
    dir: &TempDir,
    sequence: Sequence,
) -> (Vec<(String, Outcome)>, Vec<String>) {
    make_chain(dir);
    let (mut p, mut q) = start_with_monitor(cmd, pre, &dir.0);
    q.negotiate();
    let outcomes = sequence(&mut q, dir);
    assert!(p.0.wait().unwrap().success(), "{} exits 0", cmd.display());
    (outcomes, event_trace(&q))
}

/// qemu-storage-daemon runs `sequence` in `dir` (see `drive`).
fn drive_qsd(dir: &TempDir, sequence: Sequence) -> (Vec<(String, Outcome)>, Vec<String>) {
    drive(Path::new("qemu-storage-daemon"), &[], dir, sequence)
}

/// `qemu-img compare` finds `NAME.qcow2` in `ours` and `theirs` equal,
/// for each of `names`.
fn compare_each(ours: &TempDir, theirs: &TempDir, names: &[&str]) {
    for f in names {
        let f = format!("{f}.qcow2");
        ok("qemu-img", &["compare", &ours.file(&f), &theirs.file(&f)]);
    }
}

fn assert_same(
    ours: &[(String, Outcome)],
    theirs: &[(String, Outcome)],
    ours_events: &[String],
    theirs_events: &[String],
) {
    for ((cmd, a), (_, b)) in ours.iter().zip(theirs) {
        assert_eq!(a, b, "{cmd}");
    }
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours_events, theirs_events);
}

/// `top.qcow2`'s backing file name, as `qemu-img info` reads it.
fn backing_of_top(dir: &TempDir) -> Option<String> {
    let info = ok(
        "qemu-img",
        &["info", "--output=json", &dir.file("top.qcow2")],
    );
    let info: Value = serde_json::from_str(&info).unwrap();
    info["backing-filename"].as_str().map(str::to_string)
}

#[test]
fn block_stream_sequence_matches_qemu_storage_daemon() {
    let ours_dir = temp_dir("diff-ours");
    let (ours, ours_events) = drive(sluice(), &["daemon"], &ours_dir, stream_sequence);
    for (cmd, r) in &ours {
        eprintln!("sluice: {cmd} -> {r:?}");
    }
    // What holds without a referee: the job ran to the end and top now
    // sits on base directly.
    assert_eq!(ours_events.last().unwrap(), "JOB_STATUS_CHANGE j null");
    assert_eq!(backing_of_top(&ours_dir), Some(ours_dir.file("base.qcow2")));
    ok("qemu-img", &["check", &ours_dir.file("top.qcow2")]);
    let info = ok(
        "qemu-img",
        &["info", "--output=json", &ours_dir.file("top.qcow2")],
    );
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 8 << 20, "block_resize grew it");
    if !have("qemu-storage-daemon") {
        return;
    }
    let theirs_dir = temp_dir("diff-theirs");
    let (theirs, theirs_events) = drive_qsd(&theirs_dir, stream_sequence);
    assert_same(&ours, &theirs, &ours_events, &theirs_events);
    assert_eq!(
        backing_of_top(&theirs_dir),
        Some(theirs_dir.file("base.qcow2"))
    );
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            &ours_dir.file("top.qcow2"),
            &theirs_dir.file("top.qcow2"),
        ],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

/// The chain opened node by node (so that every layer is writable, as a
/// commit needs), with an empty mirror target and an empty backup target.
fn add_nodes(q: &mut Qmp, dir: &TempDir, run: &mut impl FnMut(&mut Qmp, &str, Value)) {
    for f in ["tgt", "bk"] {
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &dir.file(&format!("{f}.qcow2")),
                "4M",
            ],
        );
    }
    for (node, backing) in [
        ("base", None),
        ("mid", Some("base")),
        ("top", Some("mid")),
        ("tgt", None),
        ("bk", None),
    ] {
        let mut args = json!({"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": dir.file(&format!("{node}.qcow2"))}});
        if let Some(b) = backing {
            args["backing"] = json!(b);
        }
        run(q, "blockdev-add", args);
    }
}

/// Intermediate commit, backup, mirror with its pivot, then an active
/// commit, with errors on the way.
fn commit_mirror_backup_sequence(q: &mut Qmp, dir: &TempDir) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    let mut run = recording(&mut out);
    add_nodes(q, dir, &mut run);
    run(q, "block-commit", json!({"job-id": "c", "device": "mid"}));
    run(
        q,
        "block-commit",
        json!({"job-id": "c", "device": "top", "top-node": "nope"}),
    );
    run(
        q,
        "block-commit",
        json!({"job-id": "c", "device": "top", "top-node": "tgt"}),
    );
    run(
        q,
        "block-commit",
        json!({"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base"}),
    );
    q.wait_job_status("c", "null");
    run(
        q,
        "blockdev-backup",
        json!({"job-id": "b", "device": "top", "target": "bk", "sync": "bitmap"}),
    );
    run(
        q,
        "blockdev-backup",
        json!({"job-id": "b", "device": "top", "target": "bk", "sync": "full"}),
    );
    q.wait_job_status("b", "null");
    // A soft cancel of a mirror in sync ends it without the pivot.
    run(
        q,
        "blockdev-mirror",
        json!({"job-id": "m2", "device": "top", "target": "bk", "sync": "full"}),
    );
    q.wait_job_status("m2", "ready");
    run(q, "block-job-cancel", json!({"device": "m2"}));
    q.wait_job_status("m2", "null");
    run(
        q,
        "blockdev-mirror",
        json!({"job-id": "m", "device": "top", "target": "tgt", "sync": "full",
               "granularity": 1000}),
    );
    run(
        q,
        "blockdev-mirror",
        json!({"job-id": "m", "device": "top", "target": "tgt", "sync": "full"}),
    );
    q.wait_job_status("m", "ready");
    run(q, "block-job-complete", json!({"device": "m"}));
    q.wait_job_status("m", "null");
    // top is the active layer of top <- base now: an active commit.
    run(
        q,
        "block-commit",
        json!({"job-id": "a", "device": "top", "backing-file": "x"}),
    );
    run(q, "block-commit", json!({"job-id": "a", "device": "top"}));
    q.wait_job_status("a", "ready");
    run(q, "job-complete", json!({"id": "a"}));
    q.wait_job_status("a", "null");
    run(q, "query-jobs", Value::Null);
    run(q, "quit", Value::Null);
    drop(run);
    out
}

/// QEMU runs `blockdev-backup` as a transaction, which drains every node:
/// the new job parks for a moment (`paused`, then `running` again). sluice
/// does not drain there; the pair is dropped before comparing.
fn without_transaction_pause(events: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        let resumed = e.strip_suffix(" running").and_then(|id| {
            out.last()
                .filter(|prev| prev.strip_suffix(" paused") == Some(id))
                .map(|_| ())
        });
        if resumed.is_some() {
            out.pop();
        } else {
            out.push(e.clone());
        }
    }
    out
}

#[test]
fn commit_mirror_and_backup_sequence_matches_qemu_storage_daemon() {
    let ours_dir = temp_dir("diff-jobs-ours");
    let (ours, ours_events) = drive(
        sluice(),
        &["daemon"],
        &ours_dir,
        commit_mirror_backup_sequence,
    );
    for (cmd, r) in &ours {
        eprintln!("sluice: {cmd} -> {r:?}");
    }
    for f in ["base", "top", "tgt", "bk"] {
        ok(
            "qemu-img",
            &["check", &ours_dir.file(&format!("{f}.qcow2"))],
        );
    }
    // Without a referee: every copy holds what top showed at the start.
    for f in ["base", "tgt", "bk"] {
        ok(
            "qemu-img",
            &[
                "compare",
                &ours_dir.file("top.qcow2"),
                &ours_dir.file(&format!("{f}.qcow2")),
            ],
        );
    }
    if !have("qemu-storage-daemon") {
        return;
    }
    let theirs_dir = temp_dir("diff-jobs-theirs");
    let (theirs, theirs_events) = drive_qsd(&theirs_dir, commit_mirror_backup_sequence);
    assert_same(
        &ours,
        &theirs,
        &ours_events,
        &without_transaction_pause(&theirs_events),
    );
    compare_each(&ours_dir, &theirs_dir, &["base", "mid", "top", "tgt", "bk"]);
}

/// Read errors in the layer a stream copies from: with `on-error: stop`
/// the job pauses and retries after `job-resume`; with the default
/// (`report`) it fails, and the overlay keeps its backing chain.
fn stream_error_sequence(q: &mut Qmp, dir: &TempDir) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    let mut run = recording(&mut out);
    // A second chain for the failing case: base2 <- top2.
    let (base2, top2) = (dir.file("base2.qcow2"), dir.file("top2.qcow2"));
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &base2, "4M"]);
    ok("qemu-io", &["-c", "write -P 0x44 0 1M", &base2]);
    qcow2_overlay(&top2, &base2);
    let blkdebug = |file: &str, once: bool| {
        json!({"driver": "blkdebug",
               "inject-error": [{"event": "read_aio", "errno": 5, "once": once}],
               "image": {"driver": "file", "filename": dir.file(file)}})
    };
    for (node, file, backing) in [
        ("base", blkdebug("base.qcow2", true), None),
        (
            "mid",
            json!({"driver": "file", "filename": dir.file("mid.qcow2")}),
            Some("base"),
        ),
        (
            "top",
            json!({"driver": "file", "filename": dir.file("top.qcow2")}),
            Some("mid"),
        ),
        ("base2", blkdebug("base2.qcow2", false), None),
        (
            "top2",
            json!({"driver": "file", "filename": top2}),
            Some("base2"),
        ),
    ] {
        let mut args = json!({"driver": "qcow2", "node-name": node, "file": file});
        if let Some(b) = backing {
            args["backing"] = json!(b);
        }
        run(q, "blockdev-add", args);
    }
    run(
        q,
        "block-stream",
        json!({"job-id": "s", "device": "top", "on-error": "stop"}),
    );
    q.wait_job_status("s", "paused");
    run(q, "query-block-jobs", Value::Null);
    run(q, "job-resume", json!({"id": "s"}));
    q.wait_job_status("s", "null");
    run(
        q,
        "block-stream",
        json!({"job-id": "r", "device": "top2", "auto-dismiss": false}),
    );
    q.wait_job_status("r", "concluded");
    run(q, "query-jobs", Value::Null);
    run(q, "job-dismiss", json!({"id": "r"}));
    run(q, "quit", Value::Null);
    drop(run);
    out
}

#[test]
fn stream_read_errors_match_qemu_storage_daemon() {
    let ours_dir = temp_dir("diff-errors-ours");
    let (ours, ours_events) = drive(sluice(), &["daemon"], &ours_dir, stream_error_sequence);
    for (cmd, r) in &ours {
        eprintln!("sluice: {cmd} -> {r:?}");
    }
    assert!(ours_events.iter().any(|e| e == "BLOCK_JOB_ERROR"));
    // The failed stream left top2 on base2.
    let info = ok(
        "qemu-img",
        &["info", "--output=json", &ours_dir.file("top2.qcow2")],
    );
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename"], ours_dir.file("base2.qcow2"));
    if !have("qemu-storage-daemon") {
        return;
    }
    let theirs_dir = temp_dir("diff-errors-theirs");
    let (theirs, theirs_events) = drive_qsd(&theirs_dir, stream_error_sequence);
    assert_same(&ours, &theirs, &ours_events, &theirs_events);
    compare_each(&ours_dir, &theirs_dir, &["top", "top2"]);
}

/// Images made with `blockdev-create` (a file, then qcow2 on it), a live
/// `blockdev-snapshot` onto a new overlay, `transaction`s (a grouped
/// backup; a failing snapshot that changes nothing), and their errors.
fn create_snapshot_sequence(q: &mut Qmp, dir: &TempDir) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    let mut run = recording(&mut out);
    let create =
        |q: &mut Qmp, run: &mut dyn FnMut(&mut Qmp, &str, Value), id: &str, opts: Value| {
            run(q, "blockdev-create", json!({"job-id": id, "options": opts}));
            q.wait_job_status(id, "concluded");
            run(q, "query-jobs", Value::Null);
            run(q, "job-dismiss", json!({"id": id}));
        };
    // A new 4 MiB qcow2 image, made from nothing.
    create(
        q,
        &mut run,
        "c1",
        json!({"driver": "file", "filename": dir.file("new.qcow2"), "size": 0}),
    );
    run(
        q,
        "blockdev-add",
        json!({"driver": "file", "node-name": "new-file", "filename": dir.file("new.qcow2")}),
    );
    create(
        q,
        &mut run,
        "c2",
        json!({"driver": "qcow2", "file": "new-file", "size": 4 << 20, "cluster-size": 65536}),
    );
    run(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "new", "file": "new-file"}),
    );
    // An overlay for base.qcow2, snapshotted on top of it live.
    run(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base",
        "file": {"driver": "file", "filename": dir.file("base.qcow2")}}),
    );
    create(
        q,
        &mut run,
        "c3",
        json!({"driver": "file", "filename": dir.file("ovl.qcow2"), "size": 0}),
    );
    run(
        q,
        "blockdev-add",
        json!({"driver": "file", "node-name": "ovl-file", "filename": dir.file("ovl.qcow2")}),
    );
    create(
        q,
        &mut run,
        "c4",
        json!({"driver": "qcow2", "file": "ovl-file", "size": 4 << 20,
        "backing-file": dir.file("base.qcow2"), "backing-fmt": "qcow2"}),
    );
    run(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ovl", "file": "ovl-file", "backing": null}),
    );
    run(
        q,
        "blockdev-snapshot",
        json!({"node": "nope", "overlay": "ovl"}),
    );
    run(
        q,
        "blockdev-snapshot",
        json!({"node": "base", "overlay": "nope"}),
    );
    run(
        q,
        "blockdev-snapshot",
        json!({"node": "base", "overlay": "ovl"}),
    );
    run(
        q,
        "blockdev-snapshot",
        json!({"node": "base", "overlay": "ovl"}),
    );
    run(
        q,
        "blockdev-snapshot",
        json!({"node": "new", "overlay": "ovl"}),
    );
    run(q, "blockdev-del", json!({"node-name": "base"}));
    // A transaction that fails in its second action changes nothing.
    run(
        q,
        "transaction",
        json!({"actions": [
        {"type": "blockdev-backup", "data": {"job-id": "b0", "device": "ovl", "target": "new", "sync": "full"}},
        {"type": "blockdev-snapshot", "data": {"node": "nope", "overlay": "ovl"}}]}),
    );
    run(q, "query-jobs", Value::Null);
    // A grouped backup of the snapshotted disk into the new image.
    run(
        q,
        "transaction",
        json!({
        "actions": [{"type": "blockdev-backup", "data": {"job-id": "b1", "device": "ovl", "target": "new", "sync": "full"}}],
        "properties": {"completion-mode": "grouped"}}),
    );
    q.wait_job_status("b1", "null");
    run(q, "query-jobs", Value::Null);
    run(
        q,
        "blockdev-create",
        json!({"job-id": "c5", "options": {"driver": "qcow2", "file": "nope", "size": 1024}}),
    );
    // How soon a failed job concludes is timing; wait, so both agree.
    q.wait_job_status("c5", "concluded");
    run(
        q,
        "blockdev-create",
        json!({"job-id": "c6", "options": {"driver": "qcow2", "file": "new-file", "size": 1024, "cluster-size": 1000}}),
    );
    q.wait_job_status("c6", "concluded");
    run(q, "query-jobs", Value::Null);
    run(q, "job-dismiss", json!({"id": "c6"}));
    run(q, "quit", Value::Null);
    drop(run);
    out
}

#[test]
fn create_snapshot_and_transaction_match_qemu_storage_daemon() {
    let ours_dir = temp_dir("diff-create-ours");
    let (ours, ours_events) = drive(sluice(), &["daemon"], &ours_dir, create_snapshot_sequence);
    for (cmd, r) in &ours {
        eprintln!("sluice: {cmd} -> {r:?}");
    }
    ok("qemu-img", &["check", &ours_dir.file("new.qcow2")]);
    ok("qemu-img", &["check", &ours_dir.file("ovl.qcow2")]);
    // Without a referee: the backup holds what the snapshotted disk shows.
    ok(
        "qemu-img",
        &[
            "compare",
            &ours_dir.file("ovl.qcow2"),
            &ours_dir.file("new.qcow2"),
        ],
    );
    if !have("qemu-storage-daemon") {
        return;
    }
    let theirs_dir = temp_dir("diff-create-theirs");
    let (theirs, theirs_events) = drive_qsd(&theirs_dir, create_snapshot_sequence);
    for (cmd, r) in &theirs {
        eprintln!("qemu: {cmd} -> {r:?}");
    }
    assert_same(
        &ours,
        &theirs,
        &ours_events,
        &without_transaction_pause(&theirs_events),
    );
    compare_each(&ours_dir, &theirs_dir, &["new", "ovl"]);
}
