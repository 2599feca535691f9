//! The in-process engine: one node, no Redis. The embedded default.
//!
//! Each channel has a ring buffer of its last `history_size` publications, a random epoch made
//! when the channel is first touched, and a `top` offset. Publishing assigns the next offset and
//! delivers to the hub while holding that channel's lock, so delivery order is offset order and
//! a concurrent history read sees either the message or the subscriber, never neither. Channels
//! are sharded, so one channel's storm never blocks another's.
//!
//! Expiry mirrors the Redis layout: the whole history goes `history_ttl` after the last publish
//! (the stream key's TTL), and a channel nobody subscribes to or touches for `meta_ttl` is
//! forgotten with its epoch and top (the meta key's TTL). Two bounds hold on top of that
//! (`bounds.rs`): at most `max_channels` channels are remembered, and their history takes at most
//! `max_history_bytes`; past either, what was used longest ago goes first.

mod bounds;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    ClientInfo, ClusterPlane, DataPlane, Deliver, Engine, EngineError, Epoch, HistoryBounds, HistoryPage, HistoryQuery,
    NewMessage, NodeInfo, Offset, Position, PresenceChange, Publication, Survey, SurveyHandler, now_ms, now_us,
};
use crate::channel::ChannelName;
use crate::locks::lock;
use crate::metrics::MemoryMetrics;
use crate::shard::Sharded;

type Shard<T> = Mutex<HashMap<ChannelName, T>>;

/// History sizes, lifetimes and bounds, filled from `Config`.
#[derive(Debug, Clone, Copy)]
pub struct MemorySettings {
    pub history_size: usize,
    pub history_ttl: Duration,
    pub meta_ttl: Duration,
    pub idempotency_ttl: Duration,
    pub node_ttl: Duration,
    /// Channels remembered at most (`--max-idle-channels`); subscribed ones are never forgotten.
    pub max_channels: usize,
    /// Bytes of history held at most (`--max-history-bytes`).
    pub max_history_bytes: usize,
}

/// The single-node engine.
pub struct MemoryEngine {
    history_size: usize,
    history_ttl: Duration,
    meta_ttl: Duration,
    idempotency_ttl: Duration,
    node_ttl: Duration,
    deliver: Weak<dyn Deliver>,
    channels: Sharded<Shard<Arc<Mutex<ChannelLog>>>>,
    /// The one node of a memory-engine cluster.
    node: Mutex<Option<NodeInfo>>,
    control: std::sync::OnceLock<Weak<dyn SurveyHandler>>,
    /// User -> end of ban (Unix ms).
    bans: Mutex<HashMap<String, u64>>,
    presence: Sharded<Shard<HashMap<Arc<str>, ClientInfo>>>,
    max_channels: usize,
    max_history_bytes: usize,
    /// Channels remembered now, and the bytes of their history.
    held_channels: AtomicUsize,
    held_bytes: AtomicUsize,
    /// Set while a bound is being restored, so one pass runs at a time.
    shedding: AtomicBool,
    /// Counts uses of channels, for `ChannelLog::last_use`.
    uses: AtomicU64,
    metrics: MemoryMetrics,
}

/// One channel's history and position.
struct ChannelLog {
    epoch: Epoch,
    top: Offset,
    ring: VecDeque<Arc<Publication>>,
    /// When the channel was last published to (history expiry).
    published_ms: u64,
    /// When the channel was last published to, read or left (forgetting idle channels).
    touched_ms: u64,
    /// The engine's use count at the last publish, read or leave: orders channels by last use
    /// exactly, where milliseconds tie.
    last_use: u64,
    /// Live subscriptions of this node: a subscribed channel is never forgotten.
    subscribers: usize,
    /// Idempotency key -> (offset, epoch, lapse time in ms).
    idempotent: HashMap<String, (Offset, Epoch, u64)>,
    /// What the ring holds, by `held_size`.
    bytes: usize,
}

/// What one stored publication costs the memory engine, roughly: its data, its names and the
/// bookkeeping around them.
fn held_size(p: &Publication) -> usize {
    p.data.get().len() + p.channel.as_str().len() + p.event.as_ref().map_or(0, String::len) + 200
}

