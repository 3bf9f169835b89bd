//! A test-only protocol driver that simulates power loss.
//!
//! [`RecordingFile`] keeps an image file in memory and records, in order,
//! every write, write-zeroes, discard and flush that reaches it, with the
//! data. A [`Record`] then builds the file as it could be on disk after a
//! crash "at point k" (after the first `k` events): every write before the
//! last flush preceding `k` is there; of the writes between that flush and
//! `k`, any subset may have reached the disk, in any order ([`Pick`]);
//! nothing after `k` did.
//!
//! Each recorded write is labelled with the last debug event the format
//! driver raised on the edge (`refblock_update`, `l2_update`, ...), so a
//! failing crash point can be told in the driver's own terms.
#![allow(dead_code)]

use async_trait::async_trait;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sluice_core::{
    BlockDriver, DebugEvent, DriverStatus, GraphWriter, IoBytes, Node, NodeName, NodeSpec, ReadBuf,
    Result, WriteFlags, ZeroFlags,
};
use std::fmt;
use std::sync::Arc;

/// One request that reached the file.
#[derive(Clone)]
pub enum Event {
    Write {
        offset: u64,
        data: Arc<[u8]>,
        /// Forced unit access: durable when it completed.
        fua: bool,
        /// The debug event the parent raised last before this write.
        label: &'static str,
    },
    /// Write-zeroes or discard (a punched hole reads as zeroes).
    Zero {
        offset: u64,
        len: u64,
        label: &'static str,
    },
    Flush,
}

impl Event {
    pub fn is_flush(&self) -> bool {
        matches!(self, Event::Flush)
    }

    fn apply(&self, img: &mut Vec<u8>) {
        let (offset, len) = match self {
            Event::Write { offset, data, .. } => (*offset, data.len() as u64),
            Event::Zero { offset, len, .. } => (*offset, *len),
            Event::Flush => return,
        };
        let end = (offset + len) as usize;
        if img.len() < end {
            img.resize(end, 0);
        }
        match self {
            Event::Write { data, .. } => img[offset as usize..end].copy_from_slice(data),
            _ => img[offset as usize..end].fill(0),
        }
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Write {
                offset,
                data,
                fua,
                label,
            } => write!(
                f,
                "write {offset:#x}+{:#x} after '{label}'{}",
                data.len(),
                if *fua { " (fua)" } else { "" }
            ),
            Event::Zero { offset, len, label } => {
                write!(f, "zero {offset:#x}+{len:#x} after '{label}'")
            }
            Event::Flush => write!(f, "flush"),
        }
    }
}

struct Inner {
    initial: Arc<Vec<u8>>,
    current: Vec<u8>,
    events: Vec<Event>,
    label: &'static str,
}

/// The shared log of a [`RecordingFile`].
pub struct Recorder {
    inner: Mutex<Inner>,
}

impl Recorder {
    /// Events recorded so far.
    pub fn len(&self) -> usize {
        self.inner.lock().events.len()
    }

    /// The file as the driver above sees it now.
    pub fn current(&self) -> Vec<u8> {
        self.inner.lock().current.clone()
    }

    /// The initial contents and every event so far.
    pub fn record(&self) -> Record {
        let g = self.inner.lock();
        Record {
            initial: g.initial.clone(),
            events: g.events.clone(),
        }
    }
}

/// The driver: an in-memory file that records what reaches it.
pub struct RecordingFile {
    rec: Arc<Recorder>,
}

impl RecordingFile {
    pub fn new(image: Vec<u8>) -> (RecordingFile, Arc<Recorder>) {
        let rec = Arc::new(Recorder {
            inner: Mutex::new(Inner {
                initial: Arc::new(image.clone()),
                current: image,
                events: Vec::new(),
                label: "none",
            }),
        });
        (RecordingFile { rec: rec.clone() }, rec)
    }
}

/// Adds a recording file node named `name` holding `image`; open a format
/// on it with `"file": name`.
pub async fn add_recording_file(
    w: &GraphWriter<'_>,
    name: &str,
    image: Vec<u8>,
) -> Result<(Arc<Node>, Arc<Recorder>)> {
    let size = image.len() as u64;
    let (driver, rec) = RecordingFile::new(image);
    let node = w
        .add_node(NodeSpec {
            name: Some(NodeName::new(name)?),
            driver: Box::new(driver),
            size,
            read_only: false,
            children: Vec::new(),
            implicit: false,
        })
        .await?;
    Ok((node, rec))
}

