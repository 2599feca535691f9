//! This node's sockets, by channel and by connection id. The hub owns no socket and no history:
//! the engine hands it publications, the hub serialises each one once into the frame every
//! subscriber receives, and queues that shared frame for every local subscriber with a
//! non-blocking `try_send`. Channels are sharded and each has its
//! own lock, so fan-out for one busy channel never waits on another's.

mod handle;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::channel::ChannelName;
use crate::engine::{ClientInfo, Deliver, Position, PresenceChange, Publication};
use crate::locks::{lock, read, write};
use crate::metrics::Metrics;
use crate::protocol::{Close, presence_frame};
use crate::shard::Sharded;

pub use handle::{ConnId, Delivery, Out, SessionHandle, SessionInfo, Transport};

/// One channel's local subscribers and its message rate.
#[derive(Default)]
struct LocalChannel {
    subs: RwLock<HashMap<ConnId, SessionHandle>>,
    /// Publications delivered to this node for the channel.
    messages: AtomicU64,
    /// (messages at the last rate sample, messages per second since then).
    rate: Mutex<(u64, f64)>,
}

impl LocalChannel {
    /// Queues one item for every local subscriber, without waiting on any of them.
    fn push_all(&self, out: impl Fn() -> Out) {
        for handle in read(&self.subs).values() {
            handle.push(out());
        }
    }
}

/// A channel with local subscribers, as operators see it.
#[derive(Debug, Clone)]
pub struct ChannelStat {
    pub channel: ChannelName,
    pub subscribers: usize,
    /// Messages per second over the last sample period.
    pub rate: f64,
}

/// Local subscribers and sessions of this node.
pub struct Hub {
    channels: Sharded<RwLock<HashMap<ChannelName, Arc<LocalChannel>>>>,
    sessions: Sharded<Mutex<HashMap<ConnId, SessionHandle>>>,
    metrics: Metrics,
}

impl Hub {
    pub fn new(metrics: Metrics) -> Self {
        Self { channels: Sharded::default(), sessions: Sharded::default(), metrics }
    }

    fn subscribers(&self, channel: &ChannelName) -> Option<Arc<LocalChannel>> {
        read(self.channels.of(channel)).get(channel).cloned()
    }

    /// Adds a session to a channel's local subscribers.
    pub fn add_subscriber(&self, channel: &ChannelName, handle: &SessionHandle) {
        let mut shard = write(self.channels.of(channel));
        let subs = shard.entry(channel.clone()).or_insert_with(|| {
            self.metrics.channels.inc();
            Arc::default()
        });
        if write(&subs.subs).insert(handle.conn.clone(), handle.clone()).is_none() {
            self.metrics.subscriptions.with_label_values(&[handle.info.transport.as_str()]).inc();
        }
    }

    /// Removes a session from a channel; the channel goes when its last local subscriber does.
    pub fn remove_subscriber(&self, channel: &ChannelName, conn: &ConnId) {
        let mut shard = write(self.channels.of(channel));
        let Some(subs) = shard.get(channel) else { return };
        let mut subs_w = write(&subs.subs);
        if let Some(handle) = subs_w.remove(conn) {
            self.metrics.subscriptions.with_label_values(&[handle.info.transport.as_str()]).dec();
        }
        if subs_w.is_empty() {
            drop(subs_w);
            shard.remove(channel);
            self.metrics.channels.dec();
        }
    }

    /// Local subscribers of `channel`.
    pub fn channel_subscribers(&self, channel: &ChannelName) -> Vec<SessionHandle> {
        self.subscribers(channel).map(|s| read(&s.subs).values().cloned().collect()).unwrap_or_default()
    }

    /// Every channel with local subscribers: count and message rate.
    pub fn channels(&self) -> Vec<ChannelStat> {
        let stat = |(channel, local): (&ChannelName, &Arc<LocalChannel>)| ChannelStat {
            channel: channel.clone(),
            subscribers: read(&local.subs).len(),
            rate: lock(&local.rate).1,
        };
        self.channels.iter().flat_map(|s| read(s).iter().map(stat).collect::<Vec<_>>()).collect()
    }

    /// Samples every channel's message rate over `elapsed` (called once a second).
    pub fn sample_rates(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64().max(0.001);
        for shard in &self.channels {
            for local in read(shard).values() {
                let now = local.messages.load(Ordering::Relaxed);
                let mut rate = lock(&local.rate);
                *rate = (now, now.saturating_sub(rate.0) as f64 / secs);
            }
        }
    }

    pub fn register(&self, handle: SessionHandle) {
        lock(self.sessions.of(&*handle.conn)).insert(handle.conn.clone(), handle);
    }

    pub fn unregister(&self, conn: &ConnId) {
        lock(self.sessions.of(&**conn)).remove(conn);
    }

    /// Every session on this node.
    pub fn sessions(&self) -> Vec<SessionHandle> {
        self.sessions.iter().flat_map(|s| lock(s).values().cloned().collect::<Vec<_>>()).collect()
    }

    pub fn session(&self, conn: &str) -> Option<SessionHandle> {
        lock(self.sessions.of(conn)).get(conn).cloned()
    }

    /// Closes the sessions of `user` (or the one with id `conn`); returns how many were open.
    pub fn disconnect(&self, user: Option<&str>, conn: Option<&str>, close: Close) -> usize {
        let targets: Vec<SessionHandle> = match (user, conn) {
            (_, Some(conn)) => self.session(conn).into_iter().collect(),
            (Some(user), None) => self.sessions().into_iter().filter(|h| &*h.info.user == user).collect(),
            (None, None) => Vec::new(),
        };
        targets.iter().filter(|h| h.close(close.clone())).count()
    }

    fn push_all(&self, channel: &ChannelName, out: impl Fn() -> Out) {
        if let Some(local) = self.subscribers(channel) {
            local.push_all(out);
        }
    }
}

impl Deliver for Hub {
    fn deliver(&self, publication: Arc<Publication>) {
        if let Some(local) = self.subscribers(&publication.channel) {
            local.messages.fetch_add(1, Ordering::Relaxed);
            let delivery = Arc::new(Delivery::new(publication));
            local.push_all(|| Out::Message(delivery.clone()));
        }
    }

    fn deliver_presence(&self, channel: &ChannelName, change: PresenceChange, client: &ClientInfo) {
        if let Some(local) = self.subscribers(channel) {
            let frame = presence_frame(change, channel, client);
            local.push_all(|| Out::Event(Box::new((channel.clone(), frame.clone()))));
        }
    }

    fn reset(&self, channel: &ChannelName, position: &Position) {
        self.push_all(channel, || Out::Reset(Box::new((channel.clone(), position.clone()))));
    }
}
