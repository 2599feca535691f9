//! The dashboards, proven live: a real Prometheus with the compose file's config scrapes three
//! real nodes while a pushload run, replays, a slow consumer, a kick, refusals, errors and Redis
//! faults happen. Then every query of every panel of every dashboard goes through Prometheus'
//! HTTP API: each must return data, and each panel must show the activity it is for (a value
//! that is not zero). A new panel whose query returns nothing, or nothing but zeros, fails here.

use std::net::SocketAddr;
use std::time::Duration;

use pushd_tests::deploy::{ADMIN_KEY, Prometheus, nodes, now, panel_queries, value};
use pushd_tests::*;
use serde_json::{Value, json};

#[tokio::test]
async fn every_dashboard_panel_shows_the_activity_it_is_for() {
    let redis = RedisServer::start().await;
    // A short send queue, so a client that stops reading is a slow consumer within a few
    // hundred messages.
    let nodes = nodes(&redis, &["--send-queue", "16"]).await;
    let admins: Vec<SocketAddr> = nodes.iter().map(|n| n.admin.unwrap()).collect();
    let prometheus = Prometheus::start(&nodes).await;
    // A first scrape before anything happens: every counter's first sample is its zero.
    prometheus.scraped_after(now(), nodes.len()).await;

    // Clients that stay connected while the queries run, on every node and both transports.
    let mut live = Vec::new();
    for node in &nodes {
        let mut ws = node.ws(&format!("token={}", token("watcher"))).await;
        assert_eq!(ws.subscribe("live", None).await["ok"], true);
        live.push(ws);
    }
    let mut sse = SseClient::open(nodes[0].addr, &format!("/sse?channel=live&token={}", token("reader")), None).await;
    assert_eq!(sse.next_event().await.expect("welcome").event, "welcome");

    fan_out_with_pushload(&nodes).await;
    replay_recovered_and_not(nodes[1].addr).await;
    slow_consumer(nodes[0].addr, admins[0]).await;
    kick_and_refusals(nodes[2].addr, admins[2]).await;
    pubsub_reconnect_and_reset(&redis, &nodes, &admins, &mut live).await;
    redis_timeout(&redis, nodes[1].addr).await;

    prometheus.scraped_after(now(), nodes.len()).await;
    let variable = prometheus.query("group by (node) (pushd_build_info)").await.unwrap();
    assert_eq!(variable.len(), 3, "the node variable lists every node: {variable:?}");

    let mut failures = Vec::new();
    let mut panels: Vec<(String, String, bool)> = Vec::new();
    for (file, title, expr) in panel_queries() {
        let shown = match prometheus.query(&expr).await {
            Err(e) => {
                failures.push(format!("{file} / {title}: {expr}: {e}"));
                false
            }
            Ok(result) if result.is_empty() => {
                failures.push(format!("{file} / {title}: no data for {expr}"));
                false
            }
            Ok(result) => result.iter().filter_map(value).any(|v| v.is_finite() && v != 0.0),
        };
        match panels.iter_mut().find(|(f, t, _)| *f == file && *t == title) {
            Some(panel) => panel.2 |= shown,
            None => panels.push((file, title, shown)),
        }
    }
    for (file, title, shown) in panels {
        let failed = failures.iter().any(|f| f.starts_with(&format!("{file} / {title}:")));
        if !shown && !failed {
            failures.push(format!("{file} / {title}: every value is 0: the activity it is for never showed"));
        }
    }
    assert!(failures.is_empty(), "{} panel queries failed:\n{}", failures.len(), failures.join("\n"));
    drop(sse);
}

/// 30 subscribers over the three nodes, 200 messages, every one delivered once and in order.
async fn fan_out_with_pushload(nodes: &[PushdProcess]) {
    let urls: Vec<String> = nodes.iter().map(|n| format!("http://{}", n.addr)).collect();
    let token = token("load");
    let args = [
        "fanout",
        "--url",
        &urls.join(","),
        "--subscribers",
        "30",
        "--messages",
        "200",
        "--publishers",
        "2",
        "--channel",
        "load",
        "--token",
        &token,
        "--api-key",
        API_KEY,
        "--timeout",
        "30",
    ];
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(pushload_bin()).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("pushload finished")
    .unwrap();
    assert!(out.status.success(), "pushload failed:\n{}", String::from_utf8_lossy(&out.stdout));
}

