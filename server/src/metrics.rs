//! Prometheus metrics of one node, served on `/metrics` (docs/HTTP-API.md lists every one).
//!
//! Names follow Prometheus conventions: base units (`_seconds`, `_bytes`), `_total` on counters,
//! and bounded labels only (transport, route, code, op, result, operation, kind): never a
//! channel, user or connection id. Every labelled series is created at start-up at 0, so a
//! dashboard shows 0 on a quiet node rather than "no data".
//!
//! No series carries the node's id as a label. Node identity is a property of the scrape
//! target: Prometheus adds `instance` and whatever target labels its config gives (ours sets
//! `node` per target), and `pushd_node_info` carries the node id and engine for joins. A label
//! baked into every series would clash with those target labels (Prometheus renames it to
//! `exported_node`), and would be repeated on every line of every scrape.
//!
//! This module depends on nothing else in the crate, so every layer may count into it.

use std::time::Duration;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The two client transports, as label values.
pub const TRANSPORTS: [&str; 2] = ["ws", "sse"];
/// Client command ops, plus `invalid` for frames that do not parse into one.
pub const OPS: [&str; 7] = ["subscribe", "unsubscribe", "publish", "presence", "history", "ping", "invalid"];
/// Publish routes: the server API, a client's socket, the admin API.
pub const PUBLISH_ROUTES: [&str; 3] = ["api", "ws", "admin"];
/// Why a publish failed: too large for `--max-payload`, the engine did not store it, or the
/// engine did not answer in time (it may have stored it).
pub const PUBLISH_ERRORS: [&str; 3] = ["payload_too_large", "unavailable", "outcome_unknown"];
/// Why a connection was refused before its session started.
pub const REFUSALS: [&str; 10] = [
    "origin",
    "auth",
    "banned",
    "full",
    "draining",
    "user_limit",
    "ip_limit",
    "bad_request",
    "unavailable",
    "tcp_full",
];
/// Close codes the server sends, and `peer` for a client that closed or vanished.
pub const CLOSE_CODES: [&str; 13] =
    ["1001", "1002", "1003", "1007", "1009", "1012", "4001", "4003", "4008", "4009", "4010", "4011", "peer"];
/// HTTP statuses the server and admin APIs answer with; others appear when first used.
const HTTP_CODES: [&str; 10] = ["200", "400", "401", "403", "404", "405", "413", "429", "503", "504"];
/// `/api/*` routes by name (`unknown` for paths that match none).
pub const API_ROUTES: [&str; 6] = ["publish", "broadcast", "history", "presence", "disconnect", "unknown"];
/// `/admin/*` routes by name.
pub const ADMIN_ROUTES: [&str; 10] =
    ["stats", "nodes", "connections", "channels", "channel", "history", "publish", "kick", "unban", "unknown"];
/// What a Redis round trip was for.
pub const REDIS_OPERATIONS: [&str; 5] = ["publish", "history", "subscribe", "presence", "control"];
/// How a Redis round trip failed: not sent (no connection), timed out, connection lost
/// mid-way, an error reply from the server, or a reply the engine could not read.
pub const REDIS_ERROR_KINDS: [&str; 6] = ["disconnected", "timeout", "connection", "moving", "server", "protocol"];

