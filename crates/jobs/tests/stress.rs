//! Seeded stress: a guest writes at random through its root against a
//! model while one job after another — stream, intermediate commit,
//! active commit, mirror with pivot, backup — reshapes the chain under
//! it. After every job the guest's view equals the model. A failing run
//! prints its seed; `SLUICE_STRESS_SEED` replays it.

#[path = "../../drivers/tests/common/mod.rs"]
mod dcommon;

use dcommon::{add, fill, root_on, MIB};
use parking_lot::Mutex;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde_json::json;
use sluice_core::{Graph, IoBytes, Node, PermPair, Role, Root, WriteFlags};
use sluice_jobs::backup::{self, BackupParams};
use sluice_jobs::chain::skip_filters;
use sluice_jobs::commit::{self, CommitParams};
use sluice_jobs::mirror::{self, MirrorParams, SyncMode};
use sluice_jobs::stream::{self, StreamParams};
use sluice_jobs::{JobManager, JobOptions, JobStatus};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

/// The chain below the guest's node, top first (filters skipped).
fn chain(top: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut out = vec![skip_filters(top)];
    while let Some(b) = out.last().unwrap().child(Role::Backing) {
        out.push(skip_filters(&b));
    }
    out
}

async fn writer(root: Arc<Root>, model: Arc<Mutex<Vec<u8>>>, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    while !stop.load(SeqCst) {
        let len = rng.gen_range(1..=4) * 4096;
        let off = rng.gen_range(0..(MIB as usize - len) / 4096) * 4096;
        let byte: u8 = rng.gen();
        // The model follows only once the write is done: the checks run
        // when no write is in flight.
        root.write(
            off as u64,
            IoBytes::copy_from(&vec![byte; len]),
            WriteFlags::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: guest write: {e}"));
        model.lock()[off..off + len].fill(byte);
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_reshape_the_chain_under_a_writing_guest() {
    let seed: u64 = std::env::var("SLUICE_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (SLUICE_STRESS_SEED={seed} replays it)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let graph = Graph::new();
    let w = graph.writer().await;
    let mut prev: Option<String> = None;
    for i in 0..4 {
        let mut o = json!({"driver": "memory", "node-name": format!("l{i}"), "size": MIB});
        if let Some(p) = &prev {
            o["backing"] = json!(p);
        }
        add(&w, o).await;
        prev = Some(format!("l{i}"));
    }
    drop(w);
    let mut model = vec![0u8; MIB as usize];
    for i in 0..4u64 {
        let (off, len) = ((i * 200) << 10, 256usize << 10);
        fill(
            &graph,
            &graph.node(&format!("l{i}")).unwrap(),
            off,
            len,
            0x10 + i as u8,
        )
        .await;
        model[off as usize..off as usize + len].fill(0x10 + i as u8);
    }
    let model = Arc::new(Mutex::new(model));
    let guest = Arc::new(
        root_on(
            &graph,
            "guest",
            &graph.node("l3").unwrap(),
            PermPair::writer(),
        )
        .await
        .unwrap(),
    );
    let jobs = JobManager::new(graph.clone());
    let mut extra = 0;
    for round in 0..12 {
        let stop = Arc::new(AtomicBool::new(false));
        let w = tokio::spawn(writer(
            guest.clone(),
            model.clone(),
            seed + round,
            stop.clone(),
        ));
        let c = chain(&guest.node());
        let id = format!("j{round}");
        let kind = rng.gen_range(0..5);
        let job = match kind {
            0 if c.len() >= 2 => {
                // Stream into the top from a random base (or all of it).
                let base = rng.gen_range(1..=c.len());
                let base = c.get(base).cloned();
                stream::start(
                    &jobs,
                    JobOptions::new(&id),
                    StreamParams::new(&c[0], base.as_ref()),
                )
                .await
            }
            1 if c.len() >= 3 => {
                let top = rng.gen_range(1..c.len() - 1);
                let base = rng.gen_range(top + 1..c.len());
                let p = CommitParams {
                    top: c[top].clone(),
                    base: c[base].clone(),
                    backing_file: None,
                    filter_node_name: None,
                };
                commit::start(&jobs, JobOptions::new(&id), p).await
            }
            2 if c.len() >= 2 => {
                mirror::start_active_commit(&jobs, JobOptions::new(&id), &c[0], &c[1], None).await
            }
            3 => {
                extra += 1;
                let t = dcommon::memory_node(&graph, &format!("m{extra}"), None).await;
                mirror::start(
                    &jobs,
                    JobOptions::new(&id),
                    MirrorParams::new(&c[0], &t, SyncMode::Full),
                )
                .await
            }
            _ => {
                extra += 1;
                let t = dcommon::memory_node(&graph, &format!("b{extra}"), None).await;
                backup::start(
                    &jobs,
                    JobOptions::new(&id),
                    BackupParams::new(&c[0], &t, SyncMode::Full),
                )
                .await
            }
        }
        .unwrap_or_else(|e| panic!("seed {seed} round {round}: starting job kind {kind}: {e}"));
        if job.job_type() == "mirror" || (job.job_type() == "commit" && kind == 2) {
            job.wait_for(|s| s == JobStatus::Ready).await;
            job.complete().unwrap();
        }
        assert_eq!(
            job.wait_concluded().await,
            None,
            "seed {seed} round {round} kind {kind}"
        );
        stop.store(true, SeqCst);
        w.await.unwrap();
        let want = model.lock().clone();
        let got = guest.read(0, MIB as usize).await.unwrap();
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            panic!(
                "seed {seed} round {round} kind {kind}: byte {i} is {:#x}, the model says {:#x}",
                got[i], want[i]
            );
        }
    }
}
