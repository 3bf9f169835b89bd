//! `blockdev-reopen` sent to qemu-storage-daemon and to `sluice daemon`,
//! each on its own copy of the same images: the same returns, error
//! classes and messages — refusals by the schema and by the checks, read-only
//! toggling (the `ro` flags of the nodes after each step), backing changes
//! (seen through what they allow afterwards) — and images `qemu-img check`
//! finds clean once the daemons are gone.

mod common;

use common::{
    have, ok, qcow2_overlay, sluice, start_with_monitor, temp_dir, Outcome, Qmp, TempDir,
};
use serde_json::{json, Value};
use std::path::Path;

fn make_images(dir: &TempDir) {
    let (base, top, other) = (
        dir.file("base.qcow2"),
        dir.file("top.qcow2"),
        dir.file("other.qcow2"),
    );
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "4M"]);
    qcow2_overlay(&top, &base);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &other, "4M"]);
    ok("qemu-io", &["-c", "write -P 0x11 0 1M", &base]);
    ok("qemu-io", &["-c", "write -P 0x22 1M 1M", &top]);
}

/// The `ro` flag of each named node, sorted by name.
fn ro_flags(q: &mut Qmp) -> Outcome {
    let nodes = q.cmd("query-named-block-nodes", json!({"flat": true}))?;
    let mut flags: Vec<(String, bool)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| {
            let name = n["node-name"].as_str()?;
            (!name.starts_with('#')).then(|| (name.to_string(), n["ro"].as_bool().unwrap()))
        })
        .collect();
    flags.sort();
    Ok(json!(flags))
}

