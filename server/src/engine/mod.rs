//! The engine: the one seam between "this node" and "the cluster".
//!
//! An engine stores each channel's history, hands out positions (epoch, offset), fans published
//! messages out to every node's hub, and keeps presence (the data plane, `DataPlane`); it also
//! carries the cluster's housekeeping: the node registry, bans, surveys (`ClusterPlane`). It never sees sessions or sockets: it
//! calls back into a [`Deliver`] (the hub) with shared publications; what a client receives
//! (frames, their encoding) is built above it, once per message, by the hub and `protocol`.
//! `memory` is the single-node, in-process engine; other engines keep the same semantics.

pub mod memory;
pub mod redis;

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::channel::ChannelName;

pub use memory::MemoryEngine;
/// The engine's answers that the admin API passes on as they are: one definition, shared with
/// `pushctl` (`pushd-wire`).
pub use pushd_wire::{ClientInfo, HistoryBounds, NodeInfo, RedisStats};
pub use redis::{RedisEngine, RedisSettings};

/// Position of a message within its channel: contiguous, starting at 1 in each epoch.
pub type Offset = u64;

/// Identifies one incarnation of a channel's history; a new epoch means old offsets are void.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// A fresh random epoch (16 hex digits).
    pub fn random() -> Self {
        Self(format!("{:016x}", rand::random::<u64>()).into())
    }

    pub fn new(s: &str) -> Self {
        Self(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A client's place in a channel: the last offset it has seen within `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: Offset,
}

/// A message as a publisher hands it in: optional event name and raw JSON data.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub event: Option<String>,
    pub data: Box<RawValue>,
    /// A retried publish with the same key returns the first result instead of storing twice.
    pub idempotency_key: Option<String>,
}

/// Checks an idempotency key: 1-128 letters, digits, `_`, `.`, `:` or `-` (it becomes part of a
/// Redis key, so nothing that could break out of it).
pub fn check_idempotency_key(key: &str) -> Result<(), &'static str> {
    let ok = (1..=128).contains(&key.len()) && key.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
    ok.then_some(()).ok_or("idempotency_key must be 1-128 letters, digits, '_', '.', ':' or '-'")
}

/// Deepest nesting of `data` accepted: what serde_json, and so many clients, will parse.
pub const MAX_DATA_DEPTH: usize = 128;

/// Why a publisher's `data` was refused.
#[derive(Debug, thiserror::Error)]
#[error("data is nested deeper than {MAX_DATA_DEPTH} levels")]
pub struct DataTooDeep;

impl NewMessage {
    /// Takes `data` as the publisher sent it, compacted if it spans lines: every frame is one
    /// line of JSON, which SSE's `data:` framing relies on. Refuses data nested deeper than
    /// `MAX_DATA_DEPTH`, which subscribers' parsers would choke on. An empty event name is no
    /// event: a stream entry cannot tell the two apart, so live delivery must not either.
    pub fn new(event: Option<String>, data: Box<RawValue>) -> Result<Self, DataTooDeep> {
        let event = event.filter(|e| !e.is_empty());
        let data = match compact(data.get())? {
            Some(compacted) => RawValue::from_string(compacted).map_err(|_| DataTooDeep)?,
            None => data,
        };
        Ok(Self { event, data, idempotency_key: None })
    }
}

/// Checks the nesting depth of valid JSON `text` and, if it has line breaks, returns it with the
/// whitespace between tokens removed (inside strings a line break can only be escaped). One pass
/// over the bytes, no recursion: depth costs nothing but a counter.
fn compact(text: &str) -> Result<Option<String>, DataTooDeep> {
    let multiline = text.contains(['\n', '\r']);
    let mut out = Vec::with_capacity(if multiline { text.len() } else { 0 });
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            (in_string, escaped) = (escaped || b != b'"', !escaped && b == b'\\');
        } else {
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_DATA_DEPTH {
                        return Err(DataTooDeep);
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b' ' | b'\t' | b'\n' | b'\r' => continue,
                _ => {}
            }
        }
        if multiline {
            out.push(b);
        }
    }
    // Only ASCII whitespace was dropped, so the bytes are still UTF-8.
    Ok(multiline.then(|| String::from_utf8(out).unwrap_or_default()))
}

/// A stored message and its position.
#[derive(Debug)]
pub struct Publication {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub offset: Offset,
    pub event: Option<String>,
    pub data: Box<RawValue>,
    /// Microseconds since the Unix epoch when the message was stored.
    pub time_us: u64,
}

