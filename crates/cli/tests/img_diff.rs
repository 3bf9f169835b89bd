//! `sluice img` beside `qemu-img`: each subcommand runs with both tools on
//! the same images (read-only commands) or on copies of them (commands
//! that write), and must agree: the same stdout (JSON and human reports),
//! the same exit code and error line, and result images that
//! `qemu-img compare` finds equal and `qemu-img check` finds clean.
//!
//! Allowed differences, compared field by field instead of as text:
//! * `actual-size` and `disk size` of images the two tools wrote (host
//!   allocation depends on write order and file system);
//! * the error text after `qemu-img: NAME: ` where sluice's driver words
//!   the cause differently (both must name the file and fail the same).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn have_qemu() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A fresh directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("sluice-img-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(program: &str, pre: &[&str], args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(pre)
        .args(args)
        .current_dir(dir)
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn qemu(args: &[&str], dir: &Path) -> Output {
    run("qemu-img", &[], args, dir)
}

fn sluice(args: &[&str], dir: &Path) -> Output {
    run(env!("CARGO_BIN_EXE_sluice"), &["img"], args, dir)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

fn qemu_io(args: &[&str], dir: &Path) {
    let o = run("qemu-io", &[], args, dir);
    ok(&o, &format!("qemu-io {args:?}"));
}

/// A three-image qcow2 chain in `dir`: `base.qcow2` (8 MiB: pattern 1 in
/// the first 3 MiB, a zero cluster at 3 MiB, a compressed cluster at
/// 5 MiB), `mid.qcow2` (pattern 2 at 1 MiB, zeroes over part of base's
/// data) and `top.qcow2` (pattern 3 straddling mid's data, data past the
/// base's allocation), each naming the one below with a relative path.
/// Also `plain.raw`, a raw image with data and a hole.
fn fixtures(dir: &Path) {
    qemu_ok(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    qemu_io_qcow2(
        dir,
        "base.qcow2",
        &["write -P 1 0 3M", "write -z 3M 64k", "write -c -P 9 5M 64k"],
    );
    for (below, img, cmds) in [
        (
            "base.qcow2",
            "mid.qcow2",
            &["write -P 2 1M 1M", "write -z 2M 128k"],
        ),
        (
            "mid.qcow2",
            "top.qcow2",
            &["write -P 3 1536k 1M", "write -P 4 6M 192k"],
        ),
    ] {
        qemu_ok(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2", img,
            ],
        );
        qemu_io_qcow2(dir, img, cmds);
    }
    let mut raw = vec![0u8; 4 * MIB as usize];
    raw[..65536].fill(0x5a);
    raw[(2 * MIB) as usize..(2 * MIB + 4096) as usize].fill(0x11);
    std::fs::write(dir.join("plain.raw"), raw).unwrap();
}

/// A fresh directory `name`, or `None` (the test is skipped) when
/// qemu-img is not installed.
fn scratch(name: &str) -> Option<Scratch> {
    if !have_qemu() {
        eprintln!("qemu-img not installed: skipped");
        return None;
    }
    Some(Scratch::new(name))
}

/// `scratch(name)` holding the `fixtures`.
fn fixture_dir(name: &str) -> Option<Scratch> {
    let s = scratch(name)?;
    fixtures(&s.0);
    Some(s)
}

/// qemu-img (for a `tool` named `q…`) or sluice img runs `args` in `dir`.
fn by(tool: &str, args: &[&str], dir: &Path) -> Output {
    if tool.starts_with('q') {
        qemu(args, dir)
    } else {
        sluice(args, dir)
    }
}

/// qemu-img runs `args` in `dir` and must succeed.
fn qemu_ok(dir: &Path, args: &[&str]) {
    ok(&qemu(args, dir), &format!("qemu-img {args:?}"));
}

/// sluice img runs `args` in `dir` and must succeed.
fn sluice_ok(dir: &Path, args: &[&str], what: &str) {
    ok(&sluice(args, dir), what);
}

/// `qemu-io -f qcow2 -c CMD... IMG` in `dir`, which must succeed.
fn qemu_io_qcow2(dir: &Path, img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img);
    qemu_io(&args, dir);
}

/// The files `a` and `b` in `dir` hold the same bytes.
fn assert_same_files(dir: &Path, a: &str, b: &str, what: &str) {
    assert_eq!(
        std::fs::read(dir.join(a)).unwrap(),
        std::fs::read(dir.join(b)).unwrap(),
        "{what}"
    );
}

/// `img` is clean and reads as `src`.
fn assert_clean_copy(dir: &Path, img: &str, src: &str) {
    assert_clean(dir, img);
    assert_identical(dir, img, src);
}