/// The sequence; returns each step with its outcome.
fn sequence(q: &mut Qmp, dir: &TempDir) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    let d = dir.0.to_str().unwrap().to_string();
    let mut run = |q: &mut Qmp, name: &str, args: Value| {
        let text = args.to_string().replace(&d, "$DIR");
        let r = q.cmd(name, args);
        out.push((format!("{name} {text}"), r));
        let flags = ro_flags(q);
        out.push((format!("ro flags after {name} {text}"), flags));
    };
    let file = |name: &str| dir.file(name);
    // base-file is a node of its own (it keeps its mode when base
    // switches); top-file is nested in top (it follows top).
    run(
        q,
        "blockdev-add",
        json!({"driver": "file", "node-name": "base-file",
               "filename": file("base.qcow2"), "read-only": true}),
    );
    run(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
               "file": "base-file"}),
    );
    run(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": "base",
               "file": {"driver": "file", "node-name": "top-file",
                        "filename": file("top.qcow2")}}),
    );
    run(
        q,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "other",
               "file": {"driver": "file", "node-name": "other-file",
                        "filename": file("other.qcow2")}}),
    );
    run(
        q,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n"}),
    );
    let top = |extra: Value| {
        let mut v = json!({"driver": "qcow2", "node-name": "top", "file": "top-file"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        json!({"options": [v]})
    };

    // Refused by the schema.
    run(q, "blockdev-reopen", json!({}));
    run(q, "blockdev-reopen", json!({"options": {}}));
    run(q, "blockdev-reopen", json!({"x": 1, "options": []}));
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"node-name": "top"}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "nope", "node-name": "top"}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "node-name": "top"}]}),
    );
    run(q, "blockdev-reopen", top(json!({"bogus": 1})));
    run(q, "blockdev-reopen", top(json!({"read-only": "yes"})));
    run(q, "blockdev-reopen", top(json!({"backing": 7})));
    // Refused by the checks, each leaving everything as it was.
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "file": "top-file"}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "node-name": "nope", "file": "x"}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [
            {"driver": "qcow2", "node-name": "top", "file": "top-file",
             "backing": "base", "read-only": true},
            {"driver": "qcow2", "node-name": "nope", "file": "x"}]}),
    );
    run(q, "blockdev-reopen", top(json!({})));
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "raw", "node-name": "other", "file": "other-file"}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "null-co", "node-name": "n", "size": 4096}]}),
    );
    run(
        q,
        "blockdev-reopen",
        top(json!({"file": "nope", "backing": "base"})),
    );
    run(q, "blockdev-reopen", top(json!({"backing": "nope"})));
    run(q, "blockdev-reopen", top(json!({"backing": "top"})));
    run(
        q,
        "blockdev-reopen",
        top(json!({"backing": "base", "force-share": true})),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "file", "node-name": "base-file",
                            "filename": file("other.qcow2"), "read-only": true}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "file", "node-name": "base-file",
                            "filename": file("base.qcow2"), "read-only": true,
                            "locking": "off"}]}),
    );
    // A writable format over a read-only file, and the other way round.
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "node-name": "base", "file": "base-file"}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "file", "node-name": "top-file",
                            "filename": file("top.qcow2"), "read-only": true}]}),
    );
    // Toggling read-only: the file first, then the format on it; both
    // back in one command.
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "file", "node-name": "base-file",
                            "filename": file("base.qcow2")}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "node-name": "base", "file": "base-file"}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [
            {"driver": "qcow2", "node-name": "base", "file": "base-file", "read-only": true},
            {"driver": "file", "node-name": "base-file",
             "filename": file("base.qcow2"), "read-only": true}]}),
    );
    run(
        q,
        "blockdev-reopen",
        top(json!({"backing": "base", "read-only": true})),
    );
    run(
        q,
        "blockdev-reopen",
        top(json!({"backing": "base", "read-only": false})),
    );
    // One entry refused while switching: the other is switched back.
    run(
        q,
        "blockdev-reopen",
        json!({"options": [
            {"driver": "file", "node-name": "base-file", "filename": file("base.qcow2")},
            {"driver": "file", "node-name": "top-file",
             "filename": file("top.qcow2"), "read-only": true}]}),
    );
    // Backing changes: base is in use as top's backing until top lets go.
    run(q, "blockdev-del", json!({"node-name": "base"}));
    run(q, "blockdev-reopen", top(json!({"backing": null})));
    run(q, "blockdev-reopen", top(json!({"backing": "other"})));
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "node-name": "other",
                            "file": "other-file", "backing": "top"}]}),
    );
    // Several entries, one of them refused: none applies.
    run(
        q,
        "blockdev-reopen",
        json!({"options": [
            {"driver": "qcow2", "node-name": "top", "file": "top-file",
             "backing": "n", "read-only": true},
            {"driver": "null-co", "node-name": "n", "size": 4096}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [
            {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "base"},
            {"driver": "qcow2", "node-name": "other", "file": "other-file",
             "backing": null, "read-only": true}]}),
    );
    run(q, "blockdev-del", json!({"node-name": "other"}));
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "null-co", "node-name": "n", "read-only": true}]}),
    );
    run(
        q,
        "blockdev-reopen",
        json!({"options": [{"driver": "null-co", "node-name": "n"}]}),
    );
    run(q, "blockdev-del", json!({"node-name": "top"}));
    run(q, "blockdev-del", json!({"node-name": "base"}));
    run(q, "blockdev-del", json!({"node-name": "base-file"}));
    out
}

fn drive(cmd: &Path, pre: &[&str], tag: &str) -> (Vec<(String, Outcome)>, TempDir) {
    let dir = temp_dir(tag);
    make_images(&dir);
    let (mut p, mut q) = start_with_monitor(cmd, pre, &dir.0);
    q.negotiate();
    let out = sequence(&mut q, &dir);
    assert_eq!(q.cmd("quit", Value::Null), Ok(json!({})));
    let _ = p.0.wait();
    (out, dir)
}

#[test]
fn blockdev_reopen_matches_qemu_storage_daemon() {
    if !have("qemu-storage-daemon") || !have("qemu-img") {
        return;
    }
    let (ours, our_dir) = drive(sluice(), &["daemon"], "reopen-sluice");
    let (theirs, their_dir) = drive(Path::new("qemu-storage-daemon"), &[], "reopen-qemu");
    assert_eq!(ours.len(), theirs.len());
    for ((cmd, a), (_, b)) in ours.iter().zip(&theirs) {
        assert_eq!(a, b, "{cmd}: sluice (left) and qemu-storage-daemon differ");
    }
    for dir in [&our_dir, &their_dir] {
        for img in ["base.qcow2", "top.qcow2", "other.qcow2"] {
            ok("qemu-img", &["check", &dir.file(img)]);
        }
    }
    ok(
        "qemu-img",
        &[
            "compare",
            &our_dir.file("top.qcow2"),
            &their_dir.file("top.qcow2"),
        ],
    );
}
