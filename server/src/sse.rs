//! SSE transport: `GET /sse?channel=a&channel=b` as a `text/event-stream`.
//!
//! Every event's `id:` is a cursor over all of the stream's channels (`cursor.rs`), so the
//! browser's own reconnect, which sends the last id as `Last-Event-ID`, resumes every channel
//! with no gap. `?since=<cursor>` does the same for clients that keep the cursor themselves.
//! Comment lines are the heartbeat.
//!
//! A resume's replay is streamed, not built: the welcome goes out first, then the replayed
//! messages in chunks through the body channel, which waits while the client reads slowly. The
//! replay of one request is bounded by `--max-replay-bytes`; a channel that would go beyond it
//! answers `recovered: false` instead.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::join_all;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::admission::Slot;
use crate::auth::AuthError;
use crate::channel::ChannelName;
use crate::cursor::{self, Cursor};
use crate::engine::{HistoryQuery, Position};
use crate::http::{self, Body, HttpError};
use crate::hub::{Delivery, Out, SessionInfo, Transport};
use crate::node::Node;
use crate::protocol::{Close, CloseCode, ErrorCode, Reply, to_frame};
use crate::session::{Frames, Session, Subscribed, Tally};

/// Events buffered between the session task and hyper; small, so a stalled client backs up
/// into the session's queue, where the slow-consumer rule applies.
const BODY_BUFFER: usize = 4;
/// Most queued items taken per wake-up.
const BATCH: usize = 1024;
/// Replayed bytes gathered before they are handed to the body channel.
const REPLAY_CHUNK: usize = 64 * 1024;

/// Answers `GET /sse`.
pub async fn open<B>(node: Arc<Node>, remote: SocketAddr, req: Request<B>) -> Response<Body> {
    let origin = match http::allowed_origin(node.config(), &req, false) {
        Ok(origin) => origin,
        Err(refused) => {
            node.metrics().refused.with_label_values(&["origin"]).inc();
            return refused.into_response();
        }
    };
    let metrics = node.metrics().clone();
    let response = start(node, remote, &req).await.unwrap_or_else(|(reason, e)| {
        metrics.refused.with_label_values(&[reason]).inc();
        e.into_response()
    });
    http::with_cors(response, origin)
}

/// A refused stream: the `reason` label of the refusal metric and the answer.
type Refused = (&'static str, HttpError);

async fn start<B>(node: Arc<Node>, remote: SocketAddr, req: &Request<B>) -> Result<Response<Body>, Refused> {
    let channels = channels(&node, req).map_err(|e| ("bad_request", e))?;
    let token = http::query(req, "token").or_else(|| http::bearer(req).map(str::to_owned));
    let refused = |e: AuthError| {
        let reason = if matches!(e, AuthError::Banned { .. }) { "banned" } else { "auth" };
        let error = e.command_error();
        (reason, HttpError::new(auth_status(&e), error.code, error.message))
    };
    let identity = node.authenticate(token.as_deref(), http::query(req, "user").as_deref()).map_err(refused)?;
    node.check_ban(&identity.user).await.map_err(refused)?;
    let slot = node.reserve_connection(&identity.user, remote.ip()).map_err(|r| (r.reason(), HttpError::from(r)))?;
    let last_id = req.headers().get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let cursor = Cursor::parse(last_id.or_else(|| http::query(req, "since")).as_deref(), channels.len());
    let since = resolve(&node, &channels, cursor).await.map_err(|e| ("unavailable", e))?;
    let mut session = Session::open(node.clone(), identity, Transport::Sse, Some(remote), None);
    let mut stream = SseStream {
        cursor: Vec::new(),
        digest: 0,
        channels,
        out: Vec::new(),
        tally: Tally::default(),
        replays: Vec::new(),
    };
    if let Err(e) = stream.subscribe_all(&mut session, since).await {
        let reason = match e.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "auth",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "bad_request",
        };
        return Err((reason, e));
    }
    session.started();
    let (tx, rx) = mpsc::channel(BODY_BUFFER);
    session.sent(std::mem::take(&mut stream.tally));
    let first = Bytes::from(std::mem::take(&mut stream.out));
    tx.try_send(first).expect("a new channel has room");
    node.spawn(stream.run(session, tx, slot));
    let mut response = Response::new(SseBody { rx }.boxed());
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

fn auth_status(e: &AuthError) -> StatusCode {
    // `command_error` says whether the token was bad or expired; both are 401.
    match e {
        AuthError::Missing | AuthError::Invalid(_) | AuthError::Expired => StatusCode::UNAUTHORIZED,
        AuthError::Forbidden { .. } | AuthError::Banned { .. } => StatusCode::FORBIDDEN,
    }
}

/// The `channel` parameters, checked: at least one, within the limit, valid, no repeats.
fn channels<B>(node: &Node, req: &Request<B>) -> Result<Vec<ChannelName>, HttpError> {
    let bad = |code, msg: String| HttpError::new(StatusCode::BAD_REQUEST, code, msg);
    let names = http::query_all(req, "channel");
    if names.is_empty() {
        return Err(bad(ErrorCode::BadRequest, "name at least one channel: /sse?channel=a&channel=b".into()));
    }
    if names.len() > node.config().max_channels {
        return Err(bad(
            ErrorCode::TooManyChannels,
            format!("at most {} channels per connection", node.config().max_channels),
        ));
    }
    let mut out: Vec<ChannelName> = Vec::with_capacity(names.len());
    for name in &names {
        let channel = ChannelName::parse(name).map_err(|e| bad(ErrorCode::BadChannel, format!("{name:?}: {e}")))?;
        if out.contains(&channel) {
            return Err(bad(ErrorCode::BadRequest, format!("channel {channel} is named twice")));
        }
        out.push(channel);
    }
    Ok(out)
}

/// Turns a cursor into each channel's position to resume from. A digest is checked against the
/// channels' current epochs, read from the engine: only if they all still are what the cursor
/// was written under are its offsets positions in them.
async fn resolve(node: &Node, channels: &[ChannelName], cursor: Cursor) -> Result<Vec<Option<Position>>, HttpError> {
    let n = channels.len();
    Ok(match cursor {
        Cursor::Fresh => vec![None; n],
        Cursor::Positions(list) => list,
        Cursor::Unusable => vec![Some(cursor::unusable()); n],
        Cursor::Digest { digest, offsets } => {
            let reads = channels.iter().map(|c| node.engine().history(c, HistoryQuery::Latest { limit: 0 }));
            let pages = join_all(reads).await.into_iter().collect::<Result<Vec<_>, _>>().map_err(|e| {
                HttpError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, format!("{e}: retry shortly"))
            })?;
            if cursor::digest(pages.iter().map(|p| &p.epoch)) == digest {
                pages.into_iter().zip(offsets).map(|(p, offset)| Some(Position { epoch: p.epoch, offset })).collect()
            } else {
                vec![Some(cursor::unusable()); n]
            }
        }
    })
}

