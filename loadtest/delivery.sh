#!/usr/bin/env bash
# The delivery path against the kernel's floor (docs/BENCHMARKS.md, "Delivery path"): the write
# floor of this machine (pushload floor), then 2,000 WebSocket subscribers on one channel over two
# release nodes and one Redis, with 100-byte payloads:
#   paced     30 publishes/s for 10 s (60,000 deliveries/s): CPU per delivery, user and system
#   unpaced   as fast as 8 publishers go: deliveries/s and CPU-s per million deliveries
#   half      half the unpaced publish rate: p99 publish-to-delivery
#   idle      5,000 subscribers over the two nodes: RSS per idle connection, CPU per connect
#   many      18,000 subscribers on one node: RSS per idle connection, CPU per connect
#   one       the paced run's 2,000 subscribers on one node (not in the default list): p50/p99
#             when one node writes them all
#   replay    1,000 missed messages replayed on resubscribe, memory engine and Redis engine
# Every line says whether pushload's checks passed (nothing lost, duplicated or reordered).
# Usage: loadtest/delivery.sh [runs, default 1] [sections, default all: "floor paced unpaced half idle
# many replay"]; NODE_FLAGS= adds node flags, HALF_RATE= fixes the half run's rate.
# Needs: cargo build --release -p pushd -p pushload (or BIN=<dir> with both); redis-server and
# redis-cli; ulimit -n 20000.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1}
sections=${2:-floor paced unpaced half idle many replay}
. loadtest/bench-common.sh
ulimit -n 20000

# A fresh Redis and two fresh nodes (fresh, so RSS growth is the connections' own).
start() {
  pids=()
  (cd "$work" && exec redis-server --port 17201 --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1) &
  redis_pid=$!
  pids+=($redis_pid)
  until redis-cli -p 17201 ping >/dev/null 2>&1; do sleep 0.05; done
  node_pids=()
  for i in 0 1; do
    "$bin/pushd" --listen 127.0.0.1:1809$i --node-id d$i --redis-url redis://127.0.0.1:17201 \
      --max-connections-per-user 100000 --max-connections 19000 --rate-limit 100000 --rate-burst 100000 ${NODE_FLAGS:-} \
      >"$work/node$i.log" 2>&1 &
    node_pids+=($!)
    pids+=($!)
  done
  for i in 0 1; do until curl -sf http://127.0.0.1:1809$i/readyz >/dev/null; do sleep 0.05; done; done
  urls=http://127.0.0.1:18090,http://127.0.0.1:18091
  watch="--pid ${node_pids[0]},${node_pids[1]} --redis-pid $redis_pid"
}

stop() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }

# One fanout run's line: verdict, rates, latency, the nodes' CPU per delivery (user + system),
# per connect, and RSS per idle connection. Sets $rate to the publishes/s reached.
fanout() {
  local label=$1; shift
  "$bin/pushload" --json fanout --url "$urls" $watch --channels 1 --payload-bytes 100 \
    --connect-concurrency 100 "$@" 2>/dev/null >"$work/report.json" || true
  python3 - "$label" "$work/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
u = r["usage"]["server"]
n = max(r["tally"]["received"], 1)
cpu, conn = u["cpu"], u["connect_cpu"]
print("%-8s ok=%s  %6.0f publishes/s  %8.0f deliveries/s  p50 %.1f ms p99 %.1f ms  "
      "CPU/delivery user %.2f + sys %.2f = %.2f us  connect %.3f ms/conn  idle %s KiB/conn"
      % (sys.argv[1], r["ok"], r["publish_rate"], r["deliveries_per_second"],
         r["latency_us"]["p50"] / 1000, r["latency_us"]["p99"] / 1000,
         cpu["user"] * 1e6 / n, cpu["system"] * 1e6 / n, (cpu["user"] + cpu["system"]) * 1e6 / n,
         (conn["user"] + conn["system"]) * 1e3 / max(sum(s["connections"] or 0 for s in r["usage"]["servers"]), 1),
         "%.1f" % u["per_connection_kib"] if u["per_connection_kib"] else "n/a"), flush=True)
open(sys.argv[2] + ".rate", "w").write("%d" % r["publish_rate"])
PY
  rate=$(cat "$work/report.json.rate")
}

for run in $(seq "$runs"); do
  for section in $sections; do
    case $section in
      floor)
        "$bin/pushload" --json floor --sockets 2000 --rate 30 --seconds 10 | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("floor    %d writes of %d bytes to %d sockets: user %.2f + sys %.2f = %.2f us per write"
      % (r["writes"], r["frame_bytes"], r["sockets"], r["user_us_per_write"], r["system_us_per_write"],
         r["user_us_per_write"] + r["system_us_per_write"]), flush=True)' ;;
      paced)
        start; fanout "paced" --subscribers 2000 --rate 30 --messages 300 --publishers 2; stop ;;
      unpaced)
        start; fanout "unpaced" --subscribers 2000 --messages 3000 --publishers 8; stop
        saturated=$rate ;;
      half)
        half=${HALF_RATE:-$(( ${saturated:-600} / 2 ))}
        start; fanout "half" --subscribers 2000 --rate "$half" --messages $(( half * 10 )) --publishers 8; stop ;;
      idle)
        start; fanout "idle" --subscribers 5000 --rate 10 --messages 10 --publishers 1; stop ;;
      one)
        start
        urls=http://127.0.0.1:18090 watch="--pid ${node_pids[0]} --redis-pid $redis_pid"
        fanout "one" --subscribers 2000 --rate 30 --messages 300 --publishers 2; stop ;;
      many)
        start
        urls=http://127.0.0.1:18090 watch="--pid ${node_pids[0]} --redis-pid $redis_pid"
        fanout "many" --subscribers 18000 --rate 10 --messages 10 --publishers 1; stop ;;
      replay)
        start
        "$bin/pushd" --listen 127.0.0.1:18099 --node-id m0 >"$work/memory.log" 2>&1 &
        pids+=($!)
        until curl -sf http://127.0.0.1:18099/readyz >/dev/null; do sleep 0.05; done
        for engine in memory:18099 redis:18090; do
          "$bin/pushload" --json replay --url "http://127.0.0.1:${engine#*:}" --messages 1000 --rounds 20 \
            | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("replay   %-6s ok=%s  %d missed messages: p50 %.2f ms, max %.2f ms over %d resubscribes"
      % (sys.argv[1], r["ok"], r["messages"], r["p50_ms"], r["max_ms"], r["rounds"]), flush=True)' "${engine%%:*}"
        done
        stop ;;
    esac
  done
done
