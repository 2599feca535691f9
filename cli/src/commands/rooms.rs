//! `pushctl rooms`: GET /admin/channels, channels with at least one subscriber somewhere.

use pushd_wire::ChannelsAnswer;

use super::{Outcome, show};
use crate::cli::RoomSort;
use crate::client::Client;
use crate::table::{self, Col, Hide};

pub async fn run(
    client: &Client,
    json: bool,
    pattern: Option<String>,
    sort: Option<RoomSort>,
    limit: Option<u32>,
) -> anyhow::Result<Outcome> {
    let query: Vec<(&str, String)> = [
        ("pattern", pattern),
        ("sort", sort.map(|s| s.as_query().to_string())),
        ("limit", limit.map(|l| l.to_string())),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    let fetched = client.get::<ChannelsAnswer>(&["admin", "channels"], &query, true).await?;
    show(&fetched, json, &fetched.body.coverage, render)
}

/// One row per channel, in the server's order.
pub fn render(answer: &ChannelsAnswer) -> String {
    const COLS: [Col; 6] = [
        Col::text("CHANNEL").wrap(),
        Col::num("SUBSCRIBERS"),
        Col::num("NODES"),
        Col::num("HISTORY").hide(Hide::WhenZero),
        Col::num("LAST OFFSET").hide(Hide::WhenZero),
        Col::num("MSG/S"),
    ];
    if answer.channels.is_empty() {
        return "no channels with subscribers".into();
    }
    let rows: Vec<Vec<String>> = answer
        .channels
        .iter()
        .map(|r| {
            vec![
                r.channel.clone(),
                r.subscribers.to_string(),
                r.nodes.to_string(),
                table::opt(r.history_len),
                table::opt(r.last_offset),
                table::rate(r.rate),
            ]
        })
        .collect();
    let mut out = table::render(&COLS, &rows);
    if answer.truncated {
        out.push_str(&format!("\n(first {} shown: narrow --pattern or raise --limit)", rows.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_table_snapshot() {
        let answer: ChannelsAnswer = serde_json::from_str(
            r#"{"channels": [
                 {"channel": "room:1", "subscribers": 30, "nodes": 3, "history_len": 100,
                  "last_offset": 100, "rate": 2.5},
                 {"channel": "user:alice", "subscribers": 2, "nodes": 1, "history_len": 0,
                  "last_offset": 7, "rate": 0.0}],
               "truncated": false, "missing": ["n2"]}"#,
        )
        .unwrap();
        let want = "\
CHANNEL     SUBSCRIBERS  NODES  HISTORY  LAST OFFSET  MSG/S
room:1               30      3      100          100    2.5
user:alice            2      1        0            7    0.0";
        let got = render(&answer);
        assert_eq!(got, want, "got:\n{got}");
        table::assert_fits(&got);
    }
}
