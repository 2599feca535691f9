//! The Redis deployments the Redis engine runs on, each made of real `redis-server` processes on
//! loopback ports: one server (`RedisServer`), a Redis Cluster of 3 primaries and 3 replicas, a
//! primary with a replica watched by 3 Sentinels, and one server that speaks TLS only, with
//! certificates made by `openssl` for the test. `Backend` lets one suite run on each.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pushd::Config;

use crate::{RedisServer, free_port, secure_config, within};

/// One of the deployments, as the suites use it.
pub enum Backend {
    Single(RedisServer),
    Cluster(RedisCluster),
    Sentinel(Box<RedisSentinel>),
    Tls(RedisTls),
}

impl Backend {
    pub async fn single() -> Self {
        Backend::Single(RedisServer::start().await)
    }

    pub async fn cluster() -> Self {
        Backend::Cluster(RedisCluster::start().await)
    }

    pub async fn sentinel() -> Self {
        Backend::Sentinel(Box::new(RedisSentinel::start().await))
    }

    pub async fn tls() -> Self {
        Backend::Tls(RedisTls::start().await)
    }

    /// `secure_config()` on this deployment, named `node_id`.
    pub fn config(&self, node_id: &str) -> Config {
        let (url, ca) = match self {
            Backend::Single(r) => (r.url(), None),
            Backend::Cluster(c) => (c.url(), None),
            Backend::Sentinel(s) => (s.url(), None),
            Backend::Tls(t) => (t.server.url(), Some(t.certs.ca())),
        };
        Config { node_id: node_id.into(), redis_url: Some(url), redis_tls_ca: ca, ..secure_config() }
    }

    /// `pushd` flags that reach this deployment: `--redis-url`, and `--redis-tls-ca` for TLS.
    pub fn args(&self) -> Vec<String> {
        let config = self.config("-");
        let mut args = vec!["--redis-url".to_owned(), config.redis_url.unwrap()];
        if let Some(ca) = config.redis_tls_ca {
            args.extend(["--redis-tls-ca".to_owned(), ca.display().to_string()]);
        }
        args
    }

    /// The servers that hold data now (the primaries), for commands every one must run.
    pub fn primaries(&self) -> Vec<&RedisServer> {
        match self {
            Backend::Single(r) => vec![r],
            Backend::Cluster(c) => c.nodes.iter().filter(|n| n.is_running()).collect(),
            Backend::Sentinel(s) => vec![&s.primary],
            Backend::Tls(t) => vec![&t.server],
        }
    }

    /// Runs `args` with `redis-cli` on every primary (on a cluster: every running node, replicas
    /// answer reads of their own state, e.g. `CLIENT KILL`).
    pub async fn cli_all(&self, args: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for server in self.primaries() {
            out.push(server.cli(args).await);
        }
        out
    }

    /// Runs `args`, a command on one key, where that key lives (a cluster redirects).
    pub async fn cli_key(&self, args: &[&str]) -> String {
        match self {
            Backend::Cluster(c) => c.cli_at(args).await,
            _ => self.primaries()[0].cli(args).await,
        }
    }
}

/// A CA and a server certificate for `localhost` / 127.0.0.1 signed by it, made with `openssl`.
pub struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    pub fn make() -> Self {
        let dir = std::env::temp_dir().join(format!("pushd-certs-{}-{}", std::process::id(), crate::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl not found: install it (the test script does)");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let subject_alt = "subjectAltName=DNS:localhost,IP:127.0.0.1";
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pushd test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "redis.key",
            "-out",
            "redis.csr",
        ]);
        std::fs::write(dir.join("ext.cnf"), subject_alt).unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "redis.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "redis.crt",
        ]);
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate a client must trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis that accepts TLS connections only, with a certificate of a CA made for the test.
pub struct RedisTls {
    pub server: RedisServer,
    pub certs: Certificates,
}

impl RedisTls {
    pub async fn start() -> Self {
        let certs = Certificates::make();
        let server = RedisServer::launch(false, Vec::new(), Some(certs.dir().to_owned())).await;
        Self { server, certs }
    }
}