#[async_trait]
impl BlockDriver for RecordingFile {
    fn driver_name(&self) -> &'static str {
        "crash-recorder"
    }

    async fn read(&self, _node: &Node, offset: u64, mut buf: ReadBuf<'_>) -> Result<()> {
        let g = self.rec.inner.lock();
        let out = buf.as_mut_slice();
        let start = (offset as usize).min(g.current.len());
        let n = (g.current.len() - start).min(out.len());
        out[..n].copy_from_slice(&g.current[start..start + n]);
        out[n..].fill(0);
        Ok(())
    }

    async fn write(
        &self,
        _node: &Node,
        offset: u64,
        data: IoBytes,
        flags: WriteFlags,
    ) -> Result<()> {
        let mut g = self.rec.inner.lock();
        let label = g.label;
        let ev = Event::Write {
            offset,
            data: Arc::from(&data[..]),
            fua: flags.fua,
            label,
        };
        ev.apply(&mut g.current);
        g.events.push(ev);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        _node: &Node,
        offset: u64,
        len: u64,
        _flags: ZeroFlags,
    ) -> Result<()> {
        let mut g = self.rec.inner.lock();
        let label = g.label;
        let ev = Event::Zero { offset, len, label };
        ev.apply(&mut g.current);
        g.events.push(ev);
        Ok(())
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(node, offset, len, ZeroFlags::default())
            .await
    }

    async fn flush(&self, _node: &Node) -> Result<()> {
        self.rec.inner.lock().events.push(Event::Flush);
        Ok(())
    }

    async fn block_status(&self, _node: &Node, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus::Data {
            len,
            offset: Some(offset),
        })
    }

    fn handles_debug_events(&self) -> bool {
        true
    }

    async fn debug_event(&self, _node: &Node, event: DebugEvent) {
        self.rec.inner.lock().label = event.name();
    }
}

/// Which of the unflushed writes before the crash point reached the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pick {
    /// Every one, in order (the file as it was at point k).
    All,
    /// None (only what the last flush made durable).
    None,
    /// A random subset in a random order, from this seed.
    Random(u64),
}

impl fmt::Display for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pick::All => write!(f, "all"),
            Pick::None => write!(f, "none"),
            Pick::Random(s) => write!(f, "random({s:#x})"),
        }
    }
}

/// A recorded run: the initial file and what reached it.
pub struct Record {
    pub initial: Arc<Vec<u8>>,
    pub events: Vec<Event>,
}

/// The file after a crash, and how it was made.
pub struct Crash {
    pub image: Vec<u8>,
    /// Events `0..durable` are all on disk (the last flush before the crash
    /// point is event `durable - 1`; 0 when there was none).
    pub durable: usize,
    /// The unflushed writes before the crash point (event indices).
    pub window: Vec<usize>,
    /// Those that reached the disk, in the order they were applied.
    pub applied: Vec<usize>,
}

impl Record {
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// How many leading events a crash at point `k` keeps for certain:
    /// up to and including the last flush among the first `k` events.
    pub fn durable_at(&self, k: usize) -> usize {
        self.events[..k]
            .iter()
            .rposition(Event::is_flush)
            .map_or(0, |i| i + 1)
    }

    /// The unflushed writes (event indices) a crash at `k` may keep or lose.
    pub fn window_at(&self, k: usize) -> Vec<usize> {
        (self.durable_at(k)..k)
            .filter(|&i| !self.events[i].is_flush())
            .collect()
    }

    /// The file after a crash at `k`, starting from `durable_image`, the
    /// file with events `0..self.durable_at(k)` applied (see
    /// [`Durable`], which keeps it up to date for rising `k`).
    pub fn crash_from(&self, durable_image: &[u8], k: usize, pick: Pick) -> Crash {
        let durable = self.durable_at(k);
        let window = self.window_at(k);
        let applied: Vec<usize> = match pick {
            Pick::All => window.clone(),
            Pick::None => window
                .iter()
                .copied()
                .filter(|&i| matches!(self.events[i], Event::Write { fua: true, .. }))
                .collect(),
            Pick::Random(seed) => {
                let mut rng = SmallRng::seed_from_u64(seed);
                let mut v: Vec<usize> = window
                    .iter()
                    .copied()
                    .filter(|&i| {
                        matches!(self.events[i], Event::Write { fua: true, .. })
                            || rng.gen_bool(0.5)
                    })
                    .collect();
                v.shuffle(&mut rng);
                v
            }
        };
        let mut image = durable_image.to_vec();
        for &i in &applied {
            self.events[i].apply(&mut image);
        }
        Crash {
            image,
            durable,
            window,
            applied,
        }
    }

