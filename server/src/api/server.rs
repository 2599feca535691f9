//! The server API for backends: `/api/publish`, `/api/broadcast`, `/api/history`,
//! `/api/presence`, `/api/disconnect`, behind `Authorization: Bearer <PUSHD_API_KEY>`.
//! JSON in and out; every error is `{"error":{"code","message"}}` with a fitting status.

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::read_json;
use crate::channel::ChannelName;
use crate::engine::{Epoch, HistoryQuery, NewMessage, Offset, check_idempotency_key};
use crate::http::{self, Body, HttpError};
use crate::node::Node;
use crate::protocol::{Close, CloseCode, CommandError, ErrorCode, HistoryItem};

type ApiResult = Result<Response<Body>, HttpError>;

/// The server API's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Publish,
    Broadcast,
    History,
    Presence,
    Disconnect,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        Some(match path {
            "/api/publish" => Route::Publish,
            "/api/broadcast" => Route::Broadcast,
            "/api/history" => Route::History,
            "/api/presence" => Route::Presence,
            "/api/disconnect" => Route::Disconnect,
            _ => return None,
        })
    }

    /// The `route` label of the request metrics.
    fn name(self) -> &'static str {
        match self {
            Route::Publish => "publish",
            Route::Broadcast => "broadcast",
            Route::History => "history",
            Route::Presence => "presence",
            Route::Disconnect => "disconnect",
        }
    }

    fn method(self) -> Method {
        match self {
            Route::History | Route::Presence => Method::GET,
            Route::Publish | Route::Broadcast | Route::Disconnect => Method::POST,
        }
    }
}

/// Dispatches one `/api/*` request, counting it by route and status.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let route = Route::parse(req.uri().path());
    let response = respond(&node, route, req).await;
    let name = route.map_or("unknown", Route::name);
    node.metrics().observe_http("api", name, response.status().as_str(), started.elapsed());
    response
}

async fn respond(node: &Node, route: Option<Route>, req: Request<Incoming>) -> Response<Body> {
    let origin = match http::allowed_origin(node.config(), &req, req.method() == Method::POST) {
        Ok(origin) => origin,
        Err(refused) => return refused.into_response(),
    };
    let result = match (check_key(node, &req).and_then(|()| rate(node)), route) {
        (Err(refused), _) => Err(refused),
        (Ok(()), None) => {
            let text = format!("no API route {} {}", req.method(), req.uri().path());
            Err(HttpError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, text))
        }
        (Ok(()), Some(route)) if req.method() != route.method() => {
            Err(HttpError::wrong_method(req.method(), req.uri().path(), route.method().as_str()))
        }
        (Ok(()), Some(route)) => match route {
            Route::Publish => publish(node, req, "api").await,
            Route::Broadcast => broadcast(node, req).await,
            Route::History => history(node, &req).await,
            Route::Presence => presence(node, &req).await,
            Route::Disconnect => disconnect(node, req).await,
        },
    };
    http::with_cors(result.unwrap_or_else(HttpError::into_response), origin)
}

/// Takes the request from `--api-rate-limit`, or answers 429 with when to come back.
fn rate(node: &Node) -> Result<(), HttpError> {
    node.api_request().map_err(|wait| {
        HttpError::rate_limited("too many server API requests (--api-rate-limit): retry after Retry-After", wait)
    })
}

/// Backends carry `--api-key`; without one (dev mode) the API is open.
fn check_key<B>(node: &Node, req: &Request<B>) -> Result<(), HttpError> {
    match &node.config().api_key {
        Some(expected) => super::check_key(req, expected, "API", "PUSHD_API_KEY"),
        None => Ok(()),
    }
}

fn channel(name: &str) -> Result<ChannelName, HttpError> {
    ChannelName::parse(name)
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, ErrorCode::BadChannel, format!("{name:?}: {e}")))
}

#[derive(Deserialize)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
    event: Option<String>,
    idempotency_key: Option<String>,
}

/// Checks an optional idempotency key.
fn idempotency_key(key: Option<String>) -> Result<Option<String>, HttpError> {
    match key {
        Some(key) => check_idempotency_key(&key).map(|()| Some(key)).map_err(HttpError::bad_request),
        None => Ok(None),
    }
}

#[derive(Serialize)]
struct Published {
    channel: ChannelName,
    epoch: Epoch,
    offset: Offset,
}

/// Stores one message; `route` says which API it came through (`api`, `admin`).
pub(super) async fn publish(node: &Node, req: Request<Incoming>, route: &str) -> ApiResult {
    let body: PublishBody = read_json(node, req).await?;
    let channel = channel(&body.channel)?;
    let msg = NewMessage {
        idempotency_key: idempotency_key(body.idempotency_key)?,
        ..NewMessage::new(body.event, body.data).map_err(|e| HttpError::bad_request(e.to_string()))?
    };
    let p = node.publish(&channel, msg, route).await.map_err(HttpError::from)?;
    Ok(http::json(StatusCode::OK, &Published { channel, epoch: p.epoch.clone(), offset: p.offset }))
}

