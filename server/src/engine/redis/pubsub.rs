//! Live fan-out through Redis pub/sub, with node-level gap filling.
//!
//! The node holds one SUBSCRIBE per channel with local subscribers, counted by `subscribe` /
//! `unsubscribe`. Channels are spread by hash over several pub/sub connections (lanes,
//! `--redis-subscribers`), each read by its own task, so one busy connection or one slow
//! resubscribe never holds up the others. A lane's subscription changes are serialised by its
//! own async lock, so a SUBSCRIBE and an UNSUBSCRIBE of the same channel can never cross on the
//! wire, while lanes change independently.
//!
//! Each live channel remembers the last offset delivered on this node. Because offsets are
//! contiguous, a message above last + 1 is a gap: the channel stops delivering, reads the missing
//! range from the stream, delivers it, then what arrived meanwhile — in order. A pub/sub
//! reconnect or a lagging receiver does the same for every channel of that lane. If the stream no
//! longer has the range (trimmed, expired, or Redis came back empty with a new epoch), the
//! channel's subscribers get `reset` with the current position instead: never a silent gap.
//! Channel state is sharded: delivering on one channel or filling its gap locks that channel's
//! shard only.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::broadcast::error::RecvError;

use super::{Deployment, Operation, RedisEngine};
use crate::channel::ChannelName;
use crate::engine::{
    ClientInfo, Deliver, EngineError, Epoch, HistoryPage, HistoryQuery, NewMessage, Offset, Position, PresenceChange,
    Publication,
};
use crate::locks::lock;
use crate::shard::Sharded;

/// Most messages read from the stream per gap-filling round.
const FILL_PAGE: usize = 1000;

/// The channels this node is subscribed to, and the pub/sub connections that carry them.
pub(super) struct LiveChannels {
    channels: Sharded<Mutex<HashMap<ChannelName, LiveChannel>>>,
    lanes: Vec<Lane>,
    /// Wakes the resync task: a lane reconnected, or a cluster's slots moved (and, when the
    /// engine goes, so that the task ends).
    resync: Arc<tokio::sync::Notify>,
    /// Numbers channel entries, so a gap fill can tell its entry from a later one.
    generations: AtomicU64,
}

/// One pub/sub connection and the changes to its subscriptions.
struct Lane {
    subscriber: SubscriberClient,
    /// Channels waiting for a SUBSCRIBE, taken in one batch by the next holder of `changes`.
    wanted: Mutex<HashSet<ChannelName>>,
    /// Serialises this lane's SUBSCRIBE/UNSUBSCRIBE round trips, resubscribes included.
    changes: tokio::sync::Mutex<()>,
    /// The lane must subscribe its channels again (it reconnected, or slots moved).
    stale: AtomicBool,
}

impl LiveChannels {
    /// Channel state over `subscribers`, one lane each (at least one).
    pub(super) fn new(subscribers: Vec<SubscriberClient>) -> Self {
        assert!(!subscribers.is_empty(), "at least one pub/sub connection");
        let lanes = subscribers
            .into_iter()
            .map(|subscriber| Lane {
                subscriber,
                wanted: Mutex::default(),
                changes: tokio::sync::Mutex::default(),
                stale: AtomicBool::new(false),
            })
            .collect();
        Self { channels: Sharded::default(), lanes, resync: Arc::default(), generations: AtomicU64::new(0) }
    }

    /// Every pub/sub connection; the first also carries the control channels.
    /// Whether the connection carrying the control channels (and ban announcements) is up.
    pub(super) fn control_connected(&self) -> bool {
        self.lanes[0].subscriber.is_connected()
    }

    pub(super) fn subscribers(&self) -> impl Iterator<Item = &SubscriberClient> {
        self.lanes.iter().map(|l| &l.subscriber)
    }

    /// The lane that carries `channel`: by its hash slot, so on a cluster one lane's batch
    /// groups whole slots.
    fn lane_of(&self, channel: &ChannelName) -> usize {
        fred::util::redis_keyslot(channel.as_str().as_bytes()) as usize % self.lanes.len()
    }

    /// The locked shard that holds `channel`'s state.
    fn shard(&self, channel: &ChannelName) -> MutexGuard<'_, HashMap<ChannelName, LiveChannel>> {
        lock(self.channels.of(channel))
    }

    /// The channels of `lane` (every lane for `None`) that Redis acknowledged.
    fn subscribed(&self, lane: Option<usize>) -> Vec<ChannelName> {
        let mut held = Vec::new();
        for shard in &self.channels {
            let shard = lock(shard);
            let on_lane = |c: &ChannelName| lane.is_none_or(|l| self.lane_of(c) == l);
            held.extend(shard.iter().filter(|(c, l)| l.subscribed && on_lane(c)).map(|(c, _)| c.clone()));
        }
        held
    }

    /// Marks every lane for a resubscribe and wakes the resync task.
    fn all_stale(&self) {
        for lane in &self.lanes {
            lane.stale.store(true, Ordering::Relaxed);
        }
        self.resync.notify_one();
    }
}

impl Drop for LiveChannels {
    fn drop(&mut self) {
        self.resync.notify_one();
    }
}

/// One channel's node-level delivery state.
#[derive(Default)]
struct LiveChannel {
    /// Which entry of the channel this is (a channel left and joined again gets a new one).
    generation: u64,
    /// Local subscriptions.
    refs: usize,
    /// Whether Redis acknowledged the SUBSCRIBE.
    subscribed: bool,
    /// The last position delivered on this node.
    position: Option<Position>,
    /// A gap is being filled: messages wait in `pending`.
    filling: bool,
    pending: Vec<Arc<Publication>>,
}

/// The merge of pub/sub and stream, one channel at a time: each method takes one event (an
/// acknowledged SUBSCRIBE, a pub/sub message, a reconnect or lag, a page read for a gap fill),
/// delivers what is now in order, and says whether a gap fill must read the stream. No I/O here,
/// so the merge is tested without Redis: the callers do the reading, and hold the channels lock
/// around each call so one channel's deliveries never interleave. Deliveries go straight to
/// `deliver` instead of being returned, so the per-message path allocates nothing.
impl LiveChannel {
    /// Redis acknowledged the SUBSCRIBE and `top` was read right after: delivery starts there.
    /// A message that raced the read may already have taken this node to or past `top` in the same
    /// epoch; the position stays, so it is not delivered twice.
    fn subscribed_at(&mut self, top: Position) {
        self.subscribed = true;
        let newer = self.position.as_ref().is_some_and(|p| p.epoch == top.epoch && p.offset >= top.offset);
        if !newer {
            self.position = Some(top);
        }
    }

