//! The Redis engine: stateless nodes sharing history, positions, fan-out and presence in Redis.
//!
//! - Publishing is one Lua script (`publish.lua`): epoch, `HINCRBY top`, `XADD <offset>-0`,
//!   expiry, `PUBLISH` — so pub/sub order is offset order and offsets are contiguous.
//! - History reads are one script too (`history.lua`): epoch, top and `XRANGE` in one snapshot.
//! - Live fan-out: one node-level pub/sub subscription per channel, counted by local subscribers,
//!   on one of a few pub/sub connections picked by the channel's hash; commands go through a
//!   pool (`pubsub.rs`). On a Redis Cluster, sharded pub/sub, and a watch on the slot map
//!   (`topology.rs`).
//! - Presence: a hash of clients plus a sorted set of lapse times per channel; each node refreshes
//!   its own entries, so a dead node's clients lapse on their own.
//!
//! A command that Redis did not acknowledge is an `EngineError`: a publish is then answered 503.
//! Every round trip goes through `call` (or `timed`), which times it and counts its failure
//! under an operation label (`pushd_redis_*` metrics).

mod bans;
mod joins;
mod keys;
mod pubsub;
mod scatter;
mod setup;
mod topology;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};
use pushd_wire::TopChannel;
use serde_json::value::RawValue;

pub use keys::Keys;
use pubsub::LiveChannels;
pub use setup::Deployment;

use super::{
    ClientInfo, ClusterPlane, DataPlane, Deliver, Engine, EngineError, Epoch, HistoryBounds, HistoryPage, HistoryQuery,
    NewMessage, NodeInfo, Offset, Position, PresenceChange, Publication, RedisStats, Survey, SurveyHandler, now_ms,
    now_us,
};
use crate::channel::ChannelName;
use crate::locks::lock;
use crate::metrics::RedisMetrics;

/// How long the node waits for Redis at start before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the Redis engine needs to know; filled from `Config`.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[user:pass@]host:port[/db]`, `redis-cluster://…`, `redis-sentinel://…`, or the
    /// same with `rediss` for TLS (see `setup.rs`).
    pub url: String,
    /// The CA certificates (PEM) TLS trusts; `None` = the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// Prefix of every key. Default `pushd:`.
    pub prefix: String,
    /// Command connections. Default 4.
    pub pool_size: usize,
    /// Pub/sub connections; channels are spread over them by hash. Default 2.
    pub subscribers: usize,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub meta_ttl: Duration,
    /// How long a presence entry lives without a refresh from its node.
    pub presence_ttl: Duration,
    /// How long an idempotency key remembers its publish.
    pub idempotency_ttl: Duration,
    /// Replicas that must confirm a publish before it is acknowledged (`WAIT`); 0 = none.
    pub publish_replicas: u32,
    /// How long a publish waits for them.
    pub publish_replicas_timeout: Duration,
    /// How long a node stays in the registry without a heartbeat.
    pub node_ttl: Duration,
    /// This node's id: surveys address their answers to it.
    pub node_id: String,
}

/// What a Redis round trip is for: the `operation` label of the engine's metrics.
#[derive(Debug, Clone, Copy)]
enum Operation {
    Publish,
    History,
    Subscribe,
    Presence,
    /// Registry, bans, surveys and Redis' own stats.
    Control,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::History => "history",
            Operation::Subscribe => "subscribe",
            Operation::Presence => "presence",
            Operation::Control => "control",
        }
    }
}

/// The Redis-backed engine.
pub struct RedisEngine {
    settings: RedisSettings,
    deployment: Deployment,
    keys: Keys,
    pool: Pool,
    publish_script: Script,
    history_script: Script,
    presence_script: Script,
    presence_write_script: Script,
    bans_script: Script,
    /// This node's copy of the bans (`bans.rs`).
    bans: bans::Bans,
    /// Presence joins waiting for the writer task (`joins.rs`).
    joins: Arc<joins::Joins>,
    deliver: Weak<dyn Deliver>,
    live: LiveChannels,
    scatter: scatter::Scatter,
    /// This node's presence entries, refreshed every third of `presence_ttl`.
    present: Mutex<HashMap<(ChannelName, Arc<str>), ClientInfo>>,
    metrics: RedisMetrics,
}

