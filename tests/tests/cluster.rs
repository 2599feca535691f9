//! A cluster behaves like one broker: several nodes sharing one real `redis-server` deliver every
//! message of a channel to every subscriber, once, in offset order, whichever node it was published
//! through; a client replays on any node from its (epoch, offset); presence and the node registry
//! are cluster-wide, and a node that dies without a goodbye leaves both on its own.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::join_all;
use pushd::Config;
use pushd::channel::ChannelPattern;
use pushd_tests::backends::Backend;
use pushd_tests::*;
use serde_json::{Value, json};

/// Nodes of these tests stop at once: their clients are gone or do not matter by then.
fn quick_stop(c: Config) -> Config {
    Config { drain_window: Duration::ZERO, ..c }
}

async fn stop_all(nodes: Vec<TestNode>) {
    join_all(nodes.into_iter().map(TestNode::stop)).await;
}

/// Retries `probe` until it yields `Some`, under the test guard. Only for state that changes on
/// a clock rather than on an event we can await: the node registry is rewritten by a heartbeat
/// every second, presence entries are refreshed every third of their TTL, and both lapse by TTL,
/// so there is no frame or reply that announces them.
/// The pause between attempts keeps the poll from hammering Redis; the guard bounds the wait.
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, mut probe: impl FnMut() -> F) -> T {
    within(what, async {
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// `POST /api/publish` on the node at `addr` with the test API key; returns (offset, epoch).
async fn publish_at(http: &reqwest::Client, addr: SocketAddr, channel: &str, data: &Value) -> (u64, String) {
    let req = http.post(format!("http://{addr}/api/publish")).bearer_auth(API_KEY).json(&json!({
        "channel": channel,
        "data": data,
    }));
    let resp = within("publish", req.send()).await.unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "publish to {channel} via {addr}: {body}");
    (body["offset"].as_u64().unwrap(), body["epoch"].as_str().unwrap().to_owned())
}

/// Offsets of `messages`, in the order they arrived.
fn offsets(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["offset"].as_u64().expect("a message has an offset")).collect()
}

/// Asserts nothing more is queued for `c`: a ping's reply comes after anything sent before it.
async fn assert_nothing_more(c: &mut WsClient) {
    assert_eq!(c.command(json!({ "op": "ping" })).await["ok"], true);
    assert!(c.pending_is_empty(), "unexpected frames after the expected ones");
}

on_every_deployment!(
    three_nodes_fan_out_every_message_once_in_order,
    a_subscriber_that_drops_on_one_node_replays_on_another_with_no_gap,
    a_node_killed_with_sigkill_leaves_the_registry_and_presence_and_its_clients_replay_elsewhere,
    every_node_registers_itself_with_its_stats_and_a_clean_stop_deregisters_it,
);

async fn three_nodes_fan_out_every_message_once_in_order(backend: Backend) {
    const CHANNELS: usize = 10;
    const SUBSCRIBERS: usize = 300;
    const MESSAGES: usize = 1000;
    let nodes = nodes_on(3, &backend, quick_stop).await;
    let channel = |i: usize| format!("fan:{}", i % CHANNELS);

    // Subscriber i sits on node i % 3 and listens to channel i % 10: as 3 and 10 are coprime,
    // every channel has subscribers on every node (30 per channel, 10 per node and channel).
    let mut subscribers = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        let node = &nodes[i % nodes.len()];
        let mut c = node.ws(&token(&format!("u{i}"))).await;
        assert_eq!(c.welcome["node"], format!("n{}", i % nodes.len()), "{}", c.welcome);
        let reply = c.subscribe(&channel(i), None).await;
        assert_eq!((reply["ok"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(0)), "{reply}");
        subscribers.push(c);
    }

    // Message j goes through node j % 3 to channel j % 10, so every channel gets messages through
    // all three nodes; the three publishers run at once, so they interleave in Redis.
    let publishers = (0..nodes.len()).map(|k| {
        let addr = nodes[k].addr;
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut stored = Vec::new();
            for j in (k..MESSAGES).step_by(3) {
                let ch = channel(j);
                let data = json!({ "n": j, "via": format!("n{k}") });
                let (offset, epoch) = publish_at(&http, addr, &ch, &data).await;
                stored.push((ch, offset, epoch, data));
            }
            stored
        })
    });
    let mut published: HashMap<String, BTreeMap<u64, Value>> = HashMap::new();
    let mut epochs: HashMap<String, String> = HashMap::new();
    for stored in join_all(publishers).await {
        for (ch, offset, epoch, data) in stored.expect("publisher task panicked") {
            assert_eq!(epochs.entry(ch.clone()).or_insert_with(|| epoch.clone()), &epoch, "{ch} changed epoch");
            let earlier = published.entry(ch.clone()).or_default().insert(offset, data);
            assert!(earlier.is_none(), "{ch}: offset {offset} handed out twice");
        }
    }
    // Offsets are contiguous per channel however the publishes interleaved.
    assert_eq!(published.len(), CHANNELS);
    let per_channel = MESSAGES / CHANNELS;
    for (ch, msgs) in &published {
        assert_eq!(msgs.keys().copied().collect::<Vec<_>>(), (1..=per_channel as u64).collect::<Vec<_>>(), "{ch}");
    }

    for (i, c) in subscribers.iter_mut().enumerate() {
        let ch = channel(i);
        let got = c.messages(per_channel).await;
        assert_eq!(offsets(&got), (1..=per_channel as u64).collect::<Vec<_>>(), "subscriber {i} of {ch}");
        for m in &got {
            assert_eq!(m["channel"], ch, "subscriber {i}: {m}");
            let offset = m["offset"].as_u64().unwrap();
            assert_eq!(m["data"], published[&ch][&offset], "subscriber {i} of {ch} at offset {offset}");
        }
        assert_nothing_more(c).await;
    }
    drop(subscribers);
    stop_all(nodes).await;
}

