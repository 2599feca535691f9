//! The write floor: what the kernel charges for one `write()` of one small frame to one socket,
//! on the machine at hand. A broker that writes each delivery with its own syscall cannot spend
//! less system time than this per delivery; measured next to a fan-out run, it turns "µs per
//! delivery" into a ratio that travels between machines.
//!
//! One thread writes a `--frame-bytes` frame to each of `--sockets` loopback connections per
//! round, `--rate` rounds a second, as a broker fanning paced publishes out would; tokio tasks
//! on the other ends read and discard. The writer thread's own user and system time
//! (`/proc/thread-self/stat`) divided by its writes is the floor.

use std::io::Write;
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
    if args.sockets == 0 || args.rate == 0 || args.seconds == 0 || args.frame_bytes == 0 {
        bail!("--sockets, --rate, --seconds and --frame-bytes must be at least 1");
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
    for reader in readers {
        reader.await?;
    }
    Ok(report)
}

/// Reads and discards until the writer closes.
async fn drain(mut socket: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 4096];
    while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// The paced rounds, measured; the sockets close when it returns.
fn write_rounds(mut sockets: Vec<TcpStream>, args: &FloorArgs) -> anyhow::Result<FloorReport> {
    let mut frame = vec![b'x'; args.frame_bytes];
    // A WebSocket text frame's header, for the look of it; the readers do not parse.
    frame[0] = 0x81;
    frame[1] = (args.frame_bytes.saturating_sub(2)).min(125) as u8;
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
            socket.write_all(&frame)?;
        }
    }
    let cpu = thread_cpu().context("reading /proc/thread-self/stat")?.minus(before);
    let writes = rounds * sockets.len() as u64;
    let us = |secs: f64| secs * 1e6 / writes as f64;
    Ok(FloorReport {
        sockets: sockets.len(),
        frame_bytes: args.frame_bytes,
        rounds,
        writes,
        seconds: started.elapsed().as_secs_f64(),
        cpu,
        user_us_per_write: us(cpu.user),
        system_us_per_write: us(cpu.system),
    })
}

impl Verdict for FloorReport {
    fn failures(&self) -> Vec<String> {
        Vec::new()
    }

    fn render(&self) -> String {
        let mut r = Text::default();
        r.head("write floor: one write() per socket per round");
        r.row("sockets", format!("{} loopback connections, {}-byte frames", self.sockets, self.frame_bytes));
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
