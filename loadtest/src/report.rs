//! What a run found, and how it is shown: a plain aligned text report for people, or one JSON
//! object (`--json`) for scripts.
//!
//! Any loss, duplicate, reorder, failed publish or unfinished subscriber makes `failures()`
//! non-empty, which the report spells out and main turns into exit status 1.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::checker::Tally;
use crate::usage::Usage;

/// Everything one `pushload fanout` run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The nodes' origins, in `--url` order.
    pub urls: Vec<String>,
    pub channels: Vec<String>,
    pub subscribers: usize,
    pub messages: u64,
    pub payload_bytes: usize,
    pub publishers: usize,
    /// Requested publishes per second; `None` = unpaced.
    pub rate: Option<u64>,
    /// Time to open and subscribe every connection.
    pub connect_seconds: f64,
    pub published: u64,
    pub publish_failed: u64,
    pub publish_error: Option<String>,
    /// First publish sent to last publish answered.
    pub publish_seconds: f64,
    pub publish_rate: f64,
    /// Request sent to response read, per publish answered 2xx.
    pub publish_latency_us: Latency,
    /// Per channel, the last offset a publish returned: every subscriber of the channel must
    /// reach it (`None`: nothing was published to the channel).
    pub last_offsets: Vec<Option<u64>>,
    pub tally: Tally,
    /// First publish sent to last message delivered.
    pub wall_seconds: f64,
    pub deliveries_per_second: f64,
    pub latency_us: Latency,
    /// How the server (or the network, 1006) closed subscriber sockets during the run.
    pub closes: Vec<CloseCount>,
    /// Successful reconnects with `since`; `unrecovered` of them got `recovered: false`.
    pub rejoins: u64,
    pub unrecovered: u64,
    /// `reset` frames received: history lost under a live subscription.
    pub resets: u64,
    /// Subscribers that never saw the last offset.
    pub unfinished: u64,
    pub subscriber_error: Option<String>,
    pub timed_out: bool,
    /// The delivery counts of each node's subscribers, in `--url` order.
    pub nodes: Vec<NodeTally>,
    pub usage: Usage,
    /// The reconnect storm (`--storm-after`), if there was one.
    pub storm: Option<StormReport>,
}

/// Every subscriber dropped its socket at once and reconnected with its position.
#[derive(Debug, Serialize)]
pub struct StormReport {
    /// Subscribers running when the storm began.
    pub clients: usize,
    /// Those that were subscribed again (recovered or not; `unrecovered` counts the latter).
    pub back: usize,
    /// From the storm's start to the last one back.
    pub seconds: f64,
    pub connects_per_second: f64,
}

/// What the subscribers connected to one node saw.
#[derive(Debug, Default, Serialize)]
pub struct NodeTally {
    pub url: String,
    pub tally: Tally,
    pub unfinished: u64,
    pub rejoins: u64,
    /// Sockets this node (or the network) closed.
    pub closes: u64,
}

/// Everything one `pushload publish` run measured.
#[derive(Debug, Serialize)]
pub struct PublishReport {
    pub urls: Vec<String>,
    pub channels: Vec<String>,
    pub messages: u64,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub rate: Option<u64>,
    pub published: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// First publish sent to last publish answered.
    pub seconds: f64,
    pub publishes_per_second: f64,
    /// Request sent to response read, per publish answered 2xx.
    pub latency_us: Latency,
    /// Offsets returned to more than one publish (summed over channels).
    pub duplicated_offsets: u64,
    /// Offsets no publish got between a channel's lowest and highest (summed over channels).
    pub offset_gaps: u64,
    pub timed_out: bool,
    pub usage: Usage,
}

/// One close code seen, how often, and the first reason given.
#[derive(Debug, Serialize)]
pub struct CloseCount {
    pub code: u16,
    pub count: u64,
    pub reason: String,
}

/// Publish-to-delivery latency in microseconds (the payload's `ts` vs. the receive time).
#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    /// An empty histogram of the shape every latency sample goes into: 1 us to 1 h, 3 digits.
    pub fn histogram() -> Histogram<u64> {
        Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
    }
}

