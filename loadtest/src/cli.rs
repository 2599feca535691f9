//! The command line: one clap-derive tree whose doc comments are the help, with every flag also
//! a `PUSHLOAD_*` env var, validated once into a `Fanout` or `PublishRun` plan by `try_from`.
//! Nothing else in pushload reads the command line or the environment.
//!
//! Both workloads share a `Load`: the nodes (one or more `--url`s), the channels (`--channels`)
//! and the publishers. Subscriber `n` and publish `n` go to the same slot (`Load::slot`): node
//! `n % nodes`, channel `(n / nodes) % channels`, so with enough of them every channel is
//! subscribed to and published to through every node.

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
    /// Many subscribers on one node or spread over a cluster, on one or more channels: connect
    /// them all, publish over /api/publish and check that every subscriber gets every message of
    /// its channel once and in order.
    Fanout(FanoutArgs),
    /// No subscribers: concurrent publishers POST to /api/publish as fast as they can (or at
    /// --rate); reports publishes/s and publish latency, and checks the offsets returned.
    Publish(PublishArgs),
    /// A network fuzzer: random and mutated WebSocket frames (broken ones included) over many
    /// connections, then a check that the node still serves and, with --metrics-url, that
    /// nothing panicked. Give the node a high --rate-limit, or most connections end at 4008.
    Fuzz(FuzzArgs),
    /// The write floor of this machine: one thread writes a small frame to each of many
    /// loopback sockets per round, at a fixed rate, and reports its own user and system time
    /// per write: the least CPU a broker that writes each delivery on its own can spend. Run it
    /// next to a fanout run to compare the broker's CPU per delivery with it.
    Floor(FloorArgs),
    /// Replay cost: publish --messages to a fresh channel, then time --rounds new subscribers
    /// that each resubscribe from before the first of them, from `subscribe` to the last one.
    Replay(ReplayArgs),
}

/// Flags of `pushload replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Base URL of the node (plain http://).
    #[arg(long, env = "PUSHLOAD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Channel name prefix (the process id is appended, so each run starts a fresh channel).
    #[arg(long, env = "PUSHLOAD_CHANNEL", default_value = "replay")]
    pub channel: String,

    /// Messages each subscriber missed (the node's --history-size must hold them).
    #[arg(long, env = "PUSHLOAD_MESSAGES", default_value_t = 1000)]
    pub messages: u64,

    /// Size of each message's `data` JSON in bytes, roughly.
    #[arg(long, env = "PUSHLOAD_PAYLOAD_BYTES", default_value_t = 100)]
    pub payload_bytes: usize,

    /// Replays to time, each on a new connection.
    #[arg(long, env = "PUSHLOAD_ROUNDS", default_value_t = 20)]
    pub rounds: usize,

    /// Server API key, sent as `Authorization: Bearer <key>` (not needed in dev mode).
    #[arg(long, env = "PUSHLOAD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Flags of `pushload floor`.
#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Loopback connections to write to (each costs two open files).
    #[arg(long, env = "PUSHLOAD_SOCKETS", default_value_t = 2000)]
    pub sockets: usize,

    /// Rounds per second; each round writes one frame to every socket.
    #[arg(long, env = "PUSHLOAD_RATE", default_value_t = 30)]
    pub rate: u64,

    /// How long to write.
    #[arg(long, env = "PUSHLOAD_SECONDS", default_value_t = 10)]
    pub seconds: u64,

    /// Bytes per frame: a 100-byte payload's message frame is about 110.
    #[arg(long, env = "PUSHLOAD_FRAME_BYTES", default_value_t = 110)]
    pub frame_bytes: usize,

    /// Frames per write, each in a buffer of its own (as a broker's shared frames are), sent as
    /// one `writev` of that many slices: what a write of a batch costs the kernel.
    #[arg(long, env = "PUSHLOAD_FRAMES", default_value_t = 1)]
    pub frames: usize,

    /// With `--frames`, copy each write's frames into one buffer first and send one slice.
    #[arg(long, env = "PUSHLOAD_GATHERED")]
    pub gathered: bool,
}

