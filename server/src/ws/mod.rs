//! WebSocket transport: frames <-> protocol types, nothing else. It never reads history or
//! subscribes anything itself: commands go to its `Session`, which does.
//!
//! One task per connection reads commands, drains the session's send queue and writes every
//! queued frame in one `writev` (`wire.rs`: the socket is taken back out of hyper after the
//! upgrade; tungstenite reads the client's frames, server frames are written as a header and the
//! message's shared bytes). Writes race the close signal, so a peer that stopped reading cannot
//! pin the task: the hub's 4010 still gets through.

mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_tungstenite::WebSocketStream;
use hyper_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use hyper_tungstenite::tungstenite::handshake::derive_accept_key;
use hyper_tungstenite::tungstenite::protocol::frame::CloseFrame;
use hyper_tungstenite::tungstenite::protocol::{Role, WebSocketConfig, frame::coding::CloseCode as WsCloseCode};
use hyper_tungstenite::tungstenite::{Error as WsError, Message};
use hyper_util::rt::TokioIo;
use tracing::Instrument;
use wire::{Wire, WireIo};

use crate::admission::Slot;
use crate::auth::{AuthError, Identity};
use crate::http::{self, Body, HttpError};
use crate::hub::{Out, SessionInfo, Transport};
use crate::node::Node;
use crate::protocol::{Close, CloseCode, Command, CommandError, ErrorCode, Op, Reply, Welcome, to_frame};
use crate::session::{Frames, Session, Subscribed};
use crate::tcp::Counted;

/// The client's half of the socket, as tungstenite reads it.
type WsStream = WebSocketStream<WireIo>;

/// Bytes tungstenite reads per syscall; small, because every idle connection holds one buffer
/// (commands are small; a bigger frame grows it while it is read). 512 cost 0.4 KiB more per
/// idle connection than this (docs/BENCHMARKS.md, "Delivery path").
const READ_BUFFER: usize = 128;
/// Most queued items taken per wake-up.
const BATCH: usize = 1024;
/// How long a close handshake may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers `GET /ws`: checks origin, authenticates, checks capacity, and hands the upgraded
/// socket to a tracked session task. Auth failures are reported after the upgrade, as close
/// codes a browser can read (4001, 4011), not as HTTP statuses it cannot; such a socket takes no
/// connection slot, so unauthenticated clients cannot crowd out real ones.
pub fn upgrade(node: Arc<Node>, remote: SocketAddr, mut req: Request<Incoming>) -> Response<Body> {
    if !hyper_tungstenite::is_upgrade_request(&req) {
        return http::error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "expected a WebSocket upgrade request");
    }
    if let Err(refused) = http::allowed_origin(node.config(), &req, false) {
        node.metrics().refused.with_label_values(&["origin"]).inc();
        return refused.into_response();
    }
    let token = http::query(&req, "token").or_else(|| http::bearer(&req).map(str::to_owned));
    let identity = node.authenticate(token.as_deref(), http::query(&req, "user").as_deref());
    let slot = match identity.as_ref().map(|id| node.reserve_connection(&id.user, remote.ip())) {
        Ok(Ok(slot)) => Some(slot),
        Ok(Err(refused)) => {
            node.metrics().refused.with_label_values(&[refused.reason()]).inc();
            return HttpError::from(refused).into_response();
        }
        Err(_) => None,
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // tungstenite writes only pongs and the close frame, straight into the wire's queue.
        .write_buffer_size(0)
        .max_message_size(Some(node.config().max_frame))
        .max_frame_size(Some(node.config().max_frame));
    let (response, upgrade) = match accept(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            return http::error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, format!("bad WebSocket upgrade: {e}"));
        }
    };
    node.spawn(run(node.clone(), upgrade, config, identity, slot, remote));
    response
}

/// The `101 Switching Protocols` answer to a WebSocket handshake, and the upgrade to await.
fn accept(req: &mut Request<Incoming>) -> Result<(Response<Body>, OnUpgrade), &'static str> {
    let key = req.headers().get("sec-websocket-key").ok_or("no Sec-WebSocket-Key header")?;
    if req.headers().get("sec-websocket-version").map(|v| v.as_bytes()) != Some(b"13") {
        return Err("Sec-WebSocket-Version must be 13");
    }
    let response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Full::default().boxed())
        .map_err(|_| "bad handshake")?;
    Ok((response, hyper::upgrade::on(req)))
}

/// The upgraded connection's socket, taken back out of hyper, and tungstenite reading from it.
async fn open(upgrade: OnUpgrade, config: WebSocketConfig) -> Result<(Arc<Wire>, WsStream), String> {
    let upgraded = upgrade.await.map_err(|e| e.to_string())?;
    let parts = upgraded.downcast::<TokioIo<Counted>>().map_err(|_| "the upgraded connection is not a TCP stream")?;
    let (stream, held, switching) = parts.io.into_inner().into_parts();
    let wire = Arc::new(Wire::new(stream, held, switching));
    // An empty `read_buf` may still hold hyper's whole read buffer alive: keep only real bytes.
    let early = if parts.read_buf.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&parts.read_buf) };
    let io = WireIo { wire: wire.clone(), early };
    Ok((wire, WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await))
}

