//! `pushctl publish <channel> <json>`: POST /admin/publish. The payload is checked here first,
//! so a typo gets a local, precise error instead of a 400.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Outcome, show};
use crate::client::Client;

/// The body of POST /admin/publish (the same as /api/publish).
#[derive(Debug, Serialize)]
struct PublishRequest<'a> {
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    /// Sent byte for byte as the operator typed it.
    data: &'a RawValue,
}

/// The answer: the message's position.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Published {
    pub channel: String,
    pub epoch: String,
    pub offset: u64,
}

pub async fn run(
    client: &Client,
    json: bool,
    channel: &str,
    data: &str,
    event: Option<String>,
) -> anyhow::Result<Outcome> {
    let data = parse_data(data)?;
    let request = PublishRequest { channel, event, data };
    let fetched = client.post::<Published>(&["admin", "publish"], &request, false).await?;
    show(&fetched, json, &[], render)
}

/// Checks that `text` is one JSON value, with a hint for the usual shell-quoting mistakes.
fn parse_data(text: &str) -> anyhow::Result<&RawValue> {
    serde_json::from_str::<&RawValue>(text.trim()).with_context(|| {
        format!(
            "the message {text:?} is not valid JSON: quote strings ('\"hello\"'), \
             and wrap objects in single quotes ('{{\"text\":\"hi\"}}')"
        )
    })
}

pub fn render(p: &Published) -> String {
    format!("published to {} at offset {} (epoch {})", p.channel, p.offset, p.epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_checked_locally_and_sent_verbatim() {
        assert_eq!(parse_data(r#" {"z":1,"a":1.10} "#).unwrap().get(), r#"{"z":1,"a":1.10}"#);
        assert_eq!(parse_data("42").unwrap().get(), "42");
        let err = format!("{:#}", parse_data("hello").unwrap_err());
        assert!(err.starts_with(r#"the message "hello" is not valid JSON: quote strings"#), "{err}");
        assert!(err.contains("expected value at line 1 column 1"), "{err}");
        assert!(parse_data(r#"{"a":1} {"b":2}"#).is_err());
    }

    #[test]
    fn publish_line_snapshot() {
        let p = Published { channel: "room:lobby".into(), epoch: "a6fc7893c22be777".into(), offset: 1 };
        assert_eq!(render(&p), "published to room:lobby at offset 1 (epoch a6fc7893c22be777)");
    }
}