/// A client that drops and resumes (recovered), and one with a position no history matches.
async fn replay_recovered_and_not(addr: SocketAddr) {
    let http = Api(addr);
    let mut c = WsClient::connect(addr, &format!("token={}", token("replayer"))).await;
    assert_eq!(c.next().await["type"], "welcome");
    let reply = c.subscribe("replay", None).await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    let from = reply["offset"].as_u64().unwrap();
    drop(c);
    for n in 0..5 {
        http.publish("replay", json!({ "n": n })).await;
    }
    let mut again = WsClient::connect(addr, &format!("token={}", token("replayer"))).await;
    assert_eq!(again.next().await["type"], "welcome");
    let reply = again.subscribe("replay", Some((&epoch, from))).await;
    assert_eq!((reply["recovered"].as_bool(), reply["replayed"].as_u64()), (Some(true), Some(5)), "{reply}");
    let reply = again.subscribe("replay-unknown", Some(("0000000000000000", 3))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    // A command refused: a channel name with a space.
    let reply = again.command(json!({ "op": "subscribe", "channel": "no spaces" })).await;
    assert_eq!(reply["error"]["code"], "bad_channel", "{reply}");
}

/// A client that stops reading is closed with 4010.
async fn slow_consumer(addr: SocketAddr, admin: SocketAddr) {
    let http = Api(addr);
    let mut slow = WsClient::connect(addr, &format!("token={}", token("slow"))).await;
    assert_eq!(slow.next().await["type"], "welcome");
    assert_eq!(slow.subscribe("firehose", None).await["ok"], true);
    let pad = "x".repeat(8 * 1024);
    let mut n = 0;
    while metric(admin, "pushd_slow_consumer_disconnects_total").await == 0.0 {
        assert!(n < 10_000, "the client that stopped reading was still open after {n} messages");
        for _ in 0..50 {
            n += 1;
            http.publish("firehose", json!({ "n": n, "pad": pad })).await;
        }
    }
    loop {
        if let Err(closed) = slow.next_or_closed().await {
            assert_eq!(closed.code, 4010, "{closed:?}");
            break;
        }
    }
}

/// An operator kick through pushctl, a refused token, an oversized publish, wrong keys.
async fn kick_and_refusals(addr: SocketAddr, admin: SocketAddr) {
    let mut victim = WsClient::connect(addr, &format!("token={}", token("victim"))).await;
    assert_eq!(victim.next().await["type"], "welcome");
    let server = format!("http://{admin}");
    let out =
        pushctl(&["kick", "--user", "victim"], &[("PUSHCTL_SERVER", &server), ("PUSHD_ADMIN_KEY", ADMIN_KEY)]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(victim.closed().await.code, 4009);
    let out = pushctl(&["stats"], &[("PUSHCTL_SERVER", &server), ("PUSHD_ADMIN_KEY", "wrong")]).await;
    assert_eq!(out.code, 1, "a wrong admin key is refused: {out:?}");

    let mut forged = WsClient::connect(addr, "token=not-a-token").await;
    assert_eq!(forged.closed().await.code, 4001);

    let http = Api(addr);
    let big = json!({ "channel": "big", "data": "x".repeat(70 * 1024) });
    assert_eq!(http.post("/api/publish", &big, API_KEY).await, 413);
    assert_eq!(http.post("/api/publish", &json!({ "channel": "a", "data": 1 }), "wrong-key").await, 401);
}

/// Redis drops every pub/sub connection (the nodes reconnect and fill gaps from the streams),
/// then loses a live channel's history (the next publish starts a new epoch: a reset).
async fn pubsub_reconnect_and_reset(
    redis: &RedisServer,
    nodes: &[PushdProcess],
    admins: &[SocketAddr],
    live: &mut [WsClient],
) {
    let http = Api(nodes[0].addr);
    http.publish("live", json!({ "before": true })).await;
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    for admin in admins {
        within("a gap fill after the pub/sub reconnect", async {
            while metric(*admin, "pushd_redis_gap_fills_total{result=\"filled\"}").await == 0.0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
    redis.cli(&["DEL", "pushd:{live}:stream", "pushd:{live}:meta"]).await;
    http.publish("live", json!({ "after": true })).await;
    for ws in live.iter_mut() {
        assert_eq!(ws.next().await["offset"], 1, "the message before the loss");
        assert_eq!(ws.next().await["type"], "reset", "history lost under a live subscriber");
        assert_eq!(ws.next().await["offset"], 1, "the new epoch's first message");
    }
}

/// Redis stalls past the command timeout: the publish's outcome is unknown (Redis error of kind
/// timeout).
async fn redis_timeout(redis: &RedisServer, addr: SocketAddr) {
    redis.cli(&["CLIENT", "PAUSE", "3500", "WRITE"]).await;
    let status = Api(addr).post("/api/publish", &json!({ "channel": "stalled", "data": 1 }), API_KEY).await;
    assert_eq!(status, 504, "a publish Redis did not answer in time may still be stored");
}

/// The value of the first series of `name` (with its labels, if given) on a node's /metrics.
async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text =
        within("metrics", async { reqwest::get(format!("http://{admin}/metrics")).await?.text().await }).await.unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from {admin}/metrics"))
}

/// The server API of one node.
struct Api(SocketAddr);

impl Api {
    async fn post(&self, path: &str, body: &Value, key: &str) -> u16 {
        let req = reqwest::Client::new().post(format!("http://{}{path}", self.0)).bearer_auth(key).json(body);
        within("POST", req.send()).await.unwrap().status().as_u16()
    }

    async fn publish(&self, channel: &str, data: Value) {
        let status = self.post("/api/publish", &json!({ "channel": channel, "data": data }), API_KEY).await;
        assert_eq!(status, 200, "publish to {channel}");
    }
}
