//! The accept loop and each TCP connection's life, up to the route table (`router.rs`).
//!
//! Everything a client can hold before it has authenticated is bounded here: the number of
//! open TCP connections per listener (a clear 503 beyond it), the time to send a whole request
//! (hyper's header-read timer, which also reaps idle keep-alive connections), and the read
//! buffer per connection. Accept errors (EMFILE when descriptors run out) back off and are
//! logged once per interval instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::node::Node;
use crate::router::{self, Plane};
use crate::tcp::{Budget, Counted};

/// Most bytes hyper buffers for one connection's request head (hyper's floor is 8 KiB): heads
/// bigger than this are refused with 431 instead of growing the buffer to hyper's ~400 KB.
const MAX_READ_BUFFER: usize = 16 * 1024;
/// Open connections the operator listener takes, beside the public listener's budget.
const ADMIN_CONNECTIONS: usize = 64;

/// Accepts connections until `node.stopping` is cancelled.
pub async fn accept_loop(listener: TcpListener, node: Arc<Node>, plane: Plane) {
    let max = match plane {
        Plane::Admin => ADMIN_CONNECTIONS,
        Plane::All | Plane::Public => node.config().max_tcp_connections,
    };
    let budget = Budget::new(max);
    let mut backoff = AcceptBackoff::default();
    let inherited = nodelay_for_all(&listener);
    loop {
        let (stream, remote) = tokio::select! {
            _ = node.stopped() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    let (pause, log) = backoff.failed(Instant::now());
                    if let Some(failures) = log {
                        tracing::warn!(error = %e, failures, "accept failing (out of file descriptors?): backing off");
                    }
                    tokio::time::sleep(pause).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        let Some(held) = Budget::take(&budget) else {
            refuse(&node, stream);
            continue;
        };
        if !inherited {
            let _ = stream.set_nodelay(true);
        }
        tokio::spawn(serve_connection(Counted::new(stream, held), remote, node.clone(), plane));
    }
}

/// Sets TCP_NODELAY (frames are small and must not wait for an ACK) on the listener, which Linux
/// copies to every socket it accepts: one setsockopt instead of one per connection. False where
/// each accepted socket needs its own.
fn nodelay_for_all(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux") && socket2::SockRef::from(listener).set_tcp_nodelay(true).is_ok()
}

/// Answers a connection beyond the budget with a plain 503 and closes it. The socket was just
/// accepted, so its send buffer is empty and a non-blocking write takes the whole answer.
fn refuse(node: &Node, stream: TcpStream) {
    node.metrics().refused.with_label_values(&["tcp_full"]).inc();
    let body = r#"{"error":{"code":"unavailable","message":"node has too many open connections (--max-tcp-connections): connect to another node"}}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

async fn serve_connection(stream: Counted, remote: SocketAddr, node: Arc<Node>, plane: Plane) {
    let svc_node = node.clone();
    let svc = service_fn(move |req| router::route(svc_node.clone(), remote, plane, req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(node.config().request_timeout)
        .max_buf_size(MAX_READ_BUFFER)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = node.stopped() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "http connection ended with an error");
    }
}

/// How the accept loop waits after failures: doubling pauses from 10 ms to 1 s, and one log line
/// per `LOG_EVERY` saying how many failures there were, instead of a line per retry.
#[derive(Debug, Default)]
struct AcceptBackoff {
    pause: Option<Duration>,
    failures: u64,
    logged: Option<Instant>,
}

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

impl AcceptBackoff {
    /// One more failure at `now`: how long to pause, and the failures to log if it is time to.
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let pause = self.pause.map_or(FIRST_PAUSE, |p| (p * 2).min(LONGEST_PAUSE));
        self.pause = Some(pause);
        self.failures += 1;
        let log = self.logged.is_none_or(|at| now.duration_since(at) >= LOG_EVERY);
        if !log {
            return (pause, None);
        }
        self.logged = Some(now);
        (pause, Some(std::mem::take(&mut self.failures)))
    }

    /// An accept worked: the next failure starts from the shortest pause again.
    fn succeeded(&mut self) {
        self.pause = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_from_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inherited = nodelay_for_all(&listener);
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(accepted.nodelay().unwrap(), inherited);
    }

    #[test]
    fn accept_failures_back_off_and_are_logged_once_per_interval() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        assert_eq!(b.failed(t0), (FIRST_PAUSE, Some(1)), "the first failure is logged at once");
        let pauses: Vec<Duration> = (0..9).map(|_| b.failed(t0 + Duration::from_secs(1)).0).collect();
        assert_eq!(pauses[0], Duration::from_millis(20));
        assert_eq!(*pauses.last().unwrap(), LONGEST_PAUSE, "pauses double up to a second");
        assert_eq!(b.failed(t0 + Duration::from_secs(2)).1, None, "no second line within the interval");
        assert_eq!(b.failed(t0 + LOG_EVERY).1, Some(11), "then one line counting the failures since");
        b.succeeded();
        assert_eq!(b.failed(t0 + LOG_EVERY).0, FIRST_PAUSE, "an accept that works resets the pause");
    }
}
