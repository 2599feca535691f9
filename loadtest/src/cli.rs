//! The command line: one clap-derive tree whose doc comments are the help, with every flag also
//! a `PUSHLOAD_*` env var, validated once into a `Fanout` plan by `Fanout::try_from`.
//! Nothing else in pushload reads the command line or the environment.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use reqwest::Url;

/// pushload: load generator and correctness checker for pushd.
///
/// Measures throughput, publish-to-delivery latency and memory per connection, and counts lost,
/// duplicated and out-of-order messages. A non-zero count fails the run (exit status 1).
#[derive(Debug, Parser)]
#[command(name = "pushload", version, about, long_about = None)]
pub struct Cli {
    /// Print the report as one JSON object on stdout instead of a table.
    #[arg(long, global = true, env = "PUSHLOAD_JSON")]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// What to measure.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// One node, one channel, many subscribers: connect them all, publish over /api/publish and
    /// check that every subscriber gets every message once and in order.
    Fanout(FanoutArgs),
}

/// Flags of `pushload fanout`.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Base URL of the node under test (plain http://; /ws and /api/publish are derived from it).
    #[arg(long, env = "PUSHLOAD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// WebSocket subscribers to open, one task each.
    #[arg(long, env = "PUSHLOAD_SUBSCRIBERS", default_value_t = 10_000)]
    pub subscribers: usize,

    /// Channel every subscriber joins; use one nobody else publishes to.
    #[arg(long, env = "PUSHLOAD_CHANNEL", default_value = "bench")]
    pub channel: String,

    /// Messages to publish.
    #[arg(long, env = "PUSHLOAD_MESSAGES", default_value_t = 2000)]
    pub messages: u64,

    /// Size of each message's `data` JSON in bytes (padded; at least what seq and ts need).
    #[arg(long, env = "PUSHLOAD_PAYLOAD_BYTES", default_value_t = 64)]
    pub payload_bytes: usize,

    /// Concurrent HTTP publishers.
    #[arg(long, env = "PUSHLOAD_PUBLISHERS", default_value_t = 4)]
    pub publishers: usize,

    /// Publishes per second in total; 0 = as fast as the publishers can go.
    #[arg(long, env = "PUSHLOAD_RATE", default_value_t = 0)]
    pub rate: u64,

    /// Server API key, sent as `Authorization: Bearer <key>` (not needed in dev mode).
    #[arg(long, env = "PUSHLOAD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Client JWT every subscriber connects with (`/ws?token=`). Unset = dev mode, where each
    /// subscriber connects as `?user=load-<n>`.
    #[arg(long, env = "PUSHLOAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Connections being opened (connect, welcome, subscribe) at the same time. Above the node's
    /// listen backlog the kernel drops SYNs, and those connects wait ~1 s for a retry.
    #[arg(long, env = "PUSHLOAD_CONNECT_CONCURRENCY", default_value_t = 200)]
    pub connect_concurrency: usize,

    /// Pid of the pushd under test, to read its memory (VmRSS) and CPU time from /proc: memory
    /// per idle connection, the peak, CPU while publishing. Only when pushd runs on this machine.
    #[arg(long, env = "PUSHLOAD_PID")]
    pub pid: Option<u32>,

    /// Seconds each phase (connecting; publishing until every delivery) may take before the run
    /// stops and reports what is missing.
    #[arg(long, env = "PUSHLOAD_TIMEOUT", default_value_t = 120)]
    pub timeout: u64,

    /// Treat a closed subscriber as lost instead of reconnecting it with `since` and replaying
    /// what it missed (the server asks slow consumers and draining clients to reconnect).
    #[arg(long, env = "PUSHLOAD_NO_RECONNECT")]
    pub no_reconnect: bool,
}

