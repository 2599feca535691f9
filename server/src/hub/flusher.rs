//! The hub's flusher: writes what the fan-out queued on sessions' express lanes. The fan-out
//! only queues (no syscall on its path, no task woken per session); the flusher then writes
//! each socket it touched once, however many messages arrived for it meanwhile. A paced message
//! costs one write per socket; a burst costs one write per socket for the whole burst.
//!
//! Under load the flusher rests between rounds, for `--flush-rest` times the round it just
//! wrote (at most `MAX_REST`): a write costs the kernel about the same for one frame as for
//! several, so frames that gather meanwhile go out together. That keeps the node's writes at a
//! bounded share of a core, and leaves the rest of the machine (the readers on the other end
//! of loopback, the kernel's packet processing) the CPU it needs. Rounds shorter than
//! `MIN_REST` (a small node, a quiet channel) never rest: their frames are written at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::Histogram;
use tokio::sync::Notify;

use super::handle::Express;
use crate::engine::now_us;
use crate::locks::lock;

/// The longest rest between two rounds, whatever the round took.
const MAX_REST: Duration = Duration::from_millis(20);
/// Rests shorter than this are skipped (the timer's resolution is a millisecond).
const MIN_REST: Duration = Duration::from_millis(1);

/// Sockets with frames to write, and the flusher's wake-up.
#[derive(Default)]
pub struct Flusher {
    dirty: Mutex<Dirty>,
    wake: Notify,
    stopped: AtomicBool,
    /// Rest after a round, as a multiple of the round's duration (`--flush-rest`).
    rest: f64,
}

#[derive(Default)]
struct Dirty {
    lanes: Vec<Express>,
    /// When the oldest message waiting in them was stored (µs since the Unix epoch).
    oldest_us: Option<u64>,
}

impl Flusher {
    /// A flusher resting `rest` times each round's duration after it.
    pub fn new(rest: f64) -> Self {
        Self { rest, ..Self::default() }
    }

    /// Hands over `lanes` that got frames of a message stored at `time_us`.
    pub fn add(&self, lanes: Vec<Express>, time_us: u64) {
        if lanes.is_empty() {
            return;
        }
        let mut dirty = lock(&self.dirty);
        dirty.lanes.extend(lanes);
        dirty.oldest_us = Some(dirty.oldest_us.map_or(time_us, |t| t.min(time_us)));
        drop(dirty);
        self.wake.notify_one();
    }

    /// Ends `run` (the hub is gone).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Writes every dirty socket, round after round; a socket that cannot take everything
    /// wakes its session's task, which waits for it. Observes store-to-write latency once a
    /// round (its oldest message).
    pub async fn run(self: Arc<Self>, latency: Histogram) {
        let mut round = Vec::new();
        loop {
            self.wake.notified().await;
            if self.stopped.load(Ordering::Relaxed) {
                return;
            }
            let started = Instant::now();
            let oldest = {
                let mut dirty = lock(&self.dirty);
                std::mem::swap(&mut dirty.lanes, &mut round);
                dirty.oldest_us.take()
            };
            for express in round.drain(..) {
                // Flushing takes it off the list: frames queued from now on put it back in.
                if !matches!(express.flush(), Ok(true)) {
                    express.blocked().notify_one();
                }
            }
            if let Some(t) = oldest {
                latency.observe(now_us().saturating_sub(t) as f64 / 1e6);
            }
            // Give back what a burst grew.
            if round.capacity() > 4096 {
                round = Vec::new();
            }
            let rest = started.elapsed().mul_f64(self.rest).min(MAX_REST);
            if rest >= MIN_REST {
                tokio::time::sleep(rest).await;
            }
        }
    }
}