    /// Delivers `p` if it is the next offset; returns true when it revealed a gap to fill.
    fn accept(&mut self, p: Arc<Publication>, deliver: &dyn Deliver) -> bool {
        if self.filling {
            self.pending.push(p);
            return false;
        }
        match &self.position {
            Some(pos) if pos.epoch == p.epoch && p.offset <= pos.offset => false,
            // A hole, or another epoch: Redis lost the history, and the new epoch may hold
            // messages before this one. Either way the fill reads the stream and decides (a
            // reset, then what the new epoch still holds): one place for epoch changes.
            Some(pos) if pos.epoch != p.epoch || p.offset > pos.offset + 1 => {
                self.filling = true;
                self.pending.push(p);
                true
            }
            // The next offset (or the first message before the top read of the SUBSCRIBE).
            _ => {
                self.position = Some(Position { epoch: p.epoch.clone(), offset: p.offset });
                deliver.deliver(p);
                false
            }
        }
    }

    /// Pub/sub messages may have been lost (a reconnect, a lagging receiver): a subscribed
    /// channel starts filling from its last delivered offset. True when the caller must start
    /// the fill; a channel already filling has one running, and one not yet subscribed starts
    /// at the top it reads once the SUBSCRIBE is acknowledged.
    fn start_catch_up(&mut self) -> bool {
        if self.subscribed && !self.filling {
            self.filling = true;
            return true;
        }
        false
    }

    /// Delivers one page a gap fill read from the stream after `from` (after `reset`, if the
    /// history was lost), then, once the whole range is delivered, the messages that waited, in
    /// order and without what the page already delivered. A page read for an entry that is gone
    /// (the channel was left and joined again while the read ran: the new entry starts at its
    /// own top, with no fill or its own) is not applied: it would move the position back.
    fn apply_fill(
        &mut self,
        channel: &ChannelName,
        from: &Position,
        missing: Missing,
        deliver: &dyn Deliver,
    ) -> FillStep {
        if !self.filling || self.position.as_ref() != Some(from) {
            return FillStep::Stale;
        }
        if let Some(reset) = missing.reset {
            deliver.reset(channel, &reset);
            if reset.epoch != from.epoch {
                // Messages of the lost epoch that waited are history the reset already announced.
                self.pending.retain(|p| p.epoch != from.epoch);
            }
            self.position = Some(reset);
        }
        for p in missing.publications {
            self.position = Some(Position { epoch: p.epoch.clone(), offset: p.offset });
            deliver.deliver(p);
        }
        if missing.more {
            return FillStep::NextPage;
        }
        self.filling = false;
        let mut gap = false;
        for p in std::mem::take(&mut self.pending) {
            gap |= self.accept(p, deliver);
        }
        FillStep::Filled { gap }
    }
}

/// What a gap fill does after `LiveChannel::apply_fill`.
#[derive(Debug, PartialEq, Eq)]
enum FillStep {
    /// The range is longer than a page: read on from the new position.
    NextPage,
    /// The range and the messages that waited are delivered, unless one of those revealed
    /// another gap (`gap`): then the channel is filling again and the same task reads on.
    Filled { gap: bool },
    /// The page was read for an earlier entry of the channel: this fill is over.
    Stale,
}

/// What travels on a channel's pub/sub: a stored message (`k: "m"`, written by `publish.lua`:
/// epoch, offset, time, event, data) or a join/leave (`k: "p"`: change, client).
#[derive(Deserialize)]
struct Wire<'a> {
    k: &'a str,
    e: Option<&'a str>,
    o: Option<Offset>,
    t: Option<u64>,
    v: Option<String>,
    #[serde(borrow)]
    d: Option<&'a RawValue>,
    c: Option<PresenceChange>,
    i: Option<ClientInfo>,
}

/// The pub/sub message announcing `change` of `client` (see `Wire`).
pub(super) fn presence_message(change: PresenceChange, client: &ClientInfo) -> String {
    #[derive(Serialize)]
    struct Presence<'a> {
        k: &'static str,
        c: PresenceChange,
        i: &'a ClientInfo,
    }
    serde_json::to_string(&Presence { k: "p", c: change, i: client }).expect("presence messages serialise")
}

/// Makes sure this node receives `channel`, counting the reference.
///
/// Channels that need a SUBSCRIBE queue up in their lane's `wanted`; whoever gets the lane's
/// change lock subscribes everything queued in one command, so a connection storm over many
/// channels costs a few round trips instead of one per channel.
pub(super) async fn subscribe(engine: &RedisEngine, channel: &ChannelName) -> Result<Option<Position>, EngineError> {
    let live = &engine.live;
    {
        let mut shard = live.shard(channel);
        let entry = shard.entry(channel.clone()).or_insert_with(|| LiveChannel {
            generation: live.generations.fetch_add(1, Ordering::Relaxed),
            ..LiveChannel::default()
        });
        entry.refs += 1;
        if entry.subscribed {
            return Ok(entry.position.clone());
        }
    }
    let ix = live.lane_of(channel);
    let lane = &live.lanes[ix];
    lock(&lane.wanted).insert(channel.clone());
    let _change = lane.changes.lock().await;
    if let Some(live) = live.shard(channel).get(channel).filter(|l| l.subscribed) {
        return Ok(live.position.clone()); // an earlier batch took this channel along
    }
    let mut batch: Vec<ChannelName> = lock(&lane.wanted).drain().collect();
    if !batch.contains(channel) {
        batch.push(channel.clone()); // a failed batch took it along: try again
    }
    batch.retain(|c| live.shard(c).get(c).is_some_and(|l| !l.subscribed));
    let pages = match subscribe_batch(engine, ix, &batch).await {
        Ok(pages) => pages,
        Err(e) => {
            release(&mut live.shard(channel), channel);
            // The SUBSCRIBE may have reached Redis (only the top read failed, or no answer came
            // in time): take it back while the change lock still keeps others off the wire, or
            // a channel nobody holds stays subscribed. The others in the batch find themselves
            // unsubscribed and try again on their own.
            if let Err(undo) = unsubscribe_names(engine, ix, &batch).await {
                tracing::debug!(error = %undo, "undoing a failed SUBSCRIBE failed; a reconnect clears it");
            }
            return Err(e);
        }
    };
    for (name, page) in batch.iter().zip(pages) {
        if let Some(entry) = live.shard(name).get_mut(name) {
            entry.subscribed_at(page.position());
        }
    }
    Ok(live.shard(channel).get(channel).and_then(|l| l.position.clone()))
}

