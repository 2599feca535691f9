//! `pushctl nodes`: GET /admin/nodes, the registry as it stands (no survey of the nodes).

use pushd_wire::{NodeInfo, NodesAnswer};

use super::{Outcome, now_ms, show};
use crate::client::Client;
use crate::table::{self, Col, Hide};

pub async fn run(client: &Client, json: bool) -> anyhow::Result<Outcome> {
    let fetched = client.get::<NodesAnswer>(&["admin", "nodes"], &[], false).await?;
    let now = now_ms();
    show(&fetched, json, &fetched.body.coverage, |n| render(n, now))
}

/// One row per registered node: where it listens, what it runs, how long it has been up
/// (counted from its start to `now_ms`), and when it last wrote its entry: the counters are as
/// of then.
pub fn render(nodes: &NodesAnswer, now_ms: u64) -> String {
    const COLS: [Col; 8] = [
        Col::text("NODE"),
        Col::text("ADDR").hide(Hide::WhenBlank),
        Col::text("VERSION").hide(Hide::WhenBlank),
        Col::num("UP").hide(Hide::WhenBlank),
        Col::num("CONNS"),
        Col::num("CHANS"),
        Col::text("SEEN").hide(Hide::WhenBlank),
        Col::text("STATE"),
    ];
    if nodes.nodes.is_empty() {
        return "no nodes registered".into();
    }
    let rows: Vec<Vec<String>> = nodes
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.addr.clone(),
                n.version.clone(),
                uptime(n, now_ms),
                n.connections.to_string(),
                n.channels.to_string(),
                table::ago(n.updated_ms, now_ms),
                state(n, now_ms).into(),
            ]
        })
        .collect();
    table::render(&COLS, &rows)
}

/// Nodes heartbeat every second: one quiet for longer is probably dead, and leaves the registry
/// when its entry lapses (`--node-ttl`).
fn state(n: &pushd_wire::NodeInfo, now_ms: u64) -> &'static str {
    match (n.draining, now_ms.saturating_sub(n.updated_ms) > 2_500) {
        (_, true) => "silent",
        (true, false) => "draining",
        (false, false) => "serving",
    }
}

/// Time since the node started, counted to `now_ms`; blank when the entry lacks the start
/// (0), as [`table::ago`] leaves a 0 time blank.
fn uptime(n: &NodeInfo, now_ms: u64) -> String {
    if n.started_ms == 0 {
        return String::new();
    }
    table::duration(now_ms.saturating_sub(n.started_ms) / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_table_snapshot() {
        let nodes: NodesAnswer = serde_json::from_str(
            r#"{"nodes":[
                {"id":"n0","addr":"127.0.0.1:8081","version":"0.1.0","started_ms":1795436712000,
                 "updated_ms":1795440310000,"connections":20,"users":7,"subscriptions":40,"channels":10,
                 "messages_in":1000,"messages_out":30000,"replays":1,"slow_consumers":0,"draining":false},
                {"id":"n1","addr":"10.0.0.12:8080","version":"0.1.1","started_ms":1795440253000,
                 "updated_ms":1795440311000,"connections":0,"users":0,"subscriptions":0,"channels":0,
                 "messages_in":0,"messages_out":0,"replays":0,"slow_consumers":0,"draining":true}],
              "missing":[]}"#,
        )
        .unwrap();
        let want = "\
NODE  ADDR            VERSION     UP  CONNS  CHANS  SEEN    STATE
n0    127.0.0.1:8081  0.1.0    1h00m     20     10  2s ago  serving
n1    10.0.0.12:8080  0.1.1      59s      0      0  1s ago  draining";
        let got = render(&nodes, 1_795_440_312_000);
        assert_eq!(got, want, "got:\n{got}");
        table::assert_fits(&got);
    }

    #[test]
    fn an_entry_with_only_who_and_where_reads_as_zeros_and_hides_unknown_times() {
        let nodes: NodesAnswer = serde_json::from_str(r#"{"nodes":[{"id":"n0","addr":"h:1"}]}"#).unwrap();
        assert_eq!(render(&nodes, 0), "NODE  ADDR  CONNS  CHANS  STATE\nn0    h:1       0      0  serving");
    }
}
