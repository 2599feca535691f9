//! Test harness for pushd: in-process nodes on ephemeral ports, the real `pushd` binary for
//! signal tests, WebSocket/SSE/HTTP clients that await the frames they mean.
//!
//! ```ignore
//! let node = TestNode::start(secure_config()).await;
//! let mut alice = node.ws(&token("alice")).await;
//! let reply = alice.subscribe("room:1", None).await;
//! ```

pub mod backends;
pub mod deploy;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use pushd::Config;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The token secret test nodes use.
pub const SECRET: &str = "pushd-test-secret-0123456789";
/// The API key test nodes use.
pub const API_KEY: &str = "test-api-key";
/// The guard on every awaited event: generous, because it only fires when the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A config with auth on (token secret + API key), everything else at its default.
pub fn secure_config() -> Config {
    Config {
        node_id: "test".into(),
        token_secret: Some(SECRET.into()),
        api_key: Some(API_KEY.into()),
        allowed_origins: pushd::config::Origins::SameHost,
        ..Config::dev()
    }
}

/// Unix seconds now.
pub fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A token for `user` valid for an hour, allowed to subscribe anywhere and publish nowhere.
pub fn token(user: &str) -> String {
    token_with(json!({ "sub": user, "exp": now_s() + 3600 }))
}

/// A token with these exact claims, signed with `SECRET`.
pub fn token_with(claims: Value) -> String {
    sign(claims, SECRET)
}

