//! The admin API (`/admin/*`, docs/ADMIN-API.md) behind `PUSHD_ADMIN_KEY`: any node answers for
//! the whole cluster by surveying every registered node through the engine and merging the
//! answers; nodes that stay silent past the timeout are named in `missing`. Every answer is a
//! `pushd_wire` type, the one `pushctl` reads, so the two cannot drift apart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use pushd_wire::{
    ChannelDetail, ChannelRow, ChannelsAnswer, ConnectionInfo, ConnectionsAnswer, Coverage, KickAnswer, KickedOnNode,
    MAX_BAN_S, NodesAnswer, StatsAnswer, Subscriber, Totals, UnbanAnswer,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{read_json, server};
use crate::channel::ChannelName;
use crate::engine::{EngineError, HistoryBounds, Survey, now_ms};
use crate::http::{self, Body, HttpError};
use crate::node::Node;
use crate::protocol::ErrorCode;
use crate::survey::{ChannelOnNode, Kicked, NodeReport, SurveyRequest, conn_order};

/// History reads one `/admin/channels` answer keeps in flight.
const HISTORY_READS: usize = 64;
/// Default and largest survey wait.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);
const MAX_TIMEOUT: Duration = Duration::from_secs(10);

type AdminResult = Result<Response<Body>, HttpError>;

/// The admin API's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Stats,
    Nodes,
    Connections,
    Channels,
    /// `/admin/channels/{channel}`.
    Channel,
    History,
    Publish,
    Kick,
    Unban,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        Some(match path {
            "/admin/stats" => Route::Stats,
            "/admin/nodes" => Route::Nodes,
            "/admin/connections" => Route::Connections,
            "/admin/channels" => Route::Channels,
            "/admin/history" => Route::History,
            "/admin/publish" => Route::Publish,
            "/admin/kick" => Route::Kick,
            "/admin/unban" => Route::Unban,
            p if p.starts_with(CHANNEL_PREFIX) => Route::Channel,
            _ => return None,
        })
    }

    /// The `route` label of the request metrics.
    fn name(self) -> &'static str {
        match self {
            Route::Stats => "stats",
            Route::Nodes => "nodes",
            Route::Connections => "connections",
            Route::Channels => "channels",
            Route::Channel => "channel",
            Route::History => "history",
            Route::Publish => "publish",
            Route::Kick => "kick",
            Route::Unban => "unban",
        }
    }

    fn method(self) -> Method {
        match self {
            Route::Publish | Route::Kick | Route::Unban => Method::POST,
            Route::Stats | Route::Nodes | Route::Connections | Route::Channels | Route::Channel | Route::History => {
                Method::GET
            }
        }
    }
}

const CHANNEL_PREFIX: &str = "/admin/channels/";

/// Dispatches one `/admin/*` request, counting it by route and status.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let route = Route::parse(req.uri().path());
    let response = respond(&node, route, req).await.unwrap_or_else(HttpError::into_response);
    let name = route.map_or("unknown", Route::name);
    node.metrics().observe_http("admin", name, response.status().as_str(), started.elapsed());
    response
}

async fn respond(node: &Node, route: Option<Route>, req: Request<Incoming>) -> AdminResult {
    check_key(node, &req)?;
    // No browser page has business changing the cluster unless the origin policy says so.
    if req.method() == Method::POST {
        http::allowed_origin(node.config(), &req, true)?;
    }
    let path = req.uri().path().to_owned();
    let Some(route) = route else {
        let text = format!("no admin route {} {path}", req.method());
        return Err(HttpError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, text));
    };
    if req.method() != route.method() {
        return Err(HttpError::wrong_method(req.method(), &path, route.method().as_str()));
    }
    match route {
        Route::Stats => stats(node, &req).await,
        Route::Nodes => nodes(node, &req).await,
        Route::Connections => connections(node, &req).await,
        Route::Channels => channels(node, &req).await,
        Route::Channel => channel(node, &req, &path[CHANNEL_PREFIX.len()..]).await,
        Route::History => server::history(node, &req).await,
        Route::Publish => server::publish(node, req, "admin").await,
        Route::Kick => kick(node, req).await,
        Route::Unban => unban(node, req).await,
    }
}

