//! One client connection, whatever its transport: identity, limits, subscriptions and the
//! bounded send queue the hub fills.
//!
//! The hub pushes shared frames into the queue with `try_send` and never waits; a full queue
//! closes the session with 4010 (the client reconnects and replays). The transport task owns the
//! `Session`, runs commands through it, and passes every queued item through [`Session::accept`],
//! which drops anything at or below the subscriber's last offset: replay and live traffic merge
//! without duplicates. Sessions never touch sockets; `ws.rs` and `sse.rs` do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::FutureExt;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use prometheus::IntCounter;
use serde_json::value::RawValue;
use tokio::task::JoinHandle;

use crate::auth::Identity;
use crate::channel::ChannelName;
use crate::engine::{
    ClientInfo, EngineError, Epoch, HistoryQuery, NewMessage, Offset, Position, Publication, check_idempotency_key,
};
use crate::hub::{ConnId, Delivery, Out, Outlet, Queue, SessionHandle, SessionInfo, Transport};
use crate::node::Node;
use crate::protocol::{Close, CloseCode, CommandError, ErrorCode, HistoryItem, Reply, Reset, to_frame};
use crate::rate::RateLimiter;

/// Where a subscriber is in one channel.
#[derive(Debug, Clone)]
struct Subscription {
    epoch: Epoch,
    last: Offset,
}

/// A successful subscribe: the reply to send first, then the replayed messages in order.
pub struct Subscribed {
    pub reply: Reply,
    /// The messages missed since the client's position, each with its frame.
    pub replay: Vec<Delivery>,
}

/// Frames a session has ready for its transport to write, with how many of them are messages;
/// the rest are control frames (welcome, replies, join/leave, reset), counted apart.
#[derive(Default)]
pub struct Frames {
    list: Vec<Utf8Bytes>,
    messages: usize,
}

impl Frames {
    /// Queues a message frame (live or replayed).
    pub fn message(&mut self, frame: Utf8Bytes) {
        self.messages += 1;
        self.list.push(frame);
    }

    /// Queues any other frame.
    pub fn control(&mut self, frame: Utf8Bytes) {
        self.list.push(frame);
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Takes every frame out, in order, with the tally `Session::sent` counts once they are written.
    pub fn take(&mut self) -> (std::vec::Drain<'_, Utf8Bytes>, Tally) {
        let tally = Tally { frames: self.list.len(), messages: std::mem::take(&mut self.messages) };
        (self.list.drain(..), tally)
    }

    /// Gives back what a burst grew beyond `keep` frames: idle connections should cost little.
    pub fn shrink(&mut self, keep: usize) {
        if self.list.capacity() > keep {
            self.list = Vec::new();
        }
    }
}

/// How many frames were written, and how many of them were messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub frames: usize,
    pub messages: usize,
}

/// This session's counters, looked up once per session instead of once per write.
struct Counters {
    delivered: IntCounter,
    control: IntCounter,
    resets: IntCounter,
}

/// One client connection's state, owned by its transport task.
pub struct Session {
    node: Arc<Node>,
    handle: SessionHandle,
    pub identity: Identity,
    rx: Arc<Queue>,
    subs: HashMap<ChannelName, Subscription>,
    /// A channel may be ready for the express lane (see `go_express`).
    express_stale: bool,
    rate: RateLimiter,
    counters: Counters,
}

impl Session {
    /// Registers a new session with the hub. With an `outlet` (a WebSocket), the fan-out may
    /// queue caught-up channels' messages on it directly (`go_express`).
    pub fn open(
        node: Arc<Node>,
        identity: Identity,
        transport: Transport,
        remote: Option<SocketAddr>,
        outlet: Option<Arc<dyn Outlet>>,
    ) -> Session {
        let info = SessionInfo::new(identity.user.as_str().into(), transport, remote);
        let (handle, rx) = SessionHandle::new(node.next_conn_id(), info, node.config().send_queue, outlet);
        node.hub().register(handle.clone());
        let m = &node.metrics();
        let t = [transport.as_str()];
        m.connections.with_label_values(&t).inc();
        let counters = Counters {
            delivered: m.delivered.with_label_values(&t),
            control: m.control_frames.with_label_values(&t),
            resets: m.resets.with_label_values(&t),
        };
        let rate = RateLimiter::new(node.config().rate_limit, node.config().rate_burst);
        Session { node, handle, identity, rx, subs: HashMap::new(), express_stale: false, rate, counters }
    }

