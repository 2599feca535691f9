//! Redis faults on real `redis-server` processes: killed connections, an outage, a Redis that
//! comes back empty. Whatever Redis stored reaches every subscriber once and in order; whatever
//! it did not is refused loudly (503, `unavailable`), and what it may have stored without
//! answering says so (504, `outcome_unknown`); history that is gone is announced (`reset`,
//! `recovered: false`), never skipped silently.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use pushd_tests::backends::Backend;
use pushd_tests::*;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The guard on these tests' slow events: the node's Redis client reconnects with a backoff that
/// climbs to 5 s, so coming back after a fault can take longer than the harness's 10 s `WAIT`.
pub(crate) const FAULT_WAIT: Duration = Duration::from_secs(30);
/// How long Redis stays down in the outage test: several reconnect attempts, backoff climbing.
const OUTAGE: Duration = Duration::from_secs(5);

/// The channels the kill tests publish to, round robin.
pub(crate) const CHANNELS: [&str; 3] = ["faults:a", "faults:b", "faults:c"];
/// Messages the kill tests publish, alternating nodes.
pub(crate) const PUBLISHES: u64 = 2000;
/// After how many publishes the kill tests kill connections.
pub(crate) const KILL_AT: [u64; 4] = [300, 700, 1100, 1500];
/// Publishes the kill tests keep in flight.
const IN_FLIGHT: usize = 8;

