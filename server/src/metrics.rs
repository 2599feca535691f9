//! Prometheus metrics of one node, served on `/metrics`. Labels are bounded (transport, route,
//! result, code): never a channel name or connection id.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Handles to every metric; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open client connections by transport.
    pub connections: IntGaugeVec,
    /// Local (session, channel) subscriptions.
    pub subscriptions: IntGauge,
    /// Channels with at least one local subscriber.
    pub channels: IntGauge,
    /// Messages stored by publishes through this node, by route (api, ws).
    pub published: IntCounterVec,
    /// Publishes refused or failed, by error code.
    pub publish_errors: IntCounterVec,
    /// Frames written to clients (messages, replays, events).
    pub delivered: IntCounter,
    /// Resubscribes with a position, by result (recovered, not_recovered).
    pub replays: IntCounterVec,
    /// Sessions closed because their send queue filled up.
    pub slow_consumers: IntCounter,
    /// Sessions closed by /api/disconnect or an operator.
    pub kicks: IntCounter,
    /// Connections refused before they started, by reason.
    pub refused: IntCounterVec,
    /// Seconds from storing a message to writing it to a client (first of each write batch).
    pub delivery_latency: Histogram,
}

impl Metrics {
    pub fn new(node_id: &str) -> Self {
        let registry =
            Registry::new_custom(Some("pushd".into()), Some([("node".to_owned(), node_id.to_owned())].into()))
                .expect("valid registry");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let connections = IntGaugeVec::new(Opts::new("connections", "Open client connections"), &["transport"])
            .expect("valid metric");
        registry.register(Box::new(connections.clone())).expect("unique metric");
        let buckets = vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new("delivery_latency_seconds", "Store-to-socket-write latency").buckets(buckets),
        )
        .expect("valid metric");
        registry.register(Box::new(delivery_latency.clone())).expect("unique metric");
        Self {
            connections,
            subscriptions: gauge("subscriptions", "Local channel subscriptions"),
            channels: gauge("channels", "Channels with local subscribers"),
            published: counter_vec("messages_published_total", "Messages stored through this node", "route"),
            publish_errors: counter_vec("publish_errors_total", "Publishes refused or failed", "code"),
            delivered: counter("messages_delivered_total", "Frames written to clients"),
            replays: counter_vec("replays_total", "Resubscribes with a position", "result"),
            slow_consumers: counter("slow_consumer_disconnects_total", "Sessions closed for a full send queue"),
            kicks: counter("kicks_total", "Sessions closed by the backend or an operator"),
            refused: counter_vec("connections_refused_total", "Connections refused before starting", "reason"),
            delivery_latency,
            registry,
        }
    }

    /// The text exposition format for `/metrics`.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}