/// The event name of a server frame: its `type`.
fn event_name(frame: &str) -> &str {
    frame.strip_prefix(r#"{"type":""#).and_then(|rest| rest.split('"').next()).unwrap_or("message")
}

#[derive(Serialize)]
struct SseWelcome<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    conn: &'a str,
    node: &'a str,
    user: &'a str,
    /// Seconds between the `: ping` comments, so a client that reads the stream itself knows
    /// how long a silent stream may be alive.
    ping_interval: u64,
    channels: &'a [Reply],
}

/// One SSE stream's state: its channels, their positions, and the bytes to send next.
struct SseStream {
    channels: Vec<ChannelName>,
    cursor: Vec<Position>,
    /// `cursor::digest` of the epochs in `cursor`, kept as they change.
    digest: u64,
    out: Vec<u8>,
    /// Events in `out` not yet counted by `Session::sent`.
    tally: Tally,
    /// The replay still to stream after the welcome: (channel index, messages).
    replays: Vec<(usize, Vec<Delivery>)>,
}

impl SseStream {
    /// Subscribes every channel (replaying from `since`, all of them within one replay budget)
    /// and writes the welcome; the replays wait in `replays` for `stream_replays`.
    async fn subscribe_all(&mut self, session: &mut Session, since: Vec<Option<Position>>) -> Result<(), HttpError> {
        let mut replies = Vec::with_capacity(self.channels.len());
        let mut budget = session.node().config().max_replay_bytes;
        for (i, (channel, since)) in self.channels.iter().zip(since).enumerate() {
            let Subscribed { reply, replay } = session.subscribe(channel.as_str(), since.clone(), &mut budget).await?;
            let current = Position {
                epoch: reply.epoch.clone().expect("subscribe replies carry a position"),
                offset: reply.offset.unwrap_or(0),
            };
            self.cursor.push(match (reply.recovered, since) {
                (Some(true), Some(since)) => since,
                _ => current,
            });
            replies.push(reply);
            if !replay.is_empty() {
                self.replays.push((i, replay));
            }
        }
        self.digest = cursor::digest(self.cursor.iter().map(|p| &p.epoch));
        self.out.extend_from_slice(b"retry: 1000\n\n");
        let node = session.node().config().node_id.clone();
        let welcome = to_frame(&SseWelcome {
            kind: "welcome",
            conn: session.conn(),
            node: &node,
            user: &session.identity.user,
            ping_interval: session.node().config().ping_interval.as_secs(),
            channels: &replies,
        });
        self.event(&welcome);
        Ok(())
    }