impl From<&Histogram<u64>> for Latency {
    fn from(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The failure phrases every report shares: each non-zero count, a timeout, nothing published,
/// a server process that vanished.
fn failure_lines(counts: &[(u64, &str)], timed_out: bool, published: u64, gone: bool) -> Vec<String> {
    let mut out: Vec<String> = counts.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
    let flags = [(timed_out, "timed out"), (published == 0, "nothing was published"), (gone, "server process gone")];
    out.extend(flags.iter().filter(|(on, _)| *on).map(|(_, what)| (*what).to_owned()));
    out
}

/// A finished run: its verdict and both ways of showing it.
pub trait Verdict {
    /// Why this run failed, one phrase each; empty when it passed.
    fn failures(&self) -> Vec<String>;

    /// The report as aligned text; non-zero error counts are marked `<-- FAIL`.
    fn render(&self) -> String;

    /// The report as one JSON object, with `ok` and `failures` first.
    fn to_json(&self) -> String;
}

/// `report` as one JSON object, with `ok` and `failures` first.
pub fn json<R: Serialize>(report: &R, failures: Vec<String>) -> String {
    #[derive(Serialize)]
    struct Json<'a, R> {
        ok: bool,
        failures: Vec<String>,
        #[serde(flatten)]
        report: &'a R,
    }
    let verdict = Json { ok: failures.is_empty(), failures, report };
    let mut s = serde_json::to_string_pretty(&verdict).expect("reports serialise");
    s.push('\n');
    s
}

impl Verdict for Report {
    fn to_json(&self) -> String {
        json(self, self.failures())
    }

    fn failures(&self) -> Vec<String> {
        let t = &self.tally;
        let counts = [
            (t.lost, "lost"),
            (t.duplicated, "duplicated"),
            (t.out_of_order, "out of order"),
            (self.publish_failed, "publishes failed"),
            (self.unfinished, "subscribers unfinished"),
            (self.unrecovered, "rejoins unrecovered"),
            (self.resets, "resets"),
            (self.storm.as_ref().map_or(0, |s| (s.clients - s.back) as u64), "subscribers not back after the storm"),
        ];
        failure_lines(&counts, self.timed_out, self.published, self.usage.gone())
    }

    fn render(&self) -> String {
        let mut r = Text::default();
        r.head(&format!("pushload fanout  {}  {}", nodes(&self.urls), channels(&self.channels)));
        r.row("subscribers", format!("{} (joined in {:.1} s)", self.subscribers, self.connect_seconds));
        r.row("messages", messages(self.messages, self.payload_bytes, self.publishers, self.rate));
        r.head("publish (POST /api/publish)");
        r.row("published", format!("{} in {:.2} s = {:.0}/s", self.published, self.publish_seconds, self.publish_rate));
        r.flag("failed", self.publish_failed);
        if let Some(e) = &self.publish_error {
            r.row("first error", e.clone());
        }
        let l = &self.publish_latency_us;
        r.row("publish latency", format!("p50 {}, p99 {}, max {}", ms(l.p50), ms(l.p99), ms(l.max)));
        r.head("delivery");
        let t = &self.tally;
        r.row("deliveries", format!("{} of {} expected", t.received, t.expected));
        r.row("wall time", format!("{:.2} s (first publish to last delivery)", self.wall_seconds));
        r.row("throughput", format!("{:.0} deliveries/s", self.deliveries_per_second));
        r.head("latency, publish to delivery (us)");
        let l = &self.latency_us;
        for (name, v) in [("p50", l.p50), ("p90", l.p90), ("p99", l.p99), ("p99.9", l.p999), ("max", l.max)] {
            r.row(name, format!("{v:>9}  ({})", ms(v)));
        }
        r.head("correctness");
        r.flag("lost", t.lost);
        r.flag("duplicated", t.duplicated);
        r.flag("out of order", t.out_of_order);
        r.flag("unfinished subscribers", self.unfinished);
        r.flag("resets", self.resets);
        for c in &self.closes {
            r.row(&format!("closed with {}", c.code), format!("{} x  {}  <-- WARN", c.count, c.reason));
        }
        if self.rejoins > 0 || self.unrecovered > 0 {
            r.row("rejoins", format!("{} ({} unrecovered)", self.rejoins, self.unrecovered));
        }
        if let Some(e) = &self.subscriber_error {
            r.row("subscriber error", e.clone());
        }
        if let Some(s) = &self.storm {
            r.head("reconnect storm");
            r.row(
                "back",
                format!("{} of {} in {:.2} s = {:.0} connects/s", s.back, s.clients, s.seconds, s.connects_per_second),
            );
            r.flag("not back", (s.clients - s.back) as u64);
        }
        if self.nodes.len() > 1 {
            r.head("per node (subscribers connected to it)");
            for n in &self.nodes {
                let t = &n.tally;
                let bad = t.lost + t.duplicated + t.out_of_order + n.unfinished;
                let mut line = format!(
                    "{} subs, {} of {} received, {} lost, {} dup, {} reordered, {} unfinished",
                    t.subscribers, t.received, t.expected, t.lost, t.duplicated, t.out_of_order, n.unfinished
                );
                if n.closes > 0 || n.rejoins > 0 {
                    line += &format!(", {} closed, {} rejoined", n.closes, n.rejoins);
                }
                if bad > 0 {
                    line += "  <-- FAIL";
                }
                r.row(&n.url, line);
            }
        }
        self.usage.render(&mut r);
        self.usage.render_costs(&mut r, self.tally.received);
        r.verdict(&self.failures());
        r.0
    }
}

impl Verdict for PublishReport {
    fn to_json(&self) -> String {
        json(self, self.failures())
    }