/// A token signed with `secret`.
pub fn sign(claims: Value, secret: &str) -> String {
    encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

/// Awaits `fut` under the test guard, panicking with `what` if it does not finish.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A node running in this process on 127.0.0.1 with an ephemeral port.
pub struct TestNode {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    http: reqwest::Client,
}

impl TestNode {
    pub async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(pushd::run(listener, config, async {
            let _ = rx.await;
        }));
        Self { addr, shutdown: Some(tx), task: Some(task), http: reqwest::Client::new() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Opens `/ws?token=<token>`, waits for the welcome frame.
    pub async fn ws(&self, token: &str) -> WsClient {
        let mut c = self.ws_raw(&format!("token={token}")).await;
        let welcome = c.next().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        c.welcome = welcome;
        c
    }

    /// Opens `/ws?<query>` without waiting for anything.
    pub async fn ws_raw(&self, query: &str) -> WsClient {
        WsClient::connect(self.addr, query).await
    }

    /// `POST /api/<path>` with the test API key; returns status and JSON body.
    pub async fn api_post(&self, path: &str, body: Value) -> (u16, Value) {
        let req = self.http.post(self.url(path)).bearer_auth(API_KEY).json(&body);
        response(req).await
    }

    /// `GET /api/<path>` with the test API key.
    pub async fn api_get(&self, path: &str) -> (u16, Value) {
        response(self.http.get(self.url(path)).bearer_auth(API_KEY)).await
    }

    /// `GET /api/<path>` with the test API key; the body as the exact text the node sent, for
    /// byte-for-byte checks that parsing into a `Value` would normalise away.
    pub async fn api_get_text(&self, path: &str) -> (u16, String) {
        let resp = within("HTTP response", self.http.get(self.url(path)).bearer_auth(API_KEY).send()).await.unwrap();
        let status = resp.status().as_u16();
        (status, within("HTTP body", resp.text()).await.unwrap())
    }

    /// Sends `method path` with `body` exactly as given, and `Authorization: Bearer <key>` only
    /// when `key` is given: for requests `api_post` never sends (no key, a wrong key, a body
    /// that is not JSON). Returns status and JSON body.
    pub async fn api_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).body(body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        response(req).await
    }

    /// Tries `/ws?<query>` without waiting for anything; `Err` carries what the server answered
    /// instead of upgrading (`tungstenite::Error::Http` holds the response).
    pub async fn try_ws(&self, query: &str) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        WsClient::try_connect(self.addr, query).await
    }

    /// Publishes through `/api/publish`, asserting success; returns the offset.
    pub async fn publish(&self, channel: &str, data: Value) -> u64 {
        let (status, body) = self.api_post("/api/publish", json!({ "channel": channel, "data": data })).await;
        assert_eq!(status, 200, "{body}");
        body["offset"].as_u64().unwrap()
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        let resp = within("metrics", self.http.get(self.url("/metrics")).send()).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.text().await.unwrap()
    }

    /// The value of one series on `/metrics`: its whole name with labels as Prometheus prints
    /// them, e.g. `pushd_subscriptions{transport="sse"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        let line = text.lines().find(|l| l.starts_with(&format!("{series} "))).unwrap_or_else(|| panic!("no {series}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Opens a raw HTTP/1.1 SSE stream.
    pub async fn sse(&self, path_and_query: &str, last_event_id: Option<&str>) -> SseClient {
        SseClient::open(self.addr, path_and_query, last_event_id).await
    }

    /// Starts the drain (as SIGTERM would) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            tx.send(()).ok();
        }
    }

    /// Stops the node (as SIGTERM would) and fails the test if it errored or panicked.
    pub async fn stop(mut self) {
        self.begin_stop();
        let task = self.task.take().unwrap();
        within("node shutdown", task).await.expect("node task panicked").expect("node failed");
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn response(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = within("HTTP response", req.send()).await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A WebSocket client that keeps frames it was not waiting for.
pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    pending: Vec<Value>,
    pub welcome: Value,
}

/// How a WebSocket ended.
#[derive(Debug, PartialEq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl WsClient {
    /// Opens `ws://<addr>/ws?<query>` without waiting for anything.
    pub async fn connect(addr: SocketAddr, query: &str) -> WsClient {
        let url = format!("ws://{addr}/ws?{query}");
        let (stream, _) = within("websocket connect", tokio_tungstenite::connect_async(url)).await.unwrap();
        WsClient { stream, next_id: 1, pending: Vec::new(), welcome: Value::Null }
    }

    /// Tries `ws://<addr>/ws?<query>`; `Err` carries what the server answered instead.
    pub async fn try_connect(addr: SocketAddr, query: &str) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        Self::try_connect_with(addr, query, &[]).await
    }

    /// `try_connect` with extra request headers (an `Origin`, an `X-Forwarded-For`).
    pub async fn try_connect_with(
        addr: SocketAddr,
        query: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{addr}/ws?{query}").into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().append(*name, value.parse().expect("a valid header value"));
        }
        let (stream, _) = within("websocket connect", tokio_tungstenite::connect_async(request)).await?;
        Ok(WsClient { stream, next_id: 1, pending: Vec::new(), welcome: Value::Null })
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::Text(text.into())).await.unwrap();
    }

    pub async fn send_message(&mut self, msg: Message) {
        self.stream.send(msg).await.unwrap();
    }

    /// Sends `cmd` with a fresh id and returns its reply; other frames stay queued.
    pub async fn command(&mut self, mut cmd: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = id.into();
        self.send_text(&cmd.to_string()).await;
        within(&format!("reply to {cmd}"), async {
            loop {
                let frame = self.read().await.unwrap_or_else(|c| panic!("closed {c:?} before reply to {cmd}"));
                if frame["type"] == "reply" && frame["id"] == id {
                    return frame;
                }
                self.pending.push(frame);
            }
        })
        .await
    }

    /// Sends `text` as it is (a command whose `id` is `1` or more) and returns the reply with
    /// the id found in it: for commands a `Value` cannot hold, like data nested deeper than
    /// serde_json parses.
    pub async fn send_raw_command(&mut self, text: &str) -> Value {
        let id: u64 = text
            .split_once(r#""id":"#)
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .expect("the command has a numeric id");
        self.send_text(text).await;
        within(&format!("reply to command {id}"), async {
            loop {
                let frame = self.read().await.unwrap_or_else(|c| panic!("closed {c:?} before reply to {id}"));
                if frame["type"] == "reply" && frame["id"] == id {
                    return frame;
                }
                self.pending.push(frame);
            }
        })
        .await
    }

    /// Writes `bytes` straight to the TCP stream, under the WebSocket framing: for frames no
    /// well-behaved client sends.
    pub async fn send_raw_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        match self.stream.get_mut() {
            MaybeTlsStream::Plain(tcp) => tcp.write_all(bytes).await.unwrap(),
            _ => panic!("test clients use plain TCP"),
        }
    }

    /// Subscribes; `since` is (epoch, offset).
    pub async fn subscribe(&mut self, channel: &str, since: Option<(&str, u64)>) -> Value {
        let mut cmd = json!({ "op": "subscribe", "channel": channel });
        if let Some((epoch, offset)) = since {
            cmd["since"] = json!({ "epoch": epoch, "offset": offset });
        }
        self.command(cmd).await
    }

    /// Whether no frame is waiting that the test has not looked at.
    pub fn pending_is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The next server frame (queued ones first).
    pub async fn next(&mut self) -> Value {
        if !self.pending.is_empty() {
            return self.pending.remove(0);
        }
        within("next frame", self.read()).await.unwrap_or_else(|c| panic!("closed {c:?} while waiting for a frame"))
    }

    /// The next `n` frames of type `message`, skipping nothing else silently: any other frame
    /// type in between fails the test.
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let frame = self.next().await;
            assert_eq!(frame["type"], "message", "expected a message, got {frame}");
            out.push(frame);
        }
        out
    }

    /// The next server frame (queued ones first), or how the socket ended: for reading what
    /// was buffered before a close and then the close itself.
    pub async fn next_or_closed(&mut self) -> Result<Value, Closed> {
        if !self.pending.is_empty() {
            return Ok(self.pending.remove(0));
        }
        within("next frame or close", self.read()).await
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn closed(&mut self) -> Closed {
        within("close", async {
            loop {
                if let Err(closed) = self.read().await {
                    return closed;
                }
            }
        })
        .await
    }

    /// After `closed()`: reads on until the server drops the connection, which sends the close
    /// reply tungstenite queued when the close frame came: the close handshake a browser
    /// completes. (`closed()` alone leaves the reply unsent, like a client that stopped reading.)
    pub async fn finish_close(&mut self) {
        within("the server to drop the connection", async { while let Some(Ok(_)) = self.stream.next().await {} })
            .await;
    }

    /// The next server frame as the exact text the server sent. Frames already queued were
    /// parsed and lost their text, so there must be none.
    pub async fn next_text(&mut self) -> String {
        assert!(self.pending.is_empty(), "frames already queued as JSON: {:?}", self.pending);
        within("next text frame", async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Text(t))) => return t.to_string(),
                    Some(Ok(Message::Close(frame))) => panic!("closed {:?} while waiting for a frame", close_of(frame)),
                    Some(Ok(_)) => continue,
                    other => panic!("socket ended while waiting for a frame: {other:?}"),
                }
            }
        })
        .await
    }

    /// One frame, or how the socket ended.
    async fn read(&mut self) -> Result<Value, Closed> {
        loop {
            match self.stream.next().await {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(frame))) => return Err(close_of(frame)),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Closed { code: 1006, reason: e.to_string() }),
                None => return Err(Closed { code: 1006, reason: "stream ended".into() }),
            }
        }
    }
}

