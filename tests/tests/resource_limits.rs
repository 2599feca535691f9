//! What a client can hold before it has authenticated, and for how long: TCP connections per
//! listener, time to send a request, buffer per connection. Each test holds a resource the way
//! an attacker would and shows the node lets go of it and keeps serving everyone else.

use std::time::Duration;

use pushd::Config;
use pushd_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends until it closes the connection (the guard fails the test if it
/// never does).
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    within("the server to close the connection", stream.read_to_end(&mut out)).await.ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends one keep-alive `GET /healthz` and reads its whole answer.
async fn healthz(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: pushd\r\n\r\n").await.unwrap();
    let mut buf = vec![0; 1024];
    let n = within("an answer", stream.read(&mut buf)).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn quick() -> Config {
    Config { request_timeout: Duration::from_secs(1), ..secure_config() }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let node = TestNode::start(quick()).await;
    let mut slow = TcpStream::connect(node.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: pushd\r\nX-Slow: ").await.unwrap();
    read_until_closed(&mut slow).await;
    assert_eq!(node.api_get("/healthz").await.0, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let node = TestNode::start(quick()).await;
    let mut idle = TcpStream::connect(node.addr).await.unwrap();
    assert!(healthz(&mut idle).await.starts_with("HTTP/1.1 200"));
    assert_eq!(read_until_closed(&mut idle).await, "", "closed without another word");
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408() {
    let node = TestNode::start(quick()).await;
    let mut slow = TcpStream::connect(node.addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: pushd\r\nAuthorization: Bearer {API_KEY}\r\ncontent-length: 100\r\n\r\n{{\"chan"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--request-timeout"), "{answer}");
}

#[tokio::test]
async fn a_request_head_bigger_than_16_kib_is_refused_with_431() {
    let node = TestNode::start(secure_config()).await;
    let mut big = TcpStream::connect(node.addr).await.unwrap();
    let head = format!("GET /healthz HTTP/1.1\r\nHost: pushd\r\nX-Big: {}\r\n\r\n", "x".repeat(20 * 1024));
    big.write_all(head.as_bytes()).await.ok();
    let answer = read_until_closed(&mut big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(node.api_get("/healthz").await.0, 200);
}

#[tokio::test]
async fn connections_beyond_the_tcp_limit_get_503_and_are_closed() {
    let node = TestNode::start(Config { max_tcp_connections: 3, ..secure_config() }).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(node.addr).await.unwrap();
        assert!(healthz(&mut c).await.starts_with("HTTP/1.1 200"), "connections within the limit are served");
        held.push(c);
    }
    let mut over = TcpStream::connect(node.addr).await.unwrap();
    let answer = read_until_closed(&mut over).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("--max-tcp-connections"), "the refusal says which limit: {answer}");
    // Closing one frees its place; the node notices a moment later, which no client can see.
    drop(held.pop());
    within("a free place", async {
        loop {
            let mut c = TcpStream::connect(node.addr).await.unwrap();
            if healthz(&mut c).await.starts_with("HTTP/1.1 200") {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_node_out_of_file_descriptors_recovers_when_they_are_freed() {
    // 128 descriptors and a TCP limit above them: accept() itself fails (EMFILE) until
    // connections close. The node must neither die nor spin, and serve again afterwards.
    let script = format!(
        "ulimit -n 128 && exec {} --listen 127.0.0.1:0 --log-format json --max-tcp-connections 1000",
        pushd_bin().display()
    );
    let pushd = PushdProcess::start_with(tokio::process::Command::new("sh").args(["-c", &script])).await;
    let mut hogs = Vec::new();
    for _ in 0..200 {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(pushd.addr)).await {
            hogs.push(c);
        }
    }
    assert!(hogs.len() > 100, "the kernel backlog takes connections the node cannot accept");
    drop(hogs);
    within("the node to serve again", async {
        loop {
            let answer = reqwest::get(format!("http://{}/healthz", pushd.addr)).await;
            if answer.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// The HTTP status a refused upgrade answered with.
fn refused_status(result: Result<WsClient, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the connection was upgraded beyond the limit"),
    }
}

#[tokio::test]
async fn one_user_cannot_take_every_connection() {
    let node = TestNode::start(Config { max_connections_per_user: 2, ..secure_config() }).await;
    let first = node.ws(&token("mallory")).await;
    let _second = node.ws(&token("mallory")).await;
    let query = format!("token={}", token("mallory"));
    assert_eq!(refused_status(node.try_ws(&query).await), 429);
    let mut sse = node.sse(&format!("/sse?channel=a&{query}"), None).await;
    assert_eq!(
        (sse.status, &sse.body_json().await["error"]["code"]),
        (429, &serde_json::json!("too_many_connections"))
    );
    let _alice = node.ws(&token("alice")).await;
    drop(first);
    within("mallory's place to come free", async {
        while node.try_ws(&query).await.is_err() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn one_address_behind_a_trusted_proxy_cannot_take_every_connection() {
    let config = Config {
        max_connections_per_ip: 2,
        trusted_proxies: vec![pushd::client_addr::Cidr::parse("127.0.0.1").unwrap()],
        ..secure_config()
    };
    let node = TestNode::start(config).await;
    let via_proxy = |client: &'static str, user: &str| {
        let query = format!("token={}", token(user));
        async move { WsClient::try_connect_with(node.addr, &query, &[("x-forwarded-for", client)]).await }
    };
    let _a = via_proxy("203.0.113.5", "u1").await.unwrap();
    let _b = via_proxy("203.0.113.5", "u2").await.unwrap();
    assert_eq!(refused_status(via_proxy("203.0.113.5", "u3").await), 429);
    let _c = via_proxy("203.0.113.6", "u3").await.expect("another client behind the proxy");
    // What a client writes into the header itself, left of what the proxy added, is not believed.
    let spoofed = WsClient::try_connect_with(
        node.addr,
        &format!("token={}", token("u4")),
        &[("x-forwarded-for", "198.51.100.1, 203.0.113.5")],
    )
    .await;
    assert_eq!(refused_status(spoofed), 429);
}

#[tokio::test]
async fn channels_subscribed_once_and_left_do_not_pile_up_in_memory() {
    let config = Config { max_idle_channels: 100, rate_limit: 10_000, rate_burst: 10_000, ..secure_config() };
    let node = TestNode::start(config).await;
    let mut churn = node.ws(&token("churn")).await;
    let mut first_epoch = String::new();
    let mut last_epoch = String::new();
    for i in 0..1000 {
        let reply = churn.subscribe(&format!("churn:{i}"), None).await;
        let epoch = reply["epoch"].as_str().unwrap().to_owned();
        (first_epoch, last_epoch) = if i == 0 { (epoch.clone(), epoch) } else { (first_epoch, epoch) };
        assert_eq!(
            churn.command(serde_json::json!({ "op": "unsubscribe", "channel": format!("churn:{i}") })).await["ok"],
            true
        );
    }
    assert!(node.metric("pushd_memory_channels").await <= 100.0, "the memory engine keeps at most 100");
    // The longest unused was forgotten: its position cannot be honoured, and the client is told.
    let reply = churn.subscribe("churn:0", Some((&first_epoch, 0))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    let reply = churn.subscribe("churn:999", Some((&last_epoch, 0))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
}

#[tokio::test]
async fn a_channel_nobody_published_to_keeps_its_redis_key_only_for_the_history_ttl() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(redis_config(&redis, "n0")).await;
    let mut alice = node.ws(&token("alice")).await;
    assert_eq!(alice.subscribe("quiet", None).await["ok"], true);
    let ttl: u64 = redis.cli(&["TTL", "pushd:{quiet}:meta"]).await.trim().parse().unwrap();
    let history_ttl = secure_config().history_ttl.as_secs();
    assert!(ttl > 0 && ttl <= history_ttl, "an empty channel's meta lives {ttl} s");
    node.publish("quiet", serde_json::json!(1)).await;
    let ttl: u64 = redis.cli(&["TTL", "pushd:{quiet}:meta"]).await.trim().parse().unwrap();
    assert!(ttl > history_ttl, "once it holds messages its position lives --history-meta-ttl: {ttl} s");
}

#[tokio::test]
async fn backends_over_the_api_rate_get_429_with_retry_after_and_nothing_is_stored() {
    let node = TestNode::start(Config { api_rate_limit: 5, api_rate_burst: 5, ..secure_config() }).await;
    // Requests without the key do not spend the backend's budget.
    for _ in 0..10 {
        let (status, _) = node.api_raw(reqwest::Method::POST, "/api/publish", Some("wrong"), "{}").await;
        assert_eq!(status, 401);
    }
    for n in 1..=5 {
        assert_eq!(node.publish("rated", serde_json::json!(n)).await, n);
    }
    let resp = reqwest::Client::new()
        .post(node.url("/api/publish"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({ "channel": "rated", "data": 6 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    // The API is still over its rate: look through a client instead.
    let reply = node.ws(&token("alice")).await.subscribe("rated", None).await;
    assert_eq!(reply["offset"], 5, "the refused publish stored nothing: {reply}");
}
