//! The operator plane: with `--admin-listen`, /admin/* and /metrics live on their own address
//! and the public one refuses them; `/metrics` is valid Prometheus text; `pushd probe` is the
//! container health check.

use pushd_tests::deploy::{run, tool};
use pushd_tests::*;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let resp = within("GET", reqwest::Client::new().get(format!("http://{addr}{path}")).send()).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn the_admin_listener_alone_serves_the_admin_api_and_metrics() {
    let pushd = PushdProcess::start(&["--admin-listen", "127.0.0.1:0"]).await;
    let admin = pushd.admin.expect("the node reports its admin address");
    for path in ["/metrics", "/admin/stats"] {
        let (status, body) = get(pushd.addr, path).await;
        assert_eq!(status, 404, "{path} on the public listener: {body}");
        assert!(body.contains("--admin-listen"), "the refusal says where to go: {body}");
        assert_eq!(get(admin, path).await.0, 200, "{path} on the admin listener");
    }
    let (status, body) = get(admin, "/api/history?channel=a").await;
    assert_eq!(status, 404, "the server API is not on the admin listener: {body}");
    for addr in [pushd.addr, admin] {
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 200);
    }
}

#[tokio::test]
async fn metrics_pass_promtool_and_start_at_zero() {
    let pushd = PushdProcess::start(&[]).await;
    let (status, text) = get(pushd.addr, "/metrics").await;
    assert_eq!(status, 200);
    let path = std::env::temp_dir().join(format!("pushd-metrics-{}.txt", pushd.addr.port()));
    std::fs::write(&path, &text).unwrap();
    let check = format!("{} check metrics < {}", tool("promtool").display(), path.display());
    let (ok, out) = run(std::path::Path::new("sh"), &["-c", &check], &[]).await;
    let _ = std::fs::remove_file(&path);
    assert!(ok, "promtool check metrics:\n{out}");
    for line in [
        "pushd_connections_closed_total{code=\"4010\",transport=\"ws\"} 0",
        "pushd_http_requests_total{api=\"api\",code=\"503\",route=\"publish\"} 0",
        "pushd_build_info{version=\"0.1.0\"} 1",
        "pushd_ready 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from /metrics");
    }
    assert!(text.lines().any(|l| l.starts_with("process_open_fds ")), "process metrics");
}

#[tokio::test]
async fn the_probe_answers_for_a_running_node_and_fails_without_one() {
    let mut pushd = PushdProcess::start(&["--admin-listen", "127.0.0.1:0"]).await;
    let bin = pushd_bin();
    let listen = pushd.addr.to_string();
    let admin = pushd.admin.unwrap().to_string();
    let (ok, out) = run(&bin, &["--listen", &listen, "--admin-listen", &admin, "probe"], &[]).await;
    assert!(ok, "pushd probe against a live node: {out}");
    let (ok, out) = run(&bin, &["--listen", &listen, "--admin-listen", &admin, "probe", "--path", "/nope"], &[]).await;
    assert!(!ok && out.contains("404"), "a path that is not 200 fails the probe: {out}");
    pushd.kill().await;
    let (ok, out) = run(&bin, &["--listen", &listen, "--admin-listen", &admin, "probe"], &[]).await;
    assert!(!ok && out.contains("cannot ask"), "no node, no health: {out}");
}

#[tokio::test]
async fn each_connections_messages_out_counts_live_and_replayed_messages_once() {
    // Live messages go out over the socket's express lane, replayed ones through the session's
    // own task: the count operators see (`/admin/connections`) adds both, each message once.
    let node = TestNode::start(pushd::Config::dev()).await; // dev mode: the admin API needs no key
    let mut live = node.ws(&token("live")).await;
    let reply = live.subscribe("room:1", None).await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        node.publish("room:1", serde_json::json!({ "n": n })).await;
    }
    assert_eq!(live.messages(3).await.len(), 3);
    let mut late = node.ws(&token("late")).await;
    assert_eq!(late.subscribe("room:1", Some((&epoch, 0))).await["replayed"], 3);
    assert_eq!(late.messages(3).await.len(), 3);
    node.publish("room:1", serde_json::json!({ "n": 4 })).await;
    for c in [&mut live, &mut late] {
        assert_eq!(c.next().await["offset"], 4);
    }
    let (status, body) = node.api_get("/admin/connections").await;
    assert_eq!(status, 200, "{body}");
    let counts: Vec<(String, u64)> = body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["user"].as_str().unwrap().to_owned(), c["messages_out"].as_u64().unwrap()))
        .collect();
    assert_eq!(counts.len(), 2, "{body}");
    assert!(counts.iter().all(|(_, n)| *n == 4), "every connection sent 4 messages: {counts:?}");
    node.stop().await;
}
