//! The hub's flusher: writes each socket the fan-out touched once a round, however many
//! messages arrived for it meanwhile. The fan-out only queues (no syscall on its path, no task
//! woken per session). A paced message costs one write per socket; a burst costs one write per
//! socket for the whole burst.
//!
//! Messages delivered while the flusher rests or waits are held by their channels (`local.rs`)
//! and fanned out when the next round starts, all of a channel's at once: each socket's state
//! is fetched once for them, not once per message. Messages delivered while a round is being
//! written are fanned out at once instead, so that the sockets the round has not reached yet
//! take them in this round rather than wait for the next (holding those too saved a few per
//! cent more of the node's CPU, and cost the half-rate benchmark 3 to 9 ms of median latency).
//!
//! Under load the flusher rests between rounds, for `--flush-rest` times the round it just
//! wrote (at most `MAX_REST`): a write costs the kernel about the same for one frame as for
//! several, so frames that gather meanwhile go out together. That keeps the node's writes at a
//! bounded share of a core, and leaves the rest of the machine (the readers on the other end
//! of loopback, the kernel's packet processing) the CPU it needs. Rounds shorter than
//! `MIN_REST` (a small node, a quiet channel) never rest: their frames are written at once.
//!
//! A big round is split among the runtime's workers, parts of at least `PART` sockets, written
//! at the same time: a write is a system call of several microseconds, so one thread writing
//! every socket of a node caps the node at one core's worth of writes, and the last socket of
//! a 10,000-socket round waits for the 9,999 before it. Each socket is in one part only, so its
//! frames still go out in order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter};
use tokio::sync::Notify;

use super::handle::Express;
use super::local::LocalChannel;
use crate::engine::now_us;
use crate::locks::lock;

/// The longest rest between two rounds, whatever the round took.
const MAX_REST: Duration = Duration::from_millis(20);
/// Rests shorter than this are skipped (the timer's resolution is a millisecond).
const MIN_REST: Duration = Duration::from_millis(1);
/// The fewest sockets a part of a split round has (about 10 ms of writes), so a round is split
/// only from twice this. A socket written on another core than the fan-out's has its state
/// fetched from that core's cache: about 0.2 µs more user time per delivery in the paced
/// benchmark (medians of seven runs, 1.18 vs 0.95 µs), worth paying only when a round is long
/// enough that its last sockets' wait is what subscribers notice.
const PART: usize = 1000;

/// What the flusher reports, once a round.
pub struct RoundMetrics {
    /// Store-to-write latency of the round's oldest message.
    pub latency: Histogram,
    /// How long the round took.
    pub duration: Histogram,
    /// Sockets written (deliveries per write = messages delivered / this).
    pub writes: IntCounter,
}

/// Channels with messages to fan out, sockets to write, and the flusher's wake-up.
#[derive(Default)]
pub struct Flusher {
    dirty: Mutex<Dirty>,
    wake: Notify,
    /// A round is being written: the fan-out happens as messages come.
    pub(super) writing: AtomicBool,
    stopped: AtomicBool,
    /// Rest after a round, as a multiple of the round's duration (`--flush-rest`).
    rest: f64,
}

#[derive(Default)]
struct Dirty {
    /// Channels holding messages, fanned out when the next round starts.
    channels: Vec<Arc<LocalChannel>>,
    /// Sockets the fan-out queued frames on while a round was being written.
    lanes: Vec<Express>,
    /// When the oldest message among them was stored (µs since the Unix epoch).
    oldest_us: Option<u64>,
}

impl Dirty {
    fn since(&mut self, time_us: u64) {
        self.oldest_us = Some(self.oldest_us.map_or(time_us, |t| t.min(time_us)));
    }
}

impl Flusher {
    /// A flusher resting `rest` times each round's duration after it.
    pub fn new(rest: f64) -> Self {
        Self { rest, ..Self::default() }
    }

    /// A round is being written now: a message is better fanned out at once.
    pub fn writing(&self) -> bool {
        self.writing.load(Ordering::Relaxed)
    }

    /// Hands over `channel`, which now holds a message stored at `time_us`.
    pub fn add(&self, channel: Arc<LocalChannel>, time_us: u64) {
        let mut dirty = lock(&self.dirty);
        dirty.channels.push(channel);
        dirty.since(time_us);
        drop(dirty);
        self.wake.notify_one();
    }

