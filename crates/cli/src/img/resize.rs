//! `sluice img resize`: grows or shrinks an image (`BlockDriver::truncate`
//! with the node drained), with qemu-img's `[+|-]SIZE` syntax, `--shrink`
//! guard and messages. A raw image is resized through its file node.

use super::common::{self, OpenSpec};
use sluice_core::{Node, Role};
use sluice_drivers::size::parse_size;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
pub struct ResizeArgs {
    /// qemu-img resize's options, file name and size. Parsed by hand: the
    /// size may be negative (`-1G`), which no option parser takes.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

#[derive(Default, Debug)]
struct Parsed {
    format: Option<String>,
    prealloc: Option<String>,
    shrink: bool,
    quiet: bool,
    image_opts: bool,
    filename: Option<String>,
    size: Option<String>,
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut args: Vec<String> = args.to_vec();
    // As qemu-img: a last argument that starts with '-' is the size.
    if args
        .last()
        .is_some_and(|a| a.starts_with('-') && a.len() > 1 && a != "--")
    {
        let last = args.pop().unwrap_or_default();
        if last.starts_with("--")
            || !last[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.')
        {
            args.push(last);
        } else {
            p.size = Some(last);
        }
    }
    let mut positional = Vec::new();
    let mut i = 0;
    let mut options_done = false;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if options_done || !a.starts_with('-') || a == "-" {
            positional.push(a.clone());
            continue;
        }
        let mut value = |name: &str, inline: Option<&str>| -> Result<String, String> {
            if let Some(v) = inline {
                return Ok(v.to_string());
            }
            let v = args
                .get(i)
                .cloned()
                .ok_or_else(|| format!("option '{name}' requires an argument"))?;
            i += 1;
            Ok(v)
        };
        match a.as_str() {
            "--" => options_done = true,
            "--shrink" => p.shrink = true,
            "-q" => p.quiet = true,
            "--image-opts" => p.image_opts = true,
            "-f" => p.format = Some(value("-f", None)?),
            "--object" => {
                value("--object", None)?;
            }
            "--preallocation" => p.prealloc = Some(value("--preallocation", None)?),
            s if s.starts_with("--preallocation=") => {
                p.prealloc = Some(s["--preallocation=".len()..].to_string())
            }
            s if s.starts_with("--object=") => {}
            s if s.starts_with("-f") => p.format = Some(s[2..].to_string()),
            s => return Err(format!("unrecognized option '{s}'")),
        }
    }
    for v in positional {
        if p.filename.is_none() {
            p.filename = Some(v);
        } else if p.size.is_none() {
            p.size = Some(v);
        } else {
            return Err("Expecting image file name and size".into());
        }
    }
    Ok(p)
}

/// The new size: absolute, or relative to `current` with `+`/`-`.
fn new_size(text: &str, current: u64) -> Result<u64, String> {
    let bad = || {
        "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.".to_string()
    };
    let (sign, num) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => (0, text),
    };
    let n = parse_size(num).map_err(|_| bad())?;
    let size = match sign {
        1 => current as i128 + n as i128,
        -1 => current as i128 - n as i128,
        _ => n as i128,
    };
    if size <= 0 {
        return Err("New image size must be positive".into());
    }
    u64::try_from(size).map_err(|_| bad())
}

/// Resizes `node`: the format's own truncate, or for raw the file below.
async fn truncate(node: &Arc<Node>, size: u64, prealloc: &str) -> Result<(), String> {
    let target = if node.driver_name() == "raw" {
        node.child(Role::File)
            .ok_or_else(|| "the raw node has no file".to_string())?
    } else {
        node.clone()
    };
    target
        .driver()
        .truncate(&target, size, prealloc)
        .await
        .map_err(|e| e.to_string())?;
    target.set_size(size);
    if !Arc::ptr_eq(&target, node) {
        node.set_size(size);
    }
    Ok(())
}

pub fn run(args: ResizeArgs) -> ExitCode {
    let p = match parse(&args.args) {
        Ok(p) => p,
        Err(e) => return common::fail(1, &e),
    };
    let (Some(filename), Some(size_text)) = (p.filename.clone(), p.size.clone()) else {
        return common::usage("resize", "Expecting image file name and size");
    };
    let prealloc = p.prealloc.clone().unwrap_or_else(|| "off".into());
    if !matches!(prealloc.as_str(), "off" | "metadata" | "falloc" | "full") {
        return common::fail(1, &format!("Invalid preallocation mode '{prealloc}'"));
    }
    if p.image_opts && p.format.is_some() {
        return common::fail(1, "--image-opts and --format are mutually exclusive");
    }
    // The size's syntax is checked before the image is opened.
    if let Err(e) = new_size(&size_text, 1 << 62) {
        if e.starts_with("Parameter") {
            return common::fail(1, &e);
        }
    }
    let spec = OpenSpec {
        name: filename,
        format: p.format.clone(),
        image_opts: p.image_opts,
        writable: true,
        no_backing: true,
        ..OpenSpec::default()
    };
    if let Err(e) = common::backing_chain_opens(&spec) {
        return common::fail(1, &e);
    }
    let shrink = p.shrink;
    let res = common::block_on(async move {
        let img = common::open(&spec).await?;
        let node = img.node();
        let current = node.size();
        let res = match new_size(&size_text, current) {
            Err(e) => Err(e),
            Ok(size) if size < current && !shrink => Err(
                "Use the --shrink option to perform a shrink operation.\nqemu-img: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there."
                    .to_string(),
            ),
            Ok(size) if size == current => Ok(()),
            Ok(size) => {
                let w = img.graph.writer().await;
                let drained = w.drain(&node).await;
                let r = truncate(&node, size, &prealloc).await;
                drop(drained);
                r
            }
        };
        let closed = img.close().await;
        res.and(closed)
    });
    match res.and_then(|r| r) {
        Ok(()) => {
            if !p.quiet {
                println!("Image resized.");
            }
            ExitCode::SUCCESS
        }
        Err(e) => common::fail(1, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::common::args;
    use super::*;

    #[test]
    fn a_negative_last_argument_is_the_size() {
        let p = parse(&args(&["--shrink", "img", "-1G"])).unwrap();
        assert_eq!(p.filename.as_deref(), Some("img"));
        assert_eq!(p.size.as_deref(), Some("-1G"));
        assert!(p.shrink);
        let p = parse(&args(&["-f", "raw", "--preallocation=full", "img", "+1M"])).unwrap();
        assert_eq!(p.format.as_deref(), Some("raw"));
        assert_eq!(p.prealloc.as_deref(), Some("full"));
        assert_eq!(p.size.as_deref(), Some("+1M"));
        assert!(parse(&args(&["-x", "img", "1M"])).is_err());
    }

    #[test]
    fn sizes_are_absolute_or_relative() {
        assert_eq!(new_size("16M", 8 << 20), Ok(16 << 20));
        assert_eq!(new_size("+1M", 8 << 20), Ok(9 << 20));
        assert_eq!(new_size("-1M", 8 << 20), Ok(7 << 20));
        assert_eq!(
            new_size("-8M", 8 << 20),
            Err("New image size must be positive".into())
        );
        assert!(new_size("1Z", 8 << 20)
            .unwrap_err()
            .starts_with("Parameter 'size'"));
    }
}
