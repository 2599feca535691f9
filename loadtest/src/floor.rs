//! The write floor: what the kernel charges for one `write()` of one small frame to one socket,
//! on the machine at hand. A broker that writes each delivery with its own syscall cannot spend
//! less system time than this per delivery; measured next to a fan-out run, it turns "µs per
//! delivery" into a ratio that travels between machines.
//!
//! One thread writes a `--frame-bytes` frame to each of `--sockets` loopback connections per
//! round, `--rate` rounds a second, as a broker fanning paced publishes out would; tokio tasks
//! on the other ends read and discard. The writer thread's own user and system time
//! (`/proc/thread-self/stat`) divided by its writes is the floor. With `--frames N` each write
//! carries N frames, as a broker's write of a batch does: N slices of one `writev`, or, with
//! `--gathered`, copied into one buffer and sent as one slice.

use std::io::{IoSlice, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::cli::FloorArgs;
use crate::report::{Text, Verdict, json};
use crate::usage::{Cpu, thread_cpu};

/// What one floor run measured.
#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub sockets: usize,
    pub frame_bytes: usize,
    /// Frames per write, and whether they were copied into one buffer before it.
    pub frames: usize,
    pub gathered: bool,
    pub rounds: u64,
    pub writes: u64,
    pub seconds: f64,
    /// The writer thread's CPU over all rounds.
    pub cpu: Cpu,
    pub user_us_per_write: f64,
    pub system_us_per_write: f64,
}

/// Runs the probe; blocking work happens on a thread of its own.
pub async fn run(args: FloorArgs) -> anyhow::Result<FloorReport> {
    if args.sockets == 0 || args.rate == 0 || args.seconds == 0 || args.frame_bytes == 0 || args.frames == 0 {
        bail!("--sockets, --rate, --seconds, --frame-bytes and --frames must be at least 1");
    }
    if args.frames > MAX_FRAMES {
        bail!("--frames must be at most {MAX_FRAMES} (the slices of one writev)");
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(args.sockets);
    let mut readers = Vec::with_capacity(args.sockets);
    for _ in 0..args.sockets {
        let client = TcpStream::connect(addr).context("connecting on loopback (open-file limit?)")?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        readers.push(tokio::spawn(drain(tokio::net::TcpStream::from_std(client)?)));
        writers.push(server);
    }
    let report = tokio::task::spawn_blocking(move || write_rounds(writers, &args)).await??;
    let mut read = 0;
    for reader in readers {
        read += reader.await?;
    }
    // Every byte written arrived: the probe measured writes that were made in full.
    let written = report.writes * (report.frames * report.frame_bytes) as u64;
    if read != written {
        bail!("the readers got {read} bytes of the {written} written");
    }
    Ok(report)
}

/// Most frames per write: the kernel takes at most 1024 slices in one `writev`.
const MAX_FRAMES: usize = 1024;

/// Reads and discards until the writer closes; returns how many bytes came.
async fn drain(mut socket: tokio::net::TcpStream) -> u64 {
    let mut buf = vec![0u8; 4096];
    let mut read = 0;
    while let Ok(n @ 1..) = socket.read(&mut buf).await {
        read += n as u64;
    }
    read
}

/// The paced rounds, measured; the sockets close when it returns.
fn write_rounds(mut sockets: Vec<TcpStream>, args: &FloorArgs) -> anyhow::Result<FloorReport> {
    let mut frame = vec![b'x'; args.frame_bytes];
    // A WebSocket text frame's header, for the look of it; the readers do not parse.
    frame[0] = 0x81;
    frame[1] = (args.frame_bytes.saturating_sub(2)).min(125) as u8;
    let frames = vec![frame; args.frames];
    let mut gathered = Vec::with_capacity(args.frame_bytes * args.frames);
    let rounds = args.rate * args.seconds;
    let every = Duration::from_secs(1) / args.rate as u32;
    let before = thread_cpu().context("reading /proc/thread-self/stat")?;
    let started = Instant::now();
    for round in 0..rounds {
        let due = started + every * round as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for socket in &mut sockets {
            if let [frame] = &frames[..] {
                socket.write_all(frame)?;
            } else if args.gathered {
                gathered.clear();
                frames.iter().for_each(|f| gathered.extend_from_slice(f));
                socket.write_all(&gathered)?;
            } else {
                write_all_vectored(socket, &frames)?;
            }
        }
    }
    let cpu = thread_cpu().context("reading /proc/thread-self/stat")?.minus(before);
    let writes = rounds * sockets.len() as u64;
    let us = |secs: f64| secs * 1e6 / writes as f64;
    Ok(FloorReport {
        sockets: sockets.len(),
        frame_bytes: args.frame_bytes,
        frames: args.frames,
        gathered: args.gathered,
        rounds,
        writes,
        seconds: started.elapsed().as_secs_f64(),
        cpu,
        user_us_per_write: us(cpu.user),
        system_us_per_write: us(cpu.system),
    })
}

/// Writes every frame, as one `writev` of one slice per frame (and more if the kernel takes
/// only part).
fn write_all_vectored(socket: &mut TcpStream, frames: &[Vec<u8>]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match socket.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Verdict for FloorReport {
    fn failures(&self) -> Vec<String> {
        Vec::new()
    }

    fn render(&self) -> String {
        let mut r = Text::default();
        r.head("write floor: one write() per socket per round");
        r.row("sockets", format!("{} loopback connections, {}-byte frames", self.sockets, self.frame_bytes));
        if self.frames > 1 {
            let how = if self.gathered { "copied into one buffer, one slice" } else { "one writev slice each" };
            r.row("per write", format!("{} frames, {how}", self.frames));
        }
        r.row("rounds", format!("{} in {:.2} s, {} writes", self.rounds, self.seconds, self.writes));
        r.row("writer CPU", format!("user {:.2} s + system {:.2} s", self.cpu.user, self.cpu.system));
        let total = self.user_us_per_write + self.system_us_per_write;
        let line =
            format!("user {:.2} + system {:.2} = {total:.2} us", self.user_us_per_write, self.system_us_per_write);
        r.row("per write", line);
        r.into_string()
    }

    fn to_json(&self) -> String {
        json(self, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(frames: usize, gathered: bool) -> FloorArgs {
        FloorArgs { sockets: 3, rate: 50, seconds: 1, frame_bytes: 110, frames, gathered }
    }

    #[tokio::test]
    async fn every_write_of_every_shape_arrives_in_full() {
        for (frames, gathered) in [(1, false), (20, false), (20, true)] {
            let report = run(args(frames, gathered)).await.unwrap();
            assert_eq!((report.rounds, report.writes, report.frames), (50, 150, frames));
            assert!(report.render().contains("loopback connections"));
        }
        let err = run(args(0, false)).await.err().unwrap().to_string();
        assert!(err.contains("--frames"), "{err}");
        let err = run(args(MAX_FRAMES + 1, false)).await.err().unwrap().to_string();
        assert!(err.contains("at most 1024"), "{err}");
    }
}
