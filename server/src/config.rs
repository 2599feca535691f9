//! The node's configuration: clap `Args` (every flag is also a `PUSHD_*` env var) validated once
//! into `Config` by `Config::try_from`. Nothing else in the node reads the environment.
//!
//! Tests build a `Config` directly with `Config::dev()` and struct update syntax.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::channel::ChannelPattern;
use crate::client_addr::Cidr;

/// pushd: a real-time push broker node (WebSocket + SSE, gapless replay).
///
/// Without --token-secret the node runs in dev mode: anyone may connect, subscribe and
/// publish, and it refuses to listen on anything but loopback.
#[derive(Debug, Parser)]
#[command(name = "pushd", version, about, long_about = None)]
pub struct Args {
    /// Address to listen on for clients, the server API, /metrics and health checks.
    #[arg(long, env = "PUSHD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address for the operator plane: /admin/* (pushctl), /metrics and health checks. When set,
    /// the --listen address no longer serves /admin/* or /metrics, so a load balancer or port
    /// published to the internet can never expose them. Unset = everything on --listen.
    #[arg(long, env = "PUSHD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// This node's id in logs, welcome frames and metrics. Default: "node-" + random hex.
    #[arg(long, env = "PUSHD_NODE_ID")]
    pub node_id: Option<String>,

    /// Redis to share history and fan-out through. One server: `redis://[user:pass@]host:port[/db]`;
    /// a Redis Cluster: `redis-cluster://host:port?node=host2:port2` (any reachable nodes; the rest
    /// are discovered); a Sentinel-managed primary:
    /// `redis-sentinel://sentinel:26379/0?sentinelServiceName=NAME&node=sentinel2:26379`. Use
    /// `rediss`, `rediss-cluster` or `rediss-sentinel` for TLS. Unset = the in-memory single-node
    /// engine.
    #[arg(long, env = "PUSHD_REDIS_URL")]
    pub redis_url: Option<String>,

    /// PEM file of the CA certificates to trust for a `rediss…` URL (managed Redis with a private
    /// CA). Unset = the system's roots.
    #[arg(long, env = "PUSHD_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,

    /// Prefix of every Redis key and pub/sub channel, so several clusters can share one Redis.
    #[arg(long, env = "PUSHD_REDIS_PREFIX", default_value = "pushd:")]
    pub redis_prefix: String,

    /// Redis command connections per node.
    #[arg(long, env = "PUSHD_REDIS_POOL", default_value_t = 4)]
    pub redis_pool: usize,

    /// Redis pub/sub connections per node. Channels are spread over them by hash, each read by
    /// its own task, so fan-out from Redis uses more than one core and one busy or reconnecting
    /// connection does not hold up the others.
    #[arg(long, env = "PUSHD_REDIS_SUBSCRIBERS", default_value_t = 2)]
    pub redis_subscribers: usize,

    /// Seconds a presence entry outlives its node's last refresh (how fast a dead node's
    /// clients leave presence).
    #[arg(long, env = "PUSHD_PRESENCE_TTL", default_value_t = 30)]
    pub presence_ttl: u64,

    /// Seconds a node stays in the registry (`pushd:{registry}:nodes`) after its last heartbeat; heartbeats
    /// go out every second.
    #[arg(long, env = "PUSHD_NODE_TTL", default_value_t = 5)]
    pub node_ttl: u64,

    /// Seconds an idempotency key remembers its publish.
    #[arg(long, env = "PUSHD_IDEMPOTENCY_TTL", default_value_t = 300)]
    pub idempotency_ttl: u64,

    /// Durable publishes: a publish is acknowledged only once this many Redis replicas confirmed
    /// it (`WAIT`), so a failover to a replica cannot lose it. 0 = acknowledged when the primary
    /// stored it (asynchronous replication: a primary that dies may take its last writes along).
    #[arg(long, env = "PUSHD_PUBLISH_REPLICAS", default_value_t = 0)]
    pub publish_replicas: u32,

