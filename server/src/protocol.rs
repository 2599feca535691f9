//! The client protocol: commands clients send, frames the server sends, error codes and the
//! close-code table. Shared by the WebSocket and SSE transports; docs/PROTOCOL.md explains it.

use std::borrow::Cow;
use std::sync::Arc;

use hyper_tungstenite::tungstenite::Utf8Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::channel::ChannelName;
use crate::engine::{ClientInfo, Epoch, Offset, Position, PresenceChange, Publication};

/// A parsed client command with the id its reply must echo.
#[derive(Debug)]
pub struct Command {
    pub id: Option<Value>,
    pub op: Op,
}

/// What a client asks for.
#[derive(Debug)]
pub enum Op {
    Subscribe {
        channel: String,
        since: Option<Position>,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        event: Option<String>,
        data: Box<RawValue>,
        idempotency_key: Option<String>,
    },
    Ping,
    Presence {
        channel: String,
    },
    /// Stored messages of a channel the client may subscribe to: the newest `limit`, or those
    /// after offset `since`.
    History {
        channel: String,
        limit: Option<u64>,
        since: Option<Offset>,
    },
}

impl Op {
    /// The op's name, as clients send it and metrics label it.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Subscribe { .. } => "subscribe",
            Op::Unsubscribe { .. } => "unsubscribe",
            Op::Publish { .. } => "publish",
            Op::Ping => "ping",
            Op::Presence { .. } => "presence",
            Op::History { .. } => "history",
        }
    }
}

/// The wire shape of every command; unknown fields are ignored.
#[derive(Deserialize)]
struct Envelope {
    id: Option<Value>,
    op: Option<String>,
    channel: Option<String>,
    /// A position for `subscribe`, an offset for `history`: read per op.
    since: Option<Value>,
    limit: Option<u64>,
    event: Option<String>,
    data: Option<Box<RawValue>>,
    idempotency_key: Option<String>,
}

/// Only the id, to echo it when the rest of a command is malformed.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<Value>,
}

/// A command that could not be parsed; the reply echoes `id` when it was readable.
#[derive(Debug)]
pub struct BadCommand {
    pub id: Option<Value>,
    pub error: CommandError,
}

impl Command {
    /// Parses one text frame. Ids must be numbers or strings.
    pub fn parse(text: &str) -> Result<Command, BadCommand> {
        let env: Envelope = serde_json::from_str(text).map_err(|e| BadCommand {
            id: serde_json::from_str::<IdOnly>(text).ok().and_then(|i| i.id).filter(valid_id),
            error: CommandError::new(ErrorCode::BadRequest, format!("malformed command: {e}")),
        })?;
        let bad_id = env.id.as_ref().is_some_and(|id| !valid_id(id));
        let id = env.id.filter(valid_id);
        let bad = |error| BadCommand { id: id.clone(), error };
        if bad_id {
            return Err(bad(CommandError::new(ErrorCode::BadRequest, "id must be a non-negative integer or a string")));
        }
        let channel = || env.channel.clone().ok_or_else(|| bad(CommandError::missing("channel")));
        let op = match env.op.as_deref() {
            Some("subscribe") => Op::Subscribe { channel: channel()?, since: position(env.since).map_err(bad)? },
            Some("unsubscribe") => Op::Unsubscribe { channel: channel()? },
            Some("publish") => Op::Publish {
                channel: channel()?,
                event: env.event,
                data: env.data.ok_or_else(|| bad(CommandError::missing("data")))?,
                idempotency_key: env.idempotency_key,
            },
            Some("ping") => Op::Ping,
            Some("presence") => Op::Presence { channel: channel()? },
            Some("history") => {
                Op::History { channel: channel()?, limit: env.limit, since: offset(env.since).map_err(bad)? }
            }
            Some(other) => {
                let msg =
                    format!("unknown op {other:?}: use subscribe, unsubscribe, publish, ping, presence or history");
                return Err(bad(CommandError::new(ErrorCode::UnknownOp, msg)));
            }
            None => return Err(bad(CommandError::missing("op"))),
        };
        Ok(Command { id, op })
    }
}

/// `subscribe`'s `since`: the last position the client handled.
fn position(since: Option<Value>) -> Result<Option<Position>, CommandError> {
    since.map(Position::deserialize).transpose().map_err(|e| {
        CommandError::new(ErrorCode::BadRequest, format!("since must be {{\"epoch\":…,\"offset\":…}}: {e}"))
    })
}

/// `history`'s `since`: an offset.
fn offset(since: Option<Value>) -> Result<Option<Offset>, CommandError> {
    since
        .map(|v| {
            v.as_u64().ok_or_else(|| {
                CommandError::new(ErrorCode::BadRequest, "since must be an offset (a non-negative integer)")
            })
        })
        .transpose()
}

fn valid_id(v: &Value) -> bool {
    v.is_u64() || v.is_string()
}

