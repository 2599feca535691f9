//! `pushctl stats`: GET /admin/stats. Cluster totals, one row per node, Redis pub/sub; with
//! `--watch` the same screen redrawn in place until Ctrl-C.

use std::time::Duration;

use serde::Deserialize;

use super::{Outcome, now_ms, partial_warning, print, show};
use crate::client::{Client, ClientError, Fetched};
use crate::table::{self, Col, Hide};

/// The answer of GET /admin/stats.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub engine: String,
    pub totals: Totals,
    pub nodes: Vec<Node>,
    pub missing: Vec<String>,
    /// `None` on the memory engine.
    pub redis: Option<Redis>,
}

/// Sums over the nodes that answered; `users` and `channels` are unique across the cluster.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Totals {
    pub nodes: u64,
    pub connections: u64,
    pub users: u64,
    pub subscriptions: u64,
    pub channels: u64,
    pub msgs_in_per_s: f64,
    pub msgs_out_per_s: f64,
    pub replays: u64,
    pub slow_consumers: u64,
    pub uptime_s: u64,
}

/// One node, as in /admin/stats and /admin/nodes. The counters are optional because the
/// registry (/admin/nodes) may hold only who and where a node is.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Node {
    pub id: String,
    pub addr: String,
    pub version: String,
    /// When the node started (Unix ms): /admin/nodes gives this instead of `uptime_s`.
    pub started_ms: Option<u64>,
    /// When the node last wrote its registry entry (Unix ms; /admin/nodes).
    pub updated_ms: Option<u64>,
    pub uptime_s: Option<u64>,
    pub connections: Option<u64>,
    pub users: Option<u64>,
    pub subscriptions: Option<u64>,
    pub channels: Option<u64>,
    pub messages_in: Option<u64>,
    pub messages_out: Option<u64>,
    pub msgs_in_per_s: Option<f64>,
    pub msgs_out_per_s: Option<f64>,
    pub replays: Option<u64>,
    pub slow_consumers: Option<u64>,
    pub draining: bool,
}

/// Redis as the cluster's engine sees it.
impl Node {
    /// Seconds up: `uptime_s`, or else counted from `started_ms` to `now_ms`.
    pub fn uptime(&self, now_ms: u64) -> Option<u64> {
        self.uptime_s.or_else(|| self.started_ms.map(|s| now_ms.saturating_sub(s) / 1000))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Redis {
    /// `None` (as the next three) when Redis's INFO lacked it.
    pub version: Option<String>,
    pub used_memory: Option<String>,
    pub ops_per_sec: Option<f64>,
    pub connected_clients: Option<u64>,
    pub pubsub_channels: u64,
    pub pubsub_patterns: u64,
    pub top_channels: Vec<TopChannel>,
}

/// A pushd channel and how many nodes subscribe to it in Redis (`PUBSUB NUMSUB`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TopChannel {
    pub channel: String,
    pub subscribers: u64,
}

async fn fetch(client: &Client) -> Result<Fetched<Stats>, ClientError> {
    client.get(&["admin", "stats"], &[], true).await
}

/// One answer, printed once.
pub async fn once(client: &Client, json: bool) -> anyhow::Result<Outcome> {
    let fetched = fetch(client).await?;
    show(&fetched, json, &fetched.body.missing, render)
}

/// Redraws the answer every `every` seconds until Ctrl-C. A failed fetch after the first
/// success is shown in place of the screen and retried; a first failure ends the command.
pub async fn watch(client: &Client, json: bool, every: u64) -> anyhow::Result<Outcome> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut shown = false;
    loop {
        let answer = tokio::select! {
            _ = &mut ctrl_c => return Ok(Outcome::Complete),
            answer = fetch(client) => answer,
        };
        let title = format!("every {every}s: pushctl stats  {}", table::utc(now_ms()));
        match answer {
            Ok(fetched) if json => print(&super::pretty_json(&fetched.raw))?,
            Ok(fetched) => {
                print(&format!("{CLEAR}{title}\n\n{}", render(&fetched.body)))?;
                if !fetched.body.missing.is_empty() {
                    eprintln!("{}", partial_warning(&fetched.body.missing, client.survey_timeout_ms()));
                }
            }
            Err(e) if !shown => return Err(e.into()),
            Err(e) if json => eprintln!("pushctl: {e}"),
            Err(e) => print(&format!("{CLEAR}{title}\n\nerror: {e}\n(retrying)"))?,
        }
        shown = true;
        tokio::select! {
            _ = &mut ctrl_c => return Ok(Outcome::Complete),
            _ = tokio::time::sleep(Duration::from_secs(every)) => {}
        }
    }
}