    /// Counts the session as opened: the transport is about to send its welcome.
    pub fn started(&self) {
        self.node.metrics().connections_opened.with_label_values(&[self.handle.info.transport.as_str()]).inc();
    }

    /// Counts how a started session ended: the close code the server sends, or `None` when the client
    /// left. A slow consumer is also logged: it tells an operator a client cannot keep up.
    pub fn ended(&self, close: Option<&Close>) {
        let m = &self.node.metrics();
        let code = close.map_or("peer", |c| c.code.label());
        m.connections_closed.with_label_values(&[self.handle.info.transport.as_str(), code]).inc();
        if close.is_some_and(|c| c.code == CloseCode::SlowConsumer) {
            m.slow_consumers.inc();
            tracing::info!(conn = %self.handle.conn, user = %self.identity.user, "slow consumer closed with 4010");
        }
    }

    pub fn conn(&self) -> &ConnId {
        &self.handle.conn
    }

    /// The operator-visible facts and close signal, shareable with the transport loop.
    pub fn info_arc(&self) -> Arc<SessionInfo> {
        self.handle.info.clone()
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Takes one token for an inbound command; `Err` means close with 4008.
    pub fn rate_check(&mut self) -> Result<(), Close> {
        if self.rate.take(Instant::now()).is_ok() {
            Ok(())
        } else {
            Err(Close::new(CloseCode::RateLimited, "too many commands: back off before reconnecting"))
        }
    }

    /// Waits for queued items, taking up to `limit` at once; 0 means the hub dropped us.
    pub async fn recv_many(&mut self, buf: &mut Vec<Out>, limit: usize) -> usize {
        self.rx.recv_many(buf, limit).await
    }

    /// Subscribes to `channel`, replaying from `since` when given (DESIGN "Positions, replay").
    /// The hub registration comes before the history read, so nothing falls between them; what
    /// arrives live meanwhile waits in the queue and `accept` drops what the replay covered.
    /// A replay takes its bytes from `budget`; one that does not fit answers `recovered: false`
    /// (the client resyncs from its own store) rather than holding unbounded memory.
    pub async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<Position>,
        budget: &mut usize,
    ) -> Result<Subscribed, CommandError> {
        let channel = parse_channel(channel)?;
        self.identity.can_subscribe(&channel).map_err(|e| e.command_error())?;
        if self.subs.contains_key(&channel) {
            return Err(CommandError::new(ErrorCode::AlreadySubscribed, format!("already subscribed to {channel}")));
        }
        if self.subs.len() >= self.node.config().max_channels {
            let msg = format!("at most {} channels per connection", self.node.config().max_channels);
            return Err(CommandError::new(ErrorCode::TooManyChannels, msg));
        }
        self.node.hub().add_subscriber(&channel, &self.handle);
        let mut joining = Joining::new(&self.node, &channel, &self.handle.conn);
        let (position, replay) = self.position_and_replay(&channel, since.as_ref(), &mut joining).await?;
        joining.done();
        let replay = replay.map(|r| r.into_iter().map(Delivery::new).collect::<Vec<_>>()).filter(|r| {
            let bytes: usize = r.iter().map(|d| d.frame.len()).sum();
            let fits = bytes <= *budget;
            if fits {
                *budget -= bytes;
            }
            fits
        });
        let recovered = since.as_ref().map(|_| replay.is_some());
        let metrics = &self.node.metrics();
        if let Some(ok) = recovered {
            metrics.replays.with_label_values(&[if ok { "recovered" } else { "not_recovered" }]).inc();
        }
        if let Some(replay) = &replay {
            metrics.replayed_messages.observe(replay.len() as f64);
        }
        let replay = replay.unwrap_or_default();
        self.subs.insert(channel.clone(), Subscription { epoch: position.epoch.clone(), last: position.offset });
        self.express_stale = true;
        self.join_presence(&channel).await;
        let reply = Reply {
            channel: Some(channel),
            epoch: Some(position.epoch),
            offset: Some(position.offset),
            recovered,
            replayed: since.map(|_| replay.len()),
            ..Reply::ok(None)
        };
        Ok(Subscribed { reply, replay })
    }

