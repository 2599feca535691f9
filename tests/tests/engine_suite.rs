//! One suite, both engines: the memory and Redis engines promise the same semantics (contiguous
//! offsets in one epoch, history with a size and a TTL, replay with `recovered`, presence,
//! join/leave, idempotent publishes, the node registry), so every test here runs twice, as
//! `memory::<name>` on the in-process engine and as `redis::<name>` on a redis-server of its own,
//! then again on a Redis Cluster, behind Sentinel and over TLS (ripgrep's `rgtest!` runs each
//! test with and without PCRE2 the same way). A test that passes on one engine only is a bug.

use std::time::Duration;

use pushd::Config;
use pushd::channel::ChannelPattern;
use pushd::engine::{NodeInfo, now_ms};
use pushd_tests::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// Runs each suite function (`async fn name(config: Config)`) once per engine and Redis
/// deployment: `memory::name` with `secure_config()`, and `redis::name`, `redis_cluster::name`
/// (3 primaries + 3 replicas, sharded pub/sub), `redis_sentinel::name` (a primary found through
/// 3 Sentinels) and `redis_tls::name` (TLS only, a CA made for the test) on servers of their own
/// that live until the test body returns. A suite function left out of the list is dead code,
/// which clippy refuses.
macro_rules! every_engine {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(pushd_tests::secure_config()).await;
                }
            )*
        }

        every_engine!(@redis redis, single, $($name),*);
        every_engine!(@redis redis_cluster, cluster, $($name),*);
        every_engine!(@redis redis_sentinel, sentinel, $($name),*);
        every_engine!(@redis redis_tls, tls, $($name),*);
    };
    (@redis $module:ident, $deployment:ident, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $name() {
                    let backend = pushd_tests::backends::Backend::$deployment().await;
                    super::$name(backend.config("n0")).await;
                    drop(backend);
                }
            )*
        }
    };
}

every_engine!(
    publishes_get_contiguous_offsets_in_one_epoch_and_history_returns_them,
    the_history_command_answers_as_the_api_does_where_the_client_may_subscribe,
    data_comes_back_byte_for_byte_from_history_and_live_delivery,
    an_empty_event_name_is_no_event_live_in_history_and_in_replay,
    a_gap_within_history_is_replayed_and_a_trimmed_one_is_not_recovered,
    a_gap_longer_than_max_replay_is_not_recovered,
    a_wrong_epoch_is_not_recovered_and_no_since_starts_live_at_the_top,
    a_retried_publish_with_the_same_idempotency_key_is_stored_once,
    presence_lists_subscribers_until_they_unsubscribe_or_disconnect,
    join_and_leave_events_reach_subscribers_where_configured,
    socket_and_api_publishes_interleave_and_two_subscribers_see_the_same_offsets,
    unsubscribe_stops_delivery,
    history_expires_after_its_ttl_but_the_position_stays,
    the_node_registry_lists_the_latest_heartbeat_until_the_node_deregisters,
    a_node_that_stops_heartbeating_lapses_from_the_registry_after_node_ttl,
    positions_far_beyond_the_top_are_not_recovered_and_read_as_empty,
);

/// Publishes `data` through `/api/publish` (with `extra` fields merged in); returns offset and
/// epoch.
async fn publish(node: &TestNode, channel: &str, data: Value, extra: Value) -> (u64, String) {
    let mut body = json!({ "channel": channel, "data": data });
    if let Value::Object(extra) = extra {
        body.as_object_mut().unwrap().extend(extra);
    }
    let (status, reply) = node.api_post("/api/publish", body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["channel"], channel, "{reply}");
    (reply["offset"].as_u64().unwrap(), reply["epoch"].as_str().unwrap().to_owned())
}

