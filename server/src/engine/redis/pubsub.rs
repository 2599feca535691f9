//! Live fan-out through Redis pub/sub, with node-level gap filling.
//!
//! The node holds one SUBSCRIBE per channel with local subscribers, counted by `subscribe` /
//! `unsubscribe`. Subscription changes are serialised by one async lock, so a SUBSCRIBE and an
//! UNSUBSCRIBE of the same channel can never cross on the wire.
//!
//! Each live channel remembers the last offset delivered on this node. Because offsets are
//! contiguous, a message above last + 1 is a gap: the channel stops delivering, reads the missing
//! range from the stream, delivers it, then what arrived meanwhile — in order. A pub/sub
//! reconnect or a lagging receiver does the same for every channel. If the stream no longer has
//! the range (trimmed, expired, or Redis came back empty with a new epoch), the channel's
//! subscribers get `reset` with the current position instead: never a silent gap.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fred::prelude::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::broadcast::error::RecvError;

use super::{Operation, RedisEngine, lock};
use crate::channel::ChannelName;
use crate::engine::{
    Deliver, EngineError, Epoch, HistoryPage, HistoryQuery, NewMessage, Offset, Position, Publication,
};

/// Most messages read from the stream per gap-filling round.
const FILL_PAGE: usize = 1000;

/// The channels this node is subscribed to.
#[derive(Default)]
pub(super) struct LiveChannels {
    channels: Mutex<HashMap<ChannelName, LiveChannel>>,
    /// Channels waiting for a SUBSCRIBE, taken in one batch by the next holder of `changes`.
    wanted: Mutex<HashSet<ChannelName>>,
    /// Serialises SUBSCRIBE/UNSUBSCRIBE round trips.
    changes: tokio::sync::Mutex<()>,
}

/// One channel's node-level delivery state.
#[derive(Default)]
struct LiveChannel {
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
            Some(pos) if pos.epoch == p.epoch && p.offset > pos.offset + 1 => {
                self.filling = true;
                self.pending.push(p);
                true
            }
            // The next offset, or a new epoch (sessions turn that into `reset`).
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

    /// Delivers one page a gap fill read from the stream (after `reset`, if the history was
    /// lost), then, once the whole range is delivered, the messages that waited, in order and
    /// without what the page already delivered.
    fn apply_fill(&mut self, channel: &ChannelName, missing: Missing, deliver: &dyn Deliver) -> FillStep {
        if let Some(reset) = missing.reset {
            deliver.reset(channel, &reset);
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
}

/// What travels on a channel's pub/sub: a stored message or a presence frame.
#[derive(Deserialize)]
struct Wire<'a> {
    k: &'a str,
    e: Option<&'a str>,
    o: Option<Offset>,
    t: Option<u64>,
    v: Option<String>,
    #[serde(borrow)]
    d: Option<&'a RawValue>,
    #[serde(borrow)]
    f: Option<&'a RawValue>,
}

/// Makes sure this node receives `channel`, counting the reference.
///
/// Channels that need a SUBSCRIBE queue up in `wanted`; whoever gets the change lock subscribes
/// everything queued in one command, so a connection storm over many channels costs a few round
/// trips instead of one per channel.
pub(super) async fn subscribe(engine: &RedisEngine, channel: &ChannelName) -> Result<(), EngineError> {
    {
        let mut channels = lock(&engine.live.channels);
        let live = channels.entry(channel.clone()).or_default();
        live.refs += 1;
        if live.subscribed {
            return Ok(());
        }
        lock(&engine.live.wanted).insert(channel.clone());
    }
    let _change = engine.live.changes.lock().await;
    let batch: Vec<ChannelName> = {
        let channels = lock(&engine.live.channels);
        if channels.get(channel).is_some_and(|l| l.subscribed) {
            return Ok(()); // an earlier batch took this channel along
        }
        let mut wanted = lock(&engine.live.wanted);
        wanted.insert(channel.clone());
        wanted.drain().filter(|c| channels.get(c).is_some_and(|l| !l.subscribed)).collect()
    };
    let subscribed = subscribe_batch(engine, &batch).await;
    let mut channels = lock(&engine.live.channels);
    match subscribed {
        Ok(pages) => {
            for (name, page) in batch.iter().zip(pages) {
                if let Some(live) = channels.get_mut(name) {
                    live.subscribed_at(page.position());
                }
            }
            Ok(())
        }
        Err(e) => {
            // The others in the batch find themselves unsubscribed and try again on their own.
            release(&mut channels, channel);
            Err(e)
        }
    }
}

/// One SUBSCRIBE for the whole batch, then each channel's current top, read concurrently: that is
/// where delivery starts on this node, and any session that reads history after `subscribe`
/// returned has everything up to it.
async fn subscribe_batch(engine: &RedisEngine, batch: &[ChannelName]) -> Result<Vec<HistoryPage>, EngineError> {
    if !engine.subscriber.is_connected() {
        engine.metrics.error(Operation::Subscribe.label(), "disconnected");
        return Err(EngineError::Unavailable("redis pub/sub is not connected".into()));
    }
    let names: Vec<String> = batch.iter().map(|c| engine.keys.pubsub(c)).collect();
    engine.timed(Operation::Subscribe, engine.subscriber.subscribe(names)).await?;
    let tops = batch.iter().map(|c| engine.read_history(c, HistoryQuery::Latest { limit: 0 }));
    futures_util::future::join_all(tops).await.into_iter().collect()
}

/// Drops one reference; the last one unsubscribes the node.
pub(super) async fn unsubscribe(engine: &RedisEngine, channel: &ChannelName) {
    let _change = engine.live.changes.lock().await;
    let last = release(&mut lock(&engine.live.channels), channel);
    if last
        && let Err(e) =
            engine.timed(Operation::Subscribe, engine.subscriber.unsubscribe(engine.keys.pubsub(channel))).await
    {
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

/// Starts the task that turns pub/sub traffic into deliveries.
pub(super) fn spawn_dispatcher(engine: &Arc<RedisEngine>) {
    let messages = engine.subscriber.message_rx();
    let reconnects = engine.subscriber.reconnect_rx();
    tokio::spawn(dispatch(Arc::downgrade(engine), messages, reconnects));
}

async fn dispatch(
    engine: Weak<RedisEngine>,
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
                        tracing::warn!(dropped = n, "pub/sub receiver lagged: filling from the streams");
                        catch_up_all(&engine);
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
                tracing::info!("redis subscriber reconnected: resubscribing and catching up");
                // Resubscribe first, then read the streams: nothing can fall in between.
                if let Err(e) = engine.timed(Operation::Subscribe, engine.subscriber.resubscribe_all()).await {
                    tracing::warn!(error = %e, "resubscribe failed; the next reconnect retries");
                }
                catch_up_all(&engine);
            }
        }
    }
}

