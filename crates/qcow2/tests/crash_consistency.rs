//! Crash consistency (ARCHITECTURE.md, invariant 6): a seeded workload of
//! allocating writes (partial and whole clusters), rewrites, write-zeroes,
//! discards and flushes runs through sluice's qcow2 driver on top of a
//! recording file (`crash_recorder`). Then, for every point k of the
//! recorded file I/O (or a dense sample of them), the image as it could be
//! on disk after a crash at k — everything before the last flush, plus
//! all, none, or a random subset in random order of the writes since —
//! must be an image that `qemu-img check` finds free of corruption (leaks
//! allowed), and that holds every guest write flushed before k.
//!
//! Bytes that guest requests touched after the last completed flush may
//! hold the flushed value or the value of any of those requests (never
//! anything else: no stale or foreign data shows through).
//!
//! Replaying: each failure prints its seed and crash point;
//! `SLUICE_CRASH_SEED=<seed>` runs every case with that seed,
//! `SLUICE_CRASH_K=<k>` checks only point k, `SLUICE_CRASH_POINTS=<n>`
//! changes how many points are sampled (`all` for every one). The failing
//! images are kept under `$TMPDIR/sluice-crash-failures/`.

mod common;
mod crash_recorder;

use common::*;
use crash_recorder::{qcow2_on_recorder, Crash, Durable, Event, Pick, Record};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sluice_core::{Graph, IoBytes, WriteFlags, ZeroFlags};
use std::collections::{BTreeSet, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

struct Case {
    name: &'static str,
    /// `qemu-img create -o` options.
    opts: &'static str,
    cs: u64,
    size: u64,
    backing: bool,
    /// qemu-io commands run on the image before sluice opens it.
    prefill: &'static [&'static str],
    ops: usize,
    /// The longest request of the workload, in bytes.
    max_len: u64,
    seed: u64,
    /// How many crash points are checked at most (each with all, none and
    /// a random subset of the unflushed writes).
    points: usize,
    /// The workload must grow the refcount table.
    grows_reftable: bool,
}

/// One guest request of the workload and the file events it caused.
struct GuestOp {
    what: String,
    /// The guest bytes it changes: `[start, end)`.
    range: Option<(u64, u64)>,
    /// What it writes there; `None`: zeroes.
    data: Option<Arc<Vec<u8>>>,
    /// Its file events are `ev_start..ev_end`.
    ev_start: usize,
    ev_end: usize,
}

impl GuestOp {
    fn covers(&self, i: u64) -> bool {
        self.range.is_some_and(|(s, e)| s <= i && i < e)
    }

    fn byte(&self, i: u64) -> u8 {
        match (&self.data, self.range) {
            (Some(d), Some((s, _))) => d[(i - s) as usize],
            _ => 0,
        }
    }

    fn apply(&self, model: &mut [u8]) {
        if let Some((s, e)) = self.range {
            let dst = &mut model[s as usize..e as usize];
            match &self.data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
        }
    }
}

/// A guest flush that completed: after file event `ev_end`, the first
/// `ops_done` guest requests are durable.
struct GuestFlush {
    ev_end: usize,
    ops_done: usize,
}

struct Run {
    /// The guest contents before the workload (backing file included).
    base: Vec<u8>,
    ops: Vec<GuestOp>,
    flushes: Vec<GuestFlush>,
    record: Record,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

fn whole_clusters(cs: u64, size: u64, off: u64, len: u64) -> Option<(u64, u64)> {
    let start = off.div_ceil(cs) * cs;
    let end = if off + len == size {
        size
    } else {
        (off + len) / cs * cs
    };
    (start < end).then_some((start, end))
}

/// A request range: inside one cluster, whole clusters, or anywhere.
fn span(rng: &mut SmallRng, c: &Case) -> (u64, u64) {
    let clusters = c.size / c.cs;
    match rng.gen_range(0..3) {
        0 => {
            let within = rng.gen_range(0..c.cs);
            let off = rng.gen_range(0..clusters) * c.cs + within;
            (off, rng.gen_range(1..=c.cs - within))
        }
        1 => {
            let n = rng.gen_range(1..=(c.max_len / c.cs).max(1));
            let first = rng.gen_range(0..=clusters - n);
            (first * c.cs, n * c.cs)
        }
        _ => {
            let off = rng.gen_range(0..c.size);
            (off, rng.gen_range(1..=c.max_len.min(c.size - off)))
        }
    }
}

fn prepare(dir: &TempDir, c: &Case) -> String {
    let img = dir.path(&format!("{}.qcow2", c.name));
    let size = c.size.to_string();
    if c.backing {
        let base = dir.path(&format!("{}-base.qcow2", c.name));
        qemu_img(&["create", "-q", "-f", "qcow2", &base, &size]);
        qemu_io(
            &base,
            &[
                "write -P 0x3c 0 300000".into(),
                format!("write -P 0x4d {} 200000", c.size / 2),
            ],
        );
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-o", c.opts, "-b", &base, "-F", "qcow2", &img, &size,
        ]);
    } else {
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", c.opts, &img, &size]);
    }
    let cmds: Vec<String> = c.prefill.iter().map(|s| s.to_string()).collect();
    if !cmds.is_empty() {
        qemu_io(&img, &cmds);
    }
    img
}

