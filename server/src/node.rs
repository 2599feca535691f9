//! `Node`: what every request handler and session shares — config, hub, engine, auth, metrics,
//! readiness and the connection budget. Operations that more than one transport or API offers
//! (publish, presence) live here once. The node knows no transport, API or route: handlers come
//! to it through its methods, and its fields are private so none reaches past them.

use std::collections::HashSet;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Refusal, Slot};
use crate::auth::{AuthError, Authenticator, Identity};
use crate::channel::ChannelName;
use crate::config::Config;
use crate::engine::memory::MemorySettings;
use crate::engine::{
    ClientInfo, Deliver, Engine, MemoryEngine, NewMessage, NodeInfo, Publication, RedisEngine, RedisSettings,
    SurveyHandler,
};
use crate::hub::ConnId;
use crate::hub::Hub;
use crate::locks::lock;
use crate::metrics::{self, Metrics, TRANSPORTS};
use crate::protocol::{CommandError, ErrorCode};
use crate::rate::RateLimiter;
use prometheus::core::Collector;

/// Shared state of one pushd node.
pub struct Node {
    config: Config,
    addr: String,
    /// Messages in and out per second over the last heartbeat period.
    rates: Mutex<(f64, f64)>,
    /// `config.node_id`, shared by every presence entry.
    node_id: Arc<str>,
    hub: Arc<Hub>,
    engine: Arc<dyn Engine>,
    auth: Authenticator,
    metrics: Metrics,
    /// Counts every session task, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Cancelled when the drain is over: the listener closes and idle HTTP connections end.
    stopping: CancellationToken,
    started: Instant,
    /// Unix ms when the node started, for the registry.
    started_ms: u64,
    /// `SERVING`, `UNREADY` or `CLOSING` (see `shutdown.rs`).
    drain: AtomicU8,
    admission: Arc<Admission>,
    /// The server API's bucket (`--api-rate-limit`); `None` without a limit.
    api_rate: Option<Mutex<RateLimiter>>,
    next_conn: AtomicU64,
}

/// The node takes traffic and /readyz says so.
const SERVING: u8 = 0;
/// Draining, first phase: /readyz answers 503, new clients are still served.
const UNREADY: u8 = 1;
/// Draining, second phase: new clients are refused and sessions are being closed.
const CLOSING: u8 = 2;

impl Node {
    /// Builds the node on the engine the config names: Redis with `--redis-url`, else memory.
    pub async fn start(config: Config, addr: SocketAddr) -> anyhow::Result<Arc<Self>> {
        let engine_name = if config.redis_url.is_some() { "redis" } else { "memory" };
        let metrics = Metrics::new(&metrics::Identity {
            node_id: &config.node_id,
            engine: engine_name,
            max_connections: config.max_connections,
        });
        let hub = Arc::new(Hub::new(metrics.clone(), config.send_queue, config.flush_rest));
        let deliver: Arc<dyn Deliver> = hub.clone();
        let engine: Arc<dyn Engine> = match &config.redis_url {
            Some(url) => {
                let settings = RedisSettings {
                    url: url.clone(),
                    tls_ca: config.redis_tls_ca.clone(),
                    prefix: config.redis_prefix.clone(),
                    pool_size: config.redis_pool,
                    subscribers: config.redis_subscribers,
                    history_size: config.history_size,
                    history_ttl: config.history_ttl,
                    meta_ttl: config.history_meta_ttl,
                    presence_ttl: config.presence_ttl,
                    idempotency_ttl: config.idempotency_ttl,
                    publish_replicas: config.publish_replicas,
                    publish_replicas_timeout: config.publish_replicas_timeout,
                    node_ttl: config.node_ttl,
                    node_id: config.node_id.clone(),
                };
                RedisEngine::connect(settings, Arc::downgrade(&deliver), metrics.redis.clone()).await?
            }
            None => {
                let settings = MemorySettings {
                    history_size: config.history_size,
                    history_ttl: config.history_ttl,
                    meta_ttl: config.history_meta_ttl,
                    idempotency_ttl: config.idempotency_ttl,
                    node_ttl: config.node_ttl,
                    max_channels: config.max_idle_channels,
                    max_history_bytes: config.max_history_bytes,
                };
                MemoryEngine::start(settings, Arc::downgrade(&deliver), metrics.memory.clone())
            }
        };
        let api_rate = (config.api_rate_limit > 0)
            .then(|| Mutex::new(RateLimiter::new(config.api_rate_limit, config.api_rate_burst)));
        let admission =
            Admission::new(config.max_connections, config.max_connections_per_user, config.max_connections_per_ip);
        let node = Arc::new(Self {
            addr: addr.to_string(),
            rates: Mutex::new((0.0, 0.0)),
            auth: Authenticator::new(config.token_secret.as_deref()),
            node_id: config.node_id.as_str().into(),
            config,
            hub,
            engine,
            metrics,
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
            started: Instant::now(),
            started_ms: crate::engine::now_ms(),
            drain: AtomicU8::new(SERVING),
            admission,
            api_rate,
            next_conn: AtomicU64::new(1),
        });
        let handler: Arc<dyn SurveyHandler> = node.clone();
        node.engine.set_survey_handler(Arc::downgrade(&handler));
        Ok(node)
    }

