#!/usr/bin/env python3
"""The pushd Grafana dashboards, as code: writes grafana/dashboards/*.json.

    python3 grafana/dashboards.py          # regenerate the JSON after editing this file
    python3 grafana/dashboards.py --check  # exit 1 if the JSON is not what this file makes

Every panel says in its description what to do when its line goes the wrong way. Every query
filters by the `node` variable, a target label Prometheus sets per node (see
deploy/prometheus/targets/pushd.yml). The end-to-end tests evaluate every query of every panel
against a live Prometheus scraping a real cluster, and fail on one that returns nothing.
"""

import json
import sys
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards"
NODE = 'node=~"$node"'
RATE = "$__rate_interval"
API = 'api="api"'
ADMIN = 'api="admin"'
OK = 'result="ok"'
NOT_OK = 'result!="ok"'
FAILED = 'code!~"2.."'
WS = 'transport="ws"'


def sel(metric, *matchers):
    """`metric{node=~"$node",...}`."""
    return f"{metric}{{{','.join((NODE,) + matchers)}}}"


def rate(metric, *matchers):
    return f"rate({sel(metric, *matchers)}[{RATE}])"


def quantile(q, metric, by, *matchers):
    return f"histogram_quantile({q}, sum by (le, {by}) ({rate(metric + '_bucket', *matchers)}))"