/// A fresh copy of the fixtures' chain in `dir/TOOL-chain`.
fn chain_copy(dir: &Path, tool: &str) -> PathBuf {
    let d = dir.join(format!("{tool}-chain"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in CHAIN {
        std::fs::copy(dir.join(f), d.join(f)).unwrap();
    }
    d
}

/// The fixtures' chain, base first.
const CHAIN: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];

/// Both tools, the same arguments, the same directory: stdout, stderr
/// and exit code must be equal.
fn same(dir: &Path, args: &[&str]) -> Output {
    let a = qemu(args, dir);
    let b = sluice(args, dir);
    assert_eq!(
        text(&b.stdout),
        text(&a.stdout),
        "stdout of {args:?}\nsluice stderr: {}",
        text(&b.stderr)
    );
    assert_eq!(text(&b.stderr), text(&a.stderr), "stderr of {args:?}");
    assert_eq!(b.status.code(), a.status.code(), "exit code of {args:?}");
    b
}

/// `same` for each of `cases`.
fn same_each(dir: &Path, cases: &[&[&str]]) {
    for args in cases {
        same(dir, args);
    }
}

/// Exit codes equal, and each tool printed exactly one error line that
/// names `file`; nothing on stdout.
fn same_failure(dir: &Path, args: &[&str], file: &str) {
    let a = qemu(args, dir);
    let b = sluice(args, dir);
    assert!(!a.status.success(), "qemu-img {args:?} should fail");
    assert_eq!(b.status.code(), a.status.code(), "exit code of {args:?}");
    let err = text(&b.stderr);
    assert!(
        err.starts_with("qemu-img: ") && err.contains(file),
        "sluice's error for {args:?} must name {file}: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert_eq!(text(&b.stdout), text(&a.stdout), "stdout of {args:?}");
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", text(&o.stdout)))
}

/// Removes the keys whose values depend on host allocation.
fn strip_allocation(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("actual-size");
            for x in m.values_mut() {
                strip_allocation(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_allocation),
        _ => {}
    }
}

fn assert_identical(dir: &Path, a: &str, b: &str) {
    let o = qemu(&["compare", a, b], dir);
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img compare {a} {b}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

fn assert_clean(dir: &Path, img: &str) {
    let o = qemu(&["check", img], dir);
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img check {img}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

#[test]
fn info_reports_match_qemu_img() {
    let Some(s) = fixture_dir("info") else {
        return;
    };
    same_each(
        &s.0,
        &[
            &["info", "top.qcow2"][..],
            &["info", "--output=json", "top.qcow2"],
            &["info", "--backing-chain", "top.qcow2"],
            &["info", "--backing-chain", "--output=json", "top.qcow2"],
            &["info", "-f", "qcow2", "--output=json", "base.qcow2"],
            &["info", "plain.raw"],
            &["info", "--output=json", "-f", "raw", "plain.raw"],
            &["info", "-U", "--output", "json", "mid.qcow2"],
            &[
                "info",
                "--image-opts",
                "driver=qcow2,file.filename=mid.qcow2",
            ],
            &["info", "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"base.qcow2\"}}"],
        ],
    );
    // v2 images and snapshots.
    qemu_ok(
        &s.0,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "1M",
        ],
    );
    qemu_ok(&s.0, &["snapshot", "-c", "first", "v2.qcow2"]);
    qemu_ok(&s.0, &["snapshot", "-c", "second", "v2.qcow2"]);
    same(&s.0, &["info", "v2.qcow2"]);
    same(&s.0, &["info", "--output=json", "v2.qcow2"]);
    same(&s.0, &["snapshot", "-l", "v2.qcow2"]);
}

#[test]
fn info_failures_match_qemu_img() {
    let Some(s) = fixture_dir("info-fail") else {
        return;
    };
    same_failure(&s.0, &["info", "missing.qcow2"], "missing.qcow2");
    same_failure(&s.0, &["info", "-f", "qcow2", "plain.raw"], "plain.raw");
    same(&s.0, &["info", "--image-opts", "-f", "qcow2", "plain.raw"]);
    same(&s.0, &["info", "--output=xml", "plain.raw"]);
}

#[test]
fn map_matches_qemu_img() {
    let Some(s) = fixture_dir("map") else {
        return;
    };
    same_each(
        &s.0,
        &[
            &["map", "top.qcow2"][..],
            &["map", "--output=json", "top.qcow2"],
            &["map", "--output=json", "mid.qcow2"],
            &["map", "--output=json", "base.qcow2"],
            &["map", "--output=json", "-f", "raw", "plain.raw"],
            &["map", "-f", "raw", "plain.raw"],
            &[
                "map",
                "--output=json",
                "--start-offset",
                "1M",
                "--max-length",
                "3M",
                "top.qcow2",
            ],
        ],
    );
    same_failure(&s.0, &["map", "missing.qcow2"], "missing.qcow2");
}

#[test]
fn compare_matches_qemu_img() {
    let Some(s) = fixture_dir("compare") else {
        return;
    };
    qemu_ok(&s.0, &["convert", "-O", "raw", "top.qcow2", "top.raw"]);
    qemu_ok(&s.0, &["create", "-q", "-f", "qcow2", "big.qcow2", "16M"]);
    same_each(
        &s.0,
        &[
            &["compare", "top.qcow2", "top.raw"][..],
            &["compare", "-s", "top.qcow2", "top.qcow2"],
            &["compare", "top.qcow2", "mid.qcow2"],
            &["compare", "-s", "top.qcow2", "mid.qcow2"],
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "base.qcow2",
                "plain.raw",
            ],
            &["compare", "base.qcow2", "big.qcow2"],
            &["compare", "-s", "base.qcow2", "big.qcow2"],
            &["compare", "-q", "top.qcow2", "mid.qcow2"],
            &["compare", "top.qcow2"],
        ],
    );
    // A longer image whose tail holds data.
    qemu_ok(&s.0, &["convert", "-O", "qcow2", "top.qcow2", "long.qcow2"]);
    qemu_ok(&s.0, &["resize", "-q", "long.qcow2", "16M"]);
    same(&s.0, &["compare", "top.qcow2", "long.qcow2"]);
    qemu_io_qcow2(&s.0, "long.qcow2", &["write -P 7 12M 4k"]);
    same(&s.0, &["compare", "top.qcow2", "long.qcow2"]);
    // Open errors exit 2.
    same(&s.0, &["compare", "top.qcow2", "missing.qcow2"]);
}

/// Converts `args` (ending in the output name `out`) with both tools,
/// into `q-OUT` and `s-OUT`; both must succeed.
fn convert_both(dir: &Path, args: &[&str], out: &str) -> (String, String) {
    let (qo, so) = (format!("q-{out}"), format!("s-{out}"));
    let mut qa: Vec<&str> = args.to_vec();
    qa.push(&qo);
    ok(&qemu(&qa, dir), &format!("qemu-img {qa:?}"));
    let mut sa: Vec<&str> = args.to_vec();
    sa.push(&so);
    let o = sluice(&sa, dir);
    ok(&o, &format!("sluice img {sa:?}"));
    (qo, so)
}

#[test]
fn convert_flattens_a_chain_to_raw_like_qemu_img() {
    let Some(s) = fixture_dir("convert-raw") else {
        return;
    };
    let (q, o) = convert_both(&s.0, &["convert", "-O", "raw", "top.qcow2"], "flat.raw");
    assert_same_files(&s.0, &q, &o, "flattened raw images differ");
    assert_identical(&s.0, &o, "top.qcow2");
    // Sparse: the same holes as qemu-img's output.
    assert_eq!(
        json(&qemu(&["map", "--output=json", "-f", "raw", &o], &s.0)),
        json(&qemu(&["map", "--output=json", "-f", "raw", &q], &s.0)),
        "allocation of the raw output"
    );
    // Out of order, one chunk in flight or sixteen, -S 0 (fully
    // allocated), concatenation of two sources.
    for extra in [
        &["-W", "-m", "16"][..],
        &["-m", "1"],
        &["-S", "0"],
        &["-S", "64k", "-p"],
    ] {
        let mut a = vec!["convert", "-O", "raw"];
        a.extend_from_slice(extra);
        a.push("top.qcow2");
        let (q2, o2) = convert_both(&s.0, &a, "var.raw");
        assert_same_files(&s.0, &q2, &o2, &format!("convert {extra:?}"));
    }
    let full = qemu(&["map", "--output=json", "-f", "raw", "s-var.raw"], &s.0);
    let (q3, o3) = convert_both(
        &s.0,
        &["convert", "-O", "raw", "top.qcow2", "plain.raw"],
        "cat.raw",
    );
    assert_same_files(&s.0, &q3, &o3, "concatenated sources");
    assert!(full.status.success());
}

#[test]
fn convert_into_an_existing_target() {
    let Some(s) = fixture_dir("convert-n") else {
        return;
    };
    // A target full of 0xff: zero ranges of the source must be written.
    for name in ["q-t.raw", "s-t.raw"] {
        std::fs::write(s.0.join(name), vec![0xffu8; 8 * MIB as usize]).unwrap();
    }
    convert_both(&s.0, &["convert", "-n", "-O", "raw", "top.qcow2"], "t.raw");
    assert_eq!(
        std::fs::read(s.0.join("q-t.raw")).unwrap(),
        std::fs::read(s.0.join("s-t.raw")).unwrap()
    );
    assert_identical(&s.0, "s-t.raw", "top.qcow2");
    // --target-is-zero trusts the target: on a zeroed file the result is
    // the same.
    std::fs::write(s.0.join("z.raw"), vec![0u8; 8 * MIB as usize]).unwrap();
    sluice_ok(
        &s.0,
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            "raw",
            "top.qcow2",
            "z.raw",
        ],
        "--target-is-zero",
    );
    assert_identical(&s.0, "z.raw", "top.qcow2");
}

#[test]
fn convert_failures_match_qemu_img() {
    let Some(s) = fixture_dir("convert-fail") else {
        return;
    };
    std::fs::write(s.0.join("small.raw"), vec![0u8; 4096]).unwrap();
    for args in [
        &["convert", "top.qcow2"][..],
        &["convert", "-m", "0", "top.qcow2", "out.img"],
        &["convert", "-m", "17", "top.qcow2", "out.img"],
        &["convert", "-S", "foo", "top.qcow2", "out.img"],
        &["convert", "-S", "1000", "top.qcow2", "out.img"],
        &["convert", "-O", "raw", "-c", "top.qcow2", "out.img"],
        &[
            "convert",
            "-O",
            "raw",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "out.img",
        ],
        &[
            "convert",
            "--target-is-zero",
            "-O",
            "raw",
            "top.qcow2",
            "out.img",
        ],
        &["convert", "-O", "foo", "top.qcow2", "out.img"],
        &[
            "convert",
            "-O",
            "raw",
            "-o",
            "foo=bar",
            "top.qcow2",
            "out.img",
        ],
        &["convert", "-n", "-O", "raw", "top.qcow2", "small.raw"],
        &[
            "convert",
            "-n",
            "-O",
            "raw",
            "-o",
            "preallocation=off",
            "top.qcow2",
            "small.raw",
        ],
    ] {
        same(&s.0, args);
        assert!(!s.0.join("out.img").exists(), "{args:?} left a target");
    }
    same_failure(
        &s.0,
        &["convert", "missing.qcow2", "out.img"],
        "missing.qcow2",
    );
    assert!(!s.0.join("out.img").exists());
    same_failure(
        &s.0,
        &["convert", "-O", "raw", "top.qcow2", "nodir/out.img"],
        "nodir/out.img",
    );
}

#[test]
fn create_matches_qemu_img() {
    let Some(s) = fixture_dir("create") else {
        return;
    };
    for (args, out) in [
        (&["create", "-f", "raw", "OUT", "1M"][..], true),
        (&["create", "OUT", "1.5M"], true),
        (&["create", "-q", "-f", "raw", "OUT", "64k"], true),
        (&["create", "-f", "raw", "-o", "size=2M", "OUT"], true),
        (
            &[
                "create",
                "-f",
                "raw",
                "-o",
                "preallocation=full",
                "OUT",
                "1M",
            ],
            true,
        ),
        (&["create", "-f", "raw", "OUT", "--", "-1"], false),
        (&["create", "-f", "raw", "OUT", "1Z"], false),
        (&["create", "-f", "raw", "OUT", "8E"], false),
        (&["create", "-f", "raw", "OUT"], false),
        (&["create", "-f", "foo", "OUT", "1M"], false),
        (&["create", "-f", "raw", "-o", "foo=1", "OUT", "1M"], false),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "missing.qcow2",
                "-F",
                "qcow2",
                "OUT",
            ],
            false,
        ),
        (&["create", "-f", "qcow2", "-b", "base.qcow2", "OUT"], false),
        (
            &[
                "create",
                "-f",
                "raw",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "OUT",
                "1M",
            ],
            false,
        ),
        (&["create", "-f", "qcow2", "OUT"], false),
    ] {
        // The tools run one after the other on the same name: each result
        // is checked and removed before the other runs.
        let mut results = Vec::new();
        for tool in ["qemu", "sluice"] {
            let out_name = format!("{tool}.img");
            let a: Vec<&str> = args
                .iter()
                .map(|x| if *x == "OUT" { out_name.as_str() } else { *x })
                .collect();
            let o = by(tool, &a, &s.0);
            let meta = std::fs::metadata(s.0.join(&out_name)).ok().map(|m| m.len());
            let _ = std::fs::remove_file(s.0.join(&out_name));
            results.push((
                text(&o.stdout).replace(&out_name, "OUT"),
                text(&o.stderr).replace(&out_name, "OUT"),
                o.status.code(),
                meta,
            ));
        }
        assert_eq!(results[1], results[0], "create {args:?}");
        assert_eq!(results[0].3.is_some(), out, "{args:?}: file created?");
    }
}

