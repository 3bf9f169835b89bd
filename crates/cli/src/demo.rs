//! `sluice demo`: the built-in default. A guest writes to and reads from an
//! in-memory backing chain (base ← mid ← top) while the chain is shortened
//! live, as `block-stream` would do it: a copy-on-read filter is inserted
//! above top, every byte is read through it, the filter is dropped, and
//! top's backing is set to base — each change inside a drained section.
//! Every guest read is checked against a model of what the disk holds.

use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sluice_core::{Graph, IoBytes, PermPair, Role, WriteFlags};
use sluice_drivers::blockdev_add;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Disk size in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Guest I/O tasks.
    #[arg(long, default_value_t = 4)]
    tasks: usize,
    /// Random seed (printed; replays a run).
    #[arg(long)]
    seed: Option<u64>,
}

const CHUNK: u64 = 64 * 1024;

pub fn run(args: DemoArgs) -> Result<ExitCode, String> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let size = args.size_mib.max(1) << 20;
    let tasks = args.tasks.clamp(1, 64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(demo(size, tasks, seed))
}

async fn demo(size: u64, tasks: usize, seed: u64) -> Result<ExitCode, String> {
    let e = |e: sluice_core::Error| e.to_string();
    println!("sluice demo (seed {seed}): a {} MiB in-memory chain base <- mid <- top, {tasks} guest tasks", size >> 20);
    let graph = Graph::new();
    let w = graph.writer().await;
    let base = blockdev_add(
        &w,
        json!({"driver": "memory", "node-name": "base", "size": size}),
    )
    .await
    .map_err(e)?;
    let mid = blockdev_add(
        &w,
        json!({"driver": "memory", "node-name": "mid", "size": size, "backing": "base"}),
    )
    .await
    .map_err(e)?;
    drop(w);
    // base holds 0xBB everywhere; mid overwrites every other chunk with 0x4D.
    let mut model = vec![0xBBu8; size as usize];
    for (node, byte, every) in [(&base, 0xBBu8, 1u64), (&mid, 0x4D, 2)] {
        let w = graph.writer().await;
        let loader = w
            .add_root("demo", "loader", node, PermPair::writer())
            .await
            .map_err(e)?;
        drop(w);
        let data = IoBytes::copy_from(&vec![byte; CHUNK as usize]);
        for c in (0..size / CHUNK).filter(|c| c % every == 0) {
            loader
                .write(c * CHUNK, data.clone(), WriteFlags::default())
                .await
                .map_err(e)?;
            model[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize].fill(byte);
        }
    }
    let w = graph.writer().await;
    let top = blockdev_add(
        &w,
        json!({"driver": "memory", "node-name": "top", "size": size, "backing": "mid"}),
    )
    .await
    .map_err(e)?;
    let guest = Arc::new(
        w.add_root("block device", "guest", &top, PermPair::writer())
            .await
            .map_err(e)?,
    );
    drop(w);

    // Each guest task owns a slice of the disk, so the model is exact.
    let slice = size / tasks as u64 / CHUNK * CHUNK;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for t in 0..tasks {
        let (guest, stop) = (guest.clone(), stop.clone());
        let mut mine =
            model[(t as u64 * slice) as usize..((t as u64 + 1) * slice) as usize].to_vec();
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ t as u64);
            let (mut reads, mut writes) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads + writes < 64 {
                let off = rng.gen_range(0..slice - 4096);
                let len = rng.gen_range(1..=4096u64);
                let at = t as u64 * slice + off;
                if rng.gen_bool(0.3) {
                    let b: u8 = rng.gen();
                    guest
                        .write(
                            at,
                            IoBytes::copy_from(&vec![b; len as usize]),
                            WriteFlags::default(),
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    mine[off as usize..(off + len) as usize].fill(b);
                    writes += 1;
                } else {
                    let got = guest
                        .read(at, len as usize)
                        .await
                        .map_err(|e| e.to_string())?;
                    if got[..] != mine[off as usize..(off + len) as usize] {
                        return Err(format!(
                            "guest task {t}: read at {at} returned data the model does not hold"
                        ));
                    }
                    reads += 1;
                }
                tokio::task::yield_now().await;
            }
            Ok::<_, String>((reads, writes, mine))
        }));
    }

    // Shorten the chain live, as block-stream does.
    let started = Instant::now();
    let w = graph.writer().await;
    let cor = blockdev_add(
        &w,
        json!({"driver": "copy-on-read", "node-name": "cor", "file": "top"}),
    )
    .await
    .map_err(e)?;
    let t0 = Instant::now();
    let d = w.drain(&top).await;
    let drain_insert = t0.elapsed();
    w.insert_filter(&d, &top, &cor).await.map_err(e)?;
    drop(d);
    drop(w);
    println!("  inserted copy-on-read above top (drained in {drain_insert:?})");
    let w = graph.writer().await;
    let copier = w
        .add_root("job", "stream", &cor, PermPair::reader_sharing_all())
        .await
        .map_err(e)?;
    drop(w);
    for c in 0..size / CHUNK {
        copier.read(c * CHUNK, CHUNK as usize).await.map_err(e)?;
    }
    drop(copier);
    let w = graph.writer().await;
    let d = w.drain(&cor).await;
    w.drop_filter(&d, &cor).await.map_err(e)?;
    drop(d);
    let t0 = Instant::now();
    let d = w.drain(&top).await;
    let drain_set = t0.elapsed();
    w.set_backing(&d, &top, Some(&base)).await.map_err(e)?;
    drop(d);
    drop(w);
    println!("  copied {} MiB into top, dropped the filter, set top's backing to base (drained in {drain_set:?})", size >> 20);
    println!(
        "  chain now: base <- top; mid is {}",
        if graph.node("mid").is_ok() {
            "still present (user-owned)"
        } else {
            "gone"
        }
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut total = (0u64, 0u64);
    let mut final_model = Vec::with_capacity(size as usize);
    for r in join_all(workers).await {
        let (reads, writes, mine) = r.map_err(|e| e.to_string())??;
        total.0 += reads;
        total.1 += writes;
        final_model.extend(mine);
    }
    let covered = final_model.len();
    let all = guest.read(0, covered).await.map_err(e)?;
    let ok = all[..] == final_model[..];
    assert!(Arc::ptr_eq(
        &top.child(Role::Backing).ok_or("top lost its backing")?,
        &base
    ));
    println!(
        "  guest: {} reads and {} writes checked against the model during {:?}; final contents {}",
        total.0,
        total.1,
        started.elapsed(),
        if ok { "match" } else { "DIFFER" }
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
