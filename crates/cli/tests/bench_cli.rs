//! `sluice img bench` beside `qemu-img bench`: same first output line, same
//! errors and exit codes for bad options.

use std::process::{Command, Output};

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("img")
        .arg("bench")
        .args(args)
        .output()
        .unwrap()
}

fn qemu_img(args: &[&str]) -> Option<Output> {
    Command::new("qemu-img")
        .arg("bench")
        .args(args)
        .output()
        .ok()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn prints_the_lines_qemu_img_prints() {
    let args = [
        "-c",
        "1000",
        "-d",
        "8",
        "-s",
        "1.5k",
        "-S",
        "8k",
        "-o",
        "4096",
        "--image-opts",
        "driver=null-co",
    ];
    let ours = sluice(&args);
    assert!(ours.status.success(), "{}", stderr(&ours));
    let out = stdout(&ours);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "Sending 1000 read requests, 1536 bytes each, 8 in parallel (starting at offset 4096, step size 8192)");
    assert!(
        lines[1].starts_with("Run completed in ") && lines[1].ends_with(" seconds."),
        "{out}"
    );
    if let Some(q) = qemu_img(&args) {
        assert_eq!(
            stdout(&q).lines().next(),
            Some(lines[0]),
            "first line differs from qemu-img's"
        );
    }
}

#[test]
fn write_runs_with_flushes_print_the_flush_line() {
    let args = [
        "-w",
        "-c",
        "500",
        "--flush-interval",
        "100",
        "--pattern",
        "7",
        "--image-opts",
        "driver=null-co",
    ];
    let ours = sluice(&args);
    assert!(ours.status.success(), "{}", stderr(&ours));
    assert!(stdout(&ours).contains("Sending 500 write requests"));
    assert!(stdout(&ours).contains("Sending flush every 100 requests"));
    let nd = sluice(&[
        "-w",
        "-c",
        "500",
        "--flush-interval",
        "10",
        "--no-drain",
        "--image-opts",
        "driver=null-co",
    ]);
    assert!(nd.status.success(), "{}", stderr(&nd));
}

#[test]
fn bad_options_fail_like_qemu_img() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["-d", "0"],
            "Invalid queue depth specified. Must be between 1 and 2147483647.",
        ),
        (&["-c", "-5"], "Invalid request count specified"),
        (
            &["-s", "0"],
            "Invalid buffer size specified. Must be between 1 and 2147483647.",
        ),
        (&["-i", "bogus"], "Invalid aio option: bogus"),
        (
            &["--flush-interval", "3"],
            "--flush-interval is only available in write tests",
        ),
        (&["-t", "sometimes"], "Invalid cache mode"),
    ];
    for (extra, want) in cases {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--image-opts", "driver=null-co"]);
        let ours = sluice(&args);
        assert_eq!(ours.status.code(), Some(1), "{args:?}: {}", stderr(&ours));
        assert!(
            stderr(&ours).contains(want),
            "{args:?}: got {}",
            stderr(&ours)
        );
        if let Some(q) = qemu_img(&args) {
            assert_eq!(q.status.code(), Some(1), "qemu-img {args:?} exit code");
        }
    }
    // Accepted and ignored, as by qemu-img.
    for extra in [&["--pattern", "3"][..], &["-w", "--no-drain"][..]] {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["-c", "10", "--image-opts", "driver=null-co"]);
        assert!(sluice(&args).status.success(), "{args:?}");
    }
    let missing = sluice(&["-f", "raw", "/nonexistent/disk.img"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("Could not open '/nonexistent/disk.img'"),
        "{}",
        stderr(&missing)
    );
    let past_end = sluice(&["-c", "10", "-o", "1G", "--image-opts", "driver=null-co"]);
    assert_eq!(past_end.status.code(), Some(1));
    assert!(
        stderr(&past_end).contains("Failed request: Input/output error"),
        "{}",
        stderr(&past_end)
    );
}

#[test]
fn ten_million_requests_at_depth_one_run_in_bounded_stack() {
    // qemu-img bench -i io_uring -d 1 overflows its stack at 200000
    // requests; sluice's request loop is iterative.
    let out = sluice(&[
        "-c",
        "10000000",
        "-d",
        "1",
        "--image-opts",
        "driver=null-co",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Run completed"));
}
