//! What the run cost: resident memory and CPU time of the node under test (with `--pid`) and of
//! pushload itself, read from /proc. Both share the machine, so both are reported.
//!
//! Readings: before connecting, with every subscriber idle (the start of the publish phase), a
//! sample each second while publishing, and at the end, before the subscribers disconnect.

use std::time::Instant;

use anyhow::anyhow;
use serde::Serialize;

use crate::report::Text;

/// Growth per connection below which the idle reading is taken to be reused memory.
const MIN_GROWTH_KIB: f64 = 0.5;
/// Clock ticks per second in /proc/<pid>/stat (USER_HZ, 100 on every Linux ABI pushd runs on).
const USER_HZ: f64 = 100.0;

/// Memory and CPU of the node and of pushload.
#[derive(Debug, Serialize)]
pub struct Usage {
    #[serde(skip)]
    subscribers: usize,
    #[serde(skip)]
    phase_started: Option<Instant>,
    /// Seconds from the idle reading (just before the first publish) to the end reading.
    pub phase_seconds: Option<f64>,
    /// CPU seconds the kernel spent in interrupts and softirqs in that phase (all cores): on
    /// loopback, mostly TCP delivery between pushload and the node, charged to no process.
    pub softirq_cpu_seconds: Option<f64>,
    /// Process CPU (user + system, all cores) not used by the node or pushload in that phase:
    /// other work on the machine skewing the numbers. Only known with `--pid`.
    pub other_cpu_seconds: Option<f64>,
    #[serde(skip)]
    machine_at_idle: Option<MachineCpu>,
    pub server: Option<ServerUsage>,
    pub client: ClientUsage,
}

/// The node's VmRSS at each step; `peak_kib` is the highest sample, `hwm_kib` the kernel's
/// lifetime high-water mark (VmHWM) at the end.
#[derive(Debug, Serialize)]
pub struct ServerUsage {
    pub pid: u32,
    pub before_kib: u64,
    pub idle_kib: Option<u64>,
    pub end_kib: Option<u64>,
    pub peak_kib: u64,
    pub hwm_kib: Option<u64>,
    /// (idle - before) / subscribers: what one idle subscribed connection costs the node.
    /// `None` when RSS grew by less than `MIN_GROWTH_KIB` per connection: the allocator reused
    /// memory held since earlier runs, so only a freshly started node gives this number.
    pub per_connection_kib: Option<f64>,
    /// CPU time (user + system) the node used during the publish phase.
    pub cpu_seconds: Option<f64>,
    /// The process could no longer be read: it exited (or crashed) during the run.
    pub gone: bool,
    #[serde(skip)]
    cpu_at_idle: Option<f64>,
}

/// pushload's own VmRSS before connecting and with every subscriber idle, and its CPU time
/// during the publish phase.
#[derive(Debug, Serialize)]
pub struct ClientUsage {
    pub before_kib: Option<u64>,
    pub idle_kib: Option<u64>,
    pub per_connection_kib: Option<f64>,
    pub cpu_seconds: Option<f64>,
    #[serde(skip)]
    cpu_at_idle: Option<f64>,
}

impl Usage {
    /// Takes the "before" readings; fails if `pid` cannot be read.
    pub fn start(pid: Option<u32>, subscribers: usize) -> anyhow::Result<Self> {
        let server = match pid {
            Some(pid) => {
                let before = status_kib(&pid.to_string(), "VmRSS").ok_or_else(|| {
                    anyhow!("cannot read VmRSS from /proc/{pid}/status: is --pid a running pushd on this machine?")
                })?;
                Some(ServerUsage {
                    pid,
                    before_kib: before,
                    idle_kib: None,
                    end_kib: None,
                    peak_kib: before,
                    hwm_kib: None,
                    per_connection_kib: None,
                    cpu_seconds: None,
                    gone: false,
                    cpu_at_idle: None,
                })
            }
            None => None,
        };
        let client = ClientUsage {
            before_kib: status_kib("self", "VmRSS"),
            idle_kib: None,
            per_connection_kib: None,
            cpu_seconds: None,
            cpu_at_idle: None,
        };
        Ok(Usage {
            subscribers,
            phase_started: None,
            phase_seconds: None,
            softirq_cpu_seconds: None,
            other_cpu_seconds: None,
            machine_at_idle: None,
            server,
            client,
        })
    }

    /// Readings with every subscriber connected, subscribed and idle; the publish phase starts.
    pub fn idle(&mut self) {
        let n = self.subscribers.max(1) as f64;
        if let Some(s) = &mut self.server {
            s.idle_kib = s.read("VmRSS");
            let per = s.idle_kib.map(|idle| idle.saturating_sub(s.before_kib) as f64 / n);
            s.per_connection_kib = per.filter(|&kib| kib >= MIN_GROWTH_KIB);
            s.cpu_at_idle = cpu_seconds(&s.pid.to_string());
        }
        let c = &mut self.client;
        c.idle_kib = status_kib("self", "VmRSS");
        c.per_connection_kib =
            c.idle_kib.zip(c.before_kib).map(|(idle, before)| idle.saturating_sub(before) as f64 / n);
        c.cpu_at_idle = cpu_seconds("self");
        self.machine_at_idle = machine_cpu();
        self.phase_started = Some(Instant::now());
    }

    /// One sample towards the node's peak.
    pub fn sample(&mut self) {
        if let Some(s) = &mut self.server {
            s.read("VmRSS");
        }
    }