impl Publication {
    pub fn new(channel: ChannelName, epoch: Epoch, offset: Offset, msg: NewMessage, time_us: u64) -> Self {
        Self { channel, epoch, offset, event: msg.event, data: msg.data, time_us }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Microseconds since the Unix epoch, for publication timestamps and latency.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// What a history read returns: the channel's current position and the stored messages asked for.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub epoch: Epoch,
    /// The channel's last offset.
    pub top: Offset,
    /// Messages in offset order; may start later than asked if history was trimmed or expired.
    pub publications: Vec<Arc<Publication>>,
}

impl HistoryPage {
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch.clone(), offset: self.top }
    }
}

/// Which part of history to read.
#[derive(Debug, Clone, Copy)]
pub enum HistoryQuery {
    /// Messages with offset > `after`, oldest first, at most `limit`.
    After { after: Offset, limit: usize },
    /// The newest `limit` messages, oldest first.
    Latest { limit: usize },
}

impl HistoryQuery {
    /// Most messages one history read returns.
    pub const MAX_LIMIT: usize = 1000;
    /// Messages a read without a limit returns.
    pub const DEFAULT_LIMIT: usize = 100;

    /// A read as clients ask for it: `limit` defaults to 100 and is held to 1..=1000; with
    /// `since`, the messages after that offset, else the newest.
    pub fn new(limit: Option<u64>, since: Option<Offset>) -> Self {
        let limit = limit.map_or(Self::DEFAULT_LIMIT, |l| l.min(Self::MAX_LIMIT as u64) as usize).max(1);
        match since {
            Some(after) => HistoryQuery::After { after, limit },
            None => HistoryQuery::Latest { limit },
        }
    }
}

/// A join or leave of a channel subscriber, fanned out where join/leave events are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceChange {
    Join,
    Leave,
}

/// The engine's failures, typed by what they mean for a write, so callers map them to wire codes
/// (`unavailable` 503, `outcome_unknown` 504) without reading their text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// Nothing was sent: no connection to the store. A publish was NOT stored; retrying is safe.
    #[error("history store unavailable: {0}")]
    Unavailable(String),
    /// The command went out but no answer came back in time, or the connection broke under it:
    /// the store may still have run it. Only a retry with the same idempotency key is safe.
    #[error("history store did not answer: {0}")]
    Timeout(String),
    /// The store answered with an error (a script or the server refused the command: out of
    /// memory, read-only replica, no permission): it did not run. Not stored; retrying is safe
    /// once the cause is gone.
    #[error("history store refused the command: {0}")]
    Refused(String),
    /// The store's answer could not be read: it may have run, as with `Timeout`.
    #[error("history store answered something unreadable: {0}")]
    Protocol(String),
}

impl EngineError {
    /// Whether the store may have run the command (a publish may be stored): `Timeout` and
    /// `Protocol`. For `Unavailable` and `Refused` it certainly did not.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, EngineError::Timeout(_) | EngineError::Protocol(_))
    }
}

/// Answers control requests from the cluster (`survey`) on this node: implemented by the node.
pub trait SurveyHandler: Send + Sync + 'static {
    /// Answers one request (JSON in, JSON out).
    fn answer(&self, request: &str) -> String;
}

/// What a survey collected: each answering node's reply, and the registered nodes that did not
/// answer in time.
#[derive(Debug, Default)]
pub struct Survey {
    pub answers: Vec<(String, String)>,
    pub missing: Vec<String>,
}

/// Where an engine hands live traffic on this node: implemented by the hub.
pub trait Deliver: Send + Sync + 'static {
    /// A stored message for this node's subscribers of its channel, in offset order per channel.
    fn deliver(&self, publication: Arc<Publication>);
    /// A join or leave for this node's subscribers of `channel`; transient, not stored.
    fn deliver_presence(&self, channel: &ChannelName, change: PresenceChange, client: &ClientInfo);
    /// `channel`'s history was lost under live subscribers: live delivery goes on after
    /// `position` (a new epoch), and the subscribers must resync from their own store.
    fn reset(&self, channel: &ChannelName, position: &Position);
}