    /// Makes sure live delivery is in place, then reads the current position and, given `since`,
    /// the messages after it. `Some(replay)` only when they are all there (recovered).
    async fn position_and_replay(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        joining: &mut Joining,
    ) -> Result<(Position, Option<Vec<Arc<Publication>>>), CommandError> {
        let engine = &self.node.engine();
        let live = joining.engine_subscribe().await.map_err(unavailable)?;
        if let (None, Some(position)) = (since, live) {
            // Already live on this node: start where its delivery is, no store round trip.
            return Ok((position, None));
        }
        let max = self.node.config().max_replay;
        let query = match since {
            Some(p) => HistoryQuery::After { after: p.offset, limit: max },
            None => HistoryQuery::Latest { limit: 0 },
        };
        let page = engine.history(channel, query).await.map_err(unavailable)?;
        let replay = since.and_then(|p| complete_replay(p, &page.epoch, page.top, page.publications.clone(), max));
        Ok((page.position(), replay))
    }

    async fn join_presence(&self, channel: &ChannelName) {
        let config = &self.node.config();
        if config.presence_on(channel.as_str()) {
            let announce = config.join_leave_on(channel.as_str());
            if let Err(e) = self.node.engine().join(channel, &self.client_info(), announce).await {
                tracing::warn!(conn = %self.handle.conn, %channel, error = %e, "presence join failed");
            }
        }
    }

    fn client_info(&self) -> ClientInfo {
        ClientInfo {
            user: self.handle.info.user.clone(),
            conn: self.handle.conn.clone(),
            node: self.node.node_id().clone(),
        }
    }

    /// Leaves `channel`; queued messages of it are dropped by `accept` from now on.
    pub async fn unsubscribe(&mut self, channel: &str) -> Result<Reply, CommandError> {
        let channel = parse_channel(channel)?;
        if self.subs.remove(&channel).is_none() {
            return Err(CommandError::new(ErrorCode::NotSubscribed, format!("not subscribed to {channel}")));
        }
        self.node.hub().remove_subscriber(&channel, &self.handle.conn);
        leave(&self.node, &channel, &self.client_info()).await;
        Ok(Reply { channel: Some(channel), ..Reply::ok(None) })
    }

    /// Publishes from the socket, if the token's `pubs` allow it. With an idempotency key, a
    /// retry after `outcome_unknown` returns the first result instead of storing twice.
    pub async fn publish(
        &self,
        channel: &str,
        event: Option<String>,
        data: Box<RawValue>,
        idempotency_key: Option<String>,
    ) -> Result<Reply, CommandError> {
        let channel = parse_channel(channel)?;
        self.identity.can_publish(&channel).map_err(|e| e.command_error())?;
        let bad = |text: String| CommandError::new(ErrorCode::BadRequest, text);
        if let Some(key) = &idempotency_key {
            check_idempotency_key(key).map_err(|e| bad(e.into()))?;
        }
        let msg = NewMessage { idempotency_key, ..NewMessage::new(event, data).map_err(|e| bad(e.to_string()))? };
        let publication = self.node.publish(&channel, msg, "ws").await?;
        Ok(Reply {
            channel: Some(channel),
            epoch: Some(publication.epoch.clone()),
            offset: Some(publication.offset),
            ..Reply::ok(None)
        })
    }

    /// Who is in `channel` (the client must be allowed to subscribe to it).
    pub async fn presence(&self, channel: &str) -> Result<Reply, CommandError> {
        let channel = parse_channel(channel)?;
        self.identity.can_subscribe(&channel).map_err(|e| e.command_error())?;
        let clients = self.node.presence(&channel).await?;
        Ok(Reply { channel: Some(channel), clients: Some(clients), ..Reply::ok(None) })
    }

    /// Stored messages of `channel` (the client must be allowed to subscribe to it), so a page
    /// can show the recent past and subscribe from its end without a gap.
    pub async fn history(
        &self,
        channel: &str,
        limit: Option<u64>,
        since: Option<Offset>,
    ) -> Result<Reply, CommandError> {
        let channel = parse_channel(channel)?;
        self.identity.can_subscribe(&channel).map_err(|e| e.command_error())?;
        let page = self.node.engine().history(&channel, HistoryQuery::new(limit, since)).await.map_err(unavailable)?;
        Ok(Reply {
            channel: Some(channel),
            epoch: Some(page.epoch),
            top: Some(page.top),
            publications: Some(page.publications.into_iter().map(HistoryItem).collect()),
            ..Reply::ok(None)
        })
    }