    /// The file after a crash at `k` (from scratch).
    pub fn crash(&self, k: usize, pick: Pick) -> Crash {
        let mut d = Durable::new(self);
        d.advance_to(self, self.durable_at(k));
        self.crash_from(&d.image, k, pick)
    }
}

/// The durable part of the file, advanced event by event.
pub struct Durable {
    pub image: Vec<u8>,
    pub upto: usize,
}

impl Durable {
    pub fn new(r: &Record) -> Durable {
        Durable {
            image: r.initial.to_vec(),
            upto: 0,
        }
    }

    pub fn advance_to(&mut self, r: &Record, upto: usize) {
        assert!(upto >= self.upto, "the durable prefix only grows");
        for e in &r.events[self.upto..upto] {
            e.apply(&mut self.image);
        }
        self.upto = upto;
    }
}

/// A writable qcow2 node `crashimg` (with the `extra` options, an
/// object or null) in `graph` over a recording file `crashfile` holding
/// `img`'s bytes, and a writer root `crash` on it.
pub async fn qcow2_on_recorder(
    graph: &sluice_core::Graph,
    img: &str,
    extra: serde_json::Value,
) -> Result<(Arc<Node>, sluice_core::Root, Arc<Recorder>)> {
    let w = graph.writer().await;
    let bytes = std::fs::read(img).unwrap();
    let (_file, rec) = add_recording_file(&w, "crashfile", bytes).await?;
    let mut opts =
        serde_json::json!({"driver": "qcow2", "node-name": "crashimg", "file": "crashfile"});
    if let Some(extra) = extra.as_object() {
        for (k, v) in extra {
            opts[k] = v.clone();
        }
    }
    let node = sluice_drivers::open::open_with(
        &w,
        opts,
        sluice_drivers::protocol::file::CacheMode::WRITEBACK,
        false,
    )
    .await?;
    let root = w
        .add_root(
            "block device",
            "crash",
            &node,
            sluice_core::PermPair::writer(),
        )
        .await?;
    Ok((node, root, rec))
}

/// Runs `change` on a writable qcow2 node over a recording file holding
/// `img`'s bytes (see `qcow2_on_recorder`); returns what reached the
/// file.
pub async fn recorded<F, Fut>(img: &str, change: F) -> Record
where
    F: FnOnce(Arc<Node>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let graph = sluice_core::Graph::new();
    let (node, _root, rec) = qcow2_on_recorder(&graph, img, serde_json::Value::Null)
        .await
        .unwrap();
    change(node).await;
    let r = rec.record();
    println!("{} file events", r.len());
    r
}

/// Random subsets of the unflushed writes tried at each crash point
/// (besides all and none): a write that must not land before another
/// is caught in three of four tries each.
pub const RANDOM_PICKS: u64 = 8;

/// Every crash point `k` of `r` (0 to `r.len()`, in order), each with
/// all, none and `RANDOM_PICKS` random subsets (from `seed`) of the
/// unflushed writes on disk: `(k, what, image)`, where `what` names the
/// crash for failure messages.
pub fn crash_images(r: &Record, seed: u64) -> impl Iterator<Item = (usize, String, Vec<u8>)> + '_ {
    let mut durable = Durable::new(r);
    (0..=r.len()).flat_map(move |k| {
        durable.advance_to(r, r.durable_at(k));
        let randoms = (0..RANDOM_PICKS).map(|i| Pick::Random(seed ^ (k as u64) << 8 ^ i));
        [Pick::All, Pick::None]
            .into_iter()
            .chain(randoms)
            .map(|pick| {
                let what = format!(
                    "crash at event {k} of {}, pick {pick}, seed {seed}",
                    r.len()
                );
                (k, what, r.crash_from(&durable.image, k, pick).image)
            })
            .collect::<Vec<_>>()
    })
}

/// Crash points sampled from `r`: every `len / samples`-th event (at
/// least every one) and the last, each with all, none and one random
/// subset (from `seed`) of the unflushed writes on disk:
/// `(k, pick, image)`.
pub fn sampled_crashes(
    r: &Record,
    samples: usize,
    seed: u64,
) -> impl Iterator<Item = (usize, Pick, Vec<u8>)> + '_ {
    let n = r.len();
    (1..=n)
        .step_by((n / samples).max(1))
        .chain([n])
        .flat_map(move |k| {
            [Pick::All, Pick::None, Pick::Random(seed ^ k as u64)]
                .into_iter()
                .map(move |pick| (k, pick, r.crash(k, pick).image))
        })
}
