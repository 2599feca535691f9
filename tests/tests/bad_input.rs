//! Bad input gets its documented error, and the node keeps serving everyone else.
//!
//! Each test throws one kind of bad input at a node — malformed or oversized frames, bad
//! tokens, forbidden or hostile channels, bad API requests, exceeded limits — and asserts the
//! exact answer the protocol promises: a reply's error code (with the command's id), a close
//! code, or an HTTP status with its JSON error body. Where a refusal could have left something
//! behind (a stored message, a hub registration), the test looks for it. Every test then shows
//! that a client still subscribes and receives a message published through the API.

use pushd::Config;
use pushd_tests::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The channel the still-serving checks use.
const CHECK: &str = "check:still-serving";

/// A fresh client subscribes and receives the next message published through the API.
async fn assert_still_serves(node: &TestNode) {
    let mut fresh = node.ws(&token("fresh")).await;
    assert_serves(node, &mut fresh).await;
}

/// `client` subscribes to `CHECK` and receives the next API publish, at the offset the API
/// returned.
async fn assert_serves(node: &TestNode, client: &mut WsClient) {
    let reply = client.subscribe(CHECK, None).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let top = reply["offset"].as_u64().unwrap();
    let offset = node.publish(CHECK, json!({ "still": "serving" })).await;
    assert_eq!(offset, top + 1);
    let got = client.messages(1).await.remove(0);
    assert_eq!((got["channel"].as_str(), got["offset"].as_u64()), (Some(CHECK), Some(offset)), "{got}");
    assert_eq!(got["data"], json!({ "still": "serving" }));
}

/// Asserts `reply` refuses its command with `code` and a message saying why.
fn assert_refused(reply: &Value, code: &str) {
    assert_eq!((reply["type"].as_str(), reply["ok"].as_bool()), (Some("reply"), Some(false)), "{reply}");
    assert_eq!(reply["error"]["code"], code, "{reply}");
    assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{reply}");
}

