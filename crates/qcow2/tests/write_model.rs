//! QEMU accepting what sluice wrote: seeded random writes, write-zeroes and
//! discards through sluice, checked against an in-memory model as they
//! go; then `qemu-img check` finds the image clean and `qemu-img compare`
//! finds it equal to the model.

mod common;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_core::{IoBytes, WriteFlags, ZeroFlags};

struct Case {
    name: &'static str,
    opts: &'static str,
    cs: u64,
    size: u64,
    /// Extra set-up: a backing file, compressed clusters, existing data.
    setup: Setup,
}

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Empty,
    Prefilled,
    Backing,
    Compressed,
    /// Filled through sluice first (grows the refcount table of small
    /// cluster sizes).
    Filled,
    /// Prefilled, with two internal snapshots (`s1`, `s2`) sharing its
    /// clusters and L2 tables; they must come out unchanged.
    Snapshots,
    /// Prefilled, its data in an external data file (`data_file`); with
    /// `true`, a raw one (`data_file_raw`) that must show the disk.
    DataFile(bool),
}

/// Where a [`Setup::DataFile`] image keeps its data.
fn data_file_path(img: &str) -> String {
    format!("{img}.data")
}

fn prepare(dir: &TempDir, c: &Case) -> String {
    let img = dir.path(&format!("{}.qcow2", c.name));
    let size = c.size.to_string();
    match c.setup {
        Setup::Empty | Setup::Prefilled | Setup::Filled | Setup::Snapshots => {
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", c.opts, &img, &size]);
        }
        Setup::DataFile(raw) => {
            let opts = format!(
                "{},data_file={},data_file_raw={}",
                c.opts,
                data_file_path(&img),
                if raw { "on" } else { "off" }
            );
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &img, &size]);
        }
        Setup::Backing => {
            let base = dir.path(&format!("{}-base.qcow2", c.name));
            create_qcow2(
                &base,
                "cluster_size=65536",
                &(c.size / 2 + 12345).to_string(),
            );
            qemu_io(
                &base,
                &[
                    "write -P 0x3c 0 300000".into(),
                    format!("write -P 0x4d {} 100000", c.size / 4),
                ],
            );
            qemu_img(&[
                "create", "-q", "-f", "qcow2", "-o", c.opts, "-b", &base, "-F", "qcow2", &img,
                &size,
            ]);
            qemu_io(&img, &["write -P 0x5e 65536 4096".into()]);
        }
        Setup::Compressed => {
            let src = dir.path(&format!("{}-src.qcow2", c.name));
            qemu_img(&["create", "-q", "-f", "qcow2", &src, &size]);
            qemu_io(
                &src,
                &[
                    format!("write -P 0x21 0 {}", c.size / 2),
                    format!("write -P 0x32 {} {}", c.size * 3 / 4, c.size / 8),
                ],
            );
            qemu_img(&["convert", "-c", "-O", "qcow2", "-o", c.opts, &src, &img]);
        }
    }
    if matches!(
        c.setup,
        Setup::Prefilled | Setup::Snapshots | Setup::DataFile(_)
    ) {
        qemu_io(
            &img,
            &[
                format!("write -P 0x17 0 {}", c.size / 3),
                format!("write -z {} {}", c.size / 2, 4 * c.cs),
            ],
        );
    }
    if c.setup == Setup::Snapshots {
        qemu_img(&["snapshot", "-c", "s1", &img]);
        qemu_io(
            &img,
            &[
                format!("write -P 0x18 {} {}", c.size / 4, c.size / 2),
                format!("write -c -P 0x19 {} {}", c.size - 2 * c.cs, c.cs),
            ],
        );
        qemu_img(&["snapshot", "-c", "s2", &img]);
    }
    img
}