    /// Filters one queued item into the frames to send: drops what is not subscribed or already
    /// seen, turns an epoch change into a `reset`. A gap the engine did not fill closes the
    /// session so the client replays instead of silently missing messages.
    pub fn accept(&mut self, out: Out, frames: &mut Frames) -> Result<(), Close> {
        // A message or reset through the queue may have taken its channel off the express lane.
        self.express_stale |= !matches!(out, Out::Event(_));
        match out {
            Out::Message(delivery) => {
                let p = &delivery.publication;
                let Some(sub) = self.subs.get_mut(&p.channel) else { return Ok(()) };
                if p.epoch != sub.epoch {
                    *sub = Subscription { epoch: p.epoch.clone(), last: p.offset - 1 };
                    self.counters.resets.inc();
                    frames.control(reset_frame(&p.channel, &p.epoch, p.offset - 1));
                }
                if p.offset <= sub.last {
                    return Ok(());
                }
                if p.offset > sub.last + 1 {
                    tracing::warn!(conn = %self.handle.conn, channel = %p.channel, last = sub.last, got = p.offset, "gap in live delivery");
                    return Err(Close::new(CloseCode::SlowConsumer, "missed messages: reconnect and replay"));
                }
                sub.last = p.offset;
                frames.message(delivery.frame.clone());
            }
            Out::Event(event) => {
                let (channel, frame) = *event;
                if self.subs.contains_key(&channel) {
                    frames.control(frame);
                }
            }
            Out::Reset(reset) => {
                let (channel, position) = *reset;
                // A subscriber that joined after the loss already started in the new epoch at or
                // past the reset: for it nothing was lost, and a reset would replay what it has.
                if let Some(sub) = self.subs.get_mut(&channel)
                    && !(sub.epoch == position.epoch && sub.last >= position.offset)
                {
                    self.counters.resets.inc();
                    frames.control(reset_frame(&channel, &position.epoch, position.offset));
                    *sub = Subscription { epoch: position.epoch, last: position.offset };
                }
            }
        }
        Ok(())
    }

    /// Puts the subscribed channels on the express lane, where the fan-out queues their next
    /// messages on the socket itself. Called once the session's own frames are on the socket,
    /// and only with nothing in its queue: a message waiting there would be overtaken by the
    /// next one going express. A channel already on the lane keeps its position there, which is
    /// ahead of the session's own (the session does not see express messages).
    pub fn go_express(&mut self) {
        if !self.express_stale || self.handle.express.is_none() {
            return;
        }
        let (hub, conn, rx) = (self.node.hub(), &self.handle.conn, &self.rx);
        let mut all = true;
        for (channel, sub) in &self.subs {
            all &= hub.go_express(channel, conn, (sub.epoch.clone(), sub.last), || rx.is_empty());
        }
        self.express_stale = !all;
    }

    /// The subscriber's position in `channel`, if subscribed.
    pub fn position(&self, channel: &ChannelName) -> Option<Position> {
        self.subs.get(channel).map(|s| Position { epoch: s.epoch.clone(), offset: s.last })
    }

    /// Records store-to-send latency once per batch (its first message): a per-message
    /// observation would cost more than the measurement is worth.
    pub fn observe_latency(&self, batch: &[Out]) {
        if let Some(Out::Message(delivery)) = batch.first() {
            let age_us = crate::engine::now_us().saturating_sub(delivery.publication.time_us);
            self.node.metrics().delivery_latency.observe(age_us as f64 / 1e6);
        }
    }

    /// Counts frames written to the client: messages, and everything else apart.
    pub fn sent(&self, tally: Tally) {
        self.handle.info.messages_out.fetch_add(tally.messages as u64, Ordering::Relaxed);
        self.counters.delivered.inc_by(tally.messages as u64);
        self.counters.control.inc_by((tally.frames - tally.messages) as u64);
    }
}

