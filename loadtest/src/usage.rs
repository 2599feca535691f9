//! What the run cost: resident memory and CPU time of the nodes under test (with `--pid`), of
//! other processes of the system under test (`--redis-pid`) and of pushload itself, read from
//! /proc. They all share the machine, so all are reported.
//!
//! Readings: before connecting, with every subscriber idle (the start of the publish phase), a
//! sample each second while publishing, and at the end, before the subscribers disconnect.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::anyhow;
use serde::Serialize;

use crate::cli::{Node, Watch};
use crate::report::Text;

/// Growth per connection below which the idle reading is taken to be reused memory.
const MIN_GROWTH_KIB: f64 = 0.5;
/// Clock ticks per second in /proc/<pid>/stat (USER_HZ, 100 on every Linux ABI pushd runs on).
const USER_HZ: f64 = 100.0;

/// Memory and CPU of the nodes, of Redis and of pushload.
#[derive(Debug, Serialize)]
pub struct Usage {
    #[serde(skip)]
    subscribers: usize,
    #[serde(skip)]
    phase_started: Option<Instant>,
    /// Seconds from the idle reading (just before the first publish) to the end reading.
    pub phase_seconds: Option<f64>,
    /// CPU seconds the kernel spent in interrupts and softirqs in that phase (all cores): on
    /// loopback, mostly TCP delivery between pushload and the nodes. The kernel charges most of
    /// it to whichever process was running as well (in its system time), so it overlaps the
    /// processes' CPU rather than adding to it.
    pub softirq_cpu_seconds: Option<f64>,
    /// CPU (user + system, all cores) of every other process on the machine in that phase,
    /// summed from /proc/<pid>/stat (with the children they reaped, so short-lived compilers and
    /// test binaries count too; the kernel's softirq threads do not): other work skewing the
    /// numbers. Only known with `--pid`.
    pub other_cpu_seconds: Option<f64>,
    #[serde(skip)]
    irq_at_idle: Option<f64>,
    #[serde(skip)]
    others_at_idle: Option<HashMap<(u32, u64), f64>>,
    /// The nodes' readings summed; `None` without `--pid`.
    pub server: Option<TotalUsage>,
    /// Each `--pid` on its own.
    pub servers: Vec<ProcessUsage>,
    /// Each `--redis-pid` on its own.
    pub redis: Vec<ProcessUsage>,
    pub client: ClientUsage,
}

/// One process's VmRSS at each step; `peak_kib` is the highest sample, `hwm_kib` the kernel's
/// lifetime high-water mark (VmHWM) at the end.
#[derive(Debug, Serialize)]
pub struct ProcessUsage {
    pub pid: u32,
    /// The node's URL, when the pids were given in `--url` order.
    pub node: Option<String>,
    /// Subscribers connected to this node, when known.
    pub connections: Option<usize>,
    pub before_kib: u64,
    pub idle_kib: Option<u64>,
    pub end_kib: Option<u64>,
    pub peak_kib: u64,
    pub hwm_kib: Option<u64>,
    /// (idle - before) / connections: what one idle subscribed connection costs this node.
    /// `None` when RSS grew by less than `MIN_GROWTH_KIB` per connection: the allocator reused
    /// memory held since earlier runs, so only a freshly started node gives this number.
    pub per_connection_kib: Option<f64>,
    /// CPU time (user + system) used during the publish phase.
    pub cpu_seconds: Option<f64>,
    /// The same, split: user and system time.
    pub cpu: Option<Cpu>,
    /// CPU time used while the subscribers connected (before to idle): what connecting costs.
    pub connect_cpu: Option<Cpu>,
    /// The process could no longer be read: it exited (or crashed) during the run.
    pub gone: bool,
    #[serde(skip)]
    cpu_at_start: Option<Cpu>,
    #[serde(skip)]
    cpu_at_idle: Option<Cpu>,
}

/// CPU seconds, user and system apart.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cpu {
    pub user: f64,
    pub system: f64,
}