/// One SUBSCRIBE for the whole batch on lane `ix` (one SSUBSCRIBE per hash slot on a cluster,
/// the slots concurrently), then each channel's current top, read concurrently: that is where
/// delivery starts on this node, and any session that reads history after `subscribe` returned
/// has everything up to it.
async fn subscribe_batch(
    engine: &RedisEngine,
    ix: usize,
    batch: &[ChannelName],
) -> Result<Vec<HistoryPage>, EngineError> {
    if !engine.live.lanes[ix].subscriber.is_connected() {
        engine.metrics.error(Operation::Subscribe.label(), "disconnected");
        return Err(EngineError::Unavailable("redis pub/sub is not connected".into()));
    }
    subscribe_names(engine, ix, batch).await?;
    let tops = batch.iter().map(|c| engine.read_history(c, HistoryQuery::Latest { limit: 0 }));
    futures_util::future::join_all(tops).await.into_iter().collect()
}

/// Pub/sub channel names grouped by their cluster hash slot: one SSUBSCRIBE may name channels of
/// one slot only.
fn by_slot(names: Vec<String>) -> HashMap<u16, Vec<String>> {
    let mut slots: HashMap<u16, Vec<String>> = HashMap::new();
    for name in names {
        slots.entry(fred::util::redis_keyslot(name.as_bytes())).or_default().push(name);
    }
    slots
}

/// Which way a lane's subscriptions change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Subscribe,
    Unsubscribe,
}

/// One SUBSCRIBE for `channels` on lane `ix` (one SSUBSCRIBE per hash slot on a cluster, the
/// slots at once).
async fn subscribe_names(engine: &RedisEngine, ix: usize, channels: &[ChannelName]) -> Result<(), EngineError> {
    change_names(engine, ix, channels, Change::Subscribe).await
}

/// One UNSUBSCRIBE for `channels` on lane `ix` (per hash slot on a cluster).
async fn unsubscribe_names(engine: &RedisEngine, ix: usize, channels: &[ChannelName]) -> Result<(), EngineError> {
    change_names(engine, ix, channels, Change::Unsubscribe).await
}

/// Sends `change` for `channels` on lane `ix`, timed.
///
/// fred resolves a classic SUBSCRIBE once it is written (Redis' confirmation arrives out of band
/// and is dropped), so a SUBSCRIBE Redis refused (`NOPERM`) would look taken, and its channels
/// would stay marked subscribed while receiving nothing. A `PING` follows it: replies come in
/// order, so the PING's answer comes once Redis has handled the SUBSCRIBE, and a refusal, the
/// first reply fred can match to a command, becomes the PING's error. An SSUBSCRIBE waits for
/// Redis' reply itself.
///
/// A SUBSCRIBE is bounded: a resubscribe that never ends would hold the lane's change lock and
/// stop every later one (a timed-out SUBSCRIBE is retried by the resync, or taken back after a
/// failed batch). An
/// UNSUBSCRIBE is not bounded: it ends when Redis answers or the connection drops (which ends
/// every subscription), so a slow answer can never leave a subscription nobody holds.
async fn change_names(
    engine: &RedisEngine,
    ix: usize,
    channels: &[ChannelName],
    change: Change,
) -> Result<(), EngineError> {
    if channels.is_empty() {
        return Ok(());
    }
    let subscriber = &engine.live.lanes[ix].subscriber;
    let names: Vec<String> = channels.iter().map(|c| engine.keys.pubsub(c)).collect();
    let sent = async {
        match (engine.deployment, change) {
            (Deployment::Cluster, Change::Subscribe) => {
                futures_util::future::try_join_all(by_slot(names).into_values().map(|n| subscriber.ssubscribe(n)))
                    .await
                    .map(drop)
            }
            (Deployment::Cluster, Change::Unsubscribe) => {
                futures_util::future::try_join_all(by_slot(names).into_values().map(|n| subscriber.sunsubscribe(n)))
                    .await
                    .map(drop)
            }
            (_, Change::Subscribe) => {
                subscriber.subscribe(names).await?;
                subscriber.ping::<Value>(None).await.map(drop)
            }
            (_, Change::Unsubscribe) => subscriber.unsubscribe(names).await,
        }
    };
    match change {
        Change::Subscribe => on_subscriber(engine, sent).await,
        Change::Unsubscribe => engine.timed(Operation::Subscribe, sent).await,
    }
}