/// Awaits `fut` under `FAULT_WAIT`, panicking with `what` if it does not finish.
pub(crate) async fn guard<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(FAULT_WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `/readyz` until it answers `status`; returns its body.
pub(crate) async fn await_readiness(node: &TestNode, status: u16) -> Value {
    guard(&format!("/readyz to answer {status}"), async {
        loop {
            let (got, body) = node.api_get("/readyz").await;
            if got == status {
                return body;
            }
            // Readiness is a state with no event to await: poll it, briefly, under the guard.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

fn offset(frame: &Value) -> u64 {
    frame["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {frame}"))
}

pub(crate) fn offsets(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(offset).collect()
}

pub(crate) fn ns(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["data"]["n"].as_u64().unwrap_or_else(|| panic!("no data.n in {f}"))).collect()
}

fn ping() -> Value {
    json!({ "op": "ping" })
}

/// Asserts a refused publish said so plainly: 503 with `{"error":{"code":"unavailable",..}}`:
/// nothing reached Redis, nothing was stored.
fn assert_unavailable(status: u16, body: &Value) {
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// Asserts a failed publish told the truth about itself: 503 `unavailable` (not stored), or 504
/// `outcome_unknown` when the connection broke under a publish Redis may have run.
pub(crate) fn assert_failed_honestly(status: u16, body: &Value) {
    match status {
        503 => assert_unavailable(status, body),
        504 => assert_eq!(body["error"]["code"], "outcome_unknown", "{body}"),
        _ => panic!("a failed publish answered {status}: {body}"),
    }
}

/// What the publisher saw.
#[derive(Default)]
pub(crate) struct Published {
    /// Acknowledged publishes: (channel index, offset, n).
    pub(crate) acked: Vec<(usize, u64, u64)>,
    /// Refused attempts: status and body.
    pub(crate) refused: Vec<(u16, Value)>,
}

/// Publishes `PUBLISHES` messages `{"n": n}` round robin over `CHANNELS`, alternating nodes,
/// `IN_FLIGHT` at a time (so a kill finds commands on the wire), each with the idempotency key
/// `n<n>`; reports how many finished on `progress`. With `retry`, a refused publish is retried
/// with the same key until acknowledged, as a careful backend would.
pub(crate) async fn publish_all(nodes: &[TestNode], progress: watch::Sender<u64>, retry: bool) -> Published {
    let mut out = Published::default();
    let mut publishes = stream::iter(0..PUBLISHES).map(|n| publish_one(nodes, n, retry)).buffer_unordered(IN_FLIGHT);
    let mut done = 0;
    while let Some((acked, refused)) = publishes.next().await {
        out.acked.extend(acked);
        out.refused.extend(refused);
        done += 1;
        progress.send_replace(done);
    }
    out
}

/// Publishes message `n`; returns its acknowledgement, if any, and the refusals before it.
async fn publish_one(nodes: &[TestNode], n: u64, retry: bool) -> (Option<(usize, u64, u64)>, Vec<(u16, Value)>) {
    let ch = (n % CHANNELS.len() as u64) as usize;
    let node = &nodes[(n % nodes.len() as u64) as usize];
    let body = json!({ "channel": CHANNELS[ch], "data": { "n": n }, "idempotency_key": format!("n{n}") });
    let mut refused = Vec::new();
    for _attempt in 0..50 {
        let (status, reply) = node.api_post("/api/publish", body.clone()).await;
        if status == 200 {
            return (Some((ch, offset(&reply), n)), refused);
        }
        refused.push((status, reply));
        if !retry {
            break;
        }
    }
    (None, refused)
}

/// Runs `CLIENT KILL TYPE <kind>` each time the publisher passes a `KILL_AT` mark; returns how
/// many connections each kill closed.
async fn kill_connections(backend: &Backend, kind: &str, mut progress: watch::Receiver<u64>) -> Vec<u64> {
    let mut killed = Vec::new();
    for at in KILL_AT {
        progress.wait_for(|n| *n >= at).await.expect("the publisher stopped early");
        let mut closed = 0;
        for out in backend.cli_all(&["CLIENT", "KILL", "TYPE", kind]).await {
            closed += out.trim().parse::<u64>().unwrap_or_else(|_| panic!("CLIENT KILL answered {out:?}"));
        }
        killed.push(closed);
    }
    killed
}

/// Publishes the end marker `{"end": true}` to every channel, retrying a refusal with the same
/// idempotency key (a kill may have just closed the connection it went to); returns each
/// marker's offset, which is the channel's top.
pub(crate) async fn publish_end_markers(node: &TestNode) -> Vec<u64> {
    let mut top = Vec::new();
    for channel in CHANNELS {
        let body = json!({ "channel": channel, "data": { "end": true }, "idempotency_key": "end" });
        let offset = guard("an end marker", async {
            loop {
                let (status, reply) = node.api_post("/api/publish", body.clone()).await;
                if status == 200 {
                    return offset(&reply);
                }
                assert_failed_honestly(status, &reply);
            }
        })
        .await;
        top.push(offset);
    }
    top
}

/// What one subscriber saw: its client and its messages per channel, in arrival order.
pub(crate) type Seen = (WsClient, HashMap<String, Vec<Value>>);

/// Reads one subscriber's frames until each of its channels delivered the end marker. Any other
/// frame (a `reset`) or a close fails the test: with history intact, nothing may be skipped or
/// announced as lost.
pub(crate) async fn read_to_end(mut client: WsClient, channels: Vec<&'static str>) -> Seen {
    let mut seen: HashMap<String, Vec<Value>> = HashMap::new();
    let mut open = channels.len();
    while open > 0 {
        let frame = client.next().await;
        assert_eq!(frame["type"], "message", "expected only messages, got {frame}");
        let channel = frame["channel"].as_str().unwrap().to_owned();
        assert!(channels.contains(&channel.as_str()), "a message of a channel not subscribed: {frame}");
        if frame["data"]["end"] == true {
            open -= 1;
        }
        seen.entry(channel).or_default().push(frame);
    }
    (client, seen)
}

/// Subscribers on every node, each reading in its own task until the end markers.
pub(crate) struct Readers {
    tasks: Vec<(Vec<&'static str>, JoinHandle<Seen>)>,
    /// Each channel's epoch, as the subscribe replies gave it.
    epochs: HashMap<&'static str, Value>,
}

impl Readers {
    /// On each node, one client on every channel and one on the first only, all from offset 0.
    pub(crate) async fn start(nodes: &[TestNode]) -> Self {
        let mut readers = Readers { tasks: Vec::new(), epochs: HashMap::new() };
        for node in nodes {
            for (user, channels) in [("every", CHANNELS.to_vec()), ("first", vec![CHANNELS[0]])] {
                let mut client = node.ws(&token(user)).await;
                for channel in &channels {
                    let reply = client.subscribe(channel, None).await;
                    assert_eq!((reply["ok"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(0)), "{reply}");
                    let epoch = readers.epochs.entry(channel).or_insert_with(|| reply["epoch"].clone());
                    assert_eq!(epoch, &reply["epoch"], "nodes disagree on {channel}'s epoch");
                }
                readers.tasks.push((channels.clone(), tokio::spawn(read_to_end(client, channels))));
            }
        }
        readers
    }

    /// Asserts that every subscriber received every offset Redis stored (1..=top), once, in
    /// order, each acknowledged publish at its offset, and nothing after the end markers.
    pub(crate) async fn assert_saw_every_stored_offset(self, published: &Published, top: &[u64]) {
        for (channels, task) in self.tasks {
            let (mut client, seen) = guard("every subscriber to read to the end", task).await.expect("a reader failed");
            for (ch, channel) in CHANNELS.iter().enumerate().filter(|(_, c)| channels.contains(c)) {
                let frames = &seen[*channel];
                assert_eq!(offsets(frames), (1..=top[ch]).collect::<Vec<_>>(), "{channel} on {}", client.welcome);
                for &(_, at, n) in published.acked.iter().filter(|(c, ..)| *c == ch) {
                    let got = &frames[at as usize - 1]["data"]["n"];
                    assert_eq!(got, n, "{channel}: offset {at} was acknowledged for n={n}");
                }
            }
            // A ping round trip finds no late duplicate queued behind the end markers.
            assert_eq!(client.command(ping()).await["ok"], true);
            assert!(client.pending_is_empty(), "frames after the end marker");
        }
    }
}

/// Two nodes, subscribers on both, `PUBLISHES` messages through the API while `CLIENT KILL TYPE
/// <kind>` closes connections a few times. Asserts that every subscriber received every stored
/// offset once and in order, and that every refused publish was a plain 503. Returns what the
/// publisher saw and how many connections each kill closed.
async fn publish_while_killing(backend: Backend, kind: &'static str, retry: bool) -> (Published, Vec<u64>) {
    let nodes = nodes_on(2, &backend, |c| c).await;
    let readers = Readers::start(&nodes).await;
    let (tx, rx) = watch::channel(0);
    let (published, killed) = guard("publishing while connections are killed", async {
        tokio::join!(publish_all(&nodes, tx, retry), kill_connections(&backend, kind, rx))
    })
    .await;
    let top = publish_end_markers(&nodes[0]).await;
    readers.assert_saw_every_stored_offset(&published, &top).await;
    for (status, body) in &published.refused {
        assert_failed_honestly(*status, body);
    }
    for node in nodes {
        node.stop().await;
    }
    (published, killed)
}

#[tokio::test]
async fn killing_the_pubsub_connection_loses_nothing() {
    let (published, killed) = publish_while_killing(Backend::single().await, "pubsub", false).await;
    // The first kill found both nodes' pub/sub connections; later ones may find a node still
    // reconnecting.
    assert_eq!(killed[0], 2 * secure_config().redis_subscribers as u64, "kills closed {killed:?}");
    // Publishing does not use the pub/sub connection: nothing was refused.
    assert_eq!(published.acked.len() as u64, PUBLISHES, "refused: {:?}", published.refused);
}

#[tokio::test]
async fn killing_the_sharded_pubsub_connections_of_a_redis_cluster_loses_nothing() {
    let (published, killed) = publish_while_killing(Backend::cluster().await, "pubsub", false).await;
    // Each node holds a pub/sub connection to every primary that serves one of its channels
    // (and one for the control channel): the first kill closed at least one per node.
    assert!(killed[0] >= 2, "kills closed {killed:?}");
    assert_eq!(published.acked.len() as u64, PUBLISHES, "refused: {:?}", published.refused);
}

#[tokio::test]
async fn killing_command_connections_refuses_publishes_plainly_and_a_keyed_retry_stores_once() {
    let (published, killed) = publish_while_killing(Backend::single().await, "normal", true).await;
    // Both nodes' command pools were fully connected at the first kill.
    assert_eq!(killed[0], 2 * secure_config().redis_pool as u64, "kills closed {killed:?}");
    // Every publish was eventually acknowledged, exactly once: a retry whose first attempt Redis
    // had stored returned that first offset instead of storing the message again, which the
    // subscribers' 1..=top check above would have shown as an extra offset.
    let mut by_n: BTreeMap<u64, u64> = BTreeMap::new();
    for &(_, at, n) in &published.acked {
        assert!(by_n.insert(n, at).is_none(), "n={n} acknowledged twice");
    }
    assert_eq!(by_n.len() as u64, PUBLISHES);
    for (ch, channel) in CHANNELS.iter().enumerate() {
        let count = published.acked.iter().filter(|(c, ..)| *c == ch).count() as u64;
        let mut at: Vec<u64> = published.acked.iter().filter(|(c, ..)| *c == ch).map(|a| a.1).collect();
        at.sort_unstable();
        assert_eq!(at, (1..=count).collect::<Vec<_>>(), "{channel}: acknowledged offsets");
    }
}

#[tokio::test]
async fn redis_outage_gets_503_and_loses_nothing_acknowledged() {
    let mut redis = RedisServer::start_with_aof().await;
    let node = TestNode::start(redis_config(&redis, "n0")).await;
    let mut subscribers = Vec::new();
    let mut epoch = String::new();
    for user in ["alice", "bob"] {
        let mut client = node.ws(&token(user)).await;
        let reply = client.subscribe("room:1", None).await;
        assert_eq!((reply["ok"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(0)), "{reply}");
        epoch = reply["epoch"].as_str().unwrap().to_owned();
        subscribers.push(client);
    }
    for n in 1..=5 {
        let (status, reply) = node.api_post("/api/publish", json!({ "channel": "room:1", "data": { "n": n } })).await;
        assert_eq!((status, reply["offset"].as_u64(), reply["epoch"].as_str()), (200, Some(n), Some(epoch.as_str())));
    }
    for client in &mut subscribers {
        let got = client.messages(5).await;
        assert_eq!((offsets(&got), ns(&got)), ((1..=5).collect(), (1..=5).collect()));
    }

    redis.kill().await;
    let down_at = Instant::now();
    let readiness = await_readiness(&node, 503).await;
    assert_eq!(readiness, json!({ "ready": false, "reason": "engine unavailable" }));
    // A publish racing the node's notice of the crash can only say it got no answer (504); once
    // the node knows every connection is down it refuses plainly (503), at once.
    guard("a plain refusal", async {
        loop {
            let (status, body) =
                node.api_post("/api/publish", json!({ "channel": "room:1", "data": { "n": 100 } })).await;
            if status == 503 {
                return assert_unavailable(status, &body);
            }
            assert_failed_honestly(status, &body);
        }
    })
    .await;
    for n in 101..103 {
        let (status, body) = node.api_post("/api/publish", json!({ "channel": "room:1", "data": { "n": n } })).await;
        assert_unavailable(status, &body);
    }
    // The sockets stay up through the outage.
    for client in &mut subscribers {
        assert_eq!(client.command(ping()).await["ok"], true);
        assert!(client.pending_is_empty(), "a frame during the outage");
    }
    // The outage itself is the point: Redis stays down while the node's reconnect backoff climbs.
    tokio::time::sleep_until(down_at + OUTAGE).await;
    redis.restart().await;
    assert_eq!(await_readiness(&node, 200).await, json!({ "ready": true }));

    // Offsets continue in the same epoch: the refused publishes took no offset.
    for n in 6..=10 {
        let (status, reply) = node.api_post("/api/publish", json!({ "channel": "room:1", "data": { "n": n } })).await;
        assert_eq!(
            (status, reply["offset"].as_u64(), reply["epoch"].as_str()),
            (200, Some(n), Some(epoch.as_str())),
            "{reply}"
        );
    }
    for client in &mut subscribers {
        let got = guard("messages after the outage", client.messages(5)).await;
        assert_eq!((offsets(&got), ns(&got)), ((6..=10).collect(), (6..=10).collect()), "{}", client.welcome);
        assert_eq!(client.command(ping()).await["ok"], true);
        assert!(client.pending_is_empty(), "a duplicate after the outage");
    }
    let (status, history) = node.api_get("/api/history?channel=room:1&limit=100").await;
    assert_eq!((status, history["epoch"].as_str(), history["top"].as_u64()), (200, Some(epoch.as_str()), Some(10)));
    let stored: Vec<u64> =
        history["publications"].as_array().unwrap().iter().map(|p| p["data"]["n"].as_u64().unwrap()).collect();
    assert_eq!(stored, (1..=10).collect::<Vec<_>>(), "{history}");
    node.stop().await;
}

#[tokio::test]
async fn redis_restarted_empty_tells_clients_they_cannot_recover() {
    let mut redis = RedisServer::start().await;
    let node = TestNode::start(redis_config(&redis, "n0")).await;
    let mut alice = node.ws(&token("alice")).await;
    let old_epoch = alice.subscribe("room:1", None).await["epoch"].as_str().unwrap().to_owned();
    let mut bob = node.ws(&token("bob")).await;
    assert_eq!(bob.subscribe("room:1", None).await["epoch"], old_epoch.as_str());
    for n in 1..=3 {
        assert_eq!(node.publish("room:1", json!({ "n": n })).await, n);
    }
    assert_eq!(offsets(&alice.messages(3).await), [1, 2, 3]);
    assert_eq!(offsets(&bob.messages(3).await), [1, 2, 3]);
    drop(bob); // remembers (old_epoch, 3)

    // No persistence: every key is gone. The node must notice the loss before its readiness
    // means anything again (until then a connection to the dead server may still look up).
    redis.kill().await;
    await_readiness(&node, 503).await;
    redis.restart().await;
    assert_eq!(await_readiness(&node, 200).await, json!({ "ready": true }));
    let mut new_epoch = String::new();
    for n in 1..=3 {
        let (status, reply) = node.api_post("/api/publish", json!({ "channel": "room:1", "data": { "n": n } })).await;
        assert_eq!((status, reply["offset"].as_u64()), (200, Some(n)), "{reply}");
        new_epoch = reply["epoch"].as_str().unwrap().to_owned();
    }
    assert_ne!(new_epoch, old_epoch);

    // Alice is told before anything of the new epoch arrives, then gets all of it.
    let reset = guard("a reset", alice.next_or_closed()).await.expect("alice was closed instead of reset");
    assert_eq!(
        (&reset["type"], &reset["channel"], &reset["epoch"], &reset["offset"]),
        (&json!("reset"), &json!("room:1"), &json!(new_epoch), &json!(0)),
        "{reset}"
    );
    let got = alice.messages(3).await;
    assert_eq!((offsets(&got), ns(&got)), (vec![1, 2, 3], vec![1, 2, 3]));
    assert_eq!(alice.command(ping()).await["ok"], true);
    assert!(alice.pending_is_empty());

    // Bob's old position cannot be recovered, and he is told so with where the channel is now.
    let mut bob = node.ws(&token("bob")).await;
    let reply = bob.subscribe("room:1", Some((&old_epoch, 3))).await;
    assert_eq!(
        (&reply["ok"], &reply["recovered"], &reply["epoch"], &reply["offset"], &reply["replayed"]),
        (&json!(true), &json!(false), &json!(new_epoch), &json!(3), &json!(0)),
        "{reply}"
    );
    // Both continue live in the new epoch.
    assert_eq!(node.publish("room:1", json!({ "n": 4 })).await, 4);
    for client in [&mut alice, &mut bob] {
        assert_eq!(offsets(&client.messages(1).await), [4]);
    }
    node.stop().await;
}

#[tokio::test]
async fn subscribing_while_redis_is_down_is_refused_plainly_and_works_after_it_returns() {
    let mut redis = RedisServer::start().await;
    let node = TestNode::start(redis_config(&redis, "n0")).await;
    let mut alice = node.ws(&token("alice")).await;
    let publisher = token_with(json!({ "sub": "carol", "exp": now_s() + 3600, "pubs": ["room:*"] }));
    let mut carol = node.ws(&publisher).await;

    redis.kill().await;
    await_readiness(&node, 503).await;
    // A subscribe, a resubscribe with a position and a socket publish each get `unavailable`,
    // never a reply that looks like success.
    let refused = [
        guard("subscribe reply", alice.subscribe("room:2", None)).await,
        guard("resubscribe reply", alice.subscribe("room:3", Some(("some-epoch", 0)))).await,
        guard("publish reply", carol.command(json!({ "op": "publish", "channel": "room:1", "data": { "n": 0 } })))
            .await,
    ];
    for reply in &refused {
        assert_eq!((&reply["ok"], &reply["error"]["code"]), (&json!(false), &json!("unavailable")), "{reply}");
    }
    let (status, body) = node.api_get("/api/history?channel=room:1").await;
    assert_unavailable(status, &body);

    redis.restart().await;
    assert_eq!(await_readiness(&node, 200).await, json!({ "ready": true }));
    // The same socket subscribes now: the refused subscribe left nothing behind.
    let reply = alice.subscribe("room:2", None).await;
    assert_eq!((&reply["ok"], &reply["offset"]), (&json!(true), &json!(0)), "{reply}");
    let reply = carol.command(json!({ "op": "publish", "channel": "room:2", "data": { "n": 1 } })).await;
    assert_eq!((&reply["ok"], &reply["offset"]), (&json!(true), &json!(1)), "{reply}");
    let got = guard("the first message after the outage", alice.messages(1)).await;
    assert_eq!(
        (&got[0]["channel"], &got[0]["offset"], &got[0]["data"]),
        (&json!("room:2"), &json!(1), &json!({ "n": 1 }))
    );
    node.stop().await;
}

#[tokio::test]
async fn a_message_published_while_the_node_is_unsubscribed_arrives_without_further_traffic() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(redis_config(&redis, "n0")).await;
    let mut alice = node.ws(&token("alice")).await;
    assert_eq!(alice.subscribe("room:1", None).await["offset"], 0);
    // Kill the node's subscriber connection and publish at once, until one publish provably went
    // out while the node had no subscription (its reconnect waits at least 100 ms, so the first
    // try nearly always does). Redis never delivers that message on pub/sub: only the node's
    // catch-up from the stream after it reconnects can.
    let mut published = 0;
    let unseen = guard("a publish while the node is unsubscribed", async {
        loop {
            let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
            published += 1;
            assert_eq!(node.publish("room:1", json!({ "n": published })).await, published);
            let numsub = redis.cli(&["PUBSUB", "NUMSUB", "pushd:{room:1}"]).await;
            if killed.trim() != "0" && numsub.lines().last() == Some("0") {
                return published;
            }
        }
    })
    .await;
    // Nothing else is published: the message must arrive on its own, after what came before.
    let got = guard("the message published while unsubscribed", alice.messages(unseen as usize)).await;
    assert_eq!((offsets(&got), ns(&got)), ((1..=unseen).collect(), (1..=unseen).collect()));
    // And live delivery works again afterwards.
    assert_eq!(node.publish("room:1", json!({ "n": unseen + 1 })).await, unseen + 1);
    assert_eq!(offsets(&alice.messages(1).await), [unseen + 1]);
    assert_eq!(alice.command(ping()).await["ok"], true);
    assert!(alice.pending_is_empty());
    node.stop().await;
}

#[tokio::test]
async fn a_redis_crash_under_load_loses_nothing_acknowledged() {
    let mut redis = RedisServer::start_with_aof().await;
    let nodes = cluster(2, &redis).await;
    let readers = Readers::start(&nodes).await;
    let (tx, mut rx) = watch::channel(0);
    let crash = async {
        rx.wait_for(|n| *n >= KILL_AT[1]).await.expect("the publisher stopped early");
        redis.kill().await;
        redis.restart().await;
    };
    let (published, ()) =
        guard("publishing through a Redis crash", async { tokio::join!(publish_all(&nodes, tx, false), crash) }).await;
    for node in &nodes {
        await_readiness(node, 200).await;
    }
    let top = publish_end_markers(&nodes[0]).await;
    let epochs = readers.epochs.clone();
    readers.assert_saw_every_stored_offset(&published, &top).await;
    for (status, body) in &published.refused {
        assert_failed_honestly(*status, body);
    }
    // AOF kept the channels: same epochs, so positions from before the crash still recover.
    for channel in CHANNELS {
        let (_, history) = nodes[1].api_get(&format!("/api/history?channel={channel}&limit=1")).await;
        assert_eq!(history["epoch"], epochs[channel], "{history}");
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn history_wiped_while_the_node_is_unsubscribed_resets_to_the_new_epoch_and_replays_it() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(redis_config(&redis, "n0")).await;
    let mut alice = node.ws(&token("alice")).await;
    let old_epoch = alice.subscribe("room:1", None).await["epoch"].as_str().unwrap().to_owned();
    assert_eq!(node.publish("room:1", json!({ "n": 1 })).await, 1);
    assert_eq!(offsets(&alice.messages(1).await), [1]);

    // Redis loses everything (as a failover to an empty replica would) and the new epoch's first
    // messages go out while the node has no pub/sub subscription: it learns of them only from
    // the stream when it reconnects.
    redis.cli(&["FLUSHALL"]).await;
    let mut published = 0;
    let mut new_epoch = String::new();
    guard("a publish while the node is unsubscribed", async {
        loop {
            let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
            published += 1;
            let (status, reply) =
                node.api_post("/api/publish", json!({ "channel": "room:1", "data": { "n": published } })).await;
            assert_eq!((status, reply["offset"].as_u64()), (200, Some(published)), "{reply}");
            new_epoch = reply["epoch"].as_str().unwrap().to_owned();
            let numsub = redis.cli(&["PUBSUB", "NUMSUB", "pushd:{room:1}"]).await;
            if killed.trim() != "0" && numsub.lines().last() == Some("0") {
                return;
            }
        }
    })
    .await;
    assert_ne!(new_epoch, old_epoch);

    // The history of the new epoch is complete: alice is told of the new epoch from its start
    // and then gets every message of it, none skipped under the reset.
    let reset = guard("a reset", alice.next_or_closed()).await.expect("alice was closed instead of reset");
    assert_eq!(
        (&reset["type"], &reset["epoch"], &reset["offset"]),
        (&json!("reset"), &json!(new_epoch), &json!(0)),
        "{reset}"
    );
    let got = guard("the new epoch's messages", alice.messages(published as usize)).await;
    assert_eq!((offsets(&got), ns(&got)), ((1..=published).collect(), (1..=published).collect()));
    assert_eq!(alice.command(ping()).await["ok"], true);
    assert!(alice.pending_is_empty());
    node.stop().await;
}

#[tokio::test]
async fn with_redis_down_the_admin_api_answers_for_its_own_node_and_says_the_rest_are_unknown() {
    let mut redis = RedisServer::start().await;
    let config = pushd::Config { admin_key: Some("adm".into()), ..redis_config(&redis, "n0") };
    let node = TestNode::start(config).await;
    let mut alice = node.ws(&token("alice")).await;
    assert_eq!(alice.subscribe("faults:admin", None).await["ok"], true);
    redis.kill().await;
    await_readiness(&node, 503).await;

    let resp = reqwest::Client::new().get(node.url("/admin/stats")).bearer_auth("adm").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let stats: Value = resp.json().await.unwrap();
    assert_eq!(stats["nodes"][0]["id"], "n0", "{stats}");
    assert_eq!(stats["totals"]["connections"], 1, "{stats}");
    // `missing` names nodes only; that the others are unknown, and why, has its own field.
    assert_eq!(stats["missing"], serde_json::json!([]), "{stats}");
    assert!(stats["others_unknown"].as_str().unwrap().contains("other nodes unknown"), "{stats}");
}

#[tokio::test]
async fn a_publish_redis_did_not_answer_in_time_is_an_unknown_outcome_and_a_keyed_retry_stores_once() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(redis_config(&redis, "n0")).await;
    let mut alice = node.ws(&token("alice")).await;
    assert_eq!(alice.subscribe("stall", None).await["ok"], true);
    let publisher = token_with(json!({ "sub": "bob", "exp": now_s() + 3600, "pubs": ["stall"] }));
    let mut bob = node.ws(&publisher).await;

    // Redis holds every write for longer than the node waits: the node cannot know whether the
    // publish will be stored, and must not say it was not.
    redis.cli(&["CLIENT", "PAUSE", "5000", "WRITE"]).await;
    let body = json!({ "channel": "stall", "data": { "n": 1 }, "idempotency_key": "stall-1" });
    let by_socket = json!({ "op": "publish", "channel": "stall", "data": { "n": 2 }, "idempotency_key": "stall-2" });
    let ((status, reply), socket_reply) =
        tokio::join!(node.api_post("/api/publish", body.clone()), bob.command(by_socket.clone()));
    assert_eq!((status, &reply["error"]["code"]), (504, &json!("outcome_unknown")), "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("may have been stored") && message.contains("idempotency_key"), "{message}");
    assert!(!message.contains("script") && !message.contains("ERR"), "Redis' internals stay in the log: {message}");
    assert_eq!(socket_reply["error"]["code"], "outcome_unknown", "{socket_reply}");

    // When Redis resumes it runs both (in either order): they were stored after all.
    let got = guard("the paused publishes", alice.messages(2)).await;
    let mut stored_ns = ns(&got);
    stored_ns.sort_unstable();
    assert_eq!((offsets(&got), stored_ns), (vec![1, 2], vec![1, 2]));
    // Retries with the same keys return the first results instead of storing twice.
    let (status, reply) = node.api_post("/api/publish", body).await;
    let first: Vec<u64> = got.iter().filter(|m| m["data"]["n"] == 1).map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!((status, vec![reply["offset"].as_u64().unwrap()]), (200, first), "{reply}");
    let retried = bob.command(by_socket).await["offset"].as_u64();
    let stored: Vec<u64> = got.iter().filter(|m| m["data"]["n"] == 2).map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(retried.into_iter().collect::<Vec<_>>(), stored, "the socket's retry returns the first result");
    let (_, history) = node.api_get("/api/history?channel=stall").await;
    assert_eq!(history["top"], 2, "{history}");
    assert_eq!(alice.command(ping()).await["ok"], true);
    assert!(alice.pending_is_empty(), "a retry was delivered again");
}

#[tokio::test]
async fn a_stalled_redis_cannot_hold_an_admin_answer_past_its_timeout() {
    let redis = RedisServer::start().await;
    let config = pushd::Config { admin_key: Some("adm".into()), ..redis_config(&redis, "n0") };
    let node = TestNode::start(config).await;
    let mut alice = node.ws(&token("alice")).await;
    for i in 0..40 {
        assert_eq!(alice.subscribe(&format!("stalled:{i}"), None).await["ok"], true);
    }
    // Redis stops answering anything for longer than any test waits; the node is never told.
    redis.cli(&["CLIENT", "PAUSE", "60000", "ALL"]).await;
    let admin = |path: &str| {
        let url = node.url(&format!("{path}{}timeout_ms=500", if path.contains('?') { '&' } else { '?' }));
        async move {
            // The harness's guard is the bound: one Redis call per row, in turn, would take minutes.
            let resp = within(&format!("GET {url}"), reqwest::Client::new().get(url.clone()).bearer_auth("adm").send())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, within("the body", resp.json::<Value>()).await.unwrap())
        }
    };
    let (status, channels) = admin("/admin/channels?limit=100").await;
    assert_eq!(status, 200, "{channels}");
    let rows = channels["channels"].as_array().unwrap();
    assert_eq!(rows.len(), 40, "this node's own rows are known without Redis: {channels}");
    assert!(rows.iter().all(|r| r["history_len"].is_null()), "a history Redis did not report is unknown, not 0");
    let partial = !channels["missing"].as_array().unwrap().is_empty() || channels["others_unknown"].is_string();
    assert!(partial, "the answer says it is partial: {channels}");
    let (status, stats) = admin("/admin/stats").await;
    assert_eq!((status, &stats["totals"]["subscriptions"]), (200, &json!(40)), "{stats}");
    assert!(stats["redis"].is_null(), "Redis' own stats are unknown: {stats}");
    let (status, detail) = admin("/admin/channels/stalled:1").await;
    assert_eq!((status, &detail["error"]["code"]), (503, &json!("unavailable")), "{detail}");
}

#[tokio::test]
async fn an_sse_request_dropped_while_subscribing_leaves_no_subscription_behind() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(redis_config(&redis, "n0")).await;
    let sse = r#"pushd_subscriptions{transport="sse"}"#;
    // Redis holds every write: the ban check (a read) passes, the SUBSCRIBE goes through, and
    // the read of the channel's top that completes the node's subscribe (a script) waits.
    redis.cli(&["CLIENT", "PAUSE", "20000", "WRITE"]).await;
    let mut request = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let path = format!("/sse?channel=room:1&token={}", token("alice"));
    let head = format!("GET {path} HTTP/1.1\r\nHost: pushd\r\nAccept: text/event-stream\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut request, head.as_bytes()).await.unwrap();
    // The hub took the subscriber before the engine call: the request is now inside subscribe.
    guard("the SSE request to reach the subscribe", async {
        while node.metric(sse).await != 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(request);
    redis.cli(&["CLIENT", "UNPAUSE"]).await;
    // The SUBSCRIBE completes in Redis; the node must let go of it and of the hub entry.
    guard("the dropped request's subscription to be released", async {
        loop {
            let numsub = redis.cli(&["PUBSUB", "NUMSUB", "pushd:{room:1}"]).await;
            if node.metric(sse).await == 0.0 && numsub.lines().last() == Some("0") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // And the channel works for the next subscriber.
    let mut alice = node.ws(&token("alice")).await;
    assert_eq!(alice.subscribe("room:1", None).await["ok"], true);
    node.publish("room:1", json!({ "n": 1 })).await;
    assert_eq!(offsets(&alice.messages(1).await), [1]);
    node.stop().await;
}

/// `PUBSUB NUMSUB` of `channel`'s pub/sub channel: how many connections Redis delivers it to.
async fn numsub(redis: &RedisServer, channel: &str) -> String {
    let out = redis.cli(&["PUBSUB", "NUMSUB", &format!("pushd:{{{channel}}}")]).await;
    out.lines().last().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_subscribe_that_failed_after_redis_took_the_subscribe_leaves_no_subscription_behind() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(redis_config(&redis, "n0")).await;
    // Writes wait: the SUBSCRIBE goes through, the read of the channel's top does not, and the
    // node's subscribe fails after its command timeout.
    redis.cli(&["CLIENT", "PAUSE", "6000", "WRITE"]).await;
    let mut alice = node.ws(&token("alice")).await;
    let reply = guard("the subscribe to fail", alice.subscribe("room:1", None)).await;
    assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    redis.cli(&["CLIENT", "UNPAUSE"]).await;
    // Nobody holds room:1 on the node: Redis must not keep delivering it there.
    guard("the failed SUBSCRIBE to be taken back", async {
        while numsub(&redis, "room:1").await != "0" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(alice.subscribe("room:1", None).await["ok"], true);
    assert_eq!(numsub(&redis, "room:1").await, "1");
    node.stop().await;
}

#[tokio::test]
async fn channels_are_spread_over_the_pubsub_connections_and_one_killed_costs_nothing() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(pushd::Config { redis_subscribers: 3, ..redis_config(&redis, "n0") }).await;
    let mut alice = node.ws(&token("alice")).await;
    let channels: Vec<String> = (0..30).map(|i| format!("spread:{i}")).collect();
    for channel in &channels {
        assert_eq!(alice.subscribe(channel, None).await["ok"], true);
    }
    // Three pub/sub connections, each carrying some of the 30 channels (and the first the three
    // control channels: surveys, answers to this node's, ban announcements).
    let list = redis.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]).await;
    let lanes: Vec<(String, u64)> = list
        .lines()
        .map(|l| {
            let field = |name: &str| l.split(' ').find_map(|f| f.strip_prefix(name)).unwrap().to_owned();
            (field("id="), field("sub=").parse().unwrap())
        })
        .collect();
    assert_eq!(lanes.len(), 3, "{list}");
    assert_eq!(lanes.iter().map(|(_, n)| n).sum::<u64>(), 33, "{list}");
    assert!(lanes.iter().all(|(_, n)| *n > 0), "every connection carries channels: {list}");
    // Kill one connection: every channel still gets everything, in order.
    let (victim, _) = lanes.iter().max_by_key(|(_, n)| *n).unwrap();
    assert_eq!(redis.cli(&["CLIENT", "KILL", "ID", victim]).await.trim(), "1");
    for channel in &channels {
        node.publish(channel, json!({ "n": 1 })).await;
    }
    let mut got: Vec<String> =
        alice.messages(30).await.iter().map(|m| m["channel"].as_str().unwrap().to_owned()).collect();
    got.sort();
    let mut want = channels.clone();
    want.sort();
    assert_eq!(got, want);
    node.stop().await;
}

/// Polls `ACL LOG` until Redis logged a refusal on a channel (NOPERM for a SUBSCRIBE).
async fn await_channel_refusal(redis: &RedisServer) {
    guard("Redis to refuse a SUBSCRIBE", async {
        // Redis logs refusals but publishes no event for them: poll, under the guard.
        while !redis.cli(&["ACL", "LOG"]).await.lines().any(|l| l == "channel") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_resubscribe_redis_refused_is_retried_until_it_is_taken_and_nothing_is_missed() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(pushd::Config { redis_subscribers: 1, ..redis_config(&redis, "n0") }).await;
    let mut alice = node.ws(&token("alice")).await;
    let since = alice.subscribe("room:1", None).await;
    assert_eq!(since["ok"], true, "{since}");
    node.publish("room:1", json!({ "n": 1 })).await;
    assert_eq!(alice.next().await["data"]["n"], 1);
    // Taking channel rights away closes the node's pub/sub connection; it reconnects at once,
    // and Redis refuses its resubscribe (NOPERM) until the rights come back.
    assert!(redis.cli(&["ACL", "SETUSER", "default", "resetchannels"]).await.contains("OK"));
    await_channel_refusal(&redis).await;
    assert!(redis.cli(&["ACL", "SETUSER", "default", "allchannels"]).await.contains("OK"));
    // Published while the node may not hold the channel yet: the resubscribe's catch-up or the
    // live path delivers both, once and in order.
    node.publish("room:1", json!({ "n": 2 })).await;
    node.publish("room:1", json!({ "n": 3 })).await;
    let got: Vec<Value> = guard("messages after the refused resubscribe", alice.messages(2)).await;
    assert_eq!(got.iter().map(|m| m["data"]["n"].clone()).collect::<Vec<_>>(), [2, 3], "{got:?}");
    assert_eq!(numsub(&redis, "room:1").await, "1");
    node.stop().await;
}
