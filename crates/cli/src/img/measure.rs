//! `sluice img measure`: the file size a qcow2 or raw image needs for a
//! given virtual size, or for the data of an existing image, computed as
//! QEMU's `qcow2_measure` does (metadata for the whole disk plus the
//! clusters the source allocates with data).

use super::common::{self, parse_o_list, OpenSpec};
use super::create::parse_image_size;
use super::info::output_json;
use super::json::J;
use sluice_qcow2::create::{CreateOptions, Prealloc};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct MeasureArgs {
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Target format (default raw).
    #[arg(short = 'O')]
    out_format: Option<String>,
    /// Target format options.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure for a new image of this virtual size.
    #[arg(long = "size")]
    size: Option<String>,
    /// Source format.
    #[arg(short = 'f')]
    format: Option<String>,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "object")]
    object: Vec<String>,
    filename: Option<String>,
}

/// QEMU's `qcow2_refcount_metadata_size`: refcount table and blocks for
/// `clusters` clusters (which include the refcount structures).
fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_bits: u64) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = cluster_size * 8 / refcount_bits;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cluster_size;
        }
    }
}

/// QEMU's `qcow2_calc_prealloc_size`: the file size of a fully allocated
/// image of `size` bytes.
pub fn qcow2_full_size(size: u64, o: &CreateOptions) -> u64 {
    let cs = o.cluster_size;
    let aligned = size.div_ceil(cs) * cs;
    let l2e = if o.extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = size.div_ceil(cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, o.refcount_bits);
    meta + aligned
}

/// Bytes of whole clusters the source allocates with data (zero runs and
/// unallocated ranges do not count).
async fn allocated_data(img: &common::Image, cluster: u64) -> Result<u64, String> {
    let node = img.node();
    let size = node.size();
    let (mut off, mut required) = (0u64, 0u64);
    while off < size {
        let e = common::extent_at(&node, off, size - off)
            .await
            .map_err(|e| e.to_string())?;
        let mut len = e.length;
        if !e.zero && e.data && e.present {
            len = (off + len).div_ceil(cluster) * cluster - off;
            required += off % cluster + len;
        }
        off += len;
    }
    Ok(required)
}

pub fn run(args: MeasureArgs) -> ExitCode {
    let _ = &args.object;
    let json = match output_json(&args.output, "measure") {
        Ok(j) => j,
        Err(code) => return code,
    };
    let size = match args.size.as_deref().map(parse_image_size).transpose() {
        Ok(s) => s,
        Err(e) => return common::fail(1, &e),
    };
    match (&size, &args.filename) {
        (None, None) => {
            return common::fail(1, "Either --size N or one filename must be specified.")
        }
        (Some(_), Some(_)) => {
            return common::fail(1, "--size N cannot be used together with a filename.")
        }
        _ => {}
    }
    let out_fmt = args.out_format.clone().unwrap_or_else(|| "raw".into());
    let opts = match parse_o_list(&args.options) {
        Ok(o) => o,
        Err(e) => return common::fail(1, &e),
    };
    let qopts = match out_fmt.as_str() {
        "qcow2" => {
            let map = opts
                .iter()
                .filter(|(k, _)| k != "size")
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            match CreateOptions::parse(map) {
                Ok(o) => Some(o),
                Err(e) => {
                    let t = e.to_string();
                    common::error(t.strip_prefix("qcow2: ").unwrap_or(&t));
                    return common::fail(1, "Invalid options for file format 'qcow2'");
                }
            }
        }
        "raw" => {
            if let Some((k, _)) = opts.iter().find(|(k, _)| k != "preallocation") {
                common::error(&format!("Invalid parameter '{k}'"));
                return common::fail(1, "Invalid options for file format 'raw'");
            }
            None
        }
        other => return common::fail(1, &format!("Unknown file format '{other}'")),
    };
    let res = common::block_on(async {
        // (virtual size, allocated data bytes, source supports bitmaps)
        let (vsize, data, bitmaps) = match (size, &args.filename) {
            (Some(s), _) => (s.div_ceil(512) * 512, 0, false),
            (None, Some(name)) => {
                let spec = OpenSpec {
                    name: name.clone(),
                    format: args.format.clone(),
                    image_opts: args.image_opts,
                    force_share: args.force_share,
                    ..OpenSpec::default()
                };
                let img = common::open(&spec).await?;
                let cluster = qopts.as_ref().map_or(512, |o| o.cluster_size);
                let data = allocated_data(&img, cluster).await;
                let bitmaps = qopts.is_some()
                    && super::info::qcow2_facts(&img.node())
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|f| f.header.version >= 3);
                let vsize = img.size().div_ceil(512) * 512;
                let _ = img.close().await;
                (vsize, data?, bitmaps)
            }
            (None, None) => unreachable!("checked above"),
        };
        Ok::<_, String>(match &qopts {
            None => (vsize, vsize, bitmaps),
            Some(o) => {
                let full = qcow2_full_size(vsize, o);
                let data = if matches!(o.preallocation, Prealloc::Full | Prealloc::Falloc) {
                    vsize
                } else if size.is_some() {
                    0
                } else {
                    data
                };
                (full - vsize + data, full, bitmaps)
            }
        })
    });
    let (required, full, bitmaps) = match res.and_then(|r| r) {
        Ok(r) => r,
        Err(e) => return common::fail(1, &e),
    };
    if json {
        let mut j = J::obj();
        if bitmaps {
            j.set("bitmaps", 0u64.into());
        }
        j = j.with("required", required).with("fully-allocated", full);
        println!("{}", j.pretty());
    } else {
        println!("required size: {required}");
        println!("fully allocated size: {full}");
        if bitmaps {
            println!("bitmaps size: 0");
        }
    }
    ExitCode::SUCCESS
}