/// A subscription being set up, undone when dropped before `done`: on an error, and when the
/// subscribing future itself is dropped midway (an SSE request whose client went away while
/// Redis answered). It takes the hub entry out and releases the engine's reference, including
/// one a SUBSCRIBE still in flight takes when it completes.
struct Joining {
    node: Arc<Node>,
    channel: ChannelName,
    conn: ConnId,
    /// The engine's subscribe, run as its own task so that dropping the caller cannot cut it
    /// in half; `None` before it started and after its outcome was taken.
    subscribing: Option<JoinHandle<Result<Option<Position>, EngineError>>>,
    /// The engine counted a reference for this subscription.
    counted: bool,
    done: bool,
}

impl Joining {
    fn new(node: &Arc<Node>, channel: &ChannelName, conn: &ConnId) -> Self {
        Joining {
            node: node.clone(),
            channel: channel.clone(),
            conn: conn.clone(),
            subscribing: None,
            counted: false,
            done: false,
        }
    }

    /// Runs the engine's subscribe to completion, whatever happens to the caller. A channel
    /// already live on the node completes at the first poll (a reference counted under a lock):
    /// no task for that; one that has to wait for Redis goes on as a task of its own.
    async fn engine_subscribe(&mut self) -> Result<Option<Position>, EngineError> {
        let (node, channel) = (self.node.clone(), self.channel.clone());
        let mut subscribe = Box::pin(async move { node.engine().subscribe(&channel).await });
        if let Some(outcome) = (&mut subscribe).now_or_never() {
            self.counted = outcome.is_ok();
            return outcome;
        }
        let task = self.subscribing.insert(tokio::spawn(subscribe));
        let outcome = task.await.unwrap_or_else(|e| Err(EngineError::Unavailable(format!("subscribe failed: {e}"))));
        self.subscribing = None;
        self.counted = outcome.is_ok();
        outcome
    }

    /// The subscription is in place: nothing to undo.
    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Joining {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.node.hub().remove_subscriber(&self.channel, &self.conn);
        let (node, channel) = (self.node.clone(), self.channel.clone());
        match (self.subscribing.take(), self.counted) {
            (Some(task), _) => {
                tokio::spawn(async move {
                    if let Ok(Ok(_)) = task.await {
                        node.engine().unsubscribe(&channel).await;
                    }
                });
            }
            (None, true) => {
                tokio::spawn(async move { node.engine().unsubscribe(&channel).await });
            }
            (None, false) => {}
        }
    }
}

impl Drop for Session {
    /// Leaves the hub at once and releases engine state in the background: a peer that vanished
    /// mid-frame must not leak subscriptions (this runs however the transport task ended).
    fn drop(&mut self) {
        let node = self.node.clone();
        node.hub().unregister(&self.handle.conn);
        node.metrics().connections.with_label_values(&[self.handle.info.transport.as_str()]).dec();
        let channels: Vec<ChannelName> = self.subs.drain().map(|(c, _)| c).collect();
        for channel in &channels {
            node.hub().remove_subscriber(channel, &self.handle.conn);
        }
        if channels.is_empty() {
            return;
        }
        let client = self.client_info();
        tokio::spawn(async move {
            for channel in channels {
                leave(&node, &channel, &client).await;
            }
        });
    }
}

/// Releases the engine's subscription and presence for one channel.
async fn leave(node: &Node, channel: &ChannelName, client: &ClientInfo) {
    node.engine().unsubscribe(channel).await;
    if node.config().presence_on(channel.as_str()) {
        node.engine().leave(channel, client, node.config().join_leave_on(channel.as_str())).await;
    }
}

/// The messages after `since` if they are all there; `None` means `recovered: false`.
fn complete_replay(
    since: &Position,
    epoch: &Epoch,
    top: Offset,
    publications: Vec<Arc<Publication>>,
    max: usize,
) -> Option<Vec<Arc<Publication>>> {
    let missing = top.checked_sub(since.offset)?;
    let contiguous = publications.iter().zip(since.offset + 1..).all(|(p, want)| p.offset == want);
    (since.epoch == *epoch && missing <= max as u64 && publications.len() as u64 == missing && contiguous)
        .then_some(publications)
}

fn reset_frame(channel: &ChannelName, epoch: &Epoch, offset: Offset) -> Utf8Bytes {
    to_frame(&Reset { kind: "reset", channel, epoch, offset })
}

fn parse_channel(name: &str) -> Result<ChannelName, CommandError> {
    ChannelName::parse(name).map_err(|e| CommandError::new(ErrorCode::BadChannel, e.to_string()))
}

