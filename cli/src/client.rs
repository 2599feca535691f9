//! HTTP client for a node's `/admin/*` routes: bearer auth, one timeout, and `ClientError`, whose
//! messages say what to do. It knows URLs and status codes, not what the answers mean.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Why a request to the admin API failed; each message ends with what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {server}: is pushd running? set --server or PUSHCTL_SERVER ({reason})")]
    Unreachable { server: String, reason: String },
    #[error("no answer from {server} within {secs}s: raise --timeout")]
    Timeout { server: String, secs: u64 },
    #[error("request to {server} failed: {reason}")]
    Transport { server: String, reason: String },
    #[error("401 from the server: {message}: set --admin-key or PUSHD_ADMIN_KEY to the node's admin key")]
    Unauthorized { message: String },
    #[error("403 from the server: {message}")]
    Forbidden { message: String },
    #[error("404 from the server: {message}: is {server} a pushd node with the admin API?")]
    NotFound { server: String, message: String },
    #[error("{status} from the server: {code}: {message}")]
    Server { status: u16, code: String, message: String },
    #[error("{status} from {server} is not a pushd answer ({snippet:?}): does --server point at a pushd node?")]
    NotPushd { server: String, status: u16, snippet: String },
    #[error("unexpected answer from {path}: {source}: are pushctl and pushd the same version?")]
    Decode { path: String, source: serde_json::Error },
}

/// A decoded answer plus the server's JSON text as it came (for `--json`).
#[derive(Debug)]
pub struct Fetched<T> {
    pub body: T,
    pub raw: String,
}

/// Talks to one node; the node surveys the rest of the cluster.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    admin_key: Option<String>,
    timeout: Duration,
}

