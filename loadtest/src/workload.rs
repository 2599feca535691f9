//! The fanout workload, phase by phase: open every subscriber (bounded concurrency), read the
//! node's idle memory, publish, wait until every subscriber has seen the last published offset
//! (or `--timeout`), then fold what each task saw into one `Report`.
//!
//! This module owns the timeline and the progress lines on stderr; the sockets live in
//! `subscriber`, the HTTP requests in `publisher`, the verdict in `checker` and `report`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::checker::Tally;
use crate::cli::Fanout;
use crate::publisher::{Published, Publisher};
use crate::report::{CloseCount, Latency, Report};
use crate::subscriber::{self, Goal, Outcome, Shared};
use crate::usage::Usage;

/// How long every subscriber sits idle before the node's memory is read.
const SETTLE: Duration = Duration::from_secs(1);
/// How long to keep listening after the last delivery, to catch late duplicates.
const GRACE: Duration = Duration::from_millis(500);

/// Runs `pushload fanout` and returns its report.
pub async fn fanout(plan: Fanout) -> anyhow::Result<Report> {
    let mut usage = Usage::start(plan.pid, plan.subscribers)?;
    let shared = Arc::new(Shared::new(&plan));
    let (goal_tx, goal_rx) = watch::channel(Goal::default());
    let (ready_tx, ready_rx) = mpsc::channel(plan.subscribers.min(4096));
    let tasks: Vec<JoinHandle<Option<Outcome>>> = (0..plan.subscribers)
        .map(|n| tokio::spawn(subscriber::run(n, shared.clone(), goal_rx.clone(), ready_tx.clone())))
        .collect();
    drop(ready_tx);

    let connect_started = Instant::now();
    if let Err(e) = connect_all(&plan, ready_rx).await {
        goal_tx.send_replace(Goal { target: None, stop: true });
        return Err(e);
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    usage.idle();

    let (published, timed_out) = publish_all(&plan, &shared, &goal_tx, &mut usage).await?;
    if !timed_out {
        tokio::time::sleep(GRACE).await;
    }
    usage.end();
    goal_tx.send_replace(Goal { target: published.max_offset, stop: true });
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.extend(task.await.context("a subscriber task panicked")?);
    }
    let run = Run { connect_seconds, timed_out, latency: shared.latency(), usage };
    Ok(summarise(&plan, outcomes, published, run))
}

