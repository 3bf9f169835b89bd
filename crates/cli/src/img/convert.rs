//! `sluice img convert`: copies one or more images (concatenated) into a
//! new or existing image, with qemu-img's options and messages.
//!
//! The source chain is read through block status: ranges it reports as
//! zero are skipped on a zero-initialised target (or written as zeroes),
//! ranges below a `-B` base are left to the target's backing file, and
//! data is read in 2 MiB chunks whose zero runs of at least `-S` bytes are
//! skipped too (a sparse target). Up to `-m` chunks are in flight as tasks
//! on the runtime, so reads overlap writes; without `-W` each write waits
//! for the one before it to finish, as qemu-img's in-order mode does.
//! With `-r` each piece first waits for the rate limit (`rate.rs`).
//!
//! `-B BASE` on a source whose chain holds BASE copies every layer above
//! BASE, so the target always reads as the source. qemu-img copies only
//! what the top image allocates, which gives the same result only when
//! BASE is the top's own backing file; sluice does that too when BASE is
//! not in the source's chain.

use super::common::{self, OpenSpec};
use super::create::{create_image, CreateRequest};
use super::progress::Progress;
use super::rate::{Limiter, RateLimit};
use sluice_core::error::os_text;
use sluice_core::{IoBuf, IoBytes, Root, WriteFlags, ZeroFlags};
use sluice_drivers::protocol::file::CacheMode;
use sluice_drivers::size::parse_size;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Source format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Target format (default raw).
    #[arg(short = 'O')]
    out_format: Option<String>,
    /// Target format options, may repeat.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Write compressed clusters (qcow2 targets).
    #[arg(short = 'c')]
    compress: bool,
    /// Backing file of the target: only what differs from it is copied.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Use the existing target, do not create it.
    #[arg(short = 'n')]
    no_create: bool,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    /// Allow out-of-order writes.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Chunks in flight (1 to 16, default 8).
    #[arg(short = 'm')]
    coroutines: Option<String>,
    /// Smallest zero run left sparse (default 4k; 0: fully allocate).
    #[arg(short = 'S')]
    sparse: Option<String>,
    /// Target cache mode (default unsafe, as qemu-img).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Source cache mode.
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// The existing target reads as zeroes (with -n).
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
    /// Copy offloading (accepted; sluice copies through its own buffers).
    #[arg(short = 'C')]
    copy_range: bool,
    /// Rate limit in bytes per second (size suffixes: `10M`; 0: none).
    #[arg(short = 'r', allow_hyphen_values = true)]
    rate: Option<String>,
    /// Internal snapshot to read the source as of (`snapshot.id=ID`,
    /// `snapshot.name=NAME`, or an id or name).
    #[arg(short = 'l')]
    snapshot: Option<String>,
    #[arg(long = "object")]
    object: Vec<String>,
    #[arg(long = "salvage")]
    salvage: bool,
    files: Vec<String>,
}

/// Bytes per copy request (QEMU's `IO_BUF_SIZE`).
const CHUNK: u64 = 2 << 20;

/// How data chunks are written.
#[derive(Clone, Copy, Debug)]
pub struct CopyMode {
    /// The target reads as zeroes where nothing is written.
    pub target_zero: bool,
    /// Zero runs at least this long are not written (0: write everything).
    pub min_sparse: u64,
    /// Zero runs are whole multiples of this, from the chunk start.
    pub unit: u64,
    /// Each write waits for the previous one to finish.
    pub in_order: bool,
    /// Chunks in flight.
    pub depth: usize,
    /// Data goes out as compressed clusters of `unit` bytes (`-c`).
    pub compress: bool,
    /// `-r`: each piece waits for the rate limit before it is issued.
    pub rate: Option<RateLimit>,
}

/// What one piece of the copy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Copy,
    Zero,
}

/// One source image, placed at `start` in the target.
pub struct Source {
    pub root: Arc<Root>,
    pub start: u64,
    /// Ranges decided at this depth or deeper are left to the target's
    /// backing file (`-B`).
    pub base_depth: Option<u32>,
}

