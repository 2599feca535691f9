//! An accepted TCP connection and its place in its listener's budget of open connections:
//! the listener takes the place, the stream keeps it for as long as it lives, through hyper
//! and on inside an upgraded WebSocket.
//!
//! It also holds back hyper's `101 Switching Protocols`: the WebSocket writes it together with
//! its first frame (the welcome, or the close of a refused connection), one write and one
//! packet where there were two. Nothing can come between them: the client sends nothing on a
//! WebSocket before it has the 101, and the node's first frame follows at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Open connections of one listener against its maximum.
pub struct Budget {
    open: AtomicUsize,
    max: usize,
}

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget { open: AtomicUsize::new(0), max })
    }

    /// Takes a place for one connection; `None` when the listener is full.
    pub fn take(budget: &Arc<Budget>) -> Option<Held> {
        budget
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < budget.max).then_some(n + 1))
            .ok()
            .map(|_| Held(budget.clone()))
    }
}

/// One connection's place in its listener's budget, given back on drop.
pub struct Held(Arc<Budget>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream that holds its place in the budget for as long as it lives: through hyper, and
/// on inside an upgraded WebSocket, which takes the stream back out of hyper (`into_parts`) to
/// write to the socket itself.
pub struct Counted {
    stream: TcpStream,
    held: Held,
    /// A whole `101 Switching Protocols` head hyper wrote, not sent yet.
    switching: Option<Bytes>,
}

/// How every 101 head starts (hyper writes the status line this way).
const SWITCHING: &[u8] = b"HTTP/1.1 101 ";

impl Counted {
    pub fn new(stream: TcpStream, held: Held) -> Self {
        Self { stream, held, switching: None }
    }

    /// The stream, its place in the budget, and the 101 head held back for the first frame
    /// (empty if none was).
    pub fn into_parts(self) -> (TcpStream, Held, Bytes) {
        (self.stream, self.held, self.switching.unwrap_or_default())
    }

    /// Keeps `bufs` instead of writing them when they are a whole 101 head (the only write hyper
    /// makes for an upgrade, and its last); true if it did.
    fn hold_switching(&mut self, bufs: &[io::IoSlice<'_>]) -> bool {
        let starts = bufs.iter().find(|b| !b.is_empty()).is_some_and(|b| b.starts_with(SWITCHING));
        if self.switching.is_some() || !starts {
            return false;
        }
        let head: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        if !head.ends_with(b"\r\n\r\n") {
            return false;
        }
        self.switching = Some(head.into());
        true
    }
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.hold_switching(&[io::IoSlice::new(buf)]) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.hold_switching(bufs) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_whole_101_head_is_held_back_and_everything_else_goes_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut counted = Counted::new(server, Budget::take(&Budget::new(1)).unwrap());
        let head = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
        counted.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        counted.write_all(head).await.unwrap();
        counted.flush().await.unwrap();
        let mut got = vec![0; 64];
        let n = client.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", "only the 200 went out");
        let (_, _, held) = counted.into_parts();
        assert_eq!(&held[..], head);
    }

    #[test]
    fn the_budget_refuses_beyond_its_maximum_and_frees_on_drop() {
        let budget = Budget::new(2);
        let a = Budget::take(&budget).unwrap();
        let _b = Budget::take(&budget).unwrap();
        assert!(Budget::take(&budget).is_none());
        drop(a);
        assert!(Budget::take(&budget).is_some());
    }
}
