//! `sluice img bench`: qemu-img bench's options and output, so both tools
//! can run on one image and one script reads both.
//!
//! Like qemu-img, one thread issues the requests and keeps `-d` of them in
//! flight; completions are collected in a loop (never by recursion), so any
//! number of requests runs in bounded stack.

use futures::stream::{FuturesUnordered, StreamExt};
use sluice_core::error::os_text;
use sluice_core::{Graph, IoBuf, IoBytes, PermPair, Root, WriteFlags};
use sluice_drivers::protocol::file::parse_cache_mode;
use sluice_drivers::size::parse_size;
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Number of requests (default 75000).
    #[arg(short = 'c', allow_hyphen_values = true, value_name = "COUNT")]
    count: Option<String>,
    /// Requests kept in flight (default 64).
    #[arg(short = 'd', allow_hyphen_values = true, value_name = "DEPTH")]
    depth: Option<String>,
    /// Image format (raw; probed when absent).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// FILENAME is a key=value option string instead of a file name.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// I/O engine: threads, io_uring (native is taken as io_uring).
    #[arg(short = 'i', value_name = "AIO")]
    aio: Option<String>,
    /// Native AIO (same as -i native).
    #[arg(short = 'n')]
    native: bool,
    /// Offset of the first request.
    #[arg(short = 'o', allow_hyphen_values = true, value_name = "OFFSET")]
    offset: Option<String>,
    /// Quiet (accepted for compatibility).
    #[arg(short = 'q')]
    quiet: bool,
    /// Request size (default 4k).
    #[arg(short = 's', allow_hyphen_values = true, value_name = "BUFFER_SIZE")]
    buffer_size: Option<String>,
    /// Distance between request offsets (default: the request size).
    #[arg(short = 'S', allow_hyphen_values = true, value_name = "STEP_SIZE")]
    step: Option<String>,
    /// Cache mode: none, writeback, writethrough, directsync, unsafe.
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// Byte written by write requests (default 0).
    #[arg(long = "pattern", value_name = "PATTERN")]
    pattern: Option<String>,
    /// Flush after every INTERVAL requests (write tests).
    #[arg(long = "flush-interval", value_name = "INTERVAL")]
    flush_interval: Option<String>,
    /// With --flush-interval: do not wait for requests in flight before flushing.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Open the image without locking out other users.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    filename: String,
}

/// What one bench run does, validated.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub count: u64,
    pub depth: usize,
    pub offset: u64,
    pub bufsize: usize,
    pub step: u64,
    pub write: bool,
    pub pattern: u8,
    pub flush_interval: u64,
    pub drain_on_flush: bool,
}

fn int_in_range(v: Option<&str>, default: u64, what: &str) -> Result<u64, String> {
    match v {
        None => Ok(default),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (1..=i32::MAX as i64).contains(&n) => Ok(n as u64),
            _ => Err(format!(
                "Invalid {what} specified. Must be between 1 and 2147483647."
            )),
        },
    }
}

impl BenchArgs {
    fn plan(&self) -> Result<BenchPlan, String> {
        let count = int_in_range(self.count.as_deref(), 75000, "request count")?;
        let depth = int_in_range(self.depth.as_deref(), 64, "queue depth")? as usize;
        let offset = match &self.offset {
            None => 0,
            Some(s) => parse_size(s).map_err(|_| "Invalid offset specified".to_string())?,
        };
        let bufsize = match &self.buffer_size {
            None => 4096,
            Some(s) => match parse_size(s) {
                Ok(n) if (1..=i32::MAX as u64).contains(&n) => n,
                _ => {
                    return Err(
                        "Invalid buffer size specified. Must be between 1 and 2147483647.".into(),
                    )
                }
            },
        } as usize;
        let step = match &self.step {
            None => bufsize as u64,
            Some(s) => match parse_size(s) {
                Ok(n) if n <= i32::MAX as u64 => n,
                _ => {
                    return Err(
                        "Invalid step size specified. Must be between 0 and 2147483647.".into(),
                    )
                }
            },
        };
        let pattern = match &self.pattern {
            None => 0,
            Some(s) => s
                .parse::<u8>()
                .map_err(|_| "Invalid pattern byte specified".to_string())?,
        };
        let flush_interval = match &self.flush_interval {
            None => 0,
            Some(s) => s
                .parse::<u32>()
                .map_err(|_| "Invalid flush interval specified".to_string())?
                as u64,
        };
        if !self.write && self.flush_interval.is_some() {
            return Err("--flush-interval is only available in write tests".into());
        }
        // Like qemu-img, --pattern on a read test and --no-drain without
        // --flush-interval are accepted and have no effect.
        if self.image_opts && self.format.is_some() {
            return Err("--image-opts and --format are mutually exclusive".into());
        }
        Ok(BenchPlan {
            count,
            depth,
            offset,
            bufsize,
            step,
            write: self.write,
            pattern,
            flush_interval,
            drain_on_flush: !self.no_drain,
        })
    }

    fn aio(&self) -> Result<Option<&'static str>, String> {
        let name = match (&self.aio, self.native) {
            (Some(a), _) => a.as_str(),
            (None, true) => "native",
            (None, false) => return Ok(None),
        };
        match name {
            "threads" => Ok(Some("threads")),
            "io_uring" | "native" => Ok(Some("io_uring")),
            other => Err(format!("Invalid aio option: {other}")),
        }
    }
}