/// The data plane: what sessions and the server API need to move messages and positions.
/// Every method is safe to call concurrently.
#[async_trait]
pub trait DataPlane: Send + Sync + 'static {
    /// Stores `msg` in `channel`'s history and fans it out in one step; returns its position.
    /// Offsets are contiguous within an epoch. `Err` means it was NOT stored: answer 503.
    async fn publish(&self, channel: &ChannelName, msg: NewMessage) -> Result<Arc<Publication>, EngineError>;

    /// Makes sure this node receives `channel`'s live messages from now on; counted, so every
    /// `subscribe` is matched by one `unsubscribe`. Returns once live delivery is in place, with
    /// the position this node's delivery has reached when the engine knows it without asking
    /// the store: every message after it reaches a subscriber already in the hub, so a session
    /// subscribing without a position may start there instead of reading the store's top.
    async fn subscribe(&self, channel: &ChannelName) -> Result<Option<Position>, EngineError>;

    /// Drops one reference taken by `subscribe`.
    async fn unsubscribe(&self, channel: &ChannelName);

    /// Reads history and the current position; creates the channel's epoch if it has none, so
    /// a position handed to a client stays valid until the history is really lost.
    async fn history(&self, channel: &ChannelName, query: HistoryQuery) -> Result<HistoryPage, EngineError>;

    /// Records `client` as present in `channel`; announces it if `announce`.
    async fn join(&self, channel: &ChannelName, client: &ClientInfo, announce: bool) -> Result<(), EngineError>;

    /// Removes `client` from `channel`'s presence; announces it if `announce`.
    async fn leave(&self, channel: &ChannelName, client: &ClientInfo, announce: bool);

    /// Everyone present in `channel`, cluster-wide.
    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, EngineError>;

    /// Length and bounds of `channel`'s stored history.
    async fn history_bounds(&self, channel: &ChannelName) -> Result<HistoryBounds, EngineError>;
}

/// The cluster plane: what operators and the node's own housekeeping need (the registry, bans,
/// surveys, the shared store's stats). Nothing here is on a message's path.
#[async_trait]
pub trait ClusterPlane: Send + Sync + 'static {
    /// Publishes this node's info to the registry; it lapses unless refreshed within the TTL.
    async fn heartbeat(&self, info: &NodeInfo) -> Result<(), EngineError>;

    /// Every node whose heartbeat has not lapsed.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError>;

    /// Takes this node out of the registry at once (clean shutdown).
    async fn deregister(&self, _node: &str) {}

    /// Lets control requests from other nodes reach this node's handler.
    fn set_survey_handler(&self, handler: Weak<dyn SurveyHandler>);

    /// Asks every registered node (this one included) to answer `request`; waits at most
    /// `timeout`, and names the nodes that did not answer.
    async fn survey(&self, request: &str, timeout: Duration) -> Result<Survey, EngineError>;

    /// Refuses `user` on every node until `until_ms` (Unix ms).
    async fn ban(&self, user: &str, until_ms: u64) -> Result<(), EngineError>;

    /// Lifts `user`'s ban on every node; true if there was one.
    async fn unban(&self, user: &str) -> Result<bool, EngineError>;

    /// When `user`'s ban ends, if banned now.
    async fn banned_until(&self, user: &str) -> Result<Option<u64>, EngineError>;

    /// The shared store's own stats (Redis INFO and pub/sub); `None` without one.
    async fn backend_stats(&self) -> Result<Option<RedisStats>, EngineError> {
        Ok(None)
    }
}

/// The cluster as one node sees it: both planes, and the engine's own life.
#[async_trait]
pub trait Engine: DataPlane + ClusterPlane {
    /// Whether the engine can take traffic now (for /readyz).
    fn ready(&self) -> bool;

    /// Releases connections at shutdown.
    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_data_is_compacted() {
        let data = RawValue::from_string("{\n \"a\": \"x\\ny \\\" }\"\r\n, \"b\" : [1, 2]}".into()).unwrap();
        assert_eq!(NewMessage::new(None, data).unwrap().data.get(), r#"{"a":"x\ny \" }","b":[1,2]}"#);
        let one_line = RawValue::from_string(r#"{ "a" : 1 }"#.into()).unwrap();
        assert_eq!(NewMessage::new(None, one_line).unwrap().data.get(), r#"{ "a" : 1 }"#, "kept as sent");
    }

    #[test]
    fn data_nested_deeper_than_parsers_allow_is_refused() {
        let nested = |depth: usize| RawValue::from_string(format!("{}1{}", "[".repeat(depth), "]".repeat(depth)));
        assert!(NewMessage::new(None, nested(MAX_DATA_DEPTH).unwrap()).is_ok());
        assert!(NewMessage::new(None, nested(MAX_DATA_DEPTH + 1).unwrap()).is_err());
        let brackets_in_strings = RawValue::from_string(format!("[\"{}\"]", "[".repeat(500))).unwrap();
        assert!(NewMessage::new(None, brackets_in_strings).is_ok());
    }
}
