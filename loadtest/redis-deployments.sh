#!/usr/bin/env bash
# Publish throughput and cross-node fan-out on one Redis vs a 3-primary Redis Cluster (3
# replicas), and the cost of durable publishes (--publish-replicas 1). Starts its own
# redis-server processes and release pushd nodes on loopback ports, runs pushload against them,
# and prints one line per run. Usage: loadtest/redis-deployments.sh [runs per setup, default 1]
# Needs: cargo build --release -p pushd -p pushload; redis-server and redis-cli.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1}
. loadtest/bench-common.sh

# Starts redis-server on port $1 with extra args; records its pid.
redis() {
  local port=$1; shift
  mkdir -p "$work/$port"
  (cd "$work/$port" && exec redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no "$@" \
    >"$work/$port/log" 2>&1) &
  pids+=($!)
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

# One Redis with one replica (so WAIT 1 has someone to wait for).
single() {
  redis 17001
  redis 17002 --replicaof 127.0.0.1 17001
  until redis-cli -p 17002 info replication | grep -q master_link_status:up; do sleep 0.1; done
  url=redis://127.0.0.1:17001
}

# 3 primaries + 3 replicas.
cluster() {
  for p in 17101 17102 17103 17104 17105 17106; do
    redis $p --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000
  done
  redis-cli --cluster create 127.0.0.1:17101 127.0.0.1:17102 127.0.0.1:17103 127.0.0.1:17104 \
    127.0.0.1:17105 127.0.0.1:17106 --cluster-replicas 1 --cluster-yes >/dev/null
  for p in 17101 17102 17103 17104 17105 17106; do
    until redis-cli -p $p cluster info | grep -q cluster_state:ok; do sleep 0.1; done
    if redis-cli -p $p info replication | grep -q role:slave; then
      until redis-cli -p $p info replication | grep -q master_link_status:up; do sleep 0.1; done
    fi
  done
  url="redis-cluster://127.0.0.1:17101?node=127.0.0.1:17102&node=127.0.0.1:17103"
}

# Starts two nodes on $url with extra flags; sets node_pids and urls.
nodes() {
  node_pids=()
  for i in 0 1; do
    "$bin/pushd" --listen 127.0.0.1:1808$i --node-id b$i --redis-url "$url" --max-connections-per-user 100000 \
      --rate-limit 100000 --rate-burst 100000 "$@" >"$work/node$i.log" 2>&1 &
    node_pids+=($!)
    pids+=($!)
  done
  for i in 0 1; do until curl -sf http://127.0.0.1:1808$i/readyz >/dev/null; do sleep 0.05; done; done
  urls=http://127.0.0.1:18080,http://127.0.0.1:18081
}

stop_all() { cleanup; pids=(); work=$(mktemp -d /tmp/pushd-bench.XXXXXX); }

# One line per run: the verdict, publishes/s and publish latency, deliveries/s and delivery
# latency, and the nodes' CPU seconds while publishing (fan-out runs).
report() {
  python3 -c '
import json, sys
r = json.load(sys.stdin)
lat = lambda l: "p50 %.1f ms, p99 %.1f ms" % (l["p50"] / 1000, l["p99"] / 1000)
rate = r.get("publishes_per_second", r.get("publish_rate"))
line = "%-34s ok=%s  %7.0f publishes/s (%s)" % (sys.argv[1], r["ok"], rate, lat(r.get("publish_latency_us") or r["latency_us"]))
if "deliveries_per_second" in r:
    cpu = sum(s.get("cpu_seconds") or 0 for s in r["usage"]["servers"])
    line += "  %9.0f deliveries/s (%s)  nodes %.1f CPU-s" % (r["deliveries_per_second"], lat(r["latency_us"]), cpu)
print(line, flush=True)' "$1"
}

for setup in single cluster; do
  for durable in 0 1; do
    for run in $(seq "$runs"); do
      $setup
      nodes --publish-replicas $durable
      "$bin/pushload" --json publish --url "$urls" --publishers 32 --messages 20000 --channels 64 2>/dev/null \
        | report "$setup durable=$durable publish #$run"
      "$bin/pushload" --json fanout --url "$urls" --pid "${node_pids[0]},${node_pids[1]}" --subscribers 2000 \
        --channels 10 --messages 10000 --publishers 16 --connect-concurrency 100 2>/dev/null \
        | report "$setup durable=$durable fanout #$run"
      stop_all
    done
  done
done