    fn failures(&self) -> Vec<String> {
        let counts = [(self.failed, "publishes failed"), (self.duplicated_offsets, "offsets returned twice")];
        failure_lines(&counts, self.timed_out, self.published, self.usage.gone())
    }

    fn render(&self) -> String {
        let mut r = Text::default();
        r.head(&format!("pushload publish  {}  {}", nodes(&self.urls), channels(&self.channels)));
        r.row("messages", messages(self.messages, self.payload_bytes, self.publishers, self.rate));
        r.head("publish (POST /api/publish)");
        r.row("published", format!("{} in {:.2} s", self.published, self.seconds));
        r.row("throughput", format!("{:.0} publishes/s", self.publishes_per_second));
        r.flag("failed", self.failed);
        if let Some(e) = &self.first_error {
            r.row("first error", e.clone());
        }
        r.head("latency, request sent to response read (us)");
        let l = &self.latency_us;
        for (name, v) in [("p50", l.p50), ("p90", l.p90), ("p99", l.p99), ("p99.9", l.p999), ("max", l.max)] {
            r.row(name, format!("{v:>9}  ({})", ms(v)));
        }
        r.head("offsets returned");
        r.flag("returned twice", self.duplicated_offsets);
        let gaps = if self.offset_gaps == 0 {
            "0".into()
        } else {
            format!("{}  <-- WARN (failed publishes stored anyway, or another publisher)", self.offset_gaps)
        };
        r.row("gaps", gaps);
        self.usage.render(&mut r);
        r.verdict(&self.failures());
        r.0
    }
}

/// `http://a` or `3 nodes: http://a, http://b, http://c`.
fn nodes(urls: &[String]) -> String {
    match urls {
        [one] => one.clone(),
        many => format!("{} nodes: {}", many.len(), many.join(", ")),
    }
}

/// `channel "bench"` or `10 channels "bench-0".."bench-9"`.
fn channels(names: &[String]) -> String {
    match names {
        [one] => format!("channel {one:?}"),
        [first, .., last] => format!("{} channels {first:?}..{last:?}", names.len()),
        [] => "no channel".into(),
    }
}

fn messages(messages: u64, payload_bytes: usize, publishers: usize, rate: Option<u64>) -> String {
    let rate = rate.map_or("unpaced".into(), |r| format!("{r}/s requested"));
    format!("{messages} x {payload_bytes} B, {publishers} publishers, {rate}")
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// Aligned `label  value` lines under headings.
#[derive(Default)]
pub struct Text(String);

impl Text {
    pub fn into_string(self) -> String {
        self.0
    }

    pub fn head(&mut self, title: &str) {
        if !self.0.is_empty() {
            self.0.push('\n');
        }
        self.line(title.to_owned());
    }

    pub fn row(&mut self, label: &str, value: String) {
        let _ = writeln!(self.0, "  {label:<26}{value}");
    }

    fn flag(&mut self, label: &str, n: u64) {
        self.row(label, if n == 0 { "0".into() } else { format!("{n}  <-- FAIL") });
    }

    /// The closing `RESULT:` line.
    fn verdict(&mut self, failures: &[String]) {
        self.line(String::new());
        if failures.is_empty() {
            self.line("RESULT: PASS".into());
        } else {
            self.line(format!("RESULT: FAIL ({})", failures.join(", ")));
        }
    }

    fn line(&mut self, s: String) {
        self.0.push_str(&s);
        self.0.push('\n');
    }
}