def target(expr, legend, ref="A"):
    return {"refId": ref, "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}


def p50_p99_by_node(metric):
    """The median and the 99th percentile of a histogram, a line each per node."""
    return [target(quantile(0.5, metric, "node"), "p50 {{node}}", "A"),
            target(quantile(0.99, metric, "node"), "p99 {{node}}", "B")]


class Dashboard:
    """Lays panels out left to right, 24 columns wide, rows starting where the last ended."""

    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels, self.next_id, self.x, self.y, self.row_height = [], 1, 0, 0, 0

    def _place(self, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_height = max(self.row_height, h)
        return pos

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def row(self, title):
        self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        self.panels.append(
            {"id": self._id(), "type": "row", "title": title, "collapsed": False, "panels": [],
             "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}})
        self.y += 1

    def panel(self, kind, title, description, targets, unit="short", w=12, h=8, **extra):
        panel = {
            "id": self._id(),
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DATASOURCE,
            "gridPos": self._place(w, h),
            "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"]["min"] = 0
            panel["fieldConfig"]["defaults"]["custom"] = {"fillOpacity": 10, "showPoints": "never"}
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                "tooltip": {"mode": "multi", "sort": "desc"}}
        elif kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "area", "textMode": "value_and_name"}
        panel.update(extra)
        self.panels.append(panel)

    def timeseries(self, title, description, targets, **kw):
        self.panel("timeseries", title, description, targets, **kw)

    def stat(self, title, description, targets, **kw):
        self.panel("stat", title, description, targets, w=kw.pop("w", 6), h=kw.pop("h", 4), **kw)

    def heatmap(self, title, description, expr, unit):
        self.panel(
            "heatmap", title, description,
            [dict(target(expr, "{{le}}"), format="heatmap")],
            unit=unit, w=24,
            options={"calculate": False, "yAxis": {"unit": unit}, "color": {"scheme": "Oranges", "mode": "scheme"},
                     "cellGap": 1, "tooltip": {"show": True, "yHistogram": True}},
        )

    def json(self):
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["pushd"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"},
            "timezone": "browser",
            "annotations": {"list": []},
            "templating": {"list": [{
                "name": "node",
                "label": "Node",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": "label_values(pushd_build_info, node)",
                "query": {"query": "label_values(pushd_build_info, node)", "refId": "node"},
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "refresh": 2,
                "sort": 1,
            }]},
            "panels": self.panels,
        }


def overview():
    d = Dashboard("pushd-overview", "pushd: cluster overview",
                  "Nodes, clients, messages and refusals of a pushd cluster.")
    d.row("Cluster")
    d.stat("Nodes up", "Nodes Prometheus can scrape. Below the number you run: see the PushdNodeDown alert; the "
           "node's clients have moved to the others, so check they have room.",
           [target(f"sum(up{{job=\"pushd\",{NODE}}})", "up")])
    d.stat("Nodes ready", "Nodes whose /readyz says 200, the ones the balancer sends new clients to. A node up but "
           "not ready is draining or has lost Redis (see the Redis dashboard).",
           [target(f"sum({sel('pushd_ready')})", "ready")])
    d.stat("Connections", "Open client connections, all transports. A sudden drop with nodes up means clients "
           "are being closed: look at closes by code below.",
           [target(f"sum({sel('pushd_connections')})", "connections")])
    d.stat("Delivered / s", "Messages written to clients per second. Falling while publishes hold steady means "
           "fan-out is stalled: check delivery latency and the nodes' CPU.",
           [target(f"sum({rate('pushd_messages_delivered_total')})", "delivered/s")], unit="ops")
    d.timeseries("Connections by node and transport", "Open WebSocket and SSE connections per node. Uneven nodes "
                 "after a restart even out as clients reconnect (the balancer uses leastconn); a node near its "
                 "--max-connections (PushdConnectionsNearLimit) needs a new node beside it.",
                 [target(f"sum by (node, transport) ({sel('pushd_connections')})", "{{node}} {{transport}}")])
    d.timeseries("Subscriptions by node and transport", "Channel subscriptions held by local clients. Growing much "
                 "faster than connections means clients subscribe to ever more channels (limit: --max-channels).",
                 [target(f"sum by (node, transport) ({sel('pushd_subscriptions')})", "{{node}} {{transport}}")])
    d.row("Messages")
    d.timeseries("Publishes by route", "Messages stored through each node, by where they came in (api, ws, admin). "
                 "A drop to zero while your backend publishes means publishes fail: see publish errors.",
                 [target(f"sum by (node, route) ({rate('pushd_messages_published_total')})", "{{node}} {{route}}")],
                 unit="ops")
    d.timeseries("Deliveries by transport", "Messages written to clients per second (live and replayed). It "
                 "should follow publishes times subscribers; if it lags, clients are slow or the node is saturated.",
                 [target(f"sum by (node, transport) ({rate('pushd_messages_delivered_total')})",
                         "{{node}} {{transport}}")], unit="ops")
    d.timeseries("Delivery latency p50 / p99", "Seconds from storing a message to writing it to a socket. A p99 "
                 "above 0.5 s fires PushdDeliveryLatencyHigh: check node CPU, Redis command latency, and the "
                 "busiest channels (pushctl rooms --sort rate).",
                 p50_p99_by_node("pushd_delivery_latency_seconds"), unit="s")
    d.timeseries("Write rounds p50 / p99", "How long one round of a node's flusher took to write every "
                 "WebSocket that had frames waiting (docs/ARCHITECTURE.md, \"Express lanes\"). Rounds of 20 ms and "
                 "more mean the node's writes fill its cores: frames then wait longer and share writes (the panel "
                 "beside this one). Add nodes or cores before delivery latency follows.",
                 p50_p99_by_node("pushd_flush_round_seconds"), unit="s")
    d.timeseries("Messages per WebSocket write", "WebSocket messages delivered per socket write of the flusher. "
                 "About 1 while each message is written as it comes; above 1 under load, when messages queue "
                 "behind a write and go out together: the node spends less CPU per delivery and each waits "
                 "longer.",
                 [target(f"sum by (node) ({rate('pushd_messages_delivered_total', WS)}) / "
                         f"sum by (node) ({rate('pushd_flush_socket_writes_total')})", "{{node}}")])
    d.timeseries("Publish errors by code", "Publishes refused or failed. payload_too_large is a backend sending "
                 "more than --max-payload; unavailable means nothing was stored (Redis away): backends must retry "
                 "with their idempotency key.",
                 [target(f"sum by (code) ({rate('pushd_publish_errors_total')})", "{{code}}")], unit="ops")
    d.heatmap("Delivery latency", "How store-to-socket latency is spread. A band moving up means every delivery got "
              "slower (CPU, Redis); a second band far above the first means some sockets lag (slow consumers).",
              f"sum by (le) (increase({sel('pushd_delivery_latency_seconds_bucket')}[{RATE}]))", "s")
    d.timeseries("Control frames by transport", "Welcome, replies, join/leave, reset and close frames. A surge "
                 "without more connections points at clients looping on commands or reconnecting.",
                 [target(f"sum by (node, transport) ({rate('pushd_control_frames_total')})",
                         "{{node}} {{transport}}")], unit="ops")
    d.timeseries("Client commands by op and result", "WebSocket commands. Errors (anything but ok) that grow "
                 "are usually clients with wrong tokens (forbidden) or channel names (bad_channel): fix the client "
                 "or the token's subs/pubs claims.",
                 [target(f"sum by (op) ({rate('pushd_commands_total', OK)})", "{{op}} ok", "A"),
                  target(f"sum by (result) ({rate('pushd_commands_total', NOT_OK)})", "{{result}}", "B")],
                 unit="ops")
    d.row("Reconnects and replay")
    d.timeseries("Replays recovered vs not", "Resubscribes with a position. not_recovered means the client had "
                 "to resync from your database: its gap was longer than --max-replay or --history-size, or older "
                 "than --history-ttl. Raise those if it is frequent.",
                 [target(f"sum by (result) ({rate('pushd_replays_total')})", "{{result}}")], unit="ops")
    d.timeseries("Replayed messages p50 / p99", "Messages one recovered resubscribe replayed. Values near "
                 "--max-replay mean clients come back just in time; larger gaps turn into not_recovered.",
                 p50_p99_by_node("pushd_replayed_messages"))
    d.timeseries("Slow-consumer closes", "Clients closed with 4010 because their send queue filled. They "
                 "reconnect and replay, so nothing is lost, but a steady stream (PushdSlowConsumersRising) means "
                 "a channel publishes faster than clients read: raise --send-queue or slow the channel.",
                 [target(f"sum by (node) ({rate('pushd_slow_consumer_disconnects_total')})", "{{node}}")],
                 unit="ops")
    d.timeseries("Resets sent", "Clients told their channel's history was lost (they reload from your database). "
                 "Any is worth a look (PushdHistoryLost): Redis restarted without its AOF, or evicted keys.",
                 [target(f"sum by (node, transport) ({rate('pushd_resets_total')})", "{{node}} {{transport}}")],
                 unit="ops")
    d.timeseries("Connection closes by code", "Why sessions ended: 1012 drain, 4010 slow consumer, 4009 kicked, "
                 "4011 token expired, 4008 rate limited, peer = the client left. A 4011 wave means tokens expire "
                 "together: stagger their exp.",
                 [target(f"sum by (code) ({rate('pushd_connections_closed_total')})", "{{code}}")], unit="ops")
    d.timeseries("Connections opened", "New sessions per second. Spikes are reconnect storms (a node died or "
                 "drained); they should settle within the drain window.",
                 [target(f"sum by (node, transport) ({rate('pushd_connections_opened_total')})",
                         "{{node}} {{transport}}")], unit="ops")
    d.row("Refusals and operators")
    d.timeseries("Refusals by reason", "Connections refused before they started. auth: bad or expired tokens "
                 "(check the backend's signing secret); origin: add the page's origin to --allowed-origins; "
                 "full/draining: add capacity; banned: operator bans.",
                 [target(f"sum by (reason) ({rate('pushd_connections_refused_total')})", "{{reason}}")], unit="ops")
    d.timeseries("Kicks", "Sessions closed by your backend (/api/disconnect) or an operator (pushctl kick). "
                 "Unexpected kicks: see the nodes' logs (operator kicks are logged with the reason).",
                 [target(f"sum by (node) ({rate('pushd_kicks_total')})", "{{node}}")], unit="ops")
    d.timeseries("Server API requests by route and status", "Backend calls to /api/*. 401 means a wrong API key; "
                 "413 payloads over --max-payload; 503 nothing stored (retry with the idempotency key).",
                 [target(f"sum by (route) ({rate('pushd_http_requests_total', API)})", "{{route}}", "A"),
                  target(f"sum by (code) ({rate('pushd_http_requests_total', API, FAILED)})", "{{code}}", "B")],
                 unit="reqps")
    d.timeseries("Server API latency p99 by route", "How long backends wait. Publish latency follows Redis command "
                 "latency; a rise with Redis fine means the node is saturated.",
                 [target(quantile(0.99, "pushd_http_request_duration_seconds", "route", API), "{{route}}")],
                 unit="s")
    d.timeseries("Admin API requests by route and status", "pushctl and other operator calls to /admin/*. 401: a "
                 "wrong admin key; 503: Redis away (the node then answers for itself only).",
                 [target(f"sum by (route) ({rate('pushd_http_requests_total', ADMIN)})", "{{route}}", "A"),
                  target(f"sum by (code) ({rate('pushd_http_requests_total', ADMIN, FAILED)})", "{{code}}", "B")],
                 unit="reqps")
    d.timeseries("Admin API latency p99 by route", "Admin answers survey every node; a slow one waits up to its "
                 "timeout. Long answers mean a node is slow to answer: see nodes up and CPU.",
                 [target(quantile(0.99, "pushd_http_request_duration_seconds", "route", ADMIN),
                         "{{route}}")], unit="s")
    d.row("Resources")
    d.timeseries("CPU by node", "CPU seconds per second (1 = one core). A node pinned at its cores delays every "
                 "delivery: add nodes.",
                 [target(f"rate(process_cpu_seconds_total{{job=\"pushd\",{NODE}}}[{RATE}])", "{{node}}")],
                 unit="short", w=8)
    d.timeseries("Memory by node", "Resident memory. It grows with connections and with bursts queued for slow "
                 "clients; steady growth with steady connections is worth a report.",
                 [target(f"process_resident_memory_bytes{{job=\"pushd\",{NODE}}}", "{{node}}")], unit="bytes", w=8)
    d.timeseries("File descriptors by node", "Open descriptors against the limit: every connection holds one. Near "
                 "the limit (PushdFileDescriptorsNearLimit) raise the process limit or add nodes.",
                 [target(f"process_open_fds{{job=\"pushd\",{NODE}}}", "open {{node}}", "A"),
                  target(f"process_max_fds{{job=\"pushd\",{NODE}}}", "limit {{node}}", "B")], w=8)
    return d


def redis():
    d = Dashboard("pushd-redis", "pushd: Redis engine",
                  "The Redis engine as each node sees it: round trips, failures, pub/sub and repairs.")
    d.row("Health")
    d.stat("Nodes with Redis up", "Nodes whose pool and pub/sub connections are all up. Fewer than the nodes "
           "running fires PushdRedisUnavailable: check redis-cli ping, memory and the network.",
           [target(f"sum({sel('pushd_engine_up')})", "up")])
    d.stat("Redis round trips / s", "Commands and scripts per second from all nodes. Compare with Redis' own "
           "INFO (pushctl stats) to see how much of Redis' load is pushd.",
           [target(f"sum({rate('pushd_redis_command_duration_seconds_count')})", "round trips/s")], unit="ops")
    d.stat("Redis errors / s", "Failed round trips. Any sustained value means publishes or subscribes fail: see "
           "the errors panel for which operation and why.",
           [target(f"sum({rate('pushd_redis_errors_total')})", "errors/s")], unit="ops")
    d.stat("Live channels", "Channels with local subscribers: each is one pub/sub subscription per node.",
           [target(f"sum({sel('pushd_channels')})", "channels")])
    d.timeseries("Command latency p99 by operation", "Seconds per Redis round trip. publish and history above a "
                 "few ms on a LAN mean Redis is busy (slowlog, CPU, persistence fsync) or far away.",
                 [target(quantile(0.99, "pushd_redis_command_duration_seconds", "operation"), "{{operation}}")],
                 unit="s")
    d.timeseries("Command latency p50 by operation", "The typical round trip. When p50 rises with p99, Redis or "
                 "the network is slow for everyone, not one stalled command.",
                 [target(quantile(0.5, "pushd_redis_command_duration_seconds", "operation"), "{{operation}}")],
                 unit="s")
    d.timeseries("Round trips by operation", "Redis commands per second by what they are for: publish, history "
                 "(replays, gap fills), subscribe, presence, control (registry, bans, admin surveys).",
                 [target(f"sum by (operation) ({rate('pushd_redis_command_duration_seconds_count')})",
                         "{{operation}}")], unit="ops")
    d.timeseries("Errors by operation and kind", "disconnected: no connection, not sent; timeout: Redis did not "
                 "answer in 3 s (it may still have run the command); connection: lost mid-way; server: an error "
                 "reply. Timeouts point at a stalled Redis, the others at the network or Redis restarts.",
                 [target(f"sum by (operation, kind) ({rate('pushd_redis_errors_total')})", "{{operation}} {{kind}}")],
                 unit="ops")
    d.row("Pub/sub and repairs")
    d.timeseries("Pub/sub reconnects and receiver lag", "Times a node's pub/sub connection came back, and times "
                 "it read pub/sub too slowly and dropped messages from its buffer. Each is followed by a gap fill "
                 "from the streams, so nothing is lost; frequent reconnects mean Redis restarts or a flaky network "
                 "(check Redis' timeout and client-output-buffer-limit pubsub), lag means the node is overloaded.",
                 [target(f"sum by (node) (increase({sel('pushd_redis_pubsub_reconnects_total')}[{RATE}]))",
                         "reconnects {{node}}", "A"),
                  target(f"sum by (node) (increase({sel('pushd_redis_pubsub_lagged_total')}[{RATE}]))",
                         "lag {{node}}", "B")])
    d.timeseries("Gap fills by result", "Live gaps repaired from the streams. filled: subscribers saw nothing "
                 "missing; reset: the range was gone and subscribers were told to resync. Resets mean history "
                 "was lost: check Redis persistence and eviction.",
                 [target(f"sum by (result) (increase({sel('pushd_redis_gap_fills_total')}[{RATE}]))", "{{result}}")])
    d.timeseries("Resets sent", "Reset frames sent to clients (history lost under them). They reload from your "
                 "database; any at all deserves a look at Redis (PushdHistoryLost).",
                 [target(f"sum by (node) (increase({sel('pushd_resets_total')}[{RATE}]))", "{{node}}")])
    return d


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for dashboard in (overview(), redis()):
        path = OUT / f"{dashboard.uid}.json"
        text = json.dumps(dashboard.json(), indent=2, ensure_ascii=False) + "\n"
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}: run python3 grafana/dashboards.py", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