    /// Milliseconds a durable publish waits for its replicas; short of them it answers 504
    /// `outcome_unknown` (stored on the primary, not confirmed durable: retry with the same
    /// idempotency key).
    #[arg(long, env = "PUSHD_PUBLISH_REPLICAS_TIMEOUT", default_value_t = 1000)]
    pub publish_replicas_timeout: u64,

    /// HS256 secret that client tokens (JWT) are signed with. Unset = dev mode (loopback only).
    #[arg(long, env = "PUSHD_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,

    /// Key backends send as `Authorization: Bearer <key>` on /api/*. Required outside dev mode.
    #[arg(long, env = "PUSHD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Key operators (pushctl) send as `Authorization: Bearer <key>` on /admin/*. Unset = the
    /// admin API is open in dev mode and disabled otherwise.
    #[arg(long, env = "PUSHD_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// Browser origins allowed on /ws, /sse and /api/* (comma-separated, or `*`).
    /// Default: same host only; `*` in dev mode. Requests without an Origin are not affected.
    #[arg(long, env = "PUSHD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Messages kept per channel for replay.
    #[arg(long, env = "PUSHD_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,

    /// How long a channel's history is kept after its last publish, in seconds.
    #[arg(long, env = "PUSHD_HISTORY_TTL", default_value_t = 600)]
    pub history_ttl: u64,

    /// How long a channel's epoch and last offset are kept after it was last used, in seconds.
    /// Clients returning later get `recovered: false` because of the new epoch.
    #[arg(long, env = "PUSHD_HISTORY_META_TTL", default_value_t = 3600)]
    pub history_meta_ttl: u64,

    /// Memory engine: most channels it remembers (epoch, position, history) beside those with
    /// subscribers; past it the longest-unused are forgotten, and clients returning to them get
    /// `recovered: false`.
    #[arg(long, env = "PUSHD_MAX_IDLE_CHANNELS", default_value_t = 100_000)]
    pub max_idle_channels: usize,

    /// Memory engine: most bytes of history it holds over all channels; past it the oldest
    /// messages of the least recently published channels go first.
    #[arg(long, env = "PUSHD_MAX_HISTORY_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_history_bytes: usize,

    /// Most messages one resubscribe may replay; a longer gap answers `recovered: false`.
    #[arg(long, env = "PUSHD_MAX_REPLAY", default_value_t = 1000)]
    pub max_replay: usize,

    /// Most bytes of messages one resubscribe (WebSocket) or one SSE request (all its channels)
    /// may replay; a channel whose replay does not fit answers `recovered: false`.
    #[arg(long, env = "PUSHD_MAX_REPLAY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_replay_bytes: usize,

    /// Largest inbound WebSocket frame, in bytes; bigger frames close the socket with 1009.
    #[arg(long, env = "PUSHD_MAX_FRAME", default_value_t = 72 * 1024)]
    pub max_frame: usize,

    /// Largest `data` of one publish, in bytes (WebSocket and /api/publish).
    #[arg(long, env = "PUSHD_MAX_PAYLOAD", default_value_t = 64 * 1024)]
    pub max_payload: usize,

    /// Most channels one connection may subscribe to.
    #[arg(long, env = "PUSHD_MAX_CHANNELS", default_value_t = 128)]
    pub max_channels: usize,

    /// Most client connections (WebSocket + SSE) this node accepts; more get 503.
    #[arg(long, env = "PUSHD_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Most client connections one user may hold on this node (0 = no limit).
    #[arg(long, env = "PUSHD_MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: usize,

