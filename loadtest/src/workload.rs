//! The fanout workload, phase by phase: open every subscriber (bounded concurrency), read the
//! nodes' idle memory, publish, wait until every subscriber has seen the last offset published
//! to its channel (or `--timeout`), then fold what each task saw into one `Report`. And the
//! publish workload: the publishers alone, folded into a `PublishReport`.
//!
//! This module owns the timeline and the progress lines on stderr; the sockets live in
//! `subscriber`, the HTTP requests in `publisher`, the verdict in `checker` and `report`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::checker::Tally;
use crate::cli::{Fanout, Load, PublishRun};
use crate::publisher::{Published, Publisher};
use crate::report::{CloseCount, Latency, NodeTally, PublishReport, Report, StormReport};
use crate::subscriber::{self, Goal, Outcome, Shared};
use crate::usage::Usage;

/// How long every subscriber sits idle before the nodes' memory is read.
const SETTLE: Duration = Duration::from_secs(1);
/// How long to keep listening after the last delivery, to catch late duplicates.
const GRACE: Duration = Duration::from_millis(500);

/// Runs `pushload fanout` and returns its report.
pub async fn fanout(plan: Fanout) -> anyhow::Result<Report> {
    let mut per_node = vec![0; plan.load.nodes.len()];
    for n in 0..plan.subscribers {
        per_node[plan.load.slot(n as u64).0] += 1;
    }
    let mut usage = Usage::start(&plan.watch, &plan.load.nodes, &per_node)?;
    let shared = Arc::new(Shared::new(&plan));
    let (goal_tx, goal_rx) = watch::channel(Goal::default());
    let (ready_tx, ready_rx) = mpsc::channel(plan.subscribers.min(4096));
    let tasks: Vec<JoinHandle<Option<Outcome>>> = (0..plan.subscribers)
        .map(|n| tokio::spawn(subscriber::run(n, shared.clone(), goal_rx.clone(), ready_tx.clone())))
        .collect();
    drop(ready_tx);

    let connect_started = Instant::now();
    if let Err(e) = connect_all(&plan, ready_rx).await {
        goal_tx.send_modify(|g| g.stop = true);
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
    let targets = targets(&published);
    goal_tx.send_modify(|g| {
        g.targets = Some(targets.clone().into());
        g.stop = true;
    });
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.extend(task.await.context("a subscriber task panicked")?);
    }
    let storm_started = shared.storm_started.get().copied();
    let run = Run { connect_seconds, timed_out, latency: shared.latency(), usage, storm_started };
    Ok(summarise(&plan, outcomes, published, targets, run))
}

/// Runs `pushload publish` and returns its report.
pub async fn publish(plan: PublishRun) -> anyhow::Result<PublishReport> {
    let mut usage = Usage::start(&plan.watch, &plan.load.nodes, &[])?;
    usage.idle();
    let publisher = Arc::new(Publisher::new(&plan.load)?);
    let started = Instant::now();
    let progress = |published: u64| {
        let rate = published as f64 / started.elapsed().as_secs_f64().max(1e-9);
        eprintln!("published {published}/{} ({rate:.0}/s)", plan.load.messages);
    };
    let (published, timed_out) = run_publishers(&plan.load, &publisher, &mut usage, progress).await?;
    usage.end();
    let seconds = published.seconds();
    let checks = published.check();
    Ok(PublishReport {
        urls: plan.load.nodes.iter().map(|n| n.origin.clone()).collect(),
        channels: plan.load.channels.clone(),
        messages: plan.load.messages,
        payload_bytes: plan.load.payload_bytes,
        publishers: plan.load.publishers,
        rate: plan.load.rate,
        published: published.ok,
        failed: published.failed,
        first_error: published.first_error,
        seconds,
        publishes_per_second: per_second(published.ok, seconds),
        latency_us: Latency::from(&published.latency),
        duplicated_offsets: checks.iter().map(|c| c.duplicated).sum(),
        offset_gaps: checks.iter().map(|c| c.gaps).sum(),
        timed_out,
        usage,
    })
}

