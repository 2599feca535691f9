//! How the engine reaches Redis: which deployment a `--redis-url` names (one server, a Redis
//! Cluster, a Sentinel-managed primary; each plain or TLS), the CA that TLS trusts, and the
//! timeouts and reconnect policy every connection shares. It builds clients; it sends nothing.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use fred::types::config::{TlsConfig, TlsConnector, TlsHostMapping};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// How long one Redis command may take before it counts as failed.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// `command`, failing as a fred timeout when it takes longer than `COMMAND_TIMEOUT`: for calls
/// the client library does not bound itself (subscriptions, routing refreshes).
pub(super) async fn bounded<T>(
    command: impl std::future::Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, fred::error::Error> {
    tokio::time::timeout(COMMAND_TIMEOUT, command)
        .await
        .unwrap_or_else(|_| Err(fred::error::Error::new(ErrorKind::Timeout, "no answer in time")))
}

/// The URL schemes `--redis-url` takes.
const SCHEMES: [&str; 6] = ["redis", "rediss", "redis-cluster", "rediss-cluster", "redis-sentinel", "rediss-sentinel"];

/// Which kind of Redis deployment the URL names. Only a cluster changes what the engine sends:
/// sharded pub/sub, and batches split by hash slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// One server (`redis://`, `rediss://`).
    Single,
    /// A Redis Cluster (`redis-cluster://`, `rediss-cluster://`).
    Cluster,
    /// A primary found through Sentinel (`redis-sentinel://`, `rediss-sentinel://`).
    Sentinel,
}

impl Deployment {
    pub fn label(self) -> &'static str {
        match self {
            Deployment::Single => "single",
            Deployment::Cluster => "cluster",
            Deployment::Sentinel => "sentinel",
        }
    }
}

/// Parses `url` into fred's config, with TLS trusting `ca_file` (or the system's roots) when the
/// scheme asks for it.
pub(super) fn client_config(url: &str, ca_file: Option<&Path>) -> anyhow::Result<(Config, Deployment)> {
    let bad = || {
        format!(
            "bad --redis-url {url:?}: use redis://host:port, redis-cluster://host:port?node=host:port, \
             redis-sentinel://host:port/0?sentinelServiceName=name (rediss… for TLS)"
        )
    };
    // fred reads any other scheme as one plain server; a typo must not connect somewhere else.
    let scheme = url.split("://").next().unwrap_or_default();
    if !SCHEMES.contains(&scheme) || !url.contains("://") {
        anyhow::bail!(bad());
    }
    let mut config = Config::from_url(url).with_context(bad)?;
    let deployment = match &config.server {
        ServerConfig::Clustered { .. } => Deployment::Cluster,
        ServerConfig::Sentinel { .. } => Deployment::Sentinel,
        _ => Deployment::Single,
    };
    let tls = scheme.starts_with("rediss");
    if !tls && ca_file.is_some() {
        anyhow::bail!("--redis-tls-ca is set but --redis-url does not use TLS: use a rediss:// URL");
    }
    if tls {
        let connector = match ca_file {
            Some(path) => rustls_trusting(path)?,
            None => TlsConnector::default_rustls().context("loading the system's CA certificates for rediss://")?,
        };
        // Cluster nodes announce IPs; the certificate names the host the URL was given with.
        let hostnames = match deployment {
            Deployment::Single => TlsHostMapping::None,
            _ => TlsHostMapping::DefaultHost,
        };
        config.tls = Some(TlsConfig { connector, hostnames });
    }
    Ok((config, deployment))
}

/// A TLS connector that trusts exactly the certificates in the PEM file at `path`.
fn rustls_trusting(path: &Path) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("--redis-tls-ca: cannot read {}", path.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("--redis-tls-ca: {} is not a PEM certificate file", path.display()))?;
        roots.add(cert).with_context(|| format!("--redis-tls-ca: a certificate in {} is invalid", path.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("--redis-tls-ca: {} holds no certificate", path.display());
    }
    // The one crypto provider compiled in (ring), with its safe default protocol versions.
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Ok(config.into())
}

/// A builder for every client of one engine: commands time out, are never retried (a publish
/// must not run twice after Redis may have run it), and connections come back with backoff.
///
/// Cluster redirects are not followed either: fred follows an `ASK` only with a command
/// attempt to spare, and without one it drops every connection of the client. A redirect
/// comes back as an error instead, and `RedisEngine::call` sends the command again once
/// fred's slot map caught up (a `MOVED` refreshes it) or the slot's keys finished moving.
pub(super) fn builder(config: Config) -> Builder {
    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT)
        .with_connection_config(|c| {
            c.max_command_attempts = 1;
            c.max_redirections = 0;
            c.connection_timeout = Duration::from_secs(2);
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_names_the_deployment() {
        let kind = |url| client_config(url, None).map(|(_, d)| d).unwrap();
        assert_eq!(kind("redis://127.0.0.1:6379"), Deployment::Single);
        assert_eq!(kind("redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001"), Deployment::Cluster);
        assert_eq!(kind("redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=main"), Deployment::Sentinel);
    }

    #[test]
    fn a_ca_file_without_tls_or_a_missing_one_is_refused_with_what_to_do() {
        let err = client_config("redis://127.0.0.1:6379", Some(Path::new("/etc/hosts"))).unwrap_err();
        assert!(err.to_string().contains("rediss://"), "{err}");
        let err = client_config("rediss://127.0.0.1:6379", Some(Path::new("/no/such/ca.pem"))).unwrap_err();
        assert!(format!("{err:#}").contains("cannot read /no/such/ca.pem"), "{err:#}");
        let err = client_config("mongodb://x", None).unwrap_err();
        assert!(err.to_string().contains("redis-cluster://"), "{err}");
    }
}
