//! `sluice img commit`: writes what the layers above a base image hold
//! into the base (convert's copy engine, the base opened writable on its
//! own), then empties the top image unless `-d` — a qcow2 top without
//! snapshots or data file is made empty by writing it anew with the same
//! format options, as QEMU's `qcow2_make_empty` does.

use super::common::{self, chain_layers, image_options, node_filename, OpenSpec};
use super::convert::{copy, CopyMode, Source};
use super::create::{create_file, with_file_node};
use super::info::qcow2_facts;
use super::progress::Progress;
use super::rate::{parse_rate, RateLimit};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Cache mode.
    #[arg(short = 't')]
    cache: Option<String>,
    /// The image to commit into (default: the backing file).
    #[arg(short = 'b')]
    base: Option<String>,
    /// Do not empty the top image.
    #[arg(short = 'd')]
    drop: bool,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    /// Rate limit in bytes per second (size suffixes: `10M`; 0: none).
    #[arg(short = 'r', allow_hyphen_values = true)]
    rate: Option<String>,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(long = "object")]
    object: Vec<String>,
    filename: Option<String>,
}

/// The chain depth of the image named `base` below `layers[0]`, by the
/// name as given or the file it resolves to.
fn find_base(layers: &[std::sync::Arc<sluice_core::Node>], base: &str) -> Option<usize> {
    let want = std::fs::canonicalize(base).ok();
    layers.iter().enumerate().skip(1).find_map(|(d, l)| {
        let f = node_filename(l)?;
        let same = f == base || want.is_some() && std::fs::canonicalize(&f).ok() == want;
        same.then_some(d)
    })
}

pub fn run(args: CommitArgs) -> ExitCode {
    common::bulk_copy_writes();
    let _ = &args.object;
    let rate = match args.rate.as_deref().map(parse_rate).transpose() {
        Ok(r) => RateLimit::job(r.unwrap_or(0)),
        Err(e) => return common::fail(1, &e),
    };
    let Some(filename) = args.filename.clone() else {
        return common::usage("commit", "Expecting one image file name");
    };
    let cache = match common::cache_mode(args.cache.as_deref()) {
        Ok(c) => c,
        Err(e) => return common::fail(1, &e),
    };
    let spec = OpenSpec {
        name: filename.clone(),
        format: args.format.clone(),
        image_opts: args.image_opts,
        force_share: true,
        cache: Some(cache),
        ..OpenSpec::default()
    };
    // As qemu-img: with an explicit base the top is left as it is.
    let keep_top = args.drop || args.base.is_some();
    let progress = Progress::new(args.progress && !args.quiet);
    let res = common::block_on(async {
        // First look at the chain: which layer is the base, what emptying
        // the top needs; all checked before anything is written.
        let top = common::open(&spec).await?;
        let layers = chain_layers(&top.node());
        let found = match &args.base {
            None if layers.len() < 2 => Err("Image does not have a backing file".to_string()),
            None => Ok(1),
            Some(b) => find_base(&layers, b)
                .ok_or_else(|| format!("Did not find '{b}' in the backing chain of '{filename}'")),
        };
        let inspected = async {
            let depth = found?;
            let facts = qcow2_facts(&layers[0]).await?;
            let Some(facts) = facts else {
                return Err("Image does not have a backing file".to_string());
            };
            if !keep_top && (!facts.snapshots.is_empty() || facts.header.has_data_file()) {
                return Err(format!(
                    "{filename}: emptying this image after the commit is not supported by sluice (use -d)"
                ));
            }
            let top_name = node_filename(&layers[0]).unwrap_or_else(|| filename.clone());
            let links = sluice_qcow2::chain::resolve(Some(&top_name), &facts.header)
                .map_err(|e| e.to_string())?;
            // The chain as the header names it must be the one opened
            // (backing overrides in --image-opts are not followed).
            if links.len() < depth {
                return Err(format!(
                    "{filename}: the backing chain in the image header differs from the one opened"
                ));
            }
            Ok((depth, facts, top_name, links))
        }
        .await;
        let _ = top.close().await;
        let (depth, facts, top_name, links) = inspected?;
        let base_fmt = links[depth - 1].format.clone();
        let (copied, closed) =
            commit_into_base(&spec, &links[..depth], cache, rate, &progress).await?;
        copied?;
        closed?;
        if keep_top {
            return Ok(());
        }
        // Empty the top: the same image written anew, backed by the base
        // (named as the layer above the base names it).
        let h = facts.header;
        let (backing_file, backing_fmt) = if depth == 1 {
            (h.backing_file.clone(), h.backing_format.clone())
        } else {
            let above = sluice_qcow2::chain::read_header_file(&links[depth - 2].filename)
                .map_err(|e| e.to_string())?;
            (above.backing_file, above.backing_format.or(Some(base_fmt)))
        };
        let opts = sluice_qcow2::create::CreateOptions {
            size: Some(h.size),
            cluster_size: h.cluster_size(),
            backing_file,
            backing_fmt,
            version: h.version,
            lazy_refcounts: h.compatible_features & sluice_qcow2::format::compat::LAZY_REFCOUNTS
                != 0,
            refcount_bits: u64::from(h.refcount_bits()),
            extended_l2: h.has_extended_l2(),
            compression_type: h.compression_type,
            ..Default::default()
        };
        create_file(&top_name)?;
        with_file_node(&top_name, |file| async move {
            sluice_qcow2::create::create(&file, &opts)
                .await
                .map_err(|e| e.to_string())
        })
        .await
    });
    progress.finish();
    match res.and_then(|r| r) {
        Ok(()) => {
            if !args.quiet {
                println!("Image committed.");
            }
            ExitCode::SUCCESS
        }
        Err(e) => common::fail(1, &e),
    }
}

