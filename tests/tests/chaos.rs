//! The chaos loop: while pushload publishes through three real `pushd` processes to subscribers
//! on all of them, faults come one after another, round robin: the nodes' pub/sub connections
//! killed, Redis SIGKILLed and restarted (AOF keeps what it acknowledged), a node SIGKILLed and
//! started again on its port. pushload retries refused publishes with their idempotency keys and
//! reconnects dropped subscribers with their positions; in the end every subscriber must have
//! every acknowledged message once and in order (pushload's own check, its verdict `ok`).

use std::time::Duration;

use pushd_tests::*;
use serde_json::Value;

/// Faults injected, one per `FAULT_EVERY`: bounded, so the test is too.
const FAULTS: usize = 6;
/// The pace of the faults (the injected schedule, not a wait for an event).
const FAULT_EVERY: Duration = Duration::from_millis(900);

/// `pushd` on `port` against `redis`, as the chaos loop (re)starts it.
async fn node(redis: &RedisServer, port: u16, id: &str) -> PushdProcess {
    let mut command = tokio::process::Command::new(pushd_bin());
    command.args(["--listen", &format!("127.0.0.1:{port}"), "--log-format", "json", "--node-id", id]).args([
        "--redis-url",
        &redis.url(),
        "--max-connections-per-user",
        "10000",
    ]);
    PushdProcess::start_with(&mut command).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_kills_redis_restarts_and_node_kills_under_load_lose_nothing_acknowledged() {
    let mut redis = RedisServer::start_with_aof().await;
    let ports = [free_port(), free_port(), free_port()];
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        nodes.push(node(&redis, *port, &format!("c{i}")).await);
    }
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let run = tokio::process::Command::new(pushload_bin())
        .args(["fanout", "--json", "--url", &urls.join(","), "--channels", "3", "--subscribers", "150"])
        .args(["--messages", "3000", "--rate", "400", "--publishers", "8", "--timeout", "60"])
        .kill_on_drop(true)
        .output();
    let chaos = async {
        let mut done = Vec::new();
        for round in 0..FAULTS {
            tokio::time::sleep(FAULT_EVERY).await;
            match round % 3 {
                0 => {
                    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
                    done.push(format!("pub/sub connections killed: {}", killed.trim()));
                }
                1 => {
                    redis.kill().await;
                    redis.restart().await;
                    done.push("redis restarted".to_owned());
                }
                _ => {
                    // Never the same node twice in a row; subscribers and publishes of the
                    // killed one come back to it once it listens again.
                    let victim = 1 + (round / 3) % 2;
                    nodes[victim].kill().await;
                    nodes[victim] = node(&redis, ports[victim], &format!("c{victim}")).await;
                    done.push(format!("node c{victim} killed and restarted"));
                }
            }
        }
        done
    };
    let (out, done) = tokio::join!(tokio::time::timeout(Duration::from_secs(120), run), chaos);
    let out = out.expect("pushload outlived its --timeout").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(done.len(), FAULTS, "{done:?}");
    assert_eq!(verdict["ok"], true, "after {done:?}: {verdict:#}");
    let tally = &verdict["tally"];
    assert_eq!((&tally["lost"], &tally["duplicated"], &tally["out_of_order"]), (&0.into(), &0.into(), &0.into()));
    assert_eq!(tally["received"], tally["expected"], "{verdict:#}");
    assert_eq!(verdict["published"], 3000, "every publish acknowledged in the end: {verdict:#}");
    eprintln!("chaos: {done:?}; rejoins {}, unrecovered {}", verdict["rejoins"], verdict["unrecovered"]);
}
