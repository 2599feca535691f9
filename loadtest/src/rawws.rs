//! The subscribers' WebSocket client: just what reading pushd's frames needs, over a plain
//! `TcpStream` and one buffer. pushload shares the machine with the broker it measures, and at a
//! million deliveries a second a general client's per-frame costs (zeroing its read buffer,
//! a waker proxy per poll, its frame codec) took CPU from the broker. Server frames come whole and
//! unmasked (RFC 6455 5.1); a fragmented or masked one is an error here, as pushd never sends one.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Spare room a read asks the kernel to fill, at least.
const READ_CHUNK: usize = 4 * 1024;
/// Most bytes of an HTTP response head.
const MAX_HEAD: usize = 16 * 1024;

/// One open WebSocket.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where the unread bytes in `buf` start.
    start: usize,
    max_frame: usize,
    mask: [u8; 4],
}

/// A frame from the server.
pub enum Frame<'a> {
    /// A text frame's payload, not checked for UTF-8 here: the subscribers read the one shape
    /// they expect byte by byte (ASCII only) and hand anything else to serde_json, which checks.
    /// At a million frames a second, checking every padding byte was 4 % of pushload's CPU.
    Text(&'a [u8]),
    /// Code (1005 when the frame has none) and reason.
    Close(u16, String),
    Ping(Vec<u8>),
    /// Binary or pong: nothing pushload reads.
    Other,
}

/// Why opening failed.
pub enum OpenError {
    Io(io::Error),
    /// The server answered the upgrade with this status and body.
    Refused(u16, String),
    Protocol(String),
}

impl RawWs {
    /// Sends the upgrade request for `path_and_query` on `stream` and reads the 101. Frames that
    /// came with it stay in the buffer.
    pub async fn open(
        mut stream: TcpStream,
        host: &str,
        path_and_query: &str,
        max_frame: usize,
        mask: [u8; 4],
    ) -> Result<RawWs, OpenError> {
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cHVzaGxvYWQtcmF3LXdzIQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(OpenError::Io)?;
        let mut buf = Vec::with_capacity(READ_CHUNK);
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(OpenError::Protocol("the upgrade response head is too long".into()));
            }
            if stream.read_buf(&mut buf).await.map_err(OpenError::Io)? == 0 {
                return Err(OpenError::Protocol("the server closed the connection during the upgrade".into()));
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if status != 101 {
            let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
            return Err(OpenError::Refused(status, body));
        }
        Ok(RawWs { stream, buf, start: head_end, max_frame, mask })
    }

    /// The next complete frame in the buffer, if one is there; `Err` for a frame pushd never
    /// sends or one over the size limit.
    pub fn frame(&mut self) -> io::Result<Option<Frame<'_>>> {
        let data = &self.buf[self.start..];
        let Some((opcode, header, len)) = header(data)? else { return Ok(None) };
        if len > self.max_frame {
            return Err(invalid(format!("a frame of {len} bytes, over the limit of {}", self.max_frame)));
        }
        if data.len() < header + len {
            return Ok(None);
        }
        let (from, to) = (self.start + header, self.start + header + len);
        self.start = to;
        let payload = &self.buf[from..to];
        Ok(Some(match opcode {
            0x1 => Frame::Text(payload),
            0x8 if payload.len() >= 2 => Frame::Close(
                u16::from_be_bytes([payload[0], payload[1]]),
                String::from_utf8_lossy(&payload[2..]).into(),
            ),
            0x8 => Frame::Close(1005, String::new()),
            0x9 => Frame::Ping(payload.to_vec()),
            0x2 | 0xA => Frame::Other,
            op => return Err(invalid(format!("unexpected opcode {op:#x}"))),
        }))
    }

    /// Reads more bytes into the buffer (after dropping what was read); 0 at end of stream.
    /// Cancel-safe: bytes are only ever added once read.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.buf.capacity() - self.buf.len() < READ_CHUNK {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.buf).await
    }

    /// Sends one masked frame (client frames must be masked).
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&self.mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ self.mask[i % 4]));
        self.stream.write_all(&frame).await
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(0x1, text.as_bytes()).await
    }

    /// Sends a close frame with code 1000.
    pub async fn close(&mut self) -> io::Result<()> {
        self.send(0x8, &1000u16.to_be_bytes()).await
    }
}

