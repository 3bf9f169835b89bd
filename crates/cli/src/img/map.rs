//! `sluice img map`: where each range of an image's chain lies, as
//! qemu-img map prints it (`--output=json` or the human table).

use super::common::{self, OpenSpec};
use super::info::output_json;
use super::json::J;
use sluice_core::status::map_range;
use sluice_core::{Extent, Graph, Node};
use sluice_drivers::size::parse_size;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct MapArgs {
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// First byte to map.
    #[arg(short = 's', long = "start-offset", allow_hyphen_values = true)]
    start_offset: Option<String>,
    /// Bytes to map at most.
    #[arg(short = 'l', long = "max-length", allow_hyphen_values = true)]
    max_length: Option<String>,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "object")]
    object: Vec<String>,
    filename: Option<String>,
}

/// Whether the run at `e` is a compressed cluster: data the driver can
/// give no offset for, in a qcow2 layer without an external data file.
fn is_compressed(layers: &[Arc<Node>], e: &Extent) -> bool {
    if !e.data || e.offset.is_some() {
        return false;
    }
    layers
        .get(e.depth as usize)
        .is_some_and(|n| n.driver_name() == "qcow2" && n.child(sluice_core::Role::Data).is_none())
}

fn entry_json(layers: &[Arc<Node>], e: &Extent) -> J {
    let mut j = J::obj()
        .with("start", e.start)
        .with("length", e.length)
        .with("depth", e.depth)
        .with("present", e.present)
        .with("zero", e.zero)
        .with("data", e.data)
        .with("compressed", is_compressed(layers, e));
    if let Some(o) = e.offset {
        j.set("offset", o.into());
    }
    j
}

/// `map_range` over windows of at most `STATUS_MAX` bytes (a single
/// request may not exceed 2 GiB), joining runs across window edges as
/// `map_range` joins them within one.
async fn map_extents(node: &Arc<Node>, start: u64, len: u64) -> Result<Vec<Extent>, String> {
    let mut out: Vec<Extent> = Vec::new();
    let end = start + len;
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(common::STATUS_MAX);
        let window = map_range(node, pos, n).await.map_err(|e| e.to_string())?;
        for e in window {
            if let Some(last) = out.last_mut() {
                let contiguous = match (last.offset, e.offset) {
                    (Some(a), Some(b)) => a + last.length == b,
                    (None, None) => true,
                    _ => false,
                };
                if contiguous
                    && (
                        last.depth,
                        last.present,
                        last.zero,
                        last.data,
                        &last.file_node,
                    ) == (e.depth, e.present, e.zero, e.data, &e.file_node)
                {
                    last.length += e.length;
                    continue;
                }
            }
            out.push(e);
        }
        pos += n;
    }
    Ok(out)
}

/// `%#-16x`: C's alternate hex form has no `0x` for zero.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

fn file_name(graph: &Graph, e: &Extent) -> String {
    e.file_node
        .as_deref()
        .and_then(|n| graph.node(n).ok())
        .map(|n| common::node_filename(&n).unwrap_or_else(|| n.name().to_string()))
        .unwrap_or_default()
}

/// Parses a `--start-offset`/`--max-length` value with qemu-img's message.
fn offset_arg(v: Option<&str>, what: &str) -> Result<Option<u64>, String> {
    match v {
        None => Ok(None),
        Some(s) => parse_size(s)
            .map(Some)
            .map_err(|_| format!("Invalid {what} specified! You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")),
    }
}

pub fn run(args: MapArgs) -> ExitCode {
    let _ = &args.object;
    let json = match output_json(&args.output, "map") {
        Ok(j) => j,
        Err(code) => return code,
    };
    let start = match offset_arg(args.start_offset.as_deref(), "start offset") {
        Ok(v) => v.unwrap_or(0),
        Err(_) => return common::fail(1, "Invalid start offset specified"),
    };
    let max_len = match offset_arg(args.max_length.as_deref(), "max length") {
        Ok(v) => v,
        Err(_) => return common::fail(1, "Invalid max length specified"),
    };
    let Some(filename) = args.filename.clone() else {
        return common::usage("map", "Expecting one image file name");
    };
    if args.image_opts && args.format.is_some() {
        return common::fail(1, "--image-opts and --format are mutually exclusive");
    }
    let spec = OpenSpec {
        name: filename,
        format: args.format.clone(),
        image_opts: args.image_opts,
        force_share: args.force_share,
        ..OpenSpec::default()
    };
    let res = common::block_on(async move {
        let img = common::open(&spec).await?;
        let node = img.node();
        let size = node.size();
        let start = start.min(size);
        let len = max_len.unwrap_or(u64::MAX).min(size - start);
        let extents = map_extents(&node, start, len).await;
        let layers = common::chain_layers(&node);
        let out = extents.map(|ext| {
            let mut s = String::new();
            if json {
                s.push('[');
                for (i, e) in ext.iter().enumerate() {
                    if i > 0 {
                        s.push_str(",\n");
                    }
                    s.push_str(&entry_json(&layers, e).compact());
                }
                s.push_str("]\n");
            } else {
                s.push_str(&format!(
                    "{:<16}{:<16}{:<16}{}\n",
                    "Offset", "Length", "Mapped to", "File"
                ));
                for e in &ext {
                    match (e.data, e.offset) {
                        (true, Some(o)) => s.push_str(&format!(
                            "{}{}{}{}\n",
                            hex16(e.start),
                            hex16(e.length),
                            hex16(o),
                            file_name(&img.graph, e)
                        )),
                        // The human table has no way to show data
                        // without a host offset.
                        (true, None) => return (s, true),
                        _ => {}
                    }
                }
            }
            (s, false)
        });
        let _ = img.close().await;
        out
    });
    match res.and_then(|r| r) {
        Ok((s, unmappable)) => {
            print!("{s}");
            if unmappable {
                return common::fail(
                    1,
                    "File contains external, encrypted or compressed clusters.",
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => common::fail(1, &e),
    }
}