/// Serves one upgraded socket. `slot` is `Some` exactly when `identity` is `Ok`.
async fn run(
    node: Arc<Node>,
    upgrade: OnUpgrade,
    config: WebSocketConfig,
    identity: Result<Identity, AuthError>,
    slot: Option<Slot>,
    remote: SocketAddr,
) {
    // A block, so that its locals (the stream before it is boxed, above all) are not kept in
    // every connection's task for as long as it serves.
    let (mut conn, info, span) = {
        let (wire, mut ws) = match open(upgrade, config).await {
            Ok(opened) => opened,
            Err(e) => return tracing::debug!(%remote, error = %e, "websocket upgrade failed"),
        };
        let identity = match identity {
            Ok(identity) => node.check_ban(&identity.user).await.map(|()| identity),
            Err(e) => Err(e),
        };
        let identity = match identity {
            Ok(identity) => identity,
            Err(e) => {
                let reason = if matches!(e, AuthError::Banned { .. }) { "banned" } else { "auth" };
                node.metrics().refused.with_label_values(&[reason]).inc();
                tracing::debug!(%remote, error = %e, "websocket refused");
                drop(slot);
                return send_close(&mut ws, Close::new(e.close_code(), e.to_string())).await;
            }
        };
        let session = Session::open(node, identity, Transport::Ws, Some(remote), Some(wire.clone()));
        let span = tracing::debug_span!("ws", conn = %session.conn(), user = %session.identity.user);
        let info = session.info_arc();
        (Box::new(WsConn { ws, wire, session, frames: Frames::default(), last_seen: Instant::now() }), info, span)
    };
    async move {
        tracing::debug!(%remote, "connected");
        let ended = conn.serve(&info).await;
        let WsConn { mut ws, session, .. } = *conn;
        session.ended(ended.as_ref());
        // Leave the hub and free the slot before the close handshake: a closed session must not
        // be listed, counted, kicked or hold a slot while its client takes its time to answer.
        drop(session);
        drop(slot);
        if let Some(close) = ended {
            tracing::debug!(code = close.code as u16, reason = %close.reason, "closing");
            send_close(&mut ws, close).await;
        }
        tracing::debug!("disconnected");
    }
    .instrument(span)
    .await
}

/// One live WebSocket session.
struct WsConn {
    ws: WsStream,
    wire: Arc<Wire>,
    session: Session,
    frames: Frames,
    last_seen: Instant,
}

/// What woke the session loop.
enum Wake {
    Queued(usize),
    Inbound(Option<Result<Message, WsError>>),
    Heartbeat,
    /// The flusher found the socket full: wait until it takes what the express lane queued.
    Blocked,
}

impl WsConn {
    /// Runs until the peer leaves (`None`) or the session must be closed with a code.
    async fn serve(&mut self, info: &SessionInfo) -> Option<Close> {
        let config = &self.session.node().config();
        let (ping_every, idle_timeout) = (config.ping_interval, config.idle_timeout);
        let node_id = config.node_id.clone();
        let welcome = to_frame(&Welcome {
            kind: "welcome",
            conn: self.session.conn(),
            node: &node_id,
            user: &self.session.identity.user,
            ping_interval: ping_every.as_secs(),
        });
        self.session.started();
        self.frames.control(welcome);
        if let Err(close) = self.flush(info, false).await {
            return close;
        }
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let expiry = self.session.identity.expired();
        tokio::pin!(expiry);
        let mut batch = Vec::with_capacity(0);
        let wire = self.wire.clone();
        loop {
            let wake = tokio::select! {
                close = info.closed() => return Some(close),
                _ = &mut expiry => return Some(Close::new(CloseCode::TokenExpired, "token expired: get a new token")),
                n = self.session.recv_many(&mut batch, BATCH) => Wake::Queued(n),
                msg = self.ws.next() => Wake::Inbound(msg),
                _ = heartbeat.tick() => Wake::Heartbeat,
                _ = wire.blocked.notified() => Wake::Blocked,
            };
            let step = match wake {
                Wake::Queued(0) => return None,
                Wake::Queued(_) => self.drain_queue(&mut batch),
                Wake::Inbound(msg) => self.on_inbound(msg).await,
                Wake::Heartbeat if self.last_seen.elapsed() > idle_timeout => {
                    return Some(Close::new(CloseCode::GoingAway, "idle timeout: no frames from the client"));
                }
                Wake::Heartbeat => Ok(true),
                Wake::Blocked => Ok(false),
            };
            let flushed = match step {
                Ok(ping) => self.flush(info, ping).await,
                Err(close) => Err(close),
            };
            if let Err(close) = flushed {
                return close;
            }
            self.session.go_express();
            // Give back what a burst grew: an idle connection should cost almost nothing.
            if batch.capacity() > BATCH {
                batch = Vec::new();
            }
            self.frames.shrink(BATCH);
        }
    }

    /// Turns queued items into frames; `Ok(false)`: nothing else to send.
    fn drain_queue(&mut self, batch: &mut Vec<Out>) -> Result<bool, Option<Close>> {
        self.session.observe_latency(batch);
        for out in batch.drain(..) {
            self.session.accept(out, &mut self.frames).map_err(Some)?;
        }
        Ok(false)
    }