fn size_str(n: u64) -> String {
    n.to_string()
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

async fn run_case(c: Case, seed: u64, ops: usize) {
    run_case_with(c, seed, ops, serde_json::json!({})).await
}

/// [`run_case`] with extra qcow2 options (`extra`'s keys are added to the
/// node's options).
async fn run_case_with(c: Case, seed: u64, ops: usize, extra: serde_json::Value) {
    // SLUICE_SEED_OFFSET=n replays the workloads with other seeds.
    let seed = seed
        + std::env::var("SLUICE_SEED_OFFSET")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    let dir = TempDir::new(c.name);
    let img = prepare(&dir, &c);
    let mut model = qemu_raw(&img);
    let snapshots: Vec<(&str, Vec<u8>)> = if c.setup == Setup::Snapshots {
        ["s1", "s2"]
            .into_iter()
            .map(|n| (n, snapshot_raw(&img, n)))
            .collect()
    } else {
        Vec::new()
    };
    let v3 = !c.opts.contains("compat=0.10");
    let has_backing = c.setup == Setup::Backing;
    {
        let mut opts = sluice_drivers::open::image_options(&img, None).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            opts[k] = v.clone();
        }
        let o = open_opts(opts, false)
            .await
            .unwrap_or_else(|e| panic!("{}: open: {e}", c.name));
        let mut rng = SmallRng::seed_from_u64(seed);
        let size = c.size;
        if c.setup == Setup::Filled {
            let mut pos = 0;
            while pos < size {
                let n = (64 * KIB).min(size - pos);
                let data: Vec<u8> = (0..n).map(|i| ((pos + i) / 512 % 253) as u8 + 1).collect();
                o.root
                    .write(pos, IoBytes::copy_from(&data), WriteFlags::default())
                    .await
                    .unwrap_or_else(|e| panic!("{}: fill at {pos}: {e}", c.name));
                model[pos as usize..(pos + n) as usize].copy_from_slice(&data);
                pos += n;
            }
        }
        for op in 0..ops {
            let off = rng.gen_range(0..size);
            let max = (3 * c.cs).min(256 * KIB).min(size - off);
            let len = rng.gen_range(1..=max);
            let kind = rng.gen_range(0..100);
            let what = if kind < 50 {
                let b0: u8 = rng.gen();
                let data: Vec<u8> = (0..len)
                    .map(|i| b0.wrapping_add((i * 7 % 251) as u8))
                    .collect();
                o.root
                    .write(off, IoBytes::copy_from(&data), WriteFlags::default())
                    .await
                    .unwrap_or_else(|e| panic!("{}: op {op}: write {off}+{len}: {e}", c.name));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                "write"
            } else if kind < 70 {
                let flags = ZeroFlags {
                    may_unmap: rng.gen(),
                    ..ZeroFlags::default()
                };
                o.root
                    .write_zeroes(off, len, flags)
                    .await
                    .unwrap_or_else(|e| panic!("{}: op {op}: zeroes {off}+{len}: {e}", c.name));
                model[off as usize..(off + len) as usize].fill(0);
                "zeroes"
            } else if kind < 85 {
                o.root
                    .discard(off, len)
                    .await
                    .unwrap_or_else(|e| panic!("{}: op {op}: discard {off}+{len}: {e}", c.name));
                // A raw data file keeps its data: discard does nothing.
                if (v3 || !has_backing) && c.setup != Setup::DataFile(true) {
                    if let Some((s, e)) = whole_clusters(c.cs, size, off, len) {
                        model[s as usize..e as usize].fill(0);
                    }
                }
                "discard"
            } else {
                "read"
            };
            let got = o.root.read(off, len as usize).await.unwrap();
            assert_same(
                &format!("{}: op {op} ({what} {off}+{len})", c.name),
                &got,
                &model[off as usize..(off + len) as usize],
            );
        }
        o.root.flush().await.unwrap();
        assert_same(
            &format!("{}: whole image", c.name),
            &read_all(&o, MIB).await,
            &model,
        );
    }
    let out = std::process::Command::new("qemu-img")
        .args(["check", &img])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found") && !text.contains("leak"),
        "{}: qemu-img check: {text}",
        c.name
    );
    if c.setup == Setup::Filled {
        let h = sluice_qcow2::chain::read_header_file(&img).unwrap();
        let original = {
            let fresh = dir.path("fresh.qcow2");
            create_qcow2(&fresh, c.opts, &size_str(c.size));
            sluice_qcow2::chain::read_header_file(&fresh).unwrap()
        };
        assert!(
            h.refcount_table_clusters > original.refcount_table_clusters,
            "{}: the refcount table did not grow ({} clusters)",
            c.name,
            h.refcount_table_clusters
        );
    }
    let raw = dir.path("model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &img, &raw]);
    if c.setup == Setup::DataFile(true) {
        // The raw data file shows the disk by itself.
        let mut data = std::fs::read(data_file_path(&img)).unwrap();
        data.resize(model.len(), 0);
        assert_same(&format!("{}: raw data file", c.name), &data, &model);
    }
    for (name, data) in &snapshots {
        assert_same(
            &format!("{}: snapshot {name}", c.name),
            &snapshot_raw(&img, name),
            data,
        );
    }
}

