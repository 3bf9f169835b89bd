//! Bad input to every `sluice img` subcommand, next to qemu-img's answer:
//! a corrupt image (an L1 table offset that is not cluster aligned), a
//! file cut inside its header, a file cut after its metadata (qemu-img
//! reads past the end as zeroes and carries on; sluice refuses the image,
//! with the cause — the one place the exit codes differ, on purpose), an
//! image whose backing file
//! does not exist, and an unknown format. For each, run on separate
//! copies: the exit code equals qemu-img's; a failure is one line on
//! stderr naming the image and the cause; a failed command leaves the
//! image byte for byte as it was and creates no target.

mod common;

use common::{have, ok_line, qemu_io, run, sluice, temp_dir, text, TempDir};

/// The subcommands, with `IMG` for the bad image (run on a copy) and
/// `OUT` for a target that must not appear when the command fails.
const COMMANDS: &[&[&str]] = &[
    &["info", "IMG"],
    &["info", "--backing-chain", "IMG"],
    &["check", "IMG"],
    &["check", "-r", "all", "IMG"],
    &["map", "IMG"],
    &["compare", "good.qcow2", "IMG"],
    &["convert", "-O", "qcow2", "IMG", "OUT"],
    &["convert", "-O", "raw", "IMG", "OUT"],
    &["rebase", "-b", "", "IMG"],
    &["commit", "IMG"],
    &["resize", "IMG", "32M"],
    &["amend", "-o", "lazy_refcounts=on", "IMG"],
    &["snapshot", "-c", "snap", "IMG"],
    &["snapshot", "-l", "IMG"],
    &["measure", "-O", "qcow2", "IMG"],
];

/// The bad images: name, and how to make it from `good.qcow2`.
fn make_bad_images(d: &TempDir) {
    let good = std::fs::read(d.path("good.qcow2")).unwrap();
    // L1 table offset (header bytes 40..48) not a multiple of the cluster.
    let mut corrupt = good.clone();
    corrupt[40..48].copy_from_slice(&0x30123u64.to_be_bytes());
    std::fs::write(d.path("corrupt.qcow2"), corrupt).unwrap();
    // Cut inside the header.
    std::fs::write(d.path("cut-header.qcow2"), &good[..50]).unwrap();
    // Cut after the metadata: the data cluster is gone.
    std::fs::write(d.path("cut-data.qcow2"), &good[..0x30000]).unwrap();
    // A backing file that does not exist.
    let o = run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing-base.qcow2",
            "-F",
            "qcow2",
            &d.file("no-backing.qcow2"),
            "16M",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// Runs `tool` (`qemu-img` or sluice) with `args` in `dir`, `IMG` and
/// `OUT` replaced.
fn run_in(tool: &str, dir: &TempDir, args: &[&str], img: &str, out: &str) -> std::process::Output {
    let args: Vec<&str> = args
        .iter()
        .map(|a| match *a {
            "IMG" => img,
            "OUT" => out,
            other => other,
        })
        .collect();
    let mut cmd = if tool == "qemu-img" {
        std::process::Command::new("qemu-img")
    } else {
        let mut c = std::process::Command::new(sluice());
        c.arg("img");
        c
    };
    cmd.args(&args).current_dir(&dir.0).output().unwrap()
}

#[test]
fn bad_images_fail_like_qemu_img_and_change_nothing() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = temp_dir("img-bad-input");
    let good = d.file("good.qcow2");
    let o = run("qemu-img", &["create", "-q", "-f", "qcow2", &good, "16M"]);
    assert!(o.status.success());
    ok_line(&qemu_io(&good, &["write -P 0x11 0 1M"]));
    make_bad_images(&d);
    let mut failures = 0;
    for bad in [
        "corrupt.qcow2",
        "cut-header.qcow2",
        "cut-data.qcow2",
        "no-backing.qcow2",
    ] {
        let original = std::fs::read(d.path(bad)).unwrap();
        for args in COMMANDS {
            let mut outcome = Vec::new();
            for tool in ["qemu-img", "sluice"] {
                let img = format!("{tool}-{bad}");
                let out = format!("{tool}-out");
                std::fs::write(d.path(&img), &original).unwrap();
                let _ = std::fs::remove_file(d.path(&out));
                let o = run_in(tool, &d, args, &img, &out);
                let after = std::fs::read(d.path(&img)).unwrap();
                let target_made = d.path(&out).exists();
                outcome.push((o, img, after, target_made));
            }
            let (q, s) = (&outcome[0], &outcome[1]);
            let what = format!("{bad}: {args:?}");
            let refused_cut = bad == "cut-data.qcow2" && !s.0.status.success();
            if refused_cut {
                let err = text(&s.0.stderr);
                assert!(
                    err.trim_end().lines().count() == 1
                        && err.contains(&s.1)
                        && err.contains("past the end"),
                    "{what}: {err}"
                );
                assert!(s.2 == original && !s.3, "{what}: sluice wrote");
                failures += 1;
                continue;
            }
            assert_eq!(
                s.0.status.code(),
                q.0.status.code(),
                "{what}: exit code; qemu-img said {:?}, sluice {:?}",
                text(&q.0.stderr),
                text(&s.0.stderr)
            );
            if q.0.status.success() {
                continue;
            }
            failures += 1;
            let err = text(&s.0.stderr);
            let qerr = text(&q.0.stderr);
            if qerr.trim_end().lines().count() == 1 {
                assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line: {err}");
                assert!(err.contains(&s.1), "{what}: names the image: {err}");
                // The cause follows the name.
                let cause = err.rsplit(": ").next().unwrap_or("").trim();
                assert!(!cause.is_empty() && !cause.contains(&s.1), "{what}: {err}");
            }
            // Check's exit codes 2 and 3 report what it found; every
            // other failure writes nothing.
            if !matches!(args[0], "check") || q.0.status.code() == Some(1) {
                assert!(s.2 == original, "{what}: sluice changed the image");
                assert!(!s.3, "{what}: sluice left a target behind");
            }
        }
    }
    // The corrupt, cut and backing-less images each fail somewhere.
    assert!(
        failures >= 30,
        "only {failures} failures: the bad images are not bad"
    );
}

#[test]
fn unknown_formats_fail_like_qemu_img() {
    if !have("qemu-img") {
        return;
    }
    let d = temp_dir("img-bad-format");
    let good = d.file("good.qcow2");
    assert!(
        run("qemu-img", &["create", "-q", "-f", "qcow2", &good, "1M"])
            .status
            .success()
    );
    let original = std::fs::read(&good).unwrap();
    for args in [
        &["info", "-f", "foo", "IMG"][..],
        &["check", "-f", "foo", "IMG"],
        &["map", "-f", "foo", "IMG"],
        &["convert", "-f", "foo", "IMG", "OUT"],
        &["convert", "-O", "foo", "IMG", "OUT"],
        &["resize", "-f", "foo", "IMG", "2M"],
        &["amend", "-f", "foo", "-o", "size=2M", "IMG"],
        &["create", "-f", "foo", "OUT", "1M"],
    ] {
        let q = run_in("qemu-img", &d, args, "good.qcow2", "q-out");
        let s = run_in("sluice", &d, args, "good.qcow2", "s-out");
        assert!(!q.status.success(), "{args:?}: qemu-img accepted it");
        assert_eq!(s.status.code(), q.status.code(), "{args:?}");
        let err = text(&s.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("foo"), "{args:?}: names the format: {err}");
        assert!(!d.path("s-out").exists(), "{args:?}: left a target");
        assert!(std::fs::read(&good).unwrap() == original, "{args:?}");
    }
}
