//! Redis Cluster faults on a real 3-primary, 3-replica cluster, while two nodes publish
//! continuously: a planned `CLUSTER FAILOVER` of the primaries holding busy channels, and a
//! primary SIGKILLed so that its replica is promoted. Subscribers end with every acknowledged
//! message once and in order, or, where an asynchronously replicated write died with its
//! primary, with an explicit `reset`: never a silent gap. Durable publishes (`--publish-replicas
//! 1`) lose nothing even then. A busy channel's slot moved to another primary (a live
//! resharding) loses nothing and refuses nothing. A primary behind Sentinel killed under load is followed the same
//! way.

use std::collections::HashMap;

use pushd_tests::backends::{Backend, RedisCluster};
use pushd_tests::*;
use tokio::sync::watch;

use crate::redis_faults::{
    CHANNELS, KILL_AT, PUBLISHES, Published, Readers, assert_failed_honestly, await_readiness, guard, publish_all,
    publish_end_markers,
};

/// The key whose slot holds `channel`'s stream, meta and sharded pub/sub channel.
fn key_of(channel: &str) -> String {
    format!("pushd:{{{channel}}}:meta")
}

fn cluster_of(backend: &Backend) -> &RedisCluster {
    match backend {
        Backend::Cluster(c) => c,
        _ => unreachable!("a cluster backend"),
    }
}

/// Asserts every acknowledged publish was acknowledged once, and every refusal was honest.
fn assert_acked_once(published: &Published) {
    let mut seen = HashMap::new();
    for &(ch, at, n) in &published.acked {
        assert!(seen.insert(n, (ch, at)).is_none(), "n={n} acknowledged twice");
    }
    for (status, body) in &published.refused {
        assert_failed_honestly(*status, body);
    }
}