impl ChannelLog {
    fn new() -> Self {
        let now = now_ms();
        Self {
            epoch: Epoch::random(),
            top: 0,
            ring: VecDeque::new(),
            published_ms: now,
            touched_ms: now,
            last_use: 0,
            subscribers: 0,
            idempotent: HashMap::new(),
            bytes: 0,
        }
    }

    /// Appends `p`, dropping the oldest beyond `size`; returns the bytes added and freed.
    fn push(&mut self, p: Arc<Publication>, size: usize) -> (usize, usize) {
        let freed = if self.ring.len() == size { self.drop_oldest() } else { 0 };
        let added = held_size(&p);
        self.ring.push_back(p);
        self.bytes += added;
        (added, freed)
    }

    /// Drops the oldest stored message; returns the bytes freed.
    fn drop_oldest(&mut self) -> usize {
        let freed = self.ring.pop_front().map_or(0, |p| held_size(&p));
        self.bytes -= freed;
        freed
    }

    /// Drops the whole history once `ttl_ms` passed since the last publish; it is then gone for
    /// replay like trimmed messages, while epoch and top stay. Returns the bytes freed.
    fn expire(&mut self, now: u64, ttl_ms: u64) -> usize {
        self.idempotent.retain(|_, (_, _, lapse)| *lapse > now);
        if now.saturating_sub(self.published_ms) > ttl_ms {
            self.ring.clear();
            return std::mem::take(&mut self.bytes);
        }
        0
    }

    /// Whether the sweeper may forget this channel.
    fn forgettable(&self, now: u64, meta_ttl_ms: u64) -> bool {
        self.subscribers == 0 && self.ring.is_empty() && now.saturating_sub(self.touched_ms) > meta_ttl_ms
    }

    fn read(&self, query: HistoryQuery) -> Vec<Arc<Publication>> {
        let (skip, limit) = match query {
            HistoryQuery::After { after, limit } => {
                let first = self.ring.front().map_or(self.top + 1, |p| p.offset);
                (after.saturating_add(1).saturating_sub(first) as usize, limit)
            }
            HistoryQuery::Latest { limit } => (self.ring.len().saturating_sub(limit), limit),
        };
        self.ring.iter().skip(skip).take(limit).cloned().collect()
    }
}

impl MemoryEngine {
    /// Starts the engine and its sweeper; `deliver` is the hub (held weakly: the hub owns us).
    pub fn start(settings: MemorySettings, deliver: Weak<dyn Deliver>, metrics: MemoryMetrics) -> Arc<Self> {
        let MemorySettings {
            history_size,
            history_ttl,
            meta_ttl,
            idempotency_ttl,
            node_ttl,
            max_channels,
            max_history_bytes,
        } = settings;
        let engine = Arc::new(Self {
            history_size,
            history_ttl,
            meta_ttl,
            idempotency_ttl,
            node_ttl,
            deliver,
            channels: Sharded::default(),
            node: Mutex::new(None),
            control: std::sync::OnceLock::new(),
            bans: Mutex::new(HashMap::new()),
            presence: Sharded::default(),
            max_channels,
            max_history_bytes,
            held_channels: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            shedding: AtomicBool::new(false),
            uses: AtomicU64::new(0),
            metrics,
        });
        tokio::spawn(sweep(Arc::downgrade(&engine), history_ttl));
        engine
    }

    /// The channel's log, made if the channel is new (which may push the oldest unused channels
    /// out, past `max_channels`).
    fn log(&self, channel: &ChannelName) -> Arc<Mutex<ChannelLog>> {
        let (log, made) = {
            let mut shard = lock(self.channels.of(channel));
            let mut made = false;
            let log = shard
                .entry(channel.clone())
                .or_insert_with(|| {
                    made = true;
                    Arc::new(Mutex::new(ChannelLog { last_use: self.used(), ..ChannelLog::new() }))
                })
                .clone();
            (log, made)
        };
        if made {
            let held = self.held_channels.fetch_add(1, Ordering::Relaxed) + 1;
            self.metrics.channels.set(held as i64);
            if held > self.max_channels {
                self.shed_channels();
            }
        }
        log
    }

