//! A session's send queue: what the hub hands a session that must be decided by the session
//! (replay overlap, a new epoch, a gap, a reset, join/leave). It holds memory only while items
//! wait, so the many idle sessions of a node hold none; with express lanes most messages never
//! pass through it.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::handle::Out;
use crate::locks::lock;

/// Items above this many slots of spare room are given back once the queue empties.
const KEEP: usize = 64;

pub struct Queue {
    items: Mutex<VecDeque<Out>>,
    ready: Notify,
    capacity: usize,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Self { items: Mutex::new(VecDeque::new()), ready: Notify::new(), capacity }
    }

    /// Queues `out` unless `capacity` items already wait (then gives it back).
    pub fn push(&self, out: Out) -> Result<(), Out> {
        let mut items = lock(&self.items);
        if items.len() >= self.capacity {
            return Err(out);
        }
        items.push_back(out);
        drop(items);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits for items and moves up to `limit` of them into `buf`; returns how many.
    /// Cancel-safe: nothing is taken unless it returns.
    pub async fn recv_many(&self, buf: &mut Vec<Out>, limit: usize) -> usize {
        loop {
            {
                let mut items = lock(&self.items);
                if !items.is_empty() {
                    let n = items.len().min(limit);
                    buf.extend(items.drain(..n));
                    if items.is_empty() && items.capacity() > KEEP {
                        *items = VecDeque::new();
                    }
                    return n;
                }
            }
            // A push after the check above leaves a permit, so this returns at once.
            self.ready.notified().await;
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.items).len()
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.items).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelName;
    use hyper_tungstenite::tungstenite::Utf8Bytes;

    fn event() -> Out {
        Out::Event(Box::new((ChannelName::parse("c").unwrap(), Utf8Bytes::from_static("{}"))))
    }

    #[tokio::test]
    async fn items_come_out_in_order_up_to_the_limit_and_a_full_queue_refuses() {
        let q = Queue::new(3);
        assert!(q.push(event()).is_ok() && q.push(event()).is_ok() && q.push(event()).is_ok());
        assert!(q.push(event()).is_err(), "a fourth item does not fit");
        let mut buf = Vec::new();
        assert_eq!(q.recv_many(&mut buf, 2).await, 2);
        assert_eq!((q.len(), buf.len()), (1, 2));
        assert_eq!(q.recv_many(&mut buf, 10).await, 1);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_on_a_push() {
        let q = std::sync::Arc::new(Queue::new(8));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move {
                let mut buf = Vec::new();
                q.recv_many(&mut buf, 8).await
            }
        });
        tokio::task::yield_now().await;
        q.push(event()).unwrap();
        assert_eq!(waiter.await.unwrap(), 1);
    }
}
