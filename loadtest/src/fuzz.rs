//! `pushload fuzz`: a network fuzzer. Connections open WebSockets to the node and write random
//! and mutated frames straight onto the TCP stream: valid commands, the same commands with bytes
//! flipped, cut and spliced, random text and JSON (deep nesting included), invalid UTF-8, binary
//! and control frames, and frames that break the protocol itself (reserved bits and opcodes,
//! unmasked frames, stray continuations, lengths that lie). The node closes most of these
//! connections, as it should; the fuzzer reconnects and goes on until it has sent `--frames`.
//!
//! Then it checks that the node still serves (health, and a fresh client that subscribes and
//! gets a message published through the API) and, given `--metrics-url`, that nothing panicked
//! (`pushd_panics_total` did not move). Every frame comes from a seeded generator, one stream
//! per sender: `--seed` replays the same frames in the same order on each sender, though where
//! the node cuts a connection short depends on timing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Node;
use crate::report::{self, Verdict};

/// A checked `pushload fuzz` plan.
#[derive(Debug, Clone)]
pub struct FuzzPlan {
    pub node: Node,
    pub frames: u64,
    pub connections: usize,
    pub seed: u64,
    pub token: Option<String>,
    pub api_key: Option<String>,
    pub metrics_url: Option<reqwest::Url>,
}

/// What a fuzz run did and found.
#[derive(Debug, Default, Serialize)]
pub struct FuzzReport {
    pub seed: u64,
    pub frames: u64,
    pub connections: u64,
    pub refused_upgrades: u64,
    /// How the node ended connections: the close code it sent, or `none` for a bare close.
    pub closes: BTreeMap<String, u64>,
    pub seconds: f64,
    pub frames_per_s: f64,
    /// `None` if the node served a fresh client afterwards; else why not.
    pub serving_error: Option<String>,
    /// `pushd_panics_total` before and after, with `--metrics-url`.
    pub panics: Option<(u64, u64)>,
}

impl Verdict for FuzzReport {
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.serving_error {
            out.push(format!("the node stopped serving: {e}"));
        }
        if let Some((before, after)) = self.panics
            && after > before
        {
            out.push(format!("{} panics in the node", after - before));
        }
        out
    }

    fn render(&self) -> String {
        let closes: Vec<String> = self.closes.iter().map(|(code, n)| format!("{code}: {n}")).collect();
        let mut text = format!(
            "fuzz (seed {})\n  frames sent          {}\n  connections          {} ({} upgrades refused)\n  \
             closed by the node   {}\n  time                 {:.1} s ({:.0} frames/s)\n",
            self.seed,
            self.frames,
            self.connections,
            self.refused_upgrades,
            closes.join(", "),
            self.seconds,
            self.frames_per_s,
        );
        match &self.serving_error {
            None => text.push_str("  afterwards           serving: a fresh client got a fresh message\n"),
            Some(e) => text.push_str(&format!("  afterwards           NOT serving: {e}  <-- FAIL\n")),
        }
        if let Some((before, after)) = self.panics {
            let mark = if after > before { "  <-- FAIL" } else { "" };
            text.push_str(&format!("  panics in the node   {}{mark}\n", after - before));
        }
        text
    }

    fn to_json(&self) -> String {
        report::json(self, self.failures())
    }
}

/// Runs the plan: the connections, then the checks.
pub async fn run(plan: FuzzPlan) -> anyhow::Result<FuzzReport> {
    let panics_before = match &plan.metrics_url {
        Some(url) => Some(panics(url).await?),
        None => None,
    };
    let left = Arc::new(AtomicU64::new(plan.frames));
    let stats = Arc::new(Mutex::new(FuzzReport { seed: plan.seed, ..FuzzReport::default() }));
    let started = Instant::now();
    let tasks: Vec<_> = (0..plan.connections)
        .map(|i| {
            tokio::spawn(hammer(
                plan.clone(),
                plan.seed.wrapping_add(i as u64 * 0x9e37_79b9),
                left.clone(),
                stats.clone(),
            ))
        })
        .collect();
    for task in tasks {
        task.await.context("a fuzzing connection task failed")??;
    }
    let mut report = std::mem::take(&mut *stats.lock().await);
    report.seconds = started.elapsed().as_secs_f64();
    report.frames_per_s = report.frames as f64 / report.seconds.max(0.001);
    report.serving_error = still_serves(&plan).await.err().map(|e| format!("{e:#}"));
    if let (Some(before), Some(url)) = (panics_before, &plan.metrics_url) {
        report.panics = Some((before, panics(url).await?));
    }
    Ok(report)
}

