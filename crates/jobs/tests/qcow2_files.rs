//! The job scenarios on qcow2 files: afterwards every image passes
//! `qemu-img check`, `qemu-img info --backing-chain` shows the chain sluice
//! wrote into the headers, and `qemu-img compare` finds the guest-visible
//! contents equal to the model.

mod common;
#[path = "../../drivers/tests/common/mod.rs"]
mod dcommon;
#[path = "../../qcow2/tests/common/mod.rs"]
mod qcommon;

use common::{
    assert_guest_view, seeded_rng, stream_cancelled_at_its_first_copy,
    writes_around_ready_then_complete, writes_into,
};

use qcommon::{create_overlay, create_qcow2, qemu_img, qemu_io, TempDir, MIB};
use rand::rngs::SmallRng;
use serde_json::{json, Value};
use sluice_core::{Graph, Node, Role, Root};
use sluice_jobs::backup::{self, BackupParams};
use sluice_jobs::commit::{self, CommitParams};
use sluice_jobs::mirror::{self, MirrorParams, SyncMode};
use sluice_jobs::stream::{self, StreamParams};
use sluice_jobs::{Job, JobManager, JobOptions, JobStatus};
use std::sync::Arc;

/// Files `name.qcow2` for each name, each backed by the one before, with
/// `fills` written by qemu-io: `(layer, offset, len, byte)`. Returns the
/// paths and the model of what the top shows.
fn make_chain(
    dir: &TempDir,
    names: &[&str],
    fills: &[(usize, u64, u64, u8)],
) -> (Vec<String>, Vec<u8>) {
    let mut paths: Vec<String> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let p = dir.path(&format!("{n}.qcow2"));
        match i {
            0 => create_qcow2(&p, "", "1M"),
            _ => create_overlay(&p, &paths[i - 1], "1M"),
        }
        paths.push(p);
    }
    let mut model = vec![0u8; MIB as usize];
    for &(layer, off, len, byte) in fills {
        qemu_io(&paths[layer], &[format!("write -P {byte} {off} {len}")]);
        model[off as usize..(off + len) as usize].fill(byte);
    }
    (paths, model)
}

/// Opens each file as a user node `names[i]` on top of the one before.
async fn open_chain(graph: &Graph, names: &[&str], paths: &[String]) -> Vec<Arc<Node>> {
    let w = graph.writer().await;
    let mut nodes = Vec::new();
    for (i, (n, p)) in names.iter().zip(paths).enumerate() {
        let backing = if i == 0 {
            Value::Null
        } else {
            json!(names[i - 1])
        };
        nodes.push(
            dcommon::add(
                &w,
                json!({"driver": "qcow2", "node-name": n, "backing": backing,
                       "file": {"driver": "file", "filename": p}}),
            )
            .await,
        );
    }
    nodes
}

/// Closes every node, top first, so caches reach the files.
async fn close_all(graph: &Graph, roots: Vec<Root>) {
    drop(roots);
    loop {
        let w = graph.writer().await;
        let Some(n) = graph.nodes().into_iter().find(|n| n.parents().is_empty()) else {
            break;
        };
        let d = w.drain(&n).await;
        w.delete_node(&d, &n).await.unwrap();
    }
}