async fn a_subscriber_that_drops_on_one_node_replays_on_another_with_no_gap(backend: Backend) {
    let nodes = nodes_on(3, &backend, quick_stop).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    let mut alice = a.ws(&token("alice")).await;
    let reply = alice.subscribe("room:1", None).await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for n in 1..=10 {
        b.publish("room:1", json!({ "n": n })).await;
    }
    let seen = alice.messages(10).await;
    assert_eq!(offsets(&seen), (1..=10).collect::<Vec<_>>());
    let last = seen.last().unwrap()["offset"].as_u64().unwrap();
    drop(alice);

    for n in 11..=210 {
        assert_eq!(b.publish("room:1", json!({ "n": n })).await, n);
    }
    let mut again = c.ws(&token("alice")).await;
    assert_eq!(again.welcome["node"], "n2");
    let reply = again.subscribe("room:1", Some((&epoch, last))).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["replayed"], 200, "{reply}");
    assert_eq!((reply["epoch"].as_str(), reply["offset"].as_u64()), (Some(epoch.as_str()), Some(210)), "{reply}");
    let replayed = again.messages(200).await;
    assert_eq!(offsets(&replayed), (11..=210).collect::<Vec<_>>());
    for m in &replayed {
        assert_eq!(m["data"], json!({ "n": m["offset"] }), "{m}");
    }

    // Live traffic follows the replay, whichever node publishes it.
    a.publish("room:1", json!({ "n": 211 })).await;
    c.publish("room:1", json!({ "n": 212 })).await;
    let live = again.messages(2).await;
    assert_eq!(offsets(&live), vec![211, 212]);
    assert_eq!((&live[0]["data"], &live[1]["data"]), (&json!({ "n": 211 }), &json!({ "n": 212 })));
    assert_nothing_more(&mut again).await;
    drop(again);
    stop_all(nodes).await;
}