fn close_of(frame: Option<CloseFrame>) -> Closed {
    frame.map_or(Closed { code: 1005, reason: String::new() }, |f| Closed {
        code: u16::from(f.code),
        reason: f.reason.to_string(),
    })
}

/// One parsed server-sent event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// A raw HTTP/1.1 SSE reader over a plain TCP socket, as a non-browser client would use.
pub struct SseClient {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    chunk_left: usize,
    buf: String,
}

impl SseClient {
    pub async fn open(addr: SocketAddr, path_and_query: &str, last_event_id: Option<&str>) -> SseClient {
        let mut stream = within("SSE connect", TcpStream::connect(addr)).await.unwrap();
        let mut req = format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        within("SSE status", reader.read_line(&mut status_line)).await.unwrap();
        let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            within("SSE headers", reader.read_line(&mut line)).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        SseClient { status, headers, reader, chunk_left: 0, buf: String::new() }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The whole body of a non-streaming (error) response, as JSON.
    pub async fn body_json(&mut self) -> Value {
        let len: usize = self.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        within("body", self.reader.read_exact(&mut body)).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// The next event (comments and `retry:` lines skipped); `None` when the stream ends.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        within("SSE event", async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    if let Some(event) = parse_event(&block) {
                        return Some(event);
                    }
                    continue;
                }
                let chunk = self.read_chunk().await?;
                self.buf.push_str(&chunk);
            }
        })
        .await
    }

    /// The next raw block up to its blank line (an event, a `retry:` line or a `: comment`
    /// heartbeat), without its trailing blank line; `None` when the stream ends.
    pub async fn next_block(&mut self) -> Option<String> {
        within("SSE block", async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    return Some(block[..end].to_owned());
                }
                let chunk = self.read_chunk().await?;
                self.buf.push_str(&chunk);
            }
        })
        .await
    }

    /// The next event of type `message`; others are skipped only if they are heartbeats.
    pub async fn next_message(&mut self) -> SseEvent {
        let event = self.next_event().await.expect("stream ended before a message");
        assert_eq!(event.event, "message", "expected a message, got {event:?}");
        event
    }

    /// Reads the next piece of the chunked body.
    async fn read_chunk(&mut self) -> Option<String> {
        if self.chunk_left == 0 {
            let mut size_line = String::new();
            if self.reader.read_line(&mut size_line).await.ok()? == 0 {
                return None;
            }
            let size_line = size_line.trim();
            if size_line.is_empty() {
                return Some(String::new());
            }
            self.chunk_left = usize::from_str_radix(size_line, 16).ok()?;
            if self.chunk_left == 0 {
                return None;
            }
        }
        let mut data = vec![0; self.chunk_left];
        self.reader.read_exact(&mut data).await.ok()?;
        self.chunk_left = 0;
        let mut crlf = [0; 2];
        self.reader.read_exact(&mut crlf).await.ok()?;
        Some(String::from_utf8(data).unwrap())
    }
}