/// Error codes in replies and API bodies; stable strings clients can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownOp,
    BadChannel,
    Forbidden,
    Unauthorized,
    TokenExpired,
    AlreadySubscribed,
    NotSubscribed,
    TooManyChannels,
    /// A user's or an address's connection limit is reached.
    TooManyConnections,
    PayloadTooLarge,
    PresenceDisabled,
    RateLimited,
    Unavailable,
    /// The store did not answer in time: a publish may or may not be stored.
    OutcomeUnknown,
    NotFound,
}

impl ErrorCode {
    /// Every code, for metrics that start each series at 0.
    pub const ALL: [ErrorCode; 16] = [
        Self::BadRequest,
        Self::UnknownOp,
        Self::BadChannel,
        Self::Forbidden,
        Self::Unauthorized,
        Self::TokenExpired,
        Self::AlreadySubscribed,
        Self::NotSubscribed,
        Self::TooManyChannels,
        Self::TooManyConnections,
        Self::PayloadTooLarge,
        Self::PresenceDisabled,
        Self::RateLimited,
        Self::Unavailable,
        Self::OutcomeUnknown,
        Self::NotFound,
    ];

    /// The code as it appears on the wire and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnknownOp => "unknown_op",
            Self::BadChannel => "bad_channel",
            Self::Forbidden => "forbidden",
            Self::Unauthorized => "unauthorized",
            Self::TokenExpired => "token_expired",
            Self::AlreadySubscribed => "already_subscribed",
            Self::NotSubscribed => "not_subscribed",
            Self::TooManyChannels => "too_many_channels",
            Self::TooManyConnections => "too_many_connections",
            Self::PayloadTooLarge => "payload_too_large",
            Self::PresenceDisabled => "presence_disabled",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::NotFound => "not_found",
        }
    }
}

/// A refused command or API request: a code and a sentence saying what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    fn missing(field: &str) -> Self {
        Self::new(ErrorCode::BadRequest, format!("missing field {field:?}"))
    }
}

/// WebSocket close codes: what the client should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// Going away: idle timeout. Reconnect and replay.
    GoingAway = 1001,
    /// A frame that breaks the WebSocket protocol. Fix the client.
    ProtocolError = 1002,
    /// Binary or otherwise unsupported data. Fix the client.
    Unsupported = 1003,
    /// A text frame that is not UTF-8. Fix the client.
    InvalidData = 1007,
    /// Frame larger than the limit. Fix the client.
    TooBig = 1009,
    /// Server restarting (drain). Reconnect and replay.
    Restart = 1012,
    /// Missing or bad token. Stop.
    Unauthorized = 4001,
    /// Not allowed. Stop.
    Forbidden = 4003,
    /// Too many commands. Back off, then reconnect.
    RateLimited = 4008,
    /// Kicked by an operator or the backend. Stop.
    Kicked = 4009,
    /// Could not keep up. Reconnect and replay.
    SlowConsumer = 4010,
    /// Token expired. Get a new token, then reconnect.
    TokenExpired = 4011,
}

/// Why a session ends: the close code and a short human reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    pub reason: Cow<'static, str>,
}

impl CloseCode {
    /// The code as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::GoingAway => "1001",
            Self::ProtocolError => "1002",
            Self::Unsupported => "1003",
            Self::InvalidData => "1007",
            Self::TooBig => "1009",
            Self::Restart => "1012",
            Self::Unauthorized => "4001",
            Self::Forbidden => "4003",
            Self::RateLimited => "4008",
            Self::Kicked => "4009",
            Self::SlowConsumer => "4010",
            Self::TokenExpired => "4011",
        }
    }
}

impl Close {
    pub fn new(code: CloseCode, reason: impl Into<Cow<'static, str>>) -> Self {
        Self { code, reason: reason.into() }
    }
}

/// Serialises a server frame; frames are plain data, so this cannot fail.
pub fn to_frame<T: Serialize>(frame: &T) -> Utf8Bytes {
    serde_json::to_string(frame).expect("server frames always serialise").into()
}

/// `{"type":"message",...}`: a stored message, with its data as the publisher sent it.
pub fn message_frame(p: &Publication) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Message<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        channel: &'a ChannelName,
        offset: Offset,
        #[serde(skip_serializing_if = "Option::is_none")]
        event: Option<&'a str>,
        data: &'a RawValue,
    }
    let frame =
        Message { kind: "message", channel: &p.channel, offset: p.offset, event: p.event.as_deref(), data: &p.data };
    to_frame(&frame)
}

/// `{"type":"join"|"leave",...}`: a subscriber of `channel` came or went.
pub fn presence_frame(change: PresenceChange, channel: &ChannelName, client: &ClientInfo) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Presence<'a> {
        #[serde(rename = "type")]
        kind: PresenceChange,
        channel: &'a ChannelName,
        user: &'a str,
        conn: &'a str,
    }
    to_frame(&Presence { kind: change, channel, user: &client.user, conn: &client.conn })
}

/// `{"type":"welcome",...}`: the first frame of every connection.
#[derive(Debug, Serialize)]
pub struct Welcome<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub conn: &'a str,
    pub node: &'a str,
    pub user: &'a str,
    pub ping_interval: u64,
}

