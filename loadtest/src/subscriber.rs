//! The WebSocket side of a run: one task per subscriber that joins (connect, welcome,
//! subscribe), feeds every delivered offset to its `Checker`, and rejoins with `since` when the
//! server closes it with a reconnect code. Subscriber `n` joins the node and channel of
//! `Load::slot(n)`, and rejoins the same node.
//!
//! pushload shares the machine with the node it measures, so the per-message path is small:
//! frames are parsed into a borrowed struct, `ts` is read only from fresh messages, latencies go
//! to a per-task buffer merged into one of a few shared histograms every `LATENCY_BATCH`
//! messages, and nothing shared is touched per message.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::checker::{Checker, Seen};
use crate::cli::{Fanout, Node};
use crate::publisher::unix_micros;
use crate::rawws::{Frame as WsFrame, OpenError, RawWs};
use crate::report::Latency;

/// Latency samples a task buffers before merging them into its shard.
const LATENCY_BATCH: usize = 256;
/// Deliveries a task counts before adding them to the shared progress counter.
const PROGRESS_BATCH: u64 = 32;
/// Histogram shards; tasks pick one by index, so merges rarely contend.
const SHARDS: usize = 16;
/// How long connect + welcome + subscribe may take for one subscriber.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Failed rejoins in a row before a subscriber gives up.
const MAX_REJOINS: u32 = 5;
/// Close codes after which a client must not reconnect (DESIGN.md close-code table).
const FINAL_CLOSES: [u16; 4] = [4001, 4003, 4009, 4011];

type Ws = RawWs;

/// What every subscriber watches: the last published offset of each channel once known (`None`
/// for a channel nothing was published to), and the stop signal.
#[derive(Debug, Clone, Default)]
pub struct Goal {
    pub targets: Option<Arc<[Option<u64>]>>,
    pub stop: bool,
    /// Set once: drop the socket and reconnect now (a reconnect storm).
    pub storm: bool,
}

/// State shared by all subscriber tasks; touched per batch or per event, never per message.
pub struct Shared {
    plan: Fanout,
    gate: Semaphore,
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Deliveries so far (approximate: tasks report in batches), for progress lines.
    pub delivered: AtomicU64,
    /// Subscribers that reached the target or gave up.
    pub settled: AtomicUsize,
    /// Notified once, when the last subscriber settles.
    pub all_settled: Notify,
    /// When the reconnect storm began, if it did.
    pub storm_started: std::sync::OnceLock<std::time::Instant>,
}

impl Shared {
    pub fn new(plan: &Fanout) -> Self {
        Self {
            plan: plan.clone(),
            gate: Semaphore::new(plan.connect_concurrency),
            latency: (0..SHARDS).map(|_| Mutex::new(Latency::histogram())).collect(),
            delivered: AtomicU64::new(0),
            settled: AtomicUsize::new(0),
            all_settled: Notify::new(),
            storm_started: std::sync::OnceLock::new(),
        }
    }

    /// Every latency sample recorded so far, merged.
    pub fn latency(&self) -> Latency {
        let mut all = Latency::histogram();
        for shard in &self.latency {
            all.add(&*shard.lock().unwrap_or_else(|p| p.into_inner())).expect("same bounds");
        }
        Latency::from(&all)
    }

    fn settle(&self) {
        if self.settled.fetch_add(1, Ordering::AcqRel) + 1 == self.plan.subscribers {
            self.all_settled.notify_one();
        }
    }
}

/// One subscriber's results, returned when the run stops.
#[derive(Debug)]
pub struct Outcome {
    /// Index of the node (`--url`) and of the channel this subscriber joined.
    pub node: usize,
    pub channel: usize,
    pub checker: Checker,
    /// Close codes the server (or the network, 1006) ended this subscriber's sockets with.
    pub closes: Vec<(u16, String)>,
    pub rejoins: u64,
    pub unrecovered: u64,
    pub resets: u64,
    /// When this subscriber last received a new (not duplicate) message, in unix micros.
    pub last_delivery: Option<u64>,
    /// The last error a rejoin ran into.
    pub error: Option<String>,
    /// When this subscriber was back after the storm (resubscribed with its position).
    pub back_after_storm: Option<std::time::Instant>,
}