/// One connection after another, writing generated frames until the run's quota is spent.
async fn hammer(plan: FuzzPlan, seed: u64, left: Arc<AtomicU64>, stats: Arc<Mutex<FuzzReport>>) -> anyhow::Result<()> {
    let mut rng = Rng(seed | 1);
    let mut refused_in_a_row = 0;
    while left.load(Ordering::Relaxed) > 0 {
        let Some(stream) = open(&plan, &mut rng).await else {
            stats.lock().await.refused_upgrades += 1;
            refused_in_a_row += 1;
            if refused_in_a_row > 200 {
                bail!("the node refused 200 upgrades in a row");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        refused_in_a_row = 0;
        let (mut read, mut write) = stream.into_split();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let ended = ended.clone();
            tokio::spawn(async move {
                let code = close_code(&mut read).await;
                ended.store(true, Ordering::Relaxed);
                code
            })
        };
        let mut sent = 0;
        // A connection lives for a while unless the node ends it; once it did, nothing more
        // counts as sent.
        for _ in 0..rng.below(400) + 1 {
            if ended.load(Ordering::Relaxed) {
                break;
            }
            if left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_err() {
                break;
            }
            let frame = generate(&mut rng);
            if write.write_all(&frame).await.is_err() {
                left.fetch_add(1, Ordering::Relaxed);
                break;
            }
            sent += 1;
            // Let the node's answers (a close, above all) reach the reader between frames.
            tokio::task::yield_now().await;
        }
        let _ = write.shutdown().await;
        let code = tokio::time::timeout(Duration::from_secs(5), reader).await.ok().and_then(|r| r.ok()).flatten();
        let mut stats = stats.lock().await;
        stats.frames += sent;
        stats.connections += 1;
        *stats.closes.entry(code.map_or("none".into(), |c| c.to_string())).or_default() += 1;
    }
    Ok(())
}

/// A WebSocket handshake, then the bare TCP stream; `None` if the node refused the upgrade.
async fn open(plan: &FuzzPlan, rng: &mut Rng) -> Option<TcpStream> {
    let stream = TcpStream::connect(&plan.node.authority).await.ok()?;
    let mut url = plan.node.ws_url.clone();
    match &plan.token {
        Some(token) => url.query_pairs_mut().append_pair("token", token),
        None => url.query_pairs_mut().append_pair("user", &format!("fuzz-{}", rng.below(1000))),
    };
    let (ws, _) = tokio_tungstenite::client_async(url.as_str(), stream).await.ok()?;
    Some(ws.into_inner())
}

/// Reads server frames until the connection ends; the code of a close frame, if one came.
async fn close_code(read: &mut tokio::net::tcp::OwnedReadHalf) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Parse whole frames off the front of what arrived.
        while let Some((opcode, payload, used)) = server_frame(&buf) {
            if opcode == 8 {
                return Some(payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])));
            }
            buf.drain(..used);
        }
        match read.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One unmasked server frame at the front of `buf`: (opcode, payload, bytes used).
fn server_frame(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    let (len, head): (usize, usize) = match b1 & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(head..head.checked_add(len)?)?;
    Some((b0 & 0x0f, payload, head + len))
}

