//! The socket of one WebSocket, shared by the connection's reader and its writer.
//!
//! tungstenite reads and checks the client's frames through `WireIo`; the server's frames do
//! not go through it. A server frame is a 2- or 4-byte header (server frames are not masked)
//! and the message's bytes, the same shared bytes for every subscriber, so a batch of frames is
//! written here as one `writev` of header and payload slices: nothing is copied into a buffer
//! per socket, and a connection with nothing to send holds no buffer at all. What tungstenite
//! writes itself (pongs, the close frame) joins the same queue, so frames never interleave.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::hub::{Delivery, Outlet};
use crate::locks::lock;
use crate::tcp::Held;

/// Most slices handed to one `writev` (the kernel takes at most 1024): 16 to 32 frames, some
/// kilobytes, per system call, and a small array to fill on every write.
const MAX_SLICES: usize = 32;

/// One WebSocket's socket and the frames waiting to be written to it.
pub struct Wire {
    stream: TcpStream,
    out: Mutex<Outbound>,
    /// The connection's place in its listener's budget, given back when the socket closes.
    _held: Held,
}

/// Frames not yet written, oldest first; the first may be partly written.
#[derive(Default)]
struct Outbound {
    queue: VecDeque<Chunk>,
    /// Bytes of the first chunk already written.
    sent: usize,
    /// Messages the express lane queued (the session's own frames count in its `SessionInfo`).
    messages: u64,
}

/// A frame header (possibly empty) and the bytes after it.
struct Chunk {
    header: [u8; 4],
    header_len: u8,
    body: Bytes,
}

impl Chunk {
    /// An unmasked, unfragmented text frame carrying `text`.
    fn text(text: Utf8Bytes) -> Self {
        let body = Bytes::from(text);
        let len = body.len();
        let (header, header_len) = match len {
            0..=125 => ([0x81, len as u8, 0, 0], 2),
            126..=0xFFFF => ([0x81, 126, (len >> 8) as u8, len as u8], 4),
            // Longer frames need the 8-byte length: rare enough to build on its own.
            _ => return Self::raw(long_text_frame(&body)),
        };
        Self { header, header_len, body }
    }

    /// Bytes written as they are (a whole frame tungstenite encoded, or a ping).
    fn raw(body: Bytes) -> Self {
        Self { header: [0; 4], header_len: 0, body }
    }

    fn len(&self) -> usize {
        self.header_len as usize + self.body.len()
    }
}

/// A text frame with a 64-bit length, header and payload in one buffer.
fn long_text_frame(body: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(10 + body.len());
    frame.extend_from_slice(&[0x81, 127]);
    frame.extend_from_slice(&(body.len() as u64).to_be_bytes());
    frame.extend_from_slice(body);
    frame.into()
}

/// An unmasked text frame carrying `text`, header and payload in one buffer.
fn encode_text(text: &Utf8Bytes) -> Bytes {
    let chunk = Chunk::text(text.clone());
    if chunk.header_len == 0 {
        return chunk.body;
    }
    let mut frame = Vec::with_capacity(chunk.len());
    frame.extend_from_slice(&chunk.header[..chunk.header_len as usize]);
    frame.extend_from_slice(&chunk.body);
    frame.into()
}

/// A ping with no payload.
const PING: [u8; 2] = [0x89, 0x00];

impl Outbound {
    /// Fills `slices` with the queue's unwritten bytes, oldest first; returns how many it used.
    fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
        let mut n = 0;
        let mut skip = self.sent;
        for chunk in &self.queue {
            if n + 2 > MAX_SLICES {
                break;
            }
            let header = &chunk.header[..chunk.header_len as usize];
            if skip < header.len() {
                slices[n] = IoSlice::new(&header[skip..]);
                n += 1;
                skip = 0;
            } else {
                skip -= header.len();
            }
            if skip < chunk.body.len() {
                slices[n] = IoSlice::new(&chunk.body[skip..]);
                n += 1;
            }
            skip = 0;
        }
        n
    }

    /// Drops `n` written bytes from the front of the queue.
    fn consume(&mut self, mut n: usize) {
        while let Some(first) = self.queue.front() {
            let left = first.len() - self.sent;
            if n < left {
                self.sent += n;
                return;
            }
            n -= left;
            self.sent = 0;
            self.queue.pop_front();
        }
    }
}

impl Wire {
    pub fn new(stream: TcpStream, held: Held) -> Self {
        Self { stream, out: Mutex::new(Outbound::default()), _held: held }
    }

