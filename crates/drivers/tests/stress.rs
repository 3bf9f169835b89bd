//! Seeded random I/O from several tasks through two roots, checked against
//! an in-memory model, while another task keeps changing the graph under
//! them: inserting and dropping a copy-on-read filter, and swapping the
//! top's backing node between two nodes with equal contents.
//!
//! Set `SLUICE_STRESS_SEED=<n>` to replay a seed; a failure prints its seed.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sluice_core::{Graph, IoBytes, Perm, PermPair, Role, Root, WriteFlags, ZeroFlags};
use std::sync::Arc;

const DISK: u64 = MIB;
const TASKS: usize = 4;
const REGION: u64 = DISK / TASKS as u64;
const OPS_PER_TASK: usize = 600;
const GRAPH_CHANGES: usize = 150;
const CLUSTER: u64 = sluice_drivers::protocol::memory::CLUSTER;

fn seed() -> u64 {
    std::env::var("SLUICE_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// One task's random I/O on its own region; returns the region's final
/// expected contents.
async fn io_task(
    roots: [Arc<Root>; 2],
    task: usize,
    seed: u64,
    mut model: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let mut rng = StdRng::seed_from_u64(seed ^ (task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let base = task as u64 * REGION;
    for i in 0..OPS_PER_TASK {
        let root = &roots[rng.gen_range(0..2)];
        let off = rng.gen_range(0..REGION - 1);
        let len = rng.gen_range(1..=(REGION - off).min(20_000));
        let (lo, hi) = (off as usize, (off + len) as usize);
        match rng.gen_range(0..10) {
            0..=3 => {
                let byte: u8 = rng.gen();
                root.write(
                    base + off,
                    IoBytes::copy_from(&vec![byte; len as usize]),
                    WriteFlags::default(),
                )
                .await
                .map_err(|e| format!("op {i}: write: {e}"))?;
                model[lo..hi].fill(byte);
            }
            4 => {
                root.write_zeroes(
                    base + off,
                    len,
                    ZeroFlags {
                        may_unmap: true,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| format!("op {i}: write_zeroes: {e}"))?;
                model[lo..hi].fill(0);
            }
            5 => {
                root.discard(base + off, len)
                    .await
                    .map_err(|e| format!("op {i}: discard: {e}"))?;
                // The memory overlay turns whole discarded clusters into zeroes.
                let first = (base + off).div_ceil(CLUSTER) * CLUSTER;
                let last = (base + off + len) / CLUSTER * CLUSTER;
                if first < last {
                    model[(first - base) as usize..(last - base) as usize].fill(0);
                }
            }
            _ => {
                let got = root
                    .read(base + off, len as usize)
                    .await
                    .map_err(|e| format!("op {i}: read: {e}"))?;
                if got[..] != model[lo..hi] {
                    let at = got
                        .iter()
                        .zip(&model[lo..hi])
                        .position(|(a, b)| a != b)
                        .unwrap();
                    return Err(format!(
                        "op {i}: read at {} len {len}: byte {} is {:#x}, model says {:#x}",
                        base + off,
                        base + off + at as u64,
                        got[at],
                        model[lo + at]
                    ));
                }
            }
        }
    }
    Ok(model)
}

async fn graph_changer(graph: Graph, seed: u64) -> Result<usize, String> {
    let mut rng = StdRng::seed_from_u64(seed.rotate_left(17));
    let top = graph.node("top").unwrap();
    let (b1, b2) = (
        graph.node("backing1").unwrap(),
        graph.node("backing2").unwrap(),
    );
    let mut changes = 0;
    for i in 0..GRAPH_CHANGES {
        if rng.gen_bool(0.5) {
            let w = graph.writer().await;
            let cor =
                sluice_drivers::blockdev_add(&w, json!({"driver": "copy-on-read", "file": "top"}))
                    .await
                    .map_err(|e| format!("change {i}: add filter: {e}"))?;
            {
                let d = w.drain(&top).await;
                w.insert_filter(&d, &top, &cor)
                    .await
                    .map_err(|e| format!("change {i}: insert: {e}"))?;
            }
            // Like a stream job, copy a few ranges up through the filter
            // while the guests write: copy-up must never undo a guest write.
            let copier = w
                .add_root("job", "copier", &cor, PermPair::reader_sharing_all())
                .await
                .map_err(|e| format!("change {i}: copier: {e}"))?;
            drop(w);
            for _ in 0..4 {
                let off = rng.gen_range(0..DISK - 65536);
                copier
                    .read(off, 65536)
                    .await
                    .map_err(|e| format!("change {i}: copy-up read: {e}"))?;
            }
            drop(copier);
            let w = graph.writer().await;
            let d = w.drain(&cor).await;
            w.drop_filter(&d, &cor)
                .await
                .map_err(|e| format!("change {i}: drop: {e}"))?;
        } else {
            let w = graph.writer().await;
            let d = w.drain(&top).await;
            let next = if Arc::ptr_eq(&top.child(Role::Backing).unwrap(), &b1) {
                &b2
            } else {
                &b1
            };
            w.set_backing(&d, &top, Some(next))
                .await
                .map_err(|e| format!("change {i}: swap: {e}"))?;
        }
        changes += 1;
        tokio::task::yield_now().await;
    }
    Ok(changes)
}

#[test]
fn random_io_through_two_roots_while_the_graph_changes() {
    let seed = seed();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async move {
        let graph = Graph::new();
        // Two backing nodes with equal random contents, so swapping them
        // never changes what the guest sees.
        let mut rng = StdRng::seed_from_u64(seed);
        let initial: Vec<u8> = (0..DISK).map(|_| rng.gen()).collect();
        let w = graph.writer().await;
        for name in ["backing1", "backing2"] {
            add(
                &w,
                json!({"driver": "memory", "node-name": name, "size": DISK}),
            )
            .await;
        }
        drop(w);
        for name in ["backing1", "backing2"] {
            let n = graph.node(name).unwrap();
            let r = root_on(
                &graph,
                "loader",
                &n,
                PermPair::new(Perm::WRITE | Perm::CONSISTENT_READ, Perm::ALL),
            )
            .await
            .unwrap();
            r.write(0, IoBytes::copy_from(&initial), WriteFlags::default())
                .await
                .unwrap();
        }
        let w = graph.writer().await;
        let top = add(
            &w,
            json!({"driver": "memory", "node-name": "top", "size": DISK, "backing": "backing1"}),
        )
        .await;
        drop(w);
        let shared_writer = PermPair::new(Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL);
        let roots = [
            Arc::new(root_on(&graph, "vda", &top, shared_writer).await.unwrap()),
            Arc::new(root_on(&graph, "vdb", &top, shared_writer).await.unwrap()),
        ];
        let changer = tokio::spawn(graph_changer(graph.clone(), seed));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let model =
                initial[(t as u64 * REGION) as usize..((t as u64 + 1) * REGION) as usize].to_vec();
            tasks.push(tokio::spawn(io_task(roots.clone(), t, seed, model)));
        }
        let mut expected = Vec::new();
        for t in tasks {
            expected.extend(t.await.map_err(|e| e.to_string())??);
        }
        let changes = changer.await.map_err(|e| e.to_string())??;
        assert_eq!(changes, GRAPH_CHANGES);
        for r in &roots {
            let all = r.read(0, DISK as usize).await.map_err(|e| e.to_string())?;
            if all[..] != expected[..] {
                return Err("final contents differ from the model".to_string());
            }
            assert_eq!(r.node().name(), "top", "filters all dropped");
        }
        Ok::<(), String>(())
    });
    if let Err(e) = result {
        panic!("stress failed with SLUICE_STRESS_SEED={seed}: {e}");
    }
}
