//! `sluice img amend`: changes format-specific options of an existing
//! image (qemu-img amend), with qemu-img's command line, messages and
//! exit codes. The work is `sluice_qcow2::amend`; this is the tool
//! around it: `-o` lists (`help` prints the amendable options), opening
//! the image as qemu-img does, `-p` progress as qemu-img prints it (its
//! `qemu_progress_print`: every change of more than a percent, 0 and 100
//! always, then a newline — also after a failure, once `-o` was given).

use super::common::{self, MetaImage, OpenSpec};
use std::io::Write;
use std::process::ExitCode;
use std::sync::Mutex;

#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
pub struct AmendArgs {
    /// qemu-img amend's options and file name, parsed by hand for
    /// qemu-img's messages.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

#[derive(Default, Debug)]
struct Parsed {
    format: Option<String>,
    cache: Option<String>,
    options: Vec<String>,
    image_opts: bool,
    progress: bool,
    quiet: bool,
    force: bool,
    help: bool,
    files: Vec<String>,
}

/// Formats QEMU knows that cannot amend anything (qemu-img's message for
/// them differs from the one for unknown formats).
const NO_AMEND: &[&str] = &[
    "raw",
    "file",
    "host_device",
    "host_cdrom",
    "qcow",
    "vmdk",
    "vdi",
    "vpc",
    "vhdx",
    "qed",
    "parallels",
    "bochs",
    "cloop",
    "dmg",
    "vvfat",
    "nbd",
    "null-co",
    "null-aio",
    "blkdebug",
    "blkverify",
    "throttle",
    "copy-on-read",
    "compress",
    "preallocate",
    "snapshot-access",
    "nvme",
    "iscsi",
    "ssh",
    "http",
    "https",
    "ftp",
    "ftps",
];

const TRY: &str = "Try 'qemu-img amend --help' for more info";

fn usage_error(msg: &str) -> Result<Parsed, String> {
    Err(format!("{msg}\n{TRY}"))
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    let mut options_done = false;
    while i < args.len() {
        let a = args[i].clone();
        i += 1;
        if options_done || !a.starts_with('-') || a == "-" {
            p.files.push(a);
            continue;
        }
        if let Some(long) = a.strip_prefix("--") {
            if long.is_empty() {
                options_done = true;
                continue;
            }
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let takes = matches!(name, "object" | "format" | "cache" | "options");
            let value = if takes {
                match inline {
                    Some(v) => Some(v),
                    None if i < args.len() => {
                        i += 1;
                        Some(args[i - 1].clone())
                    }
                    None => {
                        return usage_error(&format!(
                            "qemu-img amend: option '--{name}' requires an argument"
                        ))
                    }
                }
            } else {
                if inline.is_some() {
                    return usage_error(&format!(
                        "qemu-img amend: option '--{name}' doesn't allow an argument"
                    ));
                }
                None
            };
            match name {
                "object" => {}
                "format" => p.format = value,
                "cache" => p.cache = value,
                "options" => p.options.extend(value),
                "image-opts" => p.image_opts = true,
                "force" => p.force = true,
                "progress" => p.progress = true,
                "quiet" => p.quiet = true,
                "help" => p.help = true,
                _ => {
                    return usage_error(&format!("qemu-img amend: unrecognized option '{a}'"));
                }
            }
            continue;
        }
        // Short options, getopt style: bundled flags, attached values.
        let chars: Vec<char> = a[1..].chars().collect();
        let mut k = 0;
        while k < chars.len() {
            let c = chars[k];
            k += 1;
            match c {
                'p' => p.progress = true,
                'q' => p.quiet = true,
                'h' => p.help = true,
                'f' | 't' | 'o' => {
                    let v = if k < chars.len() {
                        let v: String = chars[k..].iter().collect();
                        k = chars.len();
                        v
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        return usage_error(&format!(
                            "qemu-img amend: option requires an argument -- '{c}'"
                        ));
                    };
                    match c {
                        'f' => p.format = Some(v),
                        't' => p.cache = Some(v),
                        _ => p.options.push(v),
                    }
                }
                _ => return usage_error(&format!("qemu-img amend: invalid option -- '{c}'")),
            }
        }
    }
    Ok(p)
}

/// The items of one `-o` argument (`,,` is a literal comma); `None` when
/// an item is empty (QEMU's `is_valid_option_list`).
fn option_items(list: &str) -> Option<Vec<String>> {
    let items = common::o_items(list);
    items.iter().all(|i| !i.is_empty()).then_some(items)
}

/// `key=value` pairs of the `-o` items; a bare key means `key=on`, as
/// QemuOpts reads it.
fn option_pairs(items: &[String]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|it| match it.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (it.clone(), "on".to_string()),
        })
        .collect()
}

fn is_help(items: &[String]) -> bool {
    items.iter().any(|i| i == "help" || i == "?")
}

/// QEMU's simple progress output (`util/qemu-progress.c`, steps of more
/// than one percent), on stdout; does nothing without `-p` (or with `-q`).
struct QemuProgress {
    enabled: bool,
    /// (current, last printed)
    state: Mutex<(f32, f32)>,
}

impl QemuProgress {
    fn new(enabled: bool) -> QemuProgress {
        QemuProgress {
            enabled,
            state: Mutex::new((0.0, 0.0)),
        }
    }