/// `GET /api/presence?channel=<channel>` on `node`: the clients, asserting success.
async fn presence(node: &TestNode, channel: &str) -> Value {
    let (status, body) = node.api_get(&format!("/api/presence?channel={channel}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], channel, "{body}");
    body["clients"].clone()
}

/// How presence lists `c`.
fn entry(c: &WsClient) -> Value {
    json!({ "user": c.welcome["user"], "conn": c.welcome["conn"], "node": c.welcome["node"] })
}

#[tokio::test]
async fn presence_lists_the_subscribers_of_every_node_from_any_node() {
    let redis = RedisServer::start().await;
    let nodes = cluster_with(3, &redis, quick_stop).await;
    let mut clients = Vec::new();
    for (i, user) in ["alice", "bob", "carol"].into_iter().enumerate() {
        let mut c = nodes[i].ws(&token(user)).await;
        assert_eq!(c.subscribe("lobby:1", None).await["ok"], true);
        clients.push(c);
    }
    // Listed by (user, conn): alice on n0, bob on n1, carol on n2.
    let everyone: Vec<Value> = clients.iter().map(entry).collect();
    assert_eq!(everyone[1]["node"], "n1");
    for node in &nodes {
        assert_eq!(presence(node, "lobby:1").await, json!(everyone), "asked {}", node.addr);
    }

    // An unsubscribe answers only once presence no longer lists the client, cluster-wide.
    let bob = &mut clients[1];
    assert_eq!(bob.command(json!({ "op": "unsubscribe", "channel": "lobby:1" })).await["ok"], true);
    for node in &nodes {
        assert_eq!(presence(node, "lobby:1").await, json!([everyone[0], everyone[2]]), "asked {}", node.addr);
    }
    // The presence op on a socket sees the same cluster-wide list.
    let reply = clients[0].command(json!({ "op": "presence", "channel": "lobby:1" })).await;
    assert_eq!(reply["clients"], json!([everyone[0], everyone[2]]), "{reply}");
    drop(clients);
    stop_all(nodes).await;
}

/// The next join/leave frame `c` gets, skipping only the echo of its own join (a subscriber is
/// itself announced to the channel it just joined); any other frame fails the test.
async fn presence_event(c: &mut WsClient) -> Value {
    loop {
        let frame = c.next().await;
        if frame["type"] == "join" && frame["conn"] == c.welcome["conn"] {
            continue;
        }
        return frame;
    }
}

#[tokio::test]
async fn join_and_leave_on_one_node_reach_subscribers_on_another() {
    let redis = RedisServer::start().await;
    let join_leave = |c: Config| Config { join_leave: vec![ChannelPattern::parse("room:*").unwrap()], ..quick_stop(c) };
    let nodes = cluster_with(2, &redis, join_leave).await;
    let mut alice = nodes[0].ws(&token("alice")).await;
    assert_eq!(alice.subscribe("room:1", None).await["ok"], true);

    let mut bob = nodes[1].ws(&token("bob")).await;
    assert_eq!(bob.subscribe("room:1", None).await["ok"], true);
    let bob_conn = bob.welcome["conn"].clone();
    let join = json!({ "type": "join", "channel": "room:1", "user": "bob", "conn": bob_conn });
    assert_eq!(presence_event(&mut alice).await, join);

    assert_eq!(bob.command(json!({ "op": "unsubscribe", "channel": "room:1" })).await["ok"], true);
    let leave = json!({ "type": "leave", "channel": "room:1", "user": "bob", "conn": bob_conn });
    assert_eq!(presence_event(&mut alice).await, leave);

    // A client that just goes away leaves too.
    let mut carol = nodes[1].ws(&token("carol")).await;
    assert_eq!(carol.subscribe("room:1", None).await["ok"], true);
    let carol_conn = carol.welcome["conn"].clone();
    assert_eq!(
        presence_event(&mut alice).await,
        json!({ "type": "join", "channel": "room:1", "user": "carol", "conn": carol_conn })
    );
    drop(carol);
    assert_eq!(
        presence_event(&mut alice).await,
        json!({ "type": "leave", "channel": "room:1", "user": "carol", "conn": carol_conn })
    );

    // Channels outside the join/leave patterns are quiet; presence still lists alice alone.
    assert_eq!(bob.subscribe("lobby:1", None).await["ok"], true);
    assert_eq!(presence(&nodes[1], "room:1").await, json!([entry(&alice)]));
    assert_nothing_more(&mut alice).await;
    drop((alice, bob));
    stop_all(nodes).await;
}

/// When `conn`'s presence entry on `channel` lapses unless refreshed (Unix ms): its score in the
/// channel's presence expiry set, which the node rewrites to now + TTL at every refresh.
async fn presence_lapse(redis: &RedisServer, channel: &str, conn: &str) -> Option<u64> {
    let key = format!("pushd:{{{channel}}}:presence:exp");
    redis.cli(&["ZSCORE", &key, conn]).await.trim().parse::<f64>().ok().map(|ms| ms as u64)
}

#[tokio::test]
async fn presence_outlives_its_ttl_while_the_node_keeps_refreshing_it() {
    const TTL: Duration = Duration::from_secs(1);
    let redis = RedisServer::start().await;
    let short = |c: Config| Config { presence_ttl: TTL, ..quick_stop(c) };
    let nodes = cluster_with(2, &redis, short).await;
    let mut alice = nodes[0].ws(&token("alice")).await;
    assert_eq!(alice.subscribe("lobby:1", None).await["ok"], true);
    assert_eq!(presence(&nodes[1], "lobby:1").await, json!([entry(&alice)]));
    // What must not happen is alice lapsing while she is still subscribed, and nothing announces
    // a non-event. What keeps her listed is an event, though: n0 rewriting her entry's lapse time
    // to now + TTL (every third of the TTL). Her join wrote `joined + TTL`; once a refresh has
    // written a lapse time 4 TTLs later than that, that refresh ran 4 TTLs after the join, long
    // after the entry (and the keys' expiry, 2 TTLs) would have lapsed had nobody refreshed it.
    // Only then ask: the presence query drops every entry whose lapse time has passed.
    let conn = alice.welcome["conn"].as_str().unwrap().to_owned();
    let first = presence_lapse(&redis, "lobby:1", &conn).await.expect("alice's join wrote her lapse time");
    let later = first + 4 * TTL.as_millis() as u64;
    eventually("n0 to refresh alice's presence 4 TTLs after her join", || async {
        presence_lapse(&redis, "lobby:1", &conn).await.is_some_and(|at| at >= later).then_some(())
    })
    .await;
    assert_eq!(presence(&nodes[1], "lobby:1").await, json!([entry(&alice)]), "a live subscriber lapsed");
    drop(alice);
    stop_all(nodes).await;
}

/// A node's registry entry in Redis, if it has one.
async fn registry_entry(redis: &Backend, id: &str) -> Option<Value> {
    serde_json::from_str(redis.cli_key(&["GET", &format!("pushd:{{registry}}:node:{id}")]).await.trim()).ok()
}

/// The ids in `pushd:nodes`.
async fn registered(redis: &Backend) -> Vec<String> {
    redis.cli_key(&["ZRANGE", "pushd:{registry}:nodes", "0", "-1"]).await.lines().map(str::to_owned).collect()
}

async fn every_node_registers_itself_with_its_stats_and_a_clean_stop_deregisters_it(redis: Backend) {
    let nodes = nodes_on(3, &redis, quick_stop).await;
    // n0: three clients (two users) on two channels; n1: one client; n2: none.
    let mut clients = Vec::new();
    for user in ["alice", "alice", "bob"] {
        let mut c = nodes[0].ws(&token(user)).await;
        assert_eq!(c.subscribe("room:1", None).await["ok"], true);
        clients.push(c);
    }
    assert_eq!(clients[2].subscribe("room:2", None).await["ok"], true);
    clients.push(nodes[1].ws(&token("carol")).await);
    let expect = [("n0", 3, 2, 4, 2), ("n1", 1, 1, 0, 0), ("n2", 0, 0, 0, 0)];

    // The heartbeat rewrites the entries every second: poll until they show what we connected.
    let ids = eventually("all three nodes in pushd:nodes", || async {
        let ids = registered(&redis).await;
        (ids.len() == 3).then_some(ids)
    })
    .await;
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ["n0", "n1", "n2"]);
    for (node, (id, connections, users, subscriptions, channels)) in nodes.iter().zip(expect) {
        let info = eventually(&format!("{id}'s registry entry to count {connections} connections"), || async {
            registry_entry(&redis, id).await.filter(|i| i["connections"] == connections && i["channels"] == channels)
        })
        .await;
        assert_eq!(info["id"], id, "{info}");
        assert_eq!(info["addr"], node.addr.to_string(), "{info}");
        assert_eq!(info["users"], users, "{info}");
        assert_eq!(info["subscriptions"], subscriptions, "{info}");
        assert_eq!(info["draining"], false, "{info}");
        assert!(info["version"].as_str().is_some_and(|v| !v.is_empty()), "{info}");
        let updated = info["updated_ms"].as_u64().unwrap();
        assert!(info["started_ms"].as_u64().unwrap() <= updated, "{info}");
        // The entry expires unless refreshed: the default node TTL is 5 s.
        let ttl: i64 = redis.cli_key(&["PTTL", &format!("pushd:{{registry}}:node:{id}")]).await.trim().parse().unwrap();
        assert!((1..=5000).contains(&ttl), "{id}: PTTL {ttl}");
    }

    // A clean stop takes the node out at once (the stop returns after deregistering).
    let mut nodes = nodes;
    nodes.pop().unwrap().stop().await;
    let mut ids = registered(&redis).await;
    ids.sort();
    assert_eq!(ids, ["n0", "n1"]);
    assert_eq!(registry_entry(&redis, "n2").await, None);
    drop(clients);
    stop_all(nodes).await;
}

async fn a_node_killed_with_sigkill_leaves_the_registry_and_presence_and_its_clients_replay_elsewhere(redis: Backend) {
    let reach = redis.args();
    let args = |id: &'static str| {
        let mut args: Vec<&str> = reach.iter().map(String::as_str).collect();
        args.extend(["--node-id", id, "--node-ttl", "2", "--presence-ttl", "2"]);
        args
    };
    let mut k1 = PushdProcess::start(&args("k1")).await;
    let k2 = PushdProcess::start(&args("k2")).await;

    let mut client = k1.ws("user=u1").await;
    assert_eq!(client.welcome["node"], "k1", "{}", client.welcome);
    let reply = client.subscribe("room:k", None).await;
    assert_eq!((reply["ok"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(0)), "{reply}");
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for n in 1..=5 {
        k2.publish("room:k", json!({ "n": n })).await;
    }
    let seen = client.messages(5).await;
    assert_eq!(offsets(&seen), (1..=5).collect::<Vec<_>>());
    let last = 5;

    // Before the kill: k1 is registered (by its periodic heartbeat) and its client is present.
    eventually("k1 in pushd:nodes", || async { registered(&redis).await.contains(&"k1".to_owned()).then_some(()) })
        .await;
    let (status, body) = k2.api_get("/api/presence?channel=room:k").await;
    assert_eq!(status, 200, "{body}");
    let u1 = json!({ "user": "u1", "conn": client.welcome["conn"], "node": "k1" });
    assert_eq!(body["clients"], json!([u1]), "{body}");

    k1.kill().await;
    assert_eq!(client.closed().await.code, 1006, "a killed node sends no close frame");
    for n in 6..=25 {
        assert_eq!(k2.publish("room:k", json!({ "n": n })).await, n);
    }

    // No goodbye from k1: its registry key expires (node TTL 2 s) and its presence entries lapse
    // (presence TTL 2 s) on their own. Both are clocks, not events: poll, bounded by the guard.
    eventually("k1's registry key to expire", || async { registry_entry(&redis, "k1").await.is_none().then_some(()) })
        .await;
    eventually("k1's client to lapse from presence asked via k2", || async {
        let (status, body) = k2.api_get("/api/presence?channel=room:k").await;
        assert_eq!(status, 200, "{body}");
        (body["clients"] == json!([])).then_some(())
    })
    .await;

    // The client comes back on k2 with its position and gets exactly what it missed.
    let mut again = k2.ws("user=u1").await;
    assert_eq!(again.welcome["node"], "k2", "{}", again.welcome);
    let reply = again.subscribe("room:k", Some((&epoch, last))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["replayed"], 20, "{reply}");
    assert_eq!((reply["epoch"].as_str(), reply["offset"].as_u64()), (Some(epoch.as_str()), Some(25)), "{reply}");
    let replayed = again.messages(20).await;
    assert_eq!(offsets(&replayed), (6..=25).collect::<Vec<_>>());
    for m in &replayed {
        assert_eq!(m["data"], json!({ "n": m["offset"] }), "{m}");
    }
    k2.publish("room:k", json!({ "n": 26 })).await;
    assert_eq!(again.messages(1).await[0]["offset"], 26);
    assert_nothing_more(&mut again).await;

    // And the registry's index forgets k1 too, not just its key; k2 stays.
    eventually("k1 to leave pushd:nodes", || async {
        let ids = registered(&redis).await;
        (!ids.contains(&"k1".to_owned())).then_some(ids)
    })
    .await;
    assert_eq!(registered(&redis).await, ["k2"]);
}

/// `calls=N` of one command in `INFO commandstats`.
async fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]).await;
    let prefix = format!("cmdstat_{command}:calls=");
    stats.lines().find_map(|l| l.strip_prefix(&prefix)?.split(',').next()?.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_connection_storm_over_many_channels_subscribes_in_batches_and_delivers_everywhere() {
    const CLIENTS: usize = 200;
    let redis = RedisServer::start().await;
    let node = TestNode::start(quick_stop(redis_config(&redis, "n0"))).await;
    let before = command_calls(&redis, "subscribe").await;
    let presence_writes = r#"pushd_redis_command_duration_seconds_count{operation="presence"}"#;
    let writes_before = node.metric(presence_writes).await;
    // Every client on its own channel, all subscribing at once.
    let clients = join_all((0..CLIENTS).map(|i| {
        let node = &node;
        async move {
            let mut c = node.ws(&token(&format!("u{i}"))).await;
            let reply = c.subscribe(&format!("storm:{i}"), None).await;
            assert_eq!(reply["ok"], true, "{reply}");
            c
        }
    }))
    .await;
    let subscribes = command_calls(&redis, "subscribe").await - before;
    assert!(subscribes < CLIENTS as u64, "{subscribes} SUBSCRIBE commands for {CLIENTS} channels: not batched");
    // Their presence entries too went to Redis in batches, and each is stored.
    let writes = node.metric(presence_writes).await - writes_before;
    assert!(writes < CLIENTS as f64, "{writes} presence writes for {CLIENTS} joins: not batched");
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(presence(&node, &format!("storm:{i}")).await, json!([entry(c)]));
    }
    for i in 0..CLIENTS {
        node.publish(&format!("storm:{i}"), json!({ "i": i })).await;
    }
    for (i, mut c) in clients.into_iter().enumerate() {
        let m = c.messages(1).await;
        assert_eq!(
            (m[0]["channel"].as_str(), m[0]["data"]["i"].as_u64()),
            (Some(format!("storm:{i}").as_str()), Some(i as u64))
        );
    }
    node.stop().await;
}