impl RedisEngine {
    /// Connects the pool and the subscriber, loads the scripts and starts the background tasks.
    pub async fn connect(
        settings: RedisSettings,
        deliver: Weak<dyn Deliver>,
        metrics: RedisMetrics,
    ) -> anyhow::Result<Arc<Self>> {
        let (config, deployment) = setup::client_config(&settings.url, settings.tls_ca.as_deref())?;
        let mut builder = setup::builder(config);
        let pool = builder.build_pool(settings.pool_size.max(1))?;
        // Only the subscriber's pub/sub receiver needs a deep buffer: a lagging receiver is a gap
        // we fill from the stream, but depth keeps that rare. fred preallocates every client's
        // notification channels at this size, so the pool keeps the small default.
        builder.with_performance_config(|p| p.broadcast_channel_capacity = 1 << 14);
        let subscribers = (0..settings.subscribers.max(1))
            .map(|_| builder.build_subscriber_client())
            .collect::<Result<Vec<_>, _>>()?;
        let connect = async {
            pool.init().await?;
            for subscriber in &subscribers {
                subscriber.init().await?;
            }
            Ok::<_, fred::error::Error>(())
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .with_context(|| format!("cannot connect to Redis at {}: is redis-server running?", settings.url))?;
        let engine = Arc::new(Self {
            keys: Keys::new(&settings.prefix),
            settings,
            deployment,
            publish_script: Script::from_lua(include_str!("publish.lua")),
            history_script: Script::from_lua(include_str!("history.lua")),
            presence_script: Script::from_lua(include_str!("presence.lua")),
            presence_write_script: Script::from_lua(include_str!("presence_write.lua")),
            bans_script: Script::from_lua(include_str!("bans.lua")),
            bans: bans::Bans::default(),
            joins: Arc::default(),
            pool,
            deliver,
            live: LiveChannels::new(subscribers),
            scatter: scatter::Scatter::default(),
            present: Mutex::new(HashMap::new()),
            metrics,
        });
        let scripts = [
            &engine.publish_script,
            &engine.history_script,
            &engine.presence_script,
            &engine.presence_write_script,
            &engine.bans_script,
        ];
        for script in scripts {
            script.load(engine.pool.next()).await.context("loading Lua scripts into Redis")?;
        }
        pubsub::spawn_dispatchers(&engine);
        topology::spawn(&engine);
        pubsub::subscribe_control(&engine).await.context("subscribing to the control channel")?;
        tokio::spawn(refresh_presence(Arc::downgrade(&engine)));
        tokio::spawn(joins::write_joins(engine.joins.clone(), Arc::downgrade(&engine)));
        Ok(engine)
    }

    /// A connected command client. While any pool connection is known to be down (Redis away,
    /// or a connection being re-established) this answers at once, with nothing sent: a command
    /// handed to a client in that state waits out its timeout and ends with an outcome nobody
    /// can know, where "not sent" is the plain truth.
    fn client(&self) -> Result<&Client, EngineError> {
        if !self.pool.clients().iter().all(|c| c.is_connected()) {
            return Err(EngineError::Unavailable("redis is not connected".into()));
        }
        let client = self.pool.next_connected();
        if client.is_connected() { Ok(client) } else { Err(EngineError::Unavailable("redis is not connected".into())) }
    }

    /// Runs `command` on a connected client as one round trip of `operation`.
    ///
    /// On a Redis Cluster, a command turned away because its slot is moving between primaries
    /// (`ASK`, `MOVED`, `TRYAGAIN`: Redis ran nothing of it) is sent again after a short pause,
    /// within `COMMAND_TIMEOUT`, so a live resharding delays publishes instead of failing them.
    /// Commands that ran before it in `command` run again: each closure is safe to repeat.
    async fn call<'a, T, F>(&'a self, operation: Operation, command: impl Fn(&'a Client) -> F) -> Result<T, EngineError>
    where
        F: Future<Output = Result<T, fred::error::Error>> + 'a,
    {
        let client = self.client().inspect_err(|_| self.metrics.error(operation.label(), "disconnected"))?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let result = command(client).await;
            match result {
                Err(e) if slot_in_motion(&e) && started.elapsed() + pause < setup::COMMAND_TIMEOUT => {
                    tracing::debug!(operation = operation.label(), error = %e, "slot moving; sending again");
                    self.metrics.slot_moving(operation.label());
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                result => return self.settle(operation, started, result),
            }
        }
    }

    /// Times one round trip and counts its failure by kind.
    async fn timed<T>(
        &self,
        operation: Operation,
        command: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, EngineError> {
        let started = Instant::now();
        let result = command.await;
        self.settle(operation, started, result)
    }

    /// Records a round trip that began at `started`, and types its error.
    fn settle<T>(
        &self,
        operation: Operation,
        started: Instant,
        result: Result<T, fred::error::Error>,
    ) -> Result<T, EngineError> {
        self.metrics.observe(operation.label(), started.elapsed());
        result.map_err(|e| {
            let kind = error_kind(&e);
            self.metrics.error(operation.label(), kind);
            // The details (script hashes, Redis' own words) are for the log, not for clients.
            tracing::debug!(operation = operation.label(), kind, error = %e, "redis round trip failed");
            let text = format!("redis {kind} during {}", operation.label());
            engine_error(kind, text)
        })
    }

    /// The command that fans a channel's message out: sharded pub/sub on a cluster, so each
    /// shard carries only its own channels' traffic.
    fn publish_command(&self) -> &'static str {
        match self.deployment {
            Deployment::Cluster => "SPUBLISH",
            _ => "PUBLISH",
        }
    }

    /// Durable publishes: waits until `publish_replicas` replicas confirmed every write sent on
    /// `client`'s connection to `slot`'s primary, the publish included (`WAIT` counts per
    /// connection). Short of them, the publish is stored on the primary but not durable: a
    /// timeout error, which answers 504 `outcome_unknown`, so the publisher retries with its
    /// idempotency key (the retry stores nothing twice and waits again).
    async fn await_replicas(&self, client: &Client, slot: u16) -> Result<(), fred::error::Error> {
        let wanted = self.settings.publish_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let timeout = self.settings.publish_replicas_timeout.as_millis() as i64;
        let wait = CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), true);
        let confirmed: i64 = client.custom(wait, vec![wanted as i64, timeout]).await?;
        if confirmed < wanted as i64 {
            let text =
                format!("stored on the primary, but {confirmed} of {wanted} replicas confirmed it in {timeout} ms");
            return Err(fred::error::Error::new(ErrorKind::Timeout, text));
        }
        Ok(())
    }

