//! Drain latency: the time from `drain()` begin to drained, with 64
//! requests in flight on a `null-co` node with `latency-ns`.
//!
//! cargo run --release -p sluice-drivers --example drain_latency -- [LATENCY_NS] [ITERATIONS]

use serde_json::json;
use sluice_core::{Graph, PermPair};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IN_FLIGHT: usize = 64;

fn main() {
    let mut args = std::env::args().skip(1);
    let latency_ns: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let iterations: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000)
        .max(1);
    if latency_ns == 0 {
        eprintln!(
            "drain_latency: LATENCY_NS must be above 0, or no request stays in flight to drain"
        );
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let samples = rt.block_on(async move {
        let graph = Graph::new();
        let w = graph.writer().await;
        let node = sluice_drivers::blockdev_add(
            &w,
            json!({"driver": "null-co", "node-name": "null", "latency-ns": latency_ns}),
        )
        .await
        .unwrap();
        let root = Arc::new(
            w.add_root("block device", "guest", &node, PermPair::writer())
                .await
                .unwrap(),
        );
        drop(w);
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..IN_FLIGHT {
            let (root, stop) = (root.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    root.read((i as u64) * 4096, 4096).await.unwrap();
                }
            }));
        }
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            // Start each drain with every request in flight.
            while root.in_flight() < IN_FLIGHT {
                tokio::task::yield_now().await;
            }
            let w = graph.writer().await;
            let t = Instant::now();
            let drained = w.drain(&node).await;
            samples.push(t.elapsed());
            assert_eq!(
                node.in_flight(),
                0,
                "drained: nothing in flight in the node"
            );
            drop(drained);
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        samples
    });
    let mut s: Vec<Duration> = samples;
    s.sort();
    let pct = |p: f64| s[((s.len() as f64 * p) as usize).min(s.len() - 1)];
    println!(
        "drain latency, {IN_FLIGHT} requests in flight on null-co latency-ns={latency_ns}, {} drains: median {:?}, p99 {:?}, max {:?}",
        s.len(),
        pct(0.5),
        pct(0.99),
        s[s.len() - 1]
    );
}