/// One subscriber task. Reports its first join on `ready` (an `Err` ends the task), then reads
/// until `goal.stop`. `None` if it never joined.
pub async fn run(
    n: usize,
    shared: Arc<Shared>,
    mut goal: watch::Receiver<Goal>,
    ready: mpsc::Sender<anyhow::Result<()>>,
) -> Option<Outcome> {
    let (mut ws, reply) = match join(&shared, n, None).await {
        Ok(joined) => joined,
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return None;
        }
    };
    let _ = ready.send(Ok(())).await;
    drop(ready);
    let epoch = reply.epoch.unwrap_or_default();
    let (node, channel) = shared.plan.load.slot(n as u64);
    let mut sub = Subscriber::new(n, channel, shared.clone(), Checker::new(reply.offset.unwrap_or(0)));
    let (mut closes, mut rejoins, mut unrecovered, mut error) = (Vec::new(), 0, 0, None);
    let mut back_after_storm = None;
    loop {
        let (code, stormed) = match sub.read(&mut ws, &mut goal).await {
            Ended::Stop => {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close()).await;
                break;
            }
            Ended::Closed(code, reason) => {
                closes.push((code, reason));
                (code, false)
            }
            // Dropped without a close handshake, as when a balancer drops every connection.
            Ended::Storm => (1006, true),
        };
        drop(ws);
        let rejoined = if stormed || (shared.plan.reconnect && !FINAL_CLOSES.contains(&code)) {
            tokio::select! {
                r = rejoin(&shared, n, &epoch, sub.checker.last()) => r,
                _ = goal.wait_for(|g| g.stop) => Err(None),
            }
        } else {
            Err(None)
        };
        match rejoined {
            Ok((next, reply)) => {
                ws = next;
                rejoins += 1;
                unrecovered += u64::from(reply.recovered == Some(false));
                if stormed {
                    back_after_storm = Some(std::time::Instant::now());
                }
            }
            Err(e) => {
                error = e.or(error);
                sub.give_up();
                let _ = goal.wait_for(|g| g.stop).await;
                break;
            }
        }
    }
    sub.latency.flush(&shared);
    shared.delivered.fetch_add(sub.unreported, Ordering::Relaxed);
    let (checker, resets, last_delivery) = (sub.checker, sub.resets, sub.last_delivery);
    Some(Outcome {
        node,
        channel,
        checker,
        closes,
        rejoins,
        unrecovered,
        resets,
        last_delivery,
        error,
        back_after_storm,
    })
}

/// Reconnects and resubscribes from `last`, with backoff; the last error after `MAX_REJOINS`
/// failed attempts.
async fn rejoin(shared: &Shared, n: usize, epoch: &str, last: u64) -> Result<(Ws, Reply), Option<String>> {
    let mut error = None;
    for attempt in 0..MAX_REJOINS {
        tokio::time::sleep(Duration::from_millis((100 << attempt) + (n % 100) as u64)).await;
        match join(shared, n, Some((epoch, last))).await {
            Ok(joined) => return Ok(joined),
            Err(e) => error = Some(format!("{e:#}")),
        }
    }
    Err(error)
}

