//! SSE with a raw HTTP client: one stream over several channels, an `id:` cursor on every event,
//! and a reconnect with `Last-Event-ID` (or `?since=`) that resumes every channel with no gap
//! and no duplicate. Errors are HTTP statuses with JSON bodies; heartbeats are comments.

use std::collections::HashMap;
use std::time::Duration;

use pushd::Config;
use pushd::engine::Epoch;
use pushd_tests::*;
use serde_json::json;

/// Each channel's (epoch, offset) as a stream's welcome announced them.
fn positions(welcome: &SseEvent) -> Vec<(String, u64)> {
    welcome.data["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("welcome without channels: {welcome:?}"))
        .iter()
        .map(|r| (r["epoch"].as_str().unwrap().to_owned(), r["offset"].as_u64().unwrap()))
        .collect()
}

/// The cursor text for these positions: the digest of the epochs (16 hex digits), then every
/// offset, in the stream's channel order, all joined by `.`.
fn cursor(positions: &[(String, u64)]) -> String {
    let epochs: Vec<Epoch> = positions.iter().map(|(e, _)| Epoch::new(e)).collect();
    let offsets: Vec<String> = positions.iter().map(|(_, o)| o.to_string()).collect();
    format!("{:016x}.{}", pushd::cursor::digest(&epochs), offsets.join("."))
}

/// Reads `n` message events; checks that each event's id is the cursor after it, with
/// `positions` (in `channels` order) updated as they arrive. Returns the offsets per channel.
async fn read_messages(
    sse: &mut SseClient,
    n: usize,
    channels: &[&str],
    positions: &mut [(String, u64)],
) -> HashMap<String, Vec<u64>> {
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    for _ in 0..n {
        let m = sse.next_message().await;
        let channel = m.data["channel"].as_str().unwrap().to_owned();
        let offset = m.data["offset"].as_u64().unwrap();
        let i = channels.iter().position(|c| *c == channel).unwrap_or_else(|| panic!("foreign channel: {m:?}"));
        positions[i].1 = offset;
        assert_eq!(m.id.as_deref(), Some(cursor(positions).as_str()), "id is not the cursor after {m:?}");
        assert_eq!(m.data["data"]["n"], offset, "{m:?}");
        got.entry(channel).or_default().push(offset);
    }
    got
}

fn sse_path(channels: &[&str], token: &str) -> String {
    let mut q: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    q.push(format!("token={token}"));
    format!("/sse?{}", q.join("&"))
}

/// `:` and `,` escaped, as a careful client puts a cursor into a query string (the older form
/// has them; the current one needs no escaping, and this leaves it as it is).
fn encode_cursor(cursor: &str) -> String {
    cursor.replace(':', "%3A").replace(',', "%2C")
}

/// Publishes `n` = `from..=to` to each channel, interleaved; the data's `n` is the offset.
async fn publish_interleaved(node: &TestNode, channels: &[&str], from: u64, to: u64) {
    for n in from..=to {
        for c in channels {
            assert_eq!(node.publish(c, json!({ "n": n })).await, n);
        }
    }
}

#[tokio::test]
async fn last_event_id_resumes_every_channel_exactly_once_in_order() {
    let node = TestNode::start(secure_config()).await;
    let channels = ["a", "b"];
    let path = sse_path(&channels, &token("alice"));
    let mut sse = node.sse(&path, None).await;
    assert_eq!(sse.status, 200);

    let welcome = sse.next_event().await.expect("welcome");
    assert_eq!((welcome.event.as_str(), &welcome.data["type"]), ("welcome", &json!("welcome")), "{welcome:?}");
    assert_eq!(welcome.data["user"], "alice");
    for (reply, channel) in welcome.data["channels"].as_array().unwrap().iter().zip(channels) {
        assert_eq!((&reply["ok"], &reply["channel"], &reply["offset"]), (&json!(true), &json!(channel), &json!(0)));
        assert!(reply.get("recovered").is_none(), "a fresh stream recovers nothing: {reply}");
    }
    let mut pos = positions(&welcome);
    assert_eq!(welcome.id.as_deref(), Some(cursor(&pos).as_str()), "the welcome carries the cursor");
    let epochs: Vec<String> = pos.iter().map(|(e, _)| e.clone()).collect();

    publish_interleaved(&node, &channels, 1, 3).await;
    let seen = read_messages(&mut sse, 6, &channels, &mut pos).await;
    assert_eq!((seen["a"].clone(), seen["b"].clone()), (vec![1, 2, 3], vec![1, 2, 3]));
    let last_id = cursor(&pos);
    drop(sse);

    publish_interleaved(&node, &channels, 4, 23).await;

    // The browser's way: Last-Event-ID.
    let mut again = node.sse(&path, Some(&last_id)).await;
    assert_eq!(again.status, 200);
    let welcome = again.next_event().await.expect("welcome");
    assert_eq!(welcome.event, "welcome");
    for (reply, (channel, epoch)) in
        welcome.data["channels"].as_array().unwrap().iter().zip(channels.iter().zip(&epochs))
    {
        assert_eq!(reply["channel"], *channel, "{reply}");
        assert_eq!((reply["recovered"].as_bool(), reply["replayed"].as_u64()), (Some(true), Some(20)), "{reply}");
        assert_eq!((reply["epoch"].as_str(), reply["offset"].as_u64()), (Some(epoch.as_str()), Some(23)), "{reply}");
    }
    // Before the replay the cursor is where the client left off.
    assert_eq!(welcome.id.as_deref(), Some(last_id.as_str()));
    let mut pos = positions(&welcome);
    pos.iter_mut().for_each(|p| p.1 = 3);
    let replayed = read_messages(&mut again, 40, &channels, &mut pos).await;
    assert_eq!(replayed["a"], (4..=23).collect::<Vec<_>>());
    assert_eq!(replayed["b"], (4..=23).collect::<Vec<_>>());
    // Nothing extra: the next event is the next live message.
    node.publish("a", json!({ "n": 24 })).await;
    let live = read_messages(&mut again, 1, &channels, &mut pos).await;
    assert_eq!(live["a"], vec![24]);

    // A client that keeps the cursor itself: ?since= does the same.
    let since_path = format!("{path}&since={}", encode_cursor(&last_id));
    let mut third = node.sse(&since_path, None).await;
    let welcome = third.next_event().await.expect("welcome");
    let replies = welcome.data["channels"].as_array().unwrap();
    assert_eq!((replies[0]["recovered"].as_bool(), replies[0]["replayed"].as_u64()), (Some(true), Some(21)));
    assert_eq!((replies[1]["recovered"].as_bool(), replies[1]["replayed"].as_u64()), (Some(true), Some(20)));
    let mut pos = positions(&welcome);
    pos.iter_mut().for_each(|p| p.1 = 3);
    let replayed = read_messages(&mut third, 41, &channels, &mut pos).await;
    assert_eq!(replayed["a"], (4..=24).collect::<Vec<_>>());
    assert_eq!(replayed["b"], (4..=23).collect::<Vec<_>>());
    node.publish("b", json!({ "n": 24 })).await;
    for sse in [&mut again, &mut third] {
        let m = sse.next_message().await;
        assert_eq!((&m.data["channel"], &m.data["offset"]), (&json!("b"), &json!(24)), "{m:?}");
        let epochs: Vec<(String, u64)> = epochs.iter().map(|e| (e.clone(), 24)).collect();
        assert_eq!(m.id, Some(cursor(&epochs)));
    }
    node.stop().await;
}

#[tokio::test]
async fn streams_are_event_streams_that_caches_leave_alone() {
    let node = TestNode::start(secure_config()).await;
    let sse = node.sse(&sse_path(&["a"], &token("alice")), None).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.header("cache-control"), Some("no-cache"));
    drop(sse);
    node.stop().await;
}