/// After the run: health, then a fresh client that subscribes and gets a fresh publish.
async fn still_serves(plan: &FuzzPlan) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let health = format!("{}/healthz", plan.node.origin);
    let status = http.get(&health).send().await.with_context(|| format!("GET {health}"))?.status();
    if !status.is_success() {
        bail!("GET {health} answered {status}");
    }
    let mut url = plan.node.ws_url.clone();
    match &plan.token {
        Some(token) => url.query_pairs_mut().append_pair("token", token),
        None => url.query_pairs_mut().append_pair("user", "fuzz-check"),
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.context("a fresh client's connect")?;
    let channel = format!("fuzz:check:{}", plan.seed);
    ws.send(Message::Text(format!(r#"{{"id":1,"op":"subscribe","channel":"{channel}"}}"#).into())).await?;
    let reply = next_of(&mut ws, "reply").await?;
    if reply["ok"] != true {
        bail!("the fresh client's subscribe was refused: {reply}");
    }
    let mut publish = http
        .post(plan.node.publish_url.clone())
        .json(&serde_json::json!({ "channel": channel, "data": "after the fuzz" }));
    if let Some(key) = &plan.api_key {
        publish = publish.bearer_auth(key);
    }
    let status = publish.send().await.context("the check's publish")?.status();
    if !status.is_success() {
        bail!("the check's publish answered {status}");
    }
    let message = next_of(&mut ws, "message").await?;
    if message["data"] != "after the fuzz" {
        bail!("the fresh client got {message} instead of the message");
    }
    Ok(())
}

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_next(ws: &mut Client) -> anyhow::Result<serde_json::Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("the fresh client's socket failed: {e}"),
            None => bail!("the fresh client's socket closed"),
        }
    }
}

/// The next frame of `kind`, within 10 s.
async fn next_of(ws: &mut Client, kind: &str) -> anyhow::Result<serde_json::Value> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let frame = ws_next(ws).await?;
            if frame["type"] == kind {
                return Ok(frame);
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the fresh client got no {kind} within 10 s"))?
}