/// Runs one SUBSCRIBE on a pub/sub connection, timed and bounded by the command timeout.
async fn on_subscriber<T>(
    engine: &RedisEngine,
    command: impl Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, EngineError> {
    engine.timed(Operation::Subscribe, super::setup::bounded(command)).await
}

/// Drops one reference; the last one unsubscribes the node.
pub(super) async fn unsubscribe(engine: &RedisEngine, channel: &ChannelName) {
    let ix = engine.live.lane_of(channel);
    let _change = engine.live.lanes[ix].changes.lock().await;
    let last = release(&mut engine.live.shard(channel), channel);
    if last && let Err(e) = unsubscribe_names(engine, ix, std::slice::from_ref(channel)).await {
        tracing::warn!(%channel, error = %e, "unsubscribe failed");
    }
}

/// Decrements `channel`'s count; true when that was the last reference.
fn release(channels: &mut HashMap<ChannelName, LiveChannel>, channel: &ChannelName) -> bool {
    let Some(live) = channels.get_mut(channel) else { return false };
    live.refs = live.refs.saturating_sub(1);
    if live.refs == 0 {
        channels.remove(channel);
        return true;
    }
    false
}

/// Subscribes the control channels (surveys, answers to this node's, ban announcements) on the
/// first lane, then loads the node's copy of the bans (`bans.rs`: announcements from the
/// SUBSCRIBE on wait for the load).
pub(super) async fn subscribe_control(engine: &RedisEngine) -> Result<(), EngineError> {
    let load = engine.bans.begin_load();
    let control = vec![engine.keys.control(), engine.keys.control_reply(&engine.settings.node_id), engine.keys.bans()];
    on_subscriber(engine, engine.live.lanes[0].subscriber.subscribe(control)).await?;
    engine.load_bans(load).await
}

/// Starts one task per lane that turns its pub/sub traffic into deliveries, and the resync task.
pub(super) fn spawn_dispatchers(engine: &Arc<RedisEngine>) {
    for (ix, lane) in engine.live.lanes.iter().enumerate() {
        let (messages, reconnects) = (lane.subscriber.message_rx(), lane.subscriber.reconnect_rx());
        tokio::spawn(dispatch(Arc::downgrade(engine), ix, messages, reconnects));
    }
    tokio::spawn(resyncs(Arc::downgrade(engine), engine.live.resync.clone()));
}

/// Asks for a resubscribe and catch-up of every lane (a cluster's slots moved).
pub(super) fn request_resync(engine: &RedisEngine) {
    engine.live.all_stale();
}

/// The resync task: after a lane reconnected (or slots moved), subscribes its channels again and
/// catches them up, retrying with backoff until Redis takes the SUBSCRIBE. Retrying matters: a
/// channel that stays marked subscribed without a subscription would receive nothing, and no
/// later event would tell.
async fn resyncs(engine: Weak<RedisEngine>, wanted: Arc<tokio::sync::Notify>) {
    loop {
        wanted.notified().await;
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(engine) = engine.upgrade() else { return };
            let mut failed = false;
            for (ix, lane) in engine.live.lanes.iter().enumerate() {
                if lane.stale.swap(false, Ordering::Relaxed)
                    && let Err(e) = resync(&engine, ix).await
                {
                    tracing::warn!(lane = ix, error = %e, retry_in_ms = backoff.as_millis() as u64, "resubscribe failed");
                    lane.stale.store(true, Ordering::Relaxed);
                    failed = true;
                }
            }
            if !failed {
                break;
            }
            drop(engine);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

async fn dispatch(
    engine: Weak<RedisEngine>,
    ix: usize,
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    mut reconnects: tokio::sync::broadcast::Receiver<Server>,
) {
    loop {
        tokio::select! {
            message = messages.recv() => {
                let Some(engine) = engine.upgrade() else { return };
                match message {
                    Ok(message) => on_message(&engine, message),
                    Err(RecvError::Lagged(n)) => {
                        engine.metrics.pubsub_lagged.inc();
                        tracing::warn!(lane = ix, dropped = n, "pub/sub receiver lagged: filling from the streams");
                        catch_up(&engine, Some(ix));
                    }
                    Err(RecvError::Closed) => return,
                }
            }
            reconnect = reconnects.recv() => {
                let Some(engine) = engine.upgrade() else { return };
                if let Err(RecvError::Closed) = reconnect {
                    return;
                }
                engine.metrics.pubsub_reconnects.inc();
                if ix == 0 {
                    engine.bans.forget();
                }
                tracing::info!(lane = ix, "redis subscriber reconnected: resubscribing and catching up");
                engine.live.lanes[ix].stale.store(true, Ordering::Relaxed);
                engine.live.resync.notify_one();
            }
        }
    }
}

/// Subscribes lane `ix` again to every channel it carries (from the node's own table, not the
/// client library's memory, which also keeps what a failed batch left), then fills each from
/// its stream: messages published while a subscription was missing (a reconnect, a slot that
/// moved) are read back. Resubscribe first, then read the streams: nothing can fall in between.
/// The fill runs even when the resubscribe failed, so what reached the streams is delivered
/// either way.
async fn resync(engine: &Arc<RedisEngine>, ix: usize) -> Result<(), EngineError> {
    let resubscribed = {
        let _change = engine.live.lanes[ix].changes.lock().await;
        let held = engine.live.subscribed(Some(ix));
        let control = if ix == 0 { subscribe_control(engine).await } else { Ok(()) };
        match control {
            Ok(()) => subscribe_names(engine, ix, &held).await,
            Err(e) => Err(e),
        }
    };
    catch_up(engine, Some(ix));
    resubscribed
}

/// A message on one of the control channels (`subscribe_control`).
fn on_control(engine: &Arc<RedisEngine>, name: &str, text: &str) {
    if name == engine.keys.control() {
        super::scatter::on_request(engine, text)
    } else if name == engine.keys.control_reply(&engine.settings.node_id) {
        super::scatter::on_reply(engine, text)
    } else if name == engine.keys.bans() {
        engine.bans.on_change(text)
    }
}

fn on_message(engine: &Arc<RedisEngine>, message: fred::types::Message) {
    let Some(text) = message.value.as_str() else { return };
    // A channel's messages first: the control channels' names (no braces) are built only for
    // the rare message that is not one.
    let Some(channel) = engine.keys.channel_of(&message.channel) else {
        return on_control(engine, &message.channel, &text);
    };
    let wire: Wire = match serde_json::from_str(&text) {
        Ok(w) => w,
        Err(e) => return tracing::warn!(%channel, error = %e, "unreadable pub/sub message"),
    };
    let Some(deliver) = engine.deliver.upgrade() else { return };
    match (wire.k, wire.e, wire.o, wire.d) {
        ("p", ..) if let (Some(change), Some(client)) = (wire.c, &wire.i) => {
            deliver.deliver_presence(&channel, change, client)
        }
        ("m", Some(epoch), Some(offset), Some(data)) => {
            let msg = NewMessage { event: wire.v, data: data.to_owned(), idempotency_key: None };
            let p = Arc::new(Publication::new(channel.clone(), Epoch::new(epoch), offset, msg, wire.t.unwrap_or(0)));
            let gap = {
                let mut shard = engine.live.shard(&channel);
                let Some(live) = shard.get_mut(&channel) else { return };
                live.accept(p, deliver.as_ref()).then_some(live.generation)
            };
            if let Some(generation) = gap {
                tokio::spawn(fill(Arc::downgrade(engine), channel, generation));
            }
        }
        _ => tracing::warn!(%channel, "pub/sub message of unknown shape"),
    }
}

/// Puts every live channel of lane `ix` (of every lane for `None`) into gap filling from its
/// last delivered offset; one shard locked at a time.
fn catch_up(engine: &Arc<RedisEngine>, ix: Option<usize>) {
    let mut to_fill = Vec::new();
    for shard in &engine.live.channels {
        for (channel, live) in lock(shard).iter_mut() {
            if ix.is_none_or(|ix| engine.live.lane_of(channel) == ix) && live.start_catch_up() {
                to_fill.push((channel.clone(), live.generation));
            }
        }
    }
    for (channel, generation) in to_fill {
        tokio::spawn(fill(Arc::downgrade(engine), channel, generation));
    }
}

/// Reads what `channel` is missing from the stream and delivers it, then the messages that
/// waited; retries while Redis is away. If the channel's epoch changed (Redis lost it), the
/// subscribers get `reset` and then the new epoch's messages from 1 where the stream still has
/// them, or `reset` to the current top where it does not. The fill belongs to the channel's
/// entry `generation`: once the channel was left (and perhaps joined again) it stops.
async fn fill(engine: Weak<RedisEngine>, channel: ChannelName, generation: u64) {
    let mut backoff = Duration::from_millis(50);
    // Whether this fill had to send `reset` (its result, for the metrics).
    let mut lost = false;
    loop {
        let Some(engine) = engine.upgrade() else { return };
        let from = engine
            .live
            .shard(&channel)
            .get(&channel)
            .filter(|l| l.generation == generation)
            .map(|l| l.position.clone());
        let Some(Some(from)) = from else { return };
        let read = |after| engine.read_history(&channel, HistoryQuery::After { after, limit: FILL_PAGE });
        let missing = match read_missing(read, &from).await {
            Ok(missing) => missing,
            Err(e) => {
                tracing::debug!(%channel, error = %e, "gap fill waits for redis");
                drop(engine);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let Some(deliver) = engine.deliver.upgrade() else { return };
        let mut shard = engine.live.shard(&channel);
        let Some(live) = shard.get_mut(&channel).filter(|l| l.generation == generation) else { return };
        if let Some(reset) = &missing.reset {
            tracing::warn!(%channel, from = from.offset, epoch = %reset.epoch, offset = reset.offset, "history lost under live subscribers: reset");
            lost = true;
        }
        match live.apply_fill(&channel, &from, missing, deliver.as_ref()) {
            FillStep::NextPage => {}
            FillStep::Stale => return,
            FillStep::Filled { gap } => {
                engine.metrics.gap_fills.with_label_values(&[if lost { "reset" } else { "filled" }]).inc();
                lost = false;
                if !gap {
                    return;
                }
            }
        }
    }
}

/// What a gap fill found in the stream.
struct Missing {
    /// Deliver `reset` to this position first (the epoch changed or the range is gone).
    reset: Option<Position>,
    /// The messages to deliver after `from` (or after the reset), in order.
    publications: Vec<Arc<Publication>>,
    /// More than one page is missing: read again.
    more: bool,
}

/// Reads what a gap fill is missing after `from`, one page, with `read(after)` (messages above
/// `after`, at most `FILL_PAGE`, with the stream's epoch and top). If Redis has another epoch, its
/// history was lost: everything of the new epoch is missing, from offset 0.
async fn read_missing<F, R>(read: F, from: &Position) -> Result<Missing, EngineError>
where
    F: Fn(Offset) -> R,
    R: Future<Output = Result<HistoryPage, EngineError>>,
{
    let page = read(from.offset).await?;
    if page.epoch == from.epoch {
        return Ok(Missing::judge(from, None, page));
    }
    let start = Position { epoch: page.epoch.clone(), offset: 0 };
    let page = read(0).await?;
    Ok(Missing::judge(&start, Some(start.clone()), page))
}

impl Missing {
    /// Judges `page`, read after `start` (which follows `reset`, if any): its messages if they
    /// continue `start` without a hole, else `reset` to the stream's current position and
    /// nothing else — the range was trimmed or expired, or the epoch changed again.
    fn judge(start: &Position, reset: Option<Position>, page: HistoryPage) -> Missing {
        let complete = page.epoch == start.epoch
            && page.top >= start.offset
            && page.publications.first().is_none_or(|p| p.offset == start.offset + 1)
            && (page.publications.is_empty() == (page.top == start.offset));
        if !complete {
            return Missing { reset: Some(page.position()), publications: Vec::new(), more: false };
        }
        let last = page.publications.last().map_or(start.offset, |p| p.offset);
        Missing { reset, more: last < page.top, publications: page.publications }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::ops::RangeInclusive;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use serde_json::value::RawValue;

    use super::*;

    const E1: &str = "e1";
    const E2: &str = "e2";

    fn room() -> ChannelName {
        ChannelName::parse("room").unwrap()
    }

    fn at(epoch: &str, offset: Offset) -> Position {
        Position { epoch: Epoch::new(epoch), offset }
    }

    fn publication(epoch: &str, offset: Offset) -> Arc<Publication> {
        let msg =
            NewMessage { event: None, data: RawValue::from_string(offset.to_string()).unwrap(), idempotency_key: None };
        Arc::new(Publication::new(room(), Epoch::new(epoch), offset, msg, 0))
    }

    /// What the node's subscribers were handed, in order.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Message(String, Offset),
        Reset(String, Offset),
    }

    fn message(epoch: &str, offset: Offset) -> Got {
        Got::Message(epoch.into(), offset)
    }

    fn messages(epoch: &str, offsets: RangeInclusive<Offset>) -> Vec<Got> {
        offsets.map(|o| message(epoch, o)).collect()
    }

    fn reset(epoch: &str, offset: Offset) -> Got {
        Got::Reset(epoch.into(), offset)
    }

    /// Records deliveries the way the hub would receive them.
    #[derive(Default)]
    struct Hub(Mutex<Vec<Got>>);

    impl Hub {
        fn take(&self) -> Vec<Got> {
            std::mem::take(&mut *lock(&self.0))
        }
    }

    impl Deliver for Hub {
        fn deliver(&self, p: Arc<Publication>) {
            assert_eq!(p.channel, room());
            lock(&self.0).push(Got::Message(p.epoch.to_string(), p.offset));
        }
        fn deliver_presence(&self, _: &ChannelName, _: PresenceChange, _: &ClientInfo) {
            panic!("the merge never hands on presence");
        }
        fn reset(&self, channel: &ChannelName, position: &Position) {
            assert_eq!(*channel, room());
            lock(&self.0).push(Got::Reset(position.epoch.to_string(), position.offset));
        }
    }

    /// A channel whose SUBSCRIBE was acknowledged with the stream at `epoch`/`top`.
    fn subscribed(epoch: &str, top: Offset) -> LiveChannel {
        let mut live = LiveChannel { refs: 1, ..LiveChannel::default() };
        live.subscribed_at(at(epoch, top));
        live
    }

    /// Hands `offsets` of `epoch` to `live` as pub/sub messages; true if any revealed a gap.
    fn arrive(live: &mut LiveChannel, hub: &Hub, epoch: &str, offsets: impl IntoIterator<Item = Offset>) -> bool {
        offsets.into_iter().fold(false, |gap, o| live.accept(publication(epoch, o), hub) | gap)
    }

    fn pending(live: &LiveChannel) -> Vec<Offset> {
        live.pending.iter().map(|p| p.offset).collect()
    }

    /// A channel's stream as the history script answers it: the epoch, the top, and the entries
    /// still held, `first..=top` (trimming and expiry remove the oldest). Remembers every `after`
    /// it was asked for.
    struct Stream {
        epoch: &'static str,
        top: Offset,
        first: Offset,
        reads: RefCell<Vec<Offset>>,
    }

    impl Stream {
        /// Everything from offset 1 to `top` is still held.
        fn new(epoch: &'static str, top: Offset) -> Self {
            Self::holding_from(epoch, top, 1)
        }

        /// Holds `first..=top`: nothing if `first` is above `top`.
        fn holding_from(epoch: &'static str, top: Offset, first: Offset) -> Self {
            Self { epoch, top, first, reads: RefCell::new(Vec::new()) }
        }

        fn read(&self, after: Offset) -> HistoryPage {
            self.reads.borrow_mut().push(after);
            let first = self.first.max(after + 1);
            let publications = (first..=self.top).take(FILL_PAGE).map(|o| publication(self.epoch, o)).collect();
            HistoryPage { epoch: Epoch::new(self.epoch), top: self.top, publications }
        }

        fn reads(&self) -> Vec<Offset> {
            self.reads.borrow().clone()
        }
    }

    /// Polls a future that never waits (the stream is in memory) to its end.
    fn now<F: Future>(future: F) -> F::Output {
        match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("the in-memory stream never waits"),
        }
    }

    /// One round of `fill`: read after the last delivered position, deliver what was read.
    fn fill_round(live: &mut LiveChannel, stream: &Stream, hub: &Hub) -> FillStep {
        assert!(live.filling, "only a filling channel is filled");
        let from = live.position.clone().expect("a filling channel has a position");
        let missing = now(read_missing(|after| std::future::ready(Ok(stream.read(after))), &from)).unwrap();
        live.apply_fill(&room(), &from, missing, hub)
    }

    #[test]
    fn messages_in_offset_order_are_delivered_as_they_arrive() {
        let (mut live, hub) = (subscribed(E1, 3), Hub::default());
        assert!(!arrive(&mut live, &hub, E1, 4..=6));
        assert_eq!(hub.take(), messages(E1, 4..=6));
        assert_eq!(live.position, Some(at(E1, 6)));
        assert!(!live.filling && live.pending.is_empty());
    }

    #[test]
    fn a_message_at_or_below_the_last_delivered_offset_is_dropped() {
        let (mut live, hub) = (subscribed(E1, 5), Hub::default());
        assert!(!arrive(&mut live, &hub, E1, [5, 3, 1]));
        assert_eq!(hub.take(), []);
        assert_eq!(live.position, Some(at(E1, 5)));
        assert!(!arrive(&mut live, &hub, E1, [6, 6]));
        assert_eq!(hub.take(), [message(E1, 6)]);
    }

    #[test]
    fn a_message_above_the_next_offset_opens_a_gap_that_is_read_from_the_last_delivered() {
        let (mut live, hub) = (subscribed(E1, 3), Hub::default());
        assert!(arrive(&mut live, &hub, E1, [6]), "4 and 5 are missing: a fill must start");
        assert_eq!(hub.take(), [], "nothing is delivered around the hole");
        assert!(live.filling);
        assert_eq!(pending(&live), [6]);
        assert_eq!(live.position, Some(at(E1, 3)), "the fill reads from here");

        let stream = Stream::new(E1, 6);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(stream.reads(), [3]);
        assert_eq!(hub.take(), messages(E1, 4..=6));
    }

    #[test]
    fn a_fill_that_read_past_the_waiting_messages_delivers_each_offset_once() {
        let (mut live, hub) = (subscribed(E1, 3), Hub::default());
        assert!(arrive(&mut live, &hub, E1, [6]));
        assert!(!arrive(&mut live, &hub, E1, [7]));
        // 8 and 9 were published before the read: the stream has them, pub/sub has not yet.
        let stream = Stream::new(E1, 9);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(hub.take(), messages(E1, 4..=9));
        assert_eq!(live.position, Some(at(E1, 9)));
        assert!(!live.filling && live.pending.is_empty());

        assert!(!arrive(&mut live, &hub, E1, 8..=10));
        assert_eq!(hub.take(), [message(E1, 10)], "8 and 9 came from the stream already");
    }

    #[test]
    fn messages_arriving_while_a_fill_is_in_flight_wait_and_follow_the_range_in_order() {
        let (mut live, hub) = (subscribed(E1, 3), Hub::default());
        assert!(arrive(&mut live, &hub, E1, [5]));
        // The read is on its way; more arrives, next offsets and all: none starts another fill.
        assert!(!arrive(&mut live, &hub, E1, 6..=8));
        assert_eq!(hub.take(), []);
        assert_eq!(pending(&live), [5, 6, 7, 8]);
        // The read saw the stream before 7 and 8 were published.
        let stream = Stream::new(E1, 6);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(hub.take(), messages(E1, 4..=8));
        assert_eq!(live.position, Some(at(E1, 8)));
        assert!(!live.filling && live.pending.is_empty());
    }

    #[test]
    fn a_waiting_message_that_reveals_another_gap_keeps_the_fill_going() {
        let (mut live, hub) = (subscribed(E1, 3), Hub::default());
        assert!(arrive(&mut live, &hub, E1, [5]));
        // 6 arrives, 7 is lost on the way, 8 arrives: all while the first read is out.
        assert!(!arrive(&mut live, &hub, E1, [6, 8]));
        let stream = Stream::new(E1, 6);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: true });
        assert_eq!(hub.take(), messages(E1, 4..=6));
        assert!(live.filling, "8 waits for 7");
        assert_eq!(pending(&live), [8]);

        let stream = Stream::new(E1, 8);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(stream.reads(), [6]);
        assert_eq!(hub.take(), messages(E1, 7..=8));
        assert!(!live.filling && live.pending.is_empty());
    }

    #[test]
    fn a_range_longer_than_a_page_is_read_page_by_page_while_messages_wait() {
        let top = FILL_PAGE as Offset + 10;
        let (mut live, hub) = (subscribed(E1, 1), Hub::default());
        assert!(arrive(&mut live, &hub, E1, [top + 1]));
        let stream = Stream::new(E1, top);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::NextPage);
        assert_eq!(hub.take(), messages(E1, 2..=FILL_PAGE as Offset + 1));
        assert!(live.filling, "the rest of the range is still missing");
        assert!(!arrive(&mut live, &hub, E1, [top + 2]));
        assert_eq!(hub.take(), []);

        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(stream.reads(), [1, FILL_PAGE as Offset + 1]);
        assert_eq!(hub.take(), messages(E1, FILL_PAGE as Offset + 2..=top + 2));
        assert!(!live.filling && live.pending.is_empty());
    }

    #[test]
    fn a_trimmed_range_resets_to_the_top_and_goes_on_live_from_there() {
        let (mut live, hub) = (subscribed(E1, 3), Hub::default());
        assert!(arrive(&mut live, &hub, E1, [10, 11]));
        // 4 to 6 were trimmed (or expired) before the fill could read them.
        let stream = Stream::holding_from(E1, 10, 7);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(
            hub.take(),
            [reset(E1, 10), message(E1, 11)],
            "no message around the hole; 10 is before the reset position"
        );
        assert_eq!(live.position, Some(at(E1, 11)));
    }

    #[test]
    fn a_stream_gone_under_its_kept_position_resets_to_the_top() {
        let (mut live, hub) = (subscribed(E1, 3), Hub::default());
        assert!(arrive(&mut live, &hub, E1, [5]));
        // The stream expired; the meta key (longer expiry) still has the epoch and top.
        let stream = Stream::holding_from(E1, 5, 6);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(hub.take(), [reset(E1, 5)]);
        assert_eq!(live.position, Some(at(E1, 5)));
        assert!(!live.filling && live.pending.is_empty());
    }

    #[test]
    fn a_new_epoch_found_by_a_fill_resets_then_delivers_the_new_epoch_from_offset_1() {
        let (mut live, hub) = (subscribed(E1, 5), Hub::default());
        // Redis came back empty: the pub/sub connection dropped, and the channel has a new epoch.
        assert!(live.start_catch_up());
        assert!(!arrive(&mut live, &hub, E2, [3]));
        let stream = Stream::new(E2, 3);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(stream.reads(), [5, 0], "after our offset in the old epoch, then the new epoch from its start");
        let mut expected = vec![reset(E2, 0)];
        expected.extend(messages(E2, 1..=3));
        assert_eq!(hub.take(), expected);
        assert_eq!(live.position, Some(at(E2, 3)));
        assert!(!live.filling && live.pending.is_empty());
    }

    #[test]
    fn a_new_epoch_whose_start_is_gone_resets_once_to_its_top() {
        let (mut live, hub) = (subscribed(E1, 5), Hub::default());
        assert!(live.start_catch_up());
        let stream = Stream::holding_from(E2, 9, 4);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(hub.take(), [reset(E2, 9)]);
        assert_eq!(live.position, Some(at(E2, 9)));
        assert!(!arrive(&mut live, &hub, E2, 9..=10));
        assert_eq!(hub.take(), [message(E2, 10)]);
    }

    #[test]
    fn a_live_message_of_another_epoch_is_a_gap_filled_from_the_new_epochs_start() {
        // Redis lost the channel and publishes went on in a new epoch before this node noticed:
        // the new epoch's first messages must not be skipped.
        let (mut live, hub) = (subscribed(E1, 5), Hub::default());
        assert!(arrive(&mut live, &hub, E2, [4]), "another epoch starts a fill");
        assert_eq!(hub.take(), [], "nothing is delivered before the fill decides");
        let stream = Stream::new(E2, 4);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        let mut expected = vec![reset(E2, 0)];
        expected.extend(messages(E2, 1..=4));
        assert_eq!(hub.take(), expected);
        assert!(!arrive(&mut live, &hub, E2, [4, 5]));
        assert_eq!(hub.take(), [message(E2, 5)]);
    }

    #[test]
    fn waiting_messages_of_the_lost_epoch_are_dropped_after_the_reset() {
        let (mut live, hub) = (subscribed(E1, 5), Hub::default());
        assert!(arrive(&mut live, &hub, E1, [7]), "6 is missing");
        assert!(!arrive(&mut live, &hub, E1, [8]));
        // Before the fill read, Redis lost the channel; the new epoch has 2 messages.
        let stream = Stream::new(E2, 2);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        let mut expected = vec![reset(E2, 0)];
        expected.extend(messages(E2, 1..=2));
        assert_eq!(hub.take(), expected, "one reset, and nothing of the old epoch after it");
        assert_eq!(live.position, Some(at(E2, 2)));
        assert!(!live.filling && live.pending.is_empty());
    }

    #[test]
    fn a_reconnect_or_lag_fills_each_subscribed_channel_once() {
        let mut live = subscribed(E1, 5);
        assert!(live.start_catch_up(), "the caller starts a fill");
        assert!(live.filling);
        assert!(!live.start_catch_up(), "a second reconnect joins the fill already running");
        let mut unacknowledged = LiveChannel { refs: 1, ..LiveChannel::default() };
        assert!(!unacknowledged.start_catch_up(), "it starts at the top it reads after its SUBSCRIBE");
        assert!(!unacknowledged.filling);
    }

    #[test]
    fn after_a_reconnect_what_was_missed_comes_from_the_stream_before_new_messages() {
        let (mut live, hub) = (subscribed(E1, 5), Hub::default());
        assert!(live.start_catch_up());
        // 6 and 7 were published while the connection was down; 8 arrives after the resubscribe.
        assert!(!arrive(&mut live, &hub, E1, [8]));
        assert_eq!(hub.take(), [], "8 waits: 6 and 7 come first");
        let stream = Stream::new(E1, 8);
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(stream.reads(), [5]);
        assert_eq!(hub.take(), messages(E1, 6..=8));
        assert_eq!(live.position, Some(at(E1, 8)));
    }

    #[test]
    fn a_catch_up_with_nothing_missed_delivers_what_waited() {
        let (mut live, hub) = (subscribed(E1, 5), Hub::default());
        assert!(live.start_catch_up());
        let stream = Stream::new(E1, 5);
        assert!(!arrive(&mut live, &hub, E1, [6]), "published after the read");
        assert_eq!(fill_round(&mut live, &stream, &hub), FillStep::Filled { gap: false });
        assert_eq!(hub.take(), [message(E1, 6)]);
        assert!(!live.filling && live.pending.is_empty());
    }

    #[test]
    fn delivery_starts_at_the_top_read_after_the_subscribe() {
        let (mut live, hub) = (subscribed(E1, 7), Hub::default());
        assert!(live.subscribed);
        assert!(!arrive(&mut live, &hub, E1, 6..=8));
        assert_eq!(hub.take(), [message(E1, 8)], "sessions read up to 7 from history themselves");
    }

    #[test]
    fn a_message_that_raced_the_top_read_is_not_moved_back_or_delivered_twice() {
        let hub = Hub::default();
        let mut live = LiveChannel { refs: 1, ..LiveChannel::default() };
        // Before the SUBSCRIBE's top is read there is nothing to compare with: delivered.
        assert!(!arrive(&mut live, &hub, E1, [8]));
        assert_eq!(hub.take(), [message(E1, 8)]);
        live.subscribed_at(at(E1, 7));
        assert_eq!(live.position, Some(at(E1, 8)), "the older top does not move the position back");
        assert!(!arrive(&mut live, &hub, E1, [8]));
        assert_eq!(hub.take(), []);

        // A top further on, or of another epoch, is where delivery starts.
        let mut live = LiveChannel { position: Some(at(E1, 8)), ..LiveChannel::default() };
        live.subscribed_at(at(E1, 9));
        assert_eq!(live.position, Some(at(E1, 9)));
        let mut live = LiveChannel { position: Some(at(E1, 8)), ..LiveChannel::default() };
        live.subscribed_at(at(E2, 2));
        assert_eq!(live.position, Some(at(E2, 2)));
    }

    #[test]
    fn a_page_counts_only_if_it_continues_the_start_without_a_hole() {
        let page = |epoch: &str, top: Offset, offsets: &[Offset]| HistoryPage {
            epoch: Epoch::new(epoch),
            top,
            publications: offsets.iter().map(|&o| publication(epoch, o)).collect(),
        };
        let judged = |page: HistoryPage| {
            let m = Missing::judge(&at(E1, 3), None, page);
            (m.reset, m.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), m.more)
        };
        assert_eq!(judged(page(E1, 5, &[4, 5])), (None, vec![4, 5], false), "complete");
        assert_eq!(judged(page(E1, 9, &[4, 5])), (None, vec![4, 5], true), "complete so far: read on");
        assert_eq!(judged(page(E1, 3, &[])), (None, vec![], false), "nothing missing");
        assert_eq!(judged(page(E1, 5, &[5])), (Some(at(E1, 5)), vec![], false), "4 was trimmed");
        assert_eq!(judged(page(E1, 5, &[])), (Some(at(E1, 5)), vec![], false), "expired");
        assert_eq!(judged(page(E1, 2, &[])), (Some(at(E1, 2)), vec![], false), "top behind the start");
        assert_eq!(judged(page(E1, 2, &[4])), (Some(at(E1, 2)), vec![], false), "entries above a top behind the start");
        assert_eq!(judged(page(E1, 3, &[4])), (Some(at(E1, 3)), vec![], false), "entries above the top");
        assert_eq!(judged(page(E2, 5, &[4, 5])), (Some(at(E2, 5)), vec![], false), "the epoch changed again");
        let m = Missing::judge(&at(E2, 0), Some(at(E2, 0)), page(E2, 2, &[1, 2]));
        assert_eq!(m.reset, Some(at(E2, 0)), "a reset found before the page comes with it");
    }

    #[test]
    fn a_failed_read_is_passed_on_and_never_taken_for_a_lost_history() {
        let down = || EngineError::Unavailable("redis is not connected".into());
        let first = now(read_missing(|_| std::future::ready(Err(down())), &at(E1, 3)));
        assert!(matches!(first, Err(EngineError::Unavailable(_))));
        // Redis answers with a new epoch, then fails before the new epoch's start is read.
        let reads = RefCell::new(Vec::new());
        let read = |after| {
            reads.borrow_mut().push(after);
            std::future::ready(if after == 0 { Err(down()) } else { Ok(Stream::new(E2, 2).read(after)) })
        };
        assert!(now(read_missing(read, &at(E1, 3))).is_err());
        assert_eq!(*reads.borrow(), [3, 0]);
    }

    #[test]
    fn a_fill_read_for_a_channel_left_and_joined_again_is_not_applied() {
        let (mut old, hub) = (subscribed(E1, 3), Hub::default());
        assert!(arrive(&mut old, &hub, E1, [6]), "a gap: a fill reads after 3");
        let from = old.position.clone().unwrap();
        let stream = Stream::new(E1, 9);
        let missing = now(read_missing(|after| std::future::ready(Ok(stream.read(after))), &from)).unwrap();
        // Meanwhile the last subscriber left and a new one joined: a new entry at the top, 9.
        let mut new = subscribed(E1, 9);
        assert_eq!(new.apply_fill(&room(), &from, missing, &hub), FillStep::Stale);
        assert_eq!(hub.take(), vec![], "nothing from the old read is delivered");
        assert_eq!(new.position, Some(at(E1, 9)), "the new entry's position does not move back");
        assert!(!new.filling);
    }

    #[test]
    fn the_last_reference_removes_the_channel() {
        let mut channels = HashMap::from([(room(), LiveChannel { refs: 2, ..subscribed(E1, 1) })]);
        assert!(!release(&mut channels, &room()));
        assert_eq!(channels[&room()].refs, 1);
        assert!(release(&mut channels, &room()), "the caller unsubscribes the node");
        assert!(channels.is_empty());
        assert!(!release(&mut channels, &room()), "an unknown channel is not unsubscribed again");
    }
}