#[tokio::test]
async fn refused_streams_get_a_status_and_a_json_error() {
    let node = TestNode::start(secure_config()).await;
    let alice = token("alice");
    let rooms_only = token_with(json!({ "sub": "alice", "exp": now_s() + 3600, "subs": ["room:*"] }));
    let cases: [(String, u16, &str); 6] = [
        (format!("/sse?token={alice}"), 400, "bad_request"),
        (format!("/sse?channel=room*&token={alice}"), 400, "bad_channel"),
        (format!("/sse?channel=a%7Bb%7D&token={alice}"), 400, "bad_channel"),
        ("/sse?channel=a".to_owned(), 401, "unauthorized"),
        (format!("/sse?channel=news&token={rooms_only}"), 403, "forbidden"),
        (format!("/sse?channel=a&channel=user:bob&token={alice}"), 403, "forbidden"),
    ];
    for (path, status, code) in cases {
        let mut sse = node.sse(&path, None).await;
        assert_eq!(sse.status, status, "{path}");
        assert_eq!(sse.header("content-type"), Some("application/json"), "{path}");
        let body = sse.body_json().await;
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{path}: {body}");
    }
    // A refused stream holds no connection slot or subscription: a good one still works.
    let mut ok = node.sse(&sse_path(&["room:1"], &rooms_only), None).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.next_event().await.expect("welcome").event, "welcome");
    node.stop().await;
}