/// `pushd_panics_total` from the node's metrics.
async fn panics(url: &reqwest::Url) -> anyhow::Result<u64> {
    let text = reqwest::get(url.clone()).await.with_context(|| format!("GET {url}"))?.text().await?;
    let line =
        text.lines().find(|l| l.starts_with("pushd_panics_total ")).context("no pushd_panics_total in the metrics")?;
    Ok(line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// xorshift64*: small, fast, and the same stream for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Channel names, good and hostile (empty, globs, braces, spaces, non-ASCII, 130 bytes).
const CHANNELS: &[&str] = &[
    "a",
    "room:1",
    "news/eu.de",
    "user:fuzz-1",
    "",
    "a*",
    "{x}",
    "a b",
    "é",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];

/// One frame, as bytes for the TCP stream. Mostly what reaches the node's command handling
/// (commands, mangled commands, odd JSON); a few per hundred end the connection on purpose
/// (invalid UTF-8, binary and close frames, protocol violations, raw garbage).
fn generate(rng: &mut Rng) -> Vec<u8> {
    let text = |bytes: &[u8]| frame(true, 0, 1, String::from_utf8_lossy(bytes).as_bytes(), true);
    match rng.below(1000) {
        0..=449 => frame(true, 0, 1, command(rng).as_bytes(), true),
        450..=849 => {
            let mut bytes = command(rng).into_bytes();
            mutate(rng, &mut bytes);
            text(&bytes)
        }
        850..=899 => {
            let n = rng.below(300) as usize;
            text(&rng.bytes(n))
        }
        900..=929 => frame(true, 0, 1, nested(rng).as_bytes(), true),
        930..=959 => {
            let n = rng.below(125) as usize;
            frame(true, 0, *rng.pick(&[9, 10]), &rng.bytes(n), true)
        }
        960..=969 => {
            let n = rng.below(300) as usize;
            frame(true, 0, 1, &rng.bytes(n), true)
        }
        970..=974 => {
            let n = rng.below(100) as usize;
            frame(true, 0, 2, &rng.bytes(n), true)
        }
        975..=979 => {
            let n = rng.below(140) as usize;
            frame(true, 0, *rng.pick(&[8, 9]), &rng.bytes(n), true)
        }
        980..=994 => broken(rng),
        _ => {
            let n = rng.below(64) as usize;
            rng.bytes(n)
        }
    }
}

/// A command a client might send, with random fields.
fn command(rng: &mut Rng) -> String {
    let channel = serde_json::to_string(rng.pick(CHANNELS)).unwrap_or_default();
    let id = rng.below(1000);
    match rng.below(7) {
        0 => format!(r#"{{"id":{id},"op":"subscribe","channel":{channel}}}"#),
        1 => format!(
            r#"{{"id":{id},"op":"subscribe","channel":{channel},"since":{{"epoch":"{:016x}","offset":{}}}}}"#,
            rng.next(),
            rng.next() >> rng.below(64)
        ),
        2 => format!(r#"{{"id":{id},"op":"unsubscribe","channel":{channel}}}"#),
        3 => format!(r#"{{"id":{id},"op":"publish","channel":{channel},"data":{{"n":{}}}}}"#, rng.next()),
        4 => format!(r#"{{"id":{id},"op":"presence","channel":{channel}}}"#),
        5 => format!(r#"{{"id":"{id}","op":"ping"}}"#),
        _ => format!(r#"{{"id":{id},"op":"{}"}}"#, rng.below(99)),
    }
}

/// Flips, cuts, splices and repeats bytes.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.below(4) + 1 {
        if bytes.is_empty() {
            bytes.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(bytes.len() as u64) as usize;
        match rng.below(5) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = rng.next() as u8,
            2 => {
                let end = (at + rng.below(8) as usize).min(bytes.len());
                bytes.drain(at..end);
            }
            3 => {
                let n = rng.below(8) as usize;
                let extra = rng.bytes(n);
                bytes.splice(at..at, extra);
            }
            _ => {
                let end = (at + rng.below(16) as usize).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
        }
    }
}

/// JSON nested deep, in arrays or objects.
fn nested(rng: &mut Rng) -> String {
    let depth = rng.below(300) as usize;
    let (open, close) = if rng.below(2) == 0 { ("[", "]") } else { (r#"{"a":"#, "}") };
    format!(r#"{{"id":1,"op":"publish","channel":"a","data":{}1{}}}"#, open.repeat(depth), close.repeat(depth))
}

/// A frame that breaks the protocol itself.
fn broken(rng: &mut Rng) -> Vec<u8> {
    let payload = command(rng).into_bytes();
    match rng.below(6) {
        0 => frame(true, 1 + rng.below(7) as u8, 1, &payload, true),
        1 => frame(true, 0, *rng.pick(&[3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), &payload, true),
        2 => frame(true, 0, 1, &payload, false),
        3 => frame(rng.below(2) == 0, 0, 0, &payload, true),
        4 => frame(false, 0, 1, &payload, true),
        _ => {
            // A length that promises more than comes.
            let mut f = frame(true, 0, 1, &payload, true);
            if f.len() > 2 {
                f[1] = 0x80 | 127;
                f.splice(2..2, (rng.next() >> rng.below(64)).to_be_bytes());
            }
            f
        }
    }
}

/// Encodes a client frame: FIN, RSV bits, opcode, and the payload, masked if `masked`.
fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push((u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0f));
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Reads `--frames` and friends into a plan.
pub fn plan(args: crate::cli::FuzzArgs) -> anyhow::Result<FuzzPlan> {
    if args.frames == 0 || args.connections == 0 {
        bail!("--frames and --connections must be greater than 0");
    }
    let node = crate::cli::node(&args.url)?;
    let metrics_url = match args.metrics_url.filter(|u| !u.is_empty()) {
        Some(u) => Some(reqwest::Url::parse(&u).with_context(|| format!("--metrics-url {u:?} is not a URL"))?),
        None => None,
    };
    Ok(FuzzPlan {
        node,
        frames: args.frames,
        connections: args.connections,
        seed: args.seed.unwrap_or_else(crate::publisher::unix_micros),
        token: args.token.filter(|t| !t.is_empty()),
        api_key: args.api_key.filter(|k| !k.is_empty()),
        metrics_url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_encoded_as_the_protocol_says() {
        let f = frame(true, 0, 1, b"hi", true);
        assert_eq!(&f[..2], &[0x81, 0x82]);
        assert_eq!(f.len(), 2 + 4 + 2);
        let long = frame(true, 0, 2, &[0; 300], false);
        assert_eq!(&long[..4], &[0x82, 126, 1, 44]);
        assert_eq!(server_frame(&[0x88, 2, 0x0f, 0xa0]), Some((8, &[0x0f, 0xa0][..], 4)));
        assert_eq!(server_frame(&[0x81, 5, b'a']), None, "a frame still arriving");
    }

    #[test]
    fn the_same_seed_makes_the_same_frames() {
        let (mut a, mut b) = (Rng(42), Rng(42));
        let fa: Vec<Vec<u8>> = (0..50).map(|_| generate(&mut a)).collect();
        let fb: Vec<Vec<u8>> = (0..50).map(|_| generate(&mut b)).collect();
        assert_eq!(fa, fb);
    }
}