    /// Hands over `lanes` that got frames of a message stored at `time_us`.
    pub fn add_lanes(&self, lanes: Vec<Express>, time_us: u64) {
        if lanes.is_empty() {
            return;
        }
        let mut dirty = lock(&self.dirty);
        dirty.lanes.extend(lanes);
        dirty.since(time_us);
        drop(dirty);
        self.wake.notify_one();
    }

    /// Ends `run` (the hub is gone).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Takes the sockets handed over and fans out what the channels handed over hold, into
    /// `round`; returns when the oldest message among them was stored.
    pub fn fan_out(&self, channels: &mut Vec<Arc<LocalChannel>>, round: &mut Vec<Express>) -> Option<u64> {
        let oldest = {
            let mut dirty = lock(&self.dirty);
            std::mem::swap(&mut dirty.channels, channels);
            std::mem::swap(&mut dirty.lanes, round);
            dirty.oldest_us.take()
        };
        for channel in channels.drain(..) {
            channel.fan_out(round);
        }
        oldest
    }

    /// Fans out and writes, round after round, a big round on every worker at once.
    pub async fn run(self: Arc<Self>, metrics: RoundMetrics) {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let (mut channels, mut round) = (Vec::new(), Vec::new());
        loop {
            self.wake.notified().await;
            if self.stopped.load(Ordering::Relaxed) {
                return;
            }
            let started = Instant::now();
            // A panic in a fan-out or a write is a bug: it is logged and counted (`panics.rs`),
            // and the flusher goes on, so every other socket of the node keeps being written.
            let oldest = survive(|| self.fan_out(&mut channels, &mut round)).flatten();
            channels.clear();
            let sockets = round.len();
            metrics.writes.inc_by(sockets as u64);
            self.writing.store(true, Ordering::Relaxed);
            let parts = parts(sockets, workers);
            if parts > 1 {
                write_in_parallel(split(&mut round, parts)).await;
            } else {
                survive(|| write(round.drain(..)));
                round.clear();
            }
            self.writing.store(false, Ordering::Relaxed);
            // Rounds that wrote nothing are not measured: a message that went only through
            // sessions' queues (SSE, a channel off the lane) is measured by the session.
            if let Some(t) = oldest
                && sockets > 0
            {
                metrics.latency.observe(now_us().saturating_sub(t) as f64 / 1e6);
            }
            let took = started.elapsed();
            metrics.duration.observe(took.as_secs_f64());
            // Give back what a burst grew.
            if round.capacity() > 4096 {
                round = Vec::new();
            }
            let rest = took.mul_f64(self.rest).min(MAX_REST);
            if rest >= MIN_REST {
                tokio::time::sleep(rest).await;
            }
        }
    }
}

/// Runs `f`; `None` if it panicked (the panic hook has logged and counted it).
fn survive<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}

/// Writes every socket of `lanes`; a socket that cannot take everything wakes its session's
/// task, which waits for it.
fn write(lanes: impl IntoIterator<Item = Express>) {
    for express in lanes {
        // Flushing takes it off the list: frames queued from now on put it back in.
        if !matches!(express.flush(), Ok(true)) {
            express.blocked().notify_one();
        }
    }
}

/// How many parts a round of `sockets` is written in: one per worker, each of at least `PART`.
fn parts(sockets: usize, workers: usize) -> usize {
    workers.min(sockets / PART).max(1)
}

/// Moves `round`'s lanes into `parts` parts of nearly equal size (fewer if there are fewer
/// lanes), leaving `round` empty with its capacity kept.
fn split(round: &mut Vec<Express>, parts: usize) -> Vec<Vec<Express>> {
    let per = round.len().div_ceil(parts.max(1)).max(1);
    let mut out = Vec::with_capacity(parts);
    while !round.is_empty() {
        let at = round.len().saturating_sub(per);
        out.push(round.split_off(at));
    }
    out
}

