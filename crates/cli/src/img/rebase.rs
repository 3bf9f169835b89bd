//! `sluice img rebase`: changes an image's backing file. Safe mode (the
//! default) first copies into the image every cluster it does not
//! allocate whose content differs between the old backing chain and the
//! new backing file (`-b ""`: no backing, so everything the old chain
//! shows is copied); `-u` only rewrites the header.

use super::common::{self, OpenSpec};
use super::convert::is_zero;
use super::progress::Progress;
use futures::stream::{FuturesOrdered, StreamExt};
use sluice_core::{IoBuf, Node, Root, WriteFlags};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct RebaseArgs {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// The new backing file ("" for none).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Unsafe: only rewrite the backing file name.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode of the image.
    #[arg(short = 't')]
    cache: Option<String>,
    /// Cache mode of the backing files.
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Compress the copied clusters (accepted; they are written plain).
    #[arg(short = 'c')]
    compress: bool,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "object")]
    object: Vec<String>,
    filename: Option<String>,
}

/// Bytes compared per step.
const CHUNK: u64 = 2 << 20;

/// Steps in flight: reads of the next steps overlap the writes of the
/// earlier ones.
const DEPTH: usize = 8;

/// Reads `len` bytes at `off` of `new`, zeroes past its end; `None`
/// without a new backing file (everything compares against zeroes).
async fn read_new(new: Option<&Root>, off: u64, len: u64) -> Result<Option<IoBuf>, String> {
    let Some(r) = new else { return Ok(None) };
    let n = r.size().saturating_sub(off).min(len);
    if n == len {
        return r
            .read(off, len as usize)
            .await
            .map(Some)
            .map_err(|e| format!("Could not read new backing file: {e}"));
    }
    let mut buf = IoBuf::zeroed(len as usize);
    if n > 0 {
        let got = r
            .read(off, n as usize)
            .await
            .map_err(|e| format!("Could not read new backing file: {e}"))?;
        buf[..n as usize].copy_from_slice(&got);
    }
    Ok(Some(buf))
}

/// Whether `[off, off + len)` of the new backing reads as zeroes by its
/// block status (without reading it).
async fn new_is_zero(new: Option<&Root>, off: u64, len: u64) -> bool {
    let Some(r) = new else { return true };
    let end = r.size();
    if off >= end {
        return true;
    }
    let node = r.node();
    let mut pos = off;
    while pos < (off + len).min(end) {
        match common::extent_at(&node, pos, (off + len).min(end) - pos).await {
            Ok(e) if e.zero => pos += e.length,
            _ => return false,
        }
    }
    true
}

/// One step: copies into `top` the `unit`s of `[off, off + len)` that the
/// old chain shows differently from the new backing; runs of differing
/// units go out as one write each. Returns the end of the step.
async fn copy_step(
    top: &Root,
    new: Option<&Root>,
    unit: u64,
    off: u64,
    len: u64,
) -> Result<u64, String> {
    let old = top
        .read(off, len as usize)
        .await
        .map_err(|e| format!("error while reading image at offset {off}: {e}"))?;
    let newb = read_new(new, off, len).await?;
    let data = old.freeze();
    let step = |i: u64| (unit - (off + i) % unit).min(len - i);
    let differs = |i: u64| {
        let r = i as usize..(i + step(i)) as usize;
        match &newb {
            Some(n) => data[r.clone()] != n[r],
            None => !is_zero(&data[r]),
        }
    };
    let mut i = 0u64;
    while i < len {
        if !differs(i) {
            i += step(i);
            continue;
        }
        let start = i;
        while i < len && differs(i) {
            i += step(i);
        }
        top.write(
            off + start,
            data.slice(start as usize..i as usize),
            WriteFlags::default(),
        )
        .await
        .map_err(|e| format!("error while writing image at offset {}: {e}", off + start))?;
    }
    Ok(off + len)
}

