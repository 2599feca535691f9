//! This node's sockets, by channel and by connection id. The hub owns no socket and no history:
//! the engine hands it publications, the hub serialises each one once into the frame every
//! subscriber receives and holds it in its channel (`local.rs`); the flusher's next round fans
//! it out to the channel's subscribers, none of them waited on, and writes each socket it
//! touched once (`flusher.rs`). Channels are sharded and each has its own lock, so delivery on
//! one busy channel never waits on another's.

mod flusher;
mod handle;
mod local;
mod queue;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use flusher::{Flusher, RoundMetrics};
use local::{Held, LocalChannel, Subscriber};
use prometheus::IntCounter;

use crate::channel::ChannelName;
use crate::engine::{ClientInfo, Deliver, Epoch, Offset, Position, PresenceChange, Publication};
use crate::locks::{lock, read, write};
use crate::metrics::Metrics;
use crate::protocol::{Close, presence_frame};
use crate::shard::Sharded;

pub use handle::{ConnId, Delivery, Express, Out, Outlet, Queued, SessionHandle, SessionInfo, Transport};
pub use queue::Queue;

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
    flusher: Arc<Flusher>,
    /// Messages delivered over express lanes (all WebSocket), counted once per message.
    express_delivered: IntCounter,
    /// Frames a socket may have waiting before its session counts as a slow consumer.
    send_queue: usize,
}

impl Hub {
    /// A hub whose express lanes allow `send_queue` frames waiting per socket. Starts the
    /// flusher task (on the current runtime), resting `flush_rest` times each write round.
    pub fn new(metrics: Metrics, send_queue: usize, flush_rest: f64) -> Self {
        let flusher = Arc::new(Flusher::new(flush_rest));
        tokio::spawn(flusher.clone().run(RoundMetrics {
            latency: metrics.delivery_latency.clone(),
            duration: metrics.flush_round.clone(),
            writes: metrics.flush_writes.clone(),
        }));
        let express_delivered = metrics.delivered.with_label_values(&["ws"]);
        Self {
            channels: Sharded::default(),
            sessions: Sharded::default(),
            metrics,
            flusher,
            express_delivered,
            send_queue,
        }
    }

    /// Puts `channel` on `conn`'s express lane at `position`, unless it rides it already, and
    /// only if `nothing_queued` holds under the lane's lock: a message of the channel waiting
    /// in the session's queue would be overtaken by the next one going express.
    pub fn go_express(
        &self,
        channel: &ChannelName,
        conn: &ConnId,
        position: (Epoch, Offset),
        nothing_queued: impl Fn() -> bool,
    ) -> bool {
        let Some(local) = self.subscribers(channel) else { return false };
        let subs = read(&local.subs);
        let Some(sub) = subs.get(conn) else { return false };
        let mut lane = lock(&sub.express);
        if lane.is_some() {
            return true;
        }
        if !nothing_queued() {
            return false;
        }
        *lane = Some(position);
        true
    }

    /// After `local` was given something to hold (`first`: it held nothing before): fanned out
    /// now if a round is being written, else handed to the flusher for its next round.
    fn handed_over(&self, local: Arc<LocalChannel>, first: bool, time_us: u64) {
        if self.flusher.writing() {
            let mut lanes = Vec::new();
            local.fan_out(&mut lanes);
            self.flusher.add_lanes(lanes, time_us);
        } else if first {
            self.flusher.add(local, time_us);
        }
    }

    fn subscribers(&self, channel: &ChannelName) -> Option<Arc<LocalChannel>> {
        read(self.channels.of(channel)).get(channel).cloned()
    }

    /// Adds a session to a channel's local subscribers.
    pub fn add_subscriber(&self, channel: &ChannelName, handle: &SessionHandle) {
        let mut shard = write(self.channels.of(channel));
        let subs = shard.entry(channel.clone()).or_insert_with(|| {
            self.metrics.channels.inc();
            Arc::new(LocalChannel::new(self.send_queue, self.express_delivered.clone()))
        });
        let sub = Subscriber { handle: handle.clone(), express: Mutex::new(None), since: subs.next_held() };
        if write(&subs.subs).insert(handle.conn.clone(), sub).is_none() {
            self.metrics.subscriptions.with_label_values(&[handle.info.transport.as_str()]).inc();
        }
    }

