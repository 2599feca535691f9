//! Redis Cluster only: noticing that slots moved. A failover or a resharding hands a slot to
//! another node, and Redis ends the sharded subscriptions of that slot on the old one without
//! closing the connection; the client library drops that notice. So the engine watches the
//! slot map itself (once a second, and whenever a command was redirected) and, when it
//! changed, refreshes the subscriber's routing and has the resync task subscribe every channel
//! again where its slot now lives and fill each from its stream (retrying until it works).

use std::sync::{Arc, Weak};
use std::time::Duration;

use fred::prelude::*;

use super::{Deployment, Operation, RedisEngine, pubsub};

/// How often the slot map is read when nothing else signals a change.
const CHECK_EVERY: Duration = Duration::from_secs(1);

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
    let mut known: Option<String> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = redirected.recv() => {}
        }
        let Some(engine) = engine.upgrade() else { return };
        let Ok(map) = slot_map(&engine).await else { continue };
        let changed = known.as_ref().is_some_and(|k| *k != map);
        known = Some(map);
        if changed {
            engine.metrics.pubsub_reconnects.inc();
            tracing::info!("redis cluster slots moved: resubscribing and catching up");
            for subscriber in engine.live.subscribers() {
                if let Err(e) = subscriber.sync_cluster().await {
                    tracing::warn!(error = %e, "refreshing a subscriber's cluster routing failed");
                }
            }
            pubsub::request_resync(&engine);
        }
    }
}

/// The cluster's slot map as the pool sees it (`CLUSTER SLOTS`), as comparable text.
async fn slot_map(engine: &RedisEngine) -> Result<String, crate::engine::EngineError> {
    let slots: Value = engine.call(Operation::Control, |c| c.cluster_slots()).await?;
    Ok(format!("{slots:?}"))
}
