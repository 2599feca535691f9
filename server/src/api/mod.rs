//! The two HTTP APIs: `server` for backends (`/api/*`, docs/HTTP-API.md) and `admin` for
//! operators and pushctl (`/admin/*`, docs/ADMIN-API.md). What they share lives here: the bearer
//! key check and reading a JSON body. They reach the cluster through the node, never a socket.

pub mod admin;
pub mod server;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::de::DeserializeOwned;

use crate::auth::keys_match;
use crate::http::{self, HttpError};
use crate::node::Node;
use crate::protocol::ErrorCode;

/// Checks `Authorization: Bearer <key>` against `expected`, in time independent of where they
/// differ. `name` and `env` make the answer say which key is missing or wrong.
fn check_key<B>(req: &Request<B>, expected: &str, name: &str, env: &str) -> Result<(), HttpError> {
    match http::bearer(req) {
        Some(given) if keys_match(given.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(HttpError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, format!("wrong {name} key"))),
        None => {
            let msg = format!("missing {name} key: send Authorization: Bearer <{env}>");
            Err(HttpError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, msg))
        }
    }
}

/// Reads and parses a JSON body, refusing bodies over the payload limit plus envelope room, and
/// bodies that do not arrive within `--request-timeout` (a client trickling bytes must not hold
/// the connection and its buffer forever).
async fn read_json<T: DeserializeOwned>(node: &Node, req: Request<Incoming>) -> Result<T, HttpError> {
    let limit = node.config().max_payload + 16 * 1024 + node.config().max_channels * 140;
    let read = tokio::time::timeout(node.config().request_timeout, Limited::new(req.into_body(), limit).collect());
    let Ok(read) = read.await else {
        let msg = "the request body did not arrive within --request-timeout";
        return Err(HttpError::new(StatusCode::REQUEST_TIMEOUT, ErrorCode::BadRequest, msg));
    };
    let body: Bytes = match read {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let msg = format!("request body is larger than {limit} bytes (--max-payload)");
            return Err(HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge, msg));
        }
        Err(e) => return Err(HttpError::bad_request(format!("could not read the request body: {e}"))),
    };
    serde_json::from_slice(&body).map_err(|e| HttpError::bad_request(format!("malformed JSON body: {e}")))
}