    /// Removes a session from a channel; the channel goes when its last local subscriber does.
    pub fn remove_subscriber(&self, channel: &ChannelName, conn: &ConnId) {
        let mut shard = write(self.channels.of(channel));
        let Some(subs) = shard.get(channel) else { return };
        let mut subs_w = write(&subs.subs);
        if let Some(sub) = subs_w.remove(conn) {
            self.metrics.subscriptions.with_label_values(&[sub.handle.info.transport.as_str()]).dec();
        }
        if subs_w.is_empty() {
            drop(subs_w);
            shard.remove(channel);
            self.metrics.channels.dec();
        }
    }

    /// Local subscribers of `channel`.
    pub fn channel_subscribers(&self, channel: &ChannelName) -> Vec<SessionHandle> {
        self.subscribers(channel)
            .map(|s| read(&s.subs).values().map(|s| s.handle.clone()).collect())
            .unwrap_or_default()
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
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.flusher.stop();
    }
}

impl Deliver for Hub {
    /// Serialises the message once and holds it in its channel: while the flusher writes a
    /// round, fanned out now (with anything the channel held before it); otherwise at the start
    /// of the next round, with every message that came meanwhile (see `flusher.rs`).
    fn deliver(&self, publication: Arc<Publication>) {
        let Some(local) = self.subscribers(&publication.channel) else { return };
        local.messages.fetch_add(1, Ordering::Relaxed);
        let time_us = publication.time_us;
        let first = local.hold(Held::Message(Arc::new(Delivery::new(publication))));
        self.handed_over(local, first, time_us);
    }

    fn deliver_presence(&self, channel: &ChannelName, change: PresenceChange, client: &ClientInfo) {
        if let Some(local) = self.subscribers(channel) {
            let frame = presence_frame(change, channel, client);
            local.push_all(|| Out::Event(Box::new((channel.clone(), frame.clone()))));
        }
    }

