//! `sluice io` driving blkdebug breakpoints: an `aio_read` parked at
//! `read_backing_aio` (raised by a memory overlay on its blkdebug backing
//! child) stays parked while other requests pass, and completes once
//! resumed. Ordering comes from the breakpoint itself, never from sleeps.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sluice_io(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("io")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hang is a failure, not a stuck test run.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "sluice io {args:?} hung; stdout so far:\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| match l.find(" ops; ") {
            Some(i) => format!("{} ops; <rate>", &l[..i]),
            None => l.to_string(),
        })
        .collect()
}

fn with_cmds<'a>(cmds: &[&'a str], image: &'a str) -> Vec<&'a str> {
    let mut v = vec!["--image-opts"];
    for c in cmds {
        v.push("-c");
        v.push(c);
    }
    v.push(image);
    v
}

/// A memory overlay over blkdebug over a zero-reading null node.
const NULL_CHAIN: &str = "driver=memory,size=1048576,backing.driver=blkdebug,\
backing.image.driver=null-co,backing.image.size=1048576,backing.image.read-zeroes=on";

#[test]
fn a_parked_aio_read_is_resumed() {
    let o = sluice_io(&with_cmds(
        &[
            "break read_backing_aio A",
            "aio_read -P 0 0 512",
            "wait_break A",
            // The parked read does not block another request.
            "read -P 0 512 512",
            "resume A",
            "aio_flush",
            "read -P 0 0 512",
        ],
        NULL_CHAIN,
    ));
    assert_eq!(
        lines(&o),
        vec![
            "blkdebug: Suspended request 'A'",
            "read 512/512 bytes at offset 512",
            "512 bytes, 1 ops; <rate>",
            "blkdebug: Resuming request 'A'",
            "read 512/512 bytes at offset 0",
            "512 bytes, 1 ops; <rate>",
            "read 512/512 bytes at offset 0",
            "512 bytes, 1 ops; <rate>",
        ],
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn a_parked_read_of_a_raw_image_returns_its_data() {
    let dir = std::env::temp_dir().join(format!("sluice-io-blkdebug-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img: PathBuf = dir.join("base.raw");
    std::fs::write(&img, vec![0x5au8; 1 << 20]).unwrap();
    let chain = format!(
        "driver=memory,size=1048576,backing.driver=blkdebug,backing.image.driver=raw,\
backing.image.file.driver=file,backing.image.file.filename={}",
        img.display()
    );
    let o = sluice_io(&with_cmds(
        &[
            "break read_backing_aio parked",
            "aio_read -P 0x5a 64k 4k",
            "wait_break parked",
            // Written to the overlay while the read is parked below it.
            "write -P 0x33 0 4k",
            "read -P 0x33 0 4k",
            "resume parked",
            "aio_flush",
        ],
        &chain,
    ));
    assert_eq!(
        lines(&o),
        vec![
            "blkdebug: Suspended request 'parked'",
            "wrote 4096/4096 bytes at offset 0",
            "4 KiB, 1 ops; <rate>",
            "read 4096/4096 bytes at offset 0",
            "4 KiB, 1 ops; <rate>",
            "blkdebug: Resuming request 'parked'",
            "read 4096/4096 bytes at offset 65536",
            "4 KiB, 1 ops; <rate>",
        ],
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(0));
    // The overlay is in memory: the file is untouched.
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0x5a));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn breakpoint_errors_are_reported_and_nothing_hangs() {
    let o = sluice_io(&with_cmds(
        &[
            "resume nothing",
            "remove_break nothing",
            "break no_such_event X",
            // Nothing in flight can stop here: an error, not a hang.
            "wait_break X",
            "break read_backing_aio B",
            "aio_read 0 512",
            "wait_break B",
            // remove_break lets the parked request go.
            "remove_break B",
            "aio_flush",
            // Left parked at the end: the session still ends.
            "break read_backing_aio C",
            "aio_read 4k 512",
            "wait_break C",
        ],
        NULL_CHAIN,
    ));
    assert_eq!(
        lines(&o),
        vec![
            "Could not resume request: No such file or directory",
            "Could not remove breakpoint nothing: No such file or directory",
            "Could not set breakpoint: No such file or directory",
            "Could not wait for break: no request in flight can stop at 'X'",
            "blkdebug: Suspended request 'B'",
            "blkdebug: Resuming request 'B'",
            "read 512/512 bytes at offset 0",
            "512 bytes, 1 ops; <rate>",
            "blkdebug: Suspended request 'C'",
            "read 512/512 bytes at offset 4096",
            "512 bytes, 1 ops; <rate>",
        ]
    );
    assert_eq!(o.status.code(), Some(1));
    // Without a blkdebug node, as qemu-io says.
    let o = sluice_io(&[
        "--image-opts",
        "-c",
        "break read_aio A",
        "driver=null-co,size=1048576",
    ]);
    assert_eq!(
        lines(&o),
        vec!["Could not set breakpoint: Operation not supported"]
    );
    assert_eq!(o.status.code(), Some(1));
}
