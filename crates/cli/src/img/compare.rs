//! `sluice img compare`: whether two images read the same, with
//! qemu-img's messages and exit codes (0 equal, 1 differ, 2 open error,
//! 3 block status error, 4 read error). Ranges both chains report as
//! zero are not read; the rest is read a few chunks ahead.

use super::common::{self, OpenSpec};
use super::progress::Progress;
use futures::stream::{FuturesOrdered, StreamExt};
use sluice_core::error::os_text;
use sluice_core::{IoBuf, Root};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f')]
    fmt1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    fmt2: Option<String>,
    /// Strict: sizes and allocation must match too.
    #[arg(short = 's')]
    strict: bool,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 'p')]
    progress: bool,
    /// Cache mode for both images.
    #[arg(short = 'T')]
    cache: Option<String>,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "object")]
    object: Vec<String>,
    files: Vec<String>,
}

/// Bytes read per request.
const CHUNK: u64 = 1 << 20;
/// Chunks read ahead of the one compared.
const AHEAD: usize = 8;

/// The offset of the first 512-byte block where `a` and `b` differ (QEMU
/// reports mismatches at sector granularity).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    let i = a.iter().zip(b).position(|(x, y)| x != y)?;
    Some(i - i % 512)
}

fn first_nonzero(a: &[u8]) -> Option<usize> {
    let i = a.iter().position(|&x| x != 0)?;
    Some(i - i % 512)
}

/// How the comparison ended.
enum Outcome {
    Same,
    Differ(String),
    /// An error and its exit code.
    Error(u8, String),
}

/// One image of the two: its root and the name messages give it.
#[derive(Clone)]
struct Side {
    root: Arc<Root>,
    name: Arc<str>,
}

impl Side {
    fn new(root: &Arc<Root>, name: &str) -> Side {
        Side {
            root: root.clone(),
            name: name.into(),
        }
    }
}

async fn read_side(s: &Side, off: u64, len: u64) -> Result<IoBuf, Outcome> {
    s.root.read(off, len as usize).await.map_err(|e| {
        Outcome::Error(
            4,
            format!(
                "Error while reading offset {off} of {}: {}",
                s.name,
                os_text(&std::io::Error::from_raw_os_error(e.errno()))
            ),
        )
    })
}

/// What one chunk showed: where in it the sides first differ (`b`
/// absent: where `a` is first not zero), or why it could not be read.
type ChunkResult = (u64, u64, Result<Option<usize>, Outcome>);

/// Reads and compares `len` bytes at `off` of both sides (`b` absent:
/// `a` against zeroes) in a task of its own, so that the chunks in
/// flight are read and compared on every worker thread.
fn check_chunk(
    a: &Side,
    b: Option<&Side>,
    off: u64,
    len: u64,
) -> impl std::future::Future<Output = ChunkResult> {
    let (a, b) = (a.clone(), b.cloned());
    let task = tokio::spawn(async move {
        let r = match b {
            Some(b) => {
                let (x, y) = futures::join!(read_side(&a, off, len), read_side(&b, off, len));
                x.and_then(|x| Ok(first_difference(&x, &y?)))
            }
            None => read_side(&a, off, len).await.map(|x| first_nonzero(&x)),
        };
        (off, len, r)
    });
    async move {
        task.await.unwrap_or_else(|e| {
            (
                off,
                len,
                Err(Outcome::Error(4, format!("comparison task failed: {e}"))),
            )
        })
    }
}