/// Moves the cursor home and clears the screen (ANSI), so each frame replaces the last.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// The whole stats screen.
pub fn render(stats: &Stats) -> String {
    let t = &stats.totals;
    let mut out = format!(
        "engine {} · {} · up {}\n{} · {} · {} · {}\nin {} msg/s · out {} msg/s · {} · {}\n",
        stats.engine,
        table::plural(t.nodes, "node", "nodes"),
        table::duration(t.uptime_s),
        table::plural(t.connections, "connection", "connections"),
        table::plural(t.users, "user", "users"),
        table::plural(t.subscriptions, "subscription", "subscriptions"),
        table::plural(t.channels, "channel", "channels"),
        table::rate(t.msgs_in_per_s),
        table::rate(t.msgs_out_per_s),
        table::plural(t.replays, "replay", "replays"),
        table::plural(t.slow_consumers, "slow consumer", "slow consumers"),
    );
    out.push('\n');
    out.push_str(&node_table(&stats.nodes));
    out.push('\n');
    match &stats.redis {
        None => out.push_str("\nredis: none (memory engine)\n"),
        Some(redis) => out.push_str(&render_redis(redis)),
    }
    out
}

/// One row per node with its load: the middle of `pushctl stats`. Users per node are left out
/// (the totals count unique users); what is unusual about a node (draining, replays, slow
/// consumers) shares one NOTES column, which wraps, so the table fits 80 columns.
fn node_table(nodes: &[Node]) -> String {
    const COLS: [Col; 9] = [
        Col::text("NODE"),
        Col::text("ADDR").hide(Hide::WhenBlank).wrap(),
        Col::num("UP").hide(Hide::WhenBlank),
        Col::num("CONNS").hide(Hide::WhenBlank),
        Col::num("SUBS").hide(Hide::WhenBlank),
        Col::num("CHANS").hide(Hide::WhenBlank),
        Col::num("IN/S").hide(Hide::WhenBlank),
        Col::num("OUT/S").hide(Hide::WhenBlank),
        Col::text("NOTES").hide(Hide::WhenBlank).wrap(),
    ];
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.addr.clone(),
                n.uptime_s.map(table::duration).unwrap_or_default(),
                n.connections.map(table::count).unwrap_or_default(),
                n.subscriptions.map(table::count).unwrap_or_default(),
                n.channels.map(table::count).unwrap_or_default(),
                n.msgs_in_per_s.map(table::rate).unwrap_or_default(),
                n.msgs_out_per_s.map(table::rate).unwrap_or_default(),
                notes(n),
            ]
        })
        .collect();
    table::render(&COLS, &rows)
}

/// `draining, 3 replays, 1 slow`: the node's unusual facts, empty when there are none.
fn notes(n: &Node) -> String {
    let mut notes = Vec::new();
    if n.draining {
        notes.push("draining".to_string());
    }
    if let Some(r) = n.replays.filter(|&r| r > 0) {
        notes.push(table::plural(r, "replay", "replays"));
    }
    if let Some(s) = n.slow_consumers.filter(|&s| s > 0) {
        notes.push(format!("{s} slow"));
    }
    notes.join(", ")
}

