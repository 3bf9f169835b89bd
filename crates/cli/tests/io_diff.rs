//! `sluice io` beside `qemu-io`: the same `-c` command lists on copies of
//! the same raw image must print the same stdout (the numbers of the rate
//! line masked), exit with the same code, and leave equal files — also
//! when commands fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: usize = 1 << 20;

fn have_qemu_io() -> bool {
    Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-io-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 1 MiB raw image: 64 KiB of 0x5a, 4 KiB of 0x11 at 128 KiB, the rest
/// zero (a hole).
fn base_image(dir: &Path) -> PathBuf {
    let mut data = vec![0u8; MIB];
    data[..65536].fill(0x5a);
    data[131072..135168].fill(0x11);
    let p = dir.join("base.raw");
    std::fs::write(&p, data).unwrap();
    p
}

/// Stdout with the timing parts of report lines masked.
fn mask(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            if let Some(i) = l.find(" ops; ") {
                // "64 KiB, 1 ops; 00.00 sec (X MiB/sec and Y ops/sec)"
                format!("{} ops; <time and rate>", &l[..i])
            } else if l.split(',').count() == 5
                && l.split(',').take(2).all(|f| f.parse::<u64>().is_ok())
            {
                // -C: "bytes,ops,time,bytes/sec,ops/sec"
                let f: Vec<&str> = l.split(',').collect();
                format!("{},{},<time and rate>", f[0], f[1])
            } else {
                l.to_string()
            }
        })
        .collect()
}

fn run(program: &str, pre: &[&str], global: &[&str], cmds: &[&str], file: Option<&Path>) -> Output {
    let mut c = Command::new(program);
    c.args(pre).args(global);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    if let Some(f) = file {
        c.arg(f);
    }
    c.output().unwrap()
}

struct Case {
    name: &'static str,
    global: &'static [&'static str],
    cmds: &'static [&'static str],
    /// Run without an existing image (a missing file).
    missing_file: bool,
    /// Put before the image's path (`blkdebug::`).
    prefix: &'static str,
}

const fn case(
    name: &'static str,
    global: &'static [&'static str],
    cmds: &'static [&'static str],
) -> Case {
    Case {
        name,
        global,
        cmds,
        missing_file: false,
        prefix: "",
    }
}

const RAW: &[&str] = &["-f", "raw"];