    /// The next use count.
    fn used(&self) -> u64 {
        self.uses.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts bytes added to and freed from history, restoring the bytes bound if it broke.
    fn held(&self, added: usize, freed: usize) {
        // Freed bytes were added before, so the count never goes below zero.
        let now = self.held_bytes.fetch_add(added, Ordering::Relaxed) + added;
        let now = if freed == 0 { now } else { self.held_bytes.fetch_sub(freed, Ordering::Relaxed) - freed };
        self.metrics.history_bytes.set(now as i64);
        if now > self.max_history_bytes {
            self.shed_bytes();
        }
    }

    fn ttl_ms(&self) -> u64 {
        self.history_ttl.as_millis() as u64
    }

    /// Expires old history and forgets idle channels nobody subscribes to.
    fn sweep_once(&self) {
        let (now, ttl, meta_ttl) = (now_ms(), self.ttl_ms(), self.meta_ttl.as_millis() as u64);
        let (mut freed, mut forgotten) = (0, 0);
        for shard in &self.channels {
            lock(shard).retain(|_, log| {
                let mut log = lock(log);
                freed += log.expire(now, ttl);
                let forget = log.forgettable(now, meta_ttl);
                forgotten += usize::from(forget);
                !forget
            });
        }
        self.forgot(forgotten);
        self.held(0, freed);
    }

    /// Counts `n` channels forgotten.
    fn forgot(&self, n: usize) {
        let held = self.held_channels.fetch_sub(n, Ordering::Relaxed) - n;
        self.metrics.channels.set(held as i64);
    }

    fn announce(&self, change: PresenceChange, channel: &ChannelName, client: &ClientInfo) {
        if let Some(hub) = self.deliver.upgrade() {
            hub.deliver_presence(channel, change, client);
        }
    }
}

async fn sweep(engine: Weak<MemoryEngine>, ttl: Duration) {
    let mut tick = tokio::time::interval((ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(30)));
    loop {
        tick.tick().await;
        match engine.upgrade() {
            Some(engine) => engine.sweep_once(),
            None => return,
        }
    }
}

#[async_trait]
impl DataPlane for MemoryEngine {
    async fn publish(&self, channel: &ChannelName, msg: NewMessage) -> Result<Arc<Publication>, EngineError> {
        let log = self.log(channel);
        let mut log = lock(&log);
        let now_us = now_us();
        if let Some((offset, epoch, _)) = msg.idempotency_key.as_ref().and_then(|k| log.idempotent.get(k)) {
            return Ok(Arc::new(Publication::new(channel.clone(), epoch.clone(), *offset, msg, now_us)));
        }
        let key = msg.idempotency_key.clone();
        log.top += 1;
        log.touched_ms = now_us / 1000;
        log.published_ms = log.touched_ms;
        log.last_use = self.used();
        let publication = Arc::new(Publication::new(channel.clone(), log.epoch.clone(), log.top, msg, now_us));
        let (added, freed) = log.push(publication.clone(), self.history_size);
        if let Some(key) = key {
            let lapse = log.touched_ms + self.idempotency_ttl.as_millis() as u64;
            log.idempotent.insert(key, (publication.offset, publication.epoch.clone(), lapse));
        }
        // Delivered under the channel lock: per-channel delivery order is offset order.
        if let Some(hub) = self.deliver.upgrade() {
            hub.deliver(publication.clone());
        }
        drop(log);
        self.held(added, freed);
        Ok(publication)
    }

    /// The position is left to `history`: a read here is a lock, and it also counts as the
    /// channel's use.
    async fn subscribe(&self, channel: &ChannelName) -> Result<Option<Position>, EngineError> {
        lock(&self.log(channel)).subscribers += 1;
        Ok(None)
    }

