//! The memory engine's two bounds: how many channels it remembers and how many bytes of history
//! it holds. Each is restored, when broken, by forgetting what was used longest ago, down to
//! 90% of the bound so that the next pass is many publishes or channels away.
//!
//! A forgotten channel starts a new epoch when it is used again, and a trimmed history is gone
//! for replay, so clients that come back get `recovered: false`: told plainly, never a gap.
//! Channels with subscribers are never forgotten (their epoch is in use); their history can be
//! trimmed like any other.

use std::sync::atomic::Ordering;

use super::{MemoryEngine, lock};
use crate::channel::ChannelName;

/// What a restored bound is brought down to, of the bound.
const LOW_WATER: f64 = 0.9;

impl MemoryEngine {
    /// Forgets the longest-unused channels nobody subscribes to until at most 90% of
    /// `max_channels` are remembered.
    pub(super) fn shed_channels(&self) {
        let Some(_pass) = Pass::start(self) else { return };
        let target = (self.max_channels as f64 * LOW_WATER) as usize;
        let held = self.held_channels.load(Ordering::Relaxed);
        let mut idle: Vec<(u64, ChannelName)> = Vec::new();
        for shard in &self.channels {
            let shard = lock(shard);
            idle.extend(shard.iter().filter_map(|(name, log)| {
                let log = lock(log);
                (log.subscribers == 0).then(|| (log.last_use, name.clone()))
            }));
        }
        idle.sort_unstable_by_key(|(touched, _)| *touched);
        let (mut forgotten, mut freed) = (0, 0);
        for (_, name) in idle.into_iter().take(held.saturating_sub(target)) {
            let mut shard = lock(self.channels.of(&name));
            // Still idle? A subscriber may have come since the scan.
            if shard.get(&name).is_some_and(|log| lock(log).subscribers == 0)
                && let Some(log) = shard.remove(&name)
            {
                forgotten += 1;
                freed += lock(&log).bytes;
            }
        }
        self.forgot(forgotten);
        self.held_bytes.fetch_sub(freed, Ordering::Relaxed);
        self.metrics.history_bytes.set(self.held_bytes.load(Ordering::Relaxed) as i64);
    }

    /// Drops the oldest messages of the least recently published channels until their history
    /// takes at most 90% of `max_history_bytes`.
    pub(super) fn shed_bytes(&self) {
        let Some(_pass) = Pass::start(self) else { return };
        let target = (self.max_history_bytes as f64 * LOW_WATER) as usize;
        let mut stored: Vec<(u64, ChannelName)> = Vec::new();
        for shard in &self.channels {
            let shard = lock(shard);
            stored.extend(shard.iter().filter_map(|(name, log)| {
                let log = lock(log);
                (!log.ring.is_empty()).then(|| (log.published_ms, name.clone()))
            }));
        }
        stored.sort_unstable_by_key(|(published, _)| *published);
        for (_, name) in stored {
            if self.held_bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            let Some(log) = lock(self.channels.of(&name)).get(&name).cloned() else { continue };
            let mut log = lock(&log);
            while !log.ring.is_empty() && self.held_bytes.load(Ordering::Relaxed) > target {
                let freed = log.drop_oldest();
                self.held_bytes.fetch_sub(freed, Ordering::Relaxed);
            }
        }
        self.metrics.history_bytes.set(self.held_bytes.load(Ordering::Relaxed) as i64);
    }
}

/// One restoring pass at a time: the others skip, since the running one restores the bound.
struct Pass<'a>(&'a MemoryEngine);

impl<'a> Pass<'a> {
    fn start(engine: &'a MemoryEngine) -> Option<Self> {
        (!engine.shedding.swap(true, Ordering::AcqRel)).then_some(Pass(engine))
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.shedding.store(false, Ordering::Release);
    }
}