static CASES: &[Case] = &[
    case(
        "write_read_patterns",
        RAW,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "read -P 0x5a 64k 4k",
            "write -P 7 1k 1.5k",
            "read -P 7 1k 1.5k",
            "read -P 0xab -s 0 -l 1k 0 4k",
            "read -P 0x11 128k 4k",
            "read -q -P 0x11 128k 4k",
            "length",
            "flush",
        ],
    ),
    case(
        "pattern_failures",
        RAW,
        &[
            "read -P 0xcd 0 4k",
            "read -P 0x5a -s 8 -l 8 0 512",
            "read -P 0x5a -s 508 -l 8 0 512",
            "readv -P 0x5a 60k 4k 4k",
            "read -v 130k 40",
        ],
    ),
    case(
        "bad_pattern_and_numbers",
        RAW,
        &[
            "write -P 300 0 4k",
            "write -P -1 0 512",
            "read 0 1Z",
            "read abc 1",
            "read 0x10 0x10",
            "read 010 1",
            "read 0 2G",
            "write -z 0 3G",
            "alloc 8E",
        ],
    ),
    case(
        "past_the_end",
        RAW,
        &[
            "read 1M 512",
            "read 1020k 8k",
            "write 1020k 8k",
            "discard 1M 4k",
            "read 1M 0",
            "read 2M 0",
            "alloc 2M",
            "alloc 1020k 8k",
        ],
    ),
    case(
        "unknown_command_and_usage",
        RAW,
        &[
            "bogus",
            "read",
            "read -x 0 1",
            "write 1024 -1",
            "length 1",
            "help nope",
            "write -u 0 4k",
            "write -n 0 1",
            "write -z -P 1 0 1",
        ],
    ),
    case(
        "zeroes_discard_vectors",
        RAW,
        &[
            "write -z 4k 8k",
            "write -z -u 16k 4k",
            "write -f -P 3 32k 4k",
            "read -P 0 4k 8k",
            "discard 64k 64k",
            "discard 0 0",
            "writev -P 9 200k 512 1k 0x200",
            "readv -P 9 200k 1k 1k",
            "write -C 0 512",
            "read -C 0 512",
            "write 0 0",
            "read -v 0 20",
        ],
    ),
    case(
        "aio",
        RAW,
        &[
            "aio_write -P 0x42 0 4k",
            "aio_flush",
            "aio_read -P 0x42 0 4k",
            "aio_flush",
            "aio_read -P 0x43 0 512",
            "aio_flush",
            "aio_read 1M 512",
            "aio_flush",
            "aio_write -z 8k 4k",
            "aio_flush",
            "aio_write -u 0 512",
            "aio_read -i 0 1",
            "read -P 0 8k 4k",
        ],
    ),
    case(
        "map_alloc_info",
        RAW,
        &[
            "map",
            "alloc 0",
            "alloc 0 1M",
            "alloc 100 1000",
            "info",
            "help read",
            "help open",
        ],
    ),
    case(
        "open_close_quit",
        &[],
        &[
            "read 0 512",
            "open -o driver=raw IMG",
            "open -o driver=raw IMG",
            "read -P 0x5a 0 512",
            "close",
            "length",
            "open -r -o driver=raw IMG",
            "write 0 1",
            "read -P 0x5a 0 1",
            "quit",
            "read 0 1",
        ],
    ),
    case(
        "read_only",
        &["-r", "-f", "raw"],
        &["write -P 1 0 512", "discard 0 4k", "read -P 0x5a 0 512"],
    ),
    case(
        "cache_and_aio_modes_none",
        &["-n", "-f", "raw"],
        &["write -P 3 0 4k", "read -P 3 0 4k"],
    ),
    case(
        "cache_and_aio_modes_uring",
        &["-t", "none", "-i", "io_uring", "-f", "raw"],
        &["write -P 4 4k 4k", "read -P 4 4k 4k"],
    ),
    case(
        "cache_and_aio_modes_threads",
        &["-t", "unsafe", "-i", "threads", "-f", "raw"],
        &["write -P 5 8k 4k", "read -P 5 8k 4k"],
    ),
    case(
        "copy_on_read_flag",
        &["-C", "-f", "raw"],
        &["read -P 0x5a 0 4k", "info"],
    ),
    case(
        "bad_cache_mode",
        &["-t", "bogus", "-f", "raw"],
        &["read 0 1"],
    ),
    case("bad_format", &["-f", "bogus"], &["read 0 1"]),
    case(
        "force_share_needs_read_only",
        &["-U", "-f", "raw"],
        &["read 0 1"],
    ),
    Case {
        name: "missing_file",
        global: RAW,
        cmds: &["read 0 512"],
        missing_file: true,
        prefix: "",
    },
    case(
        "snapshot_leaves_the_image_alone",
        &["-s", "-f", "raw"],
        &[
            "write -P 0x66 0 4k",
            "read -P 0x66 0 4k",
            "read -P 0x5a 4k 4k",
            "write -z 128k 4k",
            "read -P 0 128k 4k",
        ],
    ),
    Case {
        name: "blkdebug_filename",
        global: RAW,
        cmds: &[
            "write -P 0x21 0 4k",
            "read -P 0x21 0 4k",
            "read -P 0x5a 4k 4k",
        ],
        missing_file: false,
        prefix: "blkdebug::",
    },
];