/// Runs the seeded workload through sluice on a recording file holding
/// `img`'s bytes.
async fn run_workload(c: &Case, seed: u64, img: &str) -> Run {
    let base = qemu_raw(img);
    let graph = Graph::new();
    let (node, root, rec) = qcow2_on_recorder(&graph, img, Value::Null)
        .await
        .unwrap_or_else(|e| panic!("{}: open: {e}", c.name));
    assert_eq!(node.size(), c.size);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model = base.clone();
    let mut ops: Vec<GuestOp> = Vec::new();
    let mut flushes: Vec<GuestFlush> = Vec::new();
    let mut written: Vec<(u64, u64)> = Vec::new();
    let mut since_flush = 0;
    let mut next_flush = rng.gen_range(1..=5);
    for n in 0..c.ops {
        let ev_start = rec.len();
        let kind = rng.gen_range(0..100);
        let op = if kind < 60 {
            let (off, len) = if kind >= 45 && !written.is_empty() {
                *written.choose(&mut rng).unwrap()
            } else {
                span(&mut rng, c)
            };
            let b0: u8 = rng.gen();
            let data: Vec<u8> = (0..len)
                .map(|i| b0.wrapping_add((i * 7 % 251) as u8) ^ (n as u8))
                .collect();
            root.write(off, IoBytes::copy_from(&data), WriteFlags::default())
                .await
                .unwrap_or_else(|e| panic!("{}: op {n}: write {off:#x}+{len:#x}: {e}", c.name));
            written.push((off, len));
            let what = if kind >= 45 { "rewrite" } else { "write" };
            GuestOp {
                what: format!("{what} {off:#x}+{len:#x}"),
                range: Some((off, off + len)),
                data: Some(Arc::new(data)),
                ev_start,
                ev_end: 0,
            }
        } else if kind < 80 {
            let (off, len) = span(&mut rng, c);
            let flags = ZeroFlags {
                may_unmap: rng.gen(),
                ..ZeroFlags::default()
            };
            root.write_zeroes(off, len, flags)
                .await
                .unwrap_or_else(|e| panic!("{}: op {n}: zeroes {off:#x}+{len:#x}: {e}", c.name));
            GuestOp {
                what: format!(
                    "write_zeroes {off:#x}+{len:#x}{}",
                    if flags.may_unmap { " (unmap)" } else { "" }
                ),
                range: Some((off, off + len)),
                data: None,
                ev_start,
                ev_end: 0,
            }
        } else {
            let (off, len) = span(&mut rng, c);
            root.discard(off, len)
                .await
                .unwrap_or_else(|e| panic!("{}: op {n}: discard {off:#x}+{len:#x}: {e}", c.name));
            // Version 3: discarded whole clusters read as zeroes.
            GuestOp {
                what: format!("discard {off:#x}+{len:#x}"),
                range: whole_clusters(c.cs, c.size, off, len),
                data: None,
                ev_start,
                ev_end: 0,
            }
        };
        let mut op = op;
        op.ev_end = rec.len();
        op.apply(&mut model);
        ops.push(op);
        since_flush += 1;
        if since_flush >= next_flush || n + 1 == c.ops {
            root.flush()
                .await
                .unwrap_or_else(|e| panic!("{}: flush after op {n}: {e}", c.name));
            flushes.push(GuestFlush {
                ev_end: rec.len(),
                ops_done: ops.len(),
            });
            since_flush = 0;
            next_flush = rng.gen_range(1..=5);
        }
    }
    // The workload itself did what the model says.
    let mut got = Vec::with_capacity(c.size as usize);
    let mut pos = 0;
    while pos < c.size {
        let n = MIB.min(c.size - pos);
        got.extend_from_slice(&root.read(pos, n as usize).await.unwrap());
        pos += n;
    }
    assert_same(&format!("{}: after the workload", c.name), &got, &model);
    let record = rec.record();
    if c.grows_reftable {
        let clusters = |b: &[u8]| u32::from_be_bytes(b[56..60].try_into().unwrap());
        assert!(
            clusters(&rec.current()) > clusters(&record.initial),
            "{}: the workload did not grow the refcount table",
            c.name
        );
    }
    drop(root);
    drop(node);
    Run {
        base,
        ops,
        flushes,
        record,
    }
}