/// `true` when every byte of `b` is zero (folded in blocks, which the
/// compiler turns into vector code).
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(512)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Splits `buf` into runs `(offset, len, zero)`: zero runs are whole
/// `unit`s and at least `min_sparse` long; everything else is data.
pub fn sparse_runs(buf: &[u8], unit: usize, min_sparse: usize) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut push = |off: usize, len: usize, zero: bool| match runs.last_mut() {
        Some(last) if last.2 == zero && last.0 + last.1 == off => last.1 += len,
        _ => runs.push((off, len, zero)),
    };
    let mut pos = 0;
    while pos < buf.len() {
        let end = (pos + unit).min(buf.len());
        push(pos, end - pos, is_zero(&buf[pos..end]));
        pos = end;
    }
    // Short zero runs are written as data.
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (off, len, zero) in runs {
        let zero = zero && len >= min_sparse && min_sparse > 0;
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 += len,
            _ => out.push((off, len, zero)),
        }
    }
    out
}

/// One unit of work: a range of a source and where it goes.
struct Piece {
    src: Arc<Root>,
    src_off: u64,
    dst_off: u64,
    len: u64,
    kind: Kind,
}

/// A piece's place in in-order mode: it writes once `mine` fires (the
/// piece before is written) and then fires `next`. Dropping `next`
/// unfired (the piece failed) stops the pieces after it.
struct Turn {
    mine: Option<oneshot::Receiver<()>>,
    next: Option<oneshot::Sender<()>>,
}

/// Where a copy failed: `(is_read, target byte, message)`.
type CopyError = (bool, u64, String);

fn errno_text(e: &sluice_core::Error) -> String {
    os_text(&std::io::Error::from_raw_os_error(e.errno()))
}

/// Writes `data` at `off`, leaving out zero runs as the mode says.
async fn write_data(dst: &Root, off: u64, data: IoBytes, mode: &CopyMode) -> Result<(), String> {
    if mode.compress {
        return super::compress::write_clusters(
            dst,
            off,
            &data,
            mode.unit as usize,
            mode.target_zero,
        )
        .await;
    }
    let runs = if mode.min_sparse == 0 {
        vec![(0, data.len(), false)]
    } else {
        sparse_runs(&data, mode.unit as usize, mode.min_sparse as usize)
    };
    for (o, l, zero) in runs {
        let at = off + o as u64;
        if zero {
            if !mode.target_zero {
                dst.write_zeroes(
                    at,
                    l as u64,
                    ZeroFlags {
                        may_unmap: true,
                        ..ZeroFlags::default()
                    },
                )
                .await
                .map_err(|e| errno_text(&e))?;
            }
        } else {
            dst.write(at, data.slice(o..o + l), WriteFlags::default())
                .await
                .map_err(|e| errno_text(&e))?;
        }
    }
    Ok(())
}

/// Writes zeroes over `[off, off + len)` (a zero range on a target that
/// does not already read as zeroes, or `-S 0`'s explicit zeroes).
async fn write_zero_range(dst: &Root, off: u64, len: u64, mode: &CopyMode) -> Result<(), String> {
    if mode.min_sparse == 0 {
        // Fully allocated output: real zero buffers.
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(CHUNK);
            let buf = IoBuf::zeroed(n as usize).freeze();
            dst.write(pos, buf, WriteFlags::default())
                .await
                .map_err(|e| errno_text(&e))?;
            pos += n;
        }
        return Ok(());
    }
    dst.write_zeroes(
        off,
        len,
        ZeroFlags {
            may_unmap: true,
            ..ZeroFlags::default()
        },
    )
    .await
    .map_err(|e| errno_text(&e))
}

async fn run_piece(p: Piece, dst: Arc<Root>, mode: CopyMode, turn: Turn) -> Result<u64, CopyError> {
    let data = match p.kind {
        Kind::Copy => Some(
            p.src
                .read(p.src_off, p.len as usize)
                .await
                .map_err(|e| (true, p.dst_off, errno_text(&e)))?
                .freeze(),
        ),
        Kind::Zero => None,
    };
    let Turn { mine, next } = turn;
    if let Some(mine) = mine {
        if mine.await.is_err() {
            // The piece before failed (its error is the one reported).
            return Ok(0);
        }
    }
    let res = match data {
        Some(d) => write_data(&dst, p.dst_off, d, &mode).await,
        None => write_zero_range(&dst, p.dst_off, p.len, &mode).await,
    };
    if let (Some(next), Ok(())) = (next, &res) {
        let _ = next.send(());
    }
    res.map(|_| p.len).map_err(|e| (false, p.dst_off, e))
}

