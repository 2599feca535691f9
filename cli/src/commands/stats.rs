//! `pushctl stats`: GET /admin/stats. Cluster totals, one row per node, Redis pub/sub; with
//! `--watch` the same screen redrawn in place until Ctrl-C.

use std::time::Duration;

use pushd_wire::{NodeStats, RedisStats, StatsAnswer};

use super::{Outcome, now_ms, partial_warning, print, show};
use crate::client::{Client, ClientError, Fetched};
use crate::table::{self, Col, Hide};

async fn fetch(client: &Client) -> Result<Fetched<StatsAnswer>, ClientError> {
    client.get(&["admin", "stats"], &[], true).await
}

/// One answer, printed once.
pub async fn once(client: &Client, json: bool) -> anyhow::Result<Outcome> {
    let fetched = fetch(client).await?;
    show(&fetched, json, &fetched.body.coverage, render)
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
                if fetched.body.coverage.is_partial() {
                    eprintln!("{}", partial_warning(&fetched.body.coverage, client.survey_timeout_ms()));
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
pub fn render(stats: &StatsAnswer) -> String {
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
fn node_table(nodes: &[NodeStats]) -> String {
    const COLS: [Col; 9] = [
        Col::text("NODE"),
        Col::text("ADDR").hide(Hide::WhenBlank).wrap(),
        Col::num("UP"),
        Col::num("CONNS"),
        Col::num("SUBS"),
        Col::num("CHANS"),
        Col::num("IN/S"),
        Col::num("OUT/S"),
        Col::text("NOTES").hide(Hide::WhenBlank).wrap(),
    ];
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.info.id.clone(),
                n.info.addr.clone(),
                table::duration(n.uptime_s),
                table::count(n.info.connections),
                table::count(n.info.subscriptions),
                table::count(n.info.channels),
                table::rate(n.msgs_in_per_s),
                table::rate(n.msgs_out_per_s),
                notes(n),
            ]
        })
        .collect();
    table::render(&COLS, &rows)
}

/// `draining, 3 replays, 1 slow`: the node's unusual facts, empty when there are none.
fn notes(n: &NodeStats) -> String {
    let n = &n.info;
    let mut notes = Vec::new();
    if n.draining {
        notes.push("draining".to_string());
    }
    if n.replays > 0 {
        notes.push(table::plural(n.replays, "replay", "replays"));
    }
    if n.slow_consumers > 0 {
        notes.push(format!("{} slow", n.slow_consumers));
    }
    notes.join(", ")
}

/// The Redis block: server, memory, load, pub/sub counts and the busiest channels.
fn render_redis(redis: &RedisStats) -> String {
    let unknown = || "?".to_string();
    let mut out = format!(
        "\nredis {} · {} used · {} ops/s · {}\npub/sub: {} · {}\n",
        redis.version.clone().unwrap_or_else(unknown),
        redis.used_memory.clone().unwrap_or_else(unknown),
        redis.ops_per_sec.map_or_else(unknown, |o| o.to_string()),
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
        let stats: StatsAnswer = serde_json::from_str(SAMPLE).unwrap();
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
        let nodes: Vec<NodeStats> = serde_json::from_str(&format!("[{node}]")).unwrap();
        let got = node_table(&nodes);
        table::assert_fits(&got);
        assert!(got.contains("prod-a-7f9c"), "ids do not wrap:\n{got}");
        assert!(got.contains(" 123k  1234k"), "big counts are compact:\n{got}");
    }

    #[test]
    fn memory_engine_and_absent_node_fields_render() {
        let stats: StatsAnswer =
            serde_json::from_str(r#"{"engine":"memory","nodes":[{"id":"dev"}],"missing":[],"redis":null}"#).unwrap();
        let got = render(&stats);
        assert!(
            got.contains("\nNODE  UP  CONNS  SUBS  CHANS  IN/S  OUT/S\ndev   0s      0     0      0   0.0    0.0\n"),
            "{got}"
        );
        assert!(got.ends_with("redis: none (memory engine)\n"), "{got}");
    }
}