impl Cpu {
    pub fn total(self) -> f64 {
        self.user + self.system
    }

    pub fn minus(self, before: Cpu) -> Cpu {
        Cpu { user: self.user - before.user, system: self.system - before.system }
    }

    fn plus(self, other: Cpu) -> Cpu {
        Cpu { user: self.user + other.user, system: self.system + other.system }
    }
}

/// The nodes' readings summed over every `--pid`; `peak_kib` is the highest summed sample.
#[derive(Debug, Serialize)]
pub struct TotalUsage {
    pub nodes: usize,
    pub before_kib: u64,
    pub idle_kib: Option<u64>,
    pub end_kib: Option<u64>,
    pub peak_kib: u64,
    /// (idle - before) / subscribers, over every node.
    pub per_connection_kib: Option<f64>,
    pub cpu_seconds: Option<f64>,
    pub cpu: Option<Cpu>,
    pub connect_cpu: Option<Cpu>,
    pub gone: bool,
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
    /// Takes the "before" readings; fails if a pid cannot be read. `per_node` is how many
    /// subscribers each node gets (in `nodes` order); a pid is matched to a node only when there
    /// are as many pids as nodes.
    pub fn start(watch: &Watch, nodes: &[Node], per_node: &[usize]) -> anyhow::Result<Self> {
        let matched = watch.pids.len() == nodes.len();
        let servers = watch
            .pids
            .iter()
            .enumerate()
            .map(|(i, &pid)| {
                let node = matched.then(|| nodes[i].origin.clone());
                let connections = if matched { per_node.get(i).copied() } else { None };
                ProcessUsage::start(pid, node, connections)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let redis =
            watch.redis_pids.iter().map(|&pid| ProcessUsage::start(pid, None, None)).collect::<Result<_, _>>()?;
        let server = (!servers.is_empty()).then(|| {
            let before_kib = servers.iter().map(|s| s.before_kib).sum();
            TotalUsage {
                nodes: servers.len(),
                before_kib,
                idle_kib: None,
                end_kib: None,
                peak_kib: before_kib,
                per_connection_kib: None,
                cpu_seconds: None,
                cpu: None,
                connect_cpu: None,
                gone: false,
            }
        });
        let client = ClientUsage {
            before_kib: status_kib("self", "VmRSS"),
            idle_kib: None,
            per_connection_kib: None,
            cpu_seconds: None,
            cpu_at_idle: None,
        };
        Ok(Usage {
            subscribers: per_node.iter().sum(),
            phase_started: None,
            phase_seconds: None,
            softirq_cpu_seconds: None,
            other_cpu_seconds: None,
            irq_at_idle: None,
            others_at_idle: None,
            server,
            servers,
            redis,
            client,
        })
    }

    /// Readings with every subscriber connected, subscribed and idle; the publish phase starts.
    pub fn idle(&mut self) {
        for s in self.servers.iter_mut().chain(&mut self.redis) {
            s.idle();
        }
        if let Some(t) = &mut self.server {
            t.idle_kib = sum(self.servers.iter().map(|s| s.idle_kib));
            t.per_connection_kib = t.idle_kib.and_then(|idle| growth(idle, t.before_kib, self.subscribers));
            t.peak_kib = t.peak_kib.max(t.idle_kib.unwrap_or(0));
            t.connect_cpu = sum_cpu(self.servers.iter().map(|s| s.connect_cpu));
        }
        let c = &mut self.client;
        c.idle_kib = status_kib("self", "VmRSS");
        c.per_connection_kib = c
            .idle_kib
            .zip(c.before_kib)
            .filter(|_| self.subscribers > 0)
            .map(|(idle, before)| idle.saturating_sub(before) as f64 / self.subscribers as f64);
        c.cpu_at_idle = cpu_seconds("self").map(Cpu::total);
        self.irq_at_idle = machine_irq();
        self.others_at_idle = (!self.servers.is_empty()).then(|| processes(&self.ours()));
        self.phase_started = Some(Instant::now());
    }

    /// One sample towards the peaks.
    pub fn sample(&mut self) {
        // Read every node, even after one is gone.
        let reads: Vec<Option<u64>> = self.servers.iter_mut().map(|s| s.read("VmRSS")).collect();
        let now = sum(reads.into_iter());
        if let Some(t) = &mut self.server {
            t.peak_kib = t.peak_kib.max(now.unwrap_or(0));
        }
        for s in &mut self.redis {
            s.read("VmRSS");
        }
    }

    /// Readings at the end of the run, before the subscribers disconnect.
    pub fn end(&mut self) {
        for s in self.servers.iter_mut().chain(&mut self.redis) {
            s.end();
        }
        if let Some(t) = &mut self.server {
            t.end_kib = sum(self.servers.iter().map(|s| s.end_kib));
            t.peak_kib = t.peak_kib.max(t.end_kib.unwrap_or(0));
            t.cpu_seconds = sum_f(self.servers.iter().map(|s| s.cpu_seconds));
            t.cpu = sum_cpu(self.servers.iter().map(|s| s.cpu));
            t.gone = self.servers.iter().any(|s| s.gone);
        }
        self.client.cpu_seconds = since(self.client.cpu_at_idle, cpu_seconds("self").map(Cpu::total));
        self.phase_seconds = self.phase_started.map(|t| t.elapsed().as_secs_f64());
        self.softirq_cpu_seconds = since(self.irq_at_idle, machine_irq());
        self.other_cpu_seconds =
            self.others_at_idle.as_ref().map(|before| others_since(before, &processes(&self.ours())));
    }

    /// The pids whose CPU is reported on their own lines.
    fn ours(&self) -> Vec<u32> {
        let watched = self.servers.iter().chain(&self.redis).map(|s| s.pid);
        watched.chain([std::process::id()]).collect()
    }

    /// Whether a watched process vanished during the run.
    pub fn gone(&self) -> bool {
        self.servers.iter().chain(&self.redis).any(|s| s.gone)
    }

    /// The nodes' CPU per delivery in the publish phase, user and system apart, and what each
    /// connection cost them while connecting.
    pub fn render_costs(&self, r: &mut Text, deliveries: u64) {
        let Some(t) = &self.server else { return };
        if let Some(cpu) = t.cpu.filter(|_| deliveries > 0) {
            let us = |secs: f64| secs * 1e6 / deliveries as f64;
            let line = format!(
                "user {:.2} + system {:.2} = {:.2} us ({:.2} CPU-s per million)",
                us(cpu.user),
                us(cpu.system),
                us(cpu.total()),
                us(cpu.total())
            );
            r.row("server CPU per delivery", line);
        }
        if let Some(cpu) = t.connect_cpu.filter(|_| self.subscribers > 0) {
            let ms = cpu.total() * 1e3 / self.subscribers as f64;
            let line = format!("{ms:.3} ms (user {:.2} s + system {:.2} s in all)", cpu.user, cpu.system);
            r.row("server CPU per connect", line);
        }
    }

    pub fn render(&self, r: &mut Text) {
        r.head("memory (RSS) and CPU");
        let cpu = |secs: Option<f64>| match (secs, self.phase_seconds) {
            (Some(c), Some(p)) if p > 0.0 => format!("{c:.2} s CPU in {p:.2} s = {:.0}% of one core", 100.0 * c / p),
            _ => "-".into(),
        };
        let per_conn = |per: Option<f64>| {
            per.map_or_else(
                || "n/a: RSS did not grow (memory kept from earlier runs); measure on a fresh pushd".into(),
                |per| format!("{per:.1} KiB"),
            )
        };
        match (&self.server, self.servers.as_slice()) {
            (Some(_), [s]) => {
                r.row(
                    &format!("server (pid {})", s.pid),
                    format!("before {}, idle {}", mib(s.before_kib), mib_or(s.idle_kib)),
                );
                let end = format!("end {}, peak {}, VmHWM {}", mib_or(s.end_kib), mib(s.peak_kib), mib_or(s.hwm_kib));
                r.row("", end);
                if self.subscribers > 0 {
                    r.row("server per idle conn", per_conn(s.per_connection_kib));
                }
                r.row("server CPU, publishing", cpu(s.cpu_seconds));
            }
            (Some(t), servers) => {
                let label = format!("servers ({} pids, summed)", t.nodes);
                r.row(&label, format!("before {}, idle {}", mib(t.before_kib), mib_or(t.idle_kib)));
                r.row("", format!("end {}, peak {}", mib_or(t.end_kib), mib(t.peak_kib)));
                if self.subscribers > 0 {
                    r.row("server per idle conn", per_conn(t.per_connection_kib));
                }
                r.row("server CPU, publishing", cpu(t.cpu_seconds));
                for (i, s) in servers.iter().enumerate() {
                    s.render_lines(r, &format!("node {}", i + 1), &cpu);
                }
            }
            (None, _) => r.row("server", "not measured (pass --pid <pushd pid>[,<pid>..])".into()),
        }
        if let [s] = self.servers.as_slice()
            && s.gone
        {
            r.row("server process", "GONE during the run (exited or crashed)  <-- FAIL".into());
        }
        for s in &self.redis {
            s.render_lines(r, "redis", &cpu);
        }
        if let Some(per) = self.client.per_connection_kib {
            r.row("pushload per conn", format!("{per:.1} KiB"));
        }
        r.row("pushload CPU, publishing", cpu(self.client.cpu_seconds));
        let softirq = self.softirq_cpu_seconds.map(|_| ", mostly inside the CPU above").unwrap_or_default();
        r.row("kernel softirq (loopback)", format!("{}{softirq}", cpu(self.softirq_cpu_seconds)));
        if let Some(other) = self.other_cpu_seconds {
            let note = if other > 0.5 { "  <-- other work skewed this run" } else { "" };
            r.row("other processes CPU", format!("{}{note}", cpu(Some(other))));
        }
    }
}

impl ProcessUsage {
    fn start(pid: u32, node: Option<String>, connections: Option<usize>) -> anyhow::Result<Self> {
        let before_kib = status_kib(&pid.to_string(), "VmRSS").ok_or_else(|| {
            anyhow!("cannot read VmRSS from /proc/{pid}/status: is pid {pid} running on this machine?")
        })?;
        Ok(ProcessUsage {
            pid,
            node,
            connections,
            before_kib,
            idle_kib: None,
            end_kib: None,
            peak_kib: before_kib,
            hwm_kib: None,
            per_connection_kib: None,
            cpu_seconds: None,
            cpu: None,
            connect_cpu: None,
            gone: false,
            cpu_at_start: cpu_seconds(&pid.to_string()),
            cpu_at_idle: None,
        })
    }

    fn idle(&mut self) {
        self.idle_kib = self.read("VmRSS");
        self.per_connection_kib =
            self.idle_kib.zip(self.connections).and_then(|(idle, n)| growth(idle, self.before_kib, n));
        self.cpu_at_idle = cpu_seconds(&self.pid.to_string());
        self.connect_cpu = self.cpu_at_idle.zip(self.cpu_at_start).map(|(now, before)| now.minus(before));
    }

    fn end(&mut self) {
        self.end_kib = self.read("VmRSS");
        self.hwm_kib = self.read("VmHWM");
        self.cpu = self.cpu_at_idle.zip(cpu_seconds(&self.pid.to_string())).map(|(before, now)| now.minus(before));
        self.cpu_seconds = self.cpu.map(Cpu::total);
    }

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

    /// Lines for one process among several: which, memory and growth per connection, CPU.
    fn render_lines(&self, r: &mut Text, label: &str, cpu: &dyn Fn(Option<f64>) -> String) {
        let conns = match (self.connections, self.per_connection_kib) {
            (Some(n), Some(per)) if n > 0 => format!(", {n} conns x {per:.1} KiB"),
            (Some(n), None) if n > 0 => format!(", {n} conns"),
            _ => String::new(),
        };
        let end = format!("end {}, peak {}{conns}", mib_or(self.end_kib), mib(self.peak_kib));
        let mem = format!("idle {}, {end}", mib_or(self.idle_kib));
        match &self.node {
            Some(url) => {
                r.row(&format!("  {label} (pid {})", self.pid), url.clone());
                r.row("", mem);
            }
            None => r.row(&format!("  {label} (pid {})", self.pid), mem),
        }
        r.row("", format!("CPU {}", cpu(self.cpu_seconds)));
        if self.gone {
            r.row("", "GONE during the run (exited or crashed)  <-- FAIL".into());
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn mib_or(kib: Option<u64>) -> String {
    kib.map_or("-".into(), mib)
}

/// Growth per connection in KiB, if it is large enough to be new memory rather than reused.
fn growth(now_kib: u64, before_kib: u64, connections: usize) -> Option<f64> {
    if connections == 0 {
        return None;
    }
    Some(now_kib.saturating_sub(before_kib) as f64 / connections as f64).filter(|&kib| kib >= MIN_GROWTH_KIB)
}

/// The sum, if every reading is there.
fn sum(values: impl Iterator<Item = Option<u64>>) -> Option<u64> {
    values.sum()
}

fn sum_f(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.sum()
}

fn sum_cpu(values: impl Iterator<Item = Option<Cpu>>) -> Option<Cpu> {
    values.map(|v| v.ok_or(())).try_fold(Cpu::default(), |acc, v| v.map(|v| acc.plus(v))).ok()
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

/// User and system CPU seconds of a process so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> Option<Cpu> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// User and system CPU seconds of the calling thread so far.
pub fn thread_cpu() -> Option<Cpu> {
    parse_stat(&std::fs::read_to_string("/proc/thread-self/stat").ok()?)
}

/// CPU seconds the whole machine has spent in irq and softirq so far, from /proc/stat.
fn machine_irq() -> Option<f64> {
    parse_machine_irq(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine_irq(stat: &str) -> Option<f64> {
    // cpu  user nice system idle iowait irq softirq steal ...
    let mut ticks = stat.lines().next()?.strip_prefix("cpu ")?.split_whitespace().map(|t| t.parse::<u64>().ok());
    let mut next = || ticks.next().flatten();
    let (_user, _nice, _system, _idle, _iowait, irq, softirq) =
        (next()?, next()?, next()?, next()?, next()?, next()?, next()?);
    Some((irq + softirq) as f64 / USER_HZ)
}

/// CPU seconds of every process but `ours` and the kernel's softirq threads, including the
/// children each has reaped, keyed by pid and start time (pids are reused).
fn processes(ours: &[u32]) -> HashMap<(u32, u64), f64> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return HashMap::new() };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        if ours.contains(&pid) {
            return None;
        }
        let (start, cpu) = parse_process(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
        Some(((pid, start), cpu))
    })
    .collect()
}

/// CPU used between two `processes` readings: the growth of those alive at both, all of those
/// started since. (Those that ended and were reaped count through their parent.)
fn others_since(before: &HashMap<(u32, u64), f64>, now: &HashMap<(u32, u64), f64>) -> f64 {
    now.iter().map(|(k, &cpu)| (cpu - before.get(k).copied().unwrap_or(0.0)).max(0.0)).sum()
}

/// Start time (ticks since boot) and own + reaped children's CPU seconds from
/// `/proc/<pid>/stat`; `None` for a softirq thread (its work is on the softirq line).
fn parse_process(stat: &str) -> Option<(u64, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    if head.split_once('(')?.1.starts_with("ksoftirqd/") {
        return None;
    }
    // Fields from 3 (state) on: utime, stime, cutime, cstime are 14..=17, starttime is 22.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3)?.parse::<i64>().ok();
    let cpu = ticks(14)? + ticks(15)? + ticks(16)? + ticks(17)?;
    Some((ticks(22)? as u64, cpu as f64 / USER_HZ))
}

fn parse_stat(stat: &str) -> Option<Cpu> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Cpu { user: utime as f64 / USER_HZ, system: stime as f64 / USER_HZ })
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
        let cpu = parse_stat(stat).unwrap();
        assert_eq!((cpu.user, cpu.system, cpu.total()), (2.5, 0.75, 3.25));
        assert!(cpu_seconds("self").is_some());
    }

    #[test]
    fn growth_per_connection_ignores_reused_memory() {
        assert_eq!(growth(10_240, 2_048, 1000), Some(8.192));
        assert_eq!(growth(2_100, 2_048, 1000), None);
        assert_eq!(growth(10_240, 2_048, 0), None);
        assert_eq!(sum([Some(1), Some(2)].into_iter()), Some(3));
        assert_eq!(sum([Some(1), None].into_iter()), None);
    }

    #[test]
    fn pids_match_nodes_only_when_there_are_as_many() {
        let me = std::process::id();
        let node = |port: u16| Node {
            origin: format!("http://127.0.0.1:{port}"),
            publish_url: format!("http://127.0.0.1:{port}/api/publish").parse().unwrap(),
            ws_url: format!("ws://127.0.0.1:{port}/ws").parse().unwrap(),
            authority: format!("127.0.0.1:{port}"),
        };
        let nodes = [node(1), node(2)];
        let watch = Watch { pids: vec![me, me], redis_pids: vec![me] };
        let mut u = Usage::start(&watch, &nodes, &[3, 2]).unwrap();
        assert_eq!(u.servers[1].node.as_deref(), Some("http://127.0.0.1:2"));
        assert_eq!(u.servers[1].connections, Some(2));
        assert_eq!(u.server.as_ref().map(|t| t.nodes), Some(2));
        u.idle();
        u.sample();
        u.end();
        assert!(!u.gone());
        assert!(u.server.as_ref().is_some_and(|t| t.cpu_seconds.is_some() && t.end_kib.is_some()));
        let watch = Watch { pids: vec![me], redis_pids: vec![] };
        let u = Usage::start(&watch, &nodes, &[3, 2]).unwrap();
        assert_eq!((u.servers[0].node.as_deref(), u.servers[0].connections), (None, None));
        let mut text = Text::default();
        u.render(&mut text);
    }

    #[test]
    fn other_processes_count_reaped_children_and_newcomers() {
        let stat = "4242 (cargo) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 30 20 20 0 3 0 100 0 0";
        assert_eq!(parse_process(stat), Some((100, 3.75)));
        assert_eq!(parse_process("7 (ksoftirqd/0) S 2 0 0 0 -1 0 0 0 0 0 0 50 0 0 20 0 1 0 9 0 0"), None);
        let before = HashMap::from([((1, 10), 1.0), ((2, 20), 5.0), ((3, 30), 2.0)]);
        // 1 grew, 2 is gone, 3 is a new process on a reused pid, 4 is new.
        let now = HashMap::from([((1, 10), 1.5), ((3, 99), 0.25), ((4, 40), 1.0)]);
        assert_eq!(others_since(&before, &now), 1.75);
        let me = std::process::id();
        assert!(!processes(&[me]).keys().any(|(pid, _)| *pid == me));
        assert!(!processes(&[]).is_empty());
    }

    #[test]
    fn machine_irq_time_is_irq_plus_softirq() {
        let stat = "cpu  100 20 30 5000 400 5 6 7 0 0\ncpu0 50 10 15 2500 200 2 3 3 0 0\n";
        assert_eq!(parse_machine_irq(stat), Some(0.11));
        assert!(machine_irq().is_some());
    }
}