/// Operators carry `--admin-key`. Without one the admin API is open in dev mode only: a node on
/// the internet must not be steerable by anyone because a flag was forgotten.
fn check_key<B>(node: &Node, req: &Request<B>) -> Result<(), HttpError> {
    match &node.config().admin_key {
        Some(expected) => super::check_key(req, expected, "admin", "PUSHD_ADMIN_KEY"),
        None if node.config().dev_mode() => Ok(()),
        None => {
            let msg = "admin API disabled: set PUSHD_ADMIN_KEY (--admin-key) on the node";
            Err(HttpError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, msg))
        }
    }
}

fn timeout<B>(req: &Request<B>) -> Result<Duration, HttpError> {
    Ok(number(req, "timeout_ms")?
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis)
        .clamp(Duration::from_millis(50), MAX_TIMEOUT))
}

fn number<B>(req: &Request<B>, key: &str) -> Result<Option<u64>, HttpError> {
    http::query(req, key)
        .map(|v| {
            v.parse::<u64>().map_err(|_| HttpError::bad_request(format!("?{key}= must be a non-negative integer")))
        })
        .transpose()
}

/// When an admin answer is due: `timeout_ms` after the request came in. Every engine call an
/// answer makes runs under it, concurrently where there are several, so a stalled Redis costs
/// the operator the timeout, never a Redis command timeout per row.
#[derive(Debug, Clone, Copy)]
struct Deadline(tokio::time::Instant);

impl Deadline {
    fn of<B>(req: &Request<B>) -> Result<Self, HttpError> {
        Ok(Self(tokio::time::Instant::now() + timeout(req)?))
    }

    /// Time left until the deadline.
    fn left(self) -> Duration {
        self.0.saturating_duration_since(tokio::time::Instant::now())
    }

    /// Runs `call`, cut short at the deadline as an engine that did not answer.
    async fn bound<T>(self, call: impl Future<Output = Result<T, EngineError>>) -> Result<T, EngineError> {
        tokio::time::timeout_at(self.0, call)
            .await
            .unwrap_or_else(|_| Err(EngineError::Timeout("no answer within the request's timeout_ms".into())))
    }
}

fn unavailable(e: EngineError) -> HttpError {
    HttpError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, format!("{e}: retry shortly"))
}

/// Surveys every node with `request` until `deadline` (the engine's survey keeps it, waiting for
/// the registry included); answers that do not parse count as missing.
async fn survey<T: DeserializeOwned>(
    node: &Node,
    request: &SurveyRequest,
    deadline: Deadline,
) -> Result<(Vec<(String, T)>, Coverage), HttpError> {
    let request = serde_json::to_string(request).expect("survey requests serialise");
    let (survey, others_unknown) = match node.engine().survey(&request, deadline.left()).await {
        Ok(survey) => (survey, None),
        // The store that carries surveys is away: answer for this node, and say the rest are
        // unknown rather than failing the operator outright.
        Err(e) => {
            tracing::warn!(error = %e, "survey failed; answering for this node only");
            let own = (node.config().node_id.clone(), crate::engine::SurveyHandler::answer(node, &request));
            (Survey { answers: vec![own], missing: Vec::new() }, Some(format!("other nodes unknown: {e}")))
        }
    };
    let mut missing = survey.missing;
    let mut answers = Vec::with_capacity(survey.answers.len());
    for (id, body) in survey.answers {
        match serde_json::from_str::<T>(&body) {
            Ok(answer) => answers.push((id, answer)),
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "unreadable survey answer");
                missing.push(id);
            }
        }
    }
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((answers, Coverage { missing, others_unknown }))
}

async fn stats(node: &Node, req: &Request<Incoming>) -> AdminResult {
    let deadline = Deadline::of(req)?;
    let (answers, coverage) = survey::<NodeReport>(node, &SurveyRequest::Stats, deadline).await?;
    let (mut users, mut channels) = (BTreeSet::new(), BTreeSet::new());
    let mut totals = Totals { nodes: answers.len() as u64, ..Totals::default() };
    let mut nodes = Vec::with_capacity(answers.len());
    for (_, report) in answers {
        users.extend(report.user_ids);
        channels.extend(report.channel_names);
        let s = report.stats;
        totals.connections += s.info.connections;
        totals.subscriptions += s.info.subscriptions;
        totals.msgs_in_per_s += s.msgs_in_per_s;
        totals.msgs_out_per_s += s.msgs_out_per_s;
        totals.replays += s.info.replays;
        totals.slow_consumers += s.info.slow_consumers;
        totals.uptime_s = totals.uptime_s.max(s.uptime_s);
        nodes.push(s);
    }
    (totals.users, totals.channels) = (users.len() as u64, channels.len() as u64);
    let redis = deadline.bound(node.engine().backend_stats()).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "backend stats unavailable");
        None
    });
    let engine = if node.config().redis_url.is_some() { "redis" } else { "memory" };
    let body = StatsAnswer { engine: engine.into(), totals, nodes, coverage, redis };
    Ok(http::json(StatusCode::OK, &body))
}