/// `GET /api/history?<query>`, asserting 200.
async fn history(node: &TestNode, query: &str) -> Value {
    let (status, body) = node.api_get(&format!("/api/history?{query}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn offsets(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["offset"].as_u64().unwrap()).collect()
}

fn history_offsets(page: &Value) -> Vec<u64> {
    offsets(page["publications"].as_array().unwrap())
}

fn epoch_of(reply: &Value) -> String {
    reply["epoch"].as_str().unwrap_or_else(|| panic!("no epoch in {reply}")).to_owned()
}

/// Asserts a subscribe reply's outcome: position, and `recovered`/`replayed` when `since` was given.
fn assert_subscribed(reply: &Value, epoch: &str, offset: u64, recovered: Option<(bool, u64)>) {
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!((reply["epoch"].as_str(), reply["offset"].as_u64()), (Some(epoch), Some(offset)), "{reply}");
    match recovered {
        Some((recovered, replayed)) => {
            assert_eq!((reply["recovered"].as_bool(), reply["replayed"].as_u64()), (Some(recovered), Some(replayed)));
        }
        None => assert!(reply.get("recovered").is_none() && reply.get("replayed").is_none(), "{reply}"),
    }
}

/// Proves nothing else is waiting for `client`: a ping round trip, then an empty queue.
async fn assert_nothing_more(client: &mut WsClient) {
    let pong = client.command(json!({ "op": "ping" })).await;
    assert_eq!(pong["ok"], true, "{pong}");
    assert!(client.pending_is_empty(), "unexpected frames before the pong");
}

/// Polls `/api/presence` until `channel`'s clients are `want`: cleanup after a disconnect runs
/// in the background, so this awaits the state rather than sleeping for it.
async fn presence_becomes(node: &TestNode, channel: &str, want: &Value) {
    let mut last = Value::Null;
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let (status, body) = node.api_get(&format!("/api/presence?channel={channel}")).await;
            assert_eq!(status, 200, "{body}");
            if body["clients"] == *want {
                return;
            }
            last = body;
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(seen.is_ok(), "presence of {channel} never became {want}; last: {last}");
}

fn client(ws: &WsClient, node: &str) -> Value {
    json!({ "user": ws.welcome["user"], "conn": ws.welcome["conn"], "node": node })
}

async fn publishes_get_contiguous_offsets_in_one_epoch_and_history_returns_them(config: Config) {
    let node = TestNode::start(config).await;
    let mut epochs = Vec::new();
    for n in 1..=10 {
        let (offset, epoch) = publish(&node, "room:1", json!({ "n": n }), json!({ "event": "e" })).await;
        assert_eq!(offset, n);
        epochs.push(epoch);
    }
    epochs.dedup();
    assert_eq!(epochs.len(), 1, "one epoch for contiguous publishes: {epochs:?}");
    let epoch = &epochs[0];

    let page = history(&node, "channel=room:1&since=3&limit=4").await;
    assert_eq!((page["channel"].as_str(), page["epoch"].as_str()), (Some("room:1"), Some(epoch.as_str())));
    assert_eq!(page["top"], 10);
    assert_eq!(history_offsets(&page), vec![4, 5, 6, 7]);
    let entries = page["publications"].as_array().unwrap();
    let ns: Vec<u64> = entries.iter().map(|p| p["data"]["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, vec![4, 5, 6, 7]);
    assert!(entries.iter().all(|p| p["event"] == "e" && p["time_ms"].as_u64().unwrap() > 0), "{page}");

    assert_eq!(history_offsets(&history(&node, "channel=room:1&since=8").await), vec![9, 10]);
    assert_eq!(history_offsets(&history(&node, "channel=room:1&since=10").await), Vec::<u64>::new());
    assert_eq!(history_offsets(&history(&node, "channel=room:1&limit=3").await), vec![8, 9, 10]);
    assert_eq!(history_offsets(&history(&node, "channel=room:1").await), (1..=10).collect::<Vec<_>>());

    // A channel nobody published to has an epoch and top 0, and keeps that epoch for its first
    // publish.
    let empty = history(&node, "channel=room:2").await;
    assert_eq!((empty["top"].as_u64(), history_offsets(&empty)), (Some(0), vec![]));
    let (offset, epoch2) = publish(&node, "room:2", json!(1), json!({})).await;
    assert_eq!((offset, epoch2.as_str()), (1, epoch_of(&empty).as_str()));
    node.stop().await;
}

/// A history entry with its data kept as the node sent it.
#[derive(Deserialize)]
struct RawPage {
    publications: Vec<RawEntry>,
}

#[derive(Deserialize)]
struct RawEntry {
    offset: u64,
    data: Box<RawValue>,
}

/// Key order, number text and escapes a `Value` round trip would change.
const RAW_DATA: &str = r#"{"b":1,"a":2.50,"s":"\u00e9 x","n":[1e3, -0.0]}"#;

async fn data_comes_back_byte_for_byte_from_history_and_live_delivery(config: Config) {
    let node = TestNode::start(config).await;
    let mut alice = node.ws(&token("alice")).await;
    let epoch = epoch_of(&alice.subscribe("room:1", None).await);
    let body = format!(r#"{{"channel":"room:1","event":"raw","data":{RAW_DATA}}}"#);
    let (status, reply) = node.api_raw(reqwest::Method::POST, "/api/publish", Some(API_KEY), body).await;
    assert_eq!((status, &reply["offset"], reply["epoch"].as_str()), (200, &json!(1), Some(epoch.as_str())), "{reply}");
    let frame = format!(r#"{{"type":"message","channel":"room:1","offset":1,"event":"raw","data":{RAW_DATA}}}"#);
    assert_eq!(alice.next_text().await, frame, "live delivery");

    for query in ["since=0", "limit=1"] {
        let (status, text) = node.api_get_text(&format!("/api/history?channel=room:1&{query}")).await;
        assert_eq!(status, 200, "{text}");
        let page: RawPage = serde_json::from_str(&text).unwrap();
        let stored: Vec<(u64, &str)> = page.publications.iter().map(|p| (p.offset, p.data.get())).collect();
        assert_eq!(stored, vec![(1, RAW_DATA)], "history {query}");
    }

    let mut bob = node.ws(&token("bob")).await;
    assert_subscribed(&bob.subscribe("room:1", Some((&epoch, 0))).await, &epoch, 1, Some((true, 1)));
    assert_eq!(bob.next_text().await, frame, "replay");
    node.stop().await;
}

/// An empty event name is no event: live delivery, history and replay agree on every engine.
async fn an_empty_event_name_is_no_event_live_in_history_and_in_replay(config: Config) {
    let node = TestNode::start(config).await;
    let alice_may_publish = token_with(json!({ "sub": "alice", "exp": now_s() + 3600, "pubs": ["room:*"] }));
    let mut alice = node.ws(&alice_may_publish).await;
    let epoch = epoch_of(&alice.subscribe("room:1", None).await);
    publish(&node, "room:1", json!(1), json!({ "event": "" })).await;
    let reply = alice.command(json!({ "op": "publish", "channel": "room:1", "event": "", "data": 2 })).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let plain = |offset: u64| json!({ "type": "message", "channel": "room:1", "offset": offset, "data": offset });
    assert_eq!(alice.messages(2).await, [plain(1), plain(2)], "live delivery");
    let page = history(&node, "channel=room:1&since=0").await;
    for p in page["publications"].as_array().unwrap() {
        assert!(p.get("event").is_none(), "history: {p}");
    }
    let mut bob = node.ws(&token("bob")).await;
    assert_subscribed(&bob.subscribe("room:1", Some((&epoch, 0))).await, &epoch, 2, Some((true, 2)));
    assert_eq!(bob.messages(2).await, [plain(1), plain(2)], "replay");
    node.stop().await;
}

async fn a_gap_within_history_is_replayed_and_a_trimmed_one_is_not_recovered(config: Config) {
    let node = TestNode::start(Config { history_size: 5, ..config }).await;
    let mut epoch = String::new();
    for n in 1..=20 {
        (_, epoch) = publish(&node, "room:1", json!({ "n": n }), json!({})).await;
    }
    let mut alice = node.ws(&token("alice")).await;
    assert_subscribed(&alice.subscribe("room:1", Some((&epoch, 17))).await, &epoch, 20, Some((true, 3)));
    assert_eq!(offsets(&alice.messages(3).await), vec![18, 19, 20]);
    assert_nothing_more(&mut alice).await;
    drop(alice);

    // Redis trims with `XADD MAXLEN ~ 5`: it only drops whole radix-tree nodes (up to
    // stream-node-max-entries = 100 entries each) and only while at least 5 entries remain, so a
    // stream keeps between 5 and 104 entries: after 20 publishes it still holds all 20, and a
    // resubscribe from offset 1 would be (truly) recovered there. "Too old" is therefore tested
    // far beyond the approximation: after 250 publishes the Redis stream holds at most the newest
    // 104 (201..=250 in practice), the memory ring exactly 246..=250, so offsets 1 and 100 are
    // trimmed on both, while a gap of exactly history_size is kept by both.
    for n in 21..=250 {
        assert_eq!(publish(&node, "room:1", json!({ "n": n }), json!({})).await.0, n);
    }
    let mut late = Vec::new();
    for since in [1, 100] {
        let mut c = node.ws(&token("late")).await;
        assert_subscribed(&c.subscribe("room:1", Some((&epoch, since))).await, &epoch, 250, Some((false, 0)));
        late.push(c);
    }
    let mut recent = node.ws(&token("recent")).await;
    assert_subscribed(&recent.subscribe("room:1", Some((&epoch, 245))).await, &epoch, 250, Some((true, 5)));
    assert_eq!(offsets(&recent.messages(5).await), (246..=250).collect::<Vec<_>>());

    // History is a contiguous tail ending at the top, with at least the newest history_size.
    let kept = history_offsets(&history(&node, "channel=room:1&since=0&limit=1000").await);
    let first = kept[0];
    assert!(first > 100 && first <= 246, "history starts at {first}");
    assert_eq!(kept, (first..=250).collect::<Vec<_>>());

    // Whoever was not recovered is live from the top on: nothing replayed, the next is 251.
    publish(&node, "room:1", json!({ "n": 251 }), json!({})).await;
    for c in late.iter_mut().chain([&mut recent]) {
        assert_eq!(offsets(&c.messages(1).await), vec![251]);
        assert_nothing_more(c).await;
    }
    node.stop().await;
}

async fn a_gap_longer_than_max_replay_is_not_recovered(config: Config) {
    let node = TestNode::start(Config { max_replay: 5, ..config }).await;
    let mut epoch = String::new();
    for n in 1..=12 {
        (_, epoch) = publish(&node, "room:1", json!({ "n": n }), json!({})).await;
    }
    // Every message is still in history (1000 by default): only the length of the gap decides.
    assert_eq!(history_offsets(&history(&node, "channel=room:1&since=0").await), (1..=12).collect::<Vec<_>>());

    let mut far = node.ws(&token("far")).await;
    assert_subscribed(&far.subscribe("room:1", Some((&epoch, 6))).await, &epoch, 12, Some((false, 0)));
    let mut edge = node.ws(&token("edge")).await;
    assert_subscribed(&edge.subscribe("room:1", Some((&epoch, 7))).await, &epoch, 12, Some((true, 5)));
    assert_eq!(offsets(&edge.messages(5).await), (8..=12).collect::<Vec<_>>());
    let mut current = node.ws(&token("current")).await;
    assert_subscribed(&current.subscribe("room:1", Some((&epoch, 12))).await, &epoch, 12, Some((true, 0)));

    publish(&node, "room:1", json!({ "n": 13 }), json!({})).await;
    for c in [&mut far, &mut edge, &mut current] {
        assert_eq!(offsets(&c.messages(1).await), vec![13]);
        assert_nothing_more(c).await;
    }
    node.stop().await;
}

async fn a_wrong_epoch_is_not_recovered_and_no_since_starts_live_at_the_top(config: Config) {
    let node = TestNode::start(config).await;
    let mut epoch = String::new();
    for n in 1..=3 {
        (_, epoch) = publish(&node, "room:1", json!({ "n": n }), json!({})).await;
    }
    let mut stranger = node.ws(&token("stranger")).await;
    let reply = stranger.subscribe("room:1", Some(("0123456789abcdef", 2))).await;
    assert_subscribed(&reply, &epoch, 3, Some((false, 0)));
    let mut future = node.ws(&token("future")).await;
    assert_subscribed(&future.subscribe("room:1", Some((&epoch, 9))).await, &epoch, 3, Some((false, 0)));
    let mut fresh = node.ws(&token("fresh")).await;
    assert_subscribed(&fresh.subscribe("room:1", None).await, &epoch, 3, None);

    let (offset, again) = publish(&node, "room:1", json!({ "n": 4 }), json!({})).await;
    assert_eq!((offset, again), (4, epoch));
    for c in [&mut stranger, &mut future, &mut fresh] {
        let got = c.messages(1).await;
        assert_eq!((offsets(&got), &got[0]["data"]), (vec![4], &json!({ "n": 4 })));
        assert_nothing_more(c).await;
    }
    node.stop().await;
}

async fn a_retried_publish_with_the_same_idempotency_key_is_stored_once(config: Config) {
    let node = TestNode::start(config).await;
    let mut alice = node.ws(&token("alice")).await;
    assert_eq!(alice.subscribe("room:1", None).await["ok"], true);
    let first = publish(&node, "room:1", json!({ "n": 1 }), json!({ "idempotency_key": "order-1" })).await;
    let retry = publish(&node, "room:1", json!({ "n": 1 }), json!({ "idempotency_key": "order-1" })).await;
    // Same key, different data: still the first publish's answer; the retry is not stored.
    let changed = publish(&node, "room:1", json!({ "n": 99 }), json!({ "idempotency_key": "order-1" })).await;
    assert_eq!(first.0, 1);
    assert_eq!(retry, first);
    assert_eq!(changed, first);
    let other = publish(&node, "room:1", json!({ "n": 2 }), json!({ "idempotency_key": "order-2" })).await;
    assert_eq!(other, (2, first.1.clone()));
    let plain = publish(&node, "room:1", json!({ "n": 3 }), json!({})).await;
    assert_eq!(plain, (3, first.1.clone()));
    // The key belongs to its channel: the same key elsewhere is a new publish.
    assert_eq!(publish(&node, "room:2", json!({ "n": 1 }), json!({ "idempotency_key": "order-1" })).await.0, 1);

    let page = history(&node, "channel=room:1&since=0").await;
    let stored: Vec<(u64, Value)> = page["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["offset"].as_u64().unwrap(), p["data"].clone()))
        .collect();
    assert_eq!(stored, vec![(1, json!({ "n": 1 })), (2, json!({ "n": 2 })), (3, json!({ "n": 3 }))]);
    // Delivered once each, too.
    let got = alice.messages(3).await;
    assert_eq!(offsets(&got), vec![1, 2, 3]);
    assert_eq!(got[0]["data"], json!({ "n": 1 }));
    assert_nothing_more(&mut alice).await;
    node.stop().await;
}

/// A browser shows a channel's recent past over its own socket (`op: history`), then subscribes
/// from the page's top: the same messages the server API returns, under the token's `subs`.
async fn the_history_command_answers_as_the_api_does_where_the_client_may_subscribe(config: Config) {
    let node = TestNode::start(config).await;
    for n in 1..=5 {
        publish(&node, "room:1", json!({ "n": n }), json!({ "event": "chat" })).await;
    }
    let api = history(&node, "channel=room:1&limit=3").await;
    let claims = json!({ "sub": "alice", "exp": now_s() + 3600, "subs": ["room:*"] });
    let mut alice = node.ws(&token_with(claims)).await;
    let page = alice.command(json!({ "op": "history", "channel": "room:1", "limit": 3 })).await;
    assert_eq!(page["ok"], true, "{page}");
    for field in ["channel", "epoch", "top", "publications"] {
        assert_eq!(page[field], api[field], "{field}: {page} vs {api}");
    }
    assert_eq!(history_offsets(&page), vec![3, 4, 5]);
    let after = alice.command(json!({ "op": "history", "channel": "room:1", "since": 4 })).await;
    assert_eq!(history_offsets(&after), vec![5]);
    let newest = alice.command(json!({ "op": "history", "channel": "room:1" })).await;
    assert_eq!(history_offsets(&newest), vec![1, 2, 3, 4, 5]);

    // Subscribing from the page's top misses nothing published in between.
    publish(&node, "room:1", json!({ "n": 6 }), json!({})).await;
    let since = (page["epoch"].as_str().unwrap(), page["top"].as_u64().unwrap());
    let reply = alice.subscribe("room:1", Some(since)).await;
    assert_eq!((&reply["recovered"], &reply["replayed"]), (&json!(true), &json!(1)), "{reply}");
    assert_eq!(alice.next().await["offset"], 6);

    // Where subscribe is refused, so is history; a bad `since` is a bad request.
    let refused = alice.command(json!({ "op": "history", "channel": "news" })).await;
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    let bad = alice.command(json!({ "op": "history", "channel": "room:1", "since": "x" })).await;
    assert_eq!(bad["error"]["code"], "bad_request", "{bad}");
    let bad = alice.command(json!({ "op": "subscribe", "channel": "room:2", "since": 3 })).await;
    assert_eq!(bad["error"]["code"], "bad_request", "a subscribe's since is a position: {bad}");
    node.stop().await;
}

async fn presence_lists_subscribers_until_they_unsubscribe_or_disconnect(config: Config) {
    let node_id = config.node_id.clone();
    let node = TestNode::start(config).await;
    assert_eq!(
        node.api_get("/api/presence?channel=room:1").await,
        (200, json!({ "channel": "room:1", "clients": [] }))
    );
    let mut alice = node.ws(&token("alice")).await;
    let mut bob = node.ws(&token("bob")).await;
    let mut bob2 = node.ws(&token("bob")).await;
    for c in [&mut alice, &mut bob, &mut bob2] {
        assert_eq!(c.subscribe("room:1", None).await["ok"], true);
    }
    let (a, b, b2) = (client(&alice, &node_id), client(&bob, &node_id), client(&bob2, &node_id));
    assert_eq!(a["node"], node_id);
    assert_ne!(b["conn"], b2["conn"]);
    // Sorted by user, then conn; subscribing returns after the join is recorded.
    let mut bobs = [b.clone(), b2.clone()];
    bobs.sort_by_key(|c| c["conn"].as_str().unwrap().to_owned());
    let everyone = json!([a, bobs[0], bobs[1]]);
    let (status, body) = node.api_get("/api/presence?channel=room:1").await;
    assert_eq!((status, &body["clients"]), (200, &everyone), "{body}");
    let reply = alice.command(json!({ "op": "presence", "channel": "room:1" })).await;
    assert_eq!((&reply["ok"], &reply["clients"]), (&json!(true), &everyone), "{reply}");
    assert_eq!(node.api_get("/api/presence?channel=room:2").await.1["clients"], json!([]));

    // Unsubscribing leaves before the reply.
    assert_eq!(bob.command(json!({ "op": "unsubscribe", "channel": "room:1" })).await["ok"], true);
    let (_, body) = node.api_get("/api/presence?channel=room:1").await;
    assert_eq!(body["clients"], json!([a, b2]), "{body}");

    // Disconnecting leaves in the background.
    drop(bob2);
    presence_becomes(&node, "room:1", &json!([a])).await;
    alice.send_message(tokio_tungstenite::tungstenite::Message::Close(None)).await;
    presence_becomes(&node, "room:1", &json!([])).await;
    node.stop().await;
}

/// The join or leave frame of `c` in `channel`.
fn event(kind: &str, channel: &str, c: &WsClient) -> Value {
    json!({ "type": kind, "channel": channel, "user": c.welcome["user"], "conn": c.welcome["conn"] })
}

async fn join_and_leave_events_reach_subscribers_where_configured(config: Config) {
    let config = Config { join_leave: vec![ChannelPattern::parse("room:*").unwrap()], ..config };
    let node = TestNode::start(config).await;
    let mut alice = node.ws(&token("alice")).await;
    assert_eq!(alice.subscribe("chat:1", None).await["ok"], true);
    assert_eq!(alice.subscribe("room:1", None).await["ok"], true);
    assert_eq!(alice.next().await, event("join", "room:1", &alice), "a subscriber sees its own join");

    let mut bob = node.ws(&token("bob")).await;
    // chat:1 has presence but no join/leave events: had bob's join there been announced, alice
    // would see it before his room:1 join, which is announced after it.
    assert_eq!(bob.subscribe("chat:1", None).await["ok"], true);
    assert_eq!(bob.subscribe("room:1", None).await["ok"], true);
    assert_eq!(alice.next().await, event("join", "room:1", &bob));
    assert_eq!(bob.command(json!({ "op": "unsubscribe", "channel": "room:1" })).await["ok"], true);
    assert_eq!(alice.next().await, event("leave", "room:1", &bob));
    assert_eq!(bob.command(json!({ "op": "unsubscribe", "channel": "chat:1" })).await["ok"], true);

    let mut carol = node.ws(&token("carol")).await;
    assert_eq!(carol.subscribe("room:1", None).await["ok"], true);
    assert_eq!(alice.next().await, event("join", "room:1", &carol));
    let carol_leaves = event("leave", "room:1", &carol);
    drop(carol);
    assert_eq!(alice.next().await, carol_leaves, "a disconnect is a leave");

    // Messages and events share the channel's stream; nothing else arrived.
    publish(&node, "room:1", json!("after"), json!({})).await;
    assert_eq!(offsets(&alice.messages(1).await), vec![1]);
    assert_nothing_more(&mut alice).await;
    node.stop().await;
}

async fn socket_and_api_publishes_interleave_and_two_subscribers_see_the_same_offsets(config: Config) {
    let node = TestNode::start(config).await;
    let mut alice = node.ws(&token("alice")).await;
    let mut bob = node.ws(&token("bob")).await;
    let epoch = epoch_of(&alice.subscribe("room:1", None).await);
    assert_subscribed(&bob.subscribe("room:1", None).await, &epoch, 0, None);
    let publisher = token_with(json!({ "sub": "carol", "exp": now_s() + 3600, "pubs": ["room:*"] }));
    let mut carol = node.ws(&publisher).await;
    for n in 1..=30u64 {
        let (offset, got_epoch) = if n % 3 == 0 {
            let cmd = json!({ "op": "publish", "channel": "room:1", "event": "ws", "data": { "n": n } });
            let reply = carol.command(cmd).await;
            assert_eq!(reply["ok"], true, "{reply}");
            (reply["offset"].as_u64().unwrap(), epoch_of(&reply))
        } else {
            publish(&node, "room:1", json!({ "n": n }), json!({ "event": "api" })).await
        };
        assert_eq!((offset, got_epoch.as_str()), (n, epoch.as_str()));
    }
    let seen_by_alice = alice.messages(30).await;
    let seen_by_bob = bob.messages(30).await;
    assert_eq!(offsets(&seen_by_alice), (1..=30).collect::<Vec<_>>());
    for (n, m) in (1..).zip(&seen_by_alice) {
        let want_event = if n % 3 == 0 { "ws" } else { "api" };
        assert_eq!((&m["data"], m["event"].as_str()), (&json!({ "n": n }), Some(want_event)), "{m}");
    }
    assert_eq!(seen_by_alice, seen_by_bob);
    for c in [&mut alice, &mut bob] {
        assert_nothing_more(c).await;
    }
    // The publisher is not subscribed and got nothing but its replies.
    assert_nothing_more(&mut carol).await;
    let stored = history(&node, "channel=room:1&since=0").await;
    assert_eq!(history_offsets(&stored), (1..=30).collect::<Vec<_>>());
    node.stop().await;
}

async fn unsubscribe_stops_delivery(config: Config) {
    let node = TestNode::start(config).await;
    let mut alice = node.ws(&token("alice")).await;
    let mut bob = node.ws(&token("bob")).await;
    let epoch = epoch_of(&alice.subscribe("room:1", None).await);
    assert_subscribed(&bob.subscribe("room:1", None).await, &epoch, 0, None);
    publish(&node, "room:1", json!({ "n": 1 }), json!({})).await;
    for c in [&mut alice, &mut bob] {
        assert_eq!(offsets(&c.messages(1).await), vec![1]);
    }
    let reply = alice.command(json!({ "op": "unsubscribe", "channel": "room:1" })).await;
    assert_eq!((&reply["ok"], &reply["channel"]), (&json!(true), &json!("room:1")), "{reply}");
    publish(&node, "room:1", json!({ "n": 2 }), json!({})).await;
    // Bob still subscribes on the same node: once he has message 2, alice would have had it too.
    assert_eq!(offsets(&bob.messages(1).await), vec![2]);
    assert_nothing_more(&mut alice).await;
    let again = alice.command(json!({ "op": "unsubscribe", "channel": "room:1" })).await;
    assert_eq!((&again["ok"], &again["error"]["code"]), (&json!(false), &json!("not_subscribed")), "{again}");

    // Coming back from her position replays exactly what she missed.
    assert_subscribed(&alice.subscribe("room:1", Some((&epoch, 1))).await, &epoch, 2, Some((true, 1)));
    assert_eq!(offsets(&alice.messages(1).await), vec![2]);
    assert_nothing_more(&mut alice).await;
    node.stop().await;
}

async fn history_expires_after_its_ttl_but_the_position_stays(config: Config) {
    // One second is the shortest TTL Redis keys take (EXPIRE is in seconds).
    let node = TestNode::start(Config { history_ttl: Duration::from_secs(1), ..config }).await;
    let mut epoch = String::new();
    for n in 1..=3 {
        (_, epoch) = publish(&node, "room:1", json!({ "n": n }), json!({})).await;
    }
    assert_eq!(history_offsets(&history(&node, "channel=room:1&since=0").await), vec![1, 2, 3]);
    let expired = within("history to expire", async {
        loop {
            let page = history(&node, "channel=room:1&since=0").await;
            if history_offsets(&page).is_empty() {
                return page;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!((expired["epoch"].as_str(), expired["top"].as_u64()), (Some(epoch.as_str()), Some(3)), "{expired}");

    let mut behind = node.ws(&token("behind")).await;
    assert_subscribed(&behind.subscribe("room:1", Some((&epoch, 1))).await, &epoch, 3, Some((false, 0)));
    let mut current = node.ws(&token("current")).await;
    assert_subscribed(&current.subscribe("room:1", Some((&epoch, 3))).await, &epoch, 3, Some((true, 0)));
    assert_eq!(publish(&node, "room:1", json!({ "n": 4 }), json!({})).await, (4, epoch.clone()));
    for c in [&mut behind, &mut current] {
        assert_eq!(offsets(&c.messages(1).await), vec![4]);
        assert_nothing_more(c).await;
    }
    node.stop().await;
}

/// The registry has no HTTP route yet (no /admin), so these drive the engine of a real `Node`
/// (what `pushd::run` builds) without its listener or its heartbeat task.
async fn registry_node(config: Config, node_ttl: Duration) -> std::sync::Arc<pushd::Node> {
    let node = pushd::Node::start(Config { node_ttl, ..config }, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    assert_eq!(node.engine().nodes().await.unwrap(), vec![], "a fresh registry is empty");
    node
}

async fn the_node_registry_lists_the_latest_heartbeat_until_the_node_deregisters(config: Config) {
    let node = registry_node(config, Duration::from_secs(5)).await;
    let engine = node.engine();
    let first = node.info("127.0.0.1:1");
    engine.heartbeat(&first).await.unwrap();
    assert_eq!(engine.nodes().await.unwrap(), vec![first.clone()]);
    let report = NodeInfo { updated_ms: now_ms(), connections: 7, ..first };
    engine.heartbeat(&report).await.unwrap();
    assert_eq!(engine.nodes().await.unwrap(), vec![report.clone()], "a heartbeat replaces the last report");
    // A clean shutdown takes the node out at once (`Engine::deregister`).
    engine.deregister(&report.id).await;
    assert_eq!(engine.nodes().await.unwrap(), vec![], "still listed after deregister");
    engine.close().await;
}

async fn a_node_that_stops_heartbeating_lapses_from_the_registry_after_node_ttl(config: Config) {
    let node_ttl = Duration::from_millis(500);
    let node = registry_node(config, node_ttl).await;
    let engine = node.engine();
    let report = node.info("127.0.0.1:1");
    engine.heartbeat(&report).await.unwrap();
    assert_eq!(engine.nodes().await.unwrap(), vec![report]);
    // No more heartbeats: the entry lapses on its own, as a crashed node's would.
    let lapsed = tokio::time::timeout(WAIT, async {
        while !engine.nodes().await.unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(lapsed.is_ok(), "still listed {WAIT:?} after its only heartbeat (node_ttl {node_ttl:?})");
    engine.close().await;
}

/// Offsets no channel will reach, but a client may send: 10^14 and beyond, up to the largest
/// integer JSON carries. Each is simply ahead of the channel: not recovered, an empty page.
async fn positions_far_beyond_the_top_are_not_recovered_and_read_as_empty(config: Config) {
    let node = TestNode::start(config).await;
    let mut alice = node.ws(&token("alice")).await;
    let epoch = alice.subscribe("far", None).await["epoch"].as_str().unwrap().to_owned();
    assert_eq!(alice.command(json!({ "op": "unsubscribe", "channel": "far" })).await["ok"], true);
    node.publish("far", json!({ "n": 1 })).await;
    for since in [100_000_000_000_000_u64, 9_007_199_254_740_993, i64::MAX as u64, u64::MAX] {
        let reply = alice.subscribe("far", Some((&epoch, since))).await;
        let got = (&reply["ok"], &reply["recovered"], &reply["offset"]);
        assert_eq!(got, (&json!(true), &json!(false), &json!(1)), "since {since}: {reply}");
        assert_eq!(alice.command(json!({ "op": "unsubscribe", "channel": "far" })).await["ok"], true);
        let (status, page) = node.api_get(&format!("/api/history?channel=far&since={since}")).await;
        assert_eq!(
            (status, &page["publications"], &page["top"]),
            (200, &json!([]), &json!(1)),
            "since {since}: {page}"
        );
    }
    node.stop().await;
}