fn parse_event(block: &str) -> Option<SseEvent> {
    let mut event = SseEvent { event: "message".into(), ..SseEvent::default() };
    let mut data = None;
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            event.id = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("event: ") {
            event.event = v.to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(serde_json::from_str(v).unwrap());
        }
    }
    data.map(|d| SseEvent { data: d, ..event })
}

/// The `pushd` binary next to this test binary (built by the test command before the tests).
pub fn pushd_bin() -> PathBuf {
    workspace_bin("pushd")
}

/// The `pushctl` binary next to this test binary (built by the test command before the tests).
pub fn pushctl_bin() -> PathBuf {
    workspace_bin("pushctl")
}

/// The `pushload` binary next to this test binary (built by the test command before the tests).
pub fn pushload_bin() -> PathBuf {
    workspace_bin("pushload")
}

fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(bin.exists(), "{} is missing: run `cargo build -p {name}` first (the test script does)", bin.display());
    bin
}

/// What one `pushctl` run left behind.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the real `pushctl` with `args` and exactly the `env` given of the variables it reads
/// (`PUSHCTL_SERVER`, `PUSHD_ADMIN_KEY`: whatever the test runner's environment holds is
/// removed), under the test guard, on tokio's process API so the runtime keeps serving the
/// test's sockets meanwhile. Returns its exit code, stdout and stderr.
pub async fn pushctl(args: &[&str], env: &[(&str, &str)]) -> CtlOutput {
    let mut cmd = tokio::process::Command::new(pushctl_bin());
    cmd.args(args)
        .env_remove("PUSHCTL_SERVER")
        .env_remove("PUSHD_ADMIN_KEY")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = within(&format!("pushctl {}", args.join(" ")), cmd.output()).await.unwrap();
    let code = out.status.code().unwrap_or_else(|| panic!("pushctl {args:?} died by a signal: {}", out.status));
    CtlOutput {
        code,
        stdout: String::from_utf8(out.stdout).expect("pushctl writes UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("pushctl writes UTF-8"),
    }
}

/// The real `pushd` binary as a child process, killed on drop.
pub struct PushdProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// The `--admin-listen` address, when given.
    pub admin: Option<SocketAddr>,
}

impl PushdProcess {
    /// Starts `pushd` with `args` on an ephemeral loopback port and waits for the log line that
    /// says where it listens (an event, not a sleep).
    pub async fn start(args: &[&str]) -> Self {
        let mut command = tokio::process::Command::new(pushd_bin());
        command.args(["--listen", "127.0.0.1:0", "--log-format", "json"]).args(args);
        Self::start_with(&mut command).await
    }

