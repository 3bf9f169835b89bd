//! `sluice img check`: consistency check (and `-r leaks|all` repair) of a
//! qcow2 image by `sluice_qcow2::check`, with qemu-img's report and exit
//! codes (0 clean, 1 check errors, 2 corruptions, 3 leaks, 63 a format
//! without checks). Only the image's `file` node is opened, so images the
//! qcow2 driver refuses (corrupt, dirty) can still be checked.

use super::common::{self, image_options, OpenSpec};
use super::info::output_json;
use serde_json::Value;
use sluice_qcow2::check::{check_logged, Repair};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Repair: leaks or all.
    #[arg(short = 'r', long = "repair")]
    repair: Option<String>,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Cache mode.
    #[arg(short = 'T', long = "cache")]
    cache: Option<String>,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "object")]
    object: Vec<String>,
    filename: Option<String>,
}

pub fn run(args: CheckArgs) -> ExitCode {
    let _ = &args.object;
    let json = match output_json(&args.output, "check") {
        Ok(j) => j,
        Err(code) => return code,
    };
    let repair = match args.repair.as_deref() {
        None => None,
        Some("leaks") => Some(Repair::Leaks),
        Some("all") => Some(Repair::All),
        Some(other) => {
            return common::usage(
                "check",
                &format!("--repair (-r) expects 'leaks' or 'all' not '{other}'"),
            );
        }
    };
    let Some(filename) = args.filename.clone() else {
        return common::usage("check", "Expecting one image file name");
    };
    if args.image_opts && args.format.is_some() {
        return common::fail(1, "--image-opts and --format are mutually exclusive");
    }
    let cache = match common::cache_mode(args.cache.as_deref()) {
        Ok(c) => c,
        Err(e) => return common::fail(1, &e),
    };
    let spec = OpenSpec {
        name: filename.clone(),
        format: args.format.clone(),
        image_opts: args.image_opts,
        ..OpenSpec::default()
    };
    let could_not = |e: String| format!("Could not open '{filename}': {e}");
    let opts = match image_options(&spec) {
        Ok(v) => v,
        Err(e) => return common::fail(1, &could_not(e)),
    };
    match opts["driver"].as_str() {
        Some("qcow2") => {}
        Some(_) => return common::fail(63, "This image format does not support checks"),
        None => return common::fail(1, &could_not("Parameter 'driver' is missing".into())),
    }
    // A header that cannot be read is the check's to report.
    if let Err(e) = common::backing_chain_opens(&spec) {
        return common::fail(1, &e);
    }
    let file_opts = opts.get("file").cloned().unwrap_or(Value::Null);
    if args.force_share && repair.is_some() {
        return common::fail(
            1,
            &could_not("force-share=on can only be used with read-only images".into()),
        );
    }
    let res = common::block_on(async {
        let graph = sluice_core::Graph::new();
        let w = graph.writer().await;
        let file = sluice_drivers::open_with(&w, file_opts, cache, repair.is_none())
            .await
            .map_err(|e| could_not(e.to_string()))?;
        let name = common::node_filename(&file).unwrap_or_else(|| filename.clone());
        let mut log = Vec::new();
        let report = check_logged(&file, &name, repair, &mut log).await;
        let flushed = if repair.is_some() {
            file.flush().await.map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        let d = w.drain(&file).await;
        let _ = w.delete_node(&d, &file).await;
        let report = report.map_err(|e| format!("Check failed: {e}"))?;
        flushed?;
        Ok::<_, String>((report, log))
    });
    let (report, log) = match res.and_then(|r| r) {
        Ok(r) => r,
        Err(e) => return common::fail(1, &e),
    };
    for l in &log {
        eprintln!("{l}");
    }
    if json {
        println!("{}", report.to_json());
    } else if !args.quiet {
        print!("{}", report.human());
    }
    ExitCode::from(report.exit_code() as u8)
}