#[tokio::test]
async fn random_writes_64k() {
    run_case(
        Case {
            name: "w64k",
            opts: "cluster_size=65536",
            cs: 65536,
            size: 8 * MIB,
            setup: Setup::Prefilled,
        },
        1,
        80,
    )
    .await;
}

#[tokio::test]
async fn random_writes_refcount_widths() {
    for (name, opts) in [
        ("rc1", "cluster_size=4096,refcount_bits=1"),
        ("rc2", "cluster_size=4096,refcount_bits=2"),
        ("rc8", "cluster_size=4096,refcount_bits=8"),
        ("rc64", "cluster_size=4096,refcount_bits=64"),
    ] {
        run_case(
            Case {
                name,
                opts,
                cs: 4096,
                size: 4 * MIB,
                setup: Setup::Empty,
            },
            2,
            60,
        )
        .await;
    }
}

#[tokio::test]
async fn random_writes_small_and_large_clusters() {
    run_case(
        Case {
            name: "c512",
            opts: "cluster_size=512",
            cs: 512,
            size: MIB,
            setup: Setup::Prefilled,
        },
        3,
        60,
    )
    .await;
    run_case(
        Case {
            name: "c2m",
            opts: "cluster_size=2097152",
            cs: 2 * MIB,
            size: 16 * MIB,
            setup: Setup::Empty,
        },
        4,
        30,
    )
    .await;
}

#[tokio::test]
async fn random_writes_extended_l2() {
    run_case(
        Case {
            name: "x64k",
            opts: "cluster_size=65536,extended_l2=on",
            cs: 65536,
            size: 8 * MIB,
            setup: Setup::Prefilled,
        },
        11,
        80,
    )
    .await;
    run_case(
        Case {
            name: "x32k-overlay",
            opts: "cluster_size=32768,extended_l2=on",
            cs: 32768,
            size: 4 * MIB,
            setup: Setup::Backing,
        },
        12,
        80,
    )
    .await;
    run_case(
        Case {
            name: "x16k-zstd",
            opts: "cluster_size=16384,extended_l2=on,compression_type=zstd",
            cs: 16384,
            size: 2 * MIB,
            setup: Setup::Compressed,
        },
        13,
        60,
    )
    .await;
}

#[tokio::test]
async fn refcount_table_grows() {
    // 512-byte clusters with 64-bit refcounts: one table cluster covers
    // 2 MiB of file, so filling 4 MiB grows the table more than once.
    run_case(
        Case {
            name: "grow",
            opts: "cluster_size=512,refcount_bits=64",
            cs: 512,
            size: 4 * MIB,
            setup: Setup::Filled,
        },
        10,
        40,
    )
    .await;
}