    /// Runs `command`, which must start pushd with `--log-format json` (directly, or through a
    /// shell that `exec`s it), and waits for its listening line.
    pub async fn start_with(command: &mut tokio::process::Command) -> Self {
        let mut child = command.stderr(Stdio::piped()).stdout(Stdio::null()).kill_on_drop(true).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let (addr, admin) = within("pushd to listen", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let Ok(log) = serde_json::from_str::<Value>(&line) else { continue };
                if log["message"] == "pushd listening" {
                    let addr = log["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    return (addr, log["admin_addr"].as_str().map(|a| a.parse::<SocketAddr>().unwrap()));
                }
            }
            panic!("pushd exited before listening");
        })
        .await;
        // Keep draining stderr so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr, admin }
    }

    /// Sends SIGTERM (the drain starts) without waiting for the exit.
    pub async fn terminate(&self) {
        let pid = self.child.id().expect("pushd is running").to_string();
        let kill = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        assert!(kill.success(), "kill -TERM {pid}: {kill}");
    }

    /// Opens `/ws?<query>` on the process and waits for the welcome frame.
    pub async fn ws(&self, query: &str) -> WsClient {
        let mut c = WsClient::connect(self.addr, query).await;
        let welcome = c.next().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        c.welcome = welcome;
        c
    }
}

/// A real `redis-server` on a free loopback port, killed on drop. `restart()` keeps the port.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    aof: bool,
    /// Extra `redis-server` arguments (cluster mode, replication).
    extra: Vec<String>,
    /// Serve TLS only, with the certificates in this directory (see `backends::Certificates`).
    tls: Option<PathBuf>,
    /// Run as a Sentinel with this config file (Sentinel rewrites it).
    sentinel: Option<PathBuf>,
    child: Option<tokio::process::Child>,
}

impl RedisServer {
    /// A throwaway Redis without persistence.
    pub async fn start() -> Self {
        Self::launch(false, Vec::new(), None).await
    }

    /// A Redis that writes every command to its AOF before answering (`appendfsync always`), so a
    /// restart keeps everything it acknowledged.
    pub async fn start_with_aof() -> Self {
        Self::launch(true, Vec::new(), None).await
    }

    /// A Redis started with `extra` arguments, serving TLS with the certificates in `tls` if given.
    pub async fn launch(aof: bool, extra: Vec<String>, tls: Option<PathBuf>) -> Self {
        let dir = std::env::temp_dir().join(format!("pushd-redis-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).unwrap();
        // A cluster node also listens on its port + 10000 (the cluster bus).
        let bus = extra.iter().any(|a| a == "--cluster-enabled");
        for _ in 0..5 {
            let port = if bus { free_port_with_bus() } else { free_port() };
            let mut server = Self {
                port,
                dir: dir.clone(),
                aof,
                extra: extra.clone(),
                tls: tls.clone(),
                sentinel: None,
                child: None,
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!("could not start redis-server on a free port (is redis-server installed? the test script installs it)");
    }

    /// A Sentinel on `port` with the config file `conf` (its directory is the Sentinel's own).
    pub async fn sentinel(port: u16, conf: PathBuf) -> Self {
        let dir = conf.parent().unwrap().to_owned();
        let mut server =
            Self { port, dir, aof: false, extra: Vec::new(), tls: None, sentinel: Some(conf), child: None };
        assert!(server.spawn().await, "sentinel could not start on port {port}");
        server
    }

    /// Starts the process on `self.port`; false if the port was taken meanwhile.
    async fn spawn(&mut self) -> bool {
        let mut cmd = tokio::process::Command::new("redis-server");
        if let Some(conf) = &self.sentinel {
            cmd.arg(conf).args(["--sentinel", "--port", &self.port.to_string()]);
        }
        match &self.tls {
            Some(certs) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(certs.join("redis.crt"))
                    .arg("--tls-key-file")
                    .arg(certs.join("redis.key"))
                    .arg("--tls-ca-cert-file")
                    .arg(certs.join("ca.crt"));
            }
            None if self.sentinel.is_some() => {}
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        if self.sentinel.is_none() {
            cmd.args(["--bind", "127.0.0.1", "--save", ""]).arg("--dir").arg(&self.dir).args([
                "--appendonly",
                if self.aof { "yes" } else { "no" },
                "--appendfsync",
                "always",
            ]);
        }
        cmd.args(&self.extra).stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true);
        let mut child = cmd.spawn().expect("redis-server not found: install it (apt-get install redis-server)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = within("redis-server to start", async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Ready to accept connections") || line.contains("+monitor master") {
                    return true;
                }
                if line.contains("Address already in use") {
                    return false;
                }
            }
            false
        })
        .await;
        if ready {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            self.child = Some(child);
        }
        ready
    }

