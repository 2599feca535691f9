//! The `pushload` binary: parse flags, run the workload, print the report, exit with its verdict.
//!
//! Exit status: 0 when every check passed, 1 when something was lost, duplicated, reordered or
//! unfinished (or the run failed), 64 on bad flags. A closed stdout (`| head`) is not an error.

mod checker;
mod cli;
mod floor;
mod fuzz;
mod publisher;
mod rawws;
mod replay;
mod report;
mod subscriber;
mod usage;
mod workload;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, Fanout, PublishRun};
use crate::report::Verdict;

/// Exit status for flags pushload refuses to run with (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let plan = match cli.command {
        Command::Fanout(args) => Fanout::try_from(args).map(Plan::Fanout),
        Command::Publish(args) => PublishRun::try_from(args).map(Plan::Publish),
        Command::Fuzz(args) => fuzz::plan(args).map(Plan::Fuzz),
        Command::Floor(args) => Ok(Plan::Floor(args)),
        Command::Replay(args) => Ok(Plan::Replay(args)),
    };
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("pushload: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let report: anyhow::Result<Box<dyn Verdict>> = match plan {
        Plan::Fanout(plan) => workload::fanout(plan).await.map(|r| Box::new(r) as _),
        Plan::Publish(plan) => workload::publish(plan).await.map(|r| Box::new(r) as _),
        Plan::Fuzz(plan) => fuzz::run(plan).await.map(|r| Box::new(r) as _),
        Plan::Floor(args) => floor::run(args).await.map(|r| Box::new(r) as _),
        Plan::Replay(args) => replay::run(args).await.map(|r| Box::new(r) as _),
    };
    let report = match report {
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

/// A checked plan of either subcommand.
enum Plan {
    Fanout(Fanout),
    Publish(PublishRun),
    Fuzz(fuzz::FuzzPlan),
    Floor(cli::FloorArgs),
    Replay(cli::ReplayArgs),
}
