//! The browser files built into the binary: the JavaScript client at `/client.js` (every node,
//! so a page needs nothing but a node to get a client that matches it) and the demo chat at
//! `/demo` (dev mode only: it publishes from the socket, which only dev mode allows everyone).
//! Their sources live in `clients/js/`, where npm packages the same client.

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use crate::http::{Body, empty, full};

/// One file served as it was built in, with a validator so browsers revalidate cheaply.
pub struct Asset {
    body: &'static str,
    content_type: &'static str,
    /// A hash of the content, computed at build time: the `ETag`.
    hash: u64,
}

/// The client module, `clients/js/pushd.js`.
pub static CLIENT: Asset = Asset::new(include_str!("../../clients/js/pushd.js"), "text/javascript; charset=utf-8");

/// The demo page, `clients/js/demo/index.html`.
pub static DEMO: Asset = Asset::new(include_str!("../../clients/js/demo/index.html"), "text/html; charset=utf-8");

impl Asset {
    const fn new(body: &'static str, content_type: &'static str) -> Self {
        Self { body, content_type, hash: fnv1a(body.as_bytes()) }
    }

    /// The file, or 304 when the request's `If-None-Match` names this build of it. `no-cache`:
    /// a browser may keep it but asks each time, so a node upgrade reaches pages at once. Any
    /// page may load it (`Access-Control-Allow-Origin: *`): a module script from another
    /// origin needs that, and the files hold nothing private.
    pub fn respond(&self, request: &HeaderMap) -> Response<Body> {
        let etag = HeaderValue::from_str(&format!("\"{:016x}\"", self.hash)).expect("hex is a valid header value");
        let fresh = request.get(header::IF_NONE_MATCH).is_some_and(|v| v == etag);
        let mut r = if fresh { empty(StatusCode::NOT_MODIFIED) } else { Response::new(full(self.body)) };
        let h = r.headers_mut();
        if !fresh {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        }
        h.insert(header::ETAG, etag);
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        r
    }
}

/// FNV-1a, 64 bits: a strong validator that changes when the file does.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let mut i = 0;
    while i < bytes.len() {
        hash = (hash ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_naming_the_current_etag_gets_304_and_any_other_the_file() {
        let first = CLIENT.respond(&HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        let tag = first.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, tag);
        assert_eq!(CLIENT.respond(&again).status(), StatusCode::NOT_MODIFIED);
        again.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"0000000000000000\""));
        assert_eq!(CLIENT.respond(&again).status(), StatusCode::OK);
        assert_ne!(
            CLIENT.respond(&HeaderMap::new()).headers()[header::ETAG],
            DEMO.respond(&HeaderMap::new()).headers()[header::ETAG]
        );
    }
}
