//! One module per subcommand, each mirroring one /admin/* route: fetch, then render. The admin
//! answers decode into `pushd_wire` types, the ones the server writes. This file dispatches,
//! writes to stdout, and re-indents the server's JSON for `--json`.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use pushd_wire::Coverage;

use crate::cli::Command;
use crate::client::{Client, Fetched};

mod connections;
mod history;
mod kick;
mod nodes;
mod publish;
mod room;
mod rooms;
mod stats;
mod unban;

/// How a command went, when it did not fail.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every node answered.
    Complete,
    /// The printed answer leaves nodes out: those that did not answer in time, or every other
    /// node when the one asked could not read the registry.
    Partial(Coverage),
}

impl Outcome {
    /// `Partial` when `coverage` leaves any node out.
    pub fn of(coverage: &Coverage) -> Self {
        if coverage.is_partial() { Outcome::Partial(coverage.clone()) } else { Outcome::Complete }
    }
}

/// Runs `command` against the cluster behind `client`; `json` prints the server's answers.
pub async fn run(client: &Client, command: Command, json: bool) -> anyhow::Result<Outcome> {
    match command {
        Command::Stats { watch: None } => stats::once(client, json).await,
        Command::Stats { watch: Some(every) } => stats::watch(client, json, every).await,
        Command::Nodes => nodes::run(client, json).await,
        Command::Connections { node, user, channel, limit } => {
            connections::run(client, json, connections::Filter { node, user, channel, limit }).await
        }
        Command::Rooms { pattern, sort, limit } => rooms::run(client, json, pattern, sort, limit).await,
        Command::Room { channel } => room::run(client, json, &channel).await,
        Command::History { channel, since, limit } => history::run(client, json, &channel, since, limit).await,
        Command::Publish { channel, data, event, idempotency_key } => {
            publish::run(client, json, &channel, &data, event, idempotency_key).await
        }
        Command::Kick { conns, user, reason, ban } => {
            let target = match user {
                Some(user) => kick::Target::User { user, ban_s: ban },
                None => kick::Target::Conns(conns),
            };
            kick::run(client, json, target, reason).await
        }
        Command::Unban { user } => unban::run(client, json, &user).await,
    }
}

/// The line printed on stderr for a partial answer.
pub fn partial_warning(coverage: &Coverage, waited_ms: u64) -> String {
    if let Some(why) = &coverage.others_unknown {
        return format!(
            "warning: partial answer: the node asked answered for itself only ({why}); \
             check its Redis, or ask another node with --server"
        );
    }
    let missing = &coverage.missing;
    format!(
        "warning: partial answer: no reply from {} within {waited_ms} ms; the answer above leaves {} out \
         (raise --timeout, or check {})",
        missing.join(", "),
        if missing.len() == 1 { "it" } else { "them" },
        if missing.len() == 1 { "that node" } else { "those nodes" },
    )
}

/// Prints the server's JSON (re-indented) or `render(body)`; the outcome follows `coverage`.
fn show<T>(
    fetched: &Fetched<T>,
    json: bool,
    coverage: &Coverage,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<Outcome> {
    if json {
        print(&pretty_json(&fetched.raw))?
    } else {
        print(&render(&fetched.body))?
    }
    Ok(Outcome::of(coverage))
}

/// Writes `text` and a final newline to stdout. A closed pipe comes back as an `io::Error` of
/// kind `BrokenPipe`, which `main` treats as success.
pub fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Milliseconds since the Unix epoch, for "ago" columns.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Re-indents valid JSON text with two spaces, keeping key order and number spelling exactly
/// (a round trip through `serde_json::Value` would sort keys and round big integers).
pub fn pretty_json(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = raw.trim().chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    while let Some(ch) = chars.next() {
        if in_string {
            out.push(ch);
            match (escaped, ch) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match ch {
            '"' => {
                in_string = true;
                out.push(ch);
            }
            '{' | '[' => {
                out.push(ch);
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    out.push(chars.next().unwrap_or_default());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(ch);
            }
            ',' => {
                out.push(ch);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_json_keeps_order_numbers_and_strings() {
        let raw = r#"{"z":1,"a":{"id":12345678901234567890123,"price":1.10},"s":"a, b: {\"c\"}","e":[],"o":{ }}"#;
        let want = r#"{
  "z": 1,
  "a": {
    "id": 12345678901234567890123,
    "price": 1.10
  },
  "s": "a, b: {\"c\"}",
  "e": [],
  "o": {}
}"#;
        assert_eq!(pretty_json(raw), want);
        let round: serde_json::Value = serde_json::from_str(&pretty_json(raw)).unwrap();
        assert_eq!(round, serde_json::from_str::<serde_json::Value>(raw).unwrap());
    }

    #[test]
    fn partial_warning_names_the_missing_nodes() {
        let w = partial_warning(&Coverage::missing(vec!["n1".into(), "n2".into()]), 2500);
        assert!(w.starts_with("warning: partial answer: no reply from n1, n2 within 2500 ms"), "{w}");
        assert_eq!(Outcome::of(&Coverage::default()), Outcome::Complete);
    }

    #[test]
    fn partial_warning_says_when_the_other_nodes_are_unknown() {
        let coverage = Coverage { missing: vec![], others_unknown: Some("other nodes unknown: redis down".into()) };
        let w = partial_warning(&coverage, 2500);
        assert!(w.contains("answered for itself only (other nodes unknown: redis down)"), "{w}");
        assert_eq!(Outcome::of(&coverage), Outcome::Partial(coverage));
    }
}