/// `info --output=json` of `img` without host allocation sizes.
fn info_json(dir: &Path, img: &str) -> serde_json::Value {
    let o = qemu(&["info", "--output=json", img], dir);
    ok(&o, &format!("qemu-img info {img}"));
    let mut v = json(&o);
    strip_allocation(&mut v);
    // The file names differ by their q-/s- prefix.
    if let Some(m) = v.as_object_mut() {
        m.remove("filename");
        m.remove("children");
    }
    v
}

fn map_json(dir: &Path, img: &str) -> serde_json::Value {
    let o = qemu(&["map", "--output=json", img], dir);
    ok(&o, &format!("qemu-img map {img}"));
    json(&o)
}

/// The map of `img` without host offsets, runs that then look alike
/// merged: what the guest sees of each layer, whatever the allocator's
/// choice of clusters.
fn guest_map(dir: &Path, img: &str) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = Vec::new();
    for mut e in map_json(dir, img).as_array().unwrap().clone() {
        e.as_object_mut().unwrap().remove("offset");
        if let Some(last) = out.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| last[k] == e[k]);
            if same {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = len.into();
                continue;
            }
        }
        out.push(e);
    }
    out
}

#[test]
fn convert_to_qcow2_matches_qemu_img() {
    let Some(s) = fixture_dir("convert-qcow2") else {
        return;
    };
    // A chain of three flattened, writes in order: the same layout.
    let (q, o) = convert_both(&s.0, &["convert", "-O", "qcow2", "top.qcow2"], "flat.qcow2");
    assert_clean_copy(&s.0, &o, "top.qcow2");
    assert_eq!(info_json(&s.0, &o), info_json(&s.0, &q));
    assert_eq!(map_json(&s.0, &o), map_json(&s.0, &q), "layout of {o}");
    // Round trip qcow2 -> raw -> qcow2 with sluice alone.
    sluice_ok(&s.0, &["convert", "-O", "raw", &o, "s-round.raw"], "to raw");
    sluice_ok(
        &s.0,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "s-round.raw",
            "s-round.qcow2",
        ],
        "back to qcow2",
    );
    assert_clean_copy(&s.0, "s-round.qcow2", "top.qcow2");
    assert_eq!(
        map_json(&s.0, "s-round.qcow2"),
        map_json(&s.0, &o),
        "a raw round trip keeps the allocation"
    );
    // Out of order, format options, a v2 target.
    for extra in [
        &["-W", "-m", "16"][..],
        &["-o", "cluster_size=4k,lazy_refcounts=on"],
        &["-o", "compat=0.10", "-m", "1"],
        &["-S", "0"],
    ] {
        let mut a = vec!["convert", "-O", "qcow2"];
        a.extend_from_slice(extra);
        a.push("top.qcow2");
        let (q2, o2) = convert_both(&s.0, &a, "var.qcow2");
        assert_clean_copy(&s.0, &o2, "top.qcow2");
        assert_eq!(info_json(&s.0, &o2), info_json(&s.0, &q2), "{extra:?}");
        for f in [q2, o2] {
            std::fs::remove_file(s.0.join(f)).unwrap();
        }
    }
    // Compressed: readable by QEMU, clean, and compressed.
    let (_, c) = convert_both(
        &s.0,
        &["convert", "-c", "-O", "qcow2", "top.qcow2"],
        "c.qcow2",
    );
    assert_clean_copy(&s.0, &c, "top.qcow2");
    // Compressed from a source with smaller clusters than the target's:
    // target clusters gather several source runs.
    qemu_ok(
        &s.0,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "small.qcow2",
            "8M",
        ],
    );
    qemu_io_qcow2(
        &s.0,
        "small.qcow2",
        &[
            "write -P 7 4k 8k",
            "write -P 8 68k 4k",
            "write -P 9 200k 100k",
        ],
    );
    sluice_ok(
        &s.0,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "small.qcow2",
            "s-small.qcow2",
        ],
        "convert -c",
    );
    assert_clean_copy(&s.0, "s-small.qcow2", "small.qcow2");
    let map = map_json(&s.0, &c);
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|e| e["compressed"] == true),
        "no compressed cluster in {map}"
    );
}

