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
    pub url: String,
    pub channel: String,
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
    /// The last offset a publish returned: every subscriber must reach it.
    pub last_offset: Option<u64>,
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

impl Report {
    /// Why this run failed, one phrase each; empty when it passed.
    pub fn failures(&self) -> Vec<String> {
        let t = &self.tally;
        let counts = [
            (t.lost, "lost"),
            (t.duplicated, "duplicated"),
            (t.out_of_order, "out of order"),
            (self.publish_failed, "publishes failed"),
            (self.unfinished, "subscribers unfinished"),
            (self.unrecovered, "rejoins unrecovered"),
            (self.resets, "resets"),
        ];
        let mut out: Vec<String> =
            counts.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
        if self.timed_out {
            out.push("timed out".into());
        }
        if self.published == 0 {
            out.push("nothing was published".into());
        }
        if self.usage.server.as_ref().is_some_and(|s| s.gone) {
            out.push("server process gone".into());
        }
        out
    }

    /// The report as one JSON object, with `ok` and `failures` first.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Verdict<'a> {
            ok: bool,
            failures: Vec<String>,
            #[serde(flatten)]
            report: &'a Report,
        }
        let failures = self.failures();
        let verdict = Verdict { ok: failures.is_empty(), failures, report: self };
        let mut s = serde_json::to_string_pretty(&verdict).expect("reports serialise");
        s.push('\n');
        s
    }

    /// The report as aligned text; non-zero error counts are marked `<-- FAIL`.
    pub fn render(&self) -> String {
        let mut r = Text::default();
        let rate = self.rate.map_or("unpaced".into(), |r| format!("{r}/s requested"));
        r.head(&format!("pushload fanout  {}  channel {:?}", self.url, self.channel));
        r.row("subscribers", format!("{} (joined in {:.1} s)", self.subscribers, self.connect_seconds));
        r.row(
            "messages",
            format!("{} x {} B, {} publishers, {rate}", self.messages, self.payload_bytes, self.publishers),
        );
        r.head("publish (POST /api/publish)");
        r.row("published", format!("{} in {:.2} s = {:.0}/s", self.published, self.publish_seconds, self.publish_rate));
        r.flag("failed", self.publish_failed);
        if let Some(e) = &self.publish_error {
            r.row("first error", e.clone());
        }
        r.head("delivery");
        let t = &self.tally;
        r.row("deliveries", format!("{} of {} expected", t.received, t.expected));
        r.row("wall time", format!("{:.2} s (first publish to last delivery)", self.wall_seconds));
        r.row("throughput", format!("{:.0} deliveries/s", self.deliveries_per_second));
        r.head("latency, publish to delivery (us)");
        let l = &self.latency_us;
        for (name, v) in [("p50", l.p50), ("p90", l.p90), ("p99", l.p99), ("p99.9", l.p999), ("max", l.max)] {
            r.row(name, format!("{v:>9}  ({:.2} ms)", v as f64 / 1000.0));
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
        self.usage.render(&mut r);
        let failures = self.failures();
        r.line(String::new());
        if failures.is_empty() {
            r.line("RESULT: PASS".into());
        } else {
            r.line(format!("RESULT: FAIL ({})", failures.join(", ")));
        }
        r.0
    }
}

/// Aligned `label  value` lines under headings.
#[derive(Default)]
pub struct Text(String);

impl Text {
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

    fn line(&mut self, s: String) {
        self.0.push_str(&s);
        self.0.push('\n');
    }
}
