//! Redis Cluster only: noticing that slots moved. A failover or a resharding hands a slot to
//! another node, and Redis ends the sharded subscriptions of that slot on the old one without
//! closing the connection; the client library drops that notice. So the engine watches the
//! slot map itself (once a second, and whenever a command was redirected) and, when it
//! changed, refreshes the subscriber's routing and has the resync task subscribe every channel
//! again where its slot now lives and fill each from its stream (retrying until it works).

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use fred::prelude::*;
use fred::types::cluster::SlotRange;

use super::setup::bounded;
use super::{Deployment, RedisEngine, pubsub};

/// How often the slot map is read when nothing else signals a change.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// After a change, how many more checks resubscribe again (a few seconds of settling).
const SETTLE_CHECKS: u32 = 3;

/// Starts the watch on a cluster; does nothing on other deployments.
pub(super) fn spawn(engine: &Arc<RedisEngine>) {
    if engine.deployment == Deployment::Cluster {
        tokio::spawn(watch(Arc::downgrade(engine)));
    }
}

async fn watch(engine: Weak<RedisEngine>) {
    let Some(mut redirected) = engine.upgrade().map(|e| e.pool.next().cluster_change_rx()) else { return };
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known: Option<Vec<SlotRange>> = None;
    // Checks left in which to resubscribe again: nodes learn a move one by one, so a resubscribe
    // right after the first change may still be routed by a view that is about to change, and
    // land on the node that is giving the slot away.
    let mut settling = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = redirected.recv() => {}
        }
        let Some(engine) = engine.upgrade() else { return };
        let Some(map) = slot_map(&engine).await else { continue };
        let changed = known.as_ref().is_some_and(|k| *k != map);
        known = Some(map);
        if changed {
            settling = SETTLE_CHECKS;
            engine.metrics.pubsub_reconnects.inc();
            tracing::info!("redis cluster slots moved: resubscribing and catching up");
        }
        if settling > 0 {
            settling -= 1;
            // Commands follow MOVED on their own only if a retry is allowed, and a publish
            // never is: every client of the pool learns the new map here.
            for client in engine.pool.clients() {
                refresh(client.sync_cluster(), "a command connection").await;
            }
            for subscriber in engine.live.subscribers() {
                refresh(subscriber.sync_cluster(), "a subscriber").await;
            }
            pubsub::request_resync(&engine);
        }
    }
}

/// Awaits one client's routing refresh, bounded: a client stuck behind a redirect must not stop
/// the watch.
async fn refresh(sync: impl Future<Output = Result<(), fred::error::Error>>, what: &str) {
    if let Err(e) = bounded(sync).await {
        tracing::warn!(error = %e, "refreshing {what}'s cluster routing failed");
    }
}

/// The cluster's slot map as the first pub/sub connection's routing has it after a refresh
/// (fred reads `CLUSTER SLOTS` on a connection of its own for that); `None` if it cannot.
async fn slot_map(engine: &RedisEngine) -> Option<Vec<SlotRange>> {
    let subscriber = engine.live.subscribers().next()?;
    if let Err(e) = bounded(subscriber.sync_cluster()).await {
        tracing::debug!(error = %e, "reading the cluster's slot map failed");
        return None;
    }
    subscriber.cached_cluster_state().map(|state| state.slots().to_vec())
}