#[test]
fn sluice_io_agrees_with_qemu_io() {
    if !have_qemu_io() {
        eprintln!("qemu-io is not installed; skipping the differential test");
        return;
    }
    let dir = scratch("diff");
    let base = base_image(&dir);
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let mut failures = Vec::new();
    for case in CASES {
        let q_img = dir.join(format!("{}-qemu.raw", case.name));
        let s_img = dir.join(format!("{}-sluice.raw", case.name));
        let missing = dir.join("no-such-file.raw");
        if !case.missing_file {
            std::fs::copy(&base, &q_img).unwrap();
            std::fs::copy(&base, &s_img).unwrap();
        }
        // `open ... IMG` inside a command list opens that side's image.
        let cmds = |img: &Path| -> Vec<String> {
            case.cmds
                .iter()
                .map(|c| c.replace("IMG", img.to_str().unwrap()))
                .collect()
        };
        let (qc, sc) = (cmds(&q_img), cmds(&s_img));
        let qc: Vec<&str> = qc.iter().map(String::as_str).collect();
        let sc: Vec<&str> = sc.iter().map(String::as_str).collect();
        let opens_itself = case.global.is_empty();
        let (qf, sf) = if case.missing_file {
            (Some(missing.as_path()), Some(missing.as_path()))
        } else if opens_itself {
            (None, None)
        } else {
            (Some(q_img.as_path()), Some(s_img.as_path()))
        };
        let with_prefix =
            |p: Option<&Path>| p.map(|p| PathBuf::from(format!("{}{}", case.prefix, p.display())));
        let (qf, sf) = (with_prefix(qf), with_prefix(sf));
        let q = run("qemu-io", &[], case.global, &qc, qf.as_deref());
        let s = run(sluice, &["io"], case.global, &sc, sf.as_deref());
        let (qo, so) = (mask(&q.stdout), mask(&s.stdout));
        if qo != so {
            let mut diff = String::new();
            for i in 0..qo.len().max(so.len()) {
                let (a, b) = (qo.get(i), so.get(i));
                if a != b {
                    diff.push_str(&format!(
                        "  line {}: qemu-io {a:?}\n           sluice  {b:?}\n",
                        i + 1
                    ));
                }
            }
            failures.push(format!("{}: stdout differs\n{diff}", case.name));
        }
        if q.status.code() != s.status.code() {
            failures.push(format!(
                "{}: exit code qemu-io {:?}, sluice {:?}; sluice stderr: {}",
                case.name,
                q.status.code(),
                s.status.code(),
                String::from_utf8_lossy(&s.stderr)
            ));
        }
        if !case.missing_file {
            let (a, b) = (
                std::fs::read(&q_img).unwrap(),
                std::fs::read(&s_img).unwrap(),
            );
            if a != b {
                let first = a.iter().zip(&b).position(|(x, y)| x != y);
                failures.push(format!(
                    "{}: images differ (sizes {} and {}, first difference at {first:?})",
                    case.name,
                    a.len(),
                    b.len()
                ));
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn interactive_sessions_agree_with_qemu_io() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = scratch("interactive");
    let base = base_image(&dir);
    let script = "read -P 0x5a 0 4k\nbogus\n\nwrite -P 0x77 4k 4k\nread -P 0x77 4k 4k\nlength\nquit\nread 0 1\n";
    let session = |program: &str, pre: &[&str], img: &Path| -> Output {
        let mut child = Command::new(program)
            .args(pre)
            .args(["-f", "raw"])
            .arg(img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let s_img = dir.join("sluice.raw");
    std::fs::copy(&base, &s_img).unwrap();
    let s = session(env!("CARGO_BIN_EXE_sluice"), &["io"], &s_img);
    let out = mask(&s.stdout);
    assert_eq!(
        out,
        vec![
            "qemu-io> read 4096/4096 bytes at offset 0",
            "4 KiB, 1 ops; <time and rate>",
            "qemu-io> qemu-io> qemu-io> wrote 4096/4096 bytes at offset 4096",
            "4 KiB, 1 ops; <time and rate>",
            "qemu-io> read 4096/4096 bytes at offset 4096",
            "4 KiB, 1 ops; <time and rate>",
            "qemu-io> 1 MiB",
            "qemu-io> ",
        ]
    );
    // `bogus` failed, so the session fails, as qemu-io's does.
    assert_eq!(s.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&s.stderr).contains("command \"bogus\" not found"));
    if have_qemu_io() {
        let q_img = dir.join("qemu.raw");
        std::fs::copy(&base, &q_img).unwrap();
        let q = session("qemu-io", &[], &q_img);
        assert_eq!(mask(&q.stdout), out);
        assert_eq!(q.status.code(), s.status.code());
        assert_eq!(
            std::fs::read(&q_img).unwrap(),
            std::fs::read(&s_img).unwrap()
        );
    }
    // End of input ends a session too.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["io", "-f", "raw"])
        .arg(&s_img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"read -P 0x77 4k 4k\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).ends_with("qemu-io> "));
    std::fs::remove_dir_all(&dir).ok();
}

/// Seeded random command lists: unaligned and past-the-end ranges, all
/// kinds of writes, verified and unverified reads, maps.
#[test]
fn random_command_lists_agree_with_qemu_io() {
    if !have_qemu_io() {
        eprintln!("qemu-io is not installed; skipping the differential test");
        return;
    }
    let dir = scratch("random");
    let base = base_image(&dir);
    let sluice = env!("CARGO_BIN_EXE_sluice");
    for seed in [1u64, 7, 1234] {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut cmds = Vec::new();
        for _ in 0..40 {
            // Mostly inside the 1 MiB image, sometimes across or past its end.
            let off = match next(4) {
                0 => next(MIB as u64 + 8192),
                1 => next(256) * 4096,
                _ => next(MIB as u64 / 512) * 512,
            };
            let len = match next(3) {
                0 => next(9000),
                1 => (1 + next(16)) * 512,
                _ => (1 + next(8)) * 4096,
            };
            let pat = next(4) * 0x11;
            cmds.push(match next(9) {
                0 | 1 => format!("write -P {pat} {off} {len}"),
                2 => format!("write -z {off} {len}"),
                3 => format!("discard {off} {len}"),
                4 => format!("writev -P {pat} {off} {len} 512"),
                5 => format!("read -P {pat} {off} {len}"),
                6 => format!("readv -P {pat} {off} {len} {len}"),
                7 => format!("alloc {off} {len}"),
                _ => format!("read -v {off} {}", len.min(64)),
            });
        }
        cmds.push("map".to_string());
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let q_img = dir.join(format!("{seed}-qemu.raw"));
        let s_img = dir.join(format!("{seed}-sluice.raw"));
        std::fs::copy(&base, &q_img).unwrap();
        std::fs::copy(&base, &s_img).unwrap();
        let q = run("qemu-io", &[], RAW, &cmds, Some(&q_img));
        let s = run(sluice, &["io"], RAW, &cmds, Some(&s_img));
        assert!(
            mask(&s.stdout).len() > cmds.len(),
            "seed {seed}: too little output"
        );
        assert_eq!(mask(&q.stdout), mask(&s.stdout), "seed {seed}: {cmds:#?}");
        assert_eq!(q.status.code(), s.status.code(), "seed {seed}");
        assert!(
            std::fs::read(&q_img).unwrap() == std::fs::read(&s_img).unwrap(),
            "seed {seed}: images differ"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `info` on qcow2 images says what qemu-io says: cluster size, VM state
/// offset (past what the L1 table maps) and the format-specific lines.
#[test]
fn info_on_qcow2_agrees_with_qemu_io() {
    if !have_qemu_io() {
        eprintln!("qemu-io is not installed; skipping the differential test");
        return;
    }
    let dir = scratch("info-qcow2");
    let sluice = env!("CARGO_BIN_EXE_sluice");
    for (opts, size) in [
        ("cluster_size=64k", "4M"),
        ("compat=0.10,cluster_size=4k", "3G"),
        ("lazy_refcounts=on,refcount_bits=8,cluster_size=2M", "5G"),
        ("extended_l2=on", "600M"),
    ] {
        let img = dir.join("i.qcow2");
        let img = img.to_str().unwrap();
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", opts, img, size])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let q = Command::new("qemu-io")
            .args(["-c", "info", img])
            .output()
            .unwrap();
        let s = Command::new(sluice)
            .args(["io", "-c", "info", img])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&s.stdout),
            String::from_utf8_lossy(&q.stdout),
            "info of a qcow2 image made with -o {opts}"
        );
        assert_eq!(s.status.code(), q.status.code());
    }
}