    /// The URL a node connects with (`rediss://localhost` with TLS: the certificate's name).
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Kills the server (SIGKILL: no goodbye, like a crash) and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Starts it again on the same port, with whatever its AOF kept (nothing without AOF).
    pub async fn restart(&mut self) {
        self.kill().await;
        for _ in 0..50 {
            if self.spawn().await {
                return;
            }
            // The old socket may linger for a moment; this retry is bounded by the guard.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis-server did not come back on port {}", self.port);
    }

    /// Runs one command with `redis-cli` and returns its raw output.
    pub async fn cli(&self, args: &[&str]) -> String {
        let mut cli = tokio::process::Command::new("redis-cli");
        cli.args(["-p", &self.port.to_string()]);
        if let Some(certs) = &self.tls {
            cli.arg("--tls").arg("--cacert").arg(certs.join("ca.crt"));
        }
        let out = within("redis-cli", cli.args(args).output()).await.expect("redis-cli not found: install redis-tools");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the process is running (not killed by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free port whose cluster bus port (+10000) is free too; after a load test filled the
/// ephemeral range with TIME_WAIT sockets, a plain free port's bus port often is not.
fn free_port_with_bus() -> u16 {
    loop {
        let port = free_port();
        let bus_free =
            port.checked_add(10_000).is_some_and(|bus| std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok());
        if bus_free {
            return port;
        }
    }
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// `secure_config()` on the Redis engine at `redis`, named `node_id`.
pub fn redis_config(redis: &RedisServer, node_id: &str) -> Config {
    Config { node_id: node_id.into(), redis_url: Some(redis.url()), ..secure_config() }
}

/// `n` in-process nodes sharing `redis`, named n0, n1, ...
pub async fn cluster(n: usize, redis: &RedisServer) -> Vec<TestNode> {
    cluster_with(n, redis, |c| c).await
}

/// `n` nodes sharing `redis`, each config passed through `tweak`.
pub async fn cluster_with(n: usize, redis: &RedisServer, tweak: impl Fn(Config) -> Config) -> Vec<TestNode> {
    start_nodes(n, |id| tweak(redis_config(redis, id))).await
}

/// `n` in-process nodes named n0, n1, ..., each started with `config(its id)`.
async fn start_nodes(n: usize, config: impl Fn(&str) -> Config) -> Vec<TestNode> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        nodes.push(TestNode::start(config(&format!("n{i}"))).await);
    }
    nodes
}

/// `n` in-process nodes on `backend`, named n0, n1, ..., each config passed through `tweak`.
pub async fn nodes_on(n: usize, backend: &backends::Backend, tweak: impl Fn(Config) -> Config) -> Vec<TestNode> {
    start_nodes(n, |id| tweak(backend.config(id))).await
}

/// HTTP helpers for a real `pushd` process. Processes run in dev mode (no `--api-key`), where
/// `/api/*` is open to loopback callers, so these send no key.
impl PushdProcess {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST <path>` with a JSON body; returns status and JSON body.
    pub async fn api_post(&self, path: &str, body: Value) -> (u16, Value) {
        response(reqwest::Client::new().post(self.url(path)).json(&body)).await
    }

    /// `GET <path>`; returns status and JSON body.
    pub async fn api_get(&self, path: &str) -> (u16, Value) {
        response(reqwest::Client::new().get(self.url(path))).await
    }

    /// Publishes through `/api/publish`, asserting success; returns the offset.
    pub async fn publish(&self, channel: &str, data: Value) -> u64 {
        let (status, body) = self.api_post("/api/publish", json!({ "channel": channel, "data": data })).await;
        assert_eq!(status, 200, "{body}");
        body["offset"].as_u64().unwrap()
    }

    /// SIGKILLs the process (no drain, no goodbye to Redis: a crash) and waits until it is gone.
    pub async fn kill(&mut self) {
        within("pushd to die", self.child.kill()).await.unwrap();
    }
}
