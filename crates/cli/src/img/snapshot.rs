//! `sluice img snapshot -l`: lists a qcow2 image's internal snapshots as
//! qemu-img does. Creating, applying and deleting snapshots is refused.

use super::common::{self, OpenSpec};
use super::info::{qcow2_facts, snapshot_table};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Apply (revert to) a snapshot.
    #[arg(short = 'a')]
    apply: Option<String>,
    /// Create a snapshot.
    #[arg(short = 'c')]
    create: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd')]
    delete: Option<String>,
    #[arg(short = 'f')]
    format: Option<String>,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(long = "object")]
    object: Vec<String>,
    filename: Option<String>,
}

pub fn run(args: SnapshotArgs) -> ExitCode {
    let _ = (&args.object, args.quiet);
    let actions = usize::from(args.list)
        + usize::from(args.apply.is_some())
        + usize::from(args.create.is_some())
        + usize::from(args.delete.is_some());
    if actions > 1 {
        return common::fail(1, "Cannot mix '-l', '-a', '-c', '-d'");
    }
    let Some(filename) = args.filename.clone() else {
        common::error("Expecting one image file name");
        eprintln!("Try 'qemu-img snapshot --help' for more info");
        return ExitCode::from(1);
    };
    if actions == 1 && !args.list {
        return common::fail(
            1,
            &format!(
                "{filename}: creating, applying and deleting snapshots is not supported by sluice"
            ),
        );
    }
    let spec = OpenSpec {
        name: filename,
        format: args.format.clone(),
        image_opts: args.image_opts,
        force_share: args.force_share,
        no_backing: true,
        ..OpenSpec::default()
    };
    let res = common::block_on(async move {
        let img = common::open(&spec).await?;
        let facts = qcow2_facts(&img.node()).await;
        let _ = img.close().await;
        facts
    });
    match res.and_then(|r| r) {
        Ok(Some(f)) if !f.snapshots.is_empty() => {
            print!("Snapshot list:\n{}", snapshot_table(&f.snapshots));
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => common::fail(1, &e),
    }
}