#[test]
fn convert_with_a_backing_file_keeps_it() {
    let Some(s) = fixture_dir("convert-backing") else {
        return;
    };
    // -B names the source's own backing file: only the top is copied.
    let (q, o) = convert_both(
        &s.0,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        "b.qcow2",
    );
    assert_clean_copy(&s.0, &o, "top.qcow2");
    let info = info_json(&s.0, &o);
    assert_eq!(info["backing-filename"], "mid.qcow2");
    assert_eq!(info, info_json(&s.0, &q));
    assert_eq!(map_json(&s.0, &o), map_json(&s.0, &q));
    // -B deeper in the chain: sluice keeps every layer above it, so the
    // result reads as the source. (qemu-img copies only the top layer
    // here and its result differs from the source; see the module doc.)
    sluice_ok(
        &s.0,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "s-deep.qcow2",
        ],
        "-B base",
    );
    assert_clean_copy(&s.0, "s-deep.qcow2", "top.qcow2");
    assert_eq!(
        info_json(&s.0, "s-deep.qcow2")["backing-filename"],
        "base.qcow2"
    );
    // A missing backing file: the same exit code; sluice checks it before
    // creating anything (qemu-img creates the target, then fails to open
    // it, and leaves it behind).
    for out in ["q-missing.qcow2", "s-missing.qcow2"] {
        let a = [
            "convert",
            "-O",
            "qcow2",
            "-B",
            "missing.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            out,
        ];
        let o = by(out, &a, &s.0);
        assert_eq!(o.status.code(), Some(1), "{a:?}");
        assert!(text(&o.stderr).contains("missing.qcow2"), "{a:?}");
    }
    assert!(!s.0.join("s-missing.qcow2").exists());
}