    async fn unsubscribe(&self, channel: &ChannelName) {
        let log = self.log(channel);
        let mut log = lock(&log);
        log.subscribers = log.subscribers.saturating_sub(1);
        log.touched_ms = now_ms();
        log.last_use = self.used();
    }

    async fn history(&self, channel: &ChannelName, query: HistoryQuery) -> Result<HistoryPage, EngineError> {
        let log = self.log(channel);
        let (page, freed) = {
            let mut log = lock(&log);
            let now = now_ms();
            let freed = log.expire(now, self.ttl_ms());
            log.touched_ms = now;
            log.last_use = self.used();
            (HistoryPage { epoch: log.epoch.clone(), top: log.top, publications: log.read(query) }, freed)
        };
        self.held(0, freed);
        Ok(page)
    }

    async fn join(&self, channel: &ChannelName, client: &ClientInfo, announce: bool) -> Result<(), EngineError> {
        lock(self.presence.of(channel)).entry(channel.clone()).or_default().insert(client.conn.clone(), client.clone());
        if announce {
            self.announce(PresenceChange::Join, channel, client);
        }
        Ok(())
    }

    async fn leave(&self, channel: &ChannelName, client: &ClientInfo, announce: bool) {
        let removed = {
            let mut shard = lock(self.presence.of(channel));
            let removed = shard.get_mut(channel).and_then(|m| m.remove(&client.conn)).is_some();
            if shard.get(channel).is_some_and(HashMap::is_empty) {
                shard.remove(channel);
            }
            removed
        };
        if removed && announce {
            self.announce(PresenceChange::Leave, channel, client);
        }
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, EngineError> {
        let shard = lock(self.presence.of(channel));
        let mut clients: Vec<ClientInfo> =
            shard.get(channel).map(|m| m.values().cloned().collect()).unwrap_or_default();
        clients.sort_by(|a, b| (&a.user, &a.conn).cmp(&(&b.user, &b.conn)));
        Ok(clients)
    }

    async fn history_bounds(&self, channel: &ChannelName) -> Result<HistoryBounds, EngineError> {
        let log = self.log(channel);
        let (bounds, freed) = {
            let mut log = lock(&log);
            let freed = log.expire(now_ms(), self.ttl_ms());
            let bounds = HistoryBounds {
                epoch: log.epoch.to_string(),
                last_offset: log.top,
                len: log.ring.len() as u64,
                first_offset: log.ring.front().map(|p| p.offset),
            };
            (bounds, freed)
        };
        self.held(0, freed);
        Ok(bounds)
    }
}

#[async_trait]
impl ClusterPlane for MemoryEngine {
    async fn heartbeat(&self, info: &NodeInfo) -> Result<(), EngineError> {
        *lock(&self.node) = Some(info.clone());
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError> {
        let lapsed = now_ms().saturating_sub(self.node_ttl.as_millis() as u64);
        Ok(lock(&self.node).iter().filter(|n| n.updated_ms >= lapsed).cloned().collect())
    }

    fn set_survey_handler(&self, handler: Weak<dyn SurveyHandler>) {
        let _ = self.control.set(handler);
    }

    /// The cluster is this node: it answers itself.
    async fn survey(&self, request: &str, _timeout: Duration) -> Result<Survey, EngineError> {
        let Some(handler) = self.control.get().and_then(Weak::upgrade) else { return Ok(Survey::default()) };
        let id = lock(&self.node).as_ref().map(|n| n.id.clone()).unwrap_or_default();
        Ok(Survey { answers: vec![(id, handler.answer(request))], missing: Vec::new() })
    }

    async fn ban(&self, user: &str, until_ms: u64) -> Result<(), EngineError> {
        let mut bans = lock(&self.bans);
        let now = now_ms();
        bans.retain(|_, until| *until > now);
        bans.insert(user.to_owned(), until_ms);
        Ok(())
    }

    async fn unban(&self, user: &str) -> Result<bool, EngineError> {
        let now = now_ms();
        Ok(lock(&self.bans).remove(user).is_some_and(|until| until > now))
    }

    async fn banned_until(&self, user: &str) -> Result<Option<u64>, EngineError> {
        Ok(lock(&self.bans).get(user).copied().filter(|until| *until > now_ms()))
    }

    async fn deregister(&self, node: &str) {
        let mut slot = lock(&self.node);
        if slot.as_ref().is_some_and(|n| n.id == node) {
            *slot = None;
        }
    }
}

#[async_trait]
impl Engine for MemoryEngine {
    fn ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn msg(n: u64) -> NewMessage {
        NewMessage { event: None, data: RawValue::from_string(n.to_string()).unwrap(), idempotency_key: None }
    }