    /// Held behind the channel's messages, so that nothing delivered before the reset reaches
    /// a session after it.
    fn reset(&self, channel: &ChannelName, position: &Position) {
        let Some(local) = self.subscribers(channel) else { return };
        let first = local.hold(Held::Reset(Box::new((channel.clone(), position.clone()))));
        self.handed_over(local, first, crate::engine::now_us());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use tokio::sync::Notify;

    use super::*;
    use crate::engine::NewMessage;

    /// An outlet that keeps what it was given.
    #[derive(Default)]
    struct Socket(Mutex<Vec<Offset>>, Notify);

    impl Outlet for Socket {
        fn queue(&self, delivery: &Delivery) -> Queued {
            let mut got = lock(&self.0);
            got.push(delivery.publication.offset);
            Queued { waiting: got.len(), first: got.len() == 1 }
        }

        fn flush(&self) -> std::io::Result<bool> {
            Ok(true)
        }

        fn messages(&self) -> u64 {
            lock(&self.0).len() as u64
        }

        fn blocked(&self) -> &Notify {
            &self.1
        }
    }

    fn channel() -> ChannelName {
        ChannelName::parse("room").unwrap()
    }

    fn message(epoch: &Epoch, offset: Offset) -> Arc<Publication> {
        let msg = NewMessage { event: None, data: RawValue::from_string("1".into()).unwrap(), idempotency_key: None };
        Arc::new(Publication::new(channel(), epoch.clone(), offset, msg, 0))
    }

    /// A hub with one WebSocket-like session subscribed to `room`: its socket and its queue.
    fn subscribed() -> (Hub, SessionHandle, Arc<Socket>, Arc<Queue>) {
        let identity = crate::metrics::Identity { node_id: "n", engine: "memory", max_connections: 10 };
        let hub = Hub::new(Metrics::new(&identity), 16, 1.0);
        let socket = Arc::new(Socket::default());
        let (handle, queue) = join(&hub, 1, Some(socket.clone()));
        (hub, handle, socket, queue)
    }

    /// Session `n.<n>` subscribed to `room`: a WebSocket-like one over `socket`, if given.
    fn join(hub: &Hub, n: u32, socket: Option<Arc<Socket>>) -> (SessionHandle, Arc<Queue>) {
        let info = SessionInfo::new("u".into(), Transport::Ws, None);
        let (handle, queue) = SessionHandle::new(format!("n.{n}").into(), info, 16, socket.map(|s| s as Express));
        hub.add_subscriber(&channel(), &handle);
        (handle, queue)
    }

    /// Puts `room` on the session's lane after `offset` of `epoch`, if its queue is empty.
    fn lane(hub: &Hub, handle: &SessionHandle, queue: &Queue, epoch: &Epoch, offset: Offset) -> bool {
        hub.go_express(&channel(), &handle.conn, (epoch.clone(), offset), || queue.is_empty())
    }

    /// The offsets of the messages waiting in `queue` (and whether a reset came first).
    fn queued(queue: &Queue) -> Vec<String> {
        let mut items = Vec::new();
        let n = queue.len();
        let mut buf = Vec::new();
        if n > 0 {
            futures_util::FutureExt::now_or_never(queue.recv_many(&mut buf, n)).unwrap();
        }
        for out in buf {
            items.push(match out {
                Out::Message(d) => d.publication.offset.to_string(),
                Out::Reset(r) => format!("reset {}", r.1.offset),
                Out::Event(_) => "event".into(),
            });
        }
        items
    }

    /// Runs the fan-out of the flusher's next round now; returns the sockets it would write.
    fn fan_out(hub: &Hub) -> usize {
        let mut round = Vec::new();
        hub.flusher.fan_out(&mut Vec::new(), &mut round);
        round.len()
    }

    #[tokio::test]
    async fn the_next_message_of_a_caught_up_channel_goes_express_and_anything_else_through_the_queue() {
        let (hub, handle, socket, queue) = subscribed();
        let e = Epoch::new("e");
        assert!(lane(&hub, &handle, &queue, &e, 5));
        hub.deliver(message(&e, 6));
        hub.deliver(message(&e, 6));
        hub.deliver(message(&e, 7));
        assert!(lock(&socket.0).is_empty() && queued(&queue).is_empty(), "held until the round");
        assert_eq!(fan_out(&hub), 1, "one socket to write");
        assert_eq!(*lock(&socket.0), [6, 7], "the next offsets, once each");
        assert!(queued(&queue).is_empty());
        // A gap: the session must decide (it closes with 4010); the channel leaves the lane.
        hub.deliver(message(&e, 9));
        hub.deliver(message(&e, 10));
        hub.deliver(message(&e, 8));
        fan_out(&hub);
        assert_eq!(queued(&queue), ["9", "10", "8"], "nothing overtakes what went through the queue");
        // A new epoch goes through the queue too.
        assert!(lane(&hub, &handle, &queue, &e, 10));
        hub.deliver(message(&Epoch::new("f"), 1));
        fan_out(&hub);
        assert_eq!(queued(&queue), ["1"]);
        assert_eq!(*lock(&socket.0), [6, 7]);
    }

    #[tokio::test]
    async fn a_channel_goes_express_only_with_nothing_waiting_in_its_queue() {
        let (hub, handle, socket, queue) = subscribed();
        let e = Epoch::new("e");
        hub.deliver(message(&e, 1));
        fan_out(&hub);
        // Message 1 waits in the queue: letting 2 go express would put it on the socket first.
        assert!(!lane(&hub, &handle, &queue, &e, 0));
        assert_eq!(queued(&queue), ["1"]);
        assert!(lane(&hub, &handle, &queue, &e, 1));
        hub.deliver(message(&e, 2));
        fan_out(&hub);
        assert_eq!(*lock(&socket.0), [2]);
    }

    #[tokio::test]
    async fn a_reset_takes_the_channel_off_the_lane_and_what_follows_comes_after_it() {
        let (hub, handle, socket, queue) = subscribed();
        let (e, f) = (Epoch::new("e"), Epoch::new("f"));
        assert!(lane(&hub, &handle, &queue, &e, 3));
        hub.reset(&channel(), &Position { epoch: f.clone(), offset: 0 });
        hub.deliver(message(&e, 4));
        hub.deliver(message(&f, 1));
        fan_out(&hub);
        assert_eq!(queued(&queue), ["reset 0", "4", "1"], "nothing overtakes the reset");
        assert!(lock(&socket.0).is_empty());
        // Unsubscribed: nothing reaches the socket or the queue.
        hub.remove_subscriber(&channel(), &handle.conn);
        hub.deliver(message(&f, 2));
        fan_out(&hub);
        assert!(lock(&socket.0).is_empty() && queued(&queue).is_empty());
    }

    #[tokio::test]
    async fn what_a_channel_holds_reaches_every_subscriber_in_one_round_one_write_each() {
        let (hub, _, _, _) = subscribed();
        let e = Epoch::new("e");
        let mut sockets = Vec::new();
        for n in 2..=4 {
            let socket = Arc::new(Socket::default());
            let (handle, queue) = join(&hub, n, Some(socket.clone()));
            assert!(lane(&hub, &handle, &queue, &e, 0));
            sockets.push(socket);
        }
        for offset in 1..=20 {
            hub.deliver(message(&e, offset));
        }
        assert_eq!(fan_out(&hub), 3, "each caught-up socket listed once for the round");
        for socket in &sockets {
            assert_eq!(*lock(&socket.0), (1..=20).collect::<Vec<_>>());
        }
        assert_eq!(fan_out(&hub), 0, "nothing held twice");
    }

    #[tokio::test]
    async fn messages_held_before_a_reset_reach_the_session_before_it() {
        let (hub, handle, socket, queue) = subscribed();
        let (e, f) = (Epoch::new("e"), Epoch::new("f"));
        assert!(lane(&hub, &handle, &queue, &e, 3));
        hub.deliver(message(&e, 4));
        hub.reset(&channel(), &Position { epoch: f.clone(), offset: 0 });
        hub.deliver(message(&f, 1));
        fan_out(&hub);
        assert_eq!(*lock(&socket.0), [4], "4 came before the reset, on the lane");
        assert_eq!(queued(&queue), ["reset 0", "1"]);
    }

    #[tokio::test]
    async fn while_a_round_is_written_a_message_is_fanned_out_at_once_behind_what_was_held() {
        let (hub, handle, socket, queue) = subscribed();
        let e = Epoch::new("e");
        assert!(lane(&hub, &handle, &queue, &e, 0));
        hub.deliver(message(&e, 1));
        assert!(lock(&socket.0).is_empty(), "held while the flusher rests");
        hub.flusher.writing.store(true, std::sync::atomic::Ordering::Relaxed);
        hub.deliver(message(&e, 2));
        assert_eq!(*lock(&socket.0), [1, 2], "fanned out at once, in order");
        assert_eq!(fan_out(&hub), 1, "the socket handed to the next round, the channel empty");
        assert_eq!(*lock(&socket.0), [1, 2]);
    }

    #[tokio::test]
    async fn a_subscriber_added_while_its_channel_holds_messages_gets_only_what_comes_after() {
        let (hub, handle, _, queue) = subscribed();
        let (e, f) = (Epoch::new("e"), Epoch::new("f"));
        hub.deliver(message(&e, 4));
        hub.reset(&channel(), &Position { epoch: f.clone(), offset: 0 });
        hub.deliver(message(&f, 1));
        let (_late, late_queue) = join(&hub, 9, None);
        hub.deliver(message(&f, 2));
        fan_out(&hub);
        assert_eq!(queued(&queue), ["4", "reset 0", "1", "2"], "the first subscriber gets everything, in order");
        assert_eq!(queued(&late_queue), ["2"], "held before it subscribed: not its to receive");
        assert!(lane(&hub, &handle, &queue, &f, 2));
    }
}