    /// The node's configuration, as validated at start.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This node's sessions and subscriptions.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The cluster seam: history, fan-out, presence, bans, surveys.
    pub fn engine(&self) -> &dyn Engine {
        &*self.engine
    }

    /// `--node-id`, shared (one allocation for every presence entry).
    pub fn node_id(&self) -> &Arc<str> {
        &self.node_id
    }

    /// Checks a client's token (or, in dev mode, takes the `?user=` it names).
    pub fn authenticate(&self, token: Option<&str>, dev_user: Option<&str>) -> Result<Identity, AuthError> {
        self.auth.authenticate(token, dev_user)
    }

    /// Runs a session task that the drain waits for.
    pub fn spawn(&self, session: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(session);
    }

    /// Resolves once the drain is over: listeners close and idle HTTP connections end.
    pub async fn stopped(&self) {
        self.stopping.cancelled().await
    }

    /// Ends the drain (see `stopped`).
    pub fn stop(&self) {
        self.stopping.cancel();
    }

    /// Waits until every session task has ended, or `deadline`; `Err` says how many remain.
    pub async fn wait_for_sessions(&self, deadline: tokio::time::Instant) -> Result<(), usize> {
        self.tracker.close();
        tokio::time::timeout_at(deadline, self.tracker.wait()).await.map_err(|_| self.tracker.len())
    }

    /// How long this node has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Messages in and out per second over the last heartbeat period.
    pub fn rates(&self) -> (f64, f64) {
        *lock(&self.rates)
    }

    /// The address this node listens on.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// A fresh cluster-unique connection id.
    pub fn next_conn_id(&self) -> ConnId {
        format!("{}.{}", self.config.node_id, self.next_conn.fetch_add(1, Ordering::Relaxed)).into()
    }

    /// Reserves a session's place for `user` at `ip`; refused while the drain closes sessions,
    /// or at one of the connection limits (`admission.rs`).
    pub fn reserve_connection(&self, user: &str, ip: IpAddr) -> Result<Slot, Refusal> {
        if self.drain.load(Ordering::Relaxed) == CLOSING {
            return Err(Refusal::Draining);
        }
        self.admission.admit(user, ip)
    }

    /// Takes one server API request from `--api-rate-limit`; `Err` says how long until the next.
    pub fn api_request(&self) -> Result<(), Duration> {
        match &self.api_rate {
            Some(bucket) => lock(bucket).take(Instant::now()),
            None => Ok(()),
        }
    }

    /// True from the start of a drain: /readyz answers 503 from then on.
    pub fn is_draining(&self) -> bool {
        self.drain.load(Ordering::Relaxed) != SERVING
    }

    /// Turns readiness off for good; clients are still served until `stop_accepting`. The
    /// listener stays open so load balancers can read the 503 from /readyz.
    pub fn start_draining(&self) {
        let _ = self.drain.compare_exchange(SERVING, UNREADY, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Refuses new client connections from now on (the drain is closing sessions).
    pub fn stop_accepting(&self) {
        self.drain.store(CLOSING, Ordering::Relaxed);
    }

    /// Refuses a banned user (`pushctl kick --ban`). If the ban store cannot be asked, the user
    /// is let in: an outage of the store must not lock everyone out.
    pub async fn check_ban(&self, user: &str) -> Result<(), AuthError> {
        match self.engine.banned_until(user).await {
            Ok(Some(until_ms)) => Err(AuthError::Banned { until_ms }),
            Ok(None) => Ok(()),
            Err(e) => {
                tracing::warn!(%user, error = %e, "ban check failed; letting the user in");
                Ok(())
            }
        }
    }

    /// Whether /readyz says yes.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.engine.ready()
    }

    /// The `/metrics` text, with the readiness gauges as they stand now.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(self.is_ready(), self.is_draining(), self.engine.ready(), crate::panics::count())
    }