    fn engine(size: usize) -> Arc<MemoryEngine> {
        bounded(size, 100_000, 1 << 30)
    }

    fn bounded(size: usize, max_channels: usize, max_history_bytes: usize) -> Arc<MemoryEngine> {
        let none: Weak<dyn Deliver> = Weak::<NoHub>::new();
        let s = Duration::from_secs;
        let settings = MemorySettings {
            history_size: size,
            history_ttl: s(60),
            meta_ttl: s(600),
            idempotency_ttl: s(60),
            node_ttl: s(5),
            max_channels,
            max_history_bytes,
        };
        let identity = crate::metrics::Identity { node_id: "n", engine: "memory", max_connections: 1 };
        MemoryEngine::start(settings, none, crate::metrics::Metrics::new(&identity).memory)
    }

    struct NoHub;
    impl Deliver for NoHub {
        fn deliver(&self, _: Arc<Publication>) {}
        fn deliver_presence(&self, _: &ChannelName, _: PresenceChange, _: &ClientInfo) {}
        fn reset(&self, _: &ChannelName, _: &super::super::Position) {}
    }

    fn offsets(page: &HistoryPage) -> Vec<u64> {
        page.publications.iter().map(|p| p.offset).collect()
    }

    #[tokio::test]
    async fn offsets_are_contiguous_and_the_ring_keeps_the_newest() {
        let e = engine(3);
        let ch = ChannelName::parse("c").unwrap();
        for n in 1..=5 {
            assert_eq!(e.publish(&ch, msg(n)).await.unwrap().offset, n);
        }
        let page = e.history(&ch, HistoryQuery::After { after: 0, limit: 10 }).await.unwrap();
        assert_eq!((page.top, offsets(&page)), (5, vec![3, 4, 5]));
        let page = e.history(&ch, HistoryQuery::After { after: 3, limit: 10 }).await.unwrap();
        assert_eq!(offsets(&page), vec![4, 5]);
        let page = e.history(&ch, HistoryQuery::After { after: 3, limit: 1 }).await.unwrap();
        assert_eq!(offsets(&page), vec![4]);
        let page = e.history(&ch, HistoryQuery::After { after: 5, limit: 10 }).await.unwrap();
        assert!(page.publications.is_empty());
        let page = e.history(&ch, HistoryQuery::Latest { limit: 2 }).await.unwrap();
        assert_eq!(offsets(&page), vec![4, 5]);
    }

    #[tokio::test]
    async fn a_retried_publish_with_the_same_key_is_stored_once() {
        let e = engine(10);
        let ch = ChannelName::parse("c").unwrap();
        let keyed = |n| NewMessage { idempotency_key: Some("k1".into()), ..msg(n) };
        let first = e.publish(&ch, keyed(1)).await.unwrap();
        let again = e.publish(&ch, keyed(2)).await.unwrap();
        assert_eq!((first.offset, again.offset, &again.epoch), (1, 1, &first.epoch));
        let page = e.history(&ch, HistoryQuery::After { after: 0, limit: 10 }).await.unwrap();
        assert_eq!(offsets(&page), vec![1]);
    }

    #[tokio::test]
    async fn a_channel_keeps_its_epoch_from_first_read() {
        let e = engine(3);
        let ch = ChannelName::parse("c").unwrap();
        let before = e.history(&ch, HistoryQuery::Latest { limit: 1 }).await.unwrap();
        let p = e.publish(&ch, msg(1)).await.unwrap();
        assert_eq!((before.top, &p.epoch, p.offset), (0, &before.epoch, 1));
    }

