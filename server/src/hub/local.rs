//! One channel's local subscribers, and what waits to be fanned out to them.
//!
//! A message delivered to the node is held by its channel until it is fanned out: at the start
//! of the flusher's next round, or at once while a round is being written (`flusher.rs`). A
//! fan-out goes subscriber by subscriber through all the channel holds: a socket's state is
//! fetched from memory once for them all. Under load, when ten messages gather while the flusher
//! rests, that is one cache miss per socket where there were ten: the fan-out's part of the
//! node's CPU was the biggest in user space (`perf`: 75 % of it the first touch of the socket's
//! lock).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use prometheus::IntCounter;

use super::handle::{ConnId, Delivery, Express, Out, SessionHandle};
use crate::channel::ChannelName;
use crate::engine::{Epoch, Offset, Position};
use crate::locks::{lock, read};
use crate::protocol::{Close, CloseCode};

/// One channel's local subscribers, its held messages and its message rate.
pub(super) struct LocalChannel {
    pub subs: RwLock<HashMap<ConnId, Subscriber>>,
    /// Delivered to this node and not yet fanned out, in the engine's order.
    held: Mutex<Holding>,
    /// Held while a fan-out runs.
    fanning: Mutex<()>,
    /// Publications delivered to this node for the channel.
    pub messages: AtomicU64,
    /// (messages at the last rate sample, messages per second since then).
    pub rate: Mutex<(u64, f64)>,
    /// Frames a socket may have waiting before its session counts as a slow consumer.
    send_queue: usize,
    /// Messages delivered over express lanes (all WebSocket), counted once per message.
    express_delivered: IntCounter,
}

/// What a channel holds, and how many items it held before them.
#[derive(Default)]
struct Holding {
    items: Vec<Held>,
    /// Items fanned out so far: the sequence number of `items[0]`.
    taken: u64,
}

/// What a channel holds for its next fan-out.
pub(super) enum Held {
    Message(Arc<Delivery>),
    /// History lost: what follows comes in a new epoch (the channel's name, the position).
    Reset(Box<(ChannelName, Position)>),
}

/// One session subscribed to one channel.
pub(super) struct Subscriber {
    pub handle: SessionHandle,
    /// `Some` while the channel rides the session's express lane: the epoch and the offset of
    /// the last message queued on the socket. Every push to the session's queue for this
    /// channel happens under this lock, which `Hub::go_express` relies on.
    pub express: Mutex<Option<(Epoch, Offset)>>,
    /// The sequence number of the first held item this subscriber gets: what the channel held
    /// before it subscribed was delivered before it subscribed, and is not its to receive (its
    /// subscribe reply's position covers it; a reset held then would take it back to an epoch
    /// it never saw).
    pub since: u64,
}

/// What became of one message offered to one session.
enum Offered {
    /// Queued on the socket by the express lane (or already there: a duplicate).
    Express,
    /// Sent through the session's queue.
    Queued,
}

impl LocalChannel {
    pub fn new(send_queue: usize, express_delivered: IntCounter) -> Self {
        Self {
            subs: RwLock::default(),
            held: Mutex::default(),
            fanning: Mutex::default(),
            messages: AtomicU64::new(0),
            rate: Mutex::default(),
            send_queue,
            express_delivered,
        }
    }

    /// Holds `item` for the next fan-out, behind what the channel holds already; true if it
    /// held nothing before (the caller then hands the channel to the flusher).
    pub fn hold(&self, item: Held) -> bool {
        let mut held = lock(&self.held);
        held.items.push(item);
        held.items.len() == 1
    }

    /// The sequence number the next held item gets: a subscriber added now gets that one on.
    pub fn next_held(&self) -> u64 {
        let held = lock(&self.held);
        held.taken + held.items.len() as u64
    }

    /// Queues everything held on every subscriber, in order; the sockets that got their first
    /// frame since their last write join `lanes`. Two fan-outs of one channel (the flusher's
    /// and a delivery's during a round) run one after the other, so every subscriber gets the
    /// held items in the order they came.
    pub fn fan_out(&self, lanes: &mut Vec<Express>) {
        let _one_at_a_time = lock(&self.fanning);
        let (held, first) = {
            let mut holding = lock(&self.held);
            let first = holding.taken;
            holding.taken += holding.items.len() as u64;
            (std::mem::take(&mut holding.items), first)
        };
        if held.is_empty() {
            return;
        }
        let mut express = 0;
        for sub in read(&self.subs).values() {
            let skip = sub.since.saturating_sub(first) as usize;
            for item in held.iter().skip(skip) {
                match item {
                    Held::Message(delivery) => {
                        if let Offered::Express = self.offer(sub, delivery, lanes) {
                            express += 1;
                        }
                    }
                    Held::Reset(reset) => sub.reset(reset),
                }
            }
        }
        self.express_delivered.inc_by(express);
    }

    /// Queues one item for every local subscriber now, without waiting on any of them.
    pub fn push_all(&self, out: impl Fn() -> Out) {
        for sub in read(&self.subs).values() {
            sub.handle.push(out());
        }
    }

    /// Hands `delivery` to `sub`'s socket directly when the channel rides its express lane and
    /// this is the next message; otherwise through its queue, taking the channel off the lane
    /// (a new epoch, a gap) so that the session decides what to send.
    fn offer(&self, sub: &Subscriber, delivery: &Arc<Delivery>, lanes: &mut Vec<Express>) -> Offered {
        let handle = &sub.handle;
        let p = &delivery.publication;
        let mut lane = lock(&sub.express);
        if let (Some((epoch, last)), Some(express)) = (lane.as_mut(), &handle.express) {
            if *epoch == p.epoch && p.offset <= *last + 1 {
                if p.offset == *last + 1 {
                    *last = p.offset;
                    let queued = express.queue(delivery);
                    if queued.waiting > self.send_queue {
                        handle.close(Close::new(CloseCode::SlowConsumer, "send queue full: reconnect and replay"));
                    }
                    if queued.first {
                        lanes.push(express.clone());
                    }
                }
                return Offered::Express;
            }
            *lane = None;
        }
        // Pushed under the lane's lock: see `Hub::go_express`.
        handle.push(Out::Message(delivery.clone()));
        Offered::Queued
    }
}

impl Subscriber {
    /// Takes the channel off the express lane, under its lock, and queues the reset: what
    /// follows it goes through the session, after it.
    fn reset(&self, reset: &(ChannelName, Position)) {
        let mut lane = lock(&self.express);
        *lane = None;
        self.handle.push(Out::Reset(Box::new(reset.clone())));
    }
}
