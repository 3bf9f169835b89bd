//! `sluice img`: the offline image tool, with qemu-img's options.

mod bench;

use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ImgCommand {
    /// Run a simple image benchmark (qemu-img bench).
    Bench(Box<bench::BenchArgs>),
}

pub fn run(cmd: ImgCommand) -> Result<ExitCode, String> {
    match cmd {
        ImgCommand::Bench(args) => bench::run(*args),
    }
}
