//! `sluice img amend` beside `qemu-img amend`: each amend runs with both
//! tools on copies of the same images (same file names, in two
//! directories) and must agree: exit code, stdout and stderr; after a
//! success, `qemu-img info --output=json` reports the same header
//! (format-specific fields, virtual size, backing file), `qemu-img
//! compare` finds the images equal and `qemu-img check` finds sluice's
//! clean.

mod common;

use common::{have, sluice, temp_dir, TempDir};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `prog args` in `dir`.
fn run_in(dir: &Path, prog: &Path, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", prog.display()))
}

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run_in(dir, Path::new("qemu-img"), args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Two directories with the same images: `q` for qemu-img, `s` for
/// sluice.
struct Pair {
    _tmp: TempDir,
    q: std::path::PathBuf,
    s: std::path::PathBuf,
}

impl Pair {
    /// Runs `setup` (shell-free: a list of commands) in a fresh directory,
    /// then copies it twice.
    fn new(tag: &str, setup: &[&[&str]]) -> Pair {
        let tmp = temp_dir(&format!("amend-{tag}"));
        let src = tmp.path("src");
        std::fs::create_dir_all(&src).unwrap();
        for cmd in setup {
            let o = run_in(&src, Path::new(cmd[0]), &cmd[1..]);
            // qemu-io's abort is meant to fail.
            if !cmd.contains(&"abort") {
                assert!(o.status.success(), "{cmd:?}: {}", text(&o.stderr));
            }
        }
        let q = tmp.path("q");
        let s = tmp.path("s");
        for d in [&q, &s] {
            std::fs::create_dir_all(d).unwrap();
            for e in std::fs::read_dir(&src).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
            }
        }
        Pair { _tmp: tmp, q, s }
    }

    /// `amend ARGS` with both tools; (qemu-img's output, sluice's).
    fn amend(&self, args: &[&str]) -> (Output, Output) {
        let mut a = vec!["amend"];
        a.extend_from_slice(args);
        let q = qemu_img(&self.q, &a);
        let mut b = vec!["img", "amend"];
        b.extend_from_slice(args);
        let s = run_in(&self.s, sluice(), &b);
        (q, s)
    }

    /// Both tools fail (or succeed) alike: exit code, stdout, stderr.
    fn same(&self, args: &[&str]) -> bool {
        let (q, s) = self.amend(args);
        assert_eq!(
            (q.status.code(), text(&q.stdout), text(&q.stderr)),
            (s.status.code(), text(&s.stdout), text(&s.stderr)),
            "amend {args:?}: qemu-img (left) and sluice (right) differ"
        );
        q.status.success()
    }

    /// `amend ARGS` succeeds with both and the results agree.
    fn same_result(&self, args: &[&str], img: &str) {
        assert!(self.same(args), "amend {args:?} failed with both");
        self.assert_equal(img);
    }

    /// `amend ARGS` fails with both alike and leaves sluice's copy as
    /// it was.
    fn same_failure(&self, args: &[&str], img: &str) {
        let before = std::fs::read(self.s.join(img)).ok();
        assert!(!self.same(args), "amend {args:?} succeeded with both");
        assert_eq!(
            std::fs::read(self.s.join(img)).ok(),
            before,
            "amend {args:?}: sluice wrote to the image it refused to amend"
        );
    }

    /// The two copies of `img` report the same header, hold the same
    /// data, and sluice's is clean.
    fn assert_equal(&self, img: &str) {
        let (q, s) = (info(&self.q, img), info(&self.s, img));
        for key in [
            "format-specific",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "backing-filename-format",
            "dirty-flag",
        ] {
            assert_eq!(q[key], s[key], "{img}: '{key}' differs");
        }
        let o = Command::new("qemu-img")
            .args(["compare", "-q"])
            .arg(self.q.join(img))
            .arg(self.s.join(img))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{img}: contents differ");
        let o = qemu_img(&self.s, &["check", img]);
        assert!(
            o.status.success() && text(&o.stdout).contains("No errors were found"),
            "{img}: qemu-img check: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
}

fn info(dir: &Path, img: &str) -> Value {
    let o = qemu_img(dir, &["info", "--output=json", img]);
    assert!(o.status.success(), "info {img}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn ready() -> bool {
    have("qemu-img") && have("qemu-io")
}

const CREATE: &str = "qemu-img";
const IO: &str = "qemu-io";

#[test]
fn version_changes_match_qemu_img() {
    if !ready() {
        return;
    }
    let p = Pair::new(
        "versions",
        &[
            &[CREATE, "create", "-q", "-f", "qcow2", "v3.qcow2", "64M"],
            &[
                IO,
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 128k",
                "-c",
                "write -z 128k 128k",
                "-c",
                "write -P 2 1M 64k",
                "-c",
                "write -z 1M 64k",
                "v3.qcow2",
            ],
            &[
                CREATE,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "64M",
            ],
            &[IO, "-f", "qcow2", "-c", "write -P 3 0 1M", "v2.qcow2"],
        ],
    );
    p.same_result(&["-o", "compat=0.10", "v3.qcow2"], "v3.qcow2");
    assert_eq!(
        info(&p.s, "v3.qcow2")["format-specific"]["data"]["compat"],
        "0.10"
    );
    p.same_result(&["-o", "compat=1.1", "v3.qcow2"], "v3.qcow2");
    p.same_result(&["-f", "qcow2", "-o", "compat=v3", "v2.qcow2"], "v2.qcow2");
    assert_eq!(
        info(&p.s, "v2.qcow2")["format-specific"]["data"]["compat"],
        "1.1"
    );
    // Already there: the header is rewritten, nothing else changes.
    p.same_result(&["-q", "-o", "compat=1.1", "v2.qcow2"], "v2.qcow2");
    p.same_result(&["-p", "-o", "compat=v2", "v2.qcow2"], "v2.qcow2");
}

#[test]
fn downgrade_over_a_backing_file_matches_qemu_img() {
    if !ready() {
        return;
    }
    let p = Pair::new(
        "backing",
        &[
            &[CREATE, "create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
            &[IO, "-f", "qcow2", "-c", "write -P 5 0 4M", "base.qcow2"],
            &[
                CREATE,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            &[
                IO,
                "-f",
                "qcow2",
                "-c",
                "write -z 0 128k",
                "-c",
                "write -P 3 1M 64k",
                "-c",
                "write -z 1M 64k",
                "top.qcow2",
            ],
        ],
    );
    p.same_result(&["-o", "compat=0.10", "top.qcow2"], "top.qcow2");
    // The backing link may be named again, unchanged.
    p.same_result(
        &[
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            "top.qcow2",
        ],
        "top.qcow2",
    );
    p.same_failure(&["-o", "backing_file=base.qcow2", "top.qcow2"], "top.qcow2");
    p.same_failure(
        &["-o", "backing_file=other.qcow2", "top.qcow2"],
        "top.qcow2",
    );
    p.same_result(&["-o", "compat=1.1", "top.qcow2"], "top.qcow2");
}

#[test]
fn lazy_refcounts_and_size_match_qemu_img() {
    if !ready() {
        return;
    }
    let p = Pair::new(
        "lazy",
        &[
            &[CREATE, "create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
            &[IO, "-f", "qcow2", "-c", "write -P 9 1M 1M", "a.qcow2"],
            &[
                CREATE,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=on",
                "dirty.qcow2",
                "64M",
            ],
            &[
                IO,
                "-f",
                "qcow2",
                "-c",
                "write -P 4 0 1M",
                "-c",
                "write -z 1M 1M",
                "-c",
                "abort",
                "dirty.qcow2",
            ],
        ],
    );
    p.same_result(&["-o", "lazy_refcounts=on", "a.qcow2"], "a.qcow2");
    assert_eq!(
        info(&p.s, "a.qcow2")["format-specific"]["data"]["lazy-refcounts"],
        true
    );
    p.same_result(
        &["-o", "lazy_refcounts=off,size=128M", "a.qcow2"],
        "a.qcow2",
    );
    p.same_result(&["-o", "size=32M", "a.qcow2"], "a.qcow2");
    p.same_result(
        &["-o", "compat=0.10", "-o", "size=48M", "a.qcow2"],
        "a.qcow2",
    );
    p.same_failure(&["-o", "lazy_refcounts=on", "a.qcow2"], "a.qcow2");
    // A dirty image: QEMU repairs it as it opens it (and says so on
    // stderr, which sluice does not); the results must agree.
    let (q, s) = p.amend(&["-o", "lazy_refcounts=off", "dirty.qcow2"]);
    assert!(
        q.status.success() && s.status.success(),
        "{}",
        text(&s.stderr)
    );
    p.assert_equal("dirty.qcow2");
    assert_eq!(info(&p.s, "dirty.qcow2")["dirty-flag"], false);
}

#[test]
fn refcount_width_changes_match_qemu_img() {
    if !ready() {
        return;
    }
    let p = Pair::new(
        "refcount",
        &[
            &[CREATE, "create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
            &[
                IO,
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 3M",
                "-c",
                "write -z 3M 1M",
                "a.qcow2",
            ],
            &[CREATE, "snapshot", "-c", "s1", "a.qcow2"],
            &[IO, "-f", "qcow2", "-c", "write -P 2 0 1M", "a.qcow2"],
            &[
                CREATE,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=8",
                "r8.qcow2",
                "64M",
            ],
            &[IO, "-f", "qcow2", "-c", "write -P 3 0 2M", "r8.qcow2"],
        ],
    );
    for bits in ["8", "64", "2", "16"] {
        p.same_result(
            &["-o", &format!("refcount_bits={bits}"), "a.qcow2"],
            "a.qcow2",
        );
        assert_eq!(
            info(&p.s, "a.qcow2")["format-specific"]["data"]["refcount-bits"],
            bits.parse::<u64>().unwrap()
        );
    }
    // A refcount of 2 (shared with the snapshot) needs two bits.
    p.same_failure(&["-o", "refcount_bits=1", "a.qcow2"], "a.qcow2");
    p.same_result(
        &["-o", "compat=0.10,refcount_bits=16", "r8.qcow2"],
        "r8.qcow2",
    );
}

#[test]
fn refusals_match_qemu_img() {
    if !ready() {
        return;
    }
    let p = Pair::new(
        "refusals",
        &[
            &[CREATE, "create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
            &[
                CREATE,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on",
                "x.qcow2",
                "64M",
            ],
            &[
                CREATE,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=8",
                "r8.qcow2",
                "64M",
            ],
            &[
                CREATE,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=d.raw",
                "df.qcow2",
                "64M",
            ],
            &[
                CREATE,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compression_type=zstd",
                "z.qcow2",
                "64M",
            ],
            &[IO, "-f", "qcow2", "-c", "write -c -P 7 0 64k", "z.qcow2"],
            &[
                CREATE,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "64M",
            ],
            &[CREATE, "create", "-q", "-f", "raw", "r.raw", "1M"],
        ],
    );
    // Downgrades QEMU refuses.
    p.same_failure(&["-o", "compat=0.10", "x.qcow2"], "x.qcow2");
    p.same_failure(&["-o", "compat=0.10", "r8.qcow2"], "r8.qcow2");
    p.same_failure(&["-o", "compat=0.10", "df.qcow2"], "df.qcow2");
    p.same_failure(&["-o", "compat=0.10", "z.qcow2"], "z.qcow2");
    p.same_failure(&["-o", "refcount_bits=8,compat=0.10", "a.qcow2"], "a.qcow2");
    p.same_failure(&["-o", "lazy_refcounts=on", "v2.qcow2"], "v2.qcow2");
    // Options amend cannot change, and bad values.
    for o in [
        "cluster_size=4k",
        "extended_l2=on",
        "preallocation=full",
        "compression_type=zstd",
        "encrypt.format=luks",
        "bogus=1",
        "compat=2",
        "compat",
        "size=abc",
        "size=1000",
        "refcount_bits=3",
        "refcount_bits=abc",
        "lazy_refcounts=maybe",
        "data_file=x",
        "data_file_raw=on",
        "encrypt.state=active",
        "compat=1.1,",
    ] {
        p.same_failure(&["-o", o, "a.qcow2"], "a.qcow2");
    }
    // The command line.
    p.same_failure(&["a.qcow2"], "a.qcow2");
    p.same_failure(&["-o", "compat=1.1"], "a.qcow2");
    p.same_failure(&["-o", "compat=1.1", "a.qcow2", "extra"], "a.qcow2");
    p.same_failure(&["-x", "-o", "compat=1.1", "a.qcow2"], "a.qcow2");
    p.same_failure(&["-t", "bogus", "-o", "compat=1.1", "a.qcow2"], "a.qcow2");
    p.same_failure(
        &["--image-opts", "-f", "qcow2", "-o", "compat=1.1", "a.qcow2"],
        "a.qcow2",
    );
    p.same_failure(&["-o", "compat=1.1", "missing.qcow2"], "a.qcow2");
    assert!(!p.s.join("missing.qcow2").exists());
    // Formats that cannot amend.
    p.same_failure(&["-o", "compat=1.1", "r.raw"], "r.raw");
    p.same_failure(&["-f", "raw", "-o", "size=2M", "r.raw"], "r.raw");
    p.same_failure(&["-f", "raw", "-o", "help", "r.raw"], "r.raw");
    p.same_failure(&["-f", "foo", "-o", "help"], "r.raw");
    p.same_failure(&["-o", "help", "r.raw"], "r.raw");
    p.same_failure(&["-f", "raw", "-o", "compat=1.1", "a.qcow2"], "a.qcow2");
}

#[test]
fn option_help_matches_qemu_img() {
    if !ready() {
        return;
    }
    let p = Pair::new(
        "help",
        &[&[CREATE, "create", "-q", "-f", "qcow2", "a.qcow2", "64M"]],
    );
    let before = std::fs::read(p.s.join("a.qcow2")).unwrap();
    assert!(p.same(&["-o", "help", "a.qcow2"]));
    assert!(p.same(&["-f", "qcow2", "-o", "?"]));
    assert!(p.same(&["-o", "compat=1.1,help", "a.qcow2"]));
    let (_, s) = p.amend(&["-f", "qcow2", "-o", "help"]);
    let out = text(&s.stdout);
    assert!(out.starts_with("Amend options for 'qcow2':\n"), "{out}");
    assert!(out.contains("  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n"));
    assert!(!out.contains("cluster_size"), "{out}");
    // Help changes nothing.
    assert_eq!(std::fs::read(p.s.join("a.qcow2")).unwrap(), before);
}
