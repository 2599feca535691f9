//! pushd: a real-time push broker node.
//!
//! The doors open one way: transport -> session -> hub -> engine, with `node` as the shared
//! core below every handler. Each module imports only from the layers under it (CONTRIBUTING.md
//! draws the graph; a test keeps it so):
//!
//! - front: [`listener`] (accept loop, TCP limits) -> [`router`] (route table, health, metrics).
//! - handlers: [`ws`] and [`sse`] (client transports), [`api`] (`/api/*` for backends and
//!   `/admin/*` for operators), with [`http`] (what they share) and [`shutdown`] (the drain).
//! - [`session`]: one client: identity, limits, subscriptions, replay merge.
//! - [`survey`]: this node's answers to the cluster's admin surveys.
//! - [`node`]: what every handler shares: config, hub, engine, auth, admission, metrics.
//! - [`hub`]: this node's sessions by channel; queues shared frames, never touches a socket.
//! - [`engine`]: the seam to the cluster: history, positions, fan-out, presence, registry.
//! - leaves: [`protocol`] (wire types), [`channel`], [`auth`], [`admission`], [`config`],
//!   [`cursor`], [`origin`], [`client_addr`], [`rate`], [`metrics`], [`locks`], [`shard`],
//!   [`panics`].

pub mod admission;
pub mod api;
pub mod assets;
pub mod auth;
pub mod channel;
pub mod client_addr;
pub mod config;
pub mod cursor;
pub mod engine;
pub mod http;
pub mod hub;
pub mod listener;
pub mod locks;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod panics;
pub mod protocol;
pub mod rate;
pub mod router;
pub mod session;
pub mod shard;
pub mod shutdown;
pub mod sse;
pub mod survey;
pub mod tcp;
pub mod ws;

use std::future::Future;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::router::Plane;

pub use config::{Args, Config};
pub use node::Node;

/// Serves clients on `listener` until `shutdown` resolves, then drains and returns.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    panics::install();
    let addr = listener.local_addr()?;
    if config.dev_mode() {
        tracing::warn!(
            %addr,
            "DEV MODE: no --token-secret, so any client may connect as any user, subscribe and publish, \
             and /api/* is open unless --api-key is set. Loopback only. Never run this in production."
        );
    }
    let admin =
        match config.admin_listen {
            Some(admin) => Some(TcpListener::bind(admin).await.with_context(|| {
                format!("cannot listen on {admin}: is another process using it? set --admin-listen")
            })?),
            None => None,
        };
    let engine = if config.redis_url.is_some() { "redis" } else { "memory" };
    let node = Node::start(config, addr).await?;
    let public_plane = if admin.is_some() { Plane::Public } else { Plane::All };
    let mut accepts = vec![tokio::spawn(listener::accept_loop(listener, node.clone(), public_plane))];
    let admin_addr = match admin {
        Some(admin) => {
            let admin_addr = admin.local_addr()?;
            accepts.push(tokio::spawn(listener::accept_loop(admin, node.clone(), Plane::Admin)));
            Some(admin_addr)
        }
        None => None,
    };
    tracing::info!(%addr, admin_addr = admin_addr.map(tracing::field::display), node = %node.config().node_id, engine, "pushd listening");
    if node.config().max_connections > node.config().max_tcp_connections {
        tracing::warn!(
            max_connections = node.config().max_connections,
            max_tcp_connections = node.config().max_tcp_connections,
            "--max-connections is above what the open-file limit allows: raise `ulimit -n` (or set --max-tcp-connections)"
        );
    }
    let heartbeat = tokio::spawn(node.clone().heartbeat());
    shutdown.await;
    shutdown::drain(&node).await;
    for accept in accepts {
        accept.await?;
    }
    heartbeat.await?;
    node.engine().close().await;
    tracing::info!("pushd stopped");
    Ok(())
}
