//! A client that drops and resubscribes with its position gets exactly what it missed, or is
//! told plainly that it cannot (`recovered: false`).

use pushd::Config;
use pushd_tests::*;
use serde_json::json;

#[tokio::test]
async fn resubscribe_replays_exactly_the_missed_messages_in_order() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    let reply = alice.subscribe("room:1", None).await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for n in 1..=5 {
        node.publish("room:1", json!({ "n": n })).await;
    }
    let seen = alice.messages(5).await;
    let last = seen.last().unwrap()["offset"].as_u64().unwrap();
    drop(alice);

    for n in 6..=55 {
        node.publish("room:1", json!({ "n": n })).await;
    }
    let mut again = node.ws(&token("alice")).await;
    let reply = again.subscribe("room:1", Some((&epoch, last))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["replayed"], 50, "{reply}");
    assert_eq!(reply["offset"], 55);
    let replayed = again.messages(50).await;
    let offsets: Vec<u64> = replayed.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (6..=55).collect::<Vec<_>>());
    // Live traffic continues right after the replay.
    node.publish("room:1", json!({ "n": 56 })).await;
    assert_eq!(again.messages(1).await[0]["offset"], 56);
    node.stop().await;
}

#[tokio::test]
async fn a_trimmed_position_or_a_wrong_epoch_is_not_recovered() {
    let node = TestNode::start(Config { history_size: 10, ..secure_config() }).await;
    let mut alice = node.ws(&token("alice")).await;
    let epoch = alice.subscribe("room:1", None).await["epoch"].as_str().unwrap().to_owned();
    for n in 1..=30 {
        node.publish("room:1", json!({ "n": n })).await;
    }
    alice.messages(30).await;

    let mut late = node.ws(&token("bob")).await;
    let reply = late.subscribe("room:1", Some((&epoch, 5))).await;
    assert_eq!((reply["ok"].as_bool(), reply["recovered"].as_bool()), (Some(true), Some(false)), "{reply}");
    assert_eq!((reply["epoch"].as_str(), reply["offset"].as_u64()), (Some(epoch.as_str()), Some(30)));
    assert_eq!(reply["replayed"], 0);

    let mut stranger = node.ws(&token("carol")).await;
    let reply = stranger.subscribe("room:1", Some(("not-the-epoch", 29))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["offset"], 30);

    // Neither skips anything from here on: the next message is the next offset.
    node.publish("room:1", json!({ "n": 31 })).await;
    for c in [&mut late, &mut stranger] {
        assert_eq!(c.messages(1).await[0]["offset"], 31);
    }
    node.stop().await;
}
