//! Presence joins written together. Clients connect in bursts (a deploy, a network blip, a
//! morning), and each subscribe to a channel with presence writes an entry to Redis. Sent one by
//! one, every join is a command for the node to encode, a write of its own to the Redis socket
//! and an answer to read: a good share of a connect's CPU. Here joins queue, and one writer
//! task sends whatever queued while the previous write was out as one script call per slot
//! (`presence_write.lua`, at most `PRESENCE_BATCH` entries): a lone join goes out at once, a
//! burst in a few round trips. Each join still waits for its own entry to be stored, and gets
//! the write's error if it failed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, oneshot};

use super::RedisEngine;
use crate::channel::ChannelName;
use crate::engine::{ClientInfo, EngineError};
use crate::locks::lock;

/// Presence entries per script call.
pub(super) const PRESENCE_BATCH: usize = 128;

/// Joins waiting for the writer.
#[derive(Default)]
pub(super) struct Joins {
    waiting: Mutex<Vec<Join>>,
    wake: Notify,
    closed: AtomicBool,
}

struct Join {
    channel: ChannelName,
    client: ClientInfo,
    stored: oneshot::Sender<Result<(), EngineError>>,
}

impl Joins {
    /// Queues `client`'s entry in `channel`'s presence and waits until it is stored.
    pub(super) async fn join(&self, channel: &ChannelName, client: &ClientInfo) -> Result<(), EngineError> {
        let (stored, answer) = oneshot::channel();
        lock(&self.waiting).push(Join { channel: channel.clone(), client: client.clone(), stored });
        self.wake.notify_one();
        answer.await.unwrap_or_else(|_| Err(EngineError::Unavailable("the node's Redis engine is stopping".into())))
    }

    /// Ends the writer (the engine is gone).
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// The writer task: takes every waiting join, writes them grouped by slot, answers each.
pub(super) async fn write_joins(joins: Arc<Joins>, engine: Weak<RedisEngine>) {
    loop {
        joins.wake.notified().await;
        if joins.closed.load(Ordering::Relaxed) {
            return;
        }
        let Some(engine) = engine.upgrade() else { return };
        let batch = std::mem::take(&mut *lock(&joins.waiting));
        for chunk in slot_chunks(batch, |j| engine.presence_slot(&j.channel)) {
            let entries: Vec<(ChannelName, ClientInfo)> =
                chunk.iter().map(|j| (j.channel.clone(), j.client.clone())).collect();
            let stored = engine.write_presence(&entries).await;
            for join in chunk {
                let _ = join.stored.send(stored.clone());
            }
        }
    }
}

/// `items` in chunks of at most `PRESENCE_BATCH` that share a slot (what one script call may
/// touch on a cluster); `slot` is asked once per item.
pub(super) fn slot_chunks<T>(items: Vec<T>, slot: impl Fn(&T) -> u16) -> Vec<Vec<T>> {
    let mut slotted: Vec<(u16, T)> = items.into_iter().map(|item| (slot(&item), item)).collect();
    slotted.sort_by_key(|(s, _)| *s);
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut last = None;
    for (s, item) in slotted {
        match chunks.last_mut() {
            Some(chunk) if last == Some(s) && chunk.len() < PRESENCE_BATCH => chunk.push(item),
            _ => chunks.push(vec![item]),
        }
        last = Some(s);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_share_a_slot_and_hold_at_most_a_batch() {
        let items: Vec<u16> = (0..300).map(|i| [7, 3][i % 2]).chain([5]).collect();
        let chunks = slot_chunks(items, |s| *s);
        let shape: Vec<(u16, usize)> = chunks.iter().map(|c| (c[0], c.len())).collect();
        assert_eq!(shape, [(3, 128), (3, 22), (5, 1), (7, 128), (7, 22)]);
        assert!(chunks.iter().all(|c| c.iter().all(|s| *s == c[0])));
    }
}