/// A Redis Cluster: 3 primaries, each with one replica, slots spread by `redis-cli --cluster
/// create`. Failovers are fast (`cluster-node-timeout` 1 s), so fault tests stay short.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> Self {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "1000",
                "--cluster-replica-validity-factor",
                "0",
                "--cluster-config-file",
            ];
            let mut extra: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            extra.push(format!("nodes-{}.conf", crate::unique()));
            nodes.push(RedisServer::launch(false, extra, None).await);
        }
        let mut create = tokio::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = within("redis-cli --cluster create", create.output()).await.expect("redis-cli not found");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = Self { nodes };
        cluster.await_healthy().await;
        cluster
    }

    /// Waits until every running node says the cluster is ok and every replica's link to its
    /// primary is up (a replica that never synced refuses to take over).
    pub async fn await_healthy(&self) {
        within("the cluster to be healthy", async {
            loop {
                let mut ok = true;
                for node in self.nodes.iter().filter(|n| n.is_running()) {
                    ok &= node.cli(&["CLUSTER", "INFO"]).await.contains("cluster_state:ok");
                    let replication = node.cli(&["INFO", "replication"]).await;
                    ok &= !replication.contains("role:slave") || replication.contains("master_link_status:up");
                }
                if ok {
                    return;
                }
                // Gossip has no event to await from outside; the guard bounds this poll.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
    }

    /// `redis-cluster://` with every node, so a node can start while any of them is down.
    pub fn url(&self) -> String {
        let mut nodes = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port));
        let first = nodes.next().unwrap();
        let rest: Vec<String> = nodes.map(|n| format!("node={n}")).collect();
        format!("redis-cluster://{first}?{}", rest.join("&"))
    }

    /// Runs `args` (whose first key is on the slot they name) with `redis-cli -c`, which
    /// follows the cluster's redirects to the node that serves it.
    pub async fn cli_at(&self, args: &[&str]) -> String {
        let node = self.nodes.iter().find(|n| n.is_running()).expect("a running node");
        let mut cli = tokio::process::Command::new("redis-cli");
        cli.args(["-c", "-p", &node.port.to_string()]).args(args);
        let out = within("redis-cli -c", cli.output()).await.expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The index in `nodes` of the primary that serves `key`'s slot, and of its replica.
    pub async fn primary_and_replica_of(&self, key: &str) -> (usize, usize) {
        let node = self.nodes.iter().find(|n| n.is_running()).expect("a running node");
        let (primary, replica) = self.owners_seen_by(node, key).await.unwrap_or((None, None));
        match (primary, replica) {
            (Some(p), Some(r)) => (p, r),
            _ => panic!("no healthy primary with a replica serves {key}"),
        }
    }

    /// Who serves `key`'s slot as `node` sees it: the running primary and its running replica.
    async fn owners_seen_by(&self, node: &RedisServer, key: &str) -> Option<(Option<usize>, Option<usize>)> {
        let slot: u16 = node.cli(&["CLUSTER", "KEYSLOT", key]).await.trim().parse().ok()?;
        let table = node.cli(&["CLUSTER", "NODES"]).await;
        let rows: Vec<Vec<&str>> =
            table.lines().map(|l| l.split(' ').collect::<Vec<&str>>()).filter(|f| f.len() >= 8).collect();
        let index_of = |addr: &str| -> Option<usize> {
            let port: u16 = addr.split([':', '@']).nth(1)?.parse().ok()?;
            self.nodes.iter().position(|n| n.port == port && n.is_running())
        };
        let serves = |f: &Vec<&str>| {
            f[8..].iter().any(|range| {
                let mut ends = range.split('-').map(|x| x.parse::<u16>().unwrap_or(u16::MAX));
                let lo = ends.next().unwrap_or(u16::MAX);
                (lo..=ends.next().unwrap_or(lo)).contains(&slot)
            })
        };
        let healthy = |f: &Vec<&str>| !f[2].contains("fail");
        let primary = rows.iter().find(|f| f[2].contains("master") && healthy(f) && serves(f))?;
        let replica = rows.iter().find(|f| f[3] == primary[0] && healthy(f));
        Some((index_of(primary[1]), replica.and_then(|r| index_of(r[1]))))
    }

    /// `CLUSTER FAILOVER` on the replica of `key`'s primary (a planned hand-over that waits for
    /// the replica to catch up); returns (old primary, new primary) once the new one serves the slot.
    ///
    /// A manual failover gives up when the replica does not catch up within twice the node
    /// timeout (a busy machine), so it is asked again while the slot has not moved.
    pub async fn failover(&self, key: &str) -> (usize, usize) {
        let (primary, replica) = self.primary_and_replica_of(key).await;
        for _ in 0..5 {
            let out = self.nodes[replica].cli(&["CLUSTER", "FAILOVER"]).await;
            assert!(out.contains("OK"), "CLUSTER FAILOVER: {out}");
            let moved = tokio::time::timeout(Duration::from_secs(5), self.await_primary(key, replica)).await;
            if moved.is_ok() {
                return (primary, replica);
            }
        }
        panic!("CLUSTER FAILOVER of {key}'s primary never completed");
    }

    /// SIGKILLs `key`'s primary; returns (old primary, new primary) once its replica was
    /// promoted and serves the slot.
    pub async fn kill_primary_of(&mut self, key: &str) -> (usize, usize) {
        let (primary, replica) = self.primary_and_replica_of(key).await;
        self.nodes[primary].kill().await;
        self.await_primary(key, replica).await;
        (primary, replica)
    }

    /// Moves `key`'s slot, with every key in it, from its primary to the next primary, the way
    /// `redis-cli --cluster reshard` does: `SETSLOT IMPORTING` on the target, `MIGRATING` on
    /// the source, `MIGRATE` in batches of `batch` keys, then `SETSLOT NODE` on the target, the
    /// source and every other primary. Returns (source, target) once every node agrees.
    pub async fn move_slot_of(&self, key: &str, batch: usize) -> (usize, usize) {
        let (from, _) = self.primary_and_replica_of(key).await;
        let primaries = self.primary_indexes().await;
        let at = primaries.iter().position(|&p| p == from).expect("the source is a primary");
        let to = primaries[(at + 1) % primaries.len()];
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        let slot = source.cli(&["CLUSTER", "KEYSLOT", key]).await.trim().to_owned();
        let from_id = source.cli(&["CLUSTER", "MYID"]).await.trim().to_owned();
        let to_id = target.cli(&["CLUSTER", "MYID"]).await.trim().to_owned();
        let ok = |step: &str, out: String| assert!(out.contains("OK"), "{step}: {out}");
        ok("IMPORTING", target.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]).await);
        ok("MIGRATING", source.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]).await);
        let batch = batch.to_string();
        loop {
            let keys = source.cli(&["CLUSTER", "GETKEYSINSLOT", &slot, &batch]).await;
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = target.port.to_string();
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            migrate.extend(keys);
            ok("MIGRATE", source.cli(&migrate).await);
        }
        for node in [to, from].into_iter().chain(primaries.iter().copied().filter(|&p| p != to && p != from)) {
            ok("SETSLOT NODE", self.nodes[node].cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]).await);
        }
        self.await_primary(key, to).await;
        (from, to)
    }

    /// The indexes in `nodes` of the running primaries, in `nodes` order.
    async fn primary_indexes(&self) -> Vec<usize> {
        let mut primaries = Vec::new();
        for (i, node) in self.nodes.iter().enumerate().filter(|(_, n)| n.is_running()) {
            if node.cli(&["ROLE"]).await.starts_with("master") {
                primaries.push(i);
            }
        }
        primaries
    }

    /// Starts a killed node again on its port with its cluster config: it rejoins as a replica
    /// of whoever took over its slots, and syncs from it.
    pub async fn restart(&mut self, node: usize) {
        self.nodes[node].restart().await;
        self.await_healthy().await;
    }

    /// Waits until every running node names `expected` as the primary of `key`'s slot.
    async fn await_primary(&self, key: &str, expected: usize) {
        within("the replica to take over the slot", async {
            loop {
                let mut agreed = true;
                for node in self.nodes.iter().filter(|n| n.is_running()) {
                    let seen = self.owners_seen_by(node, key).await;
                    agreed &= seen.is_some_and(|(primary, _)| primary == Some(expected));
                }
                if agreed {
                    return;
                }
                // Gossip has no event to await from outside; the guard bounds this poll.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }
}

/// A primary with one replica, watched by 3 Sentinels (quorum 2) as service `pushd`.
pub struct RedisSentinel {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
}

/// The Sentinel service name the tests use.
pub const SENTINEL_SERVICE: &str = "pushd";

impl RedisSentinel {
    pub async fn start() -> Self {
        let primary = RedisServer::start().await;
        let replica =
            RedisServer::launch(false, vec!["--replicaof".into(), "127.0.0.1".into(), primary.port.to_string()], None)
                .await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Self::sentinel(primary.port).await);
        }
        let s = Self { primary, replica, sentinels };
        within("the replica to sync and the sentinels to see it", async {
            loop {
                let replicas = s.sentinels[0].cli(&["SENTINEL", "REPLICAS", SENTINEL_SERVICE]).await;
                let synced = s.replica.cli(&["INFO", "replication"]).await.contains("master_link_status:up");
                if synced && replicas.contains(&s.replica.port.to_string()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        s
    }

    async fn sentinel(primary: u16) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("pushd-sentinel-{}-{}", std::process::id(), crate::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nsentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\nsentinel failover-timeout {SENTINEL_SERVICE} 5000\n"
            ),
        )
        .unwrap();
        RedisServer::sentinel(port, conf).await
    }

    /// SIGKILLs the primary; returns once the Sentinels name the replica as the new primary.
    pub async fn kill_primary(&mut self) {
        self.primary.kill().await;
        let replica = self.replica.port.to_string();
        within("the sentinels to promote the replica", async {
            loop {
                let addr = self.sentinels[0].cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE]).await;
                if addr.lines().nth(1) == Some(replica.as_str()) {
                    return;
                }
                // Sentinel's failover is a clock (down-after 1 s, then an election): poll it.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }

    /// `redis-sentinel://` naming every Sentinel.
    pub fn url(&self) -> String {
        let mut ports = self.sentinels.iter().map(|s| s.port);
        let first = ports.next().unwrap();
        let rest: Vec<String> = ports.map(|p| format!("&node=127.0.0.1:{p}")).collect();
        format!("redis-sentinel://127.0.0.1:{first}/0?sentinelServiceName={SENTINEL_SERVICE}{}", rest.join(""))
    }
}

/// Runs the suite function `$name` (`async fn $name(backend: Backend)`) once per Redis
/// deployment, as `$name::single`, `$name::cluster`, `$name::sentinel` and `$name::tls`.
#[macro_export]
macro_rules! on_every_deployment {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use $crate::backends::Backend;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn single() {
                    super::$name(Backend::single().await).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cluster() {
                    super::$name(Backend::cluster().await).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sentinel() {
                    super::$name(Backend::sentinel().await).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn tls() {
                    super::$name(Backend::tls().await).await;
                }
            }
        )*
    };
}