#[tokio::test]
async fn a_cursor_from_another_epoch_is_not_recovered_and_live_follows_without_gap() {
    let node = TestNode::start(secure_config()).await;
    let channels = ["a", "b"];
    publish_interleaved(&node, &channels, 1, 3).await;
    node.publish("a", json!({ "n": 4 })).await;

    // The shape of a real cursor, but from an epoch this node never had (e.g. before a restart).
    let stale = "0123456789abcdef:2,0123456789abcdef:9";
    let mut sse = node.sse(&sse_path(&channels, &token("alice")), Some(stale)).await;
    let welcome = sse.next_event().await.expect("welcome");
    let replies = welcome.data["channels"].as_array().unwrap();
    for (reply, top) in replies.iter().zip([4, 3]) {
        assert_eq!((reply["ok"].as_bool(), reply["recovered"].as_bool()), (Some(true), Some(false)), "{reply}");
        assert_eq!((reply["offset"].as_u64(), reply["replayed"].as_u64()), (Some(top), Some(0)), "{reply}");
        assert_ne!(reply["epoch"], "0123456789abcdef");
    }
    let mut pos = positions(&welcome);
    // Not recovered: the cursor starts at the current position, not at the stale one.
    assert_eq!(welcome.id.as_deref(), Some(cursor(&pos).as_str()));

    node.publish("b", json!({ "n": 4 })).await;
    node.publish("a", json!({ "n": 5 })).await;
    let live = read_messages(&mut sse, 2, &channels, &mut pos).await;
    assert_eq!((live["a"].clone(), live["b"].clone()), (vec![5], vec![4]));
    node.stop().await;
}

#[tokio::test]
async fn a_channel_added_to_a_stream_with_an_empty_part_starts_live_while_the_others_resume() {
    // A client that keeps its own positions and adds a channel to its stream has no position
    // for the new one: an empty part of the older cursor form says so.
    let node = TestNode::start(secure_config()).await;
    let mut first = node.sse(&sse_path(&["a"], &token("alice")), None).await;
    let pos = positions(&first.next_event().await.expect("welcome"));
    drop(first);
    publish_interleaved(&node, &["a", "b"], 1, 2).await;

    let since = format!("{}:{},", pos[0].0, pos[0].1);
    let mut sse =
        node.sse(&format!("{}&since={}", sse_path(&["a", "b"], &token("alice")), encode_cursor(&since)), None).await;
    let welcome = sse.next_event().await.expect("welcome");
    let replies = welcome.data["channels"].as_array().unwrap();
    assert_eq!(
        (replies[0]["recovered"].as_bool(), replies[0]["replayed"].as_u64()),
        (Some(true), Some(2)),
        "{welcome:?}"
    );
    assert_eq!(
        (replies[1]["offset"].as_u64(), replies[1].get("recovered")),
        (Some(2), None),
        "b starts live: {welcome:?}"
    );
    let mut pos = positions(&welcome);
    pos[0].1 = 0;
    let replayed = read_messages(&mut sse, 2, &["a", "b"], &mut pos).await;
    assert_eq!((replayed["a"].clone(), replayed.get("b")), (vec![1, 2], None));
    publish_interleaved(&node, &["a", "b"], 3, 3).await;
    let live = read_messages(&mut sse, 2, &["a", "b"], &mut pos).await;
    assert_eq!((live["a"].clone(), live["b"].clone()), (vec![3], vec![3]));
    node.stop().await;
}