    #[tokio::test]
    async fn history_expires_whole_after_the_last_publish_but_the_position_stays() {
        let mut log = ChannelLog::new();
        let ch = ChannelName::parse("c").unwrap();
        for offset in [1, 2] {
            log.ring.push_back(Arc::new(Publication::new(ch.clone(), log.epoch.clone(), offset, msg(offset), 0)));
            log.top = offset;
        }
        log.published_ms = 5_000;
        log.expire(6_000, 2_000);
        assert_eq!(log.ring.len(), 2, "within the TTL of the last publish");
        log.expire(7_001, 2_000);
        assert!(log.ring.is_empty());
        assert_eq!(log.top, 2);
    }

    #[tokio::test]
    async fn only_idle_unsubscribed_channels_are_forgotten() {
        let mut log = ChannelLog::new();
        log.touched_ms = 0;
        assert!(log.forgettable(10_000, 5_000));
        log.subscribers = 1;
        assert!(!log.forgettable(10_000, 5_000), "a subscribed channel keeps its epoch");
        log.subscribers = 0;
        assert!(!log.forgettable(4_000, 5_000));
    }

    #[tokio::test]
    async fn presence_lists_joined_clients_until_they_leave() {
        let e = engine(3);
        let ch = ChannelName::parse("c").unwrap();
        let a = ClientInfo { user: "a".into(), conn: "1".into(), node: "n".into() };
        e.join(&ch, &a, false).await.unwrap();
        assert_eq!(e.presence(&ch).await.unwrap(), vec![a.clone()]);
        e.leave(&ch, &a, false).await;
        assert!(e.presence(&ch).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn past_the_channel_bound_the_longest_unused_channels_are_forgotten() {
        let e = bounded(10, 10, 1 << 30);
        let ch = |i: usize| ChannelName::parse(&format!("c{i}")).unwrap();
        let kept = ch(0);
        e.subscribe(&kept).await.unwrap();
        let kept_epoch = e.history(&kept, HistoryQuery::Latest { limit: 0 }).await.unwrap().epoch;
        let mut epochs = Vec::new();
        for i in 1..=30 {
            epochs.push(e.history(&ch(i), HistoryQuery::Latest { limit: 0 }).await.unwrap().epoch);
        }
        assert!(e.held_channels.load(Ordering::Relaxed) <= 10, "{}", e.held_channels.load(Ordering::Relaxed));
        assert_eq!(e.history(&kept, HistoryQuery::Latest { limit: 0 }).await.unwrap().epoch, kept_epoch, "subscribed");
        assert_eq!(e.history(&ch(30), HistoryQuery::Latest { limit: 0 }).await.unwrap().epoch, epochs[29], "recent");
        assert_ne!(e.history(&ch(1), HistoryQuery::Latest { limit: 0 }).await.unwrap().epoch, epochs[0], "forgotten");
    }

    #[tokio::test]
    async fn past_the_bytes_bound_the_oldest_history_goes() {
        let one = held_size(&e_publication());
        let e = bounded(1000, 100, 20 * one);
        let ch = ChannelName::parse("c").unwrap();
        for n in 1..=50 {
            e.publish(&ch, msg(n)).await.unwrap();
        }
        assert!(e.held_bytes.load(Ordering::Relaxed) <= 20 * one);
        let page = e.history(&ch, HistoryQuery::After { after: 0, limit: 1000 }).await.unwrap();
        assert_eq!(page.top, 50, "positions stay");
        let kept = offsets(&page);
        assert!(kept.len() <= 20 && kept.last() == Some(&50), "{kept:?}");
        assert_eq!(kept, (51 - kept.len() as u64..=50).collect::<Vec<_>>(), "the newest, contiguous");
    }

    /// A publication the size the tests publish (data "1" to "50" are a byte or two).
    fn e_publication() -> Publication {
        Publication::new(ChannelName::parse("c").unwrap(), Epoch::new("e"), 10, msg(10), 0)
    }
}