/// The crash points to check: every one when there are few; else both
/// sides of every flush and of every header write, topped up at random.
fn crash_points(r: &Record, max: usize, rng: &mut SmallRng) -> Vec<usize> {
    let n = r.len();
    if let Some(k) = env_u64("SLUICE_CRASH_K") {
        return vec![(k as usize).min(n)];
    }
    let max = match std::env::var("SLUICE_CRASH_POINTS").ok().as_deref() {
        Some("all") => usize::MAX,
        Some(v) => v.parse().unwrap_or(max),
        None => max,
    };
    if n < max {
        return (0..=n).collect();
    }
    let mut pri: Vec<usize> = Vec::new();
    for (i, e) in r.events.iter().enumerate() {
        let header = matches!(e, Event::Write { offset, .. } if *offset < 512);
        if e.is_flush() || header {
            pri.push(i);
            pri.push(i + 1);
        }
    }
    pri.sort_unstable();
    pri.dedup();
    pri.shuffle(rng);
    pri.truncate(max * 2 / 3);
    let mut set: BTreeSet<usize> = pri.into_iter().collect();
    set.insert(0);
    set.insert(n);
    while set.len() < max {
        set.insert(rng.gen_range(0..=n));
    }
    set.into_iter().collect()
}

/// What `qemu-img check` says; `Err` when it finds corruption.
fn qemu_check(path: &str) -> Result<Value, String> {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2", path])
        .output()
        .unwrap();
    let code = out.status.code();
    let json: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    let count = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let ok = matches!(code, Some(0) | Some(3))
        && json.is_some()
        && count("corruptions") == 0
        && count("check-errors") == 0;
    if ok {
        return Ok(json.unwrap());
    }
    let human = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stderr).into_owned()
        + &String::from_utf8_lossy(&human.stdout);
    // Errors first; leaked clusters only counted (leaks are allowed).
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("ERROR"))
        .collect();
    let leaked = lines.iter().filter(|l| l.starts_with("Leaked")).count();
    let other: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("ERROR") && !l.starts_with("Leaked"))
        .take(8)
        .collect();
    let mut shown: Vec<String> = errors.iter().take(16).map(|l| l.to_string()).collect();
    if errors.len() > 16 {
        shown.push(format!("... {} more ERROR lines", errors.len() - 16));
    }
    if leaked > 0 {
        shown.push(format!("({leaked} 'Leaked cluster' lines)"));
    }
    shown.extend(other.iter().map(|l| l.to_string()));
    Err(format!(
        "qemu-img check: exit {code:?}, corruptions {}, leaks {}, check-errors {}:\n    {}",
        count("corruptions"),
        count("leaks"),
        count("check-errors"),
        shown.join("\n    ")
    ))
}