fn unavailable(e: crate::engine::EngineError) -> CommandError {
    CommandError::new(ErrorCode::Unavailable, format!("{e}: retry shortly"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NewMessage;

    fn publications(epoch: &Epoch, offsets: std::ops::RangeInclusive<u64>) -> Vec<Arc<Publication>> {
        let ch = ChannelName::parse("c").unwrap();
        offsets
            .map(|o| {
                let msg =
                    NewMessage { event: None, data: RawValue::from_string("1".into()).unwrap(), idempotency_key: None };
                Arc::new(Publication::new(ch.clone(), epoch.clone(), o, msg, 0))
            })
            .collect()
    }

    /// A session of `alice` on a fresh memory-engine node, subscribed to `c` at `epoch`/`last`
    /// (set directly: these tests are about what arrives afterwards).
    async fn subscribed(epoch: &Epoch, last: Offset) -> Session {
        let node = Node::start(crate::Config::dev(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let identity = node.authenticate(None, Some("alice")).unwrap();
        let mut session = Session::open(node, identity, Transport::Ws, None, None);
        session.subs.insert(channel(), Subscription { epoch: epoch.clone(), last });
        session
    }

    fn channel() -> ChannelName {
        ChannelName::parse("c").unwrap()
    }

    fn message(epoch: &Epoch, offset: Offset) -> Out {
        Out::Message(Arc::new(Delivery::new(publications(epoch, offset..=offset).remove(0))))
    }

    /// What `frames` holds, as JSON, and how many of them are messages.
    fn sent(frames: &mut Frames) -> (Vec<serde_json::Value>, usize) {
        let (list, tally) = frames.take();
        let list: Vec<serde_json::Value> = list.map(|f| serde_json::from_str(f.as_str()).unwrap()).collect();
        assert_eq!(tally.frames, list.len());
        (list, tally.messages)
    }

    fn offsets(list: &[serde_json::Value]) -> Vec<u64> {
        list.iter().map(|f| f["offset"].as_u64().unwrap()).collect()
    }

    #[tokio::test]
    async fn the_next_offsets_are_sent_as_messages_and_move_the_position() {
        let e = Epoch::new("e");
        let (mut session, mut frames) = (subscribed(&e, 3).await, Frames::default());
        for o in 4..=6 {
            session.accept(message(&e, o), &mut frames).unwrap();
        }
        let (list, messages) = sent(&mut frames);
        assert_eq!((offsets(&list), messages), (vec![4, 5, 6], 3));
        assert!(list.iter().all(|f| f["type"] == "message" && f["channel"] == "c"));
        assert_eq!(session.position(&channel()), Some(Position { epoch: e, offset: 6 }));
    }

    #[tokio::test]
    async fn what_the_replay_already_sent_is_dropped() {
        let e = Epoch::new("e");
        let (mut session, mut frames) = (subscribed(&e, 5).await, Frames::default());
        for o in [2, 5, 6, 6] {
            session.accept(message(&e, o), &mut frames).unwrap();
        }
        let (list, _) = sent(&mut frames);
        assert_eq!(offsets(&list), vec![6], "at or below the position: already sent");
    }

    #[tokio::test]
    async fn a_gap_closes_the_session_with_4010_instead_of_sending_around_it() {
        let e = Epoch::new("e");
        let (mut session, mut frames) = (subscribed(&e, 3).await, Frames::default());
        let close = session.accept(message(&e, 5), &mut frames).unwrap_err();
        assert_eq!(close.code, CloseCode::SlowConsumer);
        assert!(frames.is_empty(), "nothing past the hole is sent");
        assert_eq!(session.position(&channel()).unwrap().offset, 3, "the client replays from here");
    }

    #[tokio::test]
    async fn a_message_of_another_epoch_is_preceded_by_a_reset() {
        let (e, f) = (Epoch::new("e"), Epoch::new("f"));
        let (mut session, mut frames) = (subscribed(&e, 9).await, Frames::default());
        session.accept(message(&f, 1), &mut frames).unwrap();
        session.accept(message(&f, 2), &mut frames).unwrap();
        let (list, messages) = sent(&mut frames);
        assert_eq!(list[0], serde_json::json!({"type": "reset", "channel": "c", "epoch": "f", "offset": 0}));
        assert_eq!((offsets(&list[1..]), messages), (vec![1, 2], 2), "a reset is not counted as a message");
        assert_eq!(session.position(&channel()), Some(Position { epoch: f, offset: 2 }));
    }

    #[tokio::test]
    async fn a_reset_from_the_engine_is_sent_and_live_delivery_goes_on_after_it() {
        let (e, f) = (Epoch::new("e"), Epoch::new("f"));
        let (mut session, mut frames) = (subscribed(&e, 4).await, Frames::default());
        let to = Position { epoch: f.clone(), offset: 7 };
        session.accept(Out::Reset(Box::new((channel(), to))), &mut frames).unwrap();
        session.accept(message(&f, 8), &mut frames).unwrap();
        let (list, messages) = sent(&mut frames);
        assert_eq!(list[0], serde_json::json!({"type": "reset", "channel": "c", "epoch": "f", "offset": 7}));
        assert_eq!((offsets(&list[1..]), messages), (vec![8], 1));
    }

    #[tokio::test]
    async fn a_reset_the_subscriber_already_started_past_is_not_sent() {
        // It subscribed after Redis lost the channel: its position is in the new epoch already.
        let f = Epoch::new("f");
        let (mut session, mut frames) = (subscribed(&f, 3).await, Frames::default());
        for offset in [0, 3] {
            let reset = Out::Reset(Box::new((channel(), Position { epoch: f.clone(), offset })));
            session.accept(reset, &mut frames).unwrap();
        }
        session.accept(message(&f, 2), &mut frames).unwrap();
        session.accept(message(&f, 4), &mut frames).unwrap();
        let (list, _) = sent(&mut frames);
        assert_eq!(offsets(&list), vec![4], "no reset, nothing twice: {list:?}");
        // A reset past its position in the same epoch (the range was trimmed) still counts.
        let reset = Out::Reset(Box::new((channel(), Position { epoch: f.clone(), offset: 9 })));
        session.accept(reset, &mut frames).unwrap();
        let (list, _) = sent(&mut frames);
        assert_eq!(list[0], serde_json::json!({"type": "reset", "channel": "c", "epoch": "f", "offset": 9}));
    }

    #[tokio::test]
    async fn nothing_of_a_channel_not_subscribed_is_sent() {
        let e = Epoch::new("e");
        let (mut session, mut frames) = (subscribed(&e, 0).await, Frames::default());
        session.subs.clear();
        session.accept(message(&e, 1), &mut frames).unwrap();
        session.accept(Out::Event(Box::new((channel(), Utf8Bytes::from_static("{}")))), &mut frames).unwrap();
        let reset = Out::Reset(Box::new((channel(), Position { epoch: e, offset: 3 })));
        session.accept(reset, &mut frames).unwrap();
        assert!(frames.is_empty());
    }

    #[tokio::test]
    async fn join_and_leave_events_of_a_subscribed_channel_are_sent_as_they_are() {
        let e = Epoch::new("e");
        let (mut session, mut frames) = (subscribed(&e, 0).await, Frames::default());
        let event = r#"{"type":"join","channel":"c","user":"bob"}"#;
        session.accept(Out::Event(Box::new((channel(), Utf8Bytes::from_static(event)))), &mut frames).unwrap();
        let (list, messages) = sent(&mut frames);
        assert_eq!((list[0]["type"].as_str(), list[0]["user"].as_str(), messages), (Some("join"), Some("bob"), 0));
    }

    #[test]
    fn replay_is_complete_only_when_every_offset_is_there() {
        let e = Epoch::new("e");
        let since = Position { epoch: e.clone(), offset: 3 };
        assert_eq!(complete_replay(&since, &e, 6, publications(&e, 4..=6), 10).map(|v| v.len()), Some(3));
        assert_eq!(complete_replay(&since, &e, 3, vec![], 10).map(|v| v.len()), Some(0));
        // trimmed: history starts at 5
        assert!(complete_replay(&since, &e, 6, publications(&e, 5..=6), 10).is_none());
        // too long
        assert!(complete_replay(&since, &e, 6, publications(&e, 4..=6), 2).is_none());
        // wrong epoch
        let other = Epoch::new("f");
        assert!(complete_replay(&since, &other, 6, publications(&other, 4..=6), 10).is_none());
        // position from the future
        assert!(complete_replay(&Position { epoch: e.clone(), offset: 9 }, &e, 6, vec![], 10).is_none());
    }
}
