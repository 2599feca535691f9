//! Property tests of everything a client or backend can hand the node before it is trusted:
//! command frames, SSE cursors, channel names and globs, tokens and their claims, published
//! data, percent-encoded queries, origins and proxy addresses. Each property holds for every
//! input proptest generates (256 a run, shrunk to the smallest counterexample on failure): the
//! parser never panics, and what it accepts means what it says. The network fuzzer
//! (`pushload fuzz`, in `fuzz.rs`) throws the same kinds of input at a running node.

use proptest::prelude::*;
use pushd::channel::{ChannelName, ChannelPattern};
use pushd::cursor::{self, Cursor};
use pushd::engine::{Epoch, NewMessage, Position};
use pushd::protocol::Command;
use serde_json::Value;
use serde_json::value::RawValue;

/// Strings that look like what travels: JSON fragments, channel-ish names, odd unicode.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,200}",
        r#"\{"(id|op|channel|since|data|event|idempotency_key)":[ -~]{0,40}\}"#,
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

/// Any JSON value, nested up to `depth` levels.
fn json(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(depth, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Glob matching the slow, obvious way, to hold the fast one against.
fn glob_reference(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_reference(&p[1..], s) || (!s.is_empty() && glob_reference(p, &s[1..])),
        (Some(a), Some(b)) if a == b => glob_reference(&p[1..], &s[1..]),
        _ => false,
    }
}

proptest! {
    // Failures are shrunk and printed; no regression files are written into the tree.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn command_frames_never_panic_and_errors_carry_a_code(text in texty()) {
        if let Err(bad) = Command::parse(&text) {
            prop_assert!(!bad.error.message.is_empty());
        }
    }

    #[test]
    fn commands_built_from_parts_parse_to_their_op_or_say_why_not(
        id in prop_oneof![Just(Value::Null), any::<u64>().prop_map(Value::from), ".{0,10}".prop_map(Value::from), any::<i64>().prop_map(Value::from)],
        op in prop_oneof![
            prop::sample::select(vec!["subscribe", "unsubscribe", "publish", "ping", "presence"]).prop_map(String::from),
            ".{0,8}",
        ],
        channel in prop::option::of(".{0,20}"),
        data in prop::option::of(json(3)),
        since in prop::option::of((".{0,10}", any::<u64>())),
    ) {
        let mut frame = serde_json::json!({ "id": id, "op": op });
        if let Some(c) = &channel { frame["channel"] = c.clone().into(); }
        if let Some(d) = &data { frame["data"] = d.clone(); }
        if let Some((epoch, offset)) = &since { frame["since"] = serde_json::json!({ "epoch": epoch, "offset": offset }); }
        match Command::parse(&frame.to_string()) {
            Ok(cmd) => prop_assert_eq!(cmd.op.name(), op.as_str()),
            Err(bad) => prop_assert!(!bad.error.message.is_empty()),
        }
    }

    #[test]
    fn cursors_never_panic(text in texty(), n in 0usize..200) {
        let _ = Cursor::parse(Some(&text), n);
    }

    #[test]
    fn cursors_read_back_what_was_written(positions in prop::collection::vec(("[0-9a-f]{16}", any::<u64>()), 1..130)) {
        let positions: Vec<Position> =
            positions.into_iter().map(|(e, offset)| Position { epoch: Epoch::new(&e), offset }).collect();
        let digest = cursor::digest(positions.iter().map(|p| &p.epoch));
        let mut text = Vec::new();
        cursor::write(&mut text, digest, &positions);
        let offsets = positions.iter().map(|p| p.offset).collect();
        prop_assert_eq!(Cursor::parse(Some(std::str::from_utf8(&text).unwrap()), positions.len()), Cursor::Digest { digest, offsets });
    }

    #[test]
    fn accepted_channel_names_keep_to_their_alphabet(name in texty()) {
        if let Ok(ch) = ChannelName::parse(&name) {
            prop_assert!((1..=128).contains(&ch.as_str().len()));
            prop_assert!(ch.as_str().chars().all(|c| c.is_ascii_alphanumeric() || "_.:@/=-".contains(c)));
        }
    }

    #[test]
    fn globs_match_exactly_what_the_slow_matcher_does(pattern in "[ab*]{1,12}", name in "[ab]{0,16}") {
        let fast = ChannelPattern::parse(&pattern).unwrap().matches(&name);
        prop_assert_eq!(fast, glob_reference(pattern.as_bytes(), name.as_bytes()));
    }

    #[test]
    fn tokens_of_any_shape_are_refused_or_name_their_user(
        token in texty(),
        claims in json(2),
        sub in prop::option::of(".{0,12}"),
        exp in prop_oneof![Just(None), any::<i64>().prop_map(Some), Just(Some(i64::MAX))],
    ) {
        let auth = pushd::auth::Authenticator::new(Some(pushd_tests::SECRET));
        let _ = auth.authenticate(Some(&token), None);
        let mut claims = if claims.is_object() { claims } else { serde_json::json!({ "x": claims }) };
        if let Some(s) = &sub { claims["sub"] = s.clone().into(); }
        if let Some(e) = exp { claims["exp"] = e.into(); }
        if let Ok(identity) = auth.authenticate(Some(&pushd_tests::token_with(claims)), None) {
            prop_assert_eq!(Some(identity.user), sub);
        }
    }

    #[test]
    fn published_data_is_refused_when_too_deep_and_otherwise_kept_as_the_same_json(value in json(6), wraps in 0usize..200) {
        let nested = (0..wraps).fold(value, |v, _| Value::Array(vec![v]));
        let text = serde_json::to_string_pretty(&nested).unwrap();
        let Ok(raw) = RawValue::from_string(text) else { return Ok(()) };
        match NewMessage::new(None, raw) {
            // The same text less the whitespace between tokens: what compact serialisation writes.
            Ok(msg) => prop_assert_eq!(msg.data.get(), serde_json::to_string(&nested).unwrap()),
            // Only nesting past 128 levels is refused: at least 122 wraps around a value 6 deep.
            Err(_) => prop_assert!(wraps > 121, "refused at {wraps} wraps"),
        }
    }

    #[test]
    fn queries_and_proxy_addresses_never_panic(text in texty()) {
        let _ = pushd::http::percent_decode(&text);
        let _ = pushd::client_addr::Cidr::parse(&text);
    }

    #[test]
    fn origins_of_any_shape_are_judged_without_panicking(origin in "[ -~]{0,60}", host in "[ -~]{0,40}", proto in "[ -~]{0,10}") {
        let config = pushd_tests::secure_config();
        let Ok(req) = hyper_request(&host, &origin, &proto) else { return Ok(()) };
        let _ = pushd::origin::check(&config, &req, true);
        let _ = pushd::origin::check(&pushd::Config::dev(), &req, true);
    }
}

/// A request with these headers, if they are valid header values at all.
fn hyper_request(host: &str, origin: &str, proto: &str) -> Result<hyper::Request<()>, hyper::http::Error> {
    hyper::Request::get("/ws").header("host", host).header("origin", origin).header("x-forwarded-proto", proto).body(())
}
