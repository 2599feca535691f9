//! `pushctl history <channel>`: GET /admin/history, a channel's stored messages, oldest first.
//! Says so when `--since` lands before what the channel still keeps.

use pushd_wire::Coverage;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Outcome, now_ms, show};
use crate::client::Client;
use crate::table::{self, Col, Hide};

/// The answer of GET /admin/history (the same as /api/history).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct History {
    pub channel: String,
    pub epoch: String,
    /// The channel's last offset in this epoch (0: nothing published yet).
    pub top: u64,
    pub publications: Vec<Publication>,
}

/// One stored message; `data` is kept byte for byte as the server sent it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Publication {
    pub offset: u64,
    pub event: Option<String>,
    pub data: Option<Box<RawValue>>,
    pub time_ms: u64,
}

/// Longest payload shown in the table; `--json` has the rest.
const MAX_DATA: usize = 200;

pub async fn run(
    client: &Client,
    json: bool,
    channel: &str,
    since: Option<u64>,
    limit: Option<u32>,
) -> anyhow::Result<Outcome> {
    let mut query = vec![("channel", channel.to_string())];
    query.extend(since.map(|s| ("since", s.to_string())));
    query.extend(limit.map(|l| ("limit", l.to_string())));
    let fetched = client.get::<History>(&["admin", "history"], &query, false).await?;
    let now = now_ms();
    show(&fetched, json, &Coverage::default(), |h| render(h, since, now))
}

/// A header line, one row per message, and a note on any gap after `since`.
pub fn render(history: &History, since: Option<u64>, now_ms: u64) -> String {
    const COLS: [Col; 4] =
        [Col::num("OFFSET"), Col::text("TIME"), Col::text("EVENT").hide(Hide::WhenBlank), Col::text("DATA").wrap()];
    let mut out = format!(
        "{} · epoch {} · top {} · {}\n",
        history.channel,
        history.epoch,
        history.top,
        table::plural(history.publications.len() as u64, "message", "messages")
    );
    if !history.publications.is_empty() {
        let rows: Vec<Vec<String>> = history
            .publications
            .iter()
            .map(|p| {
                vec![
                    p.offset.to_string(),
                    table::ago(p.time_ms, now_ms),
                    p.event.clone().unwrap_or_default(),
                    table::cut(p.data.as_deref().map_or("null", RawValue::get), MAX_DATA),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table::render(&COLS, &rows));
        out.push('\n');
    }
    if let Some(gap) = since.and_then(|s| gap_after(s, history)) {
        out.push_str(&format!("\n{gap}\n"));
    }
    out
}

/// The offsets after `since` that the channel no longer keeps, as a note, if any.
fn gap_after(since: u64, history: &History) -> Option<String> {
    if since > history.top {
        return Some(format!(
            "note: offset {since} is past the channel's top {}: was it from an older epoch than {}?",
            history.top, history.epoch
        ));
    }
    let first = history.publications.first().map_or(history.top + 1, |p| p.offset);
    (first > since + 1).then(|| {
        format!("note: offsets {} to {} are gone (trimmed by --history-size or expired)", since + 1, first - 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"channel":"room:lobby","epoch":"a6fc7893c22be777","top":5,"publications":[
        {"offset":4,"event":"chat","data":{"z":1,"a":2,"id":12345678901234567890123},"time_ms":1795440000000},
        {"offset":5,"data":"hi","time_ms":1795440310000}]}"#;

    #[test]
    fn history_table_snapshot() {
        let history: History = serde_json::from_str(SAMPLE).unwrap();
        let want = r#"room:lobby · epoch a6fc7893c22be777 · top 5 · 2 messages

OFFSET  TIME       EVENT  DATA
     4  5m12s ago  chat   {"z":1,"a":2,"id":12345678901234567890123}
     5  2s ago            "hi"

note: offsets 2 to 3 are gone (trimmed by --history-size or expired)
"#;
        let got = render(&history, Some(1), 1_795_440_312_000);
        assert_eq!(got, want, "got:\n{got}");
        table::assert_fits(&got);
    }

    #[test]
    fn gaps_are_found_after_since() {
        let history: History = serde_json::from_str(SAMPLE).unwrap();
        assert_eq!(gap_after(3, &history), None);
        assert_eq!(gap_after(5, &history), None);
        assert!(gap_after(9, &history).unwrap().contains("past the channel's top 5"));
        let expired = History { top: 5, ..Default::default() };
        assert!(gap_after(2, &expired).unwrap().contains("offsets 3 to 5 are gone"));
    }
}