    /// Runs the history script: position and entries in one snapshot.
    async fn read_history(&self, channel: &ChannelName, query: HistoryQuery) -> Result<HistoryPage, EngineError> {
        let (mode, after, limit) = match query {
            HistoryQuery::After { after, limit } => ("after", after, limit),
            HistoryQuery::Latest { limit } => ("latest", 0, limit),
        };
        let args: Vec<Value> = vec![
            mode.into(),
            (after.min(i64::MAX as u64) as i64).into(),
            (limit as i64).into(),
            Epoch::random().as_str().into(),
            secs(self.settings.meta_ttl).into(),
            (self.settings.history_size as i64).into(),
            secs(self.settings.history_ttl).into(),
        ];
        let keys = vec![self.keys.stream(channel), self.keys.meta(channel)];
        let value: Value = self
            .call(Operation::History, |c| self.history_script.evalsha_with_reload(c, keys.clone(), args.clone()))
            .await?;
        parse_history(channel, value).map_err(|e| {
            self.metrics.error(Operation::History.label(), "protocol");
            EngineError::Protocol(format!("unexpected history reply: {e}"))
        })
    }

    /// Announces a join or leave to every node's subscribers of `channel`.
    async fn announce(&self, change: PresenceChange, channel: &ChannelName, client: &ClientInfo) {
        let message = &pubsub::presence_message(change, client);
        let published = self.call(Operation::Presence, |c| async move {
            let name = self.keys.pubsub(channel);
            match self.deployment {
                Deployment::Cluster => c.spublish::<(), _, _>(name, message).await,
                _ => c.publish::<(), _, _>(name, message).await,
            }
        });
        if let Err(e) = published.await {
            tracing::warn!(%channel, error = %e, "presence event not published");
        }
    }

