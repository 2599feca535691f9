//! Round trips shared by concurrent callers. A burst of connects (a node restart, a load
//! balancer moving thousands of clients) asks Redis the same small questions thousands of times
//! at once: is this user banned, record this presence entry. Each caller queues its question;
//! whoever holds the writer lock asks everything that waits in one go, the questions queued
//! while the previous round trip ran included, and hands each caller its answer. A lone caller
//! pays nothing extra; a crowd pays one round trip per batch instead of one each.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::locks::lock;

/// Questions of type `Q` waiting for answers of type `A`.
pub(super) struct Batch<Q, A> {
    waiting: Mutex<Vec<(Q, oneshot::Sender<A>)>>,
    writer: tokio::sync::Mutex<()>,
}

impl<Q, A> Default for Batch<Q, A> {
    fn default() -> Self {
        Self { waiting: Mutex::new(Vec::new()), writer: tokio::sync::Mutex::new(()) }
    }
}

impl<Q, A> Batch<Q, A> {
    /// Queues `question` and makes sure it is asked: `ask` takes every waiting question and
    /// returns one answer per question, in order. `None` when the caller that took this
    /// question was cancelled before it answered (the caller asks on its own then).
    pub async fn ask<F, Fut>(&self, question: Q, ask: F) -> Option<A>
    where
        F: FnOnce(Vec<Q>) -> Fut,
        Fut: Future<Output = Vec<A>>,
    {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).push((question, tx));
        {
            let _writer = self.writer.lock().await;
            let taken = std::mem::take(&mut *lock(&self.waiting));
            if !taken.is_empty() {
                let (questions, answer_to): (Vec<Q>, Vec<_>) = taken.into_iter().unzip();
                for (tx, answer) in answer_to.into_iter().zip(ask(questions).await) {
                    let _ = tx.send(answer);
                }
            }
        }
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn questions_queued_during_a_round_trip_go_out_together_and_each_gets_its_answer() {
        let batch = Arc::new(Batch::<u32, u32>::default());
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let rounds = Arc::new(Mutex::new(Vec::new()));
        // The first caller's round trip is held open while three more queue up.
        let first = {
            let (batch, rounds) = (batch.clone(), rounds.clone());
            tokio::spawn(async move {
                batch
                    .ask(1, |qs| async move {
                        gate.await.unwrap();
                        lock(&rounds).push(qs.clone());
                        qs.iter().map(|q| q * 10).collect()
                    })
                    .await
            })
        };
        while lock(&batch.waiting).len() == 1 || batch.writer.try_lock().is_ok() {
            tokio::task::yield_now().await;
        }
        let mut others = Vec::new();
        for q in [2, 3, 4] {
            let (batch, rounds) = (batch.clone(), rounds.clone());
            others.push(tokio::spawn(async move {
                batch
                    .ask(q, |qs| async move {
                        lock(&rounds).push(qs.clone());
                        qs.iter().map(|q| q * 10).collect()
                    })
                    .await
            }));
        }
        while lock(&batch.waiting).len() < 3 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Some(10));
        let mut answers = Vec::new();
        for o in others {
            answers.push(o.await.unwrap());
        }
        assert_eq!(answers, vec![Some(20), Some(30), Some(40)]);
        assert_eq!(*lock(&rounds), vec![vec![1], vec![2, 3, 4]], "two round trips for four questions");
    }
}
