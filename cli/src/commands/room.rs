//! `pushctl room <channel>`: GET /admin/channels/{channel}, one channel's subscribers, presence
//! and history bounds.

use pushd_wire::ChannelDetail;

use super::{Outcome, show};
use crate::client::Client;
use crate::table::{self, Col};

pub async fn run(client: &Client, json: bool, channel: &str) -> anyhow::Result<Outcome> {
    let fetched = client.get::<ChannelDetail>(&["admin", "channels", channel], &[], true).await?;
    show(&fetched, json, &fetched.body.coverage, render)
}

/// History bounds, then the subscribers table, then presence by user.
pub fn render(room: &ChannelDetail) -> String {
    let h = &room.history;
    let kept = match (h.len, h.first_offset) {
        (0, _) | (_, None) => "none kept".to_string(),
        (_, Some(first)) => format!("{first} to {} kept", h.last_offset),
    };
    let mut out = format!(
        "channel {}\nhistory: epoch {} · last offset {} · {} ({})\n",
        room.channel,
        if h.epoch.is_empty() { "-" } else { &h.epoch },
        h.last_offset,
        table::plural(h.len, "message", "messages"),
        kept,
    );
    out.push_str(&format!("\n{}\n", table::plural(room.subscribers.len() as u64, "subscriber", "subscribers")));
    if !room.subscribers.is_empty() {
        let rows = room.subscribers.iter().map(|s| [&*s.conn, &*s.user, &*s.node]);
        out.push_str(&members(["CONN", "USER", "NODE"], rows));
        out.push('\n');
    }
    match &room.presence {
        None => out.push_str("\npresence: off for this channel (--presence)\n"),
        Some(present) => {
            let mut users: Vec<&str> = present.iter().map(|c| &*c.user).collect();
            users.sort_unstable();
            users.dedup();
            out.push_str(&format!("\npresence: {}\n", table::plural(users.len() as u64, "user", "users")));
            if !present.is_empty() {
                let rows = present.iter().map(|c| [&*c.user, &*c.conn, &*c.node]);
                out.push_str(&members(["USER", "CONN", "NODE"], rows));
                out.push('\n');
            }
        }
    }
    out
}

/// A table of connections in the channel, with `headers` naming the three cells of each row.
fn members<'a>(headers: [&'static str; 3], rows: impl Iterator<Item = [&'a str; 3]>) -> String {
    let rows: Vec<Vec<String>> = rows.map(|row| row.map(str::to_owned).to_vec()).collect();
    table::render(&headers.map(Col::text), &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_snapshot() {
        let room: ChannelDetail = serde_json::from_str(
            r#"{"channel": "room:1",
                "subscribers": [{"conn": "n0.17", "user": "u7", "node": "n0"},
                                {"conn": "n1.4", "user": "u8", "node": "n1"}],
                "presence": [{"user": "u7", "conn": "n0.17", "node": "n0"},
                             {"user": "u8", "conn": "n1.4", "node": "n1"}],
                "history": {"epoch": "5f0c1a2b3c4d5e6f", "last_offset": 100, "len": 100, "first_offset": 1},
                "missing": []}"#,
        )
        .unwrap();
        let want = "\
channel room:1
history: epoch 5f0c1a2b3c4d5e6f · last offset 100 · 100 messages (1 to 100 kept)

2 subscribers
CONN   USER  NODE
n0.17  u7    n0
n1.4   u8    n1

presence: 2 users
USER  CONN   NODE
u7    n0.17  n0
u8    n1.4   n1
";
        let got = render(&room);
        assert_eq!(got, want, "got:\n{got}");
        table::assert_fits(&got);
    }

    #[test]
    fn presence_off_and_empty_history_say_so() {
        let room: ChannelDetail =
            serde_json::from_str(r#"{"channel":"news","subscribers":[],"presence":null,"history":{"epoch":"e"}}"#)
                .unwrap();
        let got = render(&room);
        assert!(got.contains("0 messages (none kept)"), "{got}");
        assert!(got.contains("presence: off for this channel"), "{got}");
    }
}