    /// Most client connections one client address may hold on this node (0 = no limit). Behind
    /// a load balancer every client has its address, so set --trusted-proxies too.
    #[arg(long, env = "PUSHD_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Proxies (addresses or blocks, comma-separated: 10.0.0.0/8,192.0.2.7) whose
    /// X-Forwarded-For names the client. Default: none, the TCP peer is the client.
    #[arg(long, env = "PUSHD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Most open TCP connections on --listen, whatever they are doing (authenticated or not,
    /// upgraded or not); more get a 503 and are closed at once. Default: the process's
    /// open-file limit (`ulimit -n`) minus 100 kept for Redis and the operator listener.
    #[arg(long, env = "PUSHD_MAX_TCP_CONNECTIONS")]
    pub max_tcp_connections: Option<usize>,

    /// Seconds a client has to send a whole request (headers, then body), and the longest an
    /// idle keep-alive connection waits for its next request.
    #[arg(long, env = "PUSHD_REQUEST_TIMEOUT", default_value_t = 10)]
    pub request_timeout: u64,

    /// Server API requests per second this node takes from backends (the API key); more get
    /// 429 with Retry-After. 0 = no limit.
    #[arg(long, env = "PUSHD_API_RATE_LIMIT", default_value_t = 0)]
    pub api_rate_limit: u32,

    /// Server API requests a backend may burst above --api-rate-limit.
    #[arg(long, env = "PUSHD_API_RATE_BURST", default_value_t = 1000)]
    pub api_rate_burst: u32,

    /// Sustained inbound commands per second per connection.
    #[arg(long, env = "PUSHD_RATE_LIMIT", default_value_t = 50)]
    pub rate_limit: u32,

    /// Inbound commands a connection may burst above the rate before it is closed with 4008.
    #[arg(long, env = "PUSHD_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,

    /// Messages queued for one connection before it counts as a slow consumer (closed with 4010).
    #[arg(long, env = "PUSHD_SEND_QUEUE", default_value_t = 1024)]
    pub send_queue: usize,

    /// Under load, how long the writer rests after each round of socket writes, as a multiple of
    /// the round's duration (at most 20 ms): frames arriving meanwhile go out in the same write,
    /// so a busy node makes fewer, larger writes. 0 writes every frame at once.
    #[arg(long, env = "PUSHD_FLUSH_REST", default_value_t = 1.0)]
    pub flush_rest: f64,

    /// Seconds between server heartbeats (WebSocket ping, SSE comment).
    #[arg(long, env = "PUSHD_PING_INTERVAL", default_value_t = 25)]
    pub ping_interval: u64,

    /// Seconds without any inbound frame after which a WebSocket peer counts as dead.
    #[arg(long, env = "PUSHD_IDLE_TIMEOUT", default_value_t = 60)]
    pub idle_timeout: u64,

    /// Channel patterns (comma-separated globs) whose subscribers are tracked for presence.
    #[arg(long, env = "PUSHD_PRESENCE", value_delimiter = ',', default_value = "*")]
    pub presence: Vec<String>,

    /// Channel patterns whose subscribers see join/leave events (a subset of --presence).
    #[arg(long, env = "PUSHD_JOIN_LEAVE", value_delimiter = ',')]
    pub join_leave: Vec<String>,

    /// Seconds over which clients are closed with 1012 on SIGTERM, so they reconnect gradually.
    #[arg(long, env = "PUSHD_DRAIN_WINDOW", default_value_t = 10)]
    pub drain_window: u64,

    /// Seconds between SIGTERM and the first close: /readyz answers 503 and new clients are still
    /// served, so a load balancer stops sending clients here before the node starts closing its
    /// own (set it to the balancer's time to mark a node down, e.g. check interval x fall + 1).
    #[arg(long, env = "PUSHD_DRAIN_GRACE", default_value_t = 0)]
    pub drain_grace: u64,

    /// Log format.
    #[arg(long, env = "PUSHD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info,pushd=debug`).
    #[arg(long, env = "PUSHD_LOG", default_value = "info")]
    pub log: String,

    #[command(subcommand)]
    pub tool: Option<Tool>,
}