/// Flags of `pushload fuzz`.
#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// Base URL of the node (plain http://).
    #[arg(long, env = "PUSHLOAD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Frames to send in all.
    #[arg(long, env = "PUSHLOAD_FRAMES", default_value_t = 1_000_000)]
    pub frames: u64,

    /// Connections sending at the same time.
    #[arg(long, env = "PUSHLOAD_CONNECTIONS", default_value_t = 32)]
    pub connections: usize,

    /// The generator's seed: the same seed sends the same frames. Default: the clock.
    #[arg(long, env = "PUSHLOAD_SEED")]
    pub seed: Option<u64>,

    /// Client JWT to connect with. Unset = dev mode (`?user=`).
    #[arg(long, env = "PUSHLOAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Server API key for the check's publish (not needed in dev mode).
    #[arg(long, env = "PUSHLOAD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// The node's /metrics (on its --admin-listen, if set), to check no task panicked.
    #[arg(long, env = "PUSHLOAD_METRICS_URL")]
    pub metrics_url: Option<String>,
}

/// The nodes under test and the processes to watch; shared by every subcommand.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Base URL of the node under test (plain http://; /ws and /api/publish are derived from it),
    /// or a comma-separated list of a cluster's nodes: subscribers and publishes are spread over
    /// them round-robin.
    #[arg(
        long = "url",
        env = "PUSHLOAD_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080",
        value_name = "URL[,URL..]"
    )]
    pub urls: Vec<String>,

    /// Pid of the pushd under test (comma-separated for a cluster), to read its memory (VmRSS)
    /// and CPU time from /proc: memory per idle connection, the peak, CPU while publishing; summed
    /// over every pid and shown per pid. Given in --url order (as many pids as URLs), memory per
    /// connection is also shown per node. Only when pushd runs on this machine.
    #[arg(long = "pid", env = "PUSHLOAD_PID", value_delimiter = ',', value_name = "PID[,PID..]")]
    pub pids: Vec<u32>,

    /// Pids of other processes of the system under test, such as redis-server: their CPU and
    /// memory are reported on their own lines, and not counted as other work on the machine.
    #[arg(long = "redis-pid", env = "PUSHLOAD_REDIS_PID", value_delimiter = ',', value_name = "PID[,PID..]")]
    pub redis_pids: Vec<u32>,

    /// Server API key, sent as `Authorization: Bearer <key>` (not needed in dev mode).
    #[arg(long, env = "PUSHLOAD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// What is published; shared by every subcommand.
#[derive(Debug, Args)]
pub struct ChannelArgs {
    /// Channel to publish to and subscribe to (with --channels K > 1, the prefix of the K
    /// channels `<channel>-0` .. `<channel>-<K-1>`); use one nobody else publishes to.
    #[arg(long, env = "PUSHLOAD_CHANNEL", default_value = "bench")]
    pub channel: String,

    /// Channels to spread subscribers and publishes over, round-robin. Offsets are checked per
    /// channel.
    #[arg(long, env = "PUSHLOAD_CHANNELS", default_value_t = 1)]
    pub channels: usize,

    /// Size of each message's `data` JSON in bytes (padded; at least what seq and ts need).
    #[arg(long, env = "PUSHLOAD_PAYLOAD_BYTES", default_value_t = 64)]
    pub payload_bytes: usize,

    /// Publishes per second in total; 0 = as fast as the publishers can go.
    #[arg(long, env = "PUSHLOAD_RATE", default_value_t = 0)]
    pub rate: u64,

    /// Seconds each phase (connecting; publishing until every delivery) may take before the run
    /// stops and reports what is missing.
    #[arg(long, env = "PUSHLOAD_TIMEOUT", default_value_t = 120)]
    pub timeout: u64,
}