async fn nodes(node: &Node, req: &Request<Incoming>) -> AdminResult {
    let mut nodes = Deadline::of(req)?.bound(node.engine().nodes()).await.map_err(unavailable)?;
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(http::json(StatusCode::OK, &NodesAnswer { nodes, coverage: Coverage::default() }))
}

async fn connections(node: &Node, req: &Request<Incoming>) -> AdminResult {
    let limit = number(req, "limit")?.unwrap_or(100).clamp(1, 10_000) as usize;
    let only_node = http::query(req, "node");
    let (user, channel) = (http::query(req, "user"), http::query(req, "channel"));
    let request = SurveyRequest::Connections { user, channel, limit: Some(limit) };
    let (answers, coverage) = survey::<Vec<ConnectionInfo>>(node, &request, Deadline::of(req)?).await?;
    let mut all: Vec<ConnectionInfo> = answers
        .into_iter()
        .filter(|(id, _)| only_node.as_ref().is_none_or(|n| n == id))
        .flat_map(|(_, list)| list)
        .collect();
    all.sort_by_key(|c| conn_order(&c.conn));
    let truncated = all.len() > limit;
    all.truncate(limit);
    Ok(http::json(StatusCode::OK, &ConnectionsAnswer { connections: all, truncated, coverage }))
}

async fn channels(node: &Node, req: &Request<Incoming>) -> AdminResult {
    let limit = number(req, "limit")?.unwrap_or(100).clamp(1, 10_000) as usize;
    let by_rate = match http::query(req, "sort").as_deref() {
        None | Some("subscribers") => false,
        Some("rate") => true,
        Some(other) => return Err(HttpError::bad_request(format!("sort={other}: use subscribers or rate"))),
    };
    let deadline = Deadline::of(req)?;
    let request = SurveyRequest::Channels { pattern: http::query(req, "pattern") };
    let (answers, coverage) = survey::<Vec<ChannelOnNode>>(node, &request, deadline).await?;
    let mut merged: BTreeMap<String, ChannelRow> = BTreeMap::new();
    for c in answers.into_iter().flat_map(|(_, list)| list) {
        let row = merged.entry(c.channel.clone()).or_insert(ChannelRow { channel: c.channel, ..ChannelRow::default() });
        row.subscribers += c.subscribers;
        row.nodes += 1;
        // Every subscribed node sees every message of the channel: the rate is the same.
        row.rate = row.rate.max(c.rate);
    }
    let mut rows: Vec<ChannelRow> = merged.into_values().collect();
    if by_rate {
        rows.sort_by(|a, b| b.rate.total_cmp(&a.rate).then_with(|| a.channel.cmp(&b.channel)));
    } else {
        rows.sort_by(|a, b| b.subscribers.cmp(&a.subscribers).then_with(|| a.channel.cmp(&b.channel)));
    }
    let truncated = rows.len() > limit;
    rows.truncate(limit);
    // Every row's history at once, all by the deadline; a row the engine did not answer for in
    // time keeps `null` (unknown), which is not 0.
    let mut bounds = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(HISTORY_READS) {
        bounds.extend(join_all(chunk.iter().map(|row| history_of(node, deadline, &row.channel))).await);
    }
    for (row, bounds) in rows.iter_mut().zip(bounds) {
        if let Some(bounds) = bounds {
            (row.history_len, row.last_offset) = (Some(bounds.len), Some(bounds.last_offset));
        }
    }
    Ok(http::json(StatusCode::OK, &ChannelsAnswer { channels: rows, truncated, coverage }))
}

