//! The socket of one WebSocket, shared by the connection's reader and its writer.
//!
//! tungstenite reads and checks the client's frames through `WireIo`; the server's frames do
//! not go through it. A server frame is a 2- or 4-byte header (server frames are not masked)
//! and the message's bytes, the same shared bytes for every subscriber. A lone message frame
//! (encoded once per message, header and payload together) is sent from those bytes as they
//! are; otherwise what waits is copied into one buffer of the thread's, up to 16 KiB, and sent
//! as one slice (the kernel charges more for walking many small slices than the copy costs);
//! a frame that does not fit goes as one `writev` of header and payload slices. A connection
//! with nothing to send holds no buffer at all. What tungstenite writes itself (pongs, the
//! close frame) joins the same queue, so frames never interleave.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper_tungstenite::tungstenite::Utf8Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::hub::{Delivery, Outlet, Queued};
use crate::locks::lock;
use crate::tcp::Held;

/// Most slices handed to one `writev` (the kernel takes at most 1024): 16 to 32 big frames per
/// system call, and a small array to fill on every write.
const MAX_SLICES: usize = 32;
/// Frames a queue's overflow buffer is made for at once: what one `writev` takes.
const BURST: usize = MAX_SLICES;
/// Most bytes of queued frames copied into one buffer and sent as one slice. The kernel walks a
/// `writev`'s slices one by one: 20 slices of 110 bytes cost it 1.1 to 1.7 µs more per call
/// than one `send` of the same 2.2 KB, on this project's benchmark machine, and the copy costs
/// about 0.1 µs. Bigger frames go as slices, where a copy would cost more than it saves.
const GATHER: usize = 16 * 1024;

thread_local! {
    /// The buffer a burst of small frames is gathered in: one per thread, reused by every
    /// socket's send (the send is synchronous, so no socket holds it past its call).
    static GATHERED: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(GATHER));
}

/// One WebSocket's socket and the frames waiting to be written to it.
pub struct Wire {
    out: Mutex<Outbound>,
    stream: TcpStream,
    /// Wakes the session's task when the flusher finds the socket full.
    pub blocked: Notify,
    /// The connection's place in its listener's budget, given back when the socket closes.
    _held: Held,
}

/// Frames not yet written, oldest first; the first may be partly written.
#[derive(Default)]
struct Outbound {
    queue: Chunks,
    /// Bytes of the first chunk already written.
    sent: usize,
    /// Messages the express lane queued (the session's own frames count in its `SessionInfo`).
    messages: u64,
    /// In the hub flusher's list: set by the fan-out's first frame, cleared by its flush.
    flushing: bool,
    /// The queue holds only the upgrade's 101 head, unsent: the first frame joins it.
    switching: bool,
}

/// Chunks in order, the first kept inline: a socket written as fast as frames come (the usual
/// case) never allocates a buffer for its queue, and the fan-out and the flusher find the frame
/// beside the lock instead of in another cache line.
#[derive(Default)]
struct Chunks {
    first: Option<Chunk>,
    /// Only while more than one chunk waits.
    rest: VecDeque<Chunk>,
}

impl Chunks {
    fn push_back(&mut self, chunk: Chunk) {
        if self.first.is_none() {
            self.first = Some(chunk);
        } else {
            if self.rest.capacity() == 0 {
                // A burst gets its buffer in one allocation, not one per doubling.
                self.rest.reserve_exact(BURST);
            }
            self.rest.push_back(chunk);
        }
    }

    #[cfg(test)]
    fn extend(&mut self, chunks: impl IntoIterator<Item = Chunk>) {
        for chunk in chunks {
            self.push_back(chunk);
        }
    }

    fn front(&self) -> Option<&Chunk> {
        self.first.as_ref()
    }

