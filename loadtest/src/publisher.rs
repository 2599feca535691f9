//! The HTTP side of a run: `--publishers` tasks sharing one sequence counter and one client,
//! each POSTing `{"seq":n,"ts":<unix micros>,"pad":"xx.."}` to `/api/publish`, paced to `--rate`.
//! Publish `n` goes to the node and channel of `Load::slot(n)`, with the idempotency key
//! `pushload-<run>-<n>`. A publish the node could not store (503), cannot say it stored (504), or
//! did not answer is retried with that key a few times, as a careful backend would: the key makes
//! every retry store the message at most once. A publish still failing after that is counted.
//!
//! Each task keeps its own latency histogram and offsets, merged once at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use hdrhistogram::Histogram;
use serde::Deserialize;

use crate::cli::Load;
use crate::report::Latency;

/// The shared publisher state: the next sequence number, the pacing clock and one HTTP client.
pub struct Publisher {
    load: Load,
    client: reqwest::Client,
    next_seq: AtomicU64,
    /// Publishes answered 2xx so far, for progress lines.
    pub ok: AtomicU64,
    started: Instant,
    started_us: u64,
    /// Each channel's name as a JSON string.
    channel_json: Vec<String>,
    pad: String,
    /// Makes this run's idempotency keys differ from an earlier run's still in Redis.
    run: u64,
    /// Notified when `ok` reaches the count: the storm's trigger.
    pub milestone: Option<(u64, Arc<tokio::sync::Notify>)>,
}

/// Retries of a publish after its first attempt, with pauses doubling from `FIRST_PAUSE`.
const RETRIES: u32 = 4;
const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// What the publishers achieved, per task or merged.
#[derive(Debug)]
pub struct Published {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Per channel, every offset a publish returned (unsorted).
    pub offsets: Vec<Vec<u64>>,
    pub started: Option<Instant>,
    /// `started` on the clock the payload's `ts` uses.
    pub started_us: Option<u64>,
    /// When the last publish was answered.
    pub finished: Option<Instant>,
    /// Request sent to response read, in microseconds, for every publish answered 2xx.
    pub latency: Histogram<u64>,
}

/// What the offsets returned for one channel say about the publish path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OffsetCheck {
    /// The highest offset returned: where every subscriber of the channel must get to.
    pub max: Option<u64>,
    /// Offsets returned to more than one publish: two messages stored under one offset.
    pub duplicated: u64,
    /// Offsets between the lowest and the highest returned that no publish got: a failed
    /// publish that was stored anyway, or someone else publishing to the channel.
    pub gaps: u64,
}

impl Published {
    fn new(channels: usize, started: Instant, started_us: u64) -> Self {
        Published {
            ok: 0,
            failed: 0,
            first_error: None,
            offsets: vec![Vec::new(); channels],
            started: Some(started),
            started_us: Some(started_us),
            finished: None,
            latency: Latency::histogram(),
        }
    }