#[tokio::test]
async fn a_cursor_that_does_not_fit_the_channels_is_reported_not_recovered() {
    // A cursor which does not fit the channels starts live "with `recovered: false` where a
    // position was expected" (cursor.rs): never a silent gap.
    let node = TestNode::start(secure_config()).await;
    let channels = ["a", "b"];
    let path = sse_path(&channels, &token("alice"));
    let mut first = node.sse(&path, None).await;
    let pos = positions(&first.next_event().await.expect("welcome"));
    publish_interleaved(&node, &channels, 1, 2).await;
    drop(first);

    let (ea, eb) = (&pos[0].0, &pos[1].0);
    // One channel short, one too many, an empty epoch, no cursor shape at all, and in the current
    // form: one offset short, and a digest of other epochs.
    for bad in [
        format!("{ea}:1"),
        format!("{ea}:1,{eb}:1,{ea}:1"),
        ":1,:1".to_owned(),
        "garbage".to_owned(),
        cursor(&pos[..1]),
        "0123456789abcdef.1.1".to_owned(),
    ] {
        let mut sse = node.sse(&path, Some(&bad)).await;
        let welcome = sse.next_event().await.expect("welcome");
        for reply in welcome.data["channels"].as_array().unwrap() {
            assert_eq!(reply["offset"], 2, "{reply}");
            assert_eq!(reply["recovered"], false, "Last-Event-ID {bad:?} was dropped silently: {reply}");
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn idle_streams_carry_comment_heartbeats() {
    let config =
        Config { ping_interval: Duration::from_secs(1), idle_timeout: Duration::from_secs(3), ..secure_config() };
    let node = TestNode::start(config).await;
    let mut sse = node.sse(&sse_path(&["a"], &token("alice")), None).await;
    assert_eq!(sse.next_block().await.as_deref(), Some("retry: 1000"));
    let welcome = sse.next_block().await.expect("welcome");
    assert!(welcome.contains("event: welcome"), "{welcome}");
    assert!(welcome.contains(r#""ping_interval":1,"#), "the welcome says how often: {welcome}");
    // Nothing is published: the next bytes are a heartbeat comment.
    assert_eq!(sse.next_block().await.as_deref(), Some(": ping"));
    node.publish("a", json!({ "n": 1 })).await;
    let m = sse.next_message().await;
    assert_eq!(m.data["offset"], 1);
    assert_eq!(sse.next_block().await.as_deref(), Some(": ping"), "heartbeats go on after traffic");
    node.stop().await;
}

#[tokio::test]
async fn ids_stay_short_over_many_channels_and_still_resume_every_one() {
    let node = TestNode::start(secure_config()).await;
    let names: Vec<String> = (0..128).map(|i| format!("many:{i}")).collect();
    let channels: Vec<&str> = names.iter().map(String::as_str).collect();
    let path = sse_path(&channels, &token("alice"));
    let mut sse = node.sse(&path, None).await;
    let welcome = sse.next_event().await.expect("welcome");
    node.publish("many:7", json!({ "n": 1 })).await;
    let m = sse.next_message().await;
    let id = m.id.expect("an id");
    // 16 hex digits and one short offset per channel; epoch:offset pairs would take 2.3 KB.
    assert!(id.len() <= 16 + 128 * 3, "{} bytes: {id}", id.len());
    let mut pos = positions(&welcome);
    pos[7].1 = 1;
    assert_eq!(id, cursor(&pos));
    drop(sse);

    node.publish("many:7", json!({ "n": 2 })).await;
    node.publish("many:100", json!({ "n": 1 })).await;
    let mut again = node.sse(&path, Some(&id)).await;
    let welcome = again.next_event().await.expect("welcome");
    let replies = welcome.data["channels"].as_array().unwrap();
    assert!(replies.iter().all(|r| r["recovered"] == true), "every channel resumes: {welcome:?}");
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = again.next_message().await;
        got.push((m.data["channel"].clone(), m.data["offset"].clone()));
    }
    assert_eq!(got, [(json!("many:7"), json!(2)), (json!("many:100"), json!(1))], "exactly what was missed");
    node.stop().await;
}

#[tokio::test]
async fn a_replay_beyond_the_byte_budget_is_reported_not_recovered() {
    // Each message is about 1.1 KB on the wire; 20 per channel are about 22 KB.
    let node = TestNode::start(Config { max_replay_bytes: 50_000, ..secure_config() }).await;
    let channels = ["a", "b", "c"];
    let path = sse_path(&channels, &token("alice"));
    let mut first = node.sse(&path, None).await;
    let start = first.next_event().await.expect("welcome").id.expect("an id");
    drop(first);
    let pad = "x".repeat(1000);
    for n in 1..=20 {
        for c in channels {
            node.publish(c, json!({ "n": n, "pad": pad })).await;
        }
    }
    let mut sse = node.sse(&path, Some(&start)).await;
    let welcome = sse.next_event().await.expect("welcome");
    let replies = welcome.data["channels"].as_array().unwrap();
    let summary: Vec<(bool, u64, u64)> = replies
        .iter()
        .map(|r| (r["recovered"].as_bool().unwrap(), r["replayed"].as_u64().unwrap(), r["offset"].as_u64().unwrap()))
        .collect();
    assert_eq!(summary, [(true, 20, 20), (true, 20, 20), (false, 0, 20)], "c does not fit in what is left");
    for c in ["a", "b"] {
        for n in 1..=20 {
            let m = sse.next_message().await;
            assert_eq!((&m.data["channel"], &m.data["offset"]), (&json!(c), &json!(n)), "{m:?}");
        }
    }
    node.publish("c", json!({ "n": 21 })).await;
    assert_eq!(sse.next_message().await.data["offset"], 21, "c goes on live from its current position");
    node.stop().await;
}