/// Flags of `pushload fanout`.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub load: ChannelArgs,

    /// WebSocket subscribers to open, one task each.
    #[arg(long, env = "PUSHLOAD_SUBSCRIBERS", default_value_t = 10_000)]
    pub subscribers: usize,

    /// Messages to publish (in total, over every channel).
    #[arg(long, env = "PUSHLOAD_MESSAGES", default_value_t = 2000)]
    pub messages: u64,

    /// Concurrent HTTP publishers.
    #[arg(long, env = "PUSHLOAD_PUBLISHERS", default_value_t = 4)]
    pub publishers: usize,

    /// Client JWT every subscriber connects with (`/ws?token=`). Unset = dev mode, where each
    /// subscriber connects as `?user=load-<n>`. All subscribers are then one user: the nodes'
    /// --max-connections-per-user (default 100) must allow as many as each node gets.
    #[arg(long, env = "PUSHLOAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Connections being opened (connect, welcome, subscribe) at the same time. Above the node's
    /// listen backlog the kernel drops SYNs, and those connects wait ~1 s for a retry.
    #[arg(long, env = "PUSHLOAD_CONNECT_CONCURRENCY", default_value_t = 200)]
    pub connect_concurrency: usize,

    /// Treat a closed subscriber as lost instead of reconnecting it with `since` and replaying
    /// what it missed (the server asks slow consumers and draining clients to reconnect).
    #[arg(long, env = "PUSHLOAD_NO_RECONNECT")]
    pub no_reconnect: bool,

    /// A reconnect storm: once this many messages are published, every subscriber drops its
    /// socket at once (no close handshake, as when a network or a balancer drops them all) and
    /// reconnects with its position while publishing goes on. The report says how long until all
    /// were back, at what connect rate, and what the nodes' memory did.
    #[arg(long, env = "PUSHLOAD_STORM_AFTER", value_name = "MESSAGES")]
    pub storm_after: Option<u64>,
}

/// Flags of `pushload publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub load: ChannelArgs,

    /// Messages to publish (in total, over every channel).
    #[arg(long, env = "PUSHLOAD_MESSAGES", default_value_t = 20_000)]
    pub messages: u64,

    /// Concurrent HTTP publishers, each with one request in flight.
    #[arg(long, env = "PUSHLOAD_PUBLISHERS", default_value_t = 16)]
    pub publishers: usize,
}

/// One node: where its endpoints are.
#[derive(Debug, Clone)]
pub struct Node {
    /// `http://host:port`, for reports.
    pub origin: String,
    /// `http://host:port/api/publish`.
    pub publish_url: Url,
    /// `ws://host:port/ws` without a query; each subscriber adds its own.
    pub ws_url: Url,
    /// `host:port` to open TCP connections to.
    pub authority: String,
}

/// What the publishers do, and where: the part of a plan both workloads share.
#[derive(Debug, Clone)]
pub struct Load {
    pub nodes: Vec<Node>,
    /// Channel names, `Load::slot` indexes them.
    pub channels: Vec<String>,
    pub messages: u64,
    pub payload_bytes: usize,
    pub publishers: usize,
    /// Publishes per second in total; `None` = unpaced.
    pub rate: Option<u64>,
    pub api_key: Option<String>,
    pub timeout: Duration,
}

impl Load {
    /// The node and channel (indexes) of subscriber `n`, or of the publish with sequence `n`:
    /// round-robin over nodes, then over channels, so every channel spans every node.
    pub fn slot(&self, n: u64) -> (usize, usize) {
        let nodes = self.nodes.len() as u64;
        ((n % nodes) as usize, ((n / nodes) % self.channels.len() as u64) as usize)
    }
}

/// The processes whose memory and CPU a run reads.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    /// pushd pids, in `--url` order when there are as many as nodes.
    pub pids: Vec<u32>,
    pub redis_pids: Vec<u32>,
}