/// `qemu-img check` clean, and compare equal to `model` (as raw).
fn assert_image(dir: &TempDir, img: &str, model: &[u8], seed: u64) {
    let out = qemu_img(&["check", "--output=json", img]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        v.get("corruptions").is_none() && v.get("leaks").is_none() && v["check-errors"] == 0,
        "seed {seed}: {img}: {out}"
    );
    let raw = dir.path("model.raw");
    std::fs::write(&raw, model).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", &raw, img])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "seed {seed}: {img} differs from the model: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The chain `qemu-img info --backing-chain` reads from the headers.
fn chain_of(img: &str) -> Vec<String> {
    let out = qemu_img(&["info", "--backing-chain", "--output=json", img]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_string())
        .collect()
}

/// base.qcow2 filled, then an intermediate and a top layer each partly.
const COMMIT_FILLS: &[(usize, u64, u64, u8)] = &[
    (0, 0, MIB, 0x11),
    (1, 128 << 10, 512 << 10, 0x22),
    (2, 0, 64 << 10, 0x33),
];

/// base.qcow2 filled, top.qcow2 over its first 256 KiB.
const BASE_TOP_FILLS: &[(usize, u64, u64, u8)] = &[(0, 0, MIB, 0x11), (1, 0, 256 << 10, 0x22)];

/// A `make_chain` opened in a fresh graph with the guest on the top node.
struct Chain {
    dir: TempDir,
    paths: Vec<String>,
    model: Vec<u8>,
    graph: Graph,
    nodes: Vec<Arc<Node>>,
    guest: Root,
    jobs: JobManager,
}

async fn guest_chain(tag: &str, names: &[&str], fills: &[(usize, u64, u64, u8)]) -> Chain {
    let dir = TempDir::new(tag);
    let (paths, model) = make_chain(&dir, names, fills);
    let graph = Graph::new();
    let nodes = open_chain(&graph, names, &paths).await;
    let guest = dcommon::guest_on(&graph, nodes.last().unwrap()).await;
    let jobs = JobManager::new(graph.clone());
    Chain {
        dir,
        paths,
        model,
        graph,
        nodes,
        guest,
        jobs,
    }
}

impl Chain {
    /// Drops the nodes and the guest and closes every node, so the files
    /// are final; returns the directory, the paths and the model.
    async fn close(self) -> (TempDir, Vec<String>, Vec<u8>) {
        drop(self.nodes);
        close_all(&self.graph, vec![self.guest]).await;
        (self.dir, self.paths, self.model)
    }
}

/// 24 guest writes while `job` runs; it concludes without error and the
/// guest reads the model.
async fn writes_then_concluded(job: &Arc<Job>, c: &mut Chain, rng: &mut SmallRng, seed: u64) {
    writes_into(&c.guest, rng, 24, &mut c.model).await;
    assert_eq!(job.wait_concluded().await, None, "seed {seed}");
    assert_guest_view(&c.guest, &c.model, seed).await;
}

/// A fresh `target.qcow2` in `dir`, opened as node `target`.
async fn add_target(dir: &TempDir, graph: &Graph) -> (String, Arc<Node>) {
    let target = dir.path("target.qcow2");
    create_qcow2(&target, "", "1M");
    let w = graph.writer().await;
    let t = dcommon::add(&w, json!({"driver": "qcow2", "node-name": "target", "file": {"driver": "file", "filename": target}})).await;
    (target, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_to_an_intermediate_base_on_qcow2_files() {
    let (seed, mut rng) = seeded_rng();
    let mut c = guest_chain(
        "stream",
        &["base", "m1", "m2", "top"],
        &[
            (0, 0, MIB, 0x11),
            (1, 256 << 10, 256 << 10, 0x22),
            (2, 384 << 10, 256 << 10, 0x33),
            (3, 0, 64 << 10, 0x44),
        ],
    )
    .await;
    let job = stream::start(
        &c.jobs,
        JobOptions::new("s"),
        StreamParams::new(&c.nodes[3], Some(&c.nodes[1])),
    )
    .await
    .unwrap();
    writes_then_concluded(&job, &mut c, &mut rng, seed).await;
    let (dir, paths, model) = c.close().await;
    assert_eq!(
        chain_of(&paths[3]),
        [paths[3].as_str(), &paths[1], &paths[0]]
    );
    for p in &paths {
        qemu_img(&["check", p]);
    }
    assert_image(&dir, &paths[3], &model, seed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_commit_on_qcow2_files() {
    let (seed, mut rng) = seeded_rng();
    let mut c = guest_chain("commit", &["base", "mid", "top"], COMMIT_FILLS).await;
    let params = CommitParams {
        top: c.nodes[1].clone(),
        base: c.nodes[0].clone(),
        backing_file: None,
        filter_node_name: None,
    };
    let job = commit::start(&c.jobs, JobOptions::new("c"), params)
        .await
        .unwrap();
    writes_then_concluded(&job, &mut c, &mut rng, seed).await;
    let (dir, paths, model) = c.close().await;
    assert_eq!(chain_of(&paths[2]), [paths[2].as_str(), &paths[0]]);
    qemu_img(&["check", &paths[0]]);
    assert_image(&dir, &paths[2], &model, seed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_commit_and_mirror_on_qcow2_files() {
    let (seed, mut rng) = seeded_rng();
    // Active commit: the guest ends up on base.qcow2.
    let mut c = guest_chain(
        "active",
        &["base", "top"],
        &[(0, 0, MIB, 0x11), (1, 512 << 10, 128 << 10, 0x22)],
    )
    .await;
    let job = mirror::start_active_commit(
        &c.jobs,
        JobOptions::new("c"),
        &c.nodes[1],
        &c.nodes[0],
        None,
    )
    .await
    .unwrap();
    writes_around_ready_then_complete(&job, &c.guest, &mut rng, 16, &mut c.model, seed).await;
    assert!(Arc::ptr_eq(&c.guest.node(), &c.nodes[0]));
    let (dir, paths, model) = c.close().await;
    assert_image(&dir, &paths[0], &model, seed);

    // Mirror to a fresh image: the guest ends up on target.qcow2.
    let mut c = guest_chain("mirror", &["base", "top"], BASE_TOP_FILLS).await;
    let (target, t) = add_target(&c.dir, &c.graph).await;
    let job = mirror::start(
        &c.jobs,
        JobOptions::new("m"),
        MirrorParams::new(&c.nodes[1], &t, SyncMode::Full),
    )
    .await
    .unwrap();
    writes_around_ready_then_complete(&job, &c.guest, &mut rng, 16, &mut c.model, seed).await;
    drop(t);
    let (dir, _, model) = c.close().await;
    assert_image(&dir, &target, &model, seed);
    assert_eq!(chain_of(&target), [target.as_str()]);
}

#[tokio::test]
async fn backup_to_a_qcow2_file_is_point_in_time() {
    let (seed, mut rng) = seeded_rng();
    let c = guest_chain("backup", &["base", "top"], BASE_TOP_FILLS).await;
    let (target, t) = add_target(&c.dir, &c.graph).await;
    let job = backup::start(
        &c.jobs,
        JobOptions::new("b"),
        BackupParams::new(&c.nodes[1], &t, SyncMode::Full),
    )
    .await
    .unwrap();
    job.pause().unwrap();
    job.wait_for(|s| s == JobStatus::Paused).await;
    let mut now = c.model.clone();
    writes_into(&c.guest, &mut rng, 32, &mut now).await;
    job.resume().unwrap();
    assert_eq!(job.wait_concluded().await, None, "seed {seed}");
    drop(t);
    let (dir, paths, at_start) = c.close().await;
    assert_image(&dir, &target, &at_start, seed);
    assert_image(&dir, &paths[1], &now, seed);
}

/// top.qcow2 ← blkdebug `dbg` ← mid.qcow2 (0x5A everywhere) ← base.qcow2.
async fn open_with_blkdebug(graph: &Graph, paths: &[String], inject: Value) -> Arc<Node> {
    let w = graph.writer().await;
    dcommon::add(
        &w,
        json!({"driver": "qcow2", "node-name": "base", "backing": null,
        "file": {"driver": "file", "filename": paths[0]}}),
    )
    .await;
    dcommon::add(
        &w,
        json!({"driver": "qcow2", "node-name": "mid", "backing": "base",
        "file": {"driver": "file", "filename": paths[1]}}),
    )
    .await;
    dcommon::add(&w, json!({"driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": paths[2]},
        "backing": {"driver": "blkdebug", "node-name": "dbg", "image": "mid", "inject-error": inject}})).await
}

#[tokio::test]
async fn stream_cancelled_half_way_and_stopped_by_an_error_on_qcow2_files() {
    let names = ["base", "mid", "top"];
    // Cancelled while its first copy is parked: chain unchanged, images clean.
    let dir = TempDir::new("cancel");
    let (paths, model) = make_chain(&dir, &names, &[(0, 0, MIB, 0x11), (1, 0, MIB, 0x5A)]);
    let graph = Graph::new();
    let top = open_with_blkdebug(&graph, &paths, json!([])).await;
    let dbg = graph.node("dbg").unwrap();
    let jobs = JobManager::new(graph.clone());
    stream_cancelled_at_its_first_copy(&jobs, &top, &dbg).await;
    drop((top, dbg));
    close_all(&graph, vec![]).await;
    assert_eq!(
        chain_of(&paths[2]),
        [paths[2].as_str(), &paths[1], &paths[0]]
    );
    assert_image(&dir, &paths[2], &model, 0);

    // A read error with on-error=stop, then resume: the whole chain is
    // streamed and top stands alone.
    let dir = TempDir::new("stop");
    let (paths, model) = make_chain(
        &dir,
        &names,
        &[(0, 0, MIB, 0x11), (1, 256 << 10, 256 << 10, 0x5A)],
    );
    let graph = Graph::new();
    let top = open_with_blkdebug(
        &graph,
        &paths,
        json!([{"event": "read_backing_aio", "errno": 5, "once": true}]),
    )
    .await;
    let jobs = JobManager::new(graph.clone());
    let mut o = JobOptions::new("s");
    o.on_error = sluice_jobs::OnError::Stop;
    let job = stream::start(&jobs, o, StreamParams::new(&top, None))
        .await
        .unwrap();
    job.wait_for(|s| s == JobStatus::Paused).await;
    job.resume().unwrap();
    assert_eq!(job.wait_concluded().await, None);
    drop(top);
    close_all(&graph, vec![]).await;
    assert_eq!(chain_of(&paths[2]), [paths[2].as_str()]);
    assert_image(&dir, &paths[2], &model, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_soft_cancel_after_ready_on_qcow2_files() {
    let (seed, mut rng) = seeded_rng();
    let mut c = guest_chain(
        "softcancel",
        &["base", "top"],
        &[(0, 0, MIB, 0x11), (1, 0, 128 << 10, 0x22)],
    )
    .await;
    let (target, t) = add_target(&c.dir, &c.graph).await;
    let job = mirror::start(
        &c.jobs,
        JobOptions::new("m"),
        MirrorParams::new(&c.nodes[1], &t, SyncMode::Full),
    )
    .await
    .unwrap();
    job.wait_for(|s| s == JobStatus::Ready).await;
    writes_into(&c.guest, &mut rng, 24, &mut c.model).await;
    job.cancel(false).await.unwrap();
    assert_eq!(job.wait_concluded().await, None, "seed {seed}");
    assert!(Arc::ptr_eq(&c.guest.node(), &c.nodes[1]), "no pivot");
    drop(t);
    let (dir, paths, model) = c.close().await;
    assert_image(&dir, &target, &model, seed);
    assert_image(&dir, &paths[1], &model, seed);
}

/// A chain opened from the overlay's header has read-only backing nodes:
/// commit (intermediate, then active) switches the base read-write for
/// the job, and back to read-only when an intermediate commit ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_into_a_read_only_base_opened_from_headers() {
    let (seed, mut rng) = seeded_rng();
    let dir = TempDir::new("commit-ro-base");
    let (paths, mut model) = make_chain(&dir, &["base", "mid", "top"], COMMIT_FILLS);
    let graph = Graph::new();
    let w = graph.writer().await;
    let top = dcommon::add(
        &w,
        json!({"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "filename": paths[2]}}),
    )
    .await;
    drop(w);
    let mid = top.child(Role::Backing).unwrap();
    let base = mid.child(Role::Backing).unwrap();
    assert!(mid.is_read_only() && base.is_read_only());
    let guest = dcommon::guest_on(&graph, &top).await;
    let jobs = JobManager::new(graph.clone());
    let params = CommitParams {
        top: mid.clone(),
        base: base.clone(),
        backing_file: None,
        filter_node_name: None,
    };
    let job = commit::start(&jobs, JobOptions::new("c"), params)
        .await
        .unwrap();
    assert!(!base.is_read_only(), "writable while the job runs");
    writes_into(&guest, &mut rng, 24, &mut model).await;
    assert_eq!(job.wait_concluded().await, None, "seed {seed}");
    assert!(base.is_read_only(), "read-only again after the job");
    assert!(base.child(Role::File).unwrap().is_read_only());
    assert!(Arc::ptr_eq(&top.child(Role::Backing).unwrap(), &base));
    assert_guest_view(&guest, &model, seed).await;

    // Active commit into the same read-only base: base takes top's place
    // and stays writable.
    let job = mirror::start_active_commit(&jobs, JobOptions::new("a"), &top, &base, None)
        .await
        .unwrap();
    writes_around_ready_then_complete(&job, &guest, &mut rng, 16, &mut model, seed).await;
    assert!(Arc::ptr_eq(&guest.node(), &base));
    assert!(!base.is_read_only());
    assert_guest_view(&guest, &model, seed).await;
    drop((top, mid, base));
    close_all(&graph, vec![guest]).await;
    // The intermediate commit pointed top's header at base.
    assert_eq!(chain_of(&paths[2]), [paths[2].as_str(), &paths[0]]);
    for p in &paths {
        qemu_img(&["check", p]);
    }
    assert_image(&dir, &paths[0], &model, seed);
}

/// A stream into a top opened read-only (as a backing chain is opened from
/// headers): the job makes it writable, streams, and puts it back.
#[tokio::test]
async fn stream_into_a_read_only_top_opened_from_headers() {
    let dir = TempDir::new("stream-ro-top");
    let names = ["base", "top"];
    let (paths, model) = make_chain(&dir, &names, &[(0, 0, MIB, 0x11), (1, 0, 64 << 10, 0x22)]);
    let graph = Graph::new();
    let w = graph.writer().await;
    let top = dcommon::add(
        &w,
        json!({"driver": "qcow2", "node-name": "top", "read-only": true,
               "file": {"driver": "file", "filename": paths[1]}}),
    )
    .await;
    drop(w);
    assert!(top.is_read_only());
    let jobs = JobManager::new(graph.clone());
    let job = stream::start(&jobs, JobOptions::new("s"), StreamParams::new(&top, None))
        .await
        .unwrap();
    assert!(!top.is_read_only(), "writable while the job runs");
    assert_eq!(job.wait_concluded().await, None);
    assert!(top.is_read_only(), "read-only again after the job");
    assert!(top.child(Role::Backing).is_none());
    drop(top);
    close_all(&graph, vec![]).await;
    assert_eq!(chain_of(&paths[1]), [paths[1].as_str()]);
    assert_image(&dir, &paths[1], &model, 0);
}
