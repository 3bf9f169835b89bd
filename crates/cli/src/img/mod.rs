//! `sluice img`: the offline image tool, with qemu-img's options, output
//! and exit codes.

mod amend;
mod bench;
mod check;
mod commit;
mod common;
mod compare;
mod compress;
mod convert;
mod create;
pub(crate) mod info;
mod json;
mod map;
mod measure;
mod progress;
mod rate;
mod rebase;
mod resize;
mod snapshot;

use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ImgCommand {
    /// Change format-specific options of an image (qemu-img amend).
    Amend(amend::AmendArgs),
    /// Run a simple image benchmark (qemu-img bench).
    Bench(Box<bench::BenchArgs>),
    /// Show information about an image (qemu-img info).
    Info(info::InfoArgs),
    /// Dump the metadata of an image's chain (qemu-img map).
    Map(map::MapArgs),
    /// Check whether two images have the same content (qemu-img compare).
    Compare(compare::CompareArgs),
    /// Create a new image (qemu-img create).
    Create(create::CreateArgs),
    /// Convert an image to another format or flatten a chain (qemu-img convert).
    Convert(Box<convert::ConvertArgs>),
    /// List, create, apply or delete the internal snapshots of an image
    /// (qemu-img snapshot -l/-c/-a/-d).
    Snapshot(snapshot::SnapshotArgs),
    /// Check an image for consistency, optionally repairing it (qemu-img check).
    Check(check::CheckArgs),
    /// Change the virtual size of an image (qemu-img resize).
    Resize(resize::ResizeArgs),
    /// Commit the top image's data into its backing file (qemu-img commit).
    Commit(commit::CommitArgs),
    /// Change the backing file of an image (qemu-img rebase).
    Rebase(rebase::RebaseArgs),
    /// Compute the file size an image needs (qemu-img measure).
    Measure(measure::MeasureArgs),
}

pub fn run(cmd: ImgCommand) -> Result<ExitCode, String> {
    match cmd {
        ImgCommand::Amend(args) => Ok(amend::run(args)),
        ImgCommand::Bench(args) => bench::run(*args),
        ImgCommand::Info(args) => Ok(info::run(args)),
        ImgCommand::Map(args) => Ok(map::run(args)),
        ImgCommand::Compare(args) => Ok(compare::run(args)),
        ImgCommand::Create(args) => Ok(create::run(args)),
        ImgCommand::Convert(args) => Ok(convert::run(*args)),
        ImgCommand::Snapshot(args) => Ok(snapshot::run(args)),
        ImgCommand::Check(args) => Ok(check::run(args)),
        ImgCommand::Resize(args) => Ok(resize::run(args)),
        ImgCommand::Commit(args) => Ok(commit::run(args)),
        ImgCommand::Rebase(args) => Ok(rebase::run(args)),
        ImgCommand::Measure(args) => Ok(measure::run(args)),
    }
}