/// Copies into `top` what it does not allocate and the new backing shows
/// differently, `unit` bytes (its cluster size) at a time, [`DEPTH`]
/// steps at once.
async fn copy_differences(
    top: &Root,
    new: Option<&Root>,
    unit: u64,
    progress: &Progress,
) -> Result<(), String> {
    let node = top.node();
    let size = node.size();
    let mut off = 0u64;
    let mut pending = FuturesOrdered::new();
    loop {
        while off < size && pending.len() < DEPTH {
            let e = common::extent_at(&node, off, size - off)
                .await
                .map_err(|e| e.to_string())?;
            let len = e.length.min(CHUNK - off % CHUNK);
            if e.present && e.depth == 0 {
                off += e.length;
                continue;
            }
            if e.zero && new_is_zero(new, off, len).await {
                off += len;
                continue;
            }
            pending.push_back(copy_step(top, new, unit, off, len));
            off += len;
        }
        match pending.next().await {
            Some(done) => progress.set(done?, size),
            None => break,
        }
    }
    progress.set(size, size);
    Ok(())
}

/// Rewrites the backing link in `node`'s header, with the node drained.
async fn change_backing(
    img: &common::Image,
    node: &Arc<Node>,
    backing: Option<&str>,
    fmt: Option<&str>,
) -> Result<(), String> {
    let w = img.graph.writer().await;
    let drained = w.drain(node).await;
    let r = node
        .driver()
        .change_backing_file(node, backing, fmt)
        .await
        .map_err(|e| {
            format!(
                "Could not change the backing file to '{}': {e}",
                backing.unwrap_or("")
            )
        });
    drop(drained);
    r
}

pub fn run(args: RebaseArgs) -> ExitCode {
    common::bulk_copy_writes();
    let _ = (&args.object, args.compress);
    let Some(filename) = args.filename.clone() else {
        return common::usage("rebase", "Expecting one image file name");
    };
    if args.backing.is_none() && !args.unsafe_mode {
        return common::usage(
            "rebase",
            "Must specify backing file (-b) or use unsafe mode (-u)",
        );
    }
    let backing = args.backing.clone().filter(|b| !b.is_empty());
    if let (Some(b), None) = (&backing, &args.backing_fmt) {
        return common::fail(
            1,
            &format!(
                "Could not change the backing file to '{b}': backing format must be specified"
            ),
        );
    }
    let (cache, src_cache) = match (
        common::cache_mode(args.cache.as_deref()),
        common::cache_mode(args.src_cache.as_deref()),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return common::fail(1, &e),
    };
    let spec = OpenSpec {
        name: filename,
        format: args.format.clone(),
        image_opts: args.image_opts,
        writable: true,
        no_backing: args.unsafe_mode,
        cache: Some(cache),
        ..OpenSpec::default()
    };
    let progress = Progress::new(args.progress && !args.quiet && !args.unsafe_mode);
    let res = common::block_on(async {
        let img = common::open(&spec).await?;
        let node = img.node();
        let result = async {
            if !args.unsafe_mode {
                let new = match &backing {
                    None => None,
                    Some(b) => {
                        let image_name = common::node_filename(&node);
                        let path = sluice_qcow2::chain::backing_path(image_name.as_deref(), b)
                            .map_err(|e| e.to_string())?;
                        let nspec = OpenSpec {
                            name: path.clone(),
                            format: args.backing_fmt.clone(),
                            force_share: true,
                            cache: Some(src_cache),
                            ..OpenSpec::default()
                        };
                        let opened = common::open(&nspec).await.map_err(|e| {
                            let inner = e
                                .strip_prefix(&format!("Could not open '{path}': "))
                                .unwrap_or(&e)
                                .to_string();
                            format!("Could not open new backing file '{b}': {inner}")
                        })?;
                        Some(opened)
                    }
                };
                let unit = super::info::qcow2_facts(&node)
                    .await?
                    .map_or(65536, |f| f.header.cluster_size());
                let copied =
                    copy_differences(&img.root, new.as_ref().map(|n| &*n.root), unit, &progress)
                        .await;
                if let Some(n) = new {
                    let _ = n.close().await;
                }
                copied?;
            }
            change_backing(
                &img,
                &node,
                backing.as_deref(),
                backing.as_ref().and(args.backing_fmt.as_deref()),
            )
            .await
        }
        .await;
        let closed = img.close().await;
        result.and(closed)
    });
    progress.finish();
    match res.and_then(|r| r) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => common::fail(1, &e),
    }
}
