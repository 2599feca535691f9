//! What the hub holds of a session: its id, the facts operators see, the sending side of its
//! queue, its close signal and, for a WebSocket, its express lane. The session itself
//! (`session.rs`) owns the receiving side and everything else; it builds these and hands them
//! to the hub, so the hub never needs to know what a session is.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::sync::Notify;

use super::queue::Queue;
use crate::channel::ChannelName;
use crate::engine::{Position, Publication};
use crate::locks::lock;
use crate::protocol::{Close, CloseCode, message_frame};

/// A connection's id, unique in the cluster: `<node>.<sequence>`.
pub type ConnId = Arc<str>;

/// Which transport a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Ws,
    Sse,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// A stored message as this node's subscribers receive it: the publication, and its frame,
/// serialised once for all of them.
#[derive(Debug)]
pub struct Delivery {
    pub publication: Arc<Publication>,
    pub frame: Utf8Bytes,
    /// The frame as an outlet writes it to a socket, made once by the first outlet that
    /// needs it and shared by the rest (the hub does not know transports' encodings).
    pub encoded: OnceLock<Bytes>,
}

impl Delivery {
    pub fn new(publication: Arc<Publication>) -> Self {
        let frame = message_frame(&publication);
        Self { publication, frame, encoded: OnceLock::new() }
    }
}

/// What the hub queues for a session. Kept to two words (rare variants boxed): every session's
/// queue preallocates a block of these.
#[derive(Debug)]
pub enum Out {
    /// A stored message of a channel the session subscribes to.
    Message(Arc<Delivery>),
    /// A transient frame (join/leave) for a channel.
    Event(Box<(ChannelName, Utf8Bytes)>),
    /// History lost: live delivery continues after `Position` in a new epoch.
    Reset(Box<(ChannelName, Position)>),
}

/// A socket the fan-out may hand message frames to itself (a WebSocket's): queued in order
/// behind whatever the session wrote, and written by the hub's flusher.
pub trait Outlet: Send + Sync + 'static {
    /// Queues one message. The outlet keeps, under the same lock as its queue, whether it is
    /// in the flusher's list already (the fan-out and the flusher touch thousands of sockets a
    /// round: every other word of a socket they touch is one more cache miss per delivery).
    fn queue(&self, delivery: &Delivery) -> Queued;
    /// Writes what waits, and takes the outlet off the flusher's list: frames queued from
    /// now on put it back. `Ok(false)` when the socket could not take it all (the session's
    /// task then waits until it can).
    fn flush(&self) -> std::io::Result<bool>;
    /// Messages queued so far, counted under the outlet's own lock: the fan-out touches no
    /// counter of the session per delivery.
    fn messages(&self) -> u64;
    /// Wakes the session's task: the socket is full and must be waited for.
    fn blocked(&self) -> &Notify;
}

/// What `Outlet::queue` did.
pub struct Queued {
    /// Frames now waiting unwritten.
    pub waiting: usize,
    /// The outlet was not in the flusher's list: the caller hands it over.
    pub first: bool,
}

/// A session's express lane, the per-session part: the fan-out queues the next message of a
/// caught-up channel straight onto the session's socket (an `Outlet`), without a trip through
/// its queue and task. Which channels ride it, and at what offset, is kept in the hub's
/// subscriber entries (no lookup per delivery).
pub type Express = Arc<dyn Outlet>;

/// The part of a session the hub holds: enough to queue frames and to close it.
#[derive(Clone)]
pub struct SessionHandle {
    pub conn: ConnId,
    pub info: Arc<SessionInfo>,
    queue: Arc<Queue>,
    /// `Some` for sessions whose transport is an `Outlet` (WebSocket).
    pub express: Option<Express>,
}

/// Facts about a session for operators, plus its close signal.
pub struct SessionInfo {
    pub user: Arc<str>,
    pub transport: Transport,
    pub remote: Option<SocketAddr>,
    pub connected_at: SystemTime,
    pub messages_out: AtomicU64,
    close: Mutex<Option<Close>>,
    closed: Notify,
}

impl SessionHandle {
    /// A handle for a new session, and the receiving side of its queue of `capacity` items.
    pub fn new(conn: ConnId, info: SessionInfo, capacity: usize, outlet: Option<Express>) -> (Self, Arc<Queue>) {
        let queue = Arc::new(Queue::new(capacity));
        (Self { conn, info: Arc::new(info), queue: queue.clone(), express: outlet }, queue)
    }

    /// Queues `out` without waiting. A full queue closes the session as a slow consumer.
    pub fn push(&self, out: Out) -> bool {
        if self.queue.push(out).is_ok() {
            return true;
        }
        self.close(Close::new(CloseCode::SlowConsumer, "send queue full: reconnect and replay"));
        false
    }

    /// Asks the session to close with `close`; the first request wins. True if this call was
    /// the one that closed it.
    pub fn close(&self, close: Close) -> bool {
        let mut slot = lock(&self.info.close);
        if slot.is_some() {
            return false;
        }
        *slot = Some(close);
        self.info.closed.notify_one();
        true
    }

    /// Messages waiting in the send queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Messages sent: by the session's task, and queued on its socket by the express lane.
    pub fn messages_out(&self) -> u64 {
        let express = self.express.as_ref().map_or(0, |e| e.messages());
        self.info.messages_out.load(std::sync::atomic::Ordering::Relaxed) + express
    }
}

impl SessionInfo {
    pub fn new(user: Arc<str>, transport: Transport, remote: Option<SocketAddr>) -> Self {
        let (connected_at, messages_out) = (SystemTime::now(), AtomicU64::new(0));
        Self { user, transport, remote, connected_at, messages_out, close: Mutex::new(None), closed: Notify::new() }
    }

    /// Resolves when someone asked this session to close, with the reason.
    pub async fn closed(&self) -> Close {
        loop {
            if let Some(close) = lock(&self.close).clone() {
                return close;
            }
            self.closed.notified().await;
        }
    }
}