    /// Queues `frames` (and a ping, if `ping`) and writes what the socket takes now. True when
    /// nothing is left waiting; otherwise `flushed` finishes the job.
    pub fn send(&self, frames: impl IntoIterator<Item = Utf8Bytes>, ping: bool) -> io::Result<bool> {
        let mut out = lock(&self.out);
        out.queue.extend(frames.into_iter().map(Chunk::text));
        if ping {
            out.queue.push_back(Chunk::raw(Bytes::from_static(&PING)));
        }
        self.write_out(&mut out)
    }

    /// Resolves once everything queued is written.
    pub async fn flushed(&self) -> io::Result<()> {
        loop {
            if self.write_out(&mut lock(&self.out))? {
                return Ok(());
            }
            self.stream.writable().await?;
        }
    }

    /// Writes until the queue is empty (true) or the socket is full (false).
    fn write_out(&self, out: &mut Outbound) -> io::Result<bool> {
        while let Some(first) = out.queue.front() {
            // The usual case when paced: one whole encoded frame, one plain write.
            let written = if out.queue.len() == 1 && first.header_len == 0 {
                self.stream.try_write(&first.body[out.sent..])
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let n = out.slices(&mut slices);
                self.stream.try_write_vectored(&slices[..n])
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => out.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Like `flushed`, for tungstenite's `poll_flush`.
    fn poll_flushed(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.write_out(&mut lock(&self.out))? {
                return Poll::Ready(Ok(()));
            }
            ready!(self.stream.poll_write_ready(cx))?;
        }
    }
}

impl Outlet for Wire {
    fn queue(&self, delivery: &Delivery) -> usize {
        // Header and payload in one buffer, made once per message for every socket: one slice
        // per frame in the `writev`.
        let frame = delivery.encoded.get_or_init(|| encode_text(&delivery.frame));
        let mut out = lock(&self.out);
        out.queue.push_back(Chunk::raw(frame.clone()));
        out.messages += 1;
        out.queue.len()
    }

    fn flush(&self) -> io::Result<bool> {
        self.write_out(&mut lock(&self.out))
    }

    fn messages(&self) -> u64 {
        lock(&self.out).messages
    }
}

/// The socket as tungstenite sees it: reads come from the socket (after the bytes hyper had
/// already read past the upgrade request), writes join the wire's queue.
pub struct WireIo {
    pub wire: std::sync::Arc<Wire>,
    /// The client's first bytes, read by hyper along with the upgrade request.
    pub early: Bytes,
}

impl AsyncRead for WireIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            let early = self.early.split_to(n);
            buf.put_slice(&early);
            return Poll::Ready(Ok(()));
        }
        let stream = &self.wire.stream;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            match stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for WireIo {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        lock(&self.wire.out).queue.push_back(Chunk::raw(Bytes::copy_from_slice(buf)));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.wire.poll_flushed(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.wire.poll_flushed(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(bodies: &[&'static str]) -> Outbound {
        let queue = bodies.iter().map(|b| Chunk::text(Utf8Bytes::from_static(b))).collect();
        Outbound { queue, sent: 0, messages: 0 }
    }

    fn flat(out: &Outbound) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let n = out.slices(&mut slices);
        slices[..n].iter().flat_map(|s| s.to_vec()).collect()
    }

    #[test]
    fn text_frames_are_an_unmasked_header_and_the_shared_bytes() {
        let out = queue(&["hi", "yo"]);
        assert_eq!(flat(&out), [0x81, 2, b'h', b'i', 0x81, 2, b'y', b'o']);
        let long = Chunk::text(Utf8Bytes::from("x".repeat(300)));
        assert_eq!(&long.header[..long.header_len as usize], [0x81, 126, 1, 44]);
        assert_eq!(&encode_text(&Utf8Bytes::from_static("hi"))[..], [0x81, 2, b'h', b'i']);
        let huge = Chunk::text(Utf8Bytes::from("x".repeat(70_000)));
        assert_eq!(&huge.body[..10], [0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(huge.len(), 70_010);
    }

    #[test]
    fn a_partial_write_resumes_mid_header_or_mid_body() {
        let mut out = queue(&["abc", "de"]);
        out.consume(1);
        assert_eq!(flat(&out), [3, b'a', b'b', b'c', 0x81, 2, b'd', b'e']);
        out.consume(3);
        assert_eq!(flat(&out), [b'c', 0x81, 2, b'd', b'e']);
        out.consume(2);
        assert_eq!(flat(&out), [2, b'd', b'e']);
        out.consume(3);
        assert!(out.queue.is_empty() && out.sent == 0);
    }
}
