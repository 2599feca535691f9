//! The browser origin policy as a browser meets it: which pages may open a stream and which may
//! change anything. Requests without an Origin (backends, pushctl) are not browsers and pass.

use pushd::Config;
use pushd_tests::*;
use serde_json::json;

/// `GET /sse` with `origin` (and `x-forwarded-proto`, if given); the status the node answers.
async fn sse_status(node: &TestNode, origin: &str, proto: Option<&str>) -> u16 {
    let url = node.url(&format!("/sse?channel=a&token={}", token("alice")));
    let mut req = reqwest::Client::new().get(url).header("origin", origin);
    if let Some(proto) = proto {
        req = req.header("x-forwarded-proto", proto);
    }
    within("an SSE answer", req.send()).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn same_host_means_the_same_scheme_host_and_port() {
    let node = TestNode::start(secure_config()).await;
    let host = node.addr.to_string();
    assert_eq!(sse_status(&node, &format!("http://{host}"), None).await, 200);
    assert_eq!(sse_status(&node, &format!("https://{host}"), Some("https")).await, 200, "behind a TLS proxy");
    for foreign in [format!("ftp://{host}"), format!("https://{host}"), format!("http://{}", node.addr.ip())] {
        assert_eq!(sse_status(&node, &foreign, None).await, 403, "{foreign} is another origin");
    }
}

#[tokio::test]
async fn in_dev_mode_a_page_from_elsewhere_can_read_but_not_publish_or_ban() {
    let node = TestNode::start(Config::dev()).await;
    let http = reqwest::Client::new();
    // A cross-site form post: no preflight, text/plain, the page's Origin.
    let post = |path: &str, body: serde_json::Value, origin: &'static str| {
        http.post(node.url(path)).header("origin", origin).header("content-type", "text/plain").body(body.to_string())
    };
    let evil = "https://evil.example";
    let sent = within("a publish", post("/api/publish", json!({ "channel": "a", "data": 1 }), evil).send()).await;
    assert_eq!(sent.unwrap().status().as_u16(), 403);
    let sent = within("a kick", post("/admin/kick", json!({ "user": "alice", "ban_s": 600 }), evil).send()).await;
    assert_eq!(sent.unwrap().status().as_u16(), 403);
    let (_, history) = node.api_get("/api/history?channel=a").await;
    assert_eq!(history["top"], 0, "nothing was published: {history}");
    let mut alice = node.ws_raw("user=alice").await;
    assert_eq!(alice.next().await["type"], "welcome", "nobody was banned");
    // The developer's own page on loopback may, and so may curl (no Origin at all).
    let local =
        within("a publish", post("/api/publish", json!({ "channel": "a", "data": 1 }), "http://localhost:3000").send());
    assert_eq!(local.await.unwrap().status().as_u16(), 200);
    assert_eq!(node.publish("a", json!(2)).await, 2);
    // Reading stays open to any page in dev mode.
    assert_eq!(sse_status(&node, evil, None).await, 200);
}