/// A checked fanout plan: what `workload::fanout` runs.
#[derive(Debug, Clone)]
pub struct Fanout {
    /// `http://host:port/api/publish`.
    pub publish_url: Url,
    /// `ws://host:port/ws` without a query; each subscriber adds its own.
    pub ws_url: Url,
    /// `host:port` to open TCP connections to.
    pub authority: String,
    pub subscribers: usize,
    pub channel: String,
    pub messages: u64,
    pub payload_bytes: usize,
    pub publishers: usize,
    /// Publishes per second in total; `None` = unpaced.
    pub rate: Option<u64>,
    pub api_key: Option<String>,
    pub token: Option<String>,
    pub connect_concurrency: usize,
    pub pid: Option<u32>,
    pub timeout: Duration,
    pub reconnect: bool,
}

impl TryFrom<FanoutArgs> for Fanout {
    type Error = anyhow::Error;

    fn try_from(a: FanoutArgs) -> anyhow::Result<Self> {
        let base = Url::parse(&a.url).with_context(|| format!("--url {:?} is not a URL", a.url))?;
        match base.scheme() {
            "http" => {}
            "https" => bail!("--url: https is not supported; run pushload next to the node over plain http"),
            other => bail!("--url: scheme {other:?} is not supported; use http://host:port"),
        }
        let host = base.host_str().context("--url has no host")?.to_owned();
        let port = base.port_or_known_default().unwrap_or(80);
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let publish_url = base.join("/api/publish").context("--url: cannot derive /api/publish")?;
        let ws_url = Url::parse(&format!("ws://{authority}/ws")).context("--url: cannot derive /ws")?;
        let positive = [
            ("--subscribers", a.subscribers as u64),
            ("--messages", a.messages),
            ("--publishers", a.publishers as u64),
            ("--connect-concurrency", a.connect_concurrency as u64),
            ("--timeout", a.timeout),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            bail!("{flag} must be greater than 0");
        }
        if a.channel.is_empty() {
            bail!("--channel must not be empty");
        }
        if let Some(pid) = a.pid
            && !std::path::Path::new(&format!("/proc/{pid}/status")).exists()
        {
            bail!("--pid {pid}: no such process on this machine (pass the pid of the pushd under test)");
        }
        Ok(Fanout {
            publish_url,
            ws_url,
            authority,
            subscribers: a.subscribers,
            channel: a.channel,
            messages: a.messages,
            payload_bytes: a.payload_bytes,
            publishers: a.publishers,
            rate: (a.rate > 0).then_some(a.rate),
            api_key: a.api_key.filter(|k| !k.is_empty()),
            token: a.token.filter(|t| !t.is_empty()),
            connect_concurrency: a.connect_concurrency,
            pid: a.pid,
            timeout: Duration::from_secs(a.timeout),
            reconnect: !a.no_reconnect,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Fanout> {
        let mut all = vec!["pushload", "fanout"];
        all.extend_from_slice(args);
        let Command::Fanout(a) = Cli::try_parse_from(all)?.command;
        Fanout::try_from(a)
    }

    #[test]
    fn defaults_target_a_local_dev_node() {
        let f = parse(&[]).unwrap();
        assert_eq!(f.publish_url.as_str(), "http://127.0.0.1:8080/api/publish");
        assert_eq!(f.ws_url.as_str(), "ws://127.0.0.1:8080/ws");
        assert_eq!((f.subscribers, f.messages, f.publishers, f.rate), (10_000, 2000, 4, None));
        assert!(f.reconnect);
    }

    #[test]
    fn urls_are_derived_from_the_base() {
        let f = parse(&["--url", "http://localhost:9000/ignored", "--rate", "500"]).unwrap();
        assert_eq!(f.publish_url.as_str(), "http://localhost:9000/api/publish");
        assert_eq!(f.authority, "localhost:9000");
        assert_eq!(f.rate, Some(500));
    }

    #[test]
    fn bad_flags_are_refused_by_name() {
        let err = parse(&["--subscribers", "0"]).unwrap_err().to_string();
        assert!(err.contains("--subscribers"), "{err}");
        let err = parse(&["--url", "https://example.com"]).unwrap_err().to_string();
        assert!(err.contains("https"), "{err}");
    }
}