    /// Handles one inbound frame; `Err(None)` means the peer is gone.
    async fn on_inbound(&mut self, msg: Option<Result<Message, WsError>>) -> Result<bool, Option<Close>> {
        self.last_seen = Instant::now();
        match msg {
            None | Some(Ok(Message::Close(_))) => Err(None),
            Some(Ok(Message::Text(text))) => {
                self.session.rate_check().map_err(Some)?;
                // Boxed: the command future (subscribe + history read) is large and rare, and
                // inline it would grow every idle connection's task.
                Box::pin(self.on_command(&text)).await;
                Ok(false)
            }
            Some(Ok(Message::Binary(_))) => {
                Err(Some(Close::new(CloseCode::Unsupported, "binary frames are not supported: send JSON text frames")))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Ok(false),
            Some(Err(WsError::Capacity(e))) => {
                let reason = match e {
                    CapacityError::MessageTooLong { .. } => "frame too large (--max-frame)",
                    CapacityError::TooManyHeaders => "too many headers",
                };
                Err(Some(Close::new(CloseCode::TooBig, reason)))
            }
            Some(Err(WsError::Utf8(_))) => Err(Some(Close::new(CloseCode::InvalidData, "text frames must be UTF-8"))),
            // A peer that vanished without a close frame has left; nobody is there to tell.
            Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => Err(None),
            Some(Err(WsError::Protocol(e))) => {
                Err(Some(Close::new(CloseCode::ProtocolError, format!("WebSocket protocol error: {e}"))))
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                Err(None)
            }
        }
    }

    /// Runs one command and queues its reply (and, for subscribe, the replay after it).
    async fn on_command(&mut self, text: &str) {
        let cmd = match Command::parse(text) {
            Ok(cmd) => cmd,
            Err(bad) => {
                self.count_command("invalid", Err(&bad.error));
                return self.frames.control(to_frame(&Reply::error(bad.id, bad.error)));
            }
        };
        let op = cmd.op.name();
        let mut replay_budget = self.session.node().config().max_replay_bytes;
        let result: Result<Reply, CommandError> = match cmd.op {
            Op::Subscribe { channel, since } => match self.session.subscribe(&channel, since, &mut replay_budget).await
            {
                Ok(Subscribed { reply, replay }) => {
                    self.count_command(op, Ok(()));
                    self.frames.control(to_frame(&Reply { id: cmd.id, ..reply }));
                    for p in &replay {
                        self.frames.message(p.frame.clone());
                    }
                    return;
                }
                Err(e) => Err(e),
            },
            Op::Unsubscribe { channel } => self.session.unsubscribe(&channel).await,
            Op::Publish { channel, event, data, idempotency_key } => {
                self.session.publish(&channel, event, data, idempotency_key).await
            }
            Op::Presence { channel } => self.session.presence(&channel).await,
            Op::History { channel, limit, since } => self.session.history(&channel, limit, since).await,
            Op::Ping => Ok(Reply::ok(None)),
        };
        self.count_command(op, result.as_ref().map(|_| ()));
        let reply = match result {
            Ok(reply) => Reply { id: cmd.id, ..reply },
            Err(e) => Reply::error(cmd.id, e),
        };
        self.frames.control(to_frame(&reply));
    }

    fn count_command(&self, op: &str, result: Result<(), &CommandError>) {
        let result = result.map_or_else(|e| e.code.as_str(), |()| "ok");
        self.session.node().metrics().commands.with_label_values(&[op, result]).inc();
    }

    /// Writes every pending frame (and a ping), and whatever the express lane queued, unless the
    /// session is closed meanwhile. `Err(None)`: the peer is gone.
    async fn flush(&mut self, info: &SessionInfo, ping: bool) -> Result<(), Option<Close>> {
        let (frames, tally) = self.frames.take();
        let written = self.wire.send(frames, ping).map_err(|e| {
            tracing::debug!(error = %e, "websocket write failed");
            None
        })?;
        if !written {
            tokio::select! {
                flushed = self.wire.flushed() => flushed.map_err(|e| {
                    tracing::debug!(error = %e, "websocket write failed");
                    None
                })?,
                close = info.closed() => return Err(Some(close)),
            }
        }
        if tally.frames > 0 {
            self.session.sent(tally);
        }
        Ok(())
    }
}

/// Sends a close frame with `close`'s code and reason and waits for the peer's close, so data
/// the peer still sends does not turn into a TCP reset; gives up after `CLOSE_TIMEOUT`.
async fn send_close(ws: &mut WsStream, close: Close) {
    let mut reason = close.reason.into_owned();
    // A close frame's reason is at most 123 bytes.
    while reason.len() > 123 {
        reason.pop();
    }
    let frame = CloseFrame { code: WsCloseCode::from(close.code as u16), reason: reason.into() };
    let handshake = async {
        ws.close(Some(frame)).await?;
        while ws.next().await.is_some_and(|m| m.is_ok()) {}
        Ok::<_, WsError>(())
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}