/// The `{"error":{"code","message"}}` body every pushd error carries.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl Client {
    /// A client for `base` that gives up after `timeout_s` seconds.
    pub fn new(base: Url, admin_key: Option<String>, timeout_s: u64) -> Result<Self, ClientError> {
        let timeout = Duration::from_secs(timeout_s);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("pushctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Transport { server: base.to_string(), reason: root_cause(&e) })?;
        Ok(Client { http, base, admin_key, timeout })
    }

    /// How long the node may wait for the other nodes: half a second less than we wait for it,
    /// so a slow node shows up in `missing` instead of as a timeout here. The server's cap is 10 s.
    pub fn survey_timeout_ms(&self) -> u64 {
        (self.timeout.as_millis() as u64).saturating_sub(500).clamp(100, 10_000)
    }

    /// `GET /<segments>?<query>`; `survey` adds `timeout_ms` for cluster-wide routes.
    pub async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        survey: bool,
    ) -> Result<Fetched<T>, ClientError> {
        let url = self.url(segments, query, survey);
        self.send(self.http.request(Method::GET, url.clone()), &url).await
    }

    /// `POST /<segments>` with a JSON body; `survey` adds `timeout_ms` for cluster-wide routes.
    pub async fn post<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &impl serde::Serialize,
        survey: bool,
    ) -> Result<Fetched<T>, ClientError> {
        let url = self.url(segments, &[], survey);
        self.send(self.http.request(Method::POST, url.clone()).json(body), &url).await
    }

    /// Builds the URL; each segment is percent-encoded on its own, so a channel `a/b` stays one.
    fn url(&self, segments: &[&str], query: &[(&str, String)], survey: bool) -> Url {
        let mut url = self.base.clone();
        url.set_query(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        let timeout_ms = survey.then(|| self.survey_timeout_ms().to_string());
        let pairs = query.iter().map(|(k, v)| (*k, v.as_str())).chain(timeout_ms.as_deref().map(|t| ("timeout_ms", t)));
        let mut pairs = pairs.peekable();
        if pairs.peek().is_some() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        url
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &Url,
    ) -> Result<Fetched<T>, ClientError> {
        let request = match &self.admin_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.transport_error(&e))?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !status.is_success() {
            return Err(self.status_error(status, &text));
        }
        let body =
            serde_json::from_str(&text).map_err(|source| match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(_) => ClientError::Decode { path: url.path().to_string(), source },
                Err(_) => {
                    ClientError::NotPushd { server: self.server(), status: status.as_u16(), snippet: snippet(&text) }
                }
            })?;
        Ok(Fetched { body, raw: text })
    }

    fn status_error(&self, status: StatusCode, text: &str) -> ClientError {
        let Ok(ErrorBody { error }) = serde_json::from_str::<ErrorBody>(text) else {
            return ClientError::NotPushd { server: self.server(), status: status.as_u16(), snippet: snippet(text) };
        };
        match status {
            StatusCode::UNAUTHORIZED => ClientError::Unauthorized { message: error.message },
            StatusCode::FORBIDDEN => ClientError::Forbidden { message: error.message },
            StatusCode::NOT_FOUND if error.code == "not_found" => {
                ClientError::NotFound { server: self.server(), message: error.message }
            }
            _ => ClientError::Server { status: status.as_u16(), code: error.code, message: error.message },
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> ClientError {
        let server = self.server();
        if e.is_timeout() {
            ClientError::Timeout { server, secs: self.timeout.as_secs() }
        } else if e.is_connect() {
            ClientError::Unreachable { server, reason: root_cause(e) }
        } else {
            ClientError::Transport { server, reason: root_cause(e) }
        }
    }

    /// The base URL as the operator typed it, without a trailing slash.
    fn server(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }
}

/// The innermost error in the chain, e.g. "Connection refused (os error 111)": reqwest's outer
/// layers repeat the URL and say "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The first line of a body, cut to 60 characters, for error messages.
fn snippet(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    match line.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str, timeout_s: u64) -> Client {
        Client::new(Url::parse(base).unwrap(), Some("k".into()), timeout_s).unwrap()
    }

    #[test]
    fn survey_timeout_is_half_a_second_under_ours_and_capped() {
        assert_eq!(client("http://h:1", 3).survey_timeout_ms(), 2500);
        assert_eq!(client("http://h:1", 1).survey_timeout_ms(), 500);
        assert_eq!(client("http://h:1", 60).survey_timeout_ms(), 10_000);
    }

    #[test]
    fn urls_encode_each_segment_and_add_timeout_only_for_surveys() {
        let c = client("http://h:1", 3);
        let url = c.url(&["admin", "channels", "a/b c"], &[], true);
        assert_eq!(url.as_str(), "http://h:1/admin/channels/a%2Fb%20c?timeout_ms=2500");
        let url = c.url(&["admin", "nodes"], &[], false);
        assert_eq!(url.as_str(), "http://h:1/admin/nodes");
        let url = c.url(&["admin", "channels"], &[("pattern", "room:*".into())], true);
        assert_eq!(url.as_str(), "http://h:1/admin/channels?pattern=room%3A*&timeout_ms=2500");
        let behind_proxy = client("http://h:1/pushd/", 3);
        assert_eq!(behind_proxy.url(&["admin", "nodes"], &[], false).as_str(), "http://h:1/pushd/admin/nodes");
    }

    #[test]
    fn error_bodies_map_to_actionable_errors() {
        let c = client("http://h:1/", 3);
        let body = r#"{"error":{"code":"unauthorized","message":"wrong admin key"}}"#;
        let e = c.status_error(StatusCode::UNAUTHORIZED, body);
        assert!(e.to_string().contains("set --admin-key or PUSHD_ADMIN_KEY"));
        let body = r#"{"error":{"code":"unavailable","message":"history store down: retry"}}"#;
        let e = c.status_error(StatusCode::SERVICE_UNAVAILABLE, body);
        assert_eq!(e.to_string(), "503 from the server: unavailable: history store down: retry");
        let e = c.status_error(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>");
        assert_eq!(
            e.to_string(),
            "502 from http://h:1 is not a pushd answer (\"<html>bad gateway</html>\"): \
             does --server point at a pushd node?"
        );
    }
}