fn on_message(engine: &Arc<RedisEngine>, message: fred::types::Message) {
    let Some(text) = message.value.as_str() else { return };
    if *message.channel == *engine.keys.control() {
        return super::control::on_request(engine, &text);
    }
    if *message.channel == *engine.keys.control_reply(&engine.settings.node_id) {
        return super::control::on_reply(engine, &text);
    }
    let Some(channel) = engine.keys.channel_of(&message.channel) else { return };
    let wire: Wire = match serde_json::from_str(&text) {
        Ok(w) => w,
        Err(e) => return tracing::warn!(%channel, error = %e, "unreadable pub/sub message"),
    };
    let Some(deliver) = engine.deliver.upgrade() else { return };
    match (wire.k, wire.f, wire.e, wire.o, wire.d) {
        ("p", Some(frame), ..) => deliver.deliver_event(&channel, frame.get().to_owned().into()),
        ("m", _, Some(epoch), Some(offset), Some(data)) => {
            let msg = NewMessage { event: wire.v, data: data.to_owned(), idempotency_key: None };
            let p = Arc::new(Publication::new(channel.clone(), Epoch::new(epoch), offset, msg, wire.t.unwrap_or(0)));
            let gap = {
                let mut channels = lock(&engine.live.channels);
                let Some(live) = channels.get_mut(&channel) else { return };
                live.accept(p, deliver.as_ref())
            };
            if gap {
                tokio::spawn(fill(Arc::downgrade(engine), channel));
            }
        }
        _ => tracing::warn!(%channel, "pub/sub message of unknown shape"),
    }
}

/// Puts every live channel into gap filling from its last delivered offset.
fn catch_up_all(engine: &Arc<RedisEngine>) {
    let mut to_fill = Vec::new();
    for (channel, live) in lock(&engine.live.channels).iter_mut() {
        if live.start_catch_up() {
            to_fill.push(channel.clone());
        }
    }
    for channel in to_fill {
        tokio::spawn(fill(Arc::downgrade(engine), channel));
    }
}

/// Reads what `channel` is missing from the stream and delivers it, then the messages that
/// waited; retries while Redis is away. If the channel's epoch changed (Redis lost it), the
/// subscribers get `reset` and then the new epoch's messages from 1 where the stream still has
/// them, or `reset` to the current top where it does not.
async fn fill(engine: Weak<RedisEngine>, channel: ChannelName) {
    let mut backoff = Duration::from_millis(50);
    // Whether this fill had to send `reset` (its result, for the metrics).
    let mut lost = false;
    loop {
        let Some(engine) = engine.upgrade() else { return };
        let Some(Some(from)) = lock(&engine.live.channels).get(&channel).map(|l| l.position.clone()) else { return };
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
        let mut channels = lock(&engine.live.channels);
        let Some(live) = channels.get_mut(&channel) else { return };
        if let Some(reset) = &missing.reset {
            tracing::warn!(%channel, from = from.offset, epoch = %reset.epoch, offset = reset.offset, "history lost under live subscribers: reset");
            lost = true;
        }
        match live.apply_fill(&channel, missing, deliver.as_ref()) {
            FillStep::NextPage => {}
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