    /// This node's registry entry: identity and current stats.
    pub fn info(&self, addr: &str) -> NodeInfo {
        let m = &self.metrics;
        let sessions = self.hub.sessions();
        let users: HashSet<&str> = sessions.iter().map(|s| &*s.info.user).collect();
        let sum = |c: &prometheus::IntCounterVec| {
            c.collect().iter().flat_map(|f| f.get_metric()).map(|m| m.get_counter().get_value()).sum::<f64>() as u64
        };
        NodeInfo {
            id: self.config.node_id.clone(),
            addr: addr.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms: self.started_ms,
            updated_ms: crate::engine::now_ms(),
            connections: sessions.len() as u64,
            users: users.len() as u64,
            subscriptions: TRANSPORTS.iter().map(|t| m.subscriptions.with_label_values(&[t]).get().max(0) as u64).sum(),
            channels: m.channels.get().max(0) as u64,
            messages_in: sum(&m.published),
            messages_out: sum(&m.delivered),
            replays: sum(&m.replays),
            slow_consumers: m.slow_consumers.get(),
            draining: self.is_draining(),
        }
    }

    /// Refreshes this node's registry entry and samples its rates every second until the drain
    /// ends.
    pub async fn heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let (mut last, mut at) = ((0, 0), Instant::now());
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stopping.cancelled() => break,
            }
            let info = self.info(&self.addr);
            let elapsed = at.elapsed();
            let secs = elapsed.as_secs_f64().max(0.001);
            let rates = ((info.messages_in - last.0) as f64 / secs, (info.messages_out - last.1) as f64 / secs);
            *lock(&self.rates) = rates;
            self.hub.sample_rates(elapsed);
            (last, at) = ((info.messages_in, info.messages_out), Instant::now());
            if let Err(e) = self.engine.heartbeat(&info).await {
                tracing::debug!(error = %e, "heartbeat not stored");
            }
        }
        self.engine.deregister(&self.config.node_id).await;
    }

    /// Checks the payload size, stores and fans out one message; counts it under `route`.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        msg: NewMessage,
        route: &str,
    ) -> Result<Arc<Publication>, CommandError> {
        let size = msg.data.get().len();
        if size > self.config.max_payload {
            self.metrics.publish_errors.with_label_values(&["payload_too_large"]).inc();
            let text = format!("data is {size} bytes; the limit is {} (--max-payload)", self.config.max_payload);
            return Err(CommandError::new(ErrorCode::PayloadTooLarge, text));
        }
        match self.engine.publish(channel, msg).await {
            Ok(p) => {
                self.metrics.published.with_label_values(&[route]).inc();
                Ok(p)
            }
            Err(e) if e.outcome_unknown() => {
                self.metrics.publish_errors.with_label_values(&["outcome_unknown"]).inc();
                let text = format!(
                    "{e}: the message may have been stored; retry with the same idempotency_key \
                     (a retry without one may store it twice)"
                );
                Err(CommandError::new(ErrorCode::OutcomeUnknown, text))
            }
            Err(e) => {
                self.metrics.publish_errors.with_label_values(&["unavailable"]).inc();
                Err(CommandError::new(ErrorCode::Unavailable, format!("message not stored: {e}; retry")))
            }
        }
    }

    /// Who is present in `channel`, where presence is on.
    pub async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, CommandError> {
        if !self.config.presence_on(channel.as_str()) {
            let text = format!("presence is off for {channel} (--presence)");
            return Err(CommandError::new(ErrorCode::PresenceDisabled, text));
        }
        self.engine
            .presence(channel)
            .await
            .map_err(|e| CommandError::new(ErrorCode::Unavailable, format!("{e}: retry shortly")))
    }
}