/// Opcode, header length and payload length of the frame `data` starts with, once its whole
/// header is there.
fn header(data: &[u8]) -> io::Result<Option<(u8, usize, usize)>> {
    let [b0, b1, ..] = *data else { return Ok(None) };
    if b0 & 0x80 == 0 || b0 & 0x0F == 0 {
        return Err(invalid("a fragmented frame".into()));
    }
    if b1 & 0x80 != 0 {
        return Err(invalid("a masked frame from the server".into()));
    }
    let (header, len) = match b1 & 0x7F {
        126 if data.len() >= 4 => (4, u16::from_be_bytes([data[2], data[3]]) as usize),
        127 if data.len() >= 10 => (10, u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")) as usize),
        126 | 127 => return Ok(None),
        n => (2, n as usize),
    };
    Ok(Some((b0 & 0x0F, header, len)))
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked) with `opcode` and `payload`.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=0xFFFF => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn headers_of_every_length_form_and_partial_ones() {
        for len in [0, 125, 126, 300, 70_000] {
            let f = frame(0x1, &vec![b'a'; len]);
            let (opcode, header, got) = header(&f).unwrap().unwrap();
            assert_eq!((opcode, got, header + got), (0x1, len, f.len()));
            for cut in 0..header {
                assert!(super::header(&f[..cut]).unwrap().is_none(), "{len} bytes, cut at {cut}");
            }
        }
        assert!(header(&[0x01, 0x01]).is_err(), "no FIN: fragmented");
        assert!(header(&[0x80, 0x01]).is_err(), "a continuation");
        assert!(header(&[0x81, 0x81]).is_err(), "masked");
    }

    #[tokio::test]
    async fn frames_split_across_reads_come_out_whole_and_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = vec![0; 1024];
            let n = s.read(&mut head).await.unwrap();
            assert!(String::from_utf8_lossy(&head[..n]).starts_with("GET /ws?user=a HTTP/1.1\r\n"));
            let mut bytes = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
            bytes.extend(frame(0x1, b"first"));
            bytes.extend(frame(0x9, b"p"));
            bytes.extend(frame(0x1, &vec![b'x'; 5000]));
            bytes.extend(frame(0x8, b"\x0f\xa0bye"));
            for chunk in bytes.chunks(7) {
                s.write_all(chunk).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            let mut pong = [0u8; 7];
            s.read_exact(&mut pong).await.unwrap();
            assert_eq!(pong[..2], [0x8A, 0x81]);
            assert_eq!(pong[6] ^ pong[2], b'p', "unmasked with its key");
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let Ok(mut ws) = RawWs::open(stream, "x", "/ws?user=a", 10_000, [1, 2, 3, 4]).await else { panic!("open") };
        let mut seen = Vec::new();
        loop {
            match ws.frame().unwrap() {
                Some(Frame::Text(t)) => seen.push(format!("text {}", t.len())),
                Some(Frame::Ping(p)) => ws.send(0xA, &p).await.unwrap(),
                Some(Frame::Close(code, reason)) => {
                    seen.push(format!("close {code} {reason}"));
                    break;
                }
                Some(Frame::Other) => seen.push("other".into()),
                None => assert!(ws.fill().await.unwrap() > 0, "ended early: {seen:?}"),
            }
        }
        assert_eq!(seen, ["text 5", "text 5000", "close 4000 bye"]);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_upgrade_says_its_status_and_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = vec![0; 1024];
            let _ = s.read(&mut head).await.unwrap();
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nfull").await.unwrap();
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        match RawWs::open(stream, "x", "/ws", 100, [0; 4]).await {
            Err(OpenError::Refused(status, body)) => assert_eq!((status, body.as_str()), (503, "full")),
            _ => panic!("expected a refusal"),
        }
    }
}
