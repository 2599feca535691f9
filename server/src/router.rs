//! The route table: which handler answers which path on which listener (`Plane`), and the
//! node's own small answers (health, readiness, metrics, CORS preflight). It is the only module
//! that knows every handler; none of them knows it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::client_addr;
use crate::http::{Body, allowed_origin, empty, error, json, text};
use crate::node::Node;
use crate::protocol::ErrorCode;
use crate::{api, assets, sse, ws};

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// Everything: the only listener when no `--admin-listen` is set.
    All,
    /// Clients and backends (`--listen` beside an `--admin-listen`): /ws, /sse, /api/*.
    Public,
    /// Operators (`--admin-listen`): /admin/* and /metrics.
    Admin,
}

impl Plane {
    /// Whether a request for `path` belongs on this listener; health checks are on both.
    fn serves(self, path: &str) -> bool {
        let operator = path.starts_with("/admin/") || path == "/metrics";
        match self {
            Plane::All => true,
            Plane::Public => !operator,
            Plane::Admin => operator || path == "/healthz" || path == "/readyz",
        }
    }
}

/// The route table.
pub async fn route(
    node: Arc<Node>,
    remote: SocketAddr,
    plane: Plane,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if !plane.serves(&path) {
        let other = if plane == Plane::Admin { "--listen" } else { "--admin-listen" };
        let text = format!("no route for {} {path} on this address: it is served on the node's {other}", req.method());
        return Ok(error(StatusCode::NOT_FOUND, ErrorCode::NotFound, text));
    }
    let remote = client_addr::resolve(&node.config().trusted_proxies, remote, req.headers());
    let response = match (req.method(), path.as_str()) {
        (&Method::GET, "/ws") => ws::upgrade(node, remote, req),
        (&Method::GET, "/sse") => sse::open(node, remote, req).await,
        (
            &Method::OPTIONS,
            "/sse" | "/api/publish" | "/api/broadcast" | "/api/history" | "/api/presence" | "/api/disconnect",
        ) => preflight(&node, &req),
        (_, p) if p.starts_with("/api/") => api::server::handle(node, req).await,
        (_, p) if p.starts_with("/admin/") => api::admin::handle(node, req).await,
        (&Method::GET, "/client.js") => assets::CLIENT.respond(req.headers()),
        (&Method::GET, "/demo") if node.config().dev_mode() => assets::DEMO.respond(req.headers()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readyz(&node),
        (&Method::GET, "/metrics") => metrics(&node),
        (&Method::GET, "/") => text(
            StatusCode::OK,
            "pushd: connect to /ws (WebSocket) or /sse, with the client at /client.js; publish with POST /api/publish\n",
        ),
        _ => error(StatusCode::NOT_FOUND, ErrorCode::NotFound, format!("no route for {} {path}", req.method())),
    };
    Ok(response)
}

/// The Prometheus text format, with the content type Prometheus expects of it.
fn metrics(node: &Node) -> Response<Body> {
    let mut r = text(StatusCode::OK, node.render_metrics());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

fn readyz(node: &Node) -> Response<Body> {
    if node.is_ready() {
        json(StatusCode::OK, &serde_json::json!({"ready": true}))
    } else {
        let reason = if node.is_draining() { "draining" } else { "engine unavailable" };
        json(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({"ready": false, "reason": reason}))
    }
}

/// Answers a CORS preflight for an allowed origin.
fn preflight<B>(node: &Node, req: &Request<B>) -> Response<Body> {
    match allowed_origin(node.config(), req, false) {
        Ok(Some(origin)) => {
            let mut r = empty(StatusCode::NO_CONTENT);
            let h = r.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type, last-event-id"),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
            h.insert(header::VARY, HeaderValue::from_static("origin"));
            r
        }
        Ok(None) => empty(StatusCode::NO_CONTENT),
        Err(e) => e.into_response(),
    }
}