async fn compare(a: Side, b: Side, strict: bool, quiet: bool, progress: &Progress) -> Outcome {
    let (size_a, size_b) = (a.root.size(), b.root.size());
    if strict && size_a != size_b {
        return Outcome::Differ("Strict mode: Image size mismatch!".into());
    }
    let common_len = size_a.min(size_b);
    let total = size_a.max(size_b).max(1);
    let status_err =
        |name: &str| Outcome::Error(3, format!("Sector allocation test failed for {name}"));
    let mut pending = FuturesOrdered::new();
    let mut off = 0u64;
    // A strict-mode status mismatch, reported once the reads before it
    // found no earlier difference.
    let mut stop: Option<Outcome> = None;
    // The shared part: both chains' status decides what is read.
    loop {
        while off < common_len && pending.len() < AHEAD && stop.is_none() {
            let ea = match common::extent_at(&a.root.node(), off, common_len - off).await {
                Ok(e) => e,
                Err(_) => return status_err(&a.name),
            };
            let eb = match common::extent_at(&b.root.node(), off, common_len - off).await {
                Ok(e) => e,
                Err(_) => return status_err(&b.name),
            };
            if strict && (ea.present, ea.zero, ea.data) != (eb.present, eb.zero, eb.data) {
                stop = Some(Outcome::Differ(format!(
                    "Strict mode: Offset {off} block status mismatch!"
                )));
                break;
            }
            let len = ea.length.min(eb.length);
            if ea.zero && eb.zero {
                off += len;
                progress.set(off, total);
                continue;
            }
            let len = len.min(CHUNK);
            let at = off;
            pending.push_back(check_chunk(&a, Some(&b), at, len));
            off += len;
        }
        let Some((at, len, r)) = pending.next().await else {
            break;
        };
        match r {
            Ok(Some(d)) => {
                return Outcome::Differ(format!("Content mismatch at offset {}!", at + d as u64))
            }
            Ok(None) => {}
            Err(o) => return o,
        }
        progress.set(at + len, total);
    }
    if let Some(o) = stop {
        return o;
    }
    if size_a != size_b && !quiet {
        println!("Warning: Image size mismatch!");
    }
    // The longer image's tail must read as zeroes.
    let (long, long_size) = if size_a > size_b {
        (&a, size_a)
    } else {
        (&b, size_b)
    };
    let mut off = common_len;
    loop {
        while off < long_size && pending.len() < AHEAD {
            let e = match common::extent_at(&long.root.node(), off, long_size - off).await {
                Ok(e) => e,
                Err(_) => return status_err(&long.name),
            };
            if e.zero {
                off += e.length;
                continue;
            }
            let len = e.length.min(CHUNK);
            let at = off;
            pending.push_back(check_chunk(long, None, at, len));
            off += len;
        }
        let Some((at, len, r)) = pending.next().await else {
            break;
        };
        match r {
            Ok(Some(d)) => {
                return Outcome::Differ(format!("Content mismatch at offset {}!", at + d as u64))
            }
            Ok(None) => {}
            Err(o) => return o,
        }
        progress.set(at + len, total);
    }
    Outcome::Same
}

pub fn run(args: CompareArgs) -> ExitCode {
    let _ = &args.object;
    if args.files.len() != 2 {
        return common::usage("compare", "Expecting two image file names");
    }
    if args.image_opts && (args.fmt1.is_some() || args.fmt2.is_some()) {
        return common::fail(1, "--image-opts and -f/-F are mutually exclusive");
    }
    let cache = match common::cache_mode(args.cache.as_deref()) {
        Ok(c) => c,
        Err(e) => return common::fail(1, &e),
    };
    let spec = |name: &str, fmt: &Option<String>| OpenSpec {
        name: name.to_string(),
        format: fmt.clone(),
        image_opts: args.image_opts,
        force_share: args.force_share,
        cache: Some(cache),
        ..OpenSpec::default()
    };
    let (s1, s2) = (
        spec(&args.files[0], &args.fmt1),
        spec(&args.files[1], &args.fmt2),
    );
    let progress = Progress::new(args.progress && !args.quiet);
    let res = common::block_on(async {
        let i1 = match common::open(&s1).await {
            Ok(i) => i,
            Err(e) => return Outcome::Error(2, e),
        };
        let i2 = match common::open(&s2).await {
            Ok(i) => i,
            Err(e) => {
                let _ = i1.close().await;
                return Outcome::Error(2, e);
            }
        };
        let out = compare(
            Side::new(&i1.root, &s1.name),
            Side::new(&i2.root, &s2.name),
            args.strict,
            args.quiet,
            &progress,
        )
        .await;
        let _ = i1.close().await;
        let _ = i2.close().await;
        out
    });
    let code = match res {
        Ok(Outcome::Same) => {
            if !args.quiet {
                println!("Images are identical.");
            }
            ExitCode::SUCCESS
        }
        Ok(Outcome::Differ(m)) => {
            if !args.quiet {
                println!("{m}");
            }
            ExitCode::from(1)
        }
        Ok(Outcome::Error(code, m)) => common::fail(code, &m),
        Err(e) => common::fail(2, &e),
    };
    progress.finish();
    code
}