    fn print(&self, pct: f32) {
        if !self.enabled {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let cur = pct.min(100.0);
        s.0 = cur;
        if cur > s.1 + 1.0 || cur < s.1 - 1.0 || cur == 0.0 || cur == 100.0 {
            s.1 = cur;
            let mut o = std::io::stdout().lock();
            let _ = write!(o, "    ({cur:3.2}/100%)\r");
            let _ = o.flush();
        }
    }

    fn end(&self) {
        if self.enabled {
            println!();
        }
    }
}

/// qemu-img's `print_amend_option_help`.
fn option_help(format: &str) -> ExitCode {
    if format == "qcow2" {
        print!("{}", sluice_qcow2::amend::HELP);
        ExitCode::SUCCESS
    } else if NO_AMEND.contains(&format) {
        common::fail(
            1,
            &format!("Format driver '{format}' does not support option amendment"),
        )
    } else {
        common::fail(1, &format!("Unknown file format '{format}'"))
    }
}

pub fn run(args: AmendArgs) -> ExitCode {
    let p = match parse(&args.args) {
        Ok(p) => p,
        Err(e) => {
            // getopt's own lines carry no `qemu-img: ` prefix.
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    if p.help {
        println!("Usage:\nUpdate format-specific options of the image.  Usage:\n\n  qemu-img amend [-f FMT | --image-opts] [t CACHE] [--force] [-p] [-q]\n        [--object OBJDEF -o OPTIONS FILENAME");
        return ExitCode::SUCCESS;
    }
    let mut items = Vec::new();
    for o in &p.options {
        match option_items(o) {
            Some(mut i) => items.append(&mut i),
            None => return common::fail(1, &format!("Invalid option list: {o}")),
        }
    }
    if p.options.is_empty() {
        common::error("Must specify options (-o)");
        eprintln!("{TRY}");
        return ExitCode::from(1);
    }
    let progress = QemuProgress::new(p.progress && !p.quiet);
    let code = amend_with(&p, &items, &progress);
    progress.end();
    code
}

/// Everything after the options were read; `progress` ends after it.
fn amend_with(p: &Parsed, items: &[String], progress: &QemuProgress) -> ExitCode {
    if p.image_opts && p.format.is_some() {
        return common::fail(1, "--image-opts and --format are mutually exclusive");
    }
    let help = is_help(items);
    if help {
        if let Some(f) = &p.format {
            return option_help(f);
        }
    }
    if p.files.len() != 1 {
        return common::fail(1, "Expecting one image file name");
    }
    let cache = match common::cache_mode(p.cache.as_deref()) {
        Ok(c) => c,
        Err(e) => return common::fail(1, &e),
    };
    let spec = OpenSpec {
        name: p.files[0].clone(),
        format: p.format.clone(),
        image_opts: p.image_opts,
        writable: true,
        cache: Some(cache),
        ..OpenSpec::default()
    };
    // qemu-img opens the backing chain with the image.
    if let Err(e) = common::backing_chain_opens(&spec) {
        return common::fail(1, &e);
    }
    let pairs = option_pairs(items);
    let force = p.force;
    let res = common::block_on(async move {
        let mut img = match common::open_metadata(&spec).await? {
            MetaImage::Qcow2(img) => img,
            MetaImage::Other(img) => {
                let name = img.node().driver_name();
                let closed = img.close().await;
                let res = if help {
                    Ok(Some(name))
                } else {
                    Err(format!(
                        "Format driver '{name}' does not support option amendment"
                    ))
                };
                return res.and_then(|r| closed.map(|()| r));
            }
        };
        let res = if help {
            Ok(Some("qcow2"))
        } else {
            match sluice_qcow2::amend::AmendOptions::parse(&pairs) {
                Err(e) => Err(e.to_string()),
                Ok(o) => {
                    progress.print(0.0);
                    let mut report =
                        |done: u64, total: u64| progress.print(100.0 * done as f32 / total as f32);
                    let r = sluice_qcow2::amend::amend(&mut img.image, &o, force, &mut report)
                        .await
                        .map(|()| None)
                        .map_err(|e| e.to_string());
                    progress.print(100.0);
                    r
                }
            }
        };
        let closed = img.close().await;
        res.and_then(|r| closed.map(|()| r))
    });
    match res.and_then(|r| r) {
        Ok(Some(format)) => option_help(format),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => common::fail(1, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::common::args;
    use super::*;

    #[test]
    fn getopt_style_arguments() {
        let p = parse(&args(&[
            "-pq",
            "-fqcow2",
            "-o",
            "compat=1.1",
            "--force",
            "img",
        ]))
        .unwrap();
        assert!(p.progress && p.quiet && p.force);
        assert_eq!(p.format.as_deref(), Some("qcow2"));
        assert_eq!(p.options, ["compat=1.1"]);
        assert_eq!(p.files, ["img"]);
        let e = parse(&args(&["-x", "img"])).unwrap_err();
        assert_eq!(e, format!("qemu-img amend: invalid option -- 'x'\n{TRY}"));
        assert!(parse(&args(&["--bogus"])).is_err());
    }

    #[test]
    fn option_lists_as_qemu_reads_them() {
        assert_eq!(
            option_items("a=b,,c,d"),
            Some(vec!["a=b,c".into(), "d".into()])
        );
        assert_eq!(option_items("a=b,"), None);
        assert_eq!(option_items(""), None);
        assert_eq!(
            option_pairs(&["compat".into()]),
            [("compat".to_string(), "on".to_string())]
        );
    }
}
