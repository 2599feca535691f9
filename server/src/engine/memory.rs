//! The in-process engine: one node, no Redis. The embedded default.
//!
//! Each channel has a ring buffer of its last `history_size` publications, a random epoch made
//! when the channel is first touched, and a `top` offset. Publishing assigns the next offset and
//! delivers to the hub while holding that channel's lock, so delivery order is offset order and
//! a concurrent history read sees either the message or the subscriber, never neither. Channels
//! are sharded, so one channel's storm never blocks another's. A sweeper drops expired history
//! and forgets idle channels (their epoch goes with them, as with Redis' meta key).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    ClientInfo, Deliver, Engine, EngineError, Epoch, HistoryPage, HistoryQuery, NewMessage, Offset, PresenceChange,
    Publication, now_ms, presence_frame,
};
use crate::channel::ChannelName;

const SHARDS: usize = 64;

type Shard<T> = Mutex<HashMap<ChannelName, T>>;

/// The single-node engine.
pub struct MemoryEngine {
    history_size: usize,
    history_ttl: Duration,
    deliver: Weak<dyn Deliver>,
    hasher: RandomState,
    channels: Vec<Shard<Arc<Mutex<ChannelLog>>>>,
    presence: Vec<Shard<HashMap<String, ClientInfo>>>,
}

/// One channel's history and position.
struct ChannelLog {
    epoch: Epoch,
    top: Offset,
    ring: VecDeque<Arc<Publication>>,
    /// When the channel was last published to or read, for forgetting idle channels.
    touched_ms: u64,
}

impl ChannelLog {
    fn new() -> Self {
        Self { epoch: Epoch::random(), top: 0, ring: VecDeque::new(), touched_ms: now_ms() }
    }

    /// Drops publications older than `ttl_ms`; they are gone for replay like trimmed ones.
    fn expire(&mut self, now: u64, ttl_ms: u64) {
        while self.ring.front().is_some_and(|p| now.saturating_sub(p.time_ms) > ttl_ms) {
            self.ring.pop_front();
        }
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
    pub fn start(history_size: usize, history_ttl: Duration, deliver: Weak<dyn Deliver>) -> Arc<Self> {
        let engine = Arc::new(Self {
            history_size,
            history_ttl,
            deliver,
            hasher: RandomState::new(),
            channels: shards(),
            presence: shards(),
        });
        tokio::spawn(sweep(Arc::downgrade(&engine), history_ttl));
        engine
    }

    fn shard<'a, T>(&self, shards: &'a [Shard<T>], channel: &ChannelName) -> &'a Shard<T> {
        &shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    fn log(&self, channel: &ChannelName) -> Arc<Mutex<ChannelLog>> {
        let mut shard = lock(self.shard(&self.channels, channel));
        shard.entry(channel.clone()).or_insert_with(|| Arc::new(Mutex::new(ChannelLog::new()))).clone()
    }

    fn ttl_ms(&self) -> u64 {
        self.history_ttl.as_millis() as u64
    }

    /// Expires old history and forgets channels idle for twice the TTL with nothing left.
    fn sweep_once(&self) {
        let (now, ttl) = (now_ms(), self.ttl_ms());
        for shard in &self.channels {
            lock(shard).retain(|_, log| {
                let mut log = lock(log);
                log.expire(now, ttl);
                !(log.ring.is_empty() && now.saturating_sub(log.touched_ms) > 2 * ttl)
            });
        }
    }

    fn announce(&self, change: PresenceChange, channel: &ChannelName, client: &ClientInfo) {
        if let Some(hub) = self.deliver.upgrade() {
            hub.deliver_event(channel, presence_frame(change, channel, client));
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

fn shards<T>() -> Vec<Shard<T>> {
    (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect()
}

/// Locks a mutex; a poisoned lock only means another thread panicked mid-update of plain data.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Engine for MemoryEngine {
    async fn publish(&self, channel: &ChannelName, msg: NewMessage) -> Result<Arc<Publication>, EngineError> {
        let log = self.log(channel);
        let mut log = lock(&log);
        log.top += 1;
        log.touched_ms = now_ms();
        let publication = Arc::new(Publication::new(channel.clone(), log.epoch.clone(), log.top, msg, log.touched_ms));
        if log.ring.len() == self.history_size {
            log.ring.pop_front();
        }
        log.ring.push_back(publication.clone());
        // Delivered under the channel lock: per-channel delivery order is offset order.
        if let Some(hub) = self.deliver.upgrade() {
            hub.deliver(publication.clone());
        }
        Ok(publication)
    }

    async fn subscribe(&self, _channel: &ChannelName) -> Result<(), EngineError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &ChannelName) {}

    async fn history(&self, channel: &ChannelName, query: HistoryQuery) -> Result<HistoryPage, EngineError> {
        let log = self.log(channel);
        let mut log = lock(&log);
        let now = now_ms();
        log.expire(now, self.ttl_ms());
        log.touched_ms = now;
        Ok(HistoryPage { epoch: log.epoch.clone(), top: log.top, publications: log.read(query) })
    }

    async fn join(&self, channel: &ChannelName, client: &ClientInfo, announce: bool) -> Result<(), EngineError> {
        lock(self.shard(&self.presence, channel))
            .entry(channel.clone())
            .or_default()
            .insert(client.conn.clone(), client.clone());
        if announce {
            self.announce(PresenceChange::Join, channel, client);
        }
        Ok(())
    }

    async fn leave(&self, channel: &ChannelName, client: &ClientInfo, announce: bool) {
        let removed = {
            let mut shard = lock(self.shard(&self.presence, channel));
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
        let shard = lock(self.shard(&self.presence, channel));
        let mut clients: Vec<ClientInfo> =
            shard.get(channel).map(|m| m.values().cloned().collect()).unwrap_or_default();
        clients.sort_by(|a, b| (&a.user, &a.conn).cmp(&(&b.user, &b.conn)));
        Ok(clients)
    }

    fn ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn msg(n: u64) -> NewMessage {
        NewMessage { event: None, data: RawValue::from_string(n.to_string()).unwrap() }
    }

    fn engine(size: usize) -> Arc<MemoryEngine> {
        let none: Weak<dyn Deliver> = Weak::<NoHub>::new();
        MemoryEngine::start(size, Duration::from_secs(60), none)
    }

    struct NoHub;
    impl Deliver for NoHub {
        fn deliver(&self, _: Arc<Publication>) {}
        fn deliver_event(&self, _: &ChannelName, _: hyper_tungstenite::tungstenite::Utf8Bytes) {}
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
    async fn a_channel_keeps_its_epoch_from_first_read() {
        let e = engine(3);
        let ch = ChannelName::parse("c").unwrap();
        let before = e.history(&ch, HistoryQuery::Latest { limit: 1 }).await.unwrap();
        let p = e.publish(&ch, msg(1)).await.unwrap();
        assert_eq!((before.top, &p.epoch, p.offset), (0, &before.epoch, 1));
    }

    #[tokio::test]
    async fn expired_history_is_gone_but_the_position_stays() {
        let mut log = ChannelLog::new();
        let ch = ChannelName::parse("c").unwrap();
        for (offset, t) in [(1, 1_000), (2, 5_000)] {
            log.ring.push_back(Arc::new(Publication::new(ch.clone(), log.epoch.clone(), offset, msg(offset), t)));
            log.top = offset;
        }
        log.expire(6_000, 2_000);
        assert_eq!(log.ring.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![2]);
        assert_eq!(log.top, 2);
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
}
