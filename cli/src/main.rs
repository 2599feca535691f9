//! The `pushctl` binary: parse, build the admin client, dispatch, map the result to an exit code.
//!
//! Exit status: 0 ok (also when stdout closes early, as in `| head`), 1 error, 2 bad usage
//! (clap's own), 3 partial answer: some nodes did not reply; the rest is printed with a warning.

mod cli;
mod client;
mod commands;
mod table;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::client::Client;
use crate::commands::Outcome;

/// Exit status when some nodes did not answer in time.
const EXIT_PARTIAL: u8 = 3;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match Client::new(cli.server, cli.admin_key, cli.timeout) {
        Ok(client) => {
            let waited_ms = client.survey_timeout_ms();
            let result = commands::run(&client, cli.command, cli.json).await;
            if let Ok(Outcome::Partial(coverage)) = &result {
                eprintln!("{}", commands::partial_warning(coverage, waited_ms));
            }
            result
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = &result
        && !is_broken_pipe(e)
    {
        eprintln!("pushctl: {e:#}");
    }
    ExitCode::from(exit_code(&result))
}

/// 0 complete (or stdout closed), 3 partial, 1 any error.
fn exit_code(result: &anyhow::Result<Outcome>) -> u8 {
    match result {
        Ok(Outcome::Complete) => 0,
        Ok(Outcome::Partial(_)) => EXIT_PARTIAL,
        Err(e) if is_broken_pipe(e) => 0,
        Err(_) => 1,
    }
}

/// Whether the reader of stdout went away (`pushctl rooms | head -1`): not our failure.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushd_wire::Coverage;

    #[test]
    fn results_map_to_exit_codes() {
        assert_eq!(exit_code(&Ok(Outcome::Complete)), 0);
        assert_eq!(exit_code(&Ok(Outcome::Partial(Coverage::missing(vec!["n2".into()])))), 3);
        assert_eq!(exit_code(&Err(client::ClientError::Unauthorized { message: "wrong admin key".into() }.into())), 1);
        assert_eq!(exit_code(&Err(anyhow::anyhow!("bad JSON"))), 1);
        let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert_eq!(exit_code(&Err(anyhow::Error::from(pipe).context("writing the table"))), 0);
        let other = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(exit_code(&Err(other.into())), 1);
    }
}