/// Handles to every metric; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open client connections by transport.
    pub connections: IntGaugeVec,
    /// Client connections whose session started, by transport.
    pub connections_opened: IntCounterVec,
    /// Client connections ended, by transport and close code (`peer`: the client left).
    pub connections_closed: IntCounterVec,
    /// Connections refused before they started, by reason.
    pub refused: IntCounterVec,
    /// Local (session, channel) subscriptions by transport.
    pub subscriptions: IntGaugeVec,
    /// Channels with at least one local subscriber.
    pub channels: IntGauge,
    /// Messages stored by publishes through this node, by route.
    pub published: IntCounterVec,
    /// Publishes refused or failed, by error code.
    pub publish_errors: IntCounterVec,
    /// Message frames written to clients (live and replayed), by transport.
    pub delivered: IntCounterVec,
    /// Every other frame written to clients (welcome, replies, join/leave, reset, close).
    pub control_frames: IntCounterVec,
    /// `reset` frames sent: history was lost under a live subscriber, which must resync.
    pub resets: IntCounterVec,
    /// WebSocket commands by op and result (`ok` or the error code).
    pub commands: IntCounterVec,
    /// Resubscribes with a position, by result (recovered, not_recovered).
    pub replays: IntCounterVec,
    /// Messages replayed per recovered resubscribe.
    pub replayed_messages: Histogram,
    /// Sessions closed because their send queue filled up.
    pub slow_consumers: IntCounter,
    /// Sessions closed by /api/disconnect or an operator.
    pub kicks: IntCounter,
    /// Seconds from storing a message to writing it to a client (first of each write batch).
    pub delivery_latency: Histogram,
    /// Seconds one round of the hub's flusher took to write every socket it had.
    pub flush_round: Histogram,
    /// Sockets the flusher's rounds wrote (one write each, whatever waited for it).
    pub flush_writes: IntCounter,
    /// Server and admin API requests by api, route and status code.
    pub http_requests: IntCounterVec,
    /// Server and admin API request durations by api and route.
    pub http_duration: HistogramVec,
    /// 1 while /readyz answers 200.
    pub ready: IntGauge,
    /// 1 from SIGTERM until exit.
    pub draining: IntGauge,
    /// 1 while the engine can take traffic (always, for the memory engine).
    pub engine_up: IntGauge,
    /// Panics in this process (each one a bug), from `panics.rs`.
    pub panics: IntCounter,
    /// The Redis engine's own metrics; registered only on nodes that use Redis.
    pub redis: RedisMetrics,
    /// The memory engine's own metrics; registered only on nodes that use it.
    pub memory: MemoryMetrics,
}

/// What the memory engine holds against its bounds.
#[derive(Clone)]
pub struct MemoryMetrics {
    /// Channels remembered (epoch, top, history), subscribed or not.
    pub channels: IntGauge,
    /// Bytes of stored history.
    pub history_bytes: IntGauge,
}

/// The Redis engine's round trips and its live fan-out repairs.
#[derive(Clone)]
pub struct RedisMetrics {
    /// Seconds per Redis round trip, by operation.
    pub command_duration: HistogramVec,
    /// Failed Redis round trips, by operation and kind.
    pub errors: IntCounterVec,
    /// Times the pub/sub connection came back after a loss.
    pub pubsub_reconnects: IntCounter,
    /// Times the pub/sub receiver fell behind and dropped messages (each becomes a gap fill).
    pub pubsub_lagged: IntCounter,
    /// Gaps in live delivery repaired from the streams, by result (filled, reset).
    pub gap_fills: IntCounterVec,
    /// Commands a Redis Cluster turned away unrun because their slot was moving, sent again.
    pub slot_retries: IntCounterVec,
}

impl RedisMetrics {
    /// Counts one round trip of `operation` that took `elapsed`.
    pub fn observe(&self, operation: &str, elapsed: Duration) {
        self.command_duration.with_label_values(&[operation]).observe(elapsed.as_secs_f64());
    }

    /// Counts one command sent again because its slot was moving.
    pub fn slot_moving(&self, operation: &str) {
        self.slot_retries.with_label_values(&[operation]).inc();
    }

    /// Counts one failed round trip.
    pub fn error(&self, operation: &str, kind: &str) {
        self.errors.with_label_values(&[operation, kind]).inc();
    }
}

/// What the node tells about itself in `pushd_build_info` and `pushd_node_info`.
pub struct Identity<'a> {
    pub node_id: &'a str,
    pub engine: &'a str,
    pub max_connections: usize,
}