/// Opens the chain with the base (the last of `links`) as a writable node
/// of the same graph — the layers above reach it by node-name, so one
/// process holds both the reading chain and the writer — and copies what
/// the layers above hold into it. Returns the copy's and the close's
/// results.
async fn commit_into_base(
    spec: &OpenSpec,
    links: &[sluice_qcow2::chain::ChainLink],
    cache: sluice_drivers::protocol::file::CacheMode,
    rate: Option<RateLimit>,
    progress: &Progress,
) -> Result<(Result<(), String>, Result<(), String>), String> {
    use serde_json::{json, Value};
    use sluice_core::{Graph, PermPair};
    const BASE: &str = "commit-base";
    let base_link = links.last().ok_or("Image does not have a backing file")?;
    let could_not = |name: &str, e: String| format!("Could not open '{name}': {e}");
    let graph = Graph::new();
    let w = graph.writer().await;
    let mut base_opts = json!({
        "driver": base_link.format,
        "node-name": BASE,
        "file": {"driver": "file", "filename": base_link.filename},
    });
    if base_link.format == "qcow2" {
        base_opts["backing"] = Value::Null;
    }
    let base = sluice_drivers::open_with(&w, base_opts, cache, false)
        .await
        .map_err(|e| could_not(&base_link.filename, e.to_string()))?;
    let mut backing = Value::String(BASE.into());
    for l in links[..links.len() - 1].iter().rev() {
        backing = json!({
            "driver": l.format,
            "file": {"driver": "file", "filename": l.filename},
            "backing": backing,
        });
    }
    let mut top_opts = image_options(spec).map_err(|e| could_not(&spec.name, e))?;
    top_opts["backing"] = backing;
    let delete = |n: std::sync::Arc<sluice_core::Node>| {
        let w = &w;
        async move {
            let d = w.drain(&n).await;
            let _ = w.delete_node(&d, &n).await;
        }
    };
    let top = match sluice_drivers::open_with(&w, top_opts, cache, true).await {
        Ok(t) => t,
        Err(e) => {
            delete(base).await;
            return Err(could_not(&spec.name, e.to_string()));
        }
    };
    let roots = async {
        let t = w
            .add_root(
                "block device",
                "commit-top",
                &top,
                PermPair::reader_sharing_all(),
            )
            .await?;
        let b = w
            .add_root("block device", "commit-base", &base, PermPair::writer())
            .await?;
        Ok::<_, sluice_core::Error>((t, b))
    }
    .await;
    let (top_root, base_root) = match roots {
        Ok(r) => r,
        Err(e) => {
            delete(top).await;
            delete(base).await;
            return Err(e.to_string());
        }
    };
    let (top_root, base_root) = (
        std::sync::Arc::new(top_root),
        std::sync::Arc::new(base_root),
    );
    drop(w);
    let unit = qcow2_facts(&base)
        .await?
        .map_or(512, |f| f.header.cluster_size());
    let mode = CopyMode {
        target_zero: false,
        min_sparse: 4096,
        unit,
        // In order, as QEMU's commit job: the base's new clusters are laid
        // out in guest order.
        in_order: true,
        depth: 8,
        compress: false,
        rate,
    };
    let copied = if base.size() < top.size() {
        Err("the base image is smaller than the top image: resize it first".to_string())
    } else {
        let sources = [Source {
            root: top_root.clone(),
            start: 0,
            base_depth: Some(links.len() as u32),
        }];
        copy(&sources, &base_root, mode, progress)
            .await
            .map_err(|(read, at, e)| {
                let what = if read { "reading" } else { "writing" };
                format!("error while {what} at byte {at}: {e}")
            })
    };
    let closed = base_root.flush().await.map_err(|e| e.to_string());
    drop(top_root);
    drop(base_root);
    let w = graph.writer().await;
    for n in [top, base] {
        let d = w.drain(&n).await;
        let _ = w.delete_node(&d, &n).await;
    }
    Ok((copied, closed))
}