/// Asserts an API answer is `status` with `{"error":{"code":code,"message":..}}`.
fn assert_api_error((status, body): &(u16, Value), want_status: u16, code: &str) {
    assert_eq!((*status, body["error"]["code"].as_str()), (want_status, Some(code)), "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// The offsets in `channel`'s history, read through `/api/history`.
async fn stored(node: &TestNode, channel: &str) -> Vec<u64> {
    let (status, body) = node.api_get(&format!("/api/history?channel={channel}")).await;
    assert_eq!(status, 200, "{body}");
    body["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect()
}

/// Opens `/ws?<query>` and asserts the server closes it with `code` before any other frame
/// (no welcome: the connection was refused as a whole).
async fn assert_refused_at_connect(node: &TestNode, query: &str, code: u16) -> Closed {
    let mut client = node.ws_raw(query).await;
    let closed = client.next_or_closed().await.expect_err("a refused connection must not get a welcome");
    assert_eq!(closed.code, code, "{closed:?}");
    assert!(!closed.reason.is_empty(), "the close frame should say why: {closed:?}");
    closed
}

/// A token for `user` that may publish to `pubs` from its socket.
fn publisher(user: &str, pubs: &[&str]) -> String {
    token_with(json!({ "sub": user, "exp": now_s() + 3600, "pubs": pubs }))
}

/// A JSON string of `len` bytes once serialised (quotes included).
fn data_of_len(len: usize) -> Value {
    Value::String("x".repeat(len - 2))
}

// --- WebSocket frames --------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_gets_bad_request_with_a_null_id_and_the_socket_stays_usable() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    for text in ["{not json", r#"{"id":3,"op":"#, "[1,2]", r#""ping""#, "null", ""] {
        alice.send_text(text).await;
        let reply = alice.next().await;
        assert_refused(&reply, "bad_request");
        assert_eq!(reply["id"], Value::Null, "{text:?} -> {reply}");
    }
    // Well-formed JSON of the wrong shape: the id is readable, so the reply echoes it.
    alice.send_text(r#"{"id":9,"op":"subscribe","channel":5}"#).await;
    let reply = alice.next().await;
    assert_refused(&reply, "bad_request");
    assert_eq!(reply["id"], 9);

    let pong = alice.command(json!({ "op": "ping" })).await;
    assert_eq!(pong["ok"], true, "{pong}");
    assert_serves(&node, &mut alice).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn an_unknown_op_gets_unknown_op_with_its_id_echoed() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    let reply = alice.command(json!({ "op": "dance", "channel": "room:1" })).await;
    assert_refused(&reply, "unknown_op");
    assert_eq!(reply["id"], 1);
    // Ops are case-sensitive, and string ids are echoed as well as numbers.
    alice.send_text(r#"{"id":"abc","op":"SUBSCRIBE","channel":"room:1"}"#).await;
    let reply = alice.next().await;
    assert_refused(&reply, "unknown_op");
    assert_eq!(reply["id"], "abc");

    assert_serves(&node, &mut alice).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn commands_missing_a_field_get_bad_request_naming_the_field() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&publisher("alice", &["room:*"])).await;
    let cases = [
        (json!({ "channel": "room:1" }), "op"),
        (json!({ "op": "subscribe" }), "channel"),
        (json!({ "op": "unsubscribe" }), "channel"),
        (json!({ "op": "presence" }), "channel"),
        (json!({ "op": "history" }), "channel"),
        (json!({ "op": "publish", "data": 1 }), "channel"),
        (json!({ "op": "publish", "channel": "room:1" }), "data"),
    ];
    for (cmd, field) in cases {
        let reply = alice.command(cmd.clone()).await;
        assert_refused(&reply, "bad_request");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{field:?}")), "{cmd} -> {reply}");
    }
    assert_eq!(stored(&node, "room:1").await, Vec::<u64>::new(), "a publish without data stored something");

    assert_serves(&node, &mut alice).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn history_commands_with_bad_arguments_get_bad_request_and_huge_limits_are_lowered() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    for cmd in [
        json!({ "op": "history", "channel": "room:1", "limit": -1 }),
        json!({ "op": "history", "channel": "room:1", "limit": "ten" }),
        json!({ "op": "history", "channel": "room:1", "since": -3 }),
        json!({ "op": "history", "channel": "room:1", "since": { "epoch": "e", "offset": 1 } }),
    ] {
        assert_refused(&alice.command(cmd.clone()).await, "bad_request");
    }
    assert_refused(&alice.command(json!({ "op": "history", "channel": "bad channel" })).await, "bad_channel");
    // A limit beyond any page is lowered, not refused, and an offset beyond the top reads nothing.
    for n in 1..=3 {
        node.publish("room:1", json!({ "n": n })).await;
    }
    let all = alice.command(json!({ "op": "history", "channel": "room:1", "limit": u64::MAX })).await;
    assert_eq!(all["publications"].as_array().map(Vec::len), Some(3), "{all}");
    let past = alice.command(json!({ "op": "history", "channel": "room:1", "since": u64::MAX })).await;
    assert_eq!(past["publications"], json!([]), "{past}");
    assert_serves(&node, &mut alice).await;
    assert_still_serves(&node).await;
}

/// A ping command padded with an ignored field to exactly `len` bytes.
fn padded_ping(id: &str, len: usize) -> String {
    let head = format!(r#"{{"id":"{id}","op":"ping","pad":""#);
    let tail = r#""}"#;
    let frame = format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()));
    assert_eq!(frame.len(), len);
    frame
}

#[tokio::test]
async fn a_frame_over_max_frame_closes_the_socket_with_1009() {
    const MAX_FRAME: usize = 4096;
    let node = TestNode::start(Config { max_frame: MAX_FRAME, ..secure_config() }).await;
    let mut alice = node.ws(&token("alice")).await;
    alice.send_text(&padded_ping("at-limit", MAX_FRAME)).await;
    let reply = alice.next().await;
    assert_eq!((reply["id"].as_str(), reply["ok"].as_bool()), (Some("at-limit"), Some(true)), "{reply}");

    alice.send_text(&padded_ping("over", MAX_FRAME + 1)).await;
    let closed = alice.next_or_closed().await.expect_err("an oversized frame must not be answered");
    assert_eq!(closed.code, 1009, "{closed:?}");

    assert_still_serves(&node).await;
}

#[tokio::test]
async fn a_binary_frame_closes_the_socket_with_1003() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    alice.send_message(Message::binary(br#"{"id":1,"op":"ping"}"#.to_vec())).await;
    let closed = alice.next_or_closed().await.expect_err("a binary frame must not be answered");
    assert_eq!(closed.code, 1003, "{closed:?}");

    assert_still_serves(&node).await;
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_the_socket_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    alice.send_message(Message::Frame(frame)).await;
    let closed = alice.next_or_closed().await.expect_err("invalid UTF-8 must not be answered");
    assert_eq!(closed.code, 1007, "{closed:?}");

    assert_still_serves(&node).await;
}

#[tokio::test]
async fn commands_beyond_the_rate_burst_close_the_socket_with_4008() {
    // One command a second, three at once: four sent back to back get three replies. (Sending
    // more would race the close: writes after it fail, which says nothing about the server.)
    let node = TestNode::start(Config { rate_limit: 1, rate_burst: 3, ..secure_config() }).await;
    let mut alice = node.ws(&token("alice")).await;
    for id in 1..=4 {
        alice.send_text(&json!({ "id": id, "op": "ping" }).to_string()).await;
    }
    let mut replied = Vec::new();
    let closed = loop {
        match alice.next_or_closed().await {
            Ok(frame) => {
                assert_eq!((frame["type"].as_str(), frame["ok"].as_bool()), (Some("reply"), Some(true)), "{frame}");
                replied.push(frame["id"].as_u64().unwrap());
            }
            Err(closed) => break closed,
        }
    };
    assert_eq!(replied, [1, 2, 3]);
    assert_eq!(closed.code, 4008, "{closed:?}");

    // The bucket is per connection: a new client is not throttled by alice's flood.
    assert_still_serves(&node).await;
}

// --- Tokens -----------------------------------------------------------------------------------

#[tokio::test]
async fn a_missing_token_closes_the_socket_with_4001() {
    let node = TestNode::start(secure_config()).await;
    assert_refused_at_connect(&node, "", 4001).await;
    assert_refused_at_connect(&node, "token=", 4001).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn an_expired_token_closes_the_socket_with_4011() {
    let node = TestNode::start(secure_config()).await;
    let expired = token_with(json!({ "sub": "alice", "exp": now_s() - 60 }));
    let closed = assert_refused_at_connect(&node, &format!("token={expired}"), 4011).await;
    assert!(closed.reason.contains("expired"), "{closed:?}");
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn a_token_signed_with_another_key_closes_the_socket_with_4001() {
    let node = TestNode::start(secure_config()).await;
    let forged = sign(json!({ "sub": "alice", "exp": now_s() + 3600 }), "not-the-node-secret-0123456789");
    assert_refused_at_connect(&node, &format!("token={forged}"), 4001).await;
    // A valid token with its signature swapped for another token's is forged as well.
    let (alice, bob) = (token("alice"), token("bob"));
    let spliced = format!("{}.{}", alice.rsplit_once('.').unwrap().0, bob.rsplit_once('.').unwrap().1);
    assert_refused_at_connect(&node, &format!("token={spliced}"), 4001).await;
    assert_refused_at_connect(&node, "token=not.a.jwt", 4001).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn an_alg_none_token_closes_the_socket_with_4001() {
    let node = TestNode::start(secure_config()).await;
    // `{"alg":"none","typ":"JWT"}` over a valid token's claims, with and without a signature.
    const NONE_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    let valid = token("alice");
    let mut parts = valid.split('.');
    let (claims, signature) = (parts.nth(1).unwrap(), parts.next().unwrap());
    assert_refused_at_connect(&node, &format!("token={NONE_HEADER}.{claims}."), 4001).await;
    assert_refused_at_connect(&node, &format!("token={NONE_HEADER}.{claims}.{signature}"), 4001).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn subscribing_outside_the_subs_claim_is_forbidden() {
    let node = TestNode::start(secure_config()).await;
    let rooms_only = token_with(json!({ "sub": "alice", "exp": now_s() + 3600, "subs": ["room:*"] }));
    let mut alice = node.ws(&rooms_only).await;
    let reply = alice.subscribe("news", None).await;
    assert_refused(&reply, "forbidden");
    assert_eq!(reply["id"], 1);
    assert_refused(&alice.command(json!({ "op": "presence", "channel": "news" })).await, "forbidden");
    let reply = alice.subscribe("room:1", None).await;
    assert_eq!(reply["ok"], true, "{reply}");

    // The refused subscribe left nothing behind: news is not delivered, room:1 is.
    node.publish("news", json!("headline")).await;
    let offset = node.publish("room:1", json!("hi")).await;
    let got = alice.messages(1).await.remove(0);
    assert_eq!((got["channel"].as_str(), got["offset"].as_u64()), (Some("room:1"), Some(offset)), "{got}");
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn another_users_personal_channel_is_forbidden() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    assert_refused(&alice.subscribe("user:bob", None).await, "forbidden");
    let reply = alice.subscribe("user:alice", None).await;
    assert_eq!(reply["ok"], true, "{reply}");
    // A `subs` glob covering it does not open another user's channel either.
    let greedy = token_with(json!({ "sub": "carol", "exp": now_s() + 3600, "subs": ["user:*"] }));
    let mut carol = node.ws(&greedy).await;
    assert_refused(&carol.subscribe("user:bob", None).await, "forbidden");
    assert_eq!(carol.subscribe("user:carol", None).await["ok"], true);

    let offset = node.publish("user:alice", json!("for alice")).await;
    assert_eq!(alice.messages(1).await[0]["offset"], offset);
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn publishing_from_a_socket_without_a_pubs_claim_is_forbidden() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    let reply = alice.command(json!({ "op": "publish", "channel": "room:1", "data": "hi" })).await;
    assert_refused(&reply, "forbidden");
    // With a `pubs` claim, only the channels it names.
    let mut bob = node.ws(&publisher("bob", &["room:*"])).await;
    let reply = bob.command(json!({ "op": "publish", "channel": "news", "data": "hi" })).await;
    assert_refused(&reply, "forbidden");
    let reply = bob.command(json!({ "op": "publish", "channel": "room:1", "data": "hi" })).await;
    assert_eq!((reply["ok"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(1)), "{reply}");

    assert_eq!(stored(&node, "room:1").await, [1]);
    assert_eq!(stored(&node, "news").await, Vec::<u64>::new());
    assert_still_serves(&node).await;
}

// --- Channel names ------------------------------------------------------------------------------

/// Names the channel syntax refuses: empty, too long, control characters, globs, Redis hash-tag
/// braces, whitespace, non-ASCII.
fn hostile_channel_names() -> Vec<String> {
    let mut names: Vec<String> = ["", "a\nb", "a\u{0}b", "a\rb", "*", "room:*", "{x}", "{room}:1", "a b", "é"]
        .into_iter()
        .map(String::from)
        .collect();
    names.push("a".repeat(200));
    names.push("a".repeat(129));
    names
}

#[tokio::test]
async fn hostile_channel_names_get_bad_channel_on_the_socket() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&publisher("alice", &["*"])).await;
    for name in hostile_channel_names() {
        let commands = [
            json!({ "op": "subscribe", "channel": name }),
            json!({ "op": "unsubscribe", "channel": name }),
            json!({ "op": "presence", "channel": name }),
            json!({ "op": "publish", "channel": name, "data": 1 }),
        ];
        for cmd in commands {
            let reply = alice.command(cmd.clone()).await;
            assert_refused(&reply, "bad_channel");
            assert!(reply["id"].is_u64(), "{cmd} -> {reply}");
        }
    }
    // The longest allowed name is fine.
    let longest = "a".repeat(128);
    assert_eq!(alice.subscribe(&longest, None).await["ok"], true);

    assert_serves(&node, &mut alice).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn hostile_channel_names_get_400_bad_channel_from_the_publish_api() {
    let node = TestNode::start(secure_config()).await;
    for name in hostile_channel_names() {
        let answer = node.api_post("/api/publish", json!({ "channel": name, "data": 1 })).await;
        assert_api_error(&answer, 400, "bad_channel");
    }
    let longest = "a".repeat(128);
    assert_eq!(node.publish(&longest, json!(1)).await, 1);
    assert_still_serves(&node).await;
}

// --- Server API ----------------------------------------------------------------------------------

#[tokio::test]
async fn api_requests_without_the_right_key_get_401_and_store_nothing() {
    let node = TestNode::start(secure_config()).await;
    let body = json!({ "channel": "room:1", "data": 1 }).to_string();
    let wrong_prefix = &API_KEY[..API_KEY.len() - 1];
    let longer = format!("{API_KEY}x");
    for key in [None, Some("wrong-key"), Some(wrong_prefix), Some(longer.as_str())] {
        let answer = node.api_raw(Method::POST, "/api/publish", key, body.clone()).await;
        assert_api_error(&answer, 401, "unauthorized");
        let answer = node.api_raw(Method::GET, "/api/history?channel=room:1", key, "").await;
        assert_api_error(&answer, 401, "unauthorized");
    }
    assert_eq!(stored(&node, "room:1").await, Vec::<u64>::new());
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn a_malformed_api_body_gets_400_bad_request() {
    let node = TestNode::start(secure_config()).await;
    for path in ["/api/publish", "/api/broadcast", "/api/disconnect"] {
        for body in ["{not json", "", "[1,2]", r#"{"channel":5,"channels":5,"data":1,"user":5}"#] {
            let answer = node.api_raw(Method::POST, path, Some(API_KEY), body).await;
            assert_api_error(&answer, 400, "bad_request");
        }
    }
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn a_publish_without_data_gets_400_bad_request() {
    let node = TestNode::start(secure_config()).await;
    assert_api_error(&node.api_post("/api/publish", json!({ "channel": "room:1" })).await, 400, "bad_request");
    assert_api_error(&node.api_post("/api/publish", json!({ "data": 1 })).await, 400, "bad_request");
    assert_api_error(&node.api_post("/api/broadcast", json!({ "channels": ["room:1"] })).await, 400, "bad_request");
    assert_eq!(stored(&node, "room:1").await, Vec::<u64>::new());
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn payloads_over_max_payload_get_413_payload_too_large() {
    const MAX_PAYLOAD: usize = 1024;
    let node = TestNode::start(Config { max_payload: MAX_PAYLOAD, ..secure_config() }).await;
    assert_eq!(node.publish("room:1", data_of_len(MAX_PAYLOAD)).await, 1);
    let over = data_of_len(MAX_PAYLOAD + 1);
    let answer = node.api_post("/api/publish", json!({ "channel": "room:1", "data": over })).await;
    assert_api_error(&answer, 413, "payload_too_large");
    let answer = node.api_post("/api/broadcast", json!({ "channels": ["room:1", "room:2"], "data": over })).await;
    assert_api_error(&answer, 413, "payload_too_large");
    // A body far over the limit is refused without being parsed.
    let huge = data_of_len(64 * 1024);
    let answer = node.api_post("/api/publish", json!({ "channel": "room:1", "data": huge })).await;
    assert_api_error(&answer, 413, "payload_too_large");
    // The socket has the same limit.
    let mut alice = node.ws(&publisher("alice", &["room:*"])).await;
    let reply = alice.command(json!({ "op": "publish", "channel": "room:1", "data": over })).await;
    assert_refused(&reply, "payload_too_large");

    assert_eq!(stored(&node, "room:1").await, [1]);
    assert_eq!(stored(&node, "room:2").await, Vec::<u64>::new());
    assert_serves(&node, &mut alice).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn a_broadcast_naming_one_bad_channel_gets_400_and_stores_nothing() {
    let node = TestNode::start(secure_config()).await;
    let body = json!({ "channels": ["room:1", "bad channel", "room:2"], "data": "hi" });
    assert_api_error(&node.api_post("/api/broadcast", body).await, 400, "bad_channel");
    for channel in ["room:1", "room:2"] {
        assert_eq!(stored(&node, channel).await, Vec::<u64>::new(), "{channel}");
    }
    let none = json!({ "channels": [], "data": "hi" });
    assert_api_error(&node.api_post("/api/broadcast", none).await, 400, "bad_request");

    let (status, body) = node.api_post("/api/broadcast", json!({ "channels": ["room:1", "room:2"], "data": 1 })).await;
    assert_eq!(status, 200, "{body}");
    let offsets: Vec<_> = body["results"].as_array().unwrap().iter().map(|r| r["offset"].as_u64()).collect();
    assert_eq!(offsets, [Some(1), Some(1)], "{body}");
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn a_disconnect_naming_neither_user_nor_conn_gets_400() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    let conn = alice.welcome["conn"].as_str().unwrap().to_owned();
    for body in [json!({}), json!({ "reason": "bye" }), json!({ "user": "alice", "conn": conn })] {
        assert_api_error(&node.api_post("/api/disconnect", body).await, 400, "bad_request");
    }
    // None of them disconnected alice.
    assert_serves(&node, &mut alice).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn an_unknown_api_route_gets_404() {
    let node = TestNode::start(secure_config()).await;
    assert_api_error(&node.api_post("/api/nope", json!({})).await, 404, "not_found");
    assert_api_error(&node.api_get("/api/publish/extra").await, 404, "not_found");
    assert_still_serves(&node).await;
}

// --- Per-connection and per-node limits ----------------------------------------------------------

#[tokio::test]
async fn a_subscribe_beyond_max_channels_gets_too_many_channels() {
    let node = TestNode::start(Config { max_channels: 2, ..secure_config() }).await;
    let mut alice = node.ws(&token("alice")).await;
    for channel in ["a", "b"] {
        assert_eq!(alice.subscribe(channel, None).await["ok"], true);
    }
    assert_refused(&alice.subscribe("c", None).await, "too_many_channels");
    // The refused subscribe registered nothing: c is not delivered.
    node.publish("c", json!("not for alice")).await;
    let offset = node.publish("a", json!("for alice")).await;
    let got = alice.messages(1).await.remove(0);
    assert_eq!((got["channel"].as_str(), got["offset"].as_u64()), (Some("a"), Some(offset)), "{got}");
    // Leaving one frees a place.
    assert_eq!(alice.command(json!({ "op": "unsubscribe", "channel": "a" })).await["ok"], true);
    let reply = alice.subscribe("c", None).await;
    assert_eq!((reply["ok"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(1)), "{reply}");
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn subscribing_twice_gets_already_subscribed_and_delivers_once() {
    let node = TestNode::start(Config { max_channels: 2, ..secure_config() }).await;
    let mut alice = node.ws(&token("alice")).await;
    assert_eq!(alice.subscribe("a", None).await["ok"], true);
    assert_refused(&alice.subscribe("a", None).await, "already_subscribed");
    assert_eq!(alice.subscribe("b", None).await["ok"], true);
    // At the channel limit, a repeat is still reported as a repeat.
    assert_refused(&alice.subscribe("a", None).await, "already_subscribed");

    let offset = node.publish("a", json!("once")).await;
    assert_eq!(alice.messages(1).await[0]["offset"], offset);
    assert_eq!(alice.command(json!({ "op": "ping" })).await["ok"], true);
    assert!(alice.pending_is_empty(), "a message was delivered twice");
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn unsubscribing_a_channel_not_subscribed_gets_not_subscribed() {
    let node = TestNode::start(secure_config()).await;
    let mut alice = node.ws(&token("alice")).await;
    let unsubscribe = json!({ "op": "unsubscribe", "channel": "a" });
    assert_refused(&alice.command(unsubscribe.clone()).await, "not_subscribed");
    assert_eq!(alice.subscribe("a", None).await["ok"], true);
    assert_eq!(alice.command(unsubscribe.clone()).await["ok"], true);
    assert_refused(&alice.command(unsubscribe).await, "not_subscribed");
    assert_serves(&node, &mut alice).await;
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn an_upgrade_beyond_max_connections_gets_http_503() {
    let node = TestNode::start(Config { max_connections: 1, ..secure_config() }).await;
    let mut holder = node.ws(&token("alice")).await;
    let bob = format!("token={}", token("bob"));
    match node.try_ws(&bob).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "unavailable", "{body}");
        }
        Err(e) => panic!("expected HTTP 503, got {e}"),
        Ok(_) => panic!("a second connection was upgraded beyond max_connections = 1"),
    }
    // SSE connections count against the same limit.
    let mut sse = node.sse(&format!("/sse?channel=room:1&{bob}"), None).await;
    assert_eq!(sse.status, 503);
    assert_eq!(sse.body_json().await["error"]["code"], "unavailable");

    assert_serves(&node, &mut holder).await;
    // Leaving frees the slot. The server frees it when the session task ends, a moment after
    // the socket closes, and no client can observe that moment: retry only while refused.
    drop(holder);
    let mut fresh = within("a free connection slot", async {
        loop {
            match node.try_ws(&bob).await {
                Ok(client) => return client,
                Err(WsError::Http(r)) if r.status().as_u16() == 503 => tokio::task::yield_now().await,
                Err(e) => panic!("expected an upgrade or 503, got {e}"),
            }
        }
    })
    .await;
    assert_eq!(fresh.next().await["type"], "welcome");
    assert_serves(&node, &mut fresh).await;
}

// --- Hostile data and operator input -------------------------------------------------------------

/// `data` nested `depth` arrays deep, spread over lines: JSON a publisher may legally send.
fn deeply_nested(depth: usize) -> String {
    format!("{}1{}", "[\n".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn data_nested_too_deep_gets_bad_request_on_every_publish_route() {
    let node = TestNode::start(Config { admin_key: Some("admin".into()), ..secure_config() }).await;
    let data = deeply_nested(200);
    let mut bob = node.ws(&publisher("bob", &["room:*"])).await;
    let reply = bob.send_raw_command(&format!(r#"{{"id":1,"op":"publish","channel":"room:1","data":{data}}}"#)).await;
    assert_refused(&reply, "bad_request");
    let publish = format!(r#"{{"channel":"room:1","data":{data}}}"#);
    let broadcast = format!(r#"{{"channels":["room:1"],"data":{data}}}"#);
    for (path, body, key) in [
        ("/api/publish", &publish, API_KEY),
        ("/api/broadcast", &broadcast, API_KEY),
        ("/admin/publish", &publish, "admin"),
    ] {
        let answer = node.api_raw(Method::POST, path, Some(key), body.clone()).await;
        assert_api_error(&answer, 400, "bad_request");
    }
    assert_eq!(stored(&node, "room:1").await, Vec::<u64>::new());
    // Nested as deep as JSON parsers commonly allow is fine, and arrives on one line.
    let reply = bob
        .send_raw_command(&format!(r#"{{"id":2,"op":"publish","channel":"room:1","data":{}}}"#, deeply_nested(100)))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_serves(&node, &mut bob).await;
}

#[tokio::test]
async fn a_ban_too_long_to_represent_is_refused_and_bans_nobody() {
    let node = TestNode::start(Config { admin_key: Some("admin".into()), ..secure_config() }).await;
    for ban_s in [u64::MAX, u64::MAX / 1000 + 1, 10 * 365 * 24 * 3600 + 1] {
        let body = json!({ "user": "mallory", "ban_s": ban_s });
        let answer = node.api_raw(Method::POST, "/admin/kick", Some("admin"), body.to_string()).await;
        assert_api_error(&answer, 400, "bad_request");
    }
    let mut mallory = node.ws(&token("mallory")).await;
    assert_serves(&node, &mut mallory).await;
}

#[tokio::test]
async fn a_websocket_protocol_violation_closes_with_1002() {
    let node = TestNode::start(secure_config()).await;
    let mut client = node.ws(&token("alice")).await;
    // A frame with a reserved bit set and an unknown opcode: tungstenite can send it raw.
    client.send_raw_bytes(&[0xF3, 0x80, 0, 0, 0, 0]).await;
    assert_eq!(client.closed().await.code, 1002);
    assert_still_serves(&node).await;
}

#[tokio::test]
async fn refused_tokens_take_no_connection_slot() {
    let node = TestNode::start(Config { max_connections: 2, ..secure_config() }).await;
    // Forged tokens, refused with 4001, whose clients never answer the close: the node is
    // still waiting for their close handshake while the real users connect.
    let mut forged = Vec::new();
    for _ in 0..4 {
        let mut c = node.ws_raw("token=forged").await;
        assert_eq!(c.next_or_closed().await.expect_err("no welcome for a forged token").code, 4001);
        forged.push(c);
    }
    let mut alice = node.ws(&token("alice")).await;
    let mut bob = node.ws(&token("bob")).await;
    assert_serves(&node, &mut alice).await;
    assert_serves(&node, &mut bob).await;
}