/// Helpers that run instead of the node.
#[derive(Debug, Clone, Subcommand)]
pub enum Tool {
    /// Asks the node that the same flags or PUSHD_* variables describe for a health path on
    /// loopback (its --admin-listen if set, else --listen) and exits 0 on a 200: a container
    /// health check that needs no shell or curl in the image.
    Probe {
        /// /healthz (the process serves) or /readyz (it takes traffic).
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Which browser origins may talk to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// Any origin (`*`); the dev-mode default.
    Any,
    /// Only pages served from the same host as the node; the default with a token secret.
    SameHost,
    /// These exact origins, e.g. `https://app.example.com`.
    List(Vec<String>),
}

/// Validated node configuration; built from `Args` or directly by tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address (the caller binds it; kept for logs and the loopback check).
    pub listen: SocketAddr,
    /// Operator-plane address (/admin/*, /metrics); `None` = served on `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// Node id. Default: random.
    pub node_id: String,
    /// Redis URL; `None` = memory engine.
    pub redis_url: Option<String>,
    /// CA file for a TLS Redis URL; `None` = the system's roots.
    pub redis_tls_ca: Option<PathBuf>,
    /// Redis key prefix. Default `pushd:`.
    pub redis_prefix: String,
    /// Redis command connections. Default 4.
    pub redis_pool: usize,
    /// Redis pub/sub connections. Default 2.
    pub redis_subscribers: usize,
    /// Presence entry lifetime without refresh. Default 30 s.
    pub presence_ttl: Duration,
    /// Registry lifetime without a heartbeat. Default 5 s.
    pub node_ttl: Duration,
    /// Idempotency key lifetime. Default 300 s.
    pub idempotency_ttl: Duration,
    /// Replicas a publish waits for (`WAIT`). Default 0.
    pub publish_replicas: u32,
    /// How long a publish waits for them. Default 1 s.
    pub publish_replicas_timeout: Duration,
    /// JWT secret; `None` = dev mode.
    pub token_secret: Option<String>,
    /// Server API key; `None` only in dev mode (API open to loopback callers).
    pub api_key: Option<String>,
    /// Admin API key; `None` = open in dev mode, disabled otherwise.
    pub admin_key: Option<String>,
    /// Allowed browser origins. Default: same host (`*` in dev mode).
    pub allowed_origins: Origins,
    /// Messages of history per channel. Default 1000.
    pub history_size: usize,
    /// History lifetime after the last publish. Default 600 s.
    pub history_ttl: Duration,
    /// Epoch and top lifetime after the last use. Default 3600 s.
    pub history_meta_ttl: Duration,
    /// Memory engine: channels remembered. Default 100,000.
    pub max_idle_channels: usize,
    /// Memory engine: bytes of history held. Default 512 MiB.
    pub max_history_bytes: usize,
    /// Longest replay on resubscribe. Default 1000.
    pub max_replay: usize,
    /// Replayed bytes per resubscribe or SSE request. Default 8 MiB.
    pub max_replay_bytes: usize,
    /// Largest inbound frame in bytes. Default 72 KiB.
    pub max_frame: usize,
    /// Largest publish payload in bytes. Default 64 KiB.
    pub max_payload: usize,
    /// Channels per connection. Default 128.
    pub max_channels: usize,
    /// Connections per node. Default 100,000.
    pub max_connections: usize,
    /// Client connections per user. Default 100; 0 = no limit.
    pub max_connections_per_user: usize,
    /// Client connections per client address. Default 0 = no limit.
    pub max_connections_per_ip: usize,
    /// Peers whose X-Forwarded-For is believed. Default none.
    pub trusted_proxies: Vec<Cidr>,
    /// Open TCP connections on the public listener. Default: open-file limit minus 100.
    pub max_tcp_connections: usize,
    /// Time to send a request, and the keep-alive idle limit. Default 10 s.
    pub request_timeout: Duration,
    /// Server API requests per second; 0 = no limit. Default 0.
    pub api_rate_limit: u32,
    /// Server API burst. Default 1000.
    pub api_rate_burst: u32,
    /// Commands per second per connection. Default 50.
    pub rate_limit: u32,
    /// Command burst per connection. Default 100.
    pub rate_burst: u32,
    /// Send queue length per connection. Default 1024.
    pub send_queue: usize,
    /// Writer rest after a round of writes, as a multiple of the round. Default 1.
    pub flush_rest: f64,
    /// Heartbeat interval. Default 25 s.
    pub ping_interval: Duration,
    /// Dead-peer timeout. Default 60 s.
    pub idle_timeout: Duration,
    /// Channels with presence. Default all.
    pub presence: Vec<ChannelPattern>,
    /// Channels with join/leave events. Default none.
    pub join_leave: Vec<ChannelPattern>,
    /// Drain window on shutdown. Default 10 s.
    pub drain_window: Duration,
    /// Readiness-off time before the drain closes anyone. Default 0.
    pub drain_grace: Duration,
}