/// The guest data a crash at `k` must show: `expect` is the model after
/// the first `ops_done` requests (those a completed flush made durable);
/// bytes touched by requests started since may also hold their values.
fn check_data(
    raw: &[u8],
    expect: &[u8],
    run: &Run,
    ops_done: usize,
    k: usize,
) -> Result<(), String> {
    if raw.len() != expect.len() {
        return Err(format!(
            "qemu-img convert gave {} bytes, the disk has {}",
            raw.len(),
            expect.len()
        ));
    }
    let post: Vec<(usize, &GuestOp)> = run
        .ops
        .iter()
        .enumerate()
        .skip(ops_done)
        .filter(|(_, o)| o.ev_start < k && o.range.is_some())
        .collect();
    let mut iv: Vec<(u64, u64)> = post.iter().filter_map(|(_, o)| o.range).collect();
    iv.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in iv {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let size = raw.len() as u64;
    merged.push((size, size));
    let mut pos = 0u64;
    for (s, e) in merged {
        let (a, b) = (pos as usize, s as usize);
        if raw[a..b] != expect[a..b] {
            let i = a + raw[a..b]
                .iter()
                .zip(&expect[a..b])
                .position(|(x, y)| x != y)
                .unwrap();
            let who = run.ops[..ops_done]
                .iter()
                .enumerate()
                .rev()
                .find(|(_, o)| o.covers(i as u64))
                .map(|(n, o)| format!("guest op #{n} ({})", o.what))
                .unwrap_or_else(|| "the image's contents before the workload".into());
            return Err(format!(
                "flushed data lost: guest byte {i:#x} reads {:#04x}, expected {:#04x} from {who}, flushed before the crash",
                raw[i], expect[i]
            ));
        }
        for i in s..e {
            let v = raw[i as usize];
            if v != expect[i as usize] && !post.iter().any(|(_, o)| o.covers(i) && o.byte(i) == v) {
                let ops: Vec<String> = post
                    .iter()
                    .filter(|(_, o)| o.covers(i))
                    .map(|(n, o)| format!("#{n} ({})", o.what))
                    .collect();
                return Err(format!(
                    "foreign data: guest byte {i:#x} reads {v:#04x}: neither the flushed {:#04x} nor what the unflushed guest ops {} wrote",
                    expect[i as usize],
                    ops.join(", ")
                ));
            }
        }
        pos = e;
    }
    Ok(())
}

fn describe(r: &Record, k: usize, pick: Pick, crash: &Crash) -> String {
    let ev = |i: usize| {
        r.events
            .get(i)
            .map(|e| format!("#{i} {e:?}"))
            .unwrap_or_else(|| format!("#{i} (end)"))
    };
    let mut s = format!(
        "crash after {k} of {} file events ({pick}); last event {}, next {}; durable through event {}",
        r.len(),
        if k > 0 { ev(k - 1) } else { "(none)".into() },
        ev(k),
        crash.durable as i64 - 1,
    );
    if !crash.window.is_empty() {
        let list = |v: Vec<usize>| {
            let mut out: Vec<String> = v.iter().take(12).map(|&i| ev(i)).collect();
            if v.len() > 12 {
                out.push(format!("... {} more", v.len() - 12));
            }
            out
        };
        let applied = list(crash.applied.clone());
        let lost = list(
            crash
                .window
                .iter()
                .copied()
                .filter(|i| !crash.applied.contains(i))
                .collect(),
        );
        s += &format!(
            "\n  unflushed writes applied (in this order, {} of {}): [{}]\n  unflushed writes lost: [{}]",
            crash.applied.len(),
            crash.window.len(),
            applied.join("; "),
            lost.join("; ")
        );
    }
    s
}

fn keep_failure(c: &Case, seed: u64, k: usize, pick: Pick, img: &str) -> String {
    let dir = std::env::temp_dir().join("sluice-crash-failures");
    let _ = std::fs::create_dir_all(&dir);
    let name = format!("{}-seed{seed}-k{k}-{}.qcow2", c.name, pick)
        .replace(['(', ')'], "")
        .replace("random", "rnd-");
    let dst = dir.join(name);
    let _ = std::fs::copy(img, &dst);
    if c.backing {
        // The backing file goes with the test's temporary directory.
        let base = dir.join(format!("{}-base.qcow2", c.name));
        let _ = std::fs::copy(
            std::path::Path::new(img)
                .parent()
                .unwrap()
                .join(format!("{}-base.qcow2", c.name)),
            &base,
        );
        let _ = Command::new("qemu-img")
            .args(["rebase", "-u", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&dst)
            .output();
    }
    dst.to_string_lossy().into_owned()
}

async fn crash_case(c: Case) {
    let seed = env_u64("SLUICE_CRASH_SEED").unwrap_or(c.seed);
    let t0 = Instant::now();
    eprintln!(
        "{}: seed {seed} (replay with SLUICE_CRASH_SEED={seed})",
        c.name
    );
    let dir = TempDir::new(&format!("crash-{}", c.name));
    let img = prepare(&dir, &c);
    let run = run_workload(&c, seed, &img).await;
    let r = &run.record;
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_c0de);
    let points = crash_points(r, c.points, &mut rng);
    let crash_img = dir.path("crash.qcow2");
    let crash_raw = dir.path("crash.raw");
    let mut durable = Durable::new(r);
    let mut expect = run.base.clone();
    let mut expect_ops = 0usize;
    let mut seen_durable: HashSet<usize> = HashSet::new();
    let mut failures: Vec<String> = Vec::new();
    let (mut states, mut windows, mut leaky) = (0usize, 0usize, 0usize);
    'points: for &k in &points {
        let d = r.durable_at(k);
        durable.advance_to(r, d);
        let ops_done = run
            .flushes
            .iter()
            .rev()
            .find(|f| f.ev_end <= k)
            .map_or(0, |f| f.ops_done);
        assert!(ops_done >= expect_ops);
        for op in &run.ops[expect_ops..ops_done] {
            op.apply(&mut expect);
        }
        expect_ops = ops_done;
        let window = r.window_at(k).len();
        let mut picks = Vec::new();
        if seen_durable.insert(d) {
            picks.push(Pick::None);
        }
        if window >= 1 {
            picks.push(Pick::All);
        }
        if window >= 2 {
            picks.push(Pick::Random(
                seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ));
        }
        for pick in picks {
            let crash = r.crash_from(&durable.image, k, pick);
            states += 1;
            if !crash.window.is_empty() {
                windows += 1;
            }
            std::fs::write(&crash_img, &crash.image).unwrap();
            let res = qemu_check(&crash_img).and_then(|j| {
                if j.get("leaks").and_then(Value::as_u64).unwrap_or(0) > 0 {
                    leaky += 1;
                }
                let out = Command::new("qemu-img")
                    .args([
                        "convert", "-f", "qcow2", "-O", "raw", &crash_img, &crash_raw,
                    ])
                    .output()
                    .unwrap();
                if !out.status.success() {
                    return Err(format!(
                        "qemu-img convert failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                let raw = std::fs::read(&crash_raw).unwrap();
                check_data(&raw, &expect, &run, ops_done, k)
            });
            if let Err(e) = res {
                let kept = keep_failure(&c, seed, k, pick, &crash_img);
                let msg = format!(
                    "{} seed {seed} (SLUICE_CRASH_SEED={seed} SLUICE_CRASH_K={k}): {}\n  {e}\n  image kept as {kept}",
                    c.name,
                    describe(r, k, pick, &crash)
                );
                eprintln!("CRASH FAILURE: {msg}");
                failures.push(msg);
                if failures.len() >= 3 {
                    break 'points;
                }
            }
        }
    }
    eprintln!(
        "{}: seed {seed}: {} guest ops, {} guest flushes, {} file events ({} flushes); {} crash points, {states} crash images ({windows} with unflushed writes, {leaky} with leaks) checked in {:.1}s",
        c.name,
        run.ops.len(),
        run.flushes.len(),
        r.len(),
        r.events.iter().filter(|e| e.is_flush()).count(),
        points.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} crash point(s) failed (first {} shown):\n\n{}",
        c.name,
        failures.len(),
        failures.join("\n\n")
    );
    if std::env::var("SLUICE_CRASH_K").is_err() {
        assert!(
            windows > 0,
            "{}: no crash image had unflushed writes",
            c.name
        );
    }
}

#[tokio::test]
async fn crash_fresh_image_64k() {
    crash_case(Case {
        name: "fresh64k",
        opts: "cluster_size=65536",
        cs: 65536,
        size: 4 * MIB,
        backing: false,
        prefill: &[],
        ops: 100,
        max_len: 3 * 65536,
        seed: 1,
        points: 400,
        grows_reftable: false,
    })
    .await;
}

#[tokio::test]
async fn crash_overlay_over_backing_file() {
    // Partial writes copy the rest of the cluster up from the backing file.
    crash_case(Case {
        name: "overlay",
        opts: "cluster_size=65536",
        cs: 65536,
        size: 4 * MIB,
        backing: true,
        prefill: &[],
        ops: 90,
        max_len: 3 * 65536,
        seed: 2,
        points: 400,
        grows_reftable: false,
    })
    .await;
}

#[tokio::test]
async fn crash_refcount_bits_1_cluster_4k() {
    // One-bit refcounts: refcount updates rewrite bytes shared with
    // neighbours; 4 KiB clusters: L2 tables are allocated as data grows.
    crash_case(Case {
        name: "rc1-4k",
        opts: "cluster_size=4096,refcount_bits=1",
        cs: 4096,
        size: 4 * MIB,
        backing: false,
        prefill: &[],
        ops: 100,
        max_len: 3 * 4096,
        seed: 3,
        points: 400,
        grows_reftable: false,
    })
    .await;
}

#[tokio::test]
async fn crash_refcount_table_growth() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers
    // 32 KiB of file and the one-cluster refcount table 2 MiB. QEMU fills
    // the file to just below that, so sluice's writes allocate new
    // refcount blocks and then move the refcount table.
    crash_case(Case {
        name: "grow512",
        opts: "cluster_size=512,refcount_bits=64",
        cs: 512,
        size: 4 * MIB,
        backing: false,
        prefill: &["write -P 0x11 0 1950k"],
        ops: 150,
        max_len: 64 * KIB,
        seed: 4,
        points: 400,
        grows_reftable: true,
    })
    .await;
}