    /// Writes presence entries and pushes out their lapse times and both keys' expiry, in one
    /// script call (`presence_write.lua`: one command for the node to send, where four per
    /// entry cost it more CPU than the rest of a subscribe); joins write those that queued
    /// together (`joins.rs`), every refresh writes them all, so entries survive as long as their
    /// node and come back after Redis lost them. On a cluster the entries must share a slot
    /// (`joins::slot_chunks` groups them).
    async fn write_presence(&self, entries: &[(ChannelName, ClientInfo)]) -> Result<(), EngineError> {
        let lapse = (now_ms() + self.settings.presence_ttl.as_millis() as u64) as i64;
        let keep = secs(self.settings.presence_ttl) * 2;
        let mut keys = Vec::with_capacity(entries.len() * 2);
        let mut args: Vec<Value> = Vec::with_capacity(2 + entries.len() * 2);
        args.extend([lapse.into(), keep.into()]);
        for (channel, client) in entries {
            keys.extend([self.keys.presence(channel), self.keys.presence_expiry(channel)]);
            let json = serde_json::to_string(client).expect("client info serialises");
            args.extend([Value::from(&*client.conn), json.into()]);
        }
        let (keys, args) = (&keys, &args);
        self.call(Operation::Presence, |c| async move {
            self.presence_write_script.evalsha_with_reload::<i64, _, _>(c, keys.clone(), args.clone()).await.map(drop)
        })
        .await
    }

    /// One call of `bans.lua` with `args` (its mode first).
    async fn call_bans<T: FromValue>(&self, args: Vec<Value>) -> Result<T, EngineError> {
        let (keys, args) = (&vec![self.keys.bans()], &args);
        self.call(Operation::Control, |c| self.bans_script.evalsha_with_reload(c, keys.clone(), args.clone())).await
    }

    /// Reads every live ban into the node's copy (load `load` of `bans.rs`). A plain read, so
    /// that a node starts and resubscribes while Redis refuses writes; lapsed entries are
    /// dropped by the next ban.
    async fn load_bans(&self, load: u64) -> Result<(), EngineError> {
        let all: HashMap<String, String> = self.call(Operation::Control, |c| c.hgetall(self.keys.bans())).await?;
        let now = now_ms();
        let users = all
            .into_iter()
            .filter_map(|(user, until)| Some((user, until.parse::<u64>().ok()?)))
            .filter(|(_, until)| *until > now)
            .collect();
        self.bans.loaded(load, users);
        Ok(())
    }

    /// Refreshes every presence entry this node holds, `PRESENCE_BATCH` entries of one slot per
    /// round trip.
    async fn refresh_presence_once(&self) {
        let entries: Vec<(ChannelName, ClientInfo)> =
            lock(&self.present).iter().map(|((c, _), info)| (c.clone(), info.clone())).collect();
        for batch in joins::slot_chunks(entries, |(c, _)| self.presence_slot(c)) {
            if let Err(e) = self.write_presence(&batch).await {
                tracing::debug!(error = %e, "presence refresh failed");
                return;
            }
        }
    }

    /// The slot of `channel`'s presence keys on a cluster; 0 elsewhere, where one script call
    /// may touch any keys.
    fn presence_slot(&self, channel: &ChannelName) -> u16 {
        match self.deployment {
            Deployment::Cluster => fred::util::redis_keyslot(self.keys.presence(channel).as_bytes()),
            _ => 0,
        }
    }
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        self.joins.close();
    }
}

async fn refresh_presence(engine: Weak<RedisEngine>) {
    let every = match engine.upgrade() {
        Some(e) => e.settings.presence_ttl / 3,
        None => return,
    };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else { return };
        engine.refresh_presence_once().await;
    }
}

