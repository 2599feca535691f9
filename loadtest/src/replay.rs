//! Replay cost: how long a subscriber that missed `--messages` messages waits from sending its
//! `subscribe` with `since` to holding the last of them. Publishes the messages over
//! /api/publish first, then times `--rounds` fresh connections, each replaying the same range,
//! and checks every replay is complete and in order.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::ReplayArgs;
use crate::report::{Text, Verdict, json};

/// How long one replay may take before the run gives up on it.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize)]
pub struct ReplayReport {
    pub url: String,
    pub messages: u64,
    pub payload_bytes: usize,
    pub rounds: usize,
    /// Each round's time from sending `subscribe` to the last replayed message, in ms.
    pub millis: Vec<f64>,
    pub p50_ms: f64,
    pub max_ms: f64,
    pub failures: Vec<String>,
}

#[derive(Deserialize)]
struct Published {
    epoch: String,
    offset: u64,
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    offset: Option<u64>,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<ReplayReport> {
    if args.messages == 0 || args.rounds == 0 {
        bail!("--messages and --rounds must be at least 1");
    }
    let url = args.url.trim_end_matches('/').to_owned();
    let channel = format!("{}-{}", args.channel, std::process::id());
    let (epoch, top) = publish(&args, &url, &channel).await?;
    let since = top - args.messages;
    let ws_url = format!("{}/ws", url.replacen("http", "ws", 1));
    let mut millis = Vec::new();
    let mut failures = Vec::new();
    for round in 0..args.rounds {
        match tokio::time::timeout(REPLAY_TIMEOUT, replay_once(&ws_url, round, &channel, &epoch, since, top)).await {
            Ok(Ok(ms)) => millis.push(ms),
            Ok(Err(e)) => failures.push(format!("round {round}: {e:#}")),
            Err(_) => failures.push(format!("round {round}: no complete replay within {}s", REPLAY_TIMEOUT.as_secs())),
        }
    }
    let mut sorted = millis.clone();
    sorted.sort_by(f64::total_cmp);
    let p50_ms = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let max_ms = sorted.last().copied().unwrap_or(0.0);
    let (messages, payload_bytes, rounds) = (args.messages, args.payload_bytes, args.rounds);
    Ok(ReplayReport { url, messages, payload_bytes, rounds, millis, p50_ms, max_ms, failures })
}

/// Publishes the messages to be missed, one after another; returns the channel's position.
async fn publish(args: &ReplayArgs, url: &str, channel: &str) -> anyhow::Result<(String, u64)> {
    let client = reqwest::Client::new();
    let pad = "x".repeat(args.payload_bytes.saturating_sub(20));
    let mut last = None;
    for n in 0..args.messages {
        let body = serde_json::json!({ "channel": channel, "data": { "n": n, "pad": pad } });
        let mut req = client.post(format!("{url}/api/publish")).json(&body);
        if let Some(key) = &args.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.context("publishing")?;
        if !resp.status().is_success() {
            bail!("publish answered {}: {}", resp.status(), resp.text().await.unwrap_or_default());
        }
        last = Some(resp.json::<Published>().await.context("reading the publish answer")?);
    }
    let last = last.expect("at least one message");
    Ok((last.epoch, last.offset))
}

/// One fresh connection replaying `since+1..=top`; returns the milliseconds it took.
async fn replay_once(
    ws_url: &str,
    round: usize,
    channel: &str,
    epoch: &str,
    since: u64,
    top: u64,
) -> anyhow::Result<f64> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{ws_url}?user=replay-{round}")).await.context("connecting")?;
    next_json::<Frame, _>(&mut ws).await?;
    let cmd = serde_json::json!({ "id": 1, "op": "subscribe", "channel": channel, "since": { "epoch": epoch, "offset": since } });
    let started = Instant::now();
    ws.send(Message::text(cmd.to_string())).await.context("sending subscribe")?;
    let mut next = since + 1;
    while next <= top {
        let frame = next_json::<Frame, _>(&mut ws).await?;
        match (frame.kind.as_str(), frame.offset) {
            ("message", Some(offset)) if offset == next => next += 1,
            ("message", offset) => bail!("expected offset {next}, got {offset:?}"),
            ("reply", _) => {}
            (kind, _) => bail!("unexpected {kind} frame during the replay"),
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

impl Verdict for ReplayReport {
    fn failures(&self) -> Vec<String> {
        self.failures.clone()
    }

    fn render(&self) -> String {
        let mut r = Text::default();
        r.head("replay on resubscribe");
        r.row("node", self.url.clone());
        r.row("missed", format!("{} messages of {} bytes", self.messages, self.payload_bytes));
        r.row("rounds", format!("{} fresh connections", self.rounds));
        r.row("subscribe to last message", format!("p50 {:.2} ms, max {:.2} ms", self.p50_ms, self.max_ms));
        for f in &self.failures {
            r.row("failed", format!("{f}  <-- FAIL"));
        }
        r.into_string()
    }

    fn to_json(&self) -> String {
        json(self, self.failures.clone())
    }
}

/// The next text frame, parsed as `T`; a close or an error is an error.
async fn next_json<T, S>(ws: &mut WebSocketStream<S>) -> anyhow::Result<T>
where
    T: serde::de::DeserializeOwned,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).context("malformed frame"),
            Some(Ok(Message::Close(frame))) => bail!("server closed the socket: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading from the socket"),
            None => bail!("server closed the connection"),
        }
    }
}