/// Latency buckets from 100 µs to 5 s: loopback round trips to a stalled Redis.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Replay sizes up to the default `--max-replay` (1000).
const REPLAY_BUCKETS: [f64; 9] = [0.0, 1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

impl Metrics {
    pub fn new(identity: &Identity) -> Self {
        let registry = Registry::new();
        let r = Register(&registry);
        let info = r.gauge_vec("pushd_build_info", "pushd's version; always 1", &["version"]);
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let node = r.gauge_vec("pushd_node_info", "This node's id and engine; always 1", &["node_id", "engine"]);
        node.with_label_values(&[identity.node_id, identity.engine]).set(1);
        r.gauge("pushd_max_connections", "Client connections this node accepts (--max-connections)")
            .set(identity.max_connections as i64);
        #[cfg(target_os = "linux")]
        r.collector(prometheus::process_collector::ProcessCollector::for_self());
        let redis = RedisMetrics {
            command_duration: HistogramVec::new(
                HistogramOpts::new("pushd_redis_command_duration_seconds", "Seconds per Redis round trip")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["operation"],
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(
                Opts::new("pushd_redis_errors_total", "Failed Redis round trips"),
                &["operation", "kind"],
            )
            .expect("valid metric"),
            pubsub_reconnects: IntCounter::new(
                "pushd_redis_pubsub_reconnects_total",
                "Times the Redis pub/sub connection came back",
            )
            .expect("valid metric"),
            pubsub_lagged: IntCounter::new(
                "pushd_redis_pubsub_lagged_total",
                "Times the pub/sub receiver fell behind and dropped messages",
            )
            .expect("valid metric"),
            gap_fills: IntCounterVec::new(
                Opts::new("pushd_redis_gap_fills_total", "Gaps in live delivery repaired from the streams"),
                &["result"],
            )
            .expect("valid metric"),
            slot_retries: IntCounterVec::new(
                Opts::new(
                    "pushd_redis_slot_retries_total",
                    "Redis Cluster commands turned away unrun because their slot was moving, sent again",
                ),
                &["operation"],
            )
            .expect("valid metric"),
        };
        if identity.engine == "redis" {
            r.collector(redis.command_duration.clone());
            r.collector(redis.errors.clone());
            r.collector(redis.pubsub_reconnects.clone());
            r.collector(redis.pubsub_lagged.clone());
            r.collector(redis.gap_fills.clone());
            r.collector(redis.slot_retries.clone());
            zero(&redis.slot_retries, &[&REDIS_OPERATIONS]);
            zero(&redis.command_duration, &[&REDIS_OPERATIONS]);
            zero(&redis.errors, &[&REDIS_OPERATIONS, &REDIS_ERROR_KINDS]);
            zero(&redis.gap_fills, &[&["filled", "reset"]]);
        }
        let memory = MemoryMetrics {
            channels: IntGauge::new("pushd_memory_channels", "Channels the memory engine remembers")
                .expect("valid metric"),
            history_bytes: IntGauge::new("pushd_memory_history_bytes", "Bytes of history the memory engine holds")
                .expect("valid metric"),
        };
        if identity.engine == "memory" {
            r.collector(memory.channels.clone());
            r.collector(memory.history_bytes.clone());
        }
        let m = Self {
            connections: r.gauge_vec("pushd_connections", "Open client connections", &["transport"]),
            connections_opened: r.counter_vec(
                "pushd_connections_opened_total",
                "Client connections whose session started",
                &["transport"],
            ),
            connections_closed: r.counter_vec(
                "pushd_connections_closed_total",
                "Client connections ended, by the close code sent (peer: the client left)",
                &["transport", "code"],
            ),
            refused: r.counter_vec(
                "pushd_connections_refused_total",
                "Connections refused before starting",
                &["reason"],
            ),
            subscriptions: r.gauge_vec("pushd_subscriptions", "Local channel subscriptions", &["transport"]),
            channels: r.gauge("pushd_channels", "Channels with local subscribers"),
            published: r.counter_vec("pushd_messages_published_total", "Messages stored through this node", &["route"]),
            publish_errors: r.counter_vec("pushd_publish_errors_total", "Publishes refused or failed", &["code"]),
            delivered: r.counter_vec(
                "pushd_messages_delivered_total",
                "Message frames written to clients, live and replayed",
                &["transport"],
            ),
            control_frames: r.counter_vec(
                "pushd_control_frames_total",
                "Frames other than messages written to clients",
                &["transport"],
            ),
            resets: r.counter_vec(
                "pushd_resets_total",
                "Reset frames sent: history lost under a live subscriber",
                &["transport"],
            ),
            commands: r.counter_vec("pushd_commands_total", "WebSocket commands by op and result", &["op", "result"]),
            replays: r.counter_vec("pushd_replays_total", "Resubscribes with a position", &["result"]),
            replayed_messages: r.histogram(
                "pushd_replayed_messages",
                "Messages replayed per recovered resubscribe",
                &REPLAY_BUCKETS,
            ),
            slow_consumers: r.counter("pushd_slow_consumer_disconnects_total", "Sessions closed for a full send queue"),
            kicks: r.counter("pushd_kicks_total", "Sessions closed by the backend or an operator"),
            delivery_latency: r.histogram(
                "pushd_delivery_latency_seconds",
                "Store-to-socket-write latency",
                &LATENCY_BUCKETS[..14],
            ),
            flush_round: r.histogram(
                "pushd_flush_round_seconds",
                "Time one round of the flusher took to write its sockets",
                &LATENCY_BUCKETS[..14],
            ),
            flush_writes: r
                .counter("pushd_flush_socket_writes_total", "Socket writes by the flusher, one per socket per round"),
            http_requests: r.counter_vec(
                "pushd_http_requests_total",
                "Server and admin API requests",
                &["api", "route", "code"],
            ),
            http_duration: r.histogram_vec(
                "pushd_http_request_duration_seconds",
                "Server and admin API request durations",
                &["api", "route"],
                &LATENCY_BUCKETS,
            ),
            ready: r.gauge("pushd_ready", "1 while /readyz answers 200"),
            draining: r.gauge("pushd_draining", "1 from SIGTERM until exit"),
            engine_up: r.gauge("pushd_engine_up", "1 while the engine can take traffic"),
            panics: r.counter("pushd_panics_total", "Panics in this process (each one a bug)"),
            redis,
            memory,
            registry,
        };
        m.zero_every_series();
        m
    }

    /// Creates every labelled series at 0.
    fn zero_every_series(&self) {
        zero(&self.connections, &[&TRANSPORTS]);
        zero(&self.subscriptions, &[&TRANSPORTS]);
        zero(&self.connections_opened, &[&TRANSPORTS]);
        zero(&self.connections_closed, &[&TRANSPORTS, &CLOSE_CODES]);
        zero(&self.refused, &[&REFUSALS]);
        zero(&self.published, &[&PUBLISH_ROUTES]);
        zero(&self.publish_errors, &[&PUBLISH_ERRORS]);
        zero(&self.delivered, &[&TRANSPORTS]);
        zero(&self.control_frames, &[&TRANSPORTS]);
        zero(&self.resets, &[&TRANSPORTS]);
        let results: Vec<&str> = std::iter::once("ok").chain(ERROR_CODES).collect();
        zero(&self.commands, &[&OPS, &results]);
        zero(&self.replays, &[&["recovered", "not_recovered"]]);
        zero(&self.http_requests, &[&["api"], &API_ROUTES, &HTTP_CODES]);
        zero(&self.http_requests, &[&["admin"], &ADMIN_ROUTES, &HTTP_CODES]);
        zero(&self.http_duration, &[&["api"], &API_ROUTES]);
        zero(&self.http_duration, &[&["admin"], &ADMIN_ROUTES]);
    }

    /// Counts one server or admin API request.
    pub fn observe_http(&self, api: &str, route: &str, code: &str, elapsed: Duration) {
        self.http_requests.with_label_values(&[api, route, code]).inc();
        self.http_duration.with_label_values(&[api, route]).observe(elapsed.as_secs_f64());
    }

    /// Sets the state gauges, then renders the text exposition format for `/metrics`.
    pub fn render(&self, ready: bool, draining: bool, engine_up: bool, panics: u64) -> String {
        self.panics.inc_by(panics.saturating_sub(self.panics.get()));
        self.ready.set(ready as i64);
        self.draining.set(draining as i64);
        self.engine_up.set(engine_up as i64);
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// Error codes as the `result` label of `pushd_commands_total` (the protocol's `ErrorCode`s).
pub const ERROR_CODES: [&str; 16] = [
    "bad_request",
    "unknown_op",
    "bad_channel",
    "forbidden",
    "unauthorized",
    "token_expired",
    "already_subscribed",
    "not_subscribed",
    "too_many_channels",
    "too_many_connections",
    "payload_too_large",
    "presence_disabled",
    "rate_limited",
    "unavailable",
    "outcome_unknown",
    "not_found",
];

/// Creates the series for every combination of `labels` (one list per label name).
fn zero<T: MetricVecBuilder>(vec: &MetricVec<T>, labels: &[&[&str]]) {
    for combination in combinations(labels) {
        vec.with_label_values(&combination);
    }
}

fn combinations<'a>(labels: &[&[&'a str]]) -> Vec<Vec<&'a str>> {
    labels.iter().fold(vec![Vec::new()], |acc, values| {
        acc.iter().flat_map(|prefix| values.iter().map(move |v| [prefix.as_slice(), &[*v]].concat())).collect()
    })
}

