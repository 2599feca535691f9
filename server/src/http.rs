//! What every HTTP handler shares: the body type, JSON answers and errors (`HttpError`), the
//! origin policy as an answer, bearer tokens and query strings. Handlers (`ws`, `sse`, `api`)
//! use this; it knows none of them, and no route: the route table is `router.rs`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::admission::Refusal;
use crate::config::Config;
use crate::origin;
use crate::protocol::{CommandError, ErrorCode};

/// The body type of every response: buffered JSON or a streaming SSE body.
pub type Body = BoxBody<Bytes, Infallible>;

/// A refused request: the status and the `{"error":{..}}` body.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub error: CommandError,
    /// Seconds for a `Retry-After` header (429s).
    pub retry_after: Option<u64>,
}

impl HttpError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self { status, error: CommandError::new(code, message), retry_after: None }
    }

    /// 429 for a client over a rate, with how long to wait.
    pub fn rate_limited(message: impl Into<String>, wait: std::time::Duration) -> Self {
        let retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        Self { retry_after, ..Self::new(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, message) }
    }

    /// 405 for a known path asked with the wrong method.
    pub fn wrong_method(method: &Method, path: &str, allowed: &str) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::BadRequest, format!("{method} {path}: use {allowed}"))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub fn into_response(self) -> Response<Body> {
        let mut r = json(self.status, &serde_json::json!({ "error": self.error }));
        if let Some(secs) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

impl From<Refusal> for HttpError {
    /// A connection the node cannot take now: 503, try another node; or 429, close one first.
    fn from(refusal: Refusal) -> Self {
        if refusal.elsewhere() {
            Self::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, refusal.message())
        } else {
            Self::new(StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyConnections, refusal.message())
        }
    }
}

impl From<CommandError> for HttpError {
    /// The HTTP status for each refusal a command can meet.
    fn from(error: CommandError) -> Self {
        let status = match error.code {
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::OutcomeUnknown => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::NotFound | ErrorCode::PresenceDisabled => StatusCode::NOT_FOUND,
            ErrorCode::BadRequest
            | ErrorCode::UnknownOp
            | ErrorCode::BadChannel
            | ErrorCode::AlreadySubscribed
            | ErrorCode::NotSubscribed
            | ErrorCode::TooManyChannels => StatusCode::BAD_REQUEST,
            ErrorCode::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
        };
        Self { status, error, retry_after: None }
    }
}

/// The origin policy (`origin.rs`) as an HTTP answer: `Ok(None)` for requests without an Origin
/// (not browsers), `Ok(Some(origin))` to echo in CORS headers, or 403. `changes` marks requests
/// that change state.
pub fn allowed_origin<B>(config: &Config, req: &Request<B>, changes: bool) -> Result<Option<HeaderValue>, HttpError> {
    origin::check(config, req, changes)
        .map_err(|refused| HttpError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, refused.0))
}

/// Adds CORS headers for an allowed origin.
pub fn with_cors(mut r: Response<Body>, origin: Option<HeaderValue>) -> Response<Body> {
    if let Some(origin) = origin {
        r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        r.headers_mut().insert(header::VARY, HeaderValue::from_static("origin"));
    }
    r
}

/// A `Bearer` token from the Authorization header.
pub fn bearer<B>(req: &Request<B>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The values of query parameter `name`, percent-decoded.
pub fn query_all<B>(req: &Request<B>, name: &str) -> Vec<String> {
    let query = req.uri().query().unwrap_or("");
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| percent_decode(k) == name)
        .map(|(_, v)| percent_decode(v))
        .collect()
}

/// The first value of query parameter `name`.
pub fn query<B>(req: &Request<B>, name: &str) -> Option<String> {
    query_all(req, name).into_iter().next()
}

/// Decodes `%XX` and `+`; invalid escapes are kept as they are, bad UTF-8 is replaced.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("responses always serialise");
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `{"error":{"code":..,"message":..}}` with `status`.
pub fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    HttpError::new(status, code, message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded_and_repeatable() {
        let req = Request::get("/sse?channel=a&channel=room%3A1&token=x+y&bad=%zz&end=%4").body(()).unwrap();
        assert_eq!(query_all(&req, "channel"), vec!["a", "room:1"]);
        assert_eq!(query(&req, "token").as_deref(), Some("x y"));
        assert_eq!(query(&req, "bad").as_deref(), Some("%zz"));
        assert_eq!(query(&req, "end").as_deref(), Some("%4"));
        assert_eq!(query(&req, "none"), None);
    }
}