    /// Writes the replays after the welcome, a chunk at a time: each chunk waits for the body
    /// channel to take it, so a client that reads slowly holds at most a few chunks here.
    async fn stream_replays(
        &mut self,
        session: &Session,
        tx: &mpsc::Sender<Bytes>,
        info: &SessionInfo,
    ) -> Result<(), Option<Close>> {
        for (i, replay) in std::mem::take(&mut self.replays) {
            for p in replay {
                self.cursor[i].offset = p.publication.offset;
                self.tally.messages += 1;
                self.event(&p.frame);
                if self.out.len() >= REPLAY_CHUNK {
                    self.send(session, tx, info).await?;
                }
            }
        }
        self.send(session, tx, info).await
    }

    /// Appends one event, named for the frame's `type`, with the current cursor as its id.
    fn event(&mut self, frame: &str) {
        self.named_event(event_name(frame), frame);
    }

    /// Appends one event. Frames are compact JSON (no newlines), so one `data:` line carries it.
    fn named_event(&mut self, name: &str, frame: &str) {
        self.tally.frames += 1;
        self.out.extend_from_slice(b"id: ");
        cursor::write(&mut self.out, self.digest, &self.cursor);
        self.out.extend_from_slice(b"\nevent: ");
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\ndata: ");
        self.out.extend_from_slice(frame.as_bytes());
        self.out.extend_from_slice(b"\n\n");
    }

    fn sync_cursor(&mut self, session: &Session) {
        let mut epochs_changed = false;
        for (slot, channel) in self.cursor.iter_mut().zip(&self.channels) {
            if let Some(p) = session.position(channel) {
                epochs_changed |= p.epoch != slot.epoch;
                *slot = p;
            }
        }
        if epochs_changed {
            self.digest = cursor::digest(self.cursor.iter().map(|p| &p.epoch));
        }
    }

    /// Streams queued messages until the client leaves or the session is closed.
    async fn run(mut self, mut session: Session, tx: mpsc::Sender<Bytes>, _slot: Slot) {
        let info = session.info_arc();
        let ping_every = session.node().config().ping_interval;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let (mut batch, mut frames) = (Vec::new(), Frames::default());
        let expiry = session.identity.expired();
        tokio::pin!(expiry);
        let replayed = self.stream_replays(&session, &tx, &info).await;
        let close = loop {
            if let Err(close) = &replayed {
                break close.clone();
            }
            tokio::select! {
                close = info.closed() => break Some(close),
                _ = &mut expiry => break Some(Close::new(CloseCode::TokenExpired, "token expired: get a new token")),
                _ = tx.closed() => break None,
                _ = heartbeat.tick() => self.out.extend_from_slice(b": ping\n\n"),
                n = session.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break None;
                    }
                    if let Err(close) = self.encode(&mut session, &mut batch, &mut frames) {
                        break Some(close);
                    }
                }
            }
            if let Err(close) = self.send(&session, &tx, &info).await {
                break close;
            }
        };
        session.ended(close.as_ref());
        if let Some(close) = close {
            self.close_event(&close);
            if tx.try_send(Bytes::from(std::mem::take(&mut self.out))).is_ok() {
                session.sent(self.tally);
            }
        }
    }

    /// Turns queued items into events, each with the cursor as it stands after it.
    fn encode(&mut self, session: &mut Session, batch: &mut Vec<Out>, frames: &mut Frames) -> Result<(), Close> {
        session.observe_latency(batch);
        for out in batch.drain(..) {
            session.accept(out, frames)?;
            self.sync_cursor(session);
            let (list, tally) = frames.take();
            for frame in list {
                self.event(&frame);
            }
            self.tally.messages += tally.messages;
        }
        Ok(())
    }

    /// Hands the pending bytes to hyper, unless the session is closed first.
    async fn send(
        &mut self,
        session: &Session,
        tx: &mpsc::Sender<Bytes>,
        info: &SessionInfo,
    ) -> Result<(), Option<Close>> {
        if self.out.is_empty() {
            return Ok(());
        }
        let bytes = Bytes::from(std::mem::take(&mut self.out));
        tokio::select! {
            sent = tx.send(bytes) => sent.map_err(|_| None)?,
            close = info.closed() => return Err(Some(close)),
        }
        session.sent(std::mem::take(&mut self.tally));
        Ok(())
    }

    /// A last `close` event, so the client knows whether to reconnect (same codes as WebSocket).
    fn close_event(&mut self, close: &Close) {
        #[derive(Serialize)]
        struct CloseFrame<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            code: u16,
            reason: &'a str,
        }
        let frame = to_frame(&CloseFrame { kind: "close", code: close.code as u16, reason: &close.reason });
        self.named_event("close", &frame);
    }
}

/// The streaming response body: whatever the session task sends, as it comes.
struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_come_from_the_frame_type() {
        assert_eq!(event_name(r#"{"type":"message","channel":"a"}"#), "message");
        assert_eq!(event_name(r#"{"type":"reset"}"#), "reset");
        assert_eq!(event_name("{}"), "message");
    }
}