    /// Drops the first chunk; a queue a burst grew gives its buffer back once drained.
    fn pop_front(&mut self) {
        self.first = self.rest.pop_front();
        if self.first.is_none() && self.rest.capacity() >= BURST {
            self.rest = VecDeque::new();
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn iter(&self) -> impl Iterator<Item = &Chunk> {
        self.first.iter().chain(&self.rest)
    }
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
    /// Queues `chunk`. The first one after the upgrade is copied into the 101 head's buffer, so
    /// both go out in one plain `send` and the queue never needs more than its inline slot.
    fn push(&mut self, chunk: Chunk) {
        if std::mem::take(&mut self.switching)
            && self.sent == 0
            && self.queue.len() == 1
            && let Some(head) = self.queue.first.take()
        {
            let mut joined = Vec::with_capacity(head.len() + chunk.len());
            joined.extend_from_slice(&head.body);
            joined.extend_from_slice(&chunk.header[..chunk.header_len as usize]);
            joined.extend_from_slice(&chunk.body);
            self.queue.push_back(Chunk::raw(joined.into()));
            return;
        }
        self.queue.push_back(chunk);
    }

    /// The queue's unwritten bytes, oldest first: each chunk's header and body as two slices.
    fn unsent(&self) -> impl Iterator<Item = &[u8]> {
        let mut skip = self.sent;
        self.queue.iter().flat_map(|chunk| [&chunk.header[..chunk.header_len as usize], &chunk.body[..]]).filter_map(
            move |slice| {
                let from = skip;
                skip = skip.saturating_sub(slice.len());
                (from < slice.len()).then(|| &slice[from..])
            },
        )
    }

    /// Fills `slices` with the queue's unwritten bytes, oldest first; returns how many it used.
    fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
        let mut n = 0;
        for (slot, slice) in slices.iter_mut().zip(self.unsent()) {
            *slot = IoSlice::new(slice);
            n += 1;
        }
        n
    }

    /// Copies the unwritten bytes, oldest first, into `buf`, whole chunks while they fit in
    /// `GATHER` bytes. False (and `buf` is to be ignored) when a chunk too big to copy came
    /// before `GATHER / 2` bytes were gathered: a `writev` of the slices is then the better send.
    fn gather(&self, buf: &mut Vec<u8>) -> bool {
        buf.clear();
        let mut skip = self.sent;
        for chunk in self.queue.iter() {
            if buf.len() + chunk.len() - skip > GATHER {
                return buf.len() >= GATHER / 2;
            }
            let header = &chunk.header[..chunk.header_len as usize];
            if skip < header.len() {
                buf.extend_from_slice(&header[skip..]);
                buf.extend_from_slice(&chunk.body);
            } else {
                buf.extend_from_slice(&chunk.body[skip - header.len()..]);
            }
            skip = 0;
        }
        true
    }

    /// One `send` of what waits: a single whole chunk as it is (the usual case when paced:
    /// one encoded frame); several small frames copied into one buffer (a burst); otherwise a
    /// `writev` of up to `MAX_SLICES` slices (big frames).
    fn send(&self, socket: &socket2::SockRef<'_>) -> io::Result<usize> {
        if let Some(first) = self.queue.front()
            && self.queue.len() == 1
            && first.header_len == 0
        {
            return socket.send(&first.body[self.sent..]);
        }
        let gathered = GATHERED.with_borrow_mut(|buf| self.gather(buf).then(|| socket.send(buf)));
        gathered.unwrap_or_else(|| {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let n = self.slices(&mut slices);
            socket.send_vectored(&slices[..n])
        })
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
    /// A wire whose first write starts with `switching`, the upgrade's 101 head held back by
    /// `tcp::Counted` (empty if none), so that it goes out with the first frame.
    pub fn new(stream: TcpStream, held: Held, switching: Bytes) -> Self {
        let mut out = Outbound::default();
        if !switching.is_empty() {
            out.queue.push_back(Chunk::raw(switching));
            out.switching = true;
        }
        Self { out: Mutex::new(out), stream, blocked: Notify::new(), _held: held }
    }

    /// Queues `frames` (and a ping, if `ping`) and writes what the socket takes now. True when
    /// nothing is left waiting; otherwise `flushed` finishes the job.
    pub fn send(&self, frames: impl IntoIterator<Item = Utf8Bytes>, ping: bool) -> io::Result<bool> {
        let mut out = lock(&self.out);
        for frame in frames {
            out.push(Chunk::text(frame));
        }
        if ping {
            out.push(Chunk::raw(Bytes::from_static(&PING)));
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
    ///
    /// Straight to the socket (`send`, `sendmsg`), not through tokio's `try_write`, which first
    /// reads the socket's readiness in its I/O driver: one more cache line per socket per
    /// round, and the flusher writes thousands of sockets a round. Only when the kernel says
    /// the socket is full is the send tried again through tokio (`try_io`), so that tokio
    /// marks the socket not writable and `writable()` waits. It has to be a send made inside
    /// `try_io`: tokio clears the readiness it read before that send, never a newer one. Telling
    /// it "full" after the fact could erase a "writable" that arrived in between (the client
    /// read, and its ACK freed the space), and nothing would wake the session again.
    fn write_out(&self, out: &mut Outbound) -> io::Result<bool> {
        let socket = socket2::SockRef::from(&self.stream);
        while !out.queue.is_empty() {
            let written = match out.send(&socket) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stream.try_io(Interest::WRITABLE, || out.send(&socket))
                }
                written => written,
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => out.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
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
    fn queue(&self, delivery: &Delivery) -> Queued {
        // Header and payload in one buffer, made once per message for every socket: one slice
        // per frame in the `writev`.
        let frame = delivery.encoded.get_or_init(|| encode_text(&delivery.frame));
        let mut out = lock(&self.out);
        out.push(Chunk::raw(frame.clone()));
        out.messages += 1;
        let first = !std::mem::replace(&mut out.flushing, true);
        Queued { waiting: out.queue.len(), first }
    }

    fn flush(&self) -> io::Result<bool> {
        let mut out = lock(&self.out);
        out.flushing = false;
        self.write_out(&mut out)
    }

    fn messages(&self) -> u64 {
        lock(&self.out).messages
    }

    fn blocked(&self) -> &Notify {
        &self.blocked
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
            let unfilled = buf.initialize_unfilled();
            let len = unfilled.len();
            // A read shorter than the buffer emptied the socket (epoll is edge-triggered), so
            // tokio is told it is no longer readable, as its own `poll_read` does: without that,
            // every frame a client sends costs a second `recv` that only says "would block".
            // Reporting `WouldBlock` from inside `try_io` clears the readiness tokio saw before
            // the read, never a newer one, so bytes arriving meanwhile still wake the reader.
            let mut short = 0;
            let read = stream.try_io(Interest::READABLE, || {
                let n = (&*socket2::SockRef::from(stream)).read(unfilled)?;
                if 0 < n && n < len {
                    short = n;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match read {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => {
                    buf.advance(short);
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
        lock(&self.wire.out).push(Chunk::raw(Bytes::copy_from_slice(buf)));
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
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn queue(bodies: &[&'static str]) -> Outbound {
        let mut queue = Chunks::default();
        queue.extend(bodies.iter().map(|b| Chunk::text(Utf8Bytes::from_static(b))));
        Outbound { queue, ..Outbound::default() }
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
    fn the_first_frame_joins_the_101_head_in_one_chunk_and_later_ones_queue_behind() {
        let mut out = Outbound::default();
        out.queue.push_back(Chunk::raw(Bytes::from_static(b"HTTP/1.1 101 S\r\n\r\n")));
        out.switching = true;
        out.push(Chunk::text(Utf8Bytes::from_static("hi")));
        assert_eq!(out.queue.len(), 1, "one chunk, one plain send");
        out.push(Chunk::text(Utf8Bytes::from_static("yo")));
        assert_eq!(out.queue.len(), 2);
        assert_eq!(flat(&out), b"HTTP/1.1 101 S\r\n\r\n\x81\x02hi\x81\x02yo");
        // A 101 already being written is not touched: the frame queues behind it.
        let mut out = Outbound::default();
        out.queue.push_back(Chunk::raw(Bytes::from_static(b"HTTP/1.1 101 S\r\n\r\n")));
        out.switching = true;
        out.consume(3);
        out.push(Chunk::text(Utf8Bytes::from_static("hi")));
        assert_eq!(flat(&out), b"P/1.1 101 S\r\n\r\n\x81\x02hi");
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

    #[test]
    fn small_frames_are_gathered_into_one_buffer_from_where_the_last_write_stopped() {
        let mut out = queue(&["abc", "de", "f"]);
        out.consume(3);
        let mut buf = Vec::new();
        assert!(out.gather(&mut buf));
        assert_eq!(buf, flat(&out));
        assert_eq!(buf, [b'b', b'c', 0x81, 2, b'd', b'e', 0x81, 1, b'f']);
        // As many as fit in GATHER bytes; the rest waits for the next send.
        let many = (0..300).map(|_| "x".repeat(98)).collect::<Vec<_>>();
        let mut out = Outbound::default();
        out.queue.extend(many.iter().map(|b| Chunk::text(Utf8Bytes::from(b.clone()))));
        assert!(out.gather(&mut buf));
        assert_eq!(buf.len(), GATHER / 100 * 100, "whole 100-byte frames only");
        // A big frame after little is left to writev, slices and all.
        let mut out = queue(&["abc"]);
        out.queue.push_back(Chunk::text(Utf8Bytes::from("y".repeat(GATHER))));
        assert!(!out.gather(&mut buf));
    }

    #[test]
    fn a_burst_comes_out_in_order_and_its_buffer_is_given_back_once_drained() {
        let mut q = Chunks::default();
        q.extend((0..20u8).map(|i| Chunk::raw(Bytes::from(vec![i]))));
        assert_eq!(q.rest.capacity(), BURST, "a burst's buffer made once, at its full size");
        q.extend((20..40u8).map(|i| Chunk::raw(Bytes::from(vec![i]))));
        assert_eq!(q.len(), 40);
        let mut order = Vec::new();
        while let Some(c) = q.front() {
            order.push(c.body[0]);
            q.pop_front();
        }
        assert_eq!(order, (0..40).collect::<Vec<u8>>());
        assert_eq!((q.len(), q.rest.capacity()), (0, 0), "nothing held after the burst");
        q.push_back(Chunk::raw(Bytes::from_static(b"x")));
        assert_eq!((q.len(), q.rest.capacity()), (1, 0), "one chunk waits inline");
    }

    /// A connected loopback pair: the server's end in a `Wire`, and the client's end.
    async fn pair() -> (Arc<Wire>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let held = crate::tcp::Budget::take(&crate::tcp::Budget::new(1)).unwrap();
        (Arc::new(Wire::new(server, held, Bytes::new())), client)
    }

    /// Reads after a short read (which marks the socket not readable without a second `recv`)
    /// still wake for bytes sent later.
    #[tokio::test]
    async fn bytes_sent_after_a_short_read_wake_the_reader() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (wire, mut client) = pair().await;
        let mut io = WireIo { wire, early: Bytes::new() };
        let mut buf = [0u8; 64];
        for word in [&b"one"[..], b"two", b"three"] {
            client.write_all(word).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf)).await.expect("woken").unwrap();
            assert_eq!(&buf[..n], word);
        }
    }

    /// A burst of small frames (gathered) and a big one (slices) arrive whole and in order.
    #[tokio::test]
    async fn a_burst_and_a_big_frame_arrive_whole_and_in_order() {
        use tokio::io::AsyncReadExt;
        let (wire, mut client) = pair().await;
        let frames: Vec<String> = (0..500).map(|i| format!("{i:0>120}")).chain(["z".repeat(70_000)]).collect();
        let mut expected = Vec::new();
        for f in &frames {
            expected.extend(encode_text(&Utf8Bytes::from(f.clone())));
        }
        wire.send(frames.iter().map(|f| Utf8Bytes::from(f.clone())), false).unwrap();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expected.len()];
            client.read_exact(&mut got).await.unwrap();
            (got, expected)
        });
        tokio::time::timeout(Duration::from_secs(10), wire.flushed()).await.expect("written").unwrap();
        let (got, expected) = reader.await.unwrap();
        assert!(got == expected, "the bytes on the wire are the frames in order");
    }

    /// A socket the client does not read fills up; once the client reads, `flushed` is woken
    /// and finishes, every byte in order.
    #[tokio::test]
    async fn a_full_socket_is_written_again_once_the_client_reads() {
        use tokio::io::AsyncReadExt;
        let (wire, mut client) = pair().await;
        let frame = Utf8Bytes::from("x".repeat(60_000));
        let mut sent = 0;
        while wire.send([frame.clone()], false).unwrap() {
            sent += 1;
        }
        sent += 1;
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = vec![0u8; 1 << 16];
            while got < sent * 60_004 {
                got += client.read(&mut buf).await.unwrap();
            }
            got
        });
        tokio::time::timeout(Duration::from_secs(10), wire.flushed())
            .await
            .expect("woken once the client read")
            .unwrap();
        assert_eq!(reader.await.unwrap(), sent * 60_004, "every frame, header and payload");
    }
}