    /// Readings at the end of the run, before the subscribers disconnect.
    pub fn end(&mut self) {
        if let Some(s) = &mut self.server {
            s.end_kib = s.read("VmRSS");
            s.hwm_kib = s.read("VmHWM");
            s.cpu_seconds = since(s.cpu_at_idle, cpu_seconds(&s.pid.to_string()));
        }
        self.client.cpu_seconds = since(self.client.cpu_at_idle, cpu_seconds("self"));
        self.phase_seconds = self.phase_started.map(|t| t.elapsed().as_secs_f64());
        let machine = self.machine_at_idle.zip(machine_cpu()).map(|(a, b)| (b.process - a.process, b.irq - a.irq));
        self.softirq_cpu_seconds = machine.map(|(_, irq)| irq);
        let ours = self.server.as_ref().and_then(|s| s.cpu_seconds).zip(self.client.cpu_seconds);
        self.other_cpu_seconds = machine.zip(ours).map(|((process, _), (s, c))| (process - s - c).max(0.0));
    }

    pub fn render(&self, r: &mut Text) {
        r.head("memory (RSS) and CPU");
        let mib = |v: Option<u64>| v.map_or("-".into(), |v| format!("{:.1} MiB", v as f64 / 1024.0));
        let cpu = |secs: Option<f64>| match (secs, self.phase_seconds) {
            (Some(c), Some(p)) if p > 0.0 => format!("{c:.2} s CPU in {p:.2} s = {:.0}% of one core", 100.0 * c / p),
            _ => "-".into(),
        };
        if let Some(s) = &self.server {
            let at = format!("before {}, idle {}", mib(Some(s.before_kib)), mib(s.idle_kib));
            r.row(&format!("server (pid {})", s.pid), at);
            let end = format!("end {}, peak {}, VmHWM {}", mib(s.end_kib), mib(Some(s.peak_kib)), mib(s.hwm_kib));
            r.row("", end);
            let per = s.per_connection_kib.map_or_else(
                || "n/a: RSS did not grow (memory kept from earlier runs); measure on a fresh pushd".into(),
                |per| format!("{per:.1} KiB"),
            );
            r.row("server per idle conn", per);
            r.row("server CPU, publishing", cpu(s.cpu_seconds));
            if s.gone {
                r.row("server process", "GONE during the run (exited or crashed)  <-- FAIL".into());
            }
        } else {
            r.row("server", "not measured (pass --pid <pushd pid>)".into());
        }
        if let Some(per) = self.client.per_connection_kib {
            r.row("pushload per conn", format!("{per:.1} KiB"));
        }
        r.row("pushload CPU, publishing", cpu(self.client.cpu_seconds));
        r.row("kernel softirq (loopback)", cpu(self.softirq_cpu_seconds));
        if let Some(other) = self.other_cpu_seconds {
            let note = if other > 0.5 { "  <-- other work skewed this run" } else { "" };
            r.row("other processes CPU", format!("{}{note}", cpu(Some(other))));
        }
    }
}

impl ServerUsage {
    /// Reads one field, keeping the peak up to date and noting a vanished process.
    fn read(&mut self, field: &str) -> Option<u64> {
        let v = status_kib(&self.pid.to_string(), field);
        match v {
            Some(v) if field == "VmRSS" => self.peak_kib = self.peak_kib.max(v),
            Some(_) => {}
            None => self.gone = true,
        }
        v
    }
}

fn since(before: Option<f64>, now: Option<f64>) -> Option<f64> {
    Some(now? - before?)
}

/// A `kB` field of `/proc/<pid>/status` (`pid` may be "self").
fn status_kib(pid: &str, field: &str) -> Option<u64> {
    parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, field)
}

fn parse_status(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU seconds of a process so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Busy CPU seconds of the whole machine so far, split into what processes were charged
/// (user, nice, system) and what the kernel spent in irq and softirq.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MachineCpu {
    process: f64,
    irq: f64,
}

fn machine_cpu() -> Option<MachineCpu> {
    parse_machine(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine(stat: &str) -> Option<MachineCpu> {
    // cpu  user nice system idle iowait irq softirq steal ...
    let mut ticks = stat.lines().next()?.strip_prefix("cpu ")?.split_whitespace().map(|t| t.parse::<u64>().ok());
    let mut next = || ticks.next().flatten();
    let (user, nice, system, _idle, _iowait, irq, softirq) =
        (next()?, next()?, next()?, next()?, next()?, next()?, next()?);
    Some(MachineCpu { process: (user + nice + system) as f64 / USER_HZ, irq: (irq + softirq) as f64 / USER_HZ })
}

fn parse_stat(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields_from_proc_status() {
        let status = "Name:\tpushd\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(parse_status(status, "VmRSS"), Some(102_400));
        assert_eq!(parse_status(status, "VmHWM"), Some(204_800));
        assert_eq!(parse_status(status, "VmSwap"), None);
        assert!(status_kib("self", "VmRSS").is_some_and(|v| v > 0));
    }

    #[test]
    fn reads_cpu_ticks_from_proc_stat() {
        let stat = "4242 (push d) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat(stat), Some(3.25));
        assert!(cpu_seconds("self").is_some());
    }

    #[test]
    fn machine_cpu_splits_process_time_from_softirq() {
        let stat = "cpu  100 20 30 5000 400 5 6 7 0 0\ncpu0 50 10 15 2500 200 2 3 3 0 0\n";
        assert_eq!(parse_machine(stat), Some(MachineCpu { process: 1.5, irq: 0.11 }));
        assert!(machine_cpu().is_some());
    }
}