impl Config {
    /// A dev-mode config with every default; what `pushd` with no flags runs.
    pub fn dev() -> Self {
        let args = Args::parse_from(["pushd"]);
        Self::try_from(Args { node_id: Some("dev".into()), ..args }).expect("defaults are valid")
    }

    /// True without a token secret: anonymous clients, loopback only.
    pub fn dev_mode(&self) -> bool {
        self.token_secret.is_none()
    }

    /// Whether `channel` tracks presence (and so answers the presence op).
    pub fn presence_on(&self, channel: &str) -> bool {
        self.presence.iter().any(|p| p.matches(channel))
    }

    /// Whether `channel`'s subscribers get join/leave events.
    pub fn join_leave_on(&self, channel: &str) -> bool {
        self.presence_on(channel) && self.join_leave.iter().any(|p| p.matches(channel))
    }
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Self> {
        let dev = a.token_secret.is_none();
        if dev && !a.listen.ip().is_loopback() {
            bail!(
                "refusing to listen on {} in dev mode: set --token-secret (PUSHD_TOKEN_SECRET) \
                 and --api-key (PUSHD_API_KEY), or listen on 127.0.0.1",
                a.listen
            );
        }
        if let Some(admin) = a.admin_listen
            && dev
            && !admin.ip().is_loopback()
        {
            bail!("refusing --admin-listen {admin} in dev mode: set --token-secret and --admin-key, or use 127.0.0.1");
        }
        if a.admin_listen.is_some_and(|admin| admin == a.listen && admin.port() != 0) {
            bail!("--admin-listen must differ from --listen");
        }
        if let Some(secret) = &a.token_secret
            && secret.len() < 16
        {
            bail!("--token-secret is too short: use at least 16 random bytes (32+ recommended)");
        }
        if !dev && a.api_key.as_deref().is_none_or(str::is_empty) {
            bail!("--api-key (PUSHD_API_KEY) is required when --token-secret is set");
        }
        let positive = [
            ("--history-size", a.history_size),
            ("--max-replay", a.max_replay),
            ("--max-idle-channels", a.max_idle_channels),
            ("--max-history-bytes", a.max_history_bytes),
            ("--max-replay-bytes", a.max_replay_bytes),
            ("--max-frame", a.max_frame),
            ("--max-payload", a.max_payload),
            ("--max-channels", a.max_channels),
            ("--max-connections", a.max_connections),
            ("--send-queue", a.send_queue),
            ("--rate-limit", a.rate_limit as usize),
            ("--rate-burst", a.rate_burst as usize),
            ("--ping-interval", a.ping_interval as usize),
            ("--request-timeout", a.request_timeout as usize),
            ("--max-tcp-connections", a.max_tcp_connections.unwrap_or(1)),
            ("--history-ttl", a.history_ttl as usize),
            ("--redis-pool", a.redis_pool),
            ("--redis-subscribers", a.redis_subscribers),
            ("--presence-ttl", a.presence_ttl as usize),
            ("--idempotency-ttl", a.idempotency_ttl as usize),
            ("--publish-replicas-timeout", a.publish_replicas_timeout as usize),
            ("--node-ttl", a.node_ttl as usize),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            bail!("{flag} must be greater than 0");
        }
        if a.history_meta_ttl < a.history_ttl {
            bail!("--history-meta-ttl must be at least --history-ttl");
        }
        if a.publish_replicas > 0 && a.redis_url.as_deref().is_none_or(str::is_empty) {
            bail!("--publish-replicas waits for Redis replicas: it needs --redis-url");
        }
        if a.redis_prefix.contains(['{', '}', ' ']) {
            bail!("--redis-prefix must not contain braces or spaces");
        }
        if !(0.0..=10.0).contains(&a.flush_rest) {
            bail!("--flush-rest must be between 0 and 10 (a multiple of the write round's duration)");
        }
        if a.idle_timeout <= a.ping_interval {
            bail!("--idle-timeout must be longer than --ping-interval");
        }
        let patterns = |list: &[String], flag: &str| -> anyhow::Result<Vec<ChannelPattern>> {
            list.iter()
                .filter(|s| !s.is_empty())
                .map(|s| ChannelPattern::parse(s).with_context(|| format!("{flag}: bad pattern {s:?}")))
                .collect()
        };
        let allowed_origins = match a.allowed_origins.as_slice() {
            [] if dev => Origins::Any,
            [] => Origins::SameHost,
            list if list.iter().any(|o| o == "*") => Origins::Any,
            list => Origins::List(list.iter().map(|o| o.trim_end_matches('/').to_owned()).collect()),
        };
        Ok(Config {
            listen: a.listen,
            admin_listen: a.admin_listen,
            node_id: a.node_id.unwrap_or_else(|| format!("node-{:06x}", rand::random::<u32>() >> 8)),
            redis_url: a.redis_url.filter(|u| !u.is_empty()),
            redis_tls_ca: a.redis_tls_ca.filter(|p| !p.as_os_str().is_empty()),
            redis_prefix: a.redis_prefix,
            redis_pool: a.redis_pool,
            redis_subscribers: a.redis_subscribers,
            presence_ttl: Duration::from_secs(a.presence_ttl),
            idempotency_ttl: Duration::from_secs(a.idempotency_ttl),
            publish_replicas: a.publish_replicas,
            publish_replicas_timeout: Duration::from_millis(a.publish_replicas_timeout),
            node_ttl: Duration::from_secs(a.node_ttl),
            token_secret: a.token_secret,
            api_key: a.api_key.filter(|k| !k.is_empty()),
            admin_key: a.admin_key.filter(|k| !k.is_empty()),
            allowed_origins,
            history_size: a.history_size,
            history_ttl: Duration::from_secs(a.history_ttl),
            history_meta_ttl: Duration::from_secs(a.history_meta_ttl),
            max_replay: a.max_replay,
            max_idle_channels: a.max_idle_channels,
            max_history_bytes: a.max_history_bytes,
            max_replay_bytes: a.max_replay_bytes,
            max_frame: a.max_frame,
            max_payload: a.max_payload,
            max_channels: a.max_channels,
            max_connections: a.max_connections,
            max_connections_per_user: a.max_connections_per_user,
            max_connections_per_ip: a.max_connections_per_ip,
            trusted_proxies: a
                .trusted_proxies
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Cidr::parse(s).map_err(|e| anyhow::anyhow!("--trusted-proxies: {e}")))
                .collect::<anyhow::Result<_>>()?,
            max_tcp_connections: a.max_tcp_connections.unwrap_or_else(default_tcp_limit),
            request_timeout: Duration::from_secs(a.request_timeout),
            api_rate_limit: a.api_rate_limit,
            api_rate_burst: a.api_rate_burst.max(1),
            rate_limit: a.rate_limit,
            rate_burst: a.rate_burst,
            send_queue: a.send_queue,
            flush_rest: a.flush_rest,
            ping_interval: Duration::from_secs(a.ping_interval),
            idle_timeout: Duration::from_secs(a.idle_timeout),
            presence: patterns(&a.presence, "--presence")?,
            join_leave: patterns(&a.join_leave, "--join-leave")?,
            drain_window: Duration::from_secs(a.drain_window),
            drain_grace: Duration::from_secs(a.drain_grace),
        })
    }
}