#[tokio::test]
async fn small_caches_write_back_under_pressure() {
    // 512-byte clusters: 128 L2 tables and dozens of refcount blocks, in
    // caches of two tables and two blocks: dirty tables are written back
    // to make room, in order, again and again (and the refcount table
    // grows with dirty blocks cached).
    let small = serde_json::json!({"l2-cache-size": 1024, "refcount-cache-size": 1024});
    run_case_with(
        Case {
            name: "small-caches",
            opts: "cluster_size=512,refcount_bits=64",
            cs: 512,
            size: 4 * MIB,
            setup: Setup::Filled,
        },
        14,
        120,
        small.clone(),
    )
    .await;
    run_case_with(
        Case {
            name: "small-caches-overlay",
            opts: "cluster_size=512",
            cs: 512,
            size: 4 * MIB,
            setup: Setup::Backing,
        },
        15,
        120,
        small,
    )
    .await;
}

#[tokio::test]
async fn random_writes_with_internal_snapshots() {
    for (name, opts, cs, seed) in [
        ("snap64k", "cluster_size=65536", 65536, 21),
        ("snap4k", "cluster_size=4096,refcount_bits=8", 4096, 22),
        ("snapext", "cluster_size=65536,extended_l2=on", 65536, 23),
        ("snapv2", "compat=0.10,cluster_size=65536", 65536, 24),
    ] {
        run_case(
            Case {
                name,
                opts,
                cs,
                size: 8 * MIB,
                setup: Setup::Snapshots,
            },
            seed,
            80,
        )
        .await;
    }
}

#[tokio::test]
async fn random_writes_with_an_external_data_file() {
    for (name, opts, cs, raw, seed) in [
        ("data64k", "cluster_size=65536", 65536, false, 31),
        ("dataraw", "cluster_size=65536", 65536, true, 32),
        ("data4k", "cluster_size=4096", 4096, false, 33),
        (
            "dataext",
            "cluster_size=65536,extended_l2=on",
            65536,
            false,
            34,
        ),
    ] {
        run_case(
            Case {
                name,
                opts,
                cs,
                size: 8 * MIB,
                setup: Setup::DataFile(raw),
            },
            seed,
            80,
        )
        .await;
    }
}

#[tokio::test]
async fn random_writes_version_2() {
    run_case(
        Case {
            name: "v2",
            opts: "compat=0.10,cluster_size=65536",
            cs: 65536,
            size: 8 * MIB,
            setup: Setup::Prefilled,
        },
        5,
        60,
    )
    .await;
    run_case(
        Case {
            name: "v2b",
            opts: "compat=0.10,cluster_size=4096",
            cs: 4096,
            size: 4 * MIB,
            setup: Setup::Backing,
        },
        6,
        60,
    )
    .await;
}

#[tokio::test]
async fn random_writes_over_a_backing_chain() {
    run_case(
        Case {
            name: "overlay",
            opts: "cluster_size=4096",
            cs: 4096,
            size: 4 * MIB,
            setup: Setup::Backing,
        },
        7,
        80,
    )
    .await;
}