/// Copies `sources` into `dst` (QEMU's `convert_do_copy`); with
/// `mode.compress` data goes out compressed.
pub async fn copy(
    sources: &[Source],
    dst: &Arc<Root>,
    mode: CopyMode,
    progress: &Progress,
) -> Result<(), CopyError> {
    let total: u64 = sources.iter().map(|s| s.root.size()).sum();
    let limiter = mode.rate.map(Limiter::new);
    // In order, each piece's write waits for the one before it: one
    // hand-over per piece (a shared counter would wake every waiter).
    let mut prev_done: Option<oneshot::Receiver<()>> = None;
    let mut tasks: JoinSet<Result<u64, CopyError>> = JoinSet::new();
    let mut done = 0u64;
    let mut first_err: Option<CopyError> = None;
    let collect = |r: Option<Result<Result<u64, CopyError>, tokio::task::JoinError>>,
                   done: &mut u64,
                   first_err: &mut Option<CopyError>| {
        match r {
            Some(Ok(Ok(n))) => {
                *done += n;
                progress.set(*done, total);
            }
            Some(Ok(Err(e))) if first_err.as_ref().is_none_or(|f| e.1 < f.1) => {
                *first_err = Some(e);
            }
            Some(Ok(Err(_))) => {}
            Some(Err(e)) => {
                first_err.get_or_insert((false, 0, format!("copy task failed: {e}")));
            }
            None => {}
        }
    };
    'outer: for src in sources {
        let size = src.root.size();
        let node = src.root.node();
        let mut off = 0u64;
        while off < size {
            if first_err.is_some() {
                break 'outer;
            }
            let e = common::extent_at(&node, off, size - off)
                .await
                .map_err(|e| (true, src.start + off, e.to_string()))?;
            let below_base = src.base_depth.is_some_and(|d| !e.present || e.depth >= d);
            let kind = if below_base {
                None
            } else if e.zero {
                (!mode.target_zero || mode.min_sparse == 0).then_some(Kind::Zero)
            } else {
                Some(Kind::Copy)
            };
            let Some(kind) = kind else {
                off += e.length;
                done += e.length;
                progress.set(done, total);
                continue;
            };
            // Pieces end on chunk boundaries of the target; compressed
            // ones cover whole clusters (parts of a cluster skipped before
            // were not written, so reading them again is harmless).
            let ext_end = off + e.length;
            let mut dst_off = src.start + off;
            if mode.compress && kind == Kind::Copy {
                let back = (dst_off % mode.unit).min(off);
                dst_off -= back;
                off -= back;
            }
            let chunk_end = (dst_off / CHUNK + 1) * CHUNK;
            let len = match kind {
                Kind::Copy if mode.compress => {
                    ext_end
                        .div_ceil(mode.unit)
                        .saturating_mul(mode.unit)
                        .min(size)
                        .min(chunk_end - src.start)
                        - off
                }
                Kind::Copy => e.length.min(chunk_end - dst_off),
                Kind::Zero if mode.min_sparse == 0 => e.length.min(chunk_end - dst_off),
                Kind::Zero => e.length,
            };
            while tasks.len() >= mode.depth {
                collect(tasks.join_next().await, &mut done, &mut first_err);
            }
            if let (Some(l), Some(r)) = (&limiter, mode.rate) {
                l.admit(if kind == Kind::Zero && !r.count_zeroes {
                    0
                } else {
                    len
                })
                .await;
            }
            let piece = Piece {
                src: src.root.clone(),
                src_off: off,
                dst_off,
                len,
                kind,
            };
            let turn = if mode.in_order {
                let (tx, rx) = oneshot::channel();
                Turn {
                    mine: prev_done.replace(rx),
                    next: Some(tx),
                }
            } else {
                Turn {
                    mine: None,
                    next: None,
                }
            };
            tasks.spawn(run_piece(piece, dst.clone(), mode, turn));
            off += len;
        }
    }
    while let Some(r) = tasks.join_next().await {
        collect(Some(r), &mut done, &mut first_err);
        if first_err.is_some() {
            // Later pieces in order may wait for one that failed.
            tasks.abort_all();
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn coroutines(v: Option<&str>) -> Result<usize, String> {
    match v {
        None => Ok(8),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (1..=16).contains(&n) => Ok(n as usize),
            _ => Err("Invalid number of coroutines specified. Must be between 1 and 16.".into()),
        },
    }
}

fn sparse_size(v: Option<&str>) -> Result<u64, String> {
    match v {
        None => Ok(4096),
        Some(s) => match parse_size(s) {
            Ok(n) if n % 512 == 0 && n <= 16 << 20 => Ok(n),
            Ok(_) => Err("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).".into()),
            Err(_) => Err(format!(
                "Invalid buffer size for sparse output specified: '{s}'."
            )),
        },
    }
}

/// The depth of the `-B` base in the source chain: the layer whose file
/// is the base, else 1 (qemu-img copies what the top image allocates).
fn base_depth(src: &Root, base_path: &str) -> u32 {
    let want = std::fs::canonicalize(base_path).ok();
    let layers = common::chain_layers(&src.node());
    for (d, l) in layers.iter().enumerate().skip(1) {
        let f = common::node_filename(l).and_then(|f| std::fs::canonicalize(f).ok());
        if f.is_some() && f == want {
            return d as u32;
        }
    }
    1
}

pub fn run(args: ConvertArgs) -> ExitCode {
    common::bulk_copy_writes();
    match convert(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => common::fail(1, &e),
    }
}

fn convert(args: ConvertArgs) -> Result<(), String> {
    let _ = (&args.object, args.copy_range, args.salvage);
    let depth = coroutines(args.coroutines.as_deref())?;
    let min_sparse = sparse_size(args.sparse.as_deref())?;
    let rate = match args.rate.as_deref() {
        Some(r) => super::rate::parse_rate(r)?,
        None => 0,
    };
    let snapshot = args
        .snapshot
        .as_deref()
        .map(super::snapshot::SnapshotParam::parse)
        .transpose()?;
    let out_fmt = args.out_format.clone().unwrap_or_else(|| "raw".into());
    // qemu-img's order: these before the file count.
    if args.target_image_opts && !args.no_create {
        return Err("--target-image-opts requires use of -n flag".into());
    }
    let options = common::parse_o_list(&args.options)?;
    if args.no_create && !options.is_empty() {
        return Err("-o has no effect when skipping image creation".into());
    }
    if args.target_is_zero && !args.no_create {
        return Err("--target-is-zero requires use of -n flag".into());
    }
    if args.files.len() < 2 {
        return Err("Must specify image file name".into());
    }
    // What creating the target needs; with -n the target is checked once
    // open.
    if !args.no_create && args.compress && out_fmt != "qcow2" {
        return Err("Compression not supported for this file format".into());
    }
    if !args.no_create && args.backing.is_some() && out_fmt == "raw" {
        return Err("Backing file not supported for file format 'raw'".into());
    }
    if !args.no_create && args.backing.is_some() && args.backing_fmt.is_none() {
        return Err("Use of backing file requires explicit backing format".into());
    }
    let (inputs, out) = args.files.split_at(args.files.len() - 1);
    let out = out[0].clone();
    // The target's options are checked before anything is opened.
    let mut req = CreateRequest {
        filename: out.clone(),
        format: out_fmt.clone(),
        options,
        backing: args.backing.clone(),
        backing_fmt: args.backing_fmt.clone(),
        ..CreateRequest::default()
    };
    if !args.no_create {
        req.check_format()?;
        req.take_generic_options()?;
        req.check_options()?;
    }
    let src_cache = common::cache_mode(args.src_cache.as_deref())?;
    let dst_cache = match &args.cache {
        None => CacheMode::UNSAFE,
        Some(c) => common::cache_mode(Some(c))?,
    };
    let progress = Progress::new(args.progress && !args.quiet);
    let res = common::block_on(async {
        let mut srcs = Vec::new();
        let mut start = 0u64;
        let close_all = |srcs: Vec<common::Image>| async move {
            for s in srcs {
                let _ = s.close().await;
            }
        };
        if args.image_opts && args.format.is_some() {
            return Err("--image-opts and --format are mutually exclusive".to_string());
        }
        for name in inputs {
            let spec = OpenSpec {
                name: name.clone(),
                format: args.format.clone(),
                image_opts: args.image_opts,
                force_share: args.force_share,
                cache: Some(src_cache),
                ..OpenSpec::default()
            };
            match common::open(&spec).await {
                Ok(i) => srcs.push(i),
                Err(e) => {
                    close_all(srcs).await;
                    return Err(e);
                }
            }
        }
        if let Some(p) = &snapshot {
            let loaded = match p {
                super::snapshot::SnapshotParam::IdOrName(_) if srcs.len() > 1 => {
                    Err("No support for concatenating multiple snapshot".to_string())
                }
                _ => super::snapshot::load_tmp(&mut srcs[0], p).await,
            };
            if let Err(e) = loaded {
                close_all(srcs).await;
                return Err(e);
            }
        }
        if args.target_is_zero && args.backing.is_some() {
            // qemu-img reports this and, copying nothing, exits with 0.
            close_all(srcs).await;
            common::error(
                "Cannot use --target-is-zero when the destination image has a backing file",
            );
            return Ok(());
        }
        let total: u64 = srcs.iter().map(common::Image::size).sum();
        if !args.no_create {
            req.size.get_or_insert(total);
            let created = create_image(&req).await;
            if let Err(e) = created {
                close_all(srcs).await;
                // create_image names the file; qemu-img adds what failed.
                let e = match e.strip_prefix(&format!("{out}: ")) {
                    Some(rest) => format!("{out}: error while converting {out_fmt}: {rest}"),
                    None => e,
                };
                return Err(e);
            }
        }
        // --target-image-opts: the name is the target's options.
        if args.target_image_opts && args.out_format.is_some() {
            close_all(srcs).await;
            return Err("--image-opts and --format are mutually exclusive".into());
        }
        let dst_spec = OpenSpec {
            name: out.clone(),
            format: (!args.target_image_opts).then(|| out_fmt.clone()),
            image_opts: args.target_image_opts,
            writable: true,
            cache: Some(dst_cache),
            ..OpenSpec::default()
        };
        let dst = match common::open(&dst_spec).await {
            Ok(d) => d,
            Err(e) => {
                close_all(srcs).await;
                return Err(e);
            }
        };
        let dst_fmt = dst.node().driver_name();
        if args.no_create && args.compress && dst_fmt != "qcow2" {
            close_all(srcs).await;
            let _ = dst.close().await;
            return Err("Compression not supported for this file format".into());
        }
        if args.no_create && dst.size() < total {
            close_all(srcs).await;
            let _ = dst.close().await;
            return Err("output file is smaller than input file".into());
        }
        let target_backing = dst.node().child(sluice_core::Role::Backing).is_some();
        let out_path = match args.target_image_opts {
            true => common::node_filename(&dst.node()).unwrap_or_else(|| out.clone()),
            false => out.clone(),
        };
        let base = args.backing.as_ref().map(|b| {
            sluice_qcow2::chain::backing_path(Some(&out_path), b).unwrap_or_else(|_| b.clone())
        });
        let mut sources = Vec::new();
        for s in &srcs {
            let base_depth = base.as_ref().map(|b| base_depth(&s.root, b));
            sources.push(Source {
                root: s.root.clone(),
                start,
                base_depth,
            });
            start += s.size();
        }
        let unit = match dst_fmt {
            "qcow2" => info_cluster_size(&dst).await.unwrap_or(65536),
            _ => 512,
        };
        let mode = CopyMode {
            target_zero: (!args.no_create && !target_backing) || args.target_is_zero,
            min_sparse,
            unit,
            in_order: !args.out_of_order,
            depth,
            compress: args.compress,
            rate: RateLimit::throttle(rate),
        };
        let copied = copy(&sources, &dst.root, mode, &progress).await;
        drop(sources);
        close_all(srcs).await;
        let closed = dst.close().await;
        match copied {
            Err((true, at, e)) => Err(format!("error while reading at byte {at}: {e}")),
            Err((false, at, e)) => Err(format!("error while writing at byte {at}: {e}")),
            Ok(()) => closed,
        }
    });
    progress.finish();
    res?
}

/// The cluster size of an open qcow2 image.
async fn info_cluster_size(img: &common::Image) -> Option<u64> {
    super::info::qcow2_facts(&img.node())
        .await
        .ok()
        .flatten()
        .map(|f| f.header.cluster_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_shorter_than_min_sparse_are_data() {
        let mut b = vec![0u8; 8192];
        b[0] = 1;
        b[5000] = 1;
        // 512-byte units: [0,512) data, [512,4608) zero (4096), then data
        // at 4608..5120, zero 5120..8192 (3072 < 4096: data).
        let r = sparse_runs(&b, 512, 4096);
        assert_eq!(
            r,
            vec![(0, 512, false), (512, 4096, true), (4608, 3584, false)]
        );
        assert_eq!(sparse_runs(&b, 512, 0), vec![(0, 8192, false)]);
        assert_eq!(sparse_runs(&[0u8; 1024], 512, 512), vec![(0, 1024, true)]);
    }

    #[test]
    fn option_checks_match_qemu() {
        assert!(coroutines(Some("0")).is_err());
        assert!(coroutines(Some("17")).is_err());
        assert_eq!(coroutines(Some("16")), Ok(16));
        assert!(sparse_size(Some("1000")).is_err());
        assert_eq!(sparse_size(Some("0")), Ok(0));
        assert_eq!(sparse_size(Some("8k")), Ok(8192));
    }
}