/// A checked fanout plan: what `workload::fanout` runs.
#[derive(Debug, Clone)]
pub struct Fanout {
    pub load: Load,
    pub watch: Watch,
    pub subscribers: usize,
    pub token: Option<String>,
    pub connect_concurrency: usize,
    pub reconnect: bool,
    /// Messages published before every subscriber drops and reconnects at once.
    pub storm_after: Option<u64>,
}

/// A checked publish-only plan: what `workload::publish` runs.
#[derive(Debug, Clone)]
pub struct PublishRun {
    pub load: Load,
    pub watch: Watch,
}

impl TryFrom<FanoutArgs> for Fanout {
    type Error = anyhow::Error;

    fn try_from(a: FanoutArgs) -> anyhow::Result<Self> {
        positive(&[("--subscribers", a.subscribers as u64), ("--connect-concurrency", a.connect_concurrency as u64)])?;
        let (load, watch) = plan(a.target, a.load, a.messages, a.publishers)?;
        Ok(Fanout {
            load,
            watch,
            subscribers: a.subscribers,
            token: a.token.filter(|t| !t.is_empty()),
            connect_concurrency: a.connect_concurrency,
            reconnect: !a.no_reconnect,
            storm_after: a.storm_after.filter(|n| *n < a.messages),
        })
    }
}

impl TryFrom<PublishArgs> for PublishRun {
    type Error = anyhow::Error;

    fn try_from(a: PublishArgs) -> anyhow::Result<Self> {
        let (load, watch) = plan(a.target, a.load, a.messages, a.publishers)?;
        Ok(PublishRun { load, watch })
    }
}

/// Checks the flags both subcommands share.
fn plan(t: TargetArgs, c: ChannelArgs, messages: u64, publishers: usize) -> anyhow::Result<(Load, Watch)> {
    positive(&[
        ("--messages", messages),
        ("--publishers", publishers as u64),
        ("--channels", c.channels as u64),
        ("--timeout", c.timeout),
    ])?;
    if t.urls.is_empty() {
        bail!("--url must name at least one node");
    }
    let nodes = t.urls.iter().map(|u| node(u.trim())).collect::<anyhow::Result<Vec<_>>>()?;
    if c.channel.is_empty() {
        bail!("--channel must not be empty");
    }
    let channels =
        if c.channels == 1 { vec![c.channel] } else { (0..c.channels).map(|i| format!("{}-{i}", c.channel)).collect() };
    for pid in t.pids.iter().chain(&t.redis_pids) {
        if !std::path::Path::new(&format!("/proc/{pid}/status")).exists() {
            bail!("pid {pid}: no such process on this machine (pass the pids of the processes under test)");
        }
    }
    let load = Load {
        nodes,
        channels,
        messages,
        payload_bytes: c.payload_bytes,
        publishers,
        rate: (c.rate > 0).then_some(c.rate),
        api_key: t.api_key.filter(|k| !k.is_empty()),
        timeout: Duration::from_secs(c.timeout),
    };
    Ok((load, Watch { pids: t.pids, redis_pids: t.redis_pids }))
}

fn positive(flags: &[(&str, u64)]) -> anyhow::Result<()> {
    match flags.iter().find(|(_, v)| *v == 0) {
        Some((flag, _)) => bail!("{flag} must be greater than 0"),
        None => Ok(()),
    }
}

