//! A cluster behind the real HAProxy with the compose file's config: clients connect only
//! through the balancer, a node is SIGKILLed and another drained with SIGTERM while a backend
//! publishes through the balancer, and every client ends with exactly the channel's history. An
//! SSE stream resumes through the balancer with its Last-Event-ID. pushctl reaches the cluster
//! through the balancer's admin frontend.

use std::net::SocketAddr;
use std::time::Duration;

use pushd_tests::deploy::{ADMIN_KEY, Haproxy, nodes};
use pushd_tests::*;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const CHANNEL: &str = "room:lb";
const FOLLOWERS: usize = 30;

/// What a follower reports as it goes.
#[derive(Debug)]
enum Event {
    /// Subscribed (again) through the balancer, on `node`.
    Subscribed { follower: usize, node: String },
    /// Its connection to `node` ended with `code`.
    Closed { follower: usize, node: String, code: u16, at: Instant },
}

#[tokio::test]
async fn clients_behind_haproxy_survive_a_node_kill_and_a_drain_with_nothing_lost() {
    let redis = RedisServer::start_with_aof().await;
    let mut nodes = nodes(&redis, &["--drain-grace", "3", "--drain-window", "4"]).await;
    let mut lb = Haproxy::start(&nodes).await;

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (done_tx, done) = watch::channel(u64::MAX);
    let followers: Vec<_> =
        (0..FOLLOWERS).map(|i| tokio::spawn(follow(i, lb.public, events_tx.clone(), done.clone()))).collect();
    drop(events_tx);
    let mut on_node: Vec<String> = vec![String::new(); FOLLOWERS];
    for _ in 0..FOLLOWERS {
        let Event::Subscribed { follower, node } = next_event(&mut events).await else {
            panic!("a close before connecting")
        };
        on_node[follower] = node;
    }
    let count = |node: &str| on_node.iter().filter(|n| *n == node).count();
    assert!((1..=3).all(|i| count(&format!("pushd-{i}")) > 0), "leastconn spreads clients: {on_node:?}");

    let (stop_tx, stop) = watch::channel(false);
    let publisher = tokio::spawn(publish_until_stopped(lb.public, stop));

    // SSE streams through the balancer too: remember where one was, to resume from it at the end.
    let sse_path = format!("/sse?channel={CHANNEL}&token={}", token("sse"));
    let mut sse = SseClient::open(lb.public, &sse_path, None).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.next_event().await.expect("welcome").event, "welcome");
    let seen = sse.next_message().await;
    let (cursor, seen_offset) = (seen.id.clone().expect("an event id"), seen.data["offset"].as_u64().unwrap());
    drop(sse);

    // A crash: pushd-2 dies without a word. Its clients reconnect through the balancer, which
    // retries the dead address elsewhere, and replay what they missed.
    let killed: Vec<usize> = (0..FOLLOWERS).filter(|f| on_node[*f] == "pushd-2").collect();
    nodes[1].kill().await;
    await_moves(&mut events, &mut on_node, &killed, "pushd-2", 1006).await;

    // A drain: pushd-3 turns /readyz to 503 and keeps its clients for --drain-grace. HAProxy
    // marks it down first; only then does the node close its clients, who land on pushd-1.
    let drained: Vec<usize> = (0..FOLLOWERS).filter(|f| on_node[*f] == "pushd-3").collect();
    nodes[2].terminate().await;
    let marked_down = lb.wait_down("pushd/pushd-3").await;
    let first_close = await_moves(&mut events, &mut on_node, &drained, "pushd-3", 1012).await;
    assert!(first_close.is_some_and(|at| at > marked_down), "pushd-3 closed a client before HAProxy marked it down");
    assert!(on_node.iter().all(|n| n == "pushd-1"), "after the drain every client is on pushd-1: {on_node:?}");

    // pushctl through the balancer's admin frontend sees every client on pushd-1 (pushd-2 may
    // still be listed as missing until its registry entry lapses: a partial answer, exit 3).
    let server = format!("http://{}", lb.admin);
    let env = [("PUSHCTL_SERVER", server.as_str()), ("PUSHD_ADMIN_KEY", ADMIN_KEY)];
    let out = pushctl(&["--json", "stats"], &env).await;
    assert!(out.code == 0 || out.code == 3, "pushctl stats: {out:?}");
    let stats: Value = serde_json::from_str(&out.stdout).unwrap();
    let pushd_1 = stats["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "pushd-1").expect("pushd-1 answers");
    assert_eq!(pushd_1["connections"], FOLLOWERS as u64, "{stats}");

    stop_tx.send(true).unwrap();
    let published = within("the publisher to stop", publisher).await.unwrap();
    let (status, history) = get(lb.public, &format!("/api/history?channel={CHANNEL}&limit=1000")).await;
    assert_eq!(status, 200, "{history}");
    let top = history["top"].as_u64().unwrap();
    assert_eq!(top, published, "every publish stored once (retries carry their idempotency key)");
    let stored: Vec<u64> =
        history["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(stored, (1..=top).collect::<Vec<_>>(), "the history holds the whole run");
    done_tx.send(top).unwrap();

    // The SSE client comes back through the balancer with its Last-Event-ID and gets the rest.
    let mut sse = SseClient::open(lb.public, &sse_path, Some(&cursor)).await;
    let welcome = sse.next_event().await.expect("welcome");
    assert_eq!(welcome.data["channels"][0]["recovered"], true, "{:?}", welcome.data);
    for offset in seen_offset + 1..=top {
        assert_eq!(sse.next_message().await.data["offset"], offset, "the SSE replay through the balancer");
    }

    for (i, follower) in followers.into_iter().enumerate() {
        let got = within("a follower to catch up", follower).await.unwrap();
        assert_eq!(got, (1..=top).collect::<Vec<_>>(), "follower {i} did not get exactly the history");
    }

    let mut kicked = WsClient::connect(lb.public, &format!("token={}", token("kickme"))).await;
    assert_eq!(kicked.next().await["type"], "welcome");
    let out = pushctl(&["--json", "kick", "--user", "kickme", "--reason", "test"], &env).await;
    assert_eq!(out.code, 0, "pushctl kick: {out:?}");
    let answer: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(answer["total"], 1, "{answer}");
    assert_eq!(kicked.closed().await.code, 4009);
}

/// Waits until each of `movers` (clients of `node`) was closed with `code` and welcomed on
/// another node; returns when the first of them was closed.
async fn await_moves(
    events: &mut mpsc::UnboundedReceiver<Event>,
    on_node: &mut [String],
    movers: &[usize],
    node: &str,
    code: u16,
) -> Option<Instant> {
    let mut first_close: Option<Instant> = None;
    while movers.iter().any(|f| on_node[*f] == node) {
        match next_event(events).await {
            Event::Closed { follower, node: from, at, code: got } => {
                assert_eq!((from.as_str(), got), (node, code), "follower {follower} closed while {node} went away");
                first_close = Some(first_close.map_or(at, |f| f.min(at)));
            }
            Event::Subscribed { follower, node: to } => {
                assert_ne!(to, node, "follower {follower} was sent back to {node}");
                on_node[follower] = to;
            }
        }
    }
    first_close
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    within("a follower event", events.recv()).await.expect("followers report until they stop")
}

/// One client through the balancer: subscribes to `CHANNEL`, and after every drop reconnects
/// with its last position and requires `recovered: true`. Returns the offsets it received once
/// it has reached the offset `done` announces.
async fn follow(
    i: usize,
    lb: SocketAddr,
    events: mpsc::UnboundedSender<Event>,
    mut done: watch::Receiver<u64>,
) -> Vec<u64> {
    let user = format!("f{i}");
    let mut got: Vec<u64> = Vec::new();
    let mut position: Option<(String, u64)> = None;
    loop {
        let mut ws = connect(lb, &user).await;
        let node = ws.welcome["node"].as_str().unwrap().to_owned();
        let reply = ws.subscribe(CHANNEL, position.as_ref().map(|(e, o)| (e.as_str(), *o))).await;
        assert_eq!(reply["ok"], true, "{reply}");
        if position.is_some() {
            assert_eq!(reply["recovered"], true, "follower {i} could not resume on {node}: {reply}");
        }
        events.send(Event::Subscribed { follower: i, node: node.clone() }).ok();
        let epoch = reply["epoch"].as_str().unwrap().to_owned();
        let mut last = position.as_ref().map_or(reply["offset"].as_u64().unwrap(), |p| p.1);
        loop {
            if last >= *done.borrow() {
                return got;
            }
            let frame = tokio::select! {
                frame = ws.next_or_closed() => frame,
                _ = done.changed() => continue,
            };
            match frame {
                Ok(f) if f["type"] == "message" => {
                    let offset = f["offset"].as_u64().unwrap();
                    assert_eq!(f["data"]["seq"], offset, "follower {i}: {f}");
                    got.push(offset);
                    last = offset;
                }
                Ok(other) => panic!("follower {i} got an unexpected frame: {other}"),
                Err(closed) => {
                    let at = Instant::now();
                    events.send(Event::Closed { follower: i, node, code: closed.code, at }).ok();
                    break;
                }
            }
        }
        position = Some((epoch, last));
    }
}

/// Connects through the balancer; while a node is going away a connect can fail, and a real
/// client would retry: so does this one, a bounded number of times.
async fn connect(lb: SocketAddr, user: &str) -> WsClient {
    for _ in 0..50 {
        if let Ok(mut ws) = WsClient::try_connect(lb, &format!("token={}", token(user))).await
            && let Ok(welcome) = ws.next_or_closed().await
        {
            assert_eq!(welcome["type"], "welcome", "{welcome}");
            ws.welcome = welcome;
            return ws;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{user} could not connect through the balancer");
}

/// Publishes `{"seq": n}` for n = 1, 2, ... through the balancer until `stop`, retrying each
/// publish with its idempotency key until it is acknowledged; returns how many it published.
async fn publish_until_stopped(lb: SocketAddr, mut stop: watch::Receiver<bool>) -> u64 {
    let http = reqwest::Client::new();
    let mut seq = 0;
    while !*stop.borrow() {
        seq += 1;
        let body = json!({ "channel": CHANNEL, "data": { "seq": seq }, "idempotency_key": format!("lb-{seq}") });
        loop {
            let sent = http.post(format!("http://{lb}/api/publish")).bearer_auth(API_KEY).json(&body).send().await;
            match sent {
                Ok(r) if r.status() == 200 => {
                    let answer: Value = r.json().await.unwrap();
                    assert_eq!(answer["offset"], seq, "{answer}");
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.changed() => {}
        }
    }
    seq
}

async fn get(lb: SocketAddr, path: &str) -> (u16, Value) {
    let resp = within("GET", reqwest::Client::new().get(format!("http://{lb}{path}")).bearer_auth(API_KEY).send())
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}