/// A message frame, borrowed from the text it was parsed from; other fields are skipped.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    offset: Option<u64>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// The offset and the payload's `ts` of a message frame exactly as pushd writes one of
/// pushload's payloads (`{"type":"message","channel":"..","offset":N,"data":{"seq":N,"ts":T,..`),
/// read without a JSON parse: on a machine shared with the broker, parsing every frame (most of
/// it skipping the padding) was a quarter of pushload's CPU. Any other shape (an event name, an
/// escape in the channel name, another field order) is `None`, and is parsed.
fn scan_message(text: &[u8]) -> Option<(u64, u64)> {
    let rest = text.strip_prefix(br#"{"type":"message","channel":""#)?;
    let quote = rest.iter().position(|&b| b == b'"')?;
    if rest[..quote].contains(&b'\\') {
        return None;
    }
    let (offset, rest) = leading_number(rest[quote..].strip_prefix(br#"","offset":"#)?)?;
    let (_seq, rest) = leading_number(rest.strip_prefix(br#","data":{"seq":"#)?)?;
    let (ts, rest) = leading_number(rest.strip_prefix(br#","ts":"#)?)?;
    matches!(rest.first(), Some(b',' | b'}')).then_some((offset, ts))
}

/// The decimal number `text` starts with, and what follows it; `None` without digits or past
/// `u64`. Three of these run per delivered message: one pass, overflow checked only from the
/// 20th digit (19 always fit).
fn leading_number(text: &[u8]) -> Option<(u64, &[u8])> {
    let mut n = 0u64;
    let mut digits = 0;
    while let Some(&d @ b'0'..=b'9') = text.get(digits) {
        let d = u64::from(d - b'0');
        n = if digits < 19 { n * 10 + d } else { n.checked_mul(10)?.checked_add(d)? };
        digits += 1;
    }
    (digits > 0).then_some((n, &text[digits..]))
}

/// The one field of pushload's payload a subscriber needs; read only for fresh messages.
#[derive(Deserialize)]
struct Stamp {
    ts: u64,
}

/// A welcome or subscribe reply; parsed once per join, so it may own its strings.
#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "type")]
    kind: String,
    ok: Option<bool>,
    epoch: Option<String>,
    offset: Option<u64>,
    recovered: Option<bool>,
    error: Option<serde_json::Value>,
}

/// Why a read loop ended.
enum Ended {
    Stop,
    Closed(u16, String),
    /// The storm: drop the socket and come back.
    Storm,
}

/// The per-message state of one subscriber.
struct Subscriber {
    checker: Checker,
    latency: LatencyBuf,
    /// This subscriber's channel index.
    channel: usize,
    /// `None` until the targets are announced; then the channel's last offset, `None` if
    /// nothing was published to it.
    target: Option<Option<u64>>,
    settled: bool,
    shared: Arc<Shared>,
    /// Deliveries not yet added to the shared progress counter.
    unreported: u64,
    resets: u64,
    last_delivery: Option<u64>,
    stormed: bool,
}

impl Subscriber {
    fn new(n: usize, channel: usize, shared: Arc<Shared>, checker: Checker) -> Self {
        let latency = LatencyBuf { shard: n % SHARDS, samples: Vec::new() };
        let (target, settled, unreported, resets, last_delivery) = (None, false, 0, 0, None);
        Self { checker, latency, channel, target, settled, shared, unreported, resets, last_delivery, stormed: false }
    }

    /// Reads frames until the run stops or the socket closes. The `changed` future lives across
    /// messages, so waiting for the goal costs nothing per message.
    async fn read(&mut self, ws: &mut Ws, goal: &mut watch::Receiver<Goal>) -> Ended {
        let mut open = true;
        loop {
            // Also catches a change a rejoin consumed while this loop was not running.
            let (stop, target, storm) = {
                let g = goal.borrow_and_update();
                (g.stop, g.targets.as_ref().map(|t| t[self.channel]), g.storm)
            };
            if stop || !open {
                return Ended::Stop;
            }
            if storm && !self.stormed {
                self.stormed = true;
                return Ended::Storm;
            }
            self.target = target;
            self.check_settled();
            let changed = goal.changed();
            tokio::pin!(changed);
            open = loop {
                if let Some(end) = self.take_frames(ws).await {
                    return end;
                }
                tokio::select! {
                    biased;
                    r = &mut changed => break r.is_ok(),
                    read = ws.fill() => match read {
                        Ok(0) => return Ended::Closed(1006, "connection closed without a close frame".into()),
                        Ok(_) => {}
                        Err(e) => return Ended::Closed(1006, e.to_string()),
                    },
                }
            };
        }
    }

    /// Handles every whole frame in `ws`'s buffer (answering pings); `Some` when one ends the
    /// connection.
    async fn take_frames(&mut self, ws: &mut Ws) -> Option<Ended> {
        // The frames of one read arrived together: one clock read for all of them.
        let now = unix_micros();
        loop {
            let ping = match ws.frame() {
                Ok(None) => return None,
                Ok(Some(WsFrame::Text(text))) => {
                    self.on_frame(text, now);
                    continue;
                }
                Ok(Some(WsFrame::Close(code, reason))) => return Some(Ended::Closed(code, reason)),
                Ok(Some(WsFrame::Ping(payload))) => payload,
                Ok(Some(WsFrame::Other)) => continue,
                Err(e) => return Some(Ended::Closed(1006, e.to_string())),
            };
            if let Err(e) = ws.send(0xA, &ping).await {
                return Some(Ended::Closed(1006, e.to_string()));
            }
        }
    }

    /// One text frame, received at `now` (unix micros).
    fn on_frame(&mut self, text: &[u8], now: u64) {
        if let Some((offset, ts)) = scan_message(text) {
            return self.on_delivery(offset, now, || Some(ts));
        }
        let Ok(frame) = serde_json::from_slice::<Frame>(text) else { return };
        match (frame.kind, frame.offset) {
            ("message", Some(offset)) => self.on_delivery(offset, now, || {
                frame.data.and_then(|d| serde_json::from_str::<Stamp>(d.get()).ok()).map(|s| s.ts)
            }),
            ("reset", _) => self.resets += 1,
            _ => {}
        }
    }

    /// A message at `offset`, received at `now`; `ts` (its publish time) is read only if it is
    /// not a duplicate.
    fn on_delivery(&mut self, offset: u64, now: u64, ts: impl FnOnce() -> Option<u64>) {
        if self.checker.record(offset) == Seen::Duplicate {
            return;
        }
        self.last_delivery = Some(now);
        if let Some(ts) = ts() {
            self.latency.record(now.saturating_sub(ts), &self.shared);
        }
        self.unreported += 1;
        if self.unreported == PROGRESS_BATCH {
            self.shared.delivered.fetch_add(self.unreported, Ordering::Relaxed);
            self.unreported = 0;
        }
        self.check_settled();
    }

    fn check_settled(&mut self) {
        let reached = match self.target {
            Some(Some(t)) => self.checker.reached(t),
            Some(None) => true,
            None => false,
        };
        if !self.settled && reached {
            self.settled = true;
            self.shared.settle();
        }
    }

    /// This subscriber will receive nothing more; stop waiting for it.
    fn give_up(&mut self) {
        if !self.settled {
            self.settled = true;
            self.shared.settle();
        }
    }
}

/// Latency samples of one task, merged into a shared shard in batches.
struct LatencyBuf {
    shard: usize,
    samples: Vec<u32>,
}

impl LatencyBuf {
    fn record(&mut self, micros: u64, shared: &Shared) {
        if self.samples.capacity() == 0 {
            self.samples.reserve_exact(LATENCY_BATCH);
        }
        self.samples.push(micros.min(u64::from(u32::MAX)) as u32);
        if self.samples.len() == LATENCY_BATCH {
            self.flush(shared);
        }
    }

    fn flush(&mut self, shared: &Shared) {
        if self.samples.is_empty() {
            return;
        }
        let mut h = shared.latency[self.shard].lock().unwrap_or_else(|p| p.into_inner());
        for &s in &self.samples {
            h.saturating_record(u64::from(s).max(1));
        }
        self.samples.clear();
    }
}

/// Opens one WebSocket, waits for the welcome, subscribes (from `since` if given) and returns
/// the socket with the subscribe reply. Holds a connect-gate permit throughout.
async fn join(shared: &Shared, n: usize, since: Option<(&str, u64)>) -> anyhow::Result<(Ws, Reply)> {
    let _permit = shared.gate.acquire().await.context("connect gate closed")?;
    let (node, channel) = shared.plan.load.slot(n as u64);
    let (node, channel) = (&shared.plan.load.nodes[node], &shared.plan.load.channels[channel]);
    tokio::time::timeout(JOIN_TIMEOUT, join_now(&shared.plan, node, channel, n, since))
        .await
        .map_err(|_| anyhow!("{}: no welcome or subscribe reply within {}s", node.origin, JOIN_TIMEOUT.as_secs()))?
}

async fn join_now(
    plan: &Fanout,
    node: &Node,
    channel: &str,
    n: usize,
    since: Option<(&str, u64)>,
) -> anyhow::Result<(Ws, Reply)> {
    let stream = TcpStream::connect(&node.authority).await.map_err(|e| io_error(e, &node.authority))?;
    stream.set_nodelay(true)?;
    let query = match &plan.token {
        Some(token) => format!("token={token}"),
        None => format!("user=load-{n}"),
    };
    let path = format!("{}?{query}", node.ws_url.path());
    let mask = (n as u32).wrapping_mul(2_654_435_761).to_be_bytes();
    let mut ws = RawWs::open(stream, &node.authority, &path, plan.load.payload_bytes + 64 * 1024, mask)
        .await
        .map_err(|e| open_error(e, &node.authority))?;
    let welcome = next_reply(&mut ws).await.context("waiting for the welcome frame")?;
    if welcome.kind != "welcome" {
        bail!("expected a welcome frame first, got type {:?}", welcome.kind);
    }
    let mut cmd = serde_json::json!({"id": 1, "op": "subscribe", "channel": channel});
    if let Some((epoch, offset)) = since {
        cmd["since"] = serde_json::json!({"epoch": epoch, "offset": offset});
    }
    ws.send_text(&cmd.to_string()).await.context("sending subscribe")?;
    let reply = next_reply(&mut ws).await.context("waiting for the subscribe reply")?;
    match (reply.kind.as_str(), reply.ok) {
        ("reply", Some(true)) if reply.offset.is_some() => Ok((ws, reply)),
        ("reply", _) => bail!("subscribe to {channel:?} refused: {}", reply.error.unwrap_or_default()),
        (kind, _) => bail!("expected the subscribe reply, got a {kind:?} frame first"),
    }
}

/// The next text frame, parsed as a reply; pings are answered, a close or an error is an error.
async fn next_reply(ws: &mut Ws) -> anyhow::Result<Reply> {
    loop {
        let ping = match ws.frame().context("reading from the socket")? {
            Some(WsFrame::Text(text)) => return serde_json::from_slice(text).context("malformed frame"),
            Some(WsFrame::Close(code, reason)) => bail!("server closed the socket: {code} {reason}"),
            Some(WsFrame::Ping(payload)) => payload,
            Some(WsFrame::Other) => continue,
            None => {
                if ws.fill().await.context("reading from the socket")? == 0 {
                    bail!("server closed the connection");
                }
                continue;
            }
        };
        ws.send(0xA, &ping).await.context("answering a ping")?;
    }
}

/// Explains the socket errors a load test runs into.
fn io_error(e: std::io::Error, authority: &str) -> anyhow::Error {
    match e.raw_os_error() {
        Some(24 | 23) => anyhow!(
            "out of file descriptors ({e}): each subscriber needs one; \
             run `ulimit -n 65536` in this shell first (check the hard limit with `ulimit -Hn`)"
        ),
        Some(99) => anyhow!(
            "out of local ports to {authority} ({e}): use fewer --subscribers or widen \
             net.ipv4.ip_local_port_range"
        ),
        _ if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            anyhow!("connection refused by {authority}: is pushd running there? (--url)")
        }
        _ => anyhow::Error::new(e).context(format!("connecting to {authority}")),
    }
}

fn open_error(e: OpenError, authority: &str) -> anyhow::Error {
    match e {
        OpenError::Io(e) => io_error(e, authority),
        OpenError::Refused(status, body) => anyhow!("WebSocket upgrade refused with HTTP {status}: {}", body.trim()),
        OpenError::Protocol(what) => anyhow!("WebSocket handshake with {authority}: {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the serde path reads from `text`: the offset of a message and its payload's `ts`.
    fn parsed(text: &str) -> Option<(u64, u64)> {
        let frame = serde_json::from_slice::<Frame>(text.as_bytes()).ok()?;
        let ts = serde_json::from_str::<Stamp>(frame.data?.get()).ok()?.ts;
        (frame.kind == "message").then_some((frame.offset?, ts))
    }

    #[test]
    fn the_scan_reads_what_the_parse_reads_or_leaves_the_frame_to_it() {
        let pushd =
            r#"{"type":"message","channel":"load:0","offset":42,"data":{"seq":7,"ts":1700000000000001,"pad":"xxxx"}}"#;
        assert_eq!(scan_message(pushd.as_bytes()), Some((42, 1_700_000_000_000_001)));
        assert_eq!(scan_message(pushd.as_bytes()), parsed(pushd));
        let no_pad = r#"{"type":"message","channel":"c","offset":1,"data":{"seq":0,"ts":5}}"#;
        assert_eq!(scan_message(no_pad.as_bytes()), Some((1, 5)));
        let max = r#"{"type":"message","channel":"c","offset":18446744073709551615,"data":{"seq":0,"ts":0}}"#;
        assert_eq!(scan_message(max.as_bytes()), Some((u64::MAX, 0)));
        // Other shapes are not guessed at: the parse reads them.
        for other in [
            r#"{"type":"message","channel":"c","offset":1,"event":"e","data":{"seq":0,"ts":5}}"#,
            r#"{"type":"message","channel":"a\"b","offset":1,"data":{"seq":0,"ts":5}}"#,
            r#"{"type":"message","channel":"c","offset":1,"data":{"ts":5,"seq":0}}"#,
            r#"{"type":"message","channel":"c","offset":1,"data":{"seq":0,"ts":5.5}}"#,
            r#"{"type":"message","channel":"c","offset":99999999999999999999,"data":{"seq":0,"ts":5}}"#,
            r#"{"type":"message","channel":"c","offset":18446744073709551616,"data":{"seq":0,"ts":5}}"#,
            r#"{"type":"message","channel":"c","offset":,"data":{"seq":0,"ts":5}}"#,
            r#"{"type":"reset","channel":"c","offset":1}"#,
            r#"{"type":"message","channel":"c""#,
        ] {
            assert_eq!(scan_message(other.as_bytes()), None, "{other}");
        }
        assert_eq!(
            parsed(r#"{"type":"message","channel":"c","offset":1,"event":"e","data":{"seq":0,"ts":5}}"#),
            Some((1, 5))
        );
    }
}
