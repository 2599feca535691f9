//! A subscriber that stops reading is closed with 4010 instead of growing the node's memory or
//! holding back the others; a fast subscriber of the same channel misses nothing, and the slow
//! one resumes from its last position with replay.

use pushd::Config;
use pushd_tests::*;
use serde_json::json;

/// Bytes of padding per message: large, so a few MiB of socket buffers fill quickly.
const PAD: usize = 8 * 1024;
/// Messages published between checks of the slow-consumer counter.
const BATCH: u64 = 50;
/// Give up (and fail) if the slow client is still open after this many messages.
const MAX_MESSAGES: u64 = 10_000;

/// `pushd_slow_consumer_disconnects_total` from the node's `/metrics`.
async fn slow_consumer_disconnects(node: &TestNode) -> u64 {
    let text = node.metrics().await;
    let line = text
        .lines()
        .find(|l| l.starts_with("pushd_slow_consumer_disconnects_total"))
        .unwrap_or_else(|| panic!("no pushd_slow_consumer_disconnects_total in /metrics:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_4010_and_nobody_else_loses_anything() {
    // History holds everything this test can publish, so the slow client's replay is complete.
    let config = Config { send_queue: 16, history_size: 20_000, max_replay: 20_000, ..secure_config() };
    let node = TestNode::start(config).await;
    let mut slow = node.ws(&token("slow")).await;
    let reply = slow.subscribe("feed", None).await;
    assert_eq!((reply["ok"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(0)), "{reply}");
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    let mut fast = node.ws(&token("fast")).await;
    assert_eq!(fast.subscribe("feed", None).await["ok"], true);

    // The fast client reads all the time, until the message marked last.
    let reader = tokio::spawn(async move {
        let mut offsets = Vec::new();
        loop {
            let m = fast.next().await;
            assert_eq!(m["type"], "message", "{m}");
            offsets.push(m["offset"].as_u64().unwrap());
            if m["data"]["last"] == true {
                return (fast, offsets);
            }
        }
    });

    // Publish until the node has given up on the slow client. The server writes the 4010 close
    // frame behind what it already queued and gives up on it after a second, so the slow client
    // must start reading soon after it is closed: publishing stops as soon as the counter says so.
    let pad = "x".repeat(PAD);
    let mut n = 0;
    while slow_consumer_disconnects(&node).await == 0 {
        assert!(n < MAX_MESSAGES, "the slow client was still open after {n} messages of {PAD} bytes");
        for _ in 0..BATCH {
            n += 1;
            assert_eq!(node.publish("feed", json!({ "n": n, "pad": pad })).await, n);
        }
    }
    n += 1;
    assert_eq!(node.publish("feed", json!({ "n": n, "last": true })).await, n);

    // Only now does the slow client read: what its socket buffered, in order, then the close.
    let mut seen = Vec::new();
    let closed = loop {
        match slow.next_or_closed().await {
            Ok(m) => {
                assert_eq!(m["type"], "message", "{m}");
                seen.push(m["offset"].as_u64().unwrap());
            }
            Err(closed) => break closed,
        }
    };
    assert_eq!(closed.code, 4010, "the slow client must be told to reconnect and replay: {closed:?}");
    let last_seen = seen.len() as u64;
    assert!(last_seen > 0, "the slow client's socket buffered nothing before the queue filled");
    assert!(last_seen < n, "the slow client got everything ({n}) yet was closed");
    assert_eq!(seen, (1..=last_seen).collect::<Vec<_>>(), "the slow client saw a gap or a duplicate");

    let (mut fast, offsets) = within("the fast client to read everything", reader).await.unwrap();
    assert_eq!(offsets.len() as u64, n, "the fast client lost or duplicated messages");
    assert_eq!(offsets, (1..=n).collect::<Vec<_>>());
    assert_eq!(fast.command(json!({"op": "ping"})).await["ok"], true);
    assert!(fast.pending_is_empty(), "nothing beyond the last message");
    assert_eq!(slow_consumer_disconnects(&node).await, 1, "only the slow client was closed");

    // The slow client reconnects with its last position and gets exactly what it missed.
    let mut again = node.ws(&token("slow")).await;
    let reply = again.subscribe("feed", Some((&epoch, last_seen))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!((reply["replayed"].as_u64(), reply["offset"].as_u64()), (Some(n - last_seen), Some(n)), "{reply}");
    let replayed = again.messages((n - last_seen) as usize).await;
    let offsets: Vec<u64> = replayed.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (last_seen + 1..=n).collect::<Vec<_>>());
    assert_eq!(replayed.last().unwrap()["data"]["last"], true);
    assert_eq!(again.command(json!({"op": "ping"})).await["ok"], true);
    assert!(again.pending_is_empty(), "nothing beyond the replay");
    node.stop().await;
}