/// `channel`'s history bounds if the engine gives them by `deadline`.
async fn history_of(node: &Node, deadline: Deadline, channel: &str) -> Option<HistoryBounds> {
    let channel = ChannelName::parse(channel).ok()?;
    deadline.bound(node.engine().history_bounds(&channel)).await.ok()
}

async fn channel(node: &Node, req: &Request<Incoming>, name: &str) -> AdminResult {
    let name = http::percent_decode(name);
    let ch = ChannelName::parse(&name)
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, ErrorCode::BadChannel, format!("{name:?}: {e}")))?;
    let deadline = Deadline::of(req)?;
    let request = SurveyRequest::Channel { channel: ch.to_string() };
    let (surveyed, presence, history) = tokio::join!(
        survey::<Vec<Subscriber>>(node, &request, deadline),
        tokio::time::timeout_at(deadline.0, node.presence(&ch)),
        deadline.bound(node.engine().history_bounds(&ch)),
    );
    let (answers, coverage) = surveyed?;
    let mut subscribers: Vec<Subscriber> = answers.into_iter().flat_map(|(_, list)| list).collect();
    subscribers.sort_by_key(|s| conn_order(&s.conn));
    let presence = match presence {
        Ok(Ok(clients)) => Some(clients),
        Ok(Err(e)) if e.code == ErrorCode::PresenceDisabled => None,
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(unavailable(EngineError::Timeout("presence: no answer within timeout_ms".into()))),
    };
    let history = history.map_err(unavailable)?;
    let body = ChannelDetail { channel: ch.to_string(), subscribers, presence, history, coverage };
    Ok(http::json(StatusCode::OK, &body))
}

#[derive(Deserialize)]
struct KickBody {
    #[serde(default)]
    conns: Vec<String>,
    user: Option<String>,
    reason: Option<String>,
    ban_s: Option<u64>,
}

/// Closes sockets with 4009 wherever they are; with `ban_s`, refuses the user cluster-wide.
async fn kick(node: &Node, req: Request<Incoming>) -> AdminResult {
    let deadline = Deadline::of(&req)?;
    let body: KickBody = read_json(node, req).await?;
    if body.conns.is_empty() == body.user.is_none() {
        return Err(HttpError::bad_request("give either \"conns\" (a list) or \"user\""));
    }
    if body.ban_s.is_some() && body.user.is_none() {
        return Err(HttpError::bad_request("\"ban_s\" needs \"user\": bans are per user"));
    }
    if body.ban_s.is_some_and(|s| s > MAX_BAN_S) {
        return Err(HttpError::bad_request(format!("\"ban_s\" is at most {MAX_BAN_S} (ten years)")));
    }
    let mut banned_until_ms = None;
    if let (Some(user), Some(secs)) = (&body.user, body.ban_s) {
        let until = now_ms().saturating_add(secs.max(1) * 1000);
        deadline.bound(node.engine().ban(user, until)).await.map_err(unavailable)?;
        banned_until_ms = Some(until);
    }
    let reason = body.reason.unwrap_or_else(|| "kicked by an operator".into());
    tracing::info!(user = ?body.user, conns = ?body.conns, ?banned_until_ms, %reason, "operator kick");
    let request = SurveyRequest::Kick { conns: body.conns, user: body.user, reason };
    let (answers, coverage) = survey::<Kicked>(node, &request, deadline).await?;
    let total = answers.iter().map(|(_, k)| k.count).sum();
    let closed = answers.into_iter().map(|(node, k)| KickedOnNode { node, count: k.count }).collect();
    Ok(http::json(StatusCode::OK, &KickAnswer { closed, total, banned_until_ms, coverage }))
}

#[derive(Deserialize)]
struct UnbanBody {
    user: String,
}

/// Lifts a user's ban on every node at once (the ban is one key in the shared store).
async fn unban(node: &Node, req: Request<Incoming>) -> AdminResult {
    let deadline = Deadline::of(&req)?;
    let body: UnbanBody = read_json(node, req).await?;
    let was_banned = deadline.bound(node.engine().unban(&body.user)).await.map_err(unavailable)?;
    tracing::info!(user = %body.user, was_banned, "operator unban");
    Ok(http::json(StatusCode::OK, &UnbanAnswer { user: body.user, was_banned }))
}
