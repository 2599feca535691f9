//! Graceful drain: on shutdown (in-process) or SIGTERM (the real binary) every client is told to
//! reconnect elsewhere (close code 1012, or an SSE `close` event with it), and the node returns
//! or exits 0 within the drain window.

use std::time::Duration;

use pushd::Config;
use pushd_tests::*;
use serde_json::json;
use tokio::time::{Instant, timeout, timeout_at};

const DRAIN_WINDOW: Duration = Duration::from_secs(2);

#[tokio::test]
async fn stopping_a_node_closes_every_client_with_1012_within_the_drain_window() {
    let node = TestNode::start(Config { drain_window: DRAIN_WINDOW, ..secure_config() }).await;
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u3"] {
        let mut c = node.ws(&token(user)).await;
        assert_eq!(c.subscribe("room:1", None).await["ok"], true);
        clients.push(c);
    }
    assert_eq!(node.api_get("/readyz").await, (200, json!({ "ready": true })));
    // Every client is live before the drain.
    node.publish("room:1", json!({ "n": 1 })).await;
    for c in &mut clients {
        assert_eq!(c.messages(1).await[0]["offset"], 1);
    }

    let watchers: Vec<_> = clients.into_iter().map(|mut c| tokio::spawn(async move { c.closed().await })).collect();
    timeout(DRAIN_WINDOW, node.stop()).await.expect("the node did not stop within its drain window");
    for watcher in watchers {
        let closed = watcher.await.unwrap();
        assert_eq!(closed.code, 1012, "{closed:?}");
    }
}

#[tokio::test]
async fn while_draining_readiness_is_503_new_clients_are_refused_and_closes_are_spread() {
    // 60 clients over 60% of a 10 s window: one close per 50 ms tick, the last after ~3 s, which
    // leaves the checks below seconds to run while the drain is under way.
    let mut node = TestNode::start(Config { drain_window: Duration::from_secs(10), ..secure_config() }).await;
    let mut clients = Vec::new();
    for i in 0..60 {
        clients.push(node.ws(&token(&format!("u{i}"))).await);
    }
    // Each client reports its close; the drain picks its own order, so wait for whichever is first.
    let (tx, mut closes) = tokio::sync::mpsc::unbounded_channel();
    for mut c in clients.drain(..) {
        let tx = tx.clone();
        tokio::spawn(async move { tx.send(c.closed().await).ok() });
    }
    drop(tx);
    node.begin_stop();
    let first = within("the first drain close", closes.recv()).await.expect("a close");
    assert_eq!(first.code, 1012, "{first:?}");

    // The drain is under way and has not closed everyone yet.
    assert_eq!(node.api_get("/readyz").await, (503, json!({ "ready": false, "reason": "draining" })));
    let metrics = node.metrics().await;
    let open: i64 = metrics
        .lines()
        .find(|l| l.starts_with("pushd_connections{transport=\"ws\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("a ws connections gauge");
    assert!(open > 0, "every client was closed at once: {open} open");
    match node.try_ws(&format!("token={}", token("late"))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 503),
        Err(e) => panic!("expected HTTP 503 while draining, got {e}"),
        Ok(_) => panic!("a new client was upgraded during the drain"),
    }

    let mut rest = 0;
    while let Some(close) = within("the remaining drain closes", closes.recv()).await {
        assert_eq!(close.code, 1012, "{close:?}");
        rest += 1;
    }
    assert_eq!(rest, 59);
    node.stop().await;
}

#[tokio::test]
async fn during_the_drain_grace_readiness_is_503_yet_new_clients_are_served_then_all_are_closed() {
    // The grace is long enough for the checks below to run inside it on a slow machine.
    let config = Config { drain_grace: Duration::from_secs(5), drain_window: DRAIN_WINDOW, ..secure_config() };
    let mut node = TestNode::start(config).await;
    let mut old = node.ws(&token("old")).await;
    node.begin_stop();
    // The node has no event for "the drain began" but its readiness: ask until it says so.
    within("readiness to turn off", async {
        while node.api_get("/readyz").await.0 != 503 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // A load balancer has not noticed yet: a client it still sends here is served.
    let mut late = node.ws(&token("late")).await;
    assert_eq!(late.subscribe("room:1", None).await["ok"], true);
    assert_eq!(old.closed().await.code, 1012);
    assert_eq!(late.closed().await.code, 1012);
    node.stop().await;
}

#[tokio::test]
async fn stopping_a_node_ends_sse_streams_with_a_close_event_saying_1012() {
    let node = TestNode::start(Config { drain_window: DRAIN_WINDOW, ..secure_config() }).await;
    let mut sse = node.sse(&format!("/sse?channel=room:1&token={}", token("u1")), None).await;
    assert_eq!(sse.next_event().await.expect("welcome").event, "welcome");
    node.publish("room:1", json!({ "n": 1 })).await;
    assert_eq!(sse.next_message().await.data["offset"], 1);

    timeout(DRAIN_WINDOW, node.stop()).await.expect("the node did not stop within its drain window");
    let close = sse.next_event().await.expect("a close event before the SSE stream ends");
    assert_eq!(
        (close.event.as_str(), &close.data["type"], &close.data["code"]),
        ("close", &json!("close"), &json!(1012))
    );
    assert!(sse.next_event().await.is_none(), "the SSE stream ends after its close event");
}

#[tokio::test]
async fn sigterm_closes_every_client_with_1012_and_exits_0_within_the_drain_window() {
    let mut pushd = PushdProcess::start(&["--drain-window", "2"]).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = pushd.ws("user=u1").await;
        assert_eq!(c.welcome["user"], "u1", "{}", c.welcome);
        assert_eq!(c.subscribe("room:1", None).await["ok"], true);
        clients.push(c);
    }
    let deadline = Instant::now() + DRAIN_WINDOW;
    pushd.terminate().await;
    for c in &mut clients {
        let closed = c.closed().await;
        assert_eq!(closed.code, 1012, "{closed:?}");
    }
    let status =
        timeout_at(deadline, pushd.child.wait()).await.expect("pushd did not exit within its drain window").unwrap();
    assert_eq!(status.code(), Some(0), "pushd exited with {status}");
}
