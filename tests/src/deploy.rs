//! The operator's half, run natively: the HAProxy and Prometheus configs that
//! `docker-compose.yml` mounts, started as real `haproxy` and `prometheus` processes in front of
//! real `pushd` processes. Only addresses differ from compose: HAProxy reads them from
//! environment variables (the config's defaults are the compose service names), Prometheus from
//! its file-discovery targets file, which the test writes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::{PushdProcess, RedisServer, within};

/// The guard on Prometheus' own events (ready, a scrape): it scrapes every 5 s, and on a loaded
/// machine its start and a scrape round can take longer than the harness's 10 s `WAIT`.
const PROMETHEUS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Awaits a Prometheus event under `PROMETHEUS_WAIT`.
async fn prometheus_guard<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PROMETHEUS_WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The admin key the deploy tests' nodes use.
pub const ADMIN_KEY: &str = "test-admin-key";

/// The repository's top directory.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A loopback port free right now (HAProxy cannot bind port 0 and report it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A command from PATH or the test script's tool venv (`target/tools/venv/bin`).
pub fn tool(name: &str) -> PathBuf {
    let venv = repo().join("target/tools/venv/bin").join(name);
    if venv.exists() {
        return venv;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.exists());
    on_path.unwrap_or_else(|| panic!("{name} not found: run ./scripts/test.sh, which installs it"))
}

