//! The `pushd` binary: parse flags, set up logs, bind, run until SIGTERM/SIGINT, drain, exit.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pushd::config::{LogFormat, Tool};
use pushd::{Args, Config};
use tracing_subscriber::EnvFilter;

/// Exit status for a configuration the node refuses to run with (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Tool::Probe { path }) = &args.tool {
        return probe(args.admin_listen.unwrap_or(args.listen), path);
    }
    init_logs(args.log_format, &args.log);
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("invalid configuration: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match serve(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = listen(config.listen)
        .with_context(|| format!("cannot listen on {}: is another process using it? set --listen", config.listen))?;
    pushd::run(listener, config, shutdown_signal()).await
}

/// Binds with a deep accept backlog: a reconnect storm after a node restart must queue in the
/// kernel, not overflow into one-second SYN retries.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

fn init_logs(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("bad --log filter {filter:?} ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// `pushd probe`: GET `path` from the node listening on `addr` (a wildcard address is asked on
/// loopback); exit 0 on a 200, 1 with the reason on stderr otherwise.
fn probe(addr: std::net::SocketAddr, path: &str) -> ExitCode {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let timeout = std::time::Duration::from_secs(2);
    let status = (|| -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut head = [0u8; 64];
        let n = stream.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..n]).lines().next().unwrap_or("").to_owned())
    })();
    match status {
        Ok(line) if line.split_whitespace().nth(1) == Some("200") => ExitCode::SUCCESS,
        Ok(line) => {
            eprintln!("pushd probe: {path} on {addr} answered {line:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("pushd probe: cannot ask {addr} for {path}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