/// One request of the bench loop; every kind is the same future type so a
/// single `FuturesUnordered` holds them.
enum Job {
    Read(IoBuf),
    Write(IoBytes),
    Flush,
}

enum Outcome {
    Read(IoBuf),
    Wrote,
    Flushed,
}

async fn issue(root: &Root, offset: u64, job: Job) -> Result<Outcome, String> {
    let failed = |e: sluice_core::Error| {
        format!(
            "Failed request: {}",
            os_text(&std::io::Error::from_raw_os_error(e.errno()))
        )
    };
    match job {
        Job::Read(buf) => root
            .read_into(offset, buf)
            .await
            .map(Outcome::Read)
            .map_err(failed),
        Job::Write(data) => root
            .write(offset, data, WriteFlags::default())
            .await
            .map(|_| Outcome::Wrote)
            .map_err(failed),
        Job::Flush => root
            .flush()
            .await
            .map(|_| Outcome::Flushed)
            .map_err(|e| format!("Failed flush request: {e}")),
    }
}

/// Runs `plan` against `root`; returns the elapsed seconds.
pub async fn run_plan(root: &Root, plan: &BenchPlan) -> Result<f64, String> {
    let size = root.size();
    let mut free_bufs: Vec<IoBuf> = Vec::new();
    let payload = IoBuf::filled(plan.bufsize, plan.pattern).freeze();
    let mut in_flight = FuturesUnordered::new();
    let mut next_offset = plan.offset;
    let (mut issued, mut completed) = (0u64, 0u64);
    let start = Instant::now();
    loop {
        while issued < plan.count && in_flight.len() < plan.depth {
            let offset = next_offset;
            next_offset = if size == 0 {
                0
            } else {
                (next_offset + plan.step) % size
            };
            let job = if plan.write {
                Job::Write(payload.clone())
            } else {
                Job::Read(
                    free_bufs
                        .pop()
                        .unwrap_or_else(|| IoBuf::zeroed(plan.bufsize)),
                )
            };
            in_flight.push(issue(root, offset, job));
            issued += 1;
        }
        let Some(done) = in_flight.next().await else {
            break;
        };
        match done? {
            Outcome::Read(buf) => free_bufs.push(buf),
            Outcome::Wrote => {}
            Outcome::Flushed => continue,
        }
        completed += 1;
        if plan.flush_interval > 0 && completed % plan.flush_interval == 0 {
            if plan.drain_on_flush {
                // Let the requests in flight finish, then flush alone.
                while let Some(r) = in_flight.next().await {
                    if let Outcome::Read(buf) = r? {
                        free_bufs.push(buf);
                    }
                    completed += 1;
                }
                issue(root, 0, Job::Flush).await?;
            } else {
                in_flight.push(issue(root, 0, Job::Flush));
            }
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

fn image_json(args: &BenchArgs, aio: Option<&str>) -> Result<serde_json::Value, String> {
    let mut v = if args.image_opts {
        sluice_control::keyval::parse(&args.filename, None).map_err(|e| e.to_string())?
    } else if let Some(json) = args.filename.strip_prefix("json:") {
        serde_json::from_str(json).map_err(|e| format!("Could not parse the JSON options: {e}"))?
    } else {
        sluice_drivers::open::image_options(&args.filename, args.format.as_deref())?
    };
    if let Some(aio) = aio {
        sluice_drivers::open::set_protocol_option(&mut v, "aio", aio);
    }
    Ok(v)
}

pub fn run(args: BenchArgs) -> Result<ExitCode, String> {
    let plan = args.plan()?;
    let aio = args.aio()?;
    let cache = parse_cache_mode(args.cache.as_deref().unwrap_or("writeback"))
        .map_err(|_| "Invalid cache mode".to_string())?;
    let _ = args.quiet;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let graph = Graph::new();
        let w = graph.writer().await;
        let opts = image_json(&args, aio)?;
        let node = sluice_drivers::open::open_with(&w, opts, cache, !plan.write).await.map_err(|e| e.to_string())?;
        let perm = match (plan.write, args.force_share) {
            (true, false) => PermPair::writer(),
            (true, true) => PermPair::new(PermPair::writer().perm, sluice_core::Perm::ALL),
            (false, false) => PermPair::reader(),
            (false, true) => PermPair::reader_sharing_all(),
        };
        let root = w.add_root("block device", "bench", &node, perm).await.map_err(|e| e.to_string())?;
        drop(w);
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            plan.count,
            if plan.write { "write" } else { "read" },
            plan.bufsize,
            plan.depth,
            plan.offset,
            plan.step
        );
        if plan.flush_interval > 0 {
            println!("Sending flush every {} requests", plan.flush_interval);
        }
        let secs = run_plan(&root, &plan).await?;
        println!("Run completed in {secs:.3} seconds.");
        // As qemu-img closing the image: cached metadata (qcow2's
        // write-back L2 and refcount caches) reaches the file, untimed.
        if plan.write {
            root.flush()
                .await
                .map_err(|e| format!("Failed to flush the image: {e}"))?;
        }
        Ok(ExitCode::SUCCESS)
    })
}