/// Registers metrics in one registry; names are fixed here, so a failure is a bug.
struct Register<'a>(&'a Registry);

impl Register<'_> {
    fn collector<C: Collector + 'static>(&self, c: C) {
        self.0.register(Box::new(c)).expect("unique, valid metric");
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        let c = IntCounter::new(name, help).expect("valid metric");
        self.collector(c.clone());
        c
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.collector(c.clone());
        c
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let g = IntGauge::new(name, help).expect("valid metric");
        self.collector(g.clone());
        g
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.collector(g.clone());
        g
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid metric");
        self.collector(h.clone());
        h
    }

    fn histogram_vec(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        let h =
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels).expect("valid metric");
        self.collector(h.clone());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(engine: &str) -> Metrics {
        Metrics::new(&Identity { node_id: "n1", engine, max_connections: 10 })
    }

    #[test]
    fn combinations_cover_every_label_pair() {
        let c = combinations(&[&["a", "b"], &["1", "2", "3"]]);
        assert_eq!(c.len(), 6);
        assert_eq!(c[0], vec!["a", "1"]);
        assert_eq!(c[5], vec!["b", "3"]);
    }

    #[test]
    fn labelled_series_exist_at_zero_from_the_start() {
        let text = metrics("memory").render(true, false, true, 0);
        assert!(text.contains("pushd_connections_closed_total{code=\"4010\",transport=\"sse\"} 0"), "{text}");
        assert!(text.contains("pushd_commands_total{op=\"subscribe\",result=\"forbidden\"} 0"));
        assert!(text.contains("pushd_http_requests_total{api=\"admin\",code=\"503\",route=\"kick\"} 0"));
        assert!(text.contains("pushd_node_info{engine=\"memory\",node_id=\"n1\"} 1"));
        assert!(text.contains("pushd_ready 1"));
        assert!(!text.contains("pushd_redis_"), "a memory node has no Redis metrics");
        assert!(!text.contains("node=\""), "node identity is a target label, not a metric label");
    }

    #[test]
    fn redis_nodes_expose_the_engine_metrics() {
        let text = metrics("redis").render(false, false, false, 0);
        assert!(text.contains("pushd_redis_errors_total{kind=\"timeout\",operation=\"publish\"} 0"), "{text}");
        assert!(text.contains("pushd_redis_gap_fills_total{result=\"reset\"} 0"));
        assert!(text.contains("pushd_engine_up 0"));
    }
}
