//! `sluice`: one binary for QEMU's storage tools.
//!
//! * `sluice img ...` — qemu-img work-alike (info, map, compare, create, convert, check, resize, rebase, commit, measure, snapshot -l, bench);
//! * `sluice io ...` — qemu-io work-alike;
//! * `sluice demo` — the built-in default: an in-memory backing chain under
//!   guest I/O, shortened live by a drained graph change.

mod daemon;
mod demo;
mod img;
mod io;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A block layer and storage daemon: qemu-img, qemu-io and qemu-storage-daemon work-alikes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// qemu-img work-alike.
    Img {
        #[command(subcommand)]
        command: img::ImgCommand,
    },
    /// qemu-io work-alike: `sluice io [-f FMT] [-r] [-c CMD]... [FILE]`.
    Io(io::IoArgs),
    /// Runs guest I/O on a built-in in-memory chain while the chain is
    /// shortened live, and reports what happened (no files needed).
    Demo(demo::DemoArgs),
    /// qemu-storage-daemon work-alike: serves nodes over NBD until SIGINT
    /// or SIGTERM; with no options, a 64 MiB RAM disk on a Unix socket.
    Daemon(daemon::DaemonArgs),
}

fn main() -> ExitCode {
    // Like qemu-img, a bad command line exits with 1 (clap's default is 2).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let (tool, result) = match cli.command {
        Command::Img { command } => ("qemu-img", img::run(command)),
        Command::Io(args) => ("qemu-io", io::run(args)),
        Command::Demo(args) => ("sluice demo", demo::run(args)),
        Command::Daemon(args) => ("qemu-storage-daemon", daemon::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = tool;
            eprintln!("sluice: {e}");
            ExitCode::FAILURE
        }
    }
}