/// The Redis block: server, memory, load, pub/sub counts and the busiest channels.
fn render_redis(redis: &Redis) -> String {
    let unknown = || "?".to_string();
    let mut out = format!(
        "\nredis {} · {} used · {} ops/s · {}\npub/sub: {} · {}\n",
        redis.version.clone().unwrap_or_else(unknown),
        redis.used_memory.clone().unwrap_or_else(unknown),
        redis.ops_per_sec.map_or_else(unknown, |o| format!("{o:.0}")),
        redis.connected_clients.map_or_else(unknown, |c| table::plural(c, "client", "clients")),
        table::plural(redis.pubsub_channels, "channel", "channels"),
        table::plural(redis.pubsub_patterns, "pattern", "patterns"),
    );
    if !redis.top_channels.is_empty() {
        const COLS: [Col; 2] = [Col::text("TOP CHANNEL").wrap(), Col::num("SUBSCRIBED NODES")];
        let rows: Vec<Vec<String>> =
            redis.top_channels.iter().map(|c| vec![c.channel.clone(), c.subscribers.to_string()]).collect();
        out.push('\n');
        out.push_str(&table::render(&COLS, &rows));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of docs/ADMIN-API.md, with a second, draining node.
    pub const SAMPLE: &str = r#"{
      "engine": "redis",
      "totals": {"nodes": 3, "connections": 60, "users": 20, "subscriptions": 120, "channels": 10,
                 "msgs_in_per_s": 12.0, "msgs_out_per_s": 340.5, "replays": 4,
                 "slow_consumers": 0, "uptime_s": 3600},
      "nodes": [{"id": "n0", "addr": "127.0.0.1:8081", "version": "0.1.0", "uptime_s": 3600,
                 "connections": 20, "users": 7, "subscriptions": 40, "channels": 10,
                 "messages_in": 1000, "messages_out": 30000, "msgs_in_per_s": 4.0,
                 "msgs_out_per_s": 113.5, "replays": 1, "slow_consumers": 0, "draining": false},
                {"id": "n1", "addr": "127.0.0.1:8082", "version": "0.1.0", "uptime_s": 125,
                 "connections": 40, "users": 13, "subscriptions": 80, "channels": 9,
                 "messages_in": 2000, "messages_out": 60000, "msgs_in_per_s": 8.0,
                 "msgs_out_per_s": 227.0, "replays": 3, "slow_consumers": 0, "draining": true}],
      "missing": ["n2"],
      "redis": {"version": "7.0.15", "used_memory": "1.2M", "ops_per_sec": 350,
                "connected_clients": 15, "pubsub_channels": 12, "pubsub_patterns": 0,
                "top_channels": [{"channel": "room:1", "subscribers": 3}]}
    }"#;

    #[test]
    fn stats_screen_snapshot() {
        let stats: Stats = serde_json::from_str(SAMPLE).unwrap();
        let want = "\
engine redis · 3 nodes · up 1h00m
60 connections · 20 users · 120 subscriptions · 10 channels
in 12.0 msg/s · out 340.5 msg/s · 4 replays · 0 slow consumers

NODE  ADDR               UP  CONNS  SUBS  CHANS  IN/S  OUT/S  NOTES
n0    127.0.0.1:8081  1h00m     20    40     10   4.0  113.5  1 replay
n1    127.0.0.1:8082  2m05s     40    80      9   8.0  227.0  draining, 3
                                                              replays

redis 7.0.15 · 1.2M used · 350 ops/s · 15 clients
pub/sub: 12 channels · 0 patterns

TOP CHANNEL  SUBSCRIBED NODES
room:1                      3
";
        let got = render(&stats);
        assert_eq!(got, want, "got:\n{got}");
        table::assert_fits(&got);
    }

    #[test]
    fn a_node_table_with_every_column_still_fits() {
        let node = r#"{"id":"prod-a-7f9c","addr":"10.200.30.40:8080","uptime_s":999999,"connections":123456,
            "subscriptions":1234567,"channels":12345,"msgs_in_per_s":12345.6,"msgs_out_per_s":123456.7,
            "replays":12345,"slow_consumers":123,"draining":true}"#;
        let nodes: Vec<Node> = serde_json::from_str(&format!("[{node}]")).unwrap();
        let got = node_table(&nodes);
        table::assert_fits(&got);
        assert!(got.contains("prod-a-7f9c"), "ids do not wrap:\n{got}");
        assert!(got.contains(" 123k  1234k"), "big counts are compact:\n{got}");
    }

    #[test]
    fn memory_engine_and_sparse_nodes_render() {
        let stats: Stats =
            serde_json::from_str(r#"{"engine":"memory","nodes":[{"id":"dev"}],"missing":[],"redis":null}"#).unwrap();
        let got = render(&stats);
        assert!(got.contains("NODE\ndev\n"), "{got}");
        assert!(got.ends_with("redis: none (memory engine)\n"), "{got}");
    }
}