#[test]
fn check_matches_qemu_img() {
    let Some(s) = fixture_dir("check") else {
        return;
    };
    same_each(
        &s.0,
        &[
            &["check", "top.qcow2"][..],
            &["check", "--output=json", "base.qcow2"],
            &["check", "-q", "mid.qcow2"],
            &["check", "-f", "raw", "plain.raw"],
            &["check", "missing.qcow2"],
            &["check", "-r", "foo", "top.qcow2"],
            &["check", "--output=xml", "top.qcow2"],
        ],
    );
    // A leaked cluster: one more cluster at the end of the file, with a
    // refcount of 1 and nothing that uses it.
    let mut img = std::fs::read(s.0.join("base.qcow2")).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let reftable = be64(&img, 48) as usize;
    let block = be64(&img, reftable) as usize;
    let len = img.len().div_ceil(65536) * 65536 + 65536;
    img.resize(len, 0);
    let leaked = len / 65536 - 1;
    img[block + 2 * leaked..block + 2 * leaked + 2].copy_from_slice(&1u16.to_be_bytes());
    for f in ["leak.qcow2", "q-leak.qcow2", "s-leak.qcow2"] {
        std::fs::write(s.0.join(f), &img).unwrap();
    }
    let o = same(&s.0, &["check", "leak.qcow2"]);
    assert_eq!(o.status.code(), Some(3), "leaks exit with 3");
    same(&s.0, &["check", "--output=json", "leak.qcow2"]);
    let a = qemu(&["check", "-r", "leaks", "q-leak.qcow2"], &s.0);
    let b = sluice(&["check", "-r", "leaks", "s-leak.qcow2"], &s.0);
    assert_eq!(b.status.code(), a.status.code());
    assert_eq!(text(&b.stdout).replace("s-leak", "q-leak"), text(&a.stdout));
    assert_clean(&s.0, "s-leak.qcow2");
    // A corruption: the first data cluster's refcount set to 0.
    let mut img = std::fs::read(s.0.join("base.qcow2")).unwrap();
    let l1 = be64(&img, 40) as usize;
    let l2 = (be64(&img, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (be64(&img, l2) & 0x00ff_ffff_ffff_fe00) as usize / 65536;
    img[block + 2 * data..block + 2 * data + 2].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(s.0.join("corrupt.qcow2"), &img).unwrap();
    let o = same(&s.0, &["check", "corrupt.qcow2"]);
    assert_eq!(o.status.code(), Some(2), "corruptions exit with 2");
    same(&s.0, &["check", "--output=json", "corrupt.qcow2"]);
    same_on_copies(&s.0, "corrupt.qcow2", &["check", "-r", "all", "IMG"]);
    assert_same_files(
        &s.0,
        "q-leak.qcow2",
        "s-leak.qcow2",
        "repaired images differ",
    );
}

/// Runs `args` (with `IMG` for the image) on fresh copies of `src`, one
/// per tool: the same output and exit code, and images with the same
/// metadata that `qemu-img check` finds clean.
fn same_on_copies(dir: &Path, src: &str, args: &[&str]) {
    let mut results = Vec::new();
    for tool in ["q", "s"] {
        let img = format!("{tool}-{src}");
        std::fs::copy(dir.join(src), dir.join(&img)).unwrap();
        let a: Vec<&str> = args
            .iter()
            .map(|x| if *x == "IMG" { img.as_str() } else { *x })
            .collect();
        let o = by(tool, &a, dir);
        if src.ends_with(".qcow2") {
            assert_clean(dir, &img);
        }
        results.push((
            text(&o.stdout).replace(&img, "IMG"),
            text(&o.stderr).replace(&img, "IMG"),
            o.status.code(),
            info_json(dir, &img),
        ));
    }
    assert_eq!(results[1], results[0], "{args:?} on {src}");
}

#[test]
fn resize_matches_qemu_img() {
    let Some(s) = fixture_dir("resize") else {
        return;
    };
    for args in [
        &["resize", "IMG", "16M"][..],
        &["resize", "IMG", "+1M"],
        &["resize", "IMG", "-1M"],
        &["resize", "--shrink", "IMG", "-1M"],
        &["resize", "--shrink", "IMG", "7M"],
        &["resize", "-q", "IMG", "1G"],
        &["resize", "IMG", "-100G"],
        &["resize", "IMG", "1Z"],
        &["resize", "--preallocation=foo", "IMG", "20M"],
        &["resize", "IMG"],
    ] {
        same_on_copies(&s.0, "base.qcow2", args);
    }
    for args in [
        &["resize", "-f", "raw", "IMG", "8M"][..],
        &["resize", "--shrink", "-f", "raw", "IMG", "1M"],
        &["resize", "-f", "raw", "--preallocation=full", "IMG", "+1M"],
    ] {
        same_on_copies(&s.0, "plain.raw", args);
    }
    same_failure(&s.0, &["resize", "missing.qcow2", "1M"], "missing.qcow2");
}

#[test]
fn rebase_matches_qemu_img() {
    let Some(s) = fixture_dir("rebase") else {
        return;
    };
    for args in [
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "IMG"][..],
        &["rebase", "-b", "", "IMG"],
        &["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "IMG"],
        &["rebase", "-u", "-b", "", "IMG"],
        &["rebase", "-b", "missing.qcow2", "-F", "qcow2", "IMG"],
        &["rebase", "IMG"],
    ] {
        same_on_copies(&s.0, "top.qcow2", args);
    }
    // Progress: qemu-img's lines (the steps differ), ending at 100%.
    std::fs::copy(s.0.join("top.qcow2"), s.0.join("p.qcow2")).unwrap();
    let o = sluice(
        &["rebase", "-p", "-b", "base.qcow2", "-F", "qcow2", "p.qcow2"],
        &s.0,
    );
    ok(&o, "rebase -p");
    let out = text(&o.stdout);
    assert!(
        out.starts_with("    (0.00/100%)\r") && out.ends_with("    (100.00/100%)\r\n"),
        "{out:?}"
    );
    // Safe rebases keep the content.
    for args in [
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "s.qcow2"][..],
        &["rebase", "-b", "", "s.qcow2"],
    ] {
        std::fs::copy(s.0.join("top.qcow2"), s.0.join("s.qcow2")).unwrap();
        sluice_ok(&s.0, args, "rebase");
        assert_identical(&s.0, "s.qcow2", "top.qcow2");
    }
}

#[test]
fn commit_matches_qemu_img() {
    let Some(s) = fixture_dir("commit") else {
        return;
    };
    let reference = qemu(&["convert", "-O", "raw", "top.qcow2", "ref.raw"], &s.0);
    ok(&reference, "reference");
    for args in [&[][..], &["-d"], &["-q"], &["-b", "base.qcow2"]] {
        let mut outcome = Vec::new();
        for tool in ["q", "s"] {
            // A fresh chain per run (commit writes into the backing files).
            let d = chain_copy(&s.0, tool);
            let mut a = vec!["commit"];
            a.extend_from_slice(args);
            a.push("top.qcow2");
            let o = by(tool, &a, &d);
            let mut images = Vec::new();
            for f in CHAIN {
                assert_clean(&d, f);
                let same_as_ref = qemu(&["compare", f, "../ref.raw"], &d).status.code();
                images.push((same_as_ref, info_json(&d, f), guest_map(&d, f)));
            }
            outcome.push((text(&o.stdout), text(&o.stderr), o.status.code(), images));
        }
        assert_eq!(outcome[1], outcome[0], "commit {args:?}");
    }
    same_failure(&s.0, &["commit", "base.qcow2"], "");
    same(&s.0, &["commit", "-b", "missing.qcow2", "top.qcow2"]);
}

#[test]
fn measure_matches_qemu_img() {
    let Some(s) = fixture_dir("measure") else {
        return;
    };
    same_each(
        &s.0,
        &[
            &["measure", "-O", "qcow2", "top.qcow2"][..],
            &["measure", "--output=json", "-O", "qcow2", "base.qcow2"],
            &["measure", "-O", "raw", "top.qcow2"],
            &["measure", "top.qcow2"],
            &["measure", "--size", "1G", "-O", "qcow2"],
            &[
                "measure",
                "--size",
                "10G",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k,refcount_bits=1",
            ],
            &[
                "measure",
                "--size",
                "3T",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=2M,extended_l2=on",
            ],
            &[
                "measure",
                "-O",
                "qcow2",
                "-o",
                "preallocation=full",
                "mid.qcow2",
            ],
            &[
                "measure",
                "--output=json",
                "-O",
                "qcow2",
                "-f",
                "raw",
                "plain.raw",
            ],
            &["measure", "-O", "qcow2"],
            &["measure", "-O", "qcow2", "--size", "1G", "top.qcow2"],
            &["measure", "--size", "1Z", "-O", "qcow2"],
            &["measure", "-O", "qcow2", "-o", "foo=1", "top.qcow2"],
        ],
    );
}

/// An image larger than one request may be (2 GiB): walks over it go in
/// pieces, and data on both sides of the 2 GiB line is found.
#[test]
fn images_larger_than_a_request() {
    let Some(s) = scratch("large") else {
        return;
    };
    qemu_ok(&s.0, &["create", "-q", "-f", "qcow2", "big.qcow2", "10G"]);
    qemu_io_qcow2(
        &s.0,
        "big.qcow2",
        &["write -P 5 2047M 2M", "write -P 6 9G 64k"],
    );
    same_each(
        &s.0,
        &[
            &["map", "--output=json", "big.qcow2"][..],
            &["map", "big.qcow2"],
            &["compare", "big.qcow2", "big.qcow2"],
            &["measure", "-O", "qcow2", "big.qcow2"],
            &["info", "big.qcow2"],
        ],
    );
    for fmt in ["raw", "qcow2"] {
        let out = format!("s-big.{fmt}");
        sluice_ok(&s.0, &["convert", "-O", fmt, "big.qcow2", &out], "convert");
        assert_identical(&s.0, &out, "big.qcow2");
    }
    assert_clean(&s.0, "s-big.qcow2");
}

/// `--target-image-opts`: the target named by its options (`-n` only),
/// written as qemu-img writes it.
#[test]
fn convert_into_target_image_opts_like_qemu_img() {
    let Some(s) = fixture_dir("convert-tio") else {
        return;
    };
    let q = |a: &[&str]| ok(&qemu(a, &s.0), &format!("qemu-img {a:?}"));
    // A qcow2 target: the same content and layout as qemu-img's.
    for t in ["q-t.qcow2", "s-t.qcow2"] {
        q(&["create", "-q", "-f", "qcow2", t, "8M"]);
    }
    for (tool, t) in [("q", "q-t.qcow2"), ("s", "s-t.qcow2")] {
        let opts = format!("driver=qcow2,file.driver=file,file.filename={t}");
        let a = ["convert", "-n", "--target-image-opts", "top.qcow2", &opts];
        let o = by(tool, &a, &s.0);
        ok(&o, &format!("{tool}: {a:?}"));
        assert_eq!(text(&o.stdout), "", "{tool}: stdout");
        assert_eq!(text(&o.stderr), "", "{tool}: stderr");
    }
    assert_clean_copy(&s.0, "s-t.qcow2", "top.qcow2");
    assert_identical(&s.0, "s-t.qcow2", "q-t.qcow2");
    assert_eq!(info_json(&s.0, "s-t.qcow2"), info_json(&s.0, "q-t.qcow2"));
    assert_eq!(map_json(&s.0, "s-t.qcow2"), map_json(&s.0, "q-t.qcow2"));
    // A raw target full of 0xff, `file.driver` implied: the source's zero
    // ranges are written.
    for t in ["q-t.raw", "s-t.raw"] {
        std::fs::write(s.0.join(t), vec![0xffu8; 8 * MIB as usize]).unwrap();
    }
    for (tool, t) in [("q", "q-t.raw"), ("s", "s-t.raw")] {
        let opts = format!("driver=raw,file.filename={t}");
        let a = ["convert", "-n", "--target-image-opts", "top.qcow2", &opts];
        let o = by(tool, &a, &s.0);
        ok(&o, &format!("{tool}: {a:?}"));
    }
    assert_same_files(&s.0, "s-t.raw", "q-t.raw", "raw targets differ");
    assert_identical(&s.0, "s-t.raw", "top.qcow2");
    // --target-is-zero on a zeroed target opened by its options.
    std::fs::write(s.0.join("z.raw"), vec![0u8; 8 * MIB as usize]).unwrap();
    sluice_ok(
        &s.0,
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "--target-is-zero",
            "-W",
            "top.qcow2",
            "driver=raw,file.filename=z.raw",
        ],
        "--target-is-zero",
    );
    assert_identical(&s.0, "z.raw", "top.qcow2");
    // No driver: the format is probed, and a probed raw target gets
    // qemu-img's warning.
    for t in ["q-p.qcow2", "s-p.qcow2"] {
        q(&["create", "-q", "-f", "qcow2", t, "8M"]);
    }
    for t in ["q-p.raw", "s-p.raw"] {
        std::fs::write(s.0.join(t), vec![0xffu8; 8 * MIB as usize]).unwrap();
    }
    for ext in ["qcow2", "raw"] {
        let mut outcome = Vec::new();
        for tool in ["q", "s"] {
            let t = format!("{tool}-p.{ext}");
            let opts = format!("file.filename={t}");
            let a = ["convert", "-n", "--target-image-opts", "top.qcow2", &opts];
            let o = by(tool, &a, &s.0);
            outcome.push((
                text(&o.stdout),
                text(&o.stderr).replace(&t, "T"),
                o.status.code(),
            ));
        }
        assert_eq!(outcome[1], outcome[0], "probed {ext} target");
        assert_eq!(outcome[0].2, Some(0));
        assert_identical(&s.0, &format!("s-p.{ext}"), "top.qcow2");
    }
    assert!(
        text(&qemu(&["info", "s-p.raw"], &s.0).stdout).contains("file format: raw"),
        "the raw target stays raw"
    );
}