/// One `--url`, checked, with its endpoints derived.
pub fn node(url: &str) -> anyhow::Result<Node> {
    let base = Url::parse(url).with_context(|| format!("--url {url:?} is not a URL"))?;
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
    Ok(Node { origin: base.origin().ascii_serialization(), publish_url, ws_url, authority })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Fanout> {
        let mut all = vec!["pushload", "fanout"];
        all.extend_from_slice(args);
        let Command::Fanout(a) = Cli::try_parse_from(all)?.command else { panic!("not fanout") };
        Fanout::try_from(a)
    }

    fn parse_publish(args: &[&str]) -> anyhow::Result<PublishRun> {
        let mut all = vec!["pushload", "publish"];
        all.extend_from_slice(args);
        let Command::Publish(a) = Cli::try_parse_from(all)?.command else { panic!("not publish") };
        PublishRun::try_from(a)
    }

    #[test]
    fn defaults_target_a_local_dev_node() {
        let f = parse(&[]).unwrap();
        let l = &f.load;
        assert_eq!(l.nodes.len(), 1);
        assert_eq!(l.nodes[0].publish_url.as_str(), "http://127.0.0.1:8080/api/publish");
        assert_eq!(l.nodes[0].ws_url.as_str(), "ws://127.0.0.1:8080/ws");
        assert_eq!(l.channels, ["bench"]);
        assert_eq!((f.subscribers, l.messages, l.publishers, l.rate), (10_000, 2000, 4, None));
        assert!(f.reconnect);
        assert!(f.watch.pids.is_empty());
    }

    #[test]
    fn urls_are_derived_from_the_base() {
        let f = parse(&["--url", "http://localhost:9000/ignored", "--rate", "500"]).unwrap();
        assert_eq!(f.load.nodes[0].publish_url.as_str(), "http://localhost:9000/api/publish");
        assert_eq!(f.load.nodes[0].authority, "localhost:9000");
        assert_eq!(f.load.nodes[0].origin, "http://localhost:9000");
        assert_eq!(f.load.rate, Some(500));
    }

    #[test]
    fn a_cluster_is_a_comma_separated_list() {
        let me = std::process::id().to_string();
        let pids = format!("{me},{me}");
        let f = parse(&["--url", "http://127.0.0.1:1,http://127.0.0.1:2, http://127.0.0.1:3", "--pid", &pids]).unwrap();
        let authorities: Vec<_> = f.load.nodes.iter().map(|n| n.authority.as_str()).collect();
        assert_eq!(authorities, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        assert_eq!(f.watch.pids, [std::process::id(); 2]);
    }

    #[test]
    fn channels_are_numbered_from_the_prefix() {
        let f = parse(&["--channels", "3", "--channel", "c"]).unwrap();
        assert_eq!(f.load.channels, ["c-0", "c-1", "c-2"]);
    }

    #[test]
    fn slots_spread_every_channel_over_every_node() {
        let f = parse(&["--url", "http://a:1,http://b:2", "--channels", "2"]).unwrap();
        let slots: Vec<_> = (0..5).map(|n| f.load.slot(n)).collect();
        assert_eq!(slots, [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0)]);
        let single = parse(&["--channels", "3"]).unwrap();
        assert_eq!((0..4).map(|n| single.load.slot(n)).collect::<Vec<_>>(), [(0, 0), (0, 1), (0, 2), (0, 0)]);
    }

    #[test]
    fn publish_has_its_own_defaults() {
        let p = parse_publish(&["--url", "http://127.0.0.1:1,http://127.0.0.1:2"]).unwrap();
        assert_eq!((p.load.messages, p.load.publishers, p.load.nodes.len()), (20_000, 16, 2));
    }

    #[test]
    fn bad_flags_are_refused_by_name() {
        let err = parse(&["--subscribers", "0"]).unwrap_err().to_string();
        assert!(err.contains("--subscribers"), "{err}");
        let err = parse(&["--url", "https://example.com"]).unwrap_err().to_string();
        assert!(err.contains("https"), "{err}");
        let err = parse(&["--url", "http://a:1,ftp://b"]).unwrap_err().to_string();
        assert!(err.contains("ftp"), "{err}");
        let err = parse_publish(&["--channels", "0"]).unwrap_err().to_string();
        assert!(err.contains("--channels"), "{err}");
        let err = parse(&["--pid", "4000000000"]).unwrap_err().to_string();
        assert!(err.contains("4000000000"), "{err}");
    }
}