#[tokio::test]
async fn random_writes_over_compressed_clusters() {
    run_case(
        Case {
            name: "zlib",
            opts: "cluster_size=65536,compression_type=zlib",
            cs: 65536,
            size: 4 * MIB,
            setup: Setup::Compressed,
        },
        8,
        60,
    )
    .await;
    run_case(
        Case {
            name: "zstd",
            opts: "cluster_size=4096,compression_type=zstd",
            cs: 4096,
            size: 2 * MIB,
            setup: Setup::Compressed,
        },
        9,
        60,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_shared_tables() {
    // Four tasks write to interleaved clusters (sharing L2 tables and
    // refcount blocks); each owns its clusters, so the model is exact.
    let dir = TempDir::new("concurrent");
    let img = dir.path("c.qcow2");
    let cs = 4096u64;
    let size = 2 * MIB;
    create_qcow2(&img, "cluster_size=4096", &size.to_string());
    let o = std::sync::Arc::new(open_image(&img, false).await.unwrap());
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let o = o.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(100 + t);
            let mut writes = Vec::new();
            for _ in 0..150 {
                let c = rng.gen_range(0..size / cs / 4) * 4 + t;
                let within = rng.gen_range(0..cs);
                let len = rng.gen_range(1..=cs - within);
                let off = c * cs + within;
                let b: u8 = rng.gen();
                let data = vec![b; len as usize];
                if rng.gen_range(0..5) == 0 {
                    o.root
                        .write_zeroes(off, len, ZeroFlags::default())
                        .await
                        .unwrap();
                    writes.push((off, vec![0; len as usize]));
                } else {
                    o.root
                        .write(off, IoBytes::copy_from(&data), WriteFlags::default())
                        .await
                        .unwrap();
                    writes.push((off, data));
                }
            }
            writes
        }));
    }
    let mut model = vec![0u8; size as usize];
    for t in tasks {
        for (off, data) in t.await.unwrap() {
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    o.root.flush().await.unwrap();
    assert_same("concurrent", &read_all(&o, MIB).await, &model);
    drop(o);
    let out = std::process::Command::new("qemu-img")
        .args(["check", &img])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check: {text}"
    );
    let raw = dir.path("model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &img, &raw]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_partial_writes_to_the_same_clusters() {
    // Eight tasks write to the same clusters of an overlay, each only in
    // its own eighth of every cluster: their allocations of one guest
    // cluster race (copy-on-write from the backing file included), so a
    // request must wait for another's allocation of the cluster instead
    // of allocating it again. Disjoint bytes keep the model exact. Small
    // caches make write-back happen while allocations are in flight.
    let dir = TempDir::new("concurrent-same");
    let base = dir.path("base.qcow2");
    let img = dir.path("top.qcow2");
    let cs = 4096u64;
    let size = 2 * MIB;
    qemu_img(&["create", "-q", "-f", "qcow2", &base, &size.to_string()]);
    qemu_io(&base, &[format!("write -P 0x5a 0 {size}")]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        &base,
        "-F",
        "qcow2",
        &img,
        &size.to_string(),
    ]);
    let mut opts = sluice_drivers::open::image_options(&img, None).unwrap();
    opts["l2-cache-size"] = serde_json::json!(8192);
    opts["refcount-cache-size"] = serde_json::json!(8192);
    let o = std::sync::Arc::new(open_opts(opts, false).await.unwrap());
    let tasks_n = 8u64;
    let part = cs / tasks_n;
    let mut tasks = Vec::new();
    for t in 0..tasks_n {
        let o = o.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(200 + t);
            let mut writes = Vec::new();
            for i in 0..300u64 {
                // Mostly the same clusters in the same order for every
                // task, so that allocations collide.
                let c = if rng.gen_range(0..4) == 0 {
                    rng.gen_range(0..size / cs)
                } else {
                    i % (size / cs)
                };
                let within = t * part + rng.gen_range(0..part / 2);
                let len = rng.gen_range(1..=t * part + part - within);
                let off = c * cs + within;
                if rng.gen_range(0..6) == 0 {
                    o.root
                        .write_zeroes(off, len, ZeroFlags::default())
                        .await
                        .unwrap();
                    writes.push((off, vec![0; len as usize]));
                } else {
                    let data = vec![rng.gen::<u8>() | 1; len as usize];
                    o.root
                        .write(off, IoBytes::copy_from(&data), WriteFlags::default())
                        .await
                        .unwrap();
                    writes.push((off, data));
                }
                if rng.gen_range(0..50) == 0 {
                    o.root.flush().await.unwrap();
                }
            }
            writes
        }));
    }
    let mut model = vec![0x5au8; size as usize];
    for t in tasks {
        for (off, data) in t.await.unwrap() {
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    o.root.flush().await.unwrap();
    assert_same("concurrent-same", &read_all(&o, MIB).await, &model);
    drop(o);
    let out = std::process::Command::new("qemu-img")
        .args(["check", &img])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found") && !text.contains("leak"),
        "qemu-img check: {text}"
    );
    let raw = dir.path("model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &img, &raw]);
}