/// Each channel's last published offset.
fn targets(published: &Published) -> Vec<Option<u64>> {
    published.offsets.iter().map(|o| o.iter().copied().max()).collect()
}

/// Phase 1: waits until every subscriber has joined, printing progress each second.
async fn connect_all(plan: &Fanout, mut ready: mpsc::Receiver<anyhow::Result<()>>) -> anyhow::Result<()> {
    let timeout = plan.load.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
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
                bail!("only {joined}/{} subscribers joined within --timeout {}s", plan.subscribers, timeout.as_secs())
            }
        }
    }
    eprintln!("connected {joined}/{}", plan.subscribers);
    match first_error {
        Some(e) => Err(e.context(format!("{failed} of {} subscribers could not join", plan.subscribers))),
        None => Ok(()),
    }
}

/// Runs every publisher task to the end (or `--timeout`, which stops them after their request
/// in flight), sampling usage and calling `progress` each second. Returns what was published and
/// whether the deadline passed.
async fn run_publishers(
    load: &Load,
    publisher: &Arc<Publisher>,
    usage: &mut Usage,
    progress: impl Fn(u64),
) -> anyhow::Result<(Published, bool)> {
    let deadline = tokio::time::Instant::now() + load.timeout;
    let mut tick = every_second();
    let mut all = publishing_thread(publisher, load.publishers)?;
    let mut late = false;
    let results = loop {
        tokio::select! {
            results = &mut all => break results.context("the publishing thread ended early")?,
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
    let mut results = results.into_iter();
    let mut published = results.next().context("no publisher ran")?.context("a publisher task panicked")?;
    for r in results {
        published.merge(r.context("a publisher task panicked")?);
    }
    Ok((published, late))
}

/// Runs `count` publisher tasks on a runtime of their own, so that a publish is sent when it
/// is due, not when the subscribers' readers (thousands of sockets on the main runtime) let a
/// worker go: the `ts` a subscriber measures from is then the moment the request left, and
/// its latency is the broker's, not the load generator's queue. (On one shared runtime the
/// publish round trip's median was 4-7 ms at 555 publishes/s; on its own, about 3.)
fn publishing_thread(
    publisher: &Arc<Publisher>,
    count: usize,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<Vec<Result<Published, tokio::task::JoinError>>>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("publisher")
        .enable_all()
        .build()
        .context("building the publishers' runtime")?;
    let publisher = publisher.clone();
    let (done, results) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("publishers".into())
        .spawn(move || {
            let all = runtime.block_on(async {
                let handles: Vec<JoinHandle<Published>> =
                    (0..count).map(|_| tokio::spawn(publisher.clone().run())).collect();
                futures_util::future::join_all(handles).await
            });
            let _ = done.send(all);
        })
        .context("starting the publishing thread")?;
    Ok(results)
}

/// Phase 2: publishes every message, announces the targets, and waits for every subscriber to
/// settle or for the deadline. Returns what was published and whether the deadline passed.
async fn publish_all(
    plan: &Fanout,
    shared: &Shared,
    goal: &watch::Sender<Goal>,
    usage: &mut Usage,
) -> anyhow::Result<(Published, bool)> {
    let mut publisher = Publisher::new(&plan.load)?;
    let storm = plan.storm_after.map(|at| {
        let reached = Arc::new(Notify::new());
        publisher.milestone = Some((at, reached.clone()));
        reached
    });
    let publisher = Arc::new(publisher);
    let deadline = tokio::time::Instant::now() + plan.load.timeout;
    let expected = plan.load.messages * plan.subscribers as u64 / plan.load.channels.len() as u64;
    let progress = |published: u64| {
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let settled = shared.settled.load(Ordering::Relaxed);
        eprintln!(
            "published {published}/{}, delivered {delivered}/~{expected}, done {settled}/{}",
            plan.load.messages, plan.subscribers
        );
    };
    let (published, late) = {
        let publishing = run_publishers(&plan.load, &publisher, usage, progress);
        tokio::pin!(publishing);
        loop {
            tokio::select! {
                r = &mut publishing => break r?,
                () = wait_for(storm.as_deref()), if shared.storm_started.get().is_none() => {
                    eprintln!("storm: every subscriber drops its socket now and reconnects");
                    let _ = shared.storm_started.set(Instant::now());
                    goal.send_modify(|g| g.storm = true);
                }
            }
        }
    };
    let targets = targets(&published);
    // A modify, not a replace: a subscriber yet to see the storm must still see it.
    goal.send_modify(|g| g.targets = Some(targets.clone().into()));
    if late {
        return Ok((published, true));
    }
    if targets.iter().all(Option::is_none) {
        return Ok((published, false));
    }
    let mut tick = every_second();
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

/// Waits for `n` to be notified; forever without one.
async fn wait_for(n: Option<&Notify>) {
    match n {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// What the timeline measured besides the subscribers and publishers.
struct Run {
    connect_seconds: f64,
    timed_out: bool,
    latency: Latency,
    usage: Usage,
    /// When every subscriber was told to drop its socket.
    storm_started: Option<Instant>,
}

/// Folds the subscribers' outcomes and the publishers' results into the report.
fn summarise(
    plan: &Fanout,
    outcomes: Vec<Outcome>,
    published: Published,
    targets: Vec<Option<u64>>,
    run: Run,
) -> Report {
    let load = &plan.load;
    let mut tally = Tally::default();
    let mut nodes: Vec<NodeTally> =
        load.nodes.iter().map(|n| NodeTally { url: n.origin.clone(), ..Default::default() }).collect();
    let mut closes: BTreeMap<u16, (u64, String)> = BTreeMap::new();
    let (mut rejoins, mut unrecovered, mut resets, mut unfinished) = (0, 0, 0, 0);
    let (mut last_delivery, mut first_error) = (None, None);
    let storm = run.storm_started.map(|started| storm_report(started, &outcomes));
    for o in outcomes {
        // A channel nothing was published to: the subscriber should be where it started.
        let target = targets[o.channel].unwrap_or_else(|| o.checker.start());
        let t = o.checker.tally(target);
        let stuck = u64::from(!o.checker.reached(target));
        tally = tally + t;
        unfinished += stuck;
        let node = &mut nodes[o.node];
        node.tally = node.tally + t;
        node.unfinished += stuck;
        node.rejoins += o.rejoins;
        node.closes += o.closes.len() as u64;
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
        urls: load.nodes.iter().map(|n| n.origin.clone()).collect(),
        channels: load.channels.clone(),
        subscribers: plan.subscribers,
        messages: load.messages,
        payload_bytes: load.payload_bytes,
        publishers: load.publishers,
        rate: load.rate,
        connect_seconds: run.connect_seconds,
        published: published.ok,
        publish_failed: published.failed,
        publish_error: published.first_error,
        publish_seconds,
        publish_rate: per_second(published.ok, publish_seconds),
        publish_latency_us: Latency::from(&published.latency),
        last_offsets: targets,
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
        nodes,
        usage: run.usage,
        storm,
    }
}

/// How the reconnect storm went: how many subscribers came back, and how fast.
fn storm_report(started: Instant, outcomes: &[Outcome]) -> StormReport {
    let back: Vec<Instant> = outcomes.iter().filter_map(|o| o.back_after_storm).collect();
    let last = back.iter().max().map_or(0.0, |t| t.saturating_duration_since(started).as_secs_f64());
    StormReport {
        clients: outcomes.len(),
        back: back.len(),
        seconds: last,
        connects_per_second: per_second(back.len() as u64, last),
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