/// Descriptors kept for Redis connections, the operator listener and files when the TCP limit
/// is derived from the open-file limit.
const RESERVED_FDS: usize = 100;

/// The open-file limit minus `RESERVED_FDS`: past it, accepting fails with EMFILE and the node
/// could not even reach Redis. Falls back to 100,000 where the limit cannot be read.
fn default_tcp_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| open_file_limit(&limits))
        .map_or(100_000, |n| n.saturating_sub(RESERVED_FDS).max(1))
}

/// The soft "Max open files" of a `/proc/<pid>/limits` text.
fn open_file_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        let mut all = vec!["pushd"];
        all.extend_from_slice(args);
        Config::try_from(Args::try_parse_from(all)?)
    }

    #[test]
    fn defaults_are_dev_mode_on_loopback() {
        let c = parse(&[]).unwrap();
        assert!(c.dev_mode());
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.allowed_origins, Origins::Any);
        assert!(c.presence_on("room:1"));
        assert!(!c.join_leave_on("room:1"));
    }

    #[test]
    fn dev_mode_refuses_public_bind() {
        let err = parse(&["--listen", "0.0.0.0:8080"]).unwrap_err().to_string();
        assert!(err.contains("dev mode"), "{err}");
    }

    #[test]
    fn flush_rest_is_a_bounded_multiple() {
        assert_eq!(parse(&[]).unwrap().flush_rest, 1.0);
        assert_eq!(parse(&["--flush-rest", "0"]).unwrap().flush_rest, 0.0);
        for bad in ["-1", "11", "NaN"] {
            let err = parse(&[&format!("--flush-rest={bad}")]).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("--flush-rest"), "{bad}: {err}");
        }
    }

    #[test]
    fn secret_requires_api_key() {
        let err = parse(&["--token-secret", "0123456789abcdef0123"]).unwrap_err().to_string();
        assert!(err.contains("--api-key"), "{err}");
        let c = parse(&["--token-secret", "0123456789abcdef0123", "--api-key", "k", "--listen", "0.0.0.0:1"]);
        assert_eq!(c.unwrap().allowed_origins, Origins::SameHost);
    }

    #[test]
    fn the_admin_listener_follows_the_same_rules() {
        let err = parse(&["--admin-listen", "0.0.0.0:9091"]).unwrap_err().to_string();
        assert!(err.contains("dev mode"), "{err}");
        let err = parse(&["--admin-listen", "127.0.0.1:8080"]).unwrap_err().to_string();
        assert!(err.contains("must differ"), "{err}");
        let c = parse(&["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]).unwrap();
        assert_eq!(c.admin_listen.map(|a| a.port()), Some(0));
    }

    #[test]
    fn the_tcp_limit_defaults_to_the_open_file_limit_less_a_reserve() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 4096                 files\n";
        assert_eq!(open_file_limit(limits), Some(1024));
        assert_eq!(open_file_limit("Max open files unlimited unlimited files"), None);
        let c = parse(&[]).unwrap();
        assert!(c.max_tcp_connections > 0 && c.max_tcp_connections < 1 << 40);
        assert_eq!(parse(&["--max-tcp-connections", "7"]).unwrap().max_tcp_connections, 7);
    }

    #[test]
    fn zero_limits_are_refused_by_name() {
        let err = parse(&["--send-queue", "0"]).unwrap_err().to_string();
        assert!(err.contains("--send-queue"), "{err}");
    }
}