/// Runs `step` on the busy channels in turn, one each time the publisher passes a `KILL_AT`
/// mark; returns what each step returned (the slot's old and new primary).
async fn at_each_mark<F>(mut progress: watch::Receiver<u64>, step: impl Fn(&'static str) -> F) -> Vec<(usize, usize)>
where
    F: Future<Output = (usize, usize)>,
{
    let mut moved = Vec::new();
    for (at, channel) in KILL_AT.iter().zip(CHANNELS.iter().cycle()) {
        progress.wait_for(|n| *n >= *at).await.expect("the publisher stopped early");
        moved.push(step(channel).await);
    }
    moved
}

#[tokio::test]
async fn a_planned_failover_of_the_primaries_of_busy_channels_loses_nothing() {
    let backend = Backend::cluster().await;
    let cluster = cluster_of(&backend);
    let nodes = nodes_on(2, &backend, |c| c).await;
    let readers = Readers::start(&nodes).await;
    let (tx, rx) = watch::channel(0);
    let failovers = at_each_mark(rx, |channel| async move { cluster.failover(&key_of(channel)).await });
    // A publish to a slot in mid hand-over may be refused (503/504): a careful backend retries
    // it with the same idempotency key.
    let (published, moved) =
        guard("publishing through failovers", async { tokio::join!(publish_all(&nodes, tx, true), failovers) }).await;
    assert_eq!(moved.len(), KILL_AT.len());
    assert_acked_once(&published);
    assert_eq!(published.acked.len() as u64, PUBLISHES, "every publish was acknowledged in the end");
    let top = publish_end_markers(&nodes[0]).await;
    readers.assert_saw_every_stored_offset(&published, &top).await;
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn busy_channels_slots_moved_to_another_primary_under_load_lose_nothing() {
    let backend = Backend::cluster().await;
    let cluster = cluster_of(&backend);
    let nodes = nodes_on(2, &backend, |c| c).await;
    let readers = Readers::start(&nodes).await;
    let (tx, rx) = watch::channel(0);
    // Batches of 10 keys, as `redis-cli --cluster reshard` moves them: the channel's stream,
    // meta and idempotency keys are split between the primaries for a while.
    let moves = at_each_mark(rx, |channel| async move { cluster.move_slot_of(&key_of(channel), 10).await });
    // No retries: a publish to a slot in motion waits for the move instead of failing.
    let (published, moved) =
        guard("publishing through slot moves", async { tokio::join!(publish_all(&nodes, tx, false), moves) }).await;
    assert!(moved.iter().all(|(from, to)| from != to), "{moved:?}");
    assert_acked_once(&published);
    assert_eq!(published.acked.len() as u64, PUBLISHES, "refused: {:?}", published.refused);
    // The moves met publishes: some were turned away while their slot moved, and sent again.
    let mut retried = 0.0;
    for node in &nodes {
        retried += node.metric(r#"pushd_redis_slot_retries_total{operation="publish"}"#).await;
    }
    eprintln!("{} slot moves under load: {retried} publishes sent again", moved.len());
    assert!(retried > 0.0, "no publish met a moving slot");
    let top = publish_end_markers(&nodes[0]).await;
    readers.assert_saw_every_stored_offset(&published, &top).await;
    for node in nodes {
        node.stop().await;
    }
}

/// What a subscriber that tolerates `reset` saw on one channel: message offsets in order, and
/// where a reset moved it.
#[derive(Default, Debug)]
struct Timeline {
    offsets: Vec<u64>,
    /// The `n` of each message received (end markers have none).
    ns: std::collections::HashSet<u64>,
    resets: Vec<u64>,
    /// The offset the next message must have.
    next: u64,
}

/// Reads `client`'s frames until every channel in `channels` delivered its end marker, keeping
/// resets; asserts each message is the next offset after the previous message or reset.
async fn read_with_resets(mut client: WsClient, channels: Vec<&'static str>) -> HashMap<String, Timeline> {
    let mut seen: HashMap<String, Timeline> = HashMap::new();
    let mut open = channels.len();
    while open > 0 {
        let frame = client.next().await;
        let channel = frame["channel"].as_str().unwrap_or_else(|| panic!("{frame}")).to_owned();
        // Subscribed at offset 0: the first message is 1.
        let line = seen.entry(channel.clone()).or_insert_with(|| Timeline { next: 1, ..Timeline::default() });
        match frame["type"].as_str() {
            Some("message") => {
                let offset = frame["offset"].as_u64().unwrap();
                // The next offset after the last message, or after the last reset if that came later.
                assert_eq!(offset, line.next, "{channel}: offset {offset} after {line:?}");
                line.next = offset + 1;
                line.offsets.push(offset);
                line.ns.extend(frame["data"]["n"].as_u64());
                if frame["data"]["end"] == true {
                    open -= 1;
                }
            }
            Some("reset") => {
                let offset = frame["offset"].as_u64().unwrap();
                line.resets.push(offset);
                line.next = offset + 1;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
    seen
}

/// SIGKILLs the primary of the busiest channel while two nodes publish; returns the acked
/// publishes the subscribers never received and how many resets they were told of.
async fn kill_a_primary_under_load(mut backend: Backend, durable: bool) -> (usize, usize, Vec<(usize, u64, u64)>) {
    let replicas = if durable { 1 } else { 0 };
    let nodes = nodes_on(2, &backend, |c| pushd::Config { publish_replicas: replicas, ..c }).await;
    let mut tasks = Vec::new();
    for node in &nodes {
        let mut client = node.ws(&token("every")).await;
        for channel in CHANNELS {
            assert_eq!(client.subscribe(channel, None).await["ok"], true);
        }
        tasks.push(tokio::spawn(read_with_resets(client, CHANNELS.to_vec())));
    }
    let (tx, mut rx) = watch::channel(0);
    // On a cluster the old primary comes back as the new primary's replica, as an operator
    // would bring it back: until then a durable publish to its slot cannot be confirmed (504,
    // retried). Behind Sentinel, the Sentinels promote the replica and the nodes follow them.
    let kill = async {
        rx.wait_for(|n| *n >= KILL_AT[1]).await.expect("the publisher stopped early");
        match &mut backend {
            Backend::Cluster(cluster) => {
                let (old, _) = cluster.kill_primary_of(&key_of(CHANNELS[0])).await;
                cluster.restart(old).await;
            }
            Backend::Sentinel(sentinel) => sentinel.kill_primary().await,
            _ => unreachable!("a deployment with replicas"),
        }
    };
    let (published, _) =
        guard("publishing through a primary kill", async { tokio::join!(publish_all(&nodes, tx, true), kill) }).await;
    assert_acked_once(&published);
    for node in &nodes {
        await_readiness(node, 200).await;
    }
    let top = publish_end_markers(&nodes[0]).await;
    let (mut lost, mut resets) = (Vec::new(), 0);
    for task in tasks {
        let seen = guard("every subscriber to read to the end", task).await.expect("a reader failed");
        for (ch, channel) in CHANNELS.iter().enumerate() {
            let line = &seen[*channel];
            resets += line.resets.len();
            assert_eq!(line.offsets.last(), Some(&top[ch]), "{channel} ends at the end marker");
            lost.extend(published.acked.iter().filter(|(c, _, n)| *c == ch && !line.ns.contains(n)));
        }
    }
    for node in nodes {
        node.stop().await;
    }
    (lost.len(), resets, lost)
}

#[tokio::test]
async fn a_primary_killed_under_load_is_replaced_and_subscribers_lose_nothing_silently() {
    let (lost, resets, detail) = kill_a_primary_under_load(Backend::cluster().await, false).await;
    // Asynchronous replication: writes the dead primary acknowledged but had not yet sent to its
    // replica are gone. Each such loss must have been announced by a reset.
    eprintln!("primary SIGKILL, plain publishes: {lost} acknowledged messages lost, {resets} resets");
    assert!(lost == 0 || resets > 0, "lost {detail:?} without a reset");
}

#[tokio::test]
async fn durable_publishes_survive_a_primary_killed_under_load() {
    let (lost, resets, detail) = kill_a_primary_under_load(Backend::cluster().await, true).await;
    eprintln!("primary SIGKILL, durable publishes: {lost} acknowledged messages lost, {resets} resets");
    assert_eq!(lost, 0, "durable publishes lost: {detail:?}");
}

#[tokio::test]
async fn a_primary_killed_behind_sentinel_is_replaced_and_subscribers_lose_nothing_silently() {
    let (lost, resets, detail) = kill_a_primary_under_load(Backend::sentinel().await, false).await;
    eprintln!("sentinel primary SIGKILL: {lost} acknowledged messages lost, {resets} resets");
    assert!(lost == 0 || resets > 0, "lost {detail:?} without a reset");
}