/// Writes each part on a task of its own and waits for all. Every part is spawned (none is
/// written inline) so that the runtime's other workers can take them: the task a worker
/// spawns last waits in a slot of that worker's that others do not steal from.
async fn write_in_parallel(parts: Vec<Vec<Express>>) {
    let tasks: Vec<_> = parts.into_iter().map(|part| tokio::spawn(async move { write(part) })).collect();
    for task in tasks {
        // A panicking write (a bug) must not stop the flusher: every other socket of the node
        // keeps being written.
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;
    use crate::hub::{Delivery, Outlet, Queued};

    /// An outlet that counts its flushes. With a `gate`, its flush also arrives there and
    /// waits (up to 10 s) until a second flush has arrived: one thread writing the parts of a
    /// round in turn never gets past it.
    #[derive(Default)]
    struct Socket {
        flushes: AtomicUsize,
        gate: Option<Arc<AtomicUsize>>,
        notify: Notify,
        /// Its flush panics (after notifying `flushed`).
        panics: bool,
        flushed: Notify,
    }

    impl Outlet for Socket {
        fn queue(&self, _: &Delivery) -> Queued {
            unreachable!("the flusher only flushes")
        }
        fn flush(&self) -> std::io::Result<bool> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            self.flushed.notify_one();
            assert!(!self.panics, "a deliberate panic in a test");
            if let Some(gate) = &self.gate {
                gate.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(10);
                while gate.load(Ordering::SeqCst) < 2 {
                    assert!(Instant::now() < deadline, "no other part was being written meanwhile");
                    std::hint::spin_loop();
                }
            }
            Ok(true)
        }
        fn messages(&self) -> u64 {
            0
        }
        fn blocked(&self) -> &Notify {
            &self.notify
        }
    }

    fn sockets(n: usize) -> (Vec<Arc<Socket>>, Vec<Express>) {
        let all: Vec<Arc<Socket>> = (0..n).map(|_| Arc::default()).collect();
        let lanes = all.iter().map(|s| s.clone() as Express).collect();
        (all, lanes)
    }

    fn flushed_once(all: &[Arc<Socket>]) -> bool {
        all.iter().all(|s| s.flushes.load(Ordering::SeqCst) == 1)
    }

    #[test]
    fn a_round_splits_into_parts_that_hold_every_lane_once() {
        for (n, parts) in [(0, 2), (1, 2), (257, 2), (1000, 3), (1001, 4), (5, 8)] {
            let (all, mut round) = sockets(n);
            let split = split(&mut round, parts);
            assert!(round.is_empty());
            let sizes: Vec<usize> = split.iter().map(Vec::len).collect();
            assert!(sizes.len() <= parts && sizes.iter().all(|&s| s <= n.div_ceil(parts)), "{n} in {parts}: {sizes:?}");
            write(split.into_iter().flatten());
            assert!(flushed_once(&all), "{n} lanes in {parts} parts");
        }
    }

    #[test]
    fn only_rounds_of_at_least_two_parts_worth_are_split_and_never_past_the_workers() {
        assert_eq!(parts(0, 2), 1);
        assert_eq!(parts(2 * PART - 1, 2), 1, "under two parts' worth a round stays whole");
        assert_eq!(parts(2 * PART, 2), 2);
        assert_eq!(parts(10 * PART, 4), 4);
        assert_eq!(parts(5 * PART, 8), 5);
        assert_eq!(parts(10 * PART, 1), 1);
    }

    /// Each part of a big round starts with a gated socket: the round completes only if two
    /// workers write the parts at the same time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_big_round_is_written_by_two_workers_at_once() {
        let (all, mut round) = sockets(2 * PART);
        let gate = Arc::new(AtomicUsize::new(0));
        let gated: Vec<Arc<Socket>> =
            (0..2).map(|_| Arc::new(Socket { gate: Some(gate.clone()), ..Socket::default() })).collect();
        let mut parts = split(&mut round, 2);
        for (part, first) in parts.iter_mut().zip(&gated) {
            part.insert(0, first.clone());
        }
        write_in_parallel(parts).await;
        assert!(flushed_once(&all) && flushed_once(&gated));
    }

    #[tokio::test]
    async fn a_panicking_write_does_not_stop_the_flusher() {
        let flusher = Arc::new(Flusher::new(0.0));
        let histogram = |name: &str| Histogram::with_opts(prometheus::HistogramOpts::new(name, name)).unwrap();
        let metrics = RoundMetrics {
            latency: histogram("latency"),
            duration: histogram("duration"),
            writes: IntCounter::new("writes", "writes").unwrap(),
        };
        let writes = metrics.writes.clone();
        tokio::spawn(flusher.clone().run(metrics));
        let bad = Arc::new(Socket { panics: true, ..Socket::default() });
        flusher.add_lanes(vec![bad.clone()], 1);
        tokio::time::timeout(Duration::from_secs(10), bad.flushed.notified()).await.expect("the first round ran");
        let good = Arc::new(Socket::default());
        flusher.add_lanes(vec![good.clone()], 1);
        tokio::time::timeout(Duration::from_secs(10), good.flushed.notified()).await.expect("a round after the panic");
        assert_eq!(writes.get(), 2);
    }
}
