//! Scatter-gather over pub/sub: carries a survey to every node and gathers their replies.
//! What a survey asks and how a node answers is `survey.rs`; this is only the carrier.
//!
//! A survey publishes `{"id","from","body"}` on `pushd:control`; every node (the asker too)
//! answers with `{"id","node","body"}` on the asker's own `pushd:control:<node>` channel. The
//! asker waits for the nodes in the registry, at most the survey's timeout, and reports the ones
//! that stayed silent: a dead or slow node makes an answer partial, never a hang.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use fred::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::{Operation, RedisEngine};
use crate::engine::{ClusterPlane, EngineError, Survey, SurveyHandler};
use crate::locks::lock;

/// Surveys in flight and the local handler.
#[derive(Default)]
pub(super) struct Scatter {
    handler: OnceLock<Weak<dyn SurveyHandler>>,
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<(String, String)>>>,
    next: AtomicU64,
}

#[derive(Serialize, Deserialize)]
struct Request<'a> {
    id: u64,
    from: &'a str,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Serialize, Deserialize)]
struct Reply<'a> {
    id: u64,
    node: &'a str,
    #[serde(borrow)]
    body: &'a RawValue,
}

impl Scatter {
    pub(super) fn set_handler(&self, handler: Weak<dyn SurveyHandler>) {
        let _ = self.handler.set(handler);
    }
}

/// Answers a survey request from any node (including this one).
pub(super) fn on_request(engine: &Arc<RedisEngine>, text: &str) {
    let Ok(request) = serde_json::from_str::<Request>(text) else {
        return tracing::warn!("unreadable control request");
    };
    let Some(handler) = engine.scatter.handler.get().and_then(Weak::upgrade) else { return };
    let (engine, body, from) = (engine.clone(), request.body.get().to_owned(), request.from.to_owned());
    // Answered in a task of its own: listing a large node takes time that must not hold up the
    // pub/sub reading path, and so fan-out on this lane.
    tokio::spawn(async move {
        let answer = capped(handler.answer(&body));
        let Ok(body) = RawValue::from_string(answer) else { return tracing::warn!("control answer is not JSON") };
        let reply = serde_json::to_string(&Reply { id: request.id, node: &engine.settings.node_id, body: &body })
            .expect("replies serialise");
        let channel = engine.keys.control_reply(&from);
        if let Err(e) =
            engine.call(Operation::Control, |c| c.publish::<(), _, _>(channel.as_str(), reply.as_str())).await
        {
            tracing::debug!(error = %e, "control reply not published");
        }
    });
}

/// Largest answer a node publishes: one pub/sub message every node's reader must take whole.
const MAX_ANSWER_BYTES: usize = 8 << 20;

/// `answer`, or an error the asker shows when it is too large to send.
fn capped(answer: String) -> String {
    if answer.len() <= MAX_ANSWER_BYTES {
        return answer;
    }
    let error = format!(
        "this node's answer is {} bytes, over the {MAX_ANSWER_BYTES}-byte cap: narrow the request",
        answer.len()
    );
    serde_json::json!({ "error": error }).to_string()
}

/// Hands a reply to the survey waiting for it.
pub(super) fn on_reply(engine: &RedisEngine, text: &str) {
    let Ok(reply) = serde_json::from_str::<Reply>(text) else {
        return tracing::warn!("unreadable control reply");
    };
    if let Some(tx) = lock(&engine.scatter.pending).get(&reply.id) {
        let _ = tx.send((reply.node.to_owned(), reply.body.get().to_owned()));
    }
}

/// Runs one survey (see the module doc). `timeout` covers all of it, reading the registry
/// included: a stalled Redis ends the survey in time, as an error.
pub(super) async fn survey(engine: &RedisEngine, request: &str, timeout: Duration) -> Result<Survey, EngineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let registry = tokio::time::timeout_at(deadline, engine.nodes()).await;
    let registry =
        registry.unwrap_or_else(|_| Err(EngineError::Timeout("the node registry did not answer in time".into())));
    let mut expected: HashSet<String> = registry?.into_iter().map(|n| n.id).collect();
    expected.insert(engine.settings.node_id.clone());
    let id = engine.scatter.next.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&engine.scatter.pending).insert(id, tx);
    let result = collect(engine, id, request, deadline, &expected, &mut rx).await;
    lock(&engine.scatter.pending).remove(&id);
    let answers = result?;
    let answered: HashSet<&String> = answers.iter().map(|(node, _)| node).collect();
    let mut missing: Vec<String> = expected.iter().filter(|n| !answered.contains(n)).cloned().collect();
    missing.sort();
    Ok(Survey { answers, missing })
}

async fn collect(
    engine: &RedisEngine,
    id: u64,
    request: &str,
    deadline: tokio::time::Instant,
    expected: &HashSet<String>,
    rx: &mut mpsc::UnboundedReceiver<(String, String)>,
) -> Result<Vec<(String, String)>, EngineError> {
    let body = RawValue::from_string(request.to_owned()).map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let message = serde_json::to_string(&Request { id, from: &engine.settings.node_id, body: &body })
        .expect("requests serialise");
    let published = tokio::time::timeout_at(
        deadline,
        engine.call(Operation::Control, |c| c.publish(engine.keys.control(), message.as_str())),
    );
    let _: () = published
        .await
        .unwrap_or_else(|_| Err(EngineError::Timeout("the control channel did not answer in time".into())))?;
    let mut answers: Vec<(String, String)> = Vec::new();
    while !expected.iter().all(|n| answers.iter().any(|(a, _)| a == n)) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(answer)) => answers.push(answer),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(answers)
}