/// What qemu-img refuses around the target: the same message and exit
/// code, the target left alone.
#[test]
fn convert_target_refusals_match_qemu_img() {
    let Some(s) = fixture_dir("convert-tio-fail") else {
        return;
    };
    qemu_ok(&s.0, &["create", "-q", "-f", "qcow2", "t.qcow2", "8M"]);
    std::fs::write(s.0.join("small.raw"), vec![0u8; 4096]).unwrap();
    let before = std::fs::read(s.0.join("t.qcow2")).unwrap();
    let t = "driver=qcow2,file.filename=t.qcow2";
    for args in [
        // Only with -n; checked before the file count.
        &["convert", "--target-image-opts", "top.qcow2", t][..],
        &["convert", "--target-image-opts", "top.qcow2"],
        &[
            "convert",
            "--target-image-opts",
            "-O",
            "qcow2",
            "top.qcow2",
            t,
        ],
        &[
            "convert",
            "--target-image-opts",
            "--target-is-zero",
            "top.qcow2",
            t,
        ],
        &["convert", "-n", "--target-image-opts", "top.qcow2"],
        // -O names a format for what is already options.
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "-O",
            "qcow2",
            "top.qcow2",
            t,
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "-O",
            "raw",
            "top.qcow2",
            t,
        ],
        // A missing source is reported first.
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "-O",
            "qcow2",
            "missing.qcow2",
            t,
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "-o",
            "cluster_size=4k",
            "top.qcow2",
            t,
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "-c",
            "top.qcow2",
            "driver=raw,file.filename=small.raw",
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "top.qcow2",
            "driver=raw,file.filename=small.raw",
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "top.qcow2",
            "driver=qcow2,file.filename=missing.qcow2",
        ],
        // The source side's own exclusion, and -n with a format the
        // target is opened with.
        &[
            "convert",
            "--image-opts",
            "-f",
            "qcow2",
            "driver=qcow2,file.filename=top.qcow2",
            "out.img",
        ],
        &["convert", "-n", "-O", "foo", "top.qcow2", "t.qcow2"],
        &["convert", "-n", "-O", "raw", "-c", "top.qcow2", "small.raw"],
        // qemu-img reports this one and exits with 0, copying nothing.
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-B",
            "base.qcow2",
            "-O",
            "qcow2",
            "top.qcow2",
            "t.qcow2",
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "--target-is-zero",
            "-B",
            "base.qcow2",
            "top.qcow2",
            t,
        ],
    ] {
        same(&s.0, args);
        assert!(!s.0.join("out.img").exists(), "{args:?} left a target");
        assert_eq!(
            std::fs::read(s.0.join("t.qcow2")).unwrap(),
            before,
            "{args:?} wrote the target"
        );
    }
    let o = same(
        &s.0,
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-B",
            "base.qcow2",
            "-O",
            "qcow2",
            "top.qcow2",
            "t.qcow2",
        ],
    );
    assert_eq!(o.status.code(), Some(0));
}

