//! `pushctl publish <channel> <json>`: POST /admin/publish. The payload is checked here first,
//! so a typo gets a local, precise error instead of a 400. Every publish carries an idempotency
//! key, so the retries after a 503, a 504 (the node cannot say whether Redis stored it) or no
//! answer at all store the message once.

use std::time::Duration;

use anyhow::Context;
use pushd_wire::Coverage;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Outcome, show};
use crate::client::{Client, ClientError};

/// Retries after the first attempt, with pauses doubling from `FIRST_PAUSE`.
const RETRIES: u32 = 3;
const FIRST_PAUSE: Duration = Duration::from_millis(500);

/// The body of POST /admin/publish (the same as /api/publish).
#[derive(Debug, Serialize)]
struct PublishRequest<'a> {
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    /// Sent byte for byte as the operator typed it.
    data: &'a RawValue,
    idempotency_key: &'a str,
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
    idempotency_key: Option<String>,
) -> anyhow::Result<Outcome> {
    let data = parse_data(data)?;
    let key = idempotency_key.unwrap_or_else(fresh_key);
    let request = PublishRequest { channel, event, data, idempotency_key: &key };
    let mut pause = FIRST_PAUSE;
    for _ in 0..RETRIES {
        match client.post::<Published>(&["admin", "publish"], &request, false).await {
            Err(e) if worth_retrying(&e) => {
                eprintln!("pushctl: {e}; retrying with the same idempotency key ({key}), so it is stored once");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            fetched => return show(&fetched?, json, &Coverage::default(), render),
        }
    }
    let fetched = client.post::<Published>(&["admin", "publish"], &request, false).await?;
    show(&fetched, json, &Coverage::default(), render)
}

/// A key no other publish has: this process and the time, to the nanosecond.
fn fresh_key() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("pushctl-{}-{nanos}", std::process::id())
}

/// Failures after which the message may be missing: not stored (503), maybe stored (504), or
/// no answer at all. With the key, a retry is safe in every case.
fn worth_retrying(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Server { status: 503 | 504, .. } | ClientError::Timeout { .. } | ClientError::Transport { .. }
    )
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
    fn failures_that_may_have_lost_the_message_are_retried_others_are_not() {
        let server = |status| ClientError::Server { status, code: "x".into(), message: "y".into() };
        assert!(worth_retrying(&server(503)));
        assert!(worth_retrying(&server(504)));
        assert!(worth_retrying(&ClientError::Timeout { server: "s".into(), secs: 3 }));
        assert!(!worth_retrying(&server(400)));
        assert!(!worth_retrying(&ClientError::Unauthorized { message: "wrong admin key".into() }));
        let key = fresh_key();
        assert!(key.len() <= 128 && key.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c)), "{key}");
    }

    #[test]
    fn publish_line_snapshot() {
        let p = Published { channel: "room:lobby".into(), epoch: "a6fc7893c22be777".into(), offset: 1 };
        assert_eq!(render(&p), "published to room:lobby at offset 1 (epoch a6fc7893c22be777)");
    }
}