#[async_trait]
impl DataPlane for RedisEngine {
    async fn publish(&self, channel: &ChannelName, msg: NewMessage) -> Result<Arc<Publication>, EngineError> {
        let time_us = now_us();
        let mut keys = vec![self.keys.stream(channel), self.keys.meta(channel)];
        if let Some(key) = &msg.idempotency_key {
            keys.push(self.keys.idempotency(channel, key));
        }
        let event_json = serde_json::to_string(&msg.event).expect("an optional string serialises");
        let args: Vec<Value> = vec![
            self.keys.pubsub(channel).into(),
            msg.data.get().into(),
            msg.event.as_deref().unwrap_or("").into(),
            event_json.into(),
            (time_us as i64).into(),
            (self.settings.history_size as i64).into(),
            secs(self.settings.history_ttl).into(),
            secs(self.settings.meta_ttl).into(),
            Epoch::random().as_str().into(),
            secs(self.settings.idempotency_ttl).into(),
            self.publish_command().into(),
        ];
        let slot = fred::util::redis_keyslot(keys[0].as_bytes());
        let (keys, args) = (&keys, &args);
        let (offset, epoch, _duplicate): (i64, String, i64) = self
            .call(Operation::Publish, |c| async move {
                let stored = self.publish_script.evalsha_with_reload(c, keys.clone(), args.clone()).await?;
                self.await_replicas(c, slot).await?;
                Ok(stored)
            })
            .await?;
        Ok(Arc::new(Publication::new(channel.clone(), Epoch::new(&epoch), offset as Offset, msg, time_us)))
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<Option<Position>, EngineError> {
        pubsub::subscribe(self, channel).await
    }

    async fn unsubscribe(&self, channel: &ChannelName) {
        pubsub::unsubscribe(self, channel).await
    }

    async fn history(&self, channel: &ChannelName, query: HistoryQuery) -> Result<HistoryPage, EngineError> {
        self.read_history(channel, query).await
    }

    async fn join(&self, channel: &ChannelName, client: &ClientInfo, announce: bool) -> Result<(), EngineError> {
        self.joins.join(channel, client).await?;
        lock(&self.present).insert((channel.clone(), client.conn.clone()), client.clone());
        if announce {
            self.announce(PresenceChange::Join, channel, client).await;
        }
        Ok(())
    }

    async fn leave(&self, channel: &ChannelName, client: &ClientInfo, announce: bool) {
        lock(&self.present).remove(&(channel.clone(), client.conn.clone()));
        let removed: Result<i64, _> = self
            .call(Operation::Presence, |c| async move {
                let pipeline = c.pipeline();
                let _: () = pipeline.hdel(self.keys.presence(channel), &*client.conn).await?;
                let _: () = pipeline.zrem(self.keys.presence_expiry(channel), &*client.conn).await?;
                let (removed, _): (i64, i64) = pipeline.all().await?;
                Ok(removed)
            })
            .await;
        if announce && removed.is_ok_and(|n| n > 0) {
            self.announce(PresenceChange::Leave, channel, client).await;
        }
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, EngineError> {
        let keys = vec![self.keys.presence(channel), self.keys.presence_expiry(channel)];
        let args = vec![now_ms() as i64];
        let values: Vec<String> = self
            .call(Operation::Presence, |c| self.presence_script.evalsha_with_reload(c, keys.clone(), args.clone()))
            .await?;
        let mut clients: Vec<ClientInfo> = values.iter().filter_map(|v| serde_json::from_str(v).ok()).collect();
        clients.sort_by(|a, b| (&a.user, &a.conn).cmp(&(&b.user, &b.conn)));
        Ok(clients)
    }

    async fn history_bounds(&self, channel: &ChannelName) -> Result<HistoryBounds, EngineError> {
        let page = self.read_history(channel, HistoryQuery::After { after: 0, limit: 1 }).await?;
        let size = self.settings.history_size as u64;
        let len: u64 = self.call(Operation::History, |c| c.xlen(self.keys.stream(channel))).await?;
        // Reads never go below top - size (see history.lua), whatever MAXLEN ~ kept.
        let len = len.min(size);
        let first_offset = page.publications.first().map(|p| p.offset.max(page.top.saturating_sub(size) + 1));
        Ok(HistoryBounds { epoch: page.epoch.to_string(), last_offset: page.top, len, first_offset })
    }
}

#[async_trait]
impl ClusterPlane for RedisEngine {
    async fn heartbeat(&self, info: &NodeInfo) -> Result<(), EngineError> {
        let json = &serde_json::to_string(info).expect("node info serialises");
        let ttl = &Expiration::PX(self.settings.node_ttl.as_millis() as i64);
        // Scored by when the entry lapses, so any live node's heartbeat prunes dead nodes.
        let lapse = (info.updated_ms + self.settings.node_ttl.as_millis() as u64) as f64;
        self.call(Operation::Control, |c| async move {
            let _: () = c.set(self.keys.node(&info.id), json.as_str(), Some(ttl.clone()), None, false).await?;
            let _: () = c.zadd(self.keys.nodes(), None, None, false, false, (lapse, info.id.as_str())).await?;
            c.zremrangebyscore(self.keys.nodes(), f64::NEG_INFINITY, now_ms() as f64).await
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError> {
        let infos: Vec<Option<String>> = self
            .call(Operation::Control, |c| async move {
                let _: () = c.zremrangebyscore(self.keys.nodes(), f64::NEG_INFINITY, now_ms() as f64).await?;
                let ids: Vec<String> = c.zrange(self.keys.nodes(), 0, -1, None, false, None, false).await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                c.mget(ids.iter().map(|id| self.keys.node(id)).collect::<Vec<_>>()).await
            })
            .await?;
        Ok(infos.iter().flatten().filter_map(|j| serde_json::from_str(j).ok()).collect())
    }

    fn set_survey_handler(&self, handler: Weak<dyn SurveyHandler>) {
        self.scatter.set_handler(handler);
    }

    async fn survey(&self, request: &str, timeout: Duration) -> Result<Survey, EngineError> {
        scatter::survey(self, request, timeout).await
    }

    async fn ban(&self, user: &str, until_ms: u64) -> Result<(), EngineError> {
        let change = serde_json::to_string(&bans::Change { user: user.into(), until_ms: Some(until_ms) })
            .expect("a ban serialises");
        let args: Vec<Value> =
            vec!["ban".into(), user.into(), (until_ms as i64).into(), change.into(), (now_ms() as i64).into()];
        self.call_bans::<i64>(args).await.map(drop)
    }

    async fn unban(&self, user: &str) -> Result<bool, EngineError> {
        let change =
            serde_json::to_string(&bans::Change { user: user.into(), until_ms: None }).expect("an unban serialises");
        let args: Vec<Value> = vec!["unban".into(), user.into(), (now_ms() as i64).into(), change.into()];
        Ok(self.call_bans::<i64>(args).await? == 1)
    }

    /// From the node's copy when it can tell the user is not banned (no round trip); from
    /// Redis when it cannot, or says banned (`bans.rs`).
    async fn banned_until(&self, user: &str) -> Result<Option<u64>, EngineError> {
        let now = now_ms();
        if self.live.control_connected() && self.bans.known(user, now) == Some(None) {
            return Ok(None);
        }
        let until: Option<u64> = self.call(Operation::Control, |c| c.hget(self.keys.bans(), user)).await?;
        Ok(until.filter(|u| *u > now))
    }

    async fn backend_stats(&self) -> Result<Option<RedisStats>, EngineError> {
        backend_stats(self).await.map(Some)
    }

    async fn deregister(&self, node: &str) {
        let removed = self.call(Operation::Control, |c| async move {
            let _: () = c.zrem(self.keys.nodes(), node).await?;
            c.del::<(), _>(self.keys.node(node)).await
        });
        if let Err(e) = removed.await {
            tracing::debug!(error = %e, "registry entry not removed; it lapses on its own");
        }
    }
}

#[async_trait]
impl Engine for RedisEngine {
    /// Ready only with every pool connection and every pub/sub connection up: commands go
    /// round-robin, channels are spread over the pub/sub connections.
    fn ready(&self) -> bool {
        self.pool.clients().iter().all(|c| c.is_connected()) && self.live.subscribers().all(|s| s.is_connected())
    }

    async fn close(&self) {
        for subscriber in self.live.subscribers() {
            let _ = subscriber.quit().await;
        }
        let _ = self.pool.quit().await;
    }
}

fn secs(d: Duration) -> i64 {
    d.as_secs().max(1) as i64
}

/// Whether a Redis Cluster turned the command away, unrun, because its slot is moving: a
/// redirect (the clients follow none, see `setup::builder`), or `TRYAGAIN` while a multi-key
/// command's keys are split between the two primaries.
fn slot_in_motion(e: &fred::error::Error) -> bool {
    let details = e.details();
    (e.kind() == &ErrorKind::Routing && details == "Too many redirections.") || details.starts_with("TRYAGAIN")
}

/// The typed error of a failed round trip of `kind` (see `error_kind`).
fn engine_error(kind: &str, text: String) -> EngineError {
    match kind {
        // Sent, and perhaps run: the caller cannot know.
        "timeout" | "connection" => EngineError::Timeout(text),
        "protocol" => EngineError::Protocol(text),
        // Redis answered with an error: it did not run the command.
        _ => EngineError::Refused(text),
    }
}

/// The `kind` label of a failed round trip.
fn error_kind(e: &fred::error::Error) -> &'static str {
    if slot_in_motion(e) {
        return "moving";
    }
    match e.kind() {
        ErrorKind::Timeout => "timeout",
        ErrorKind::IO | ErrorKind::Canceled => "connection",
        ErrorKind::Protocol | ErrorKind::Parse => "protocol",
        _ => "server",
    }
}

/// Parses `{epoch, top, entries}` from the history script.
fn parse_history(channel: &ChannelName, value: Value) -> Result<HistoryPage, String> {
    let Value::Array(mut parts) = value else { return Err("not an array".into()) };
    if parts.len() != 3 {
        return Err(format!("{} parts", parts.len()));
    }
    let entries = parts.pop().expect("three parts");
    let top = parts.pop().expect("three parts").as_u64().ok_or("top is not a number")?;
    let epoch = parts.pop().expect("three parts").as_string().ok_or("epoch is not a string")?;
    let epoch = Epoch::new(&epoch);
    let Value::Array(entries) = entries else { return Ok(HistoryPage { epoch, top, publications: Vec::new() }) };
    let publications = entries
        .into_iter()
        .map(|entry| parse_entry(channel, &epoch, entry).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HistoryPage { epoch, top, publications })
}

/// Parses one stream entry `[id, [field, value, ...]]` into a publication.
fn parse_entry(channel: &ChannelName, epoch: &Epoch, entry: Value) -> Result<Publication, String> {
    let Value::Array(mut pair) = entry else { return Err("entry is not an array".into()) };
    let fields = pair.pop().ok_or("entry without fields")?;
    let id = pair.pop().and_then(|v| v.as_string()).ok_or("entry without id")?;
    let offset: Offset = id.split('-').next().and_then(|o| o.parse().ok()).ok_or("bad entry id")?;
    let Value::Array(fields) = fields else { return Err("fields are not an array".into()) };
    let (mut data, mut event, mut time_us) = (None, None, 0);
    for kv in fields.chunks(2) {
        let [k, v] = kv else { break };
        match k.as_str().as_deref() {
            Some("d") => data = v.as_string(),
            Some("e") => event = v.as_string(),
            Some("t") => time_us = v.as_u64().unwrap_or(0),
            _ => {}
        }
    }
    let data = data.ok_or("entry without data")?;
    let data = RawValue::from_string(data).map_err(|e| format!("stored data is not JSON: {e}"))?;
    let msg = NewMessage { event, data, idempotency_key: None };
    Ok(Publication::new(channel.clone(), epoch.clone(), offset, msg, time_us))
}

/// Redis' own view: version, memory, load, and pub/sub subscriber counts of our channels; on a
/// cluster, summed over the primaries (each counts the sharded subscriptions of its own slots).
async fn backend_stats(engine: &RedisEngine) -> Result<RedisStats, EngineError> {
    let prefix = &engine.settings.prefix;
    let sharded = engine.deployment == Deployment::Cluster;
    let parts = engine
        .call(Operation::Control, |c| async move {
            let mut parts = Vec::new();
            match c.cached_cluster_state().filter(|_| sharded) {
                Some(state) => {
                    for server in state.unique_primary_nodes() {
                        parts.push(ServerStats::read(&c.with_cluster_node(server), prefix, true).await?);
                    }
                }
                None => parts.push(ServerStats::read(c, prefix, false).await?),
            }
            Ok(parts)
        })
        .await?;
    let mut top: Vec<TopChannel> = Vec::new();
    for part in &parts {
        for pair in part.counts.chunks(2) {
            if let [name, count] = pair
                && let (Some(name), Some(count)) = (name.as_string(), count.as_i64())
                && let Some(channel) = engine.keys.channel_of(&name)
            {
                top.push(TopChannel { channel: channel.to_string(), subscribers: count.max(0) as u64 });
            }
        }
    }
    top.sort_by(|a, b| b.subscribers.cmp(&a.subscribers).then_with(|| a.channel.cmp(&b.channel)));
    top.truncate(10);
    let sum = |name: &str| parts.iter().map(|p| p.field(name).and_then(|v| v.parse::<u64>().ok())).sum::<Option<u64>>();
    let used_memory = match parts.as_slice() {
        [one] => one.field("used_memory_human"),
        _ => sum("used_memory").map(|bytes| format!("{:.2}M", bytes as f64 / (1024.0 * 1024.0))),
    };
    Ok(RedisStats {
        version: parts.first().and_then(|p| p.field("redis_version")),
        used_memory,
        ops_per_sec: sum("instantaneous_ops_per_sec"),
        connected_clients: sum("connected_clients"),
        pubsub_channels: parts.iter().map(|p| p.channels).sum(),
        pubsub_patterns: parts.iter().map(|p| p.patterns).sum(),
        top_channels: top,
    })
}

/// What one Redis server says of itself and of our pub/sub channels.
struct ServerStats {
    info: String,
    /// Pub/sub channels with subscribers, sharded ones included.
    channels: u64,
    patterns: u64,
    /// `[name, count, ...]` for our channels.
    counts: Vec<Value>,
}

impl ServerStats {
    async fn read<C>(c: &C, prefix: &str, sharded: bool) -> Result<Self, fred::error::Error>
    where
        C: ServerInterface + PubsubInterface + Sync,
    {
        let info: String = c.info(None).await?;
        let ours_pattern = format!("{prefix}{{*");
        let mut all: Vec<String> = c.pubsub_channels("*").await?;
        let patterns: i64 = c.pubsub_numpat().await?;
        let counts: Vec<Value> = if sharded {
            let ours: Vec<String> = c.pubsub_shardchannels(ours_pattern).await?;
            let counts = if ours.is_empty() { Vec::new() } else { c.pubsub_shardnumsub(ours.clone()).await? };
            all.extend(ours);
            counts
        } else {
            let ours: Vec<String> = c.pubsub_channels(ours_pattern).await?;
            if ours.is_empty() { Vec::new() } else { c.pubsub_numsub(ours).await? }
        };
        Ok(Self { info, channels: all.len() as u64, patterns: patterns.max(0) as u64, counts })
    }

    /// One `INFO` field.
    fn field(&self, name: &str) -> Option<String> {
        self.info
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
            .map(str::trim)
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_that_may_have_run_is_an_unknown_outcome_and_a_refused_one_is_not() {
        let typed = |kind: ErrorKind| engine_error(error_kind(&fred::error::Error::new(kind, "x")), "t".into());
        assert!(matches!(typed(ErrorKind::Timeout), EngineError::Timeout(_)));
        assert!(matches!(typed(ErrorKind::IO), EngineError::Timeout(_)));
        assert!(matches!(typed(ErrorKind::Protocol), EngineError::Protocol(_)));
        assert!(matches!(typed(ErrorKind::Unknown), EngineError::Refused(_)));
        assert!(typed(ErrorKind::Timeout).outcome_unknown() && typed(ErrorKind::Protocol).outcome_unknown());
        assert!(!typed(ErrorKind::Unknown).outcome_unknown());
        assert!(!EngineError::Unavailable("down".into()).outcome_unknown());
    }
}