/// Phase 1: waits until every subscriber has joined, printing progress each second.
async fn connect_all(plan: &Fanout, mut ready: mpsc::Receiver<anyhow::Result<()>>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let mut tick = every_second();
    let (mut joined, mut failed, mut first_error) = (0, 0, None);
    while joined + failed < plan.subscribers {
        tokio::select! {
            r = ready.recv() => match r {
                Some(Ok(())) => joined += 1,
                Some(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
                None => break,
            },
            _ = tick.tick() => eprintln!("connected {joined}/{}", plan.subscribers),
            _ = tokio::time::sleep_until(deadline) => {
                bail!("only {joined}/{} subscribers joined within --timeout {}s", plan.subscribers, plan.timeout.as_secs())
            }
        }
    }
    eprintln!("connected {joined}/{}", plan.subscribers);
    match first_error {
        Some(e) => Err(e.context(format!("{failed} of {} subscribers could not join", plan.subscribers))),
        None => Ok(()),
    }
}

/// Phase 2: publishes every message, announces the target, and waits for every subscriber to
/// settle or for the deadline. Returns what was published and whether the deadline passed.
async fn publish_all(
    plan: &Fanout,
    shared: &Shared,
    goal: &watch::Sender<Goal>,
    usage: &mut Usage,
) -> anyhow::Result<(Published, bool)> {
    let publisher = Arc::new(Publisher::new(plan)?);
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let expected = plan.messages * plan.subscribers as u64;
    let progress = |published: u64| {
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let settled = shared.settled.load(Ordering::Relaxed);
        eprintln!(
            "published {published}/{}, delivered {delivered}/{expected}, done {settled}/{}",
            plan.messages, plan.subscribers
        );
    };
    let mut tick = every_second();
    let handles: Vec<JoinHandle<Published>> =
        (0..plan.publishers).map(|_| tokio::spawn(publisher.clone().run())).collect();
    let mut all = futures_util::future::join_all(handles);
    let mut late = false;
    let results = loop {
        tokio::select! {
            results = &mut all => break results,
            _ = tick.tick() => {
                usage.sample();
                progress(publisher.ok.load(Ordering::Relaxed));
            }
            _ = tokio::time::sleep_until(deadline), if !late => {
                eprintln!("--timeout passed while publishing; stopping the publishers");
                publisher.stop();
                late = true;
            }
        }
    };
    let mut published = Published::default();
    for r in results {
        published.merge(r.context("a publisher task panicked")?);
    }
    goal.send_replace(Goal { target: published.max_offset, stop: false });
    if published.max_offset.is_none() {
        return Ok((published, false));
    }
    loop {
        tokio::select! {
            _ = shared.all_settled.notified() => return Ok((published, false)),
            _ = tick.tick() => {
                usage.sample();
                progress(published.ok);
            }
            _ = tokio::time::sleep_until(deadline) => return Ok((published, true)),
        }
    }
}

/// What the timeline measured besides the subscribers and publishers.
struct Run {
    connect_seconds: f64,
    timed_out: bool,
    latency: Latency,
    usage: Usage,
}

/// Folds the subscribers' outcomes and the publishers' results into the report.
fn summarise(plan: &Fanout, outcomes: Vec<Outcome>, published: Published, run: Run) -> Report {
    let target = published.max_offset.unwrap_or(0);
    let mut tally = Tally::default();
    let mut closes: BTreeMap<u16, (u64, String)> = BTreeMap::new();
    let (mut rejoins, mut unrecovered, mut resets, mut unfinished) = (0, 0, 0, 0);
    let (mut last_delivery, mut first_error) = (None, None);
    for o in outcomes {
        tally = tally + o.checker.tally(target);
        unfinished += u64::from(!o.checker.reached(target));
        for (code, reason) in o.closes {
            closes.entry(code).or_insert((0, reason)).0 += 1;
        }
        rejoins += o.rejoins;
        unrecovered += o.unrecovered;
        resets += o.resets;
        last_delivery = last_delivery.max(o.last_delivery);
        first_error = first_error.or(o.error);
    }
    let wall = match (last_delivery, published.started_us) {
        (Some(last), Some(first)) => last.saturating_sub(first) as f64 / 1e6,
        _ => 0.0,
    };
    let publish_seconds = published.seconds();
    Report {
        url: plan.publish_url.origin().ascii_serialization(),
        channel: plan.channel.clone(),
        subscribers: plan.subscribers,
        messages: plan.messages,
        payload_bytes: plan.payload_bytes,
        publishers: plan.publishers,
        rate: plan.rate,
        connect_seconds: run.connect_seconds,
        published: published.ok,
        publish_failed: published.failed,
        publish_error: published.first_error,
        publish_seconds,
        publish_rate: per_second(published.ok, publish_seconds),
        last_offset: published.max_offset,
        tally,
        wall_seconds: wall,
        deliveries_per_second: per_second(tally.received, wall),
        latency_us: run.latency,
        closes: closes.into_iter().map(|(code, (count, reason))| CloseCount { code, count, reason }).collect(),
        rejoins,
        unrecovered,
        resets,
        unfinished,
        subscriber_error: first_error,
        timed_out: run.timed_out,
        usage: run.usage,
    }
}

fn per_second(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { n as f64 / seconds } else { 0.0 }
}

/// A progress ticker whose first tick is one second from now.
fn every_second() -> tokio::time::Interval {
    let second = Duration::from_secs(1);
    tokio::time::interval_at(tokio::time::Instant::now() + second, second)
}