/// `{"type":"reply",...}`: the answer to one command, carrying its id.
#[derive(Debug, Default, Serialize)]
pub struct Reply {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: Option<Value>,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelName>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<Offset>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<ClientInfo>>,
    /// `history`: the channel's last offset and the stored messages asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top: Option<Offset>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publications: Option<Vec<HistoryItem>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<CommandError>,
}

/// A stored message as history answers list it (the server API and the `history` op alike).
#[derive(Debug)]
pub struct HistoryItem(pub Arc<Publication>);

/// The wire shape: `data` goes out byte for byte as stored.
#[derive(Serialize)]
struct HistoryEntry<'a> {
    offset: Offset,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    data: &'a RawValue,
    time_ms: u64,
}

impl Serialize for HistoryItem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = &self.0;
        HistoryEntry { offset: p.offset, event: p.event.as_deref(), data: &p.data, time_ms: p.time_us / 1000 }
            .serialize(s)
    }
}

impl Reply {
    pub fn ok(id: Option<Value>) -> Self {
        Self { kind: "reply", id, ok: true, ..Self::default() }
    }

    pub fn error(id: Option<Value>, error: CommandError) -> Self {
        Self { kind: "reply", id, ok: false, error: Some(error), ..Self::default() }
    }
}

/// `{"type":"reset",...}`: the channel's history was lost under a live subscription; live
/// delivery goes on from `offset` in the new `epoch`, and the app must resync from its own store.
#[derive(Debug, Serialize)]
pub struct Reset<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub channel: &'a ChannelName,
    pub epoch: &'a Epoch,
    pub offset: Offset,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NewMessage;

    #[test]
    fn a_message_frame_carries_the_data_as_sent() {
        let ch = ChannelName::parse("room:1").unwrap();
        let data = RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap();
        let msg = NewMessage { event: Some("chat".into()), data, idempotency_key: None };
        let p = Publication::new(ch.clone(), Epoch::new("e"), 42, msg, 0);
        let expected = r#"{"type":"message","channel":"room:1","offset":42,"event":"chat","data":{"text":"hi"}}"#;
        assert_eq!(message_frame(&p).as_str(), expected);
        let client = ClientInfo { user: "u".into(), conn: "n.1".into(), node: "n".into() };
        let join = presence_frame(PresenceChange::Join, &ch, &client);
        assert_eq!(join.as_str(), r#"{"type":"join","channel":"room:1","user":"u","conn":"n.1"}"#);
    }

    #[test]
    fn parses_every_op() {
        let c = Command::parse(r#"{"id":1,"op":"subscribe","channel":"a","since":{"epoch":"e","offset":4}}"#).unwrap();
        assert_eq!(c.id, Some(1.into()));
        assert!(matches!(c.op, Op::Subscribe { since: Some(Position { offset: 4, .. }), .. }));
        let c = Command::parse(r#"{"id":"x","op":"publish","channel":"a","data":{"k":[1,2]}}"#).unwrap();
        match c.op {
            Op::Publish { data, event, .. } => assert_eq!((data.get(), event), (r#"{"k":[1,2]}"#, None)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(Command::parse(r#"{"op":"ping"}"#).unwrap().op, Op::Ping));
        let c = Command::parse(r#"{"op":"history","channel":"a","limit":5,"since":3}"#).unwrap();
        assert!(matches!(c.op, Op::History { limit: Some(5), since: Some(3), .. }));
        let c = Command::parse(r#"{"op":"history","channel":"a"}"#).unwrap();
        assert!(matches!(c.op, Op::History { limit: None, since: None, .. }));
    }

    #[test]
    fn malformed_commands_keep_their_id_when_readable() {
        let e = Command::parse("{not json").unwrap_err();
        assert_eq!((e.id, e.error.code), (None, ErrorCode::BadRequest));
        let e = Command::parse(r#"{"id":7,"op":"dance"}"#).unwrap_err();
        assert_eq!((e.id, e.error.code), (Some(7.into()), ErrorCode::UnknownOp));
        let e = Command::parse(r#"{"id":8,"op":"subscribe"}"#).unwrap_err();
        assert_eq!((e.id, e.error.code), (Some(8.into()), ErrorCode::BadRequest));
        let e = Command::parse(r#"{"id":9,"op":"subscribe","channel":5}"#).unwrap_err();
        assert_eq!((e.id, e.error.code), (Some(9.into()), ErrorCode::BadRequest));
        let e = Command::parse(r#"{"id":-1,"op":"ping"}"#).unwrap_err();
        assert_eq!((e.id, e.error.code), (None, ErrorCode::BadRequest));
        let e = Command::parse(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::BadRequest);
    }

    #[test]
    fn metric_labels_cover_every_code() {
        let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(codes, crate::metrics::ERROR_CODES);
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[test]
    fn replies_omit_what_they_do_not_carry() {
        let r = to_frame(&Reply::ok(Some(4.into())));
        assert_eq!(r.as_str(), r#"{"type":"reply","id":4,"ok":true}"#);
        let r = to_frame(&Reply::error(None, CommandError::new(ErrorCode::Forbidden, "no")));
        assert_eq!(r.as_str(), r#"{"type":"reply","id":null,"ok":false,"error":{"code":"forbidden","message":"no"}}"#);
    }
}
