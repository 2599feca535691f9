//! `pushctl connections`: GET /admin/connections, open client connections across the cluster.

use pushd_wire::ConnectionsAnswer;

use super::{Outcome, now_ms, show};
use crate::client::Client;
use crate::table::{self, Col, Hide};

/// The filters of `pushctl connections`; they combine.
#[derive(Debug, Default)]
pub struct Filter {
    pub node: Option<String>,
    pub user: Option<String>,
    pub channel: Option<String>,
    pub limit: Option<u32>,
}

pub async fn run(client: &Client, json: bool, filter: Filter) -> anyhow::Result<Outcome> {
    let query: Vec<(&str, String)> = [
        ("node", filter.node),
        ("user", filter.user),
        ("channel", filter.channel),
        ("limit", filter.limit.map(|l| l.to_string())),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    let fetched = client.get::<ConnectionsAnswer>(&["admin", "connections"], &query, true).await?;
    let now = now_ms();
    show(&fetched, json, &fetched.body.coverage, |c| render(c, now))
}

/// One row per connection; `now_ms` anchors the SINCE column.
pub fn render(answer: &ConnectionsAnswer, now_ms: u64) -> String {
    const COLS: [Col; 9] = [
        Col::text("CONN"),
        Col::text("USER").hide(Hide::WhenBlank).wrap(),
        Col::text("NODE"),
        Col::text("VIA").hide(Hide::WhenBlank),
        Col::text("REMOTE").hide(Hide::WhenBlank),
        Col::text("SINCE").hide(Hide::WhenBlank),
        Col::num("QUEUE").hide(Hide::WhenZero),
        Col::num("OUT"),
        Col::text("CHANNELS").hide(Hide::WhenBlank).wrap(),
    ];
    if answer.connections.is_empty() {
        return "no connections".into();
    }
    let rows: Vec<Vec<String>> = answer
        .connections
        .iter()
        .map(|c| {
            vec![
                c.conn.clone(),
                c.user.clone(),
                c.node.clone(),
                c.transport.clone(),
                c.remote.clone().unwrap_or_default(),
                table::ago(c.connected_ms, now_ms),
                table::count(c.queue),
                table::count(c.messages_out),
                channel_list(&c.channels),
            ]
        })
        .collect();
    let mut out = table::render(&COLS, &rows);
    if answer.truncated {
        out.push_str(&format!("\n(first {} shown: narrow the filters or raise --limit)", rows.len()));
    }
    out
}

/// Channels one per line, at most [`MAX_CHANNELS`] of them; `--json` or `pushctl room` has the rest.
fn channel_list(channels: &[String]) -> String {
    let mut lines: Vec<String> = channels.iter().take(MAX_CHANNELS).cloned().collect();
    if channels.len() > MAX_CHANNELS {
        lines.push(format!("+{} more", channels.len() - MAX_CHANNELS));
    }
    lines.join("\n")
}

/// Channels listed per connection in the table.
const MAX_CHANNELS: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_table_snapshot() {
        let answer: ConnectionsAnswer = serde_json::from_str(
            r#"{"connections": [
                 {"conn": "n0.17", "user": "u7", "node": "n0", "transport": "ws",
                  "remote": "127.0.0.1:50412", "connected_ms": 1795440000000,
                  "channels": ["room:1"], "queue": 0, "messages_out": 42},
                 {"conn": "n1.3", "user": "alice", "node": "n1", "transport": "sse",
                  "remote": "203.0.113.45:61000", "connected_ms": 1795436000000,
                  "channels": ["room:1", "user:alice", "news", "room:lobby"], "queue": 12,
                  "messages_out": 1234567}],
               "truncated": true, "missing": []}"#,
        )
        .unwrap();
        let want = "\
CONN   USER   NODE  VIA  REMOTE              SINCE      QUEUE    OUT  CHANNELS
n0.17  u7     n0    ws   127.0.0.1:50412     5m12s ago      0     42  room:1
n1.3   alice  n1    sse  203.0.113.45:61000  1h11m ago     12  1234k  room:1
                                                                      user:alice
                                                                      news
                                                                      +1 more
(first 2 shown: narrow the filters or raise --limit)";
        let got = render(&answer, 1_795_440_312_000);
        assert_eq!(got, want, "got:\n{got}");
        table::assert_fits(&got);
    }
}
