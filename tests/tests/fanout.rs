//! Every subscriber of a channel gets every message, once, in offset order.

use pushd_tests::*;
use serde_json::json;

#[tokio::test]
async fn api_and_socket_publishes_reach_every_subscriber_once_in_order() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    let mut bob = node.ws(&token("bob")).await;
    let publisher = token_with(json!({"sub": "carol", "exp": now_s() + 3600, "pubs": ["room:*"]}));
    let mut carol = node.ws(&publisher).await;
    for c in [&mut alice, &mut bob] {
        let reply = c.subscribe("room:1", None).await;
        assert_eq!((reply["ok"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(0)), "{reply}");
    }
    for i in 0..20 {
        if i % 2 == 0 {
            node.publish("room:1", json!({ "n": i })).await;
        } else {
            let reply =
                carol.command(json!({"op": "publish", "channel": "room:1", "event": "chat", "data": {"n": i}})).await;
            assert_eq!(reply["ok"], true, "{reply}");
            assert_eq!(reply["offset"], i + 1);
        }
    }
    for c in [&mut alice, &mut bob] {
        let got = c.messages(20).await;
        let offsets: Vec<u64> = got.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
        assert_eq!(offsets, (1..=20).collect::<Vec<_>>());
        let ns: Vec<u64> = got.iter().map(|m| m["data"]["n"].as_u64().unwrap()).collect();
        assert_eq!(ns, (0..20).collect::<Vec<_>>());
        assert_eq!(got[1]["event"], "chat");
        assert!(got[0].get("event").is_none());
        // Exactly once: nothing more arrives after a ping round trip.
        let pong = c.command(json!({"op": "ping"})).await;
        assert_eq!(pong["ok"], true);
        assert!(c.pending_is_empty());
    }
    node.stop().await;
}