#[derive(Deserialize)]
struct BroadcastBody {
    channels: Vec<String>,
    data: Box<RawValue>,
    event: Option<String>,
}

#[derive(Serialize)]
struct BroadcastResult {
    channel: ChannelName,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<Epoch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<Offset>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<CommandError>,
}

/// Publishes one message to many channels. Names are checked before anything is stored. If a
/// channel could not store it the answer is 503, or 504 if one may have stored it without
/// saying so; per-channel results say which did what.
async fn broadcast(node: &Node, req: Request<Incoming>) -> ApiResult {
    let body: BroadcastBody = read_json(node, req).await?;
    if body.channels.is_empty() {
        return Err(HttpError::bad_request("name at least one channel in \"channels\""));
    }
    let channels = body.channels.iter().map(|c| channel(c)).collect::<Result<Vec<_>, _>>()?;
    if let Some(twice) = channels.iter().enumerate().find_map(|(i, c)| channels[..i].contains(c).then_some(c)) {
        return Err(HttpError::bad_request(format!("channel {twice} is named twice")));
    }
    let msg = NewMessage::new(body.event, body.data).map_err(|e| HttpError::bad_request(e.to_string()))?;
    let mut results = Vec::with_capacity(channels.len());
    let mut status = StatusCode::OK;
    for channel in channels {
        let result = match node.publish(&channel, msg.clone(), "api").await {
            Ok(p) => BroadcastResult { channel, epoch: Some(p.epoch.clone()), offset: Some(p.offset), error: None },
            Err(e) if e.code == ErrorCode::PayloadTooLarge => return Err(e.into()),
            Err(e) => {
                let failed = HttpError::from(e.clone()).status;
                // 504 (may be stored) outranks 503 (not stored): the caller must treat it so.
                if status != StatusCode::GATEWAY_TIMEOUT {
                    status = failed;
                }
                BroadcastResult { channel, epoch: None, offset: None, error: Some(e) }
            }
        };
        results.push(result);
    }
    Ok(http::json(status, &serde_json::json!({ "results": results })))
}

/// Serialised as a struct, not a `json!` tree, so `data` goes out byte for byte as stored.
#[derive(Serialize)]
struct HistoryBody {
    channel: ChannelName,
    epoch: Epoch,
    top: Offset,
    publications: Vec<HistoryItem>,
}

pub(super) async fn history(node: &Node, req: &Request<Incoming>) -> ApiResult {
    let name = http::query(req, "channel").ok_or_else(|| HttpError::bad_request("missing ?channel="))?;
    let channel = channel(&name)?;
    let number = |key: &str| -> Result<Option<u64>, HttpError> {
        http::query(req, key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| HttpError::bad_request(format!("?{key}= must be a non-negative integer")))
            })
            .transpose()
    };
    let query = HistoryQuery::new(number("limit")?, number("since")?);
    let page = node.engine().history(&channel, query).await.map_err(|e| {
        HttpError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, format!("{e}: retry shortly"))
    })?;
    let publications = page.publications.into_iter().map(HistoryItem).collect();
    let body = HistoryBody { channel, epoch: page.epoch, top: page.top, publications };
    Ok(http::json(StatusCode::OK, &body))
}

async fn presence(node: &Node, req: &Request<Incoming>) -> ApiResult {
    let name = http::query(req, "channel").ok_or_else(|| HttpError::bad_request("missing ?channel="))?;
    let channel = channel(&name)?;
    let clients = node.presence(&channel).await.map_err(HttpError::from)?;
    Ok(http::json(StatusCode::OK, &serde_json::json!({ "channel": channel, "clients": clients })))
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: Option<String>,
    conn: Option<String>,
    reason: Option<String>,
}

/// Closes a user's sockets (or one connection) with 4009 on this node.
async fn disconnect(node: &Node, req: Request<Incoming>) -> ApiResult {
    let body: DisconnectBody = read_json(node, req).await?;
    if body.user.is_none() == body.conn.is_none() {
        return Err(HttpError::bad_request("give exactly one of \"user\" or \"conn\""));
    }
    let reason = body.reason.unwrap_or_else(|| "disconnected by the server".into());
    let n = node.hub().disconnect(body.user.as_deref(), body.conn.as_deref(), Close::new(CloseCode::Kicked, reason));
    node.metrics().kicks.inc_by(n as u64);
    Ok(http::json(StatusCode::OK, &serde_json::json!({ "disconnected": n })))
}
