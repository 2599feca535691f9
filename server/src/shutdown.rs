//! Graceful drain: readiness goes false at once (the listener stays up so health checks see the
//! 503). For `--drain-grace` the node keeps serving, new clients included, so a load balancer
//! marks it down before anyone is closed: clients closed later reconnect through the balancer to
//! other nodes instead of bouncing off this one. Then new client connections are refused and
//! every session is closed with 1012 (reconnect elsewhere and replay), spread over 60% of the
//! drain window so the clients do not all reconnect at once; the node waits for its session
//! tasks until the window ends, then stops listening.

use std::time::Duration;

use crate::node::Node;
use crate::protocol::{Close, CloseCode};

/// How often a drain closes its next batch of sessions.
const DRAIN_TICK: Duration = Duration::from_millis(50);

/// Drains `node`; returns when every session task ended or the deadline passed.
pub async fn drain(node: &Node) {
    node.start_draining();
    let grace = node.config().drain_grace;
    if !grace.is_zero() {
        tracing::info!(grace_s = grace.as_secs_f64(), "draining: readiness off, closing clients after the grace");
        tokio::time::sleep(grace).await;
    }
    node.stop_accepting();
    let window = node.config().drain_window;
    let deadline = tokio::time::Instant::now() + window.max(Duration::from_millis(500));
    let mut sessions = node.hub().sessions().into_iter();
    tracing::info!(sessions = sessions.len(), window_s = window.as_secs_f64(), "draining");
    let per_tick = batch_size(sessions.len(), window.mul_f64(0.6), DRAIN_TICK);
    let close = Close::new(CloseCode::Restart, "server restarting: reconnect");
    for i in 0.. {
        // Each handle is dropped once its session is told to close: a handle holds the socket,
        // and a browser sees the close only when the TCP connection ends, so a list kept to the
        // end would hold every closed socket open until the last close of the window.
        let chunk: Vec<_> = sessions.by_ref().take(per_tick).collect();
        if chunk.is_empty() {
            break;
        }
        if i > 0 {
            tokio::time::sleep(DRAIN_TICK).await;
        }
        for session in chunk {
            session.close(close.clone());
        }
    }
    // Sessions whose upgrade was already under way when the drain began.
    for session in node.hub().sessions() {
        session.close(close.clone());
    }
    if let Err(remaining) = node.wait_for_sessions(deadline).await {
        tracing::warn!(remaining, "drain window overran; dropping the remaining sessions");
    }
    node.stop();
}

/// Sessions to close per tick so that `n` of them are spread evenly over `spread`.
fn batch_size(n: usize, spread: Duration, tick: Duration) -> usize {
    let ticks = (spread.as_millis() / tick.as_millis().max(1)).max(1) as usize;
    n.div_ceil(ticks).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_spread_over_the_window() {
        let tick = Duration::from_millis(50);
        assert_eq!(batch_size(10_000, Duration::from_secs(8), tick), 63);
        assert_eq!(batch_size(3, Duration::from_secs(8), tick), 1);
        assert_eq!(batch_size(0, Duration::from_secs(8), tick), 1);
        assert_eq!(batch_size(100, Duration::ZERO, tick), 100);
    }
}
