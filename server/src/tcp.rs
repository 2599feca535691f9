//! An accepted TCP connection and its place in its listener's budget of open connections:
//! the listener takes the place, the stream keeps it for as long as it lives, through hyper
//! and on inside an upgraded WebSocket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

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
}

impl Counted {
    pub fn new(stream: TcpStream, held: Held) -> Self {
        Self { stream, held }
    }

    pub fn into_parts(self) -> (TcpStream, Held) {
        (self.stream, self.held)
    }
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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
