//! `sluice img amend` beside `qemu-img amend`: each amend runs with both
//! tools on copies of the same images (same file names, in two
//! directories) and must agree: exit code, stdout and stderr; after a
//! success, `qemu-img info --output=json` reports the same header
//! (format-specific fields, virtual size, backing file), `qemu-img
//! compare` finds the images equal and `qemu-img check` finds sluice's
//! clean.

mod common;

use common::{
    assert_clean, have, img_create, qemu_info, qemu_io, same_outcome, sluice, temp_dir, text, Line,
    TempDir,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `prog args` in `dir`.
fn run_in(dir: &Path, prog: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let prog = prog.as_ref();
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog:?}: {e}"))
}

/// `qemu-img create -q -f qcow2 [-o OPTS] IMG 64M`.
fn create(opts: &str, img: &str) -> Line {
    img_create("qcow2", opts, img, "64M")
}

/// A command line of words without spaces of their own.
fn words(cmd: &str) -> Line {
    cmd.split(' ').map(str::to_string).collect()
}

/// Two directories with the same images: `q` for qemu-img, `s` for
/// sluice.
struct Pair {
    _tmp: TempDir,
    q: PathBuf,
    s: PathBuf,
}

impl Pair {
    /// Runs `setup` (shell-free: a list of command lines) in a fresh
    /// directory, then copies it twice; `None` without qemu-img and
    /// qemu-io.
    fn new(tag: &str, setup: &[Line]) -> Option<Pair> {
        if !(have("qemu-img") && have("qemu-io")) {
            return None;
        }
        let tmp = temp_dir(&format!("amend-{tag}"));
        let src = tmp.path("src");
        std::fs::create_dir_all(&src).unwrap();
        for cmd in setup {
            let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
            let o = run_in(&src, &cmd[0], &args);
            // qemu-io's abort is meant to fail.
            if !cmd.iter().any(|a| a == "abort") {
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
        Some(Pair { _tmp: tmp, q, s })
    }

    /// `amend ARGS` with both tools; (qemu-img's output, sluice's).
    fn amend(&self, args: &[&str]) -> (Output, Output) {
        let mut a = vec!["amend"];
        a.extend_from_slice(args);
        let q = run_in(&self.q, "qemu-img", &a);
        let mut b = vec!["img", "amend"];
        b.extend_from_slice(args);
        let s = run_in(&self.s, sluice(), &b);
        (q, s)
    }

    /// Both tools fail (or succeed) alike: exit code, stdout, stderr.
    fn same(&self, args: &[&str]) -> bool {
        let (q, s) = self.amend(args);
        same_outcome(&q, &s, &format!("amend {args:?}"));
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
        let (q, s) = (qemu_info(self.q.join(img), &[]), self.info(img));
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
        assert_clean(self.s.join(img));
    }

    /// `qemu-img info` of sluice's copy of `img`.
    fn info(&self, img: &str) -> Value {
        qemu_info(self.s.join(img), &[])
    }

    /// The format-specific data of sluice's copy of `img`.
    fn specific(&self, img: &str) -> Value {
        self.info(img)["format-specific"]["data"].clone()
    }
}

#[test]
fn version_changes_match_qemu_img() {
    let Some(p) = Pair::new(
        "versions",
        &[
            create("", "v3.qcow2"),
            qemu_io(
                "v3.qcow2",
                &[
                    "write -P 1 0 128k",
                    "write -z 128k 128k",
                    "write -P 2 1M 64k",
                    "write -z 1M 64k",
                ],
            ),
            create("compat=0.10", "v2.qcow2"),
            qemu_io("v2.qcow2", &["write -P 3 0 1M"]),
        ],
    ) else {
        return;
    };
    p.same_result(&["-o", "compat=0.10", "v3.qcow2"], "v3.qcow2");
    assert_eq!(p.specific("v3.qcow2")["compat"], "0.10");
    p.same_result(&["-o", "compat=1.1", "v3.qcow2"], "v3.qcow2");
    p.same_result(&["-f", "qcow2", "-o", "compat=v3", "v2.qcow2"], "v2.qcow2");
    assert_eq!(p.specific("v2.qcow2")["compat"], "1.1");
    // Already there: the header is rewritten, nothing else changes.
    p.same_result(&["-q", "-o", "compat=1.1", "v2.qcow2"], "v2.qcow2");
    p.same_result(&["-p", "-o", "compat=v2", "v2.qcow2"], "v2.qcow2");
}

#[test]
fn downgrade_over_a_backing_file_matches_qemu_img() {
    let Some(p) = Pair::new(
        "backing",
        &[
            create("", "base.qcow2"),
            qemu_io("base.qcow2", &["write -P 5 0 4M"]),
            words("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2"),
            qemu_io(
                "top.qcow2",
                &["write -z 0 128k", "write -P 3 1M 64k", "write -z 1M 64k"],
            ),
        ],
    ) else {
        return;
    };
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
    for o in ["backing_file=base.qcow2", "backing_file=other.qcow2"] {
        p.same_failure(&["-o", o, "top.qcow2"], "top.qcow2");
    }
    p.same_result(&["-o", "compat=1.1", "top.qcow2"], "top.qcow2");
}

#[test]
fn lazy_refcounts_and_size_match_qemu_img() {
    let Some(p) = Pair::new(
        "lazy",
        &[
            create("", "a.qcow2"),
            qemu_io("a.qcow2", &["write -P 9 1M 1M"]),
            create("lazy_refcounts=on", "dirty.qcow2"),
            qemu_io(
                "dirty.qcow2",
                &["write -P 4 0 1M", "write -z 1M 1M", "abort"],
            ),
        ],
    ) else {
        return;
    };
    p.same_result(&["-o", "lazy_refcounts=on", "a.qcow2"], "a.qcow2");
    assert_eq!(p.specific("a.qcow2")["lazy-refcounts"], true);
    for args in [
        &["-o", "lazy_refcounts=off,size=128M", "a.qcow2"][..],
        &["-o", "size=32M", "a.qcow2"],
        &["-o", "compat=0.10", "-o", "size=48M", "a.qcow2"],
    ] {
        p.same_result(args, "a.qcow2");
    }
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
    assert_eq!(p.info("dirty.qcow2")["dirty-flag"], false);
}

#[test]
fn refcount_width_changes_match_qemu_img() {
    let Some(p) = Pair::new(
        "refcount",
        &[
            create("", "a.qcow2"),
            qemu_io("a.qcow2", &["write -P 1 0 3M", "write -z 3M 1M"]),
            words("qemu-img snapshot -c s1 a.qcow2"),
            qemu_io("a.qcow2", &["write -P 2 0 1M"]),
            create("refcount_bits=8", "r8.qcow2"),
            qemu_io("r8.qcow2", &["write -P 3 0 2M"]),
        ],
    ) else {
        return;
    };
    for bits in ["8", "64", "2", "16"] {
        p.same_result(
            &["-o", &format!("refcount_bits={bits}"), "a.qcow2"],
            "a.qcow2",
        );
        assert_eq!(
            p.specific("a.qcow2")["refcount-bits"],
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
    let Some(p) = Pair::new(
        "refusals",
        &[
            create("", "a.qcow2"),
            create("extended_l2=on", "x.qcow2"),
            create("refcount_bits=8", "r8.qcow2"),
            create("data_file=d.raw", "df.qcow2"),
            create("compression_type=zstd", "z.qcow2"),
            qemu_io("z.qcow2", &["write -c -P 7 0 64k"]),
            create("compat=0.10", "v2.qcow2"),
            img_create("raw", "", "r.raw", "1M"),
        ],
    ) else {
        return;
    };
    // Downgrades QEMU refuses.
    for img in ["x.qcow2", "r8.qcow2", "df.qcow2", "z.qcow2"] {
        p.same_failure(&["-o", "compat=0.10", img], img);
    }
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
    // The command line, then formats that cannot amend: (arguments, the
    // image that must stay as it was).
    let cases: &[(&[&str], &str)] = &[
        (&["a.qcow2"], "a.qcow2"),
        (&["-o", "compat=1.1"], "a.qcow2"),
        (&["-o", "compat=1.1", "a.qcow2", "extra"], "a.qcow2"),
        (&["-x", "-o", "compat=1.1", "a.qcow2"], "a.qcow2"),
        (&["-t", "bogus", "-o", "compat=1.1", "a.qcow2"], "a.qcow2"),
        (
            &["--image-opts", "-f", "qcow2", "-o", "compat=1.1", "a.qcow2"],
            "a.qcow2",
        ),
        (&["-o", "compat=1.1", "missing.qcow2"], "a.qcow2"),
        (&["-o", "compat=1.1", "r.raw"], "r.raw"),
        (&["-f", "raw", "-o", "size=2M", "r.raw"], "r.raw"),
        (&["-f", "raw", "-o", "help", "r.raw"], "r.raw"),
        (&["-f", "foo", "-o", "help"], "r.raw"),
        (&["-o", "help", "r.raw"], "r.raw"),
        (&["-f", "raw", "-o", "compat=1.1", "a.qcow2"], "a.qcow2"),
    ];
    for (args, img) in cases {
        p.same_failure(args, img);
        assert!(!p.s.join("missing.qcow2").exists(), "{args:?}");
    }
}

#[test]
fn option_help_matches_qemu_img() {
    let Some(p) = Pair::new("help", &[create("", "a.qcow2")]) else {
        return;
    };
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