    pub fn merge(&mut self, o: Published) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.first_error = self.first_error.take().or(o.first_error);
        if self.offsets.len() < o.offsets.len() {
            self.offsets.resize_with(o.offsets.len(), Vec::new);
        }
        for (mine, theirs) in self.offsets.iter_mut().zip(o.offsets) {
            mine.extend(theirs);
        }
        self.started = self.started.or(o.started);
        self.started_us = self.started_us.or(o.started_us);
        self.finished = self.finished.max(o.finished);
        self.latency.add(&o.latency).expect("same bounds");
    }

    /// First publish sent to last publish answered.
    pub fn seconds(&self) -> f64 {
        match (self.started, self.finished) {
            (Some(start), Some(end)) => end.saturating_duration_since(start).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// The offsets of each channel, checked.
    pub fn check(&self) -> Vec<OffsetCheck> {
        self.offsets.iter().map(|o| check_offsets(o)).collect()
    }
}

fn check_offsets(offsets: &[u64]) -> OffsetCheck {
    let mut sorted = offsets.to_vec();
    sorted.sort_unstable();
    let (Some(&lo), Some(&hi)) = (sorted.first(), sorted.last()) else { return OffsetCheck::default() };
    let before = sorted.len() as u64;
    sorted.dedup();
    let distinct = sorted.len() as u64;
    OffsetCheck { max: Some(hi), duplicated: before - distinct, gaps: hi - lo + 1 - distinct }
}

#[derive(Deserialize)]
struct PublishReply {
    offset: u64,
}

impl Publisher {
    /// Builds the client; the pacing clock starts now.
    pub fn new(load: &Load) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(load.publishers)
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        let channel_json = load.channels.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
        Ok(Self {
            load: load.clone(),
            client,
            next_seq: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            started: Instant::now(),
            started_us: unix_micros(),
            channel_json,
            pad: "x".repeat(load.payload_bytes),
            run: unix_micros(),
            milestone: None,
        })
    }

    /// Makes every task finish after its request in flight.
    pub fn stop(&self) {
        self.next_seq.store(u64::MAX / 2, Ordering::Relaxed);
    }

    /// One publisher task: publishes sequence numbers until none are left, pacing to `--rate`
    /// in total (sequence `n` is due `n / rate` seconds after the start).
    pub async fn run(self: Arc<Self>) -> Published {
        let mut out = Published::new(self.load.channels.len(), self.started, self.started_us);
        loop {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            if seq >= self.load.messages {
                break;
            }
            if let Some(rate) = self.load.rate {
                let at = self.started + Duration::from_secs_f64(seq as f64 / rate as f64);
                tokio::time::sleep_until(at.into()).await;
            }
            let (node, channel) = self.load.slot(seq);
            let sent = Instant::now();
            match self.publish(seq, node, channel).await {
                Ok(offset) => {
                    out.latency.saturating_record((sent.elapsed().as_micros() as u64).max(1));
                    out.ok += 1;
                    let ok = self.ok.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Some((at, reached)) = &self.milestone
                        && ok == *at
                    {
                        reached.notify_one();
                    }
                    out.offsets[channel].push(offset);
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

    /// Publishes `seq`, retrying with its idempotency key while the outcome may be a loss.
    async fn publish(&self, seq: u64, node: usize, channel: usize) -> anyhow::Result<u64> {
        let body = self.body(seq, channel, unix_micros());
        let mut pause = FIRST_PAUSE;
        for _ in 0..RETRIES {
            match self.publish_once(&body, node).await {
                Err(Attempt::Retry(_)) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                done => return done.map_err(Attempt::into_error),
            }
        }
        self.publish_once(&body, node).await.map_err(Attempt::into_error)
    }

    async fn publish_once(&self, body: &str, node: usize) -> Result<u64, Attempt> {
        let url = &self.load.nodes[node].publish_url;
        let mut req = self.client.post(url.clone()).header("content-type", "application/json");
        if let Some(key) = &self.load.api_key {
            req = req.bearer_auth(key);
        }
        let resp =
            req.body(body.to_owned()).send().await.with_context(|| format!("POST {url}")).map_err(Attempt::Retry)?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading the publish response").map_err(Attempt::Retry)?;
        if !status.is_success() {
            let error = anyhow!("POST {url} answered {status}: {}", String::from_utf8_lossy(&bytes).trim());
            return Err(if matches!(status.as_u16(), 503 | 504) {
                Attempt::Retry(error)
            } else {
                Attempt::Fail(error)
            });
        }
        let reply: PublishReply =
            serde_json::from_slice(&bytes).context("malformed publish response").map_err(Attempt::Fail)?;
        Ok(reply.offset)
    }

    /// The request body; `data` is padded to `--payload-bytes` when that is larger than it.
    fn body(&self, seq: u64, channel: usize, ts: u64) -> String {
        let bare = format!(r#"{{"seq":{seq},"ts":{ts},"pad":""}}"#).len();
        let pad = &self.pad[..self.load.payload_bytes.saturating_sub(bare)];
        format!(
            r#"{{"channel":{},"idempotency_key":"pushload-{}-{seq}","data":{{"seq":{seq},"ts":{ts},"pad":"{pad}"}}}}"#,
            self.channel_json[channel], self.run
        )
    }
}

/// How one attempt failed: worth another try with the same key, or not.
enum Attempt {
    Retry(anyhow::Error),
    Fail(anyhow::Error),
}

impl Attempt {
    fn into_error(self) -> anyhow::Error {
        match self {
            Attempt::Retry(e) | Attempt::Fail(e) => e,
        }
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
    use crate::cli::{Cli, Command, Fanout};

    fn publisher(args: &[&str]) -> Publisher {
        let mut all = vec!["pushload", "fanout"];
        all.extend_from_slice(args);
        let Command::Fanout(args) = Cli::parse_from(all).command else { panic!("not fanout") };
        Publisher::new(&Fanout::try_from(args).unwrap().load).unwrap()
    }

    #[test]
    fn data_is_padded_to_the_payload_size() {
        let body = publisher(&["--payload-bytes", "64"]).body(7, 0, 1_700_000_000_000_000);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["channel"], "bench");
        assert_eq!((v["data"]["seq"].as_u64(), v["data"]["ts"].as_u64()), (Some(7), Some(1_700_000_000_000_000)));
        assert_eq!(v["data"].to_string().len(), 64);
    }

    #[test]
    fn small_payloads_are_never_truncated() {
        let body = publisher(&["--payload-bytes", "1"]).body(7, 0, 1);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"]["pad"], "");
    }

    #[test]
    fn bodies_name_their_channel_and_key() {
        let p = publisher(&["--channels", "3"]);
        let v: serde_json::Value = serde_json::from_str(&p.body(1, 2, 1)).unwrap();
        assert_eq!(v["channel"], "bench-2");
        assert_eq!(v["idempotency_key"], format!("pushload-{}-1", p.run));
    }

    #[test]
    fn offsets_are_checked_per_channel() {
        assert_eq!(check_offsets(&[]), OffsetCheck::default());
        assert_eq!(check_offsets(&[12, 10, 11]), OffsetCheck { max: Some(12), duplicated: 0, gaps: 0 });
        assert_eq!(check_offsets(&[5, 9, 5, 7]), OffsetCheck { max: Some(9), duplicated: 1, gaps: 2 });
    }

    #[test]
    fn merged_results_keep_every_offset_and_sample() {
        let t = Instant::now();
        let mut a = Published::new(2, t, 1);
        a.offsets[0].push(1);
        a.latency.record(100).unwrap();
        let mut b = Published::new(2, t, 1);
        b.offsets[0].push(2);
        b.offsets[1].push(1);
        b.latency.record(300).unwrap();
        a.merge(b);
        assert_eq!(a.offsets, [vec![1, 2], vec![1]]);
        assert_eq!(a.latency.len(), 2);
        assert_eq!(a.check()[0].max, Some(2));
    }
}
