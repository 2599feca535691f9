//! The HTTP side of a run: `--publishers` tasks sharing one sequence counter and one client,
//! each POSTing `{"seq":n,"ts":<unix micros>,"pad":"xx.."}` to `/api/publish`, paced to `--rate`.
//! A failed publish is counted, never retried: the node said it did not store it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::cli::Fanout;

/// The shared publisher state: the next sequence number, the pacing clock and one HTTP client.
pub struct Publisher {
    plan: Fanout,
    client: reqwest::Client,
    next_seq: AtomicU64,
    /// Publishes answered 2xx so far, for progress lines.
    pub ok: AtomicU64,
    started: Instant,
    started_us: u64,
    channel_json: String,
    pad: String,
}

/// What the publishers achieved, per task or merged.
#[derive(Debug, Default)]
pub struct Published {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// The highest offset a publish returned: where every subscriber must get to.
    pub max_offset: Option<u64>,
    pub started: Option<Instant>,
    /// `started` on the clock the payload's `ts` uses.
    pub started_us: Option<u64>,
    /// When the last publish was answered.
    pub finished: Option<Instant>,
}

impl Published {
    pub fn merge(&mut self, o: Published) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.first_error = self.first_error.take().or(o.first_error);
        self.max_offset = self.max_offset.max(o.max_offset);
        self.started = self.started.or(o.started);
        self.started_us = self.started_us.or(o.started_us);
        self.finished = self.finished.max(o.finished);
    }

    /// First publish sent to last publish answered.
    pub fn seconds(&self) -> f64 {
        match (self.started, self.finished) {
            (Some(start), Some(end)) => end.saturating_duration_since(start).as_secs_f64(),
            _ => 0.0,
        }
    }
}

#[derive(Deserialize)]
struct PublishReply {
    offset: u64,
}

impl Publisher {
    /// Builds the client; the pacing clock starts now.
    pub fn new(plan: &Fanout) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(plan.publishers)
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            plan: plan.clone(),
            client,
            next_seq: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            started: Instant::now(),
            started_us: unix_micros(),
            channel_json: serde_json::to_string(&plan.channel)?,
            pad: "x".repeat(plan.payload_bytes),
        })
    }

    /// Makes every task finish after its request in flight.
    pub fn stop(&self) {
        self.next_seq.store(u64::MAX / 2, Ordering::Relaxed);
    }

    /// One publisher task: publishes sequence numbers until none are left, pacing to `--rate`
    /// in total (sequence `n` is due `n / rate` seconds after the start).
    pub async fn run(self: Arc<Self>) -> Published {
        let mut out =
            Published { started: Some(self.started), started_us: Some(self.started_us), ..Default::default() };
        loop {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            if seq >= self.plan.messages {
                break;
            }
            if let Some(rate) = self.plan.rate {
                let at = self.started + Duration::from_secs_f64(seq as f64 / rate as f64);
                tokio::time::sleep_until(at.into()).await;
            }
            match self.publish(seq).await {
                Ok(offset) => {
                    out.ok += 1;
                    self.ok.fetch_add(1, Ordering::Relaxed);
                    out.max_offset = out.max_offset.max(Some(offset));
                }
                Err(e) => {
                    out.failed += 1;
                    out.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
            out.finished = Some(Instant::now());
        }
        out
    }

    async fn publish(&self, seq: u64) -> anyhow::Result<u64> {
        let body = self.body(seq, unix_micros());
        let mut req = self.client.post(self.plan.publish_url.clone()).header("content-type", "application/json");
        if let Some(key) = &self.plan.api_key {
            req = req.bearer_auth(key);
        }
        let resp = req.body(body).send().await.context("POST /api/publish")?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading the publish response")?;
        if !status.is_success() {
            bail!("POST /api/publish answered {status}: {}", String::from_utf8_lossy(&bytes).trim());
        }
        let reply: PublishReply = serde_json::from_slice(&bytes).context("malformed publish response")?;
        Ok(reply.offset)
    }

    /// The request body; `data` is padded to `--payload-bytes` when that is larger than it.
    fn body(&self, seq: u64, ts: u64) -> String {
        let bare = format!(r#"{{"seq":{seq},"ts":{ts},"pad":""}}"#).len();
        let pad = &self.pad[..self.plan.payload_bytes.saturating_sub(bare)];
        format!(r#"{{"channel":{},"data":{{"seq":{seq},"ts":{ts},"pad":"{pad}"}}}}"#, self.channel_json)
    }
}

/// Microseconds since the Unix epoch: the clock of the payload's `ts`, which subscribers on
/// this machine compare against.
pub fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn publisher(payload_bytes: &str) -> Publisher {
        let Command::Fanout(args) = Cli::parse_from(["pushload", "fanout", "--payload-bytes", payload_bytes]).command;
        Publisher::new(&Fanout::try_from(args).unwrap()).unwrap()
    }

    #[test]
    fn data_is_padded_to_the_payload_size() {
        let body = publisher("64").body(7, 1_700_000_000_000_000);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["channel"], "bench");
        assert_eq!((v["data"]["seq"].as_u64(), v["data"]["ts"].as_u64()), (Some(7), Some(1_700_000_000_000_000)));
        assert_eq!(v["data"].to_string().len(), 64);
    }

    #[test]
    fn small_payloads_are_never_truncated() {
        let body = publisher("1").body(7, 1);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"]["pad"], "");
    }
}