/// `-r RATE`: qemu-img's size syntax and messages; a limited copy gives
/// the same result. (How fast it runs is the limiter's unit tests' part,
/// on a virtual clock: these tests never time anything.)
#[test]
fn rate_limits_parse_like_qemu_img() {
    let Some(s) = fixture_dir("rate") else {
        return;
    };
    for r in [
        "-1",
        "-0",
        "-1k",
        "abc",
        "",
        "1Z",
        "10x",
        "1e3",
        "8E",
        "16E",
        "99999999999999999999",
        "99999999999999999999k",
        "0x",
    ] {
        same(
            &s.0,
            &["convert", "-r", r, "-O", "raw", "top.qcow2", "out.img"],
        );
        assert!(!s.0.join("out.img").exists(), "-r {r:?} left a target");
        same(&s.0, &["commit", "-r", r, "top.qcow2"]);
    }
    same(&s.0, &["commit", "-r", "abc"]);
    // Valid rates (0: no limit), fast enough for a test.
    for r in ["0", "64M", "0x8000000", "1g"] {
        let (q, o) = convert_both(
            &s.0,
            &["convert", "-r", r, "-O", "qcow2", "top.qcow2"],
            "r.qcow2",
        );
        assert_clean_copy(&s.0, &o, "top.qcow2");
        assert_eq!(map_json(&s.0, &o), map_json(&s.0, &q), "-r {r}");
        for f in [q, o] {
            std::fs::remove_file(s.0.join(f)).unwrap();
        }
    }
    // commit -r: the same images as qemu-img's.
    let mut outcome = Vec::new();
    for tool in ["q", "s"] {
        let d = chain_copy(&s.0, tool);
        let a = ["commit", "-r", "64M", "top.qcow2"];
        let o = by(tool, &a, &d);
        let mut images = Vec::new();
        for f in CHAIN {
            assert_clean(&d, f);
            images.push((info_json(&d, f), guest_map(&d, f)));
        }
        outcome.push((text(&o.stdout), text(&o.stderr), o.status.code(), images));
    }
    assert_eq!(outcome[1], outcome[0], "commit -r 64M");
}
