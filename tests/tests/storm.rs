//! A reconnect storm: every subscriber of two nodes on one Redis drops its socket at once while
//! publishing goes on, then reconnects with its position. Every one must be back, recovered,
//! with every message exactly once and in order. The 10,000-client run is in docs/BENCHMARKS.md.

use pushd_tests::*;
use serde_json::Value;
use std::time::Duration;

#[tokio::test]
async fn every_subscriber_dropped_at_once_comes_back_and_misses_nothing() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = PushdProcess::start(&["--redis-url", &url]).await;
    let b = PushdProcess::start(&["--redis-url", &url]).await;
    let urls = format!("http://{},http://{}", a.addr, b.addr);
    // pushload keeps its own deadline (--timeout, a failure in the verdict); this guard only
    // catches a pushload that hangs past it.
    let run = tokio::process::Command::new(pushload_bin())
        .args(["fanout", "--json", "--url", &urls, "--channels", "8", "--subscribers", "400"])
        .args(["--messages", "1000", "--rate", "500", "--storm-after", "300", "--timeout", "30"])
        .kill_on_drop(true)
        .output();
    let out =
        tokio::time::timeout(Duration::from_secs(90), run).await.expect("pushload outlived its --timeout").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(verdict["ok"], true, "{verdict:#}");
    let report = &verdict;
    assert_eq!(report["storm"]["clients"], 400, "{verdict:#}");
    assert_eq!(report["storm"]["back"], 400, "{verdict:#}");
    assert_eq!(report["unrecovered"], 0, "{verdict:#}");
    assert_eq!(report["tally"]["received"], report["tally"]["expected"], "{verdict:#}");
    assert_eq!(report["tally"]["expected"], 1000 * 400 / 8, "{verdict:#}");
    assert_eq!(report["tally"]["lost"], 0, "{verdict:#}");
}
