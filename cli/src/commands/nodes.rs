//! `pushctl nodes`: GET /admin/nodes, the registry as it stands (no survey of the nodes).

use serde::Deserialize;

use super::stats::Node;
use super::{Outcome, now_ms, show};
use crate::client::Client;
use crate::table::{self, Col, Hide};

/// The answer of GET /admin/nodes.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Nodes {
    pub nodes: Vec<Node>,
    pub missing: Vec<String>,
}

pub async fn run(client: &Client, json: bool) -> anyhow::Result<Outcome> {
    let fetched = client.get::<Nodes>(&["admin", "nodes"], &[], false).await?;
    let now = now_ms();
    show(&fetched, json, &fetched.body.missing, |n| render(n, now))
}

/// One row per registered node: where it listens, what it runs, how long it has been up
/// (counted to `now_ms` when the registry gives only the start time), and when it last wrote
/// its entry: the counters are as of then.
pub fn render(nodes: &Nodes, now_ms: u64) -> String {
    const COLS: [Col; 8] = [
        Col::text("NODE"),
        Col::text("ADDR").hide(Hide::WhenBlank),
        Col::text("VERSION").hide(Hide::WhenBlank),
        Col::num("UP").hide(Hide::WhenBlank),
        Col::num("CONNS").hide(Hide::WhenBlank),
        Col::num("CHANS").hide(Hide::WhenBlank),
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
                n.uptime(now_ms).map(table::duration).unwrap_or_default(),
                table::opt(n.connections),
                table::opt(n.channels),
                n.updated_ms.map(|u| table::ago(u, now_ms)).unwrap_or_default(),
                if n.draining { "draining" } else { "serving" }.into(),
            ]
        })
        .collect();
    table::render(&COLS, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_table_snapshot() {
        let nodes: Nodes = serde_json::from_str(
            r#"{"nodes":[
                {"id":"n0","addr":"127.0.0.1:8081","version":"0.1.0","uptime_s":3600,"connections":20,
                 "channels":10,"draining":false},
                {"id":"n1","addr":"10.0.0.12:8080","version":"0.1.1","started_ms":1795440253000,"updated_ms":1795440311000,"connections":0,
                 "channels":0,"draining":true}],
              "missing":[]}"#,
        )
        .unwrap();
        let want = "\
NODE  ADDR            VERSION     UP  CONNS  CHANS  SEEN    STATE
n0    127.0.0.1:8081  0.1.0    1h00m     20     10          serving
n1    10.0.0.12:8080  0.1.1      59s      0      0  1s ago  draining";
        let got = render(&nodes, 1_795_440_312_000);
        assert_eq!(got, want, "got:\n{got}");
        table::assert_fits(&got);
    }

    #[test]
    fn registry_without_counters_hides_their_columns() {
        let nodes: Nodes = serde_json::from_str(r#"{"nodes":[{"id":"n0","addr":"h:1"}]}"#).unwrap();
        assert_eq!(render(&nodes, 0), "NODE  ADDR  STATE\nn0    h:1   serving");
    }
}
