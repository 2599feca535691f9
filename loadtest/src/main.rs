//! The `pushload` binary: parse flags, run the workload, print the report, exit with its verdict.
//!
//! Exit status: 0 when every check passed, 1 when something was lost, duplicated, reordered or
//! unfinished (or the run failed), 64 on bad flags. A closed stdout (`| head`) is not an error.

mod checker;
mod cli;
mod publisher;
mod report;
mod subscriber;
mod usage;
mod workload;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, Fanout};

/// Exit status for flags pushload refuses to run with (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Fanout(args) = cli.command;
    let plan = match Fanout::try_from(args) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("pushload: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let report = match workload::fanout(plan).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("pushload: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let text = if cli.json { report.to_json() } else { report.render() };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("pushload: writing the report: {e}");
            return ExitCode::FAILURE;
        }
        _ => {}
    }
    if report.failures().is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
