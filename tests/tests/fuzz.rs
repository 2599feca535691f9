//! The network fuzzer against a real node on Redis: `pushload fuzz` sends random, mutated and
//! protocol-breaking frames over many connections, then checks the node still serves a fresh
//! client and that no task panicked. A short run here (its seed is in the output, to replay it);
//! the long one is in docs/OPERATIONS.md.

use pushd_tests::*;

#[tokio::test]
async fn a_node_fed_random_and_broken_frames_keeps_serving_and_never_panics() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let args =
        ["--redis-url", &url, "--admin-listen", "127.0.0.1:0", "--rate-limit", "100000", "--rate-burst", "100000"];
    let node = PushdProcess::start(&args).await;
    let metrics = format!("http://{}/metrics", node.admin.unwrap());
    let target = format!("http://{}", node.addr);
    let out = within(
        "the fuzz run",
        tokio::process::Command::new(pushload_bin())
            .args(["fuzz", "--url", &target, "--frames", "30000", "--connections", "8", "--metrics-url", &metrics])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("frames sent          30000"), "{report}");
    assert!(report.contains("panics in the node   0"), "{report}");
}