/// Runs `program args` to completion; returns (success, stdout + stderr).
pub async fn run(program: &Path, args: &[&str], envs: &[(String, String)]) -> (bool, String) {
    let out = within(
        &format!("{} {}", program.display(), args.join(" ")),
        tokio::process::Command::new(program).args(args).envs(envs.iter().cloned()).output(),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Three `pushd` processes named pushd-1..3 on one Redis, each with an admin listener, as
/// compose runs them (secrets and drain settings included); `extra` flags go to each.
pub async fn nodes(redis: &RedisServer, extra: &[&str]) -> Vec<PushdProcess> {
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let id = format!("pushd-{i}");
        let url = redis.url();
        let mut args = vec![
            "--node-id",
            &id,
            "--redis-url",
            &url,
            "--admin-listen",
            "127.0.0.1:0",
            "--token-secret",
            crate::SECRET,
            "--api-key",
            crate::API_KEY,
            "--admin-key",
            ADMIN_KEY,
        ];
        args.extend_from_slice(extra);
        nodes.push(PushdProcess::start(&args).await);
    }
    nodes
}

/// `deploy/haproxy/haproxy.cfg` as a running `haproxy`, pointed at `nodes`.
pub struct Haproxy {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    child: tokio::process::Child,
    /// Lines HAProxy printed (state changes of its servers), each with when it was read.
    pub log: mpsc::UnboundedReceiver<(tokio::time::Instant, String)>,
}

impl Haproxy {
    /// The environment that points the config at `nodes` and free loopback ports.
    pub fn env(nodes: &[PushdProcess], public: u16, admin: u16, stats: u16) -> Vec<(String, String)> {
        let mut env = vec![
            ("HAPROXY_PUBLIC".into(), format!("127.0.0.1:{public}")),
            ("HAPROXY_ADMIN".into(), format!("127.0.0.1:{admin}")),
            ("HAPROXY_STATS".into(), format!("127.0.0.1:{stats}")),
        ];
        for (i, node) in nodes.iter().enumerate() {
            env.push((format!("PUSHD_{}", i + 1), node.addr.to_string()));
            env.push((format!("PUSHD_{}_ADMIN", i + 1), node.admin.expect("nodes have an admin listener").to_string()));
        }
        env
    }

    pub fn config() -> PathBuf {
        repo().join("deploy/haproxy/haproxy.cfg")
    }

    /// Starts HAProxy in the foreground and waits until its public frontend accepts connections.
    pub async fn start(nodes: &[PushdProcess]) -> Self {
        let (public, admin, stats) = (free_port(), free_port(), free_port());
        let mut child = tokio::process::Command::new(tool("haproxy"))
            .args(["-db", "-f"])
            .arg(Self::config())
            .envs(Self::env(nodes, public, admin, stats))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy not found: run ./scripts/test.sh, which installs it");
        let (tx, log) = mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send((tokio::time::Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let public: SocketAddr = format!("127.0.0.1:{public}").parse().unwrap();
        // HAProxy prints nothing when it has bound its ports; its listener appearing is the event.
        within("haproxy to listen", async {
            while tokio::net::TcpStream::connect(public).await.is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        Self { public, admin: format!("127.0.0.1:{admin}").parse().unwrap(), child, log }
    }

    /// Waits for HAProxy to say `server` (e.g. `pushd/pushd-2`) is DOWN; returns when it said so.
    pub async fn wait_down(&mut self, server: &str) -> tokio::time::Instant {
        let needle = format!("Server {server} is DOWN");
        within(&needle, async {
            loop {
                let (at, line) = self.log.recv().await.expect("haproxy exited");
                if line.contains(&needle) {
                    return at;
                }
            }
        })
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// `deploy/prometheus` as a running `prometheus` scraping `nodes`.
pub struct Prometheus {
    pub addr: SocketAddr,
    dir: PathBuf,
    child: tokio::process::Child,
    http: reqwest::Client,
}

impl Prometheus {
    /// Copies prometheus.yml and alerts.yml verbatim next to a targets file naming `nodes`
    /// (their admin listeners, labelled pushd-1..), starts Prometheus on a free port and waits
    /// for its "ready" log line.
    pub async fn start(nodes: &[PushdProcess]) -> Self {
        let dir = std::env::temp_dir().join(format!("pushd-prometheus-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(dir.join("targets")).unwrap();
        for file in ["prometheus.yml", "alerts.yml"] {
            std::fs::copy(repo().join("deploy/prometheus").join(file), dir.join(file)).unwrap();
        }
        let targets: String = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("- targets: [\"{}\"]\n  labels:\n    node: pushd-{}\n", n.admin.unwrap(), i + 1))
            .collect();
        std::fs::write(dir.join("targets/pushd.yml"), targets).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut child = tokio::process::Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus not found: run ./scripts/test.sh, which installs it");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        prometheus_guard("prometheus to be ready", async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Server is ready to receive web requests") {
                    return;
                }
            }
            panic!("prometheus exited before it was ready");
        })
        .await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { addr, dir, child, http: reqwest::Client::new() }
    }

    /// `GET /api/v1/<path>` with query parameters; the `data` of a successful answer, or the error.
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let mut url = reqwest::Url::parse(&format!("http://{}/api/v1/{path}", self.addr)).unwrap();
        url.query_pairs_mut().extend_pairs(params);
        let resp = within("prometheus API", self.http.get(url).send()).await.map_err(|e| e.to_string())?;
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        match body["status"].as_str() {
            Some("success") => Ok(body["data"].clone()),
            _ => Err(format!("{}: {}", body["errorType"], body["error"])),
        }
    }

    /// An instant query's result vector.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until all `targets` pushd nodes have been scraped, healthy, after `since` (Unix
    /// seconds): the samples a test just caused are then in the database. Prometheus has no push
    /// for this, so it is asked until it says so.
    pub async fn scraped_after(&self, since: f64, targets: usize) {
        // timestamp() of a plain selector is the sample's own time (of anything else, now).
        let expr = format!("count((timestamp(up{{job=\"pushd\"}}) > {since}) and (up{{job=\"pushd\"}} == 1))");
        prometheus_guard("every node to be scraped", async {
            loop {
                let fresh = self.query(&expr).await.unwrap_or_default();
                if fresh.first().and_then(value).is_some_and(|n| n >= targets as f64) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
        .await
    }
}

/// The number in one instant-query result (`{"metric":{..},"value":[ts,"1.5"]}`).
pub fn value(sample: &Value) -> Option<f64> {
    sample["value"][1].as_str()?.parse().ok()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Unix seconds now, as a float.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Every dashboard: (file name, text, JSON).
pub fn dashboards() -> Vec<(String, String, Value)> {
    let dir = repo().join("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), text, json)
        })
        .collect()
}

/// Every panel query with its template variables substituted as Grafana would for "All" and
/// a range covering the tests' whole run: (dashboard file, panel title, PromQL).
pub fn panel_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (file, _, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap().replace("$node", ".*").replace("$__rate_interval", "5m");
                out.push((file.clone(), panel["title"].as_str().unwrap().to_owned(), expr));
            }
        }
    }
    out
}
