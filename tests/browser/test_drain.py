"""A graceful drain (SIGTERM) moves every browser client to the other nodes, spread out in time,
with nothing lost and nothing twice.

Three dev-mode nodes share one Redis behind HAProxy running `deploy/haproxy/haproxy.cfg`. Only
pushd-1 runs while the page's clients connect, so all of them land on it; then pushd-2 and
pushd-3 start and HAProxy takes them into the rotation. pushd-1 is drained with
`--drain-grace 1 --drain-window 4` while a backend publishes continuously. Every client is
closed with 1012, reconnects through HAProxy to pushd-2 or pushd-3, and ends with exactly the
channel's history. The clients reconnect at once after a 1012 (`drainJitter: 0`), so how their
closes and reconnects are spread out is the node's doing: the drain closes its clients over the
window instead of all at one instant (docs/OPERATIONS.md, "Rolling restarts").
"""

from conftest import Node, Publisher, assert_matches_history, deploy_haproxy, history, unique

CLIENTS = 40
DRAIN_WINDOW = 4.0


def test_a_drained_node_moves_every_client_to_the_others_spread_over_the_window_with_exactly_the_history(
    procs, redis, harness
):
    flags = ["--drain-grace", "1", "--drain-window", str(int(DRAIN_WINDOW))]
    nodes = [Node(procs, f"n{i}", flags, redis.url) for i in (1, 2, 3)]
    drained, others = nodes[0], nodes[1:]
    drained.start()
    lb = deploy_haproxy(procs, nodes)
    lb.wait_status("pushd-1", "UP")
    for i in (2, 3):
        lb.wait_status(f"pushd-{i}", "DOWN")

    channel = unique("room:drain-")
    page = harness(drained.url + "/client.js")
    for k in range(CLIENTS):
        page.create(url=lb.url, transport="websocket", user=f"u{k}", drainJitter=0,
                    backoff={"base": 200, "max": 1000})
        page.subscribe(k, channel)
        page.connect(k)
    page.wait("n => logs.length === n && logs.every(l => l.events.some(e => e.name === 'subscribed'))",
              CLIENTS, f"all {CLIENTS} clients to subscribe")
    assert page.call("() => clients.map(c => c.node)") == ["n1"] * CLIENTS

    for node in others:
        node.start()
    for i in (2, 3):
        lb.wait_status(f"pushd-{i}", "UP")

    publisher = Publisher(lb.url, channel, interval=0.05)
    publisher.start()
    try:
        page.wait("([c, n]) => logs.every(l => l.received.filter(m => m.channel === c).length >= n)",
                  [channel, 5], "every client to receive its first messages")
        marks = page.call("() => logs.map(l => l.events.length)")
        drained.terminate()

        moved = page.wait(
            """(marks) => {
                 const at = logs.map((l, i) => l.events.find((e, k) => k >= marks[i] && e.name === "connected"));
                 return at.every(Boolean) && at.map(e => e.info.node);
               }""",
            marks,
            f"all {CLIENTS} clients to reconnect",
        )
        assert set(moved) <= {"n2", "n3"}, f"clients reconnected to {sorted(set(moved))}"
        assert drained.wait_exit() == 0, "a drained node exits with status 0"
        acked_at_move = len(publisher.acked)
        publisher.wait_acked(acked_at_move + 20)
    finally:
        acked = publisher.stop()

    last = acked[-1][0]
    page.wait("([c, o]) => logs.every(l => l.received.some(m => m.channel === c && m.offset >= o))",
              [channel, last], f"every client to catch up to the last acknowledged offset {last}")

    epoch, stored = history(others[0].url, channel)
    assert stored == [(o, d) for o, d, _ in acked]
    for k in range(CLIENTS):
        assert_matches_history(page.received(k, channel), stored, who=f"client {k}")

    # What each client went through after the SIGTERM: one 1012 close, one reconnect.
    after = page.call(
        """(marks) => logs.map((l, i) => {
             const events = l.events.slice(marks[i]);
             return {
               closes: events.filter(e => e.name === "disconnected").map(e => ({t: e.t, code: e.info.code})),
               connected: events.filter(e => e.name === "connected").map(e => e.t),
             };
           })""",
        marks,
    )
    for k, a in enumerate(after):
        assert [c["code"] for c in a["closes"]] == [1012], f"client {k} closes after the SIGTERM: {a['closes']}"
        assert len(a["connected"]) == 1, f"client {k} connected {len(a['connected'])} times after the SIGTERM"
    closes = [a["closes"][0]["t"] for a in after]
    reconnects = [a["connected"][0] for a in after]
    # Not all at one instant: the closes, and so the reconnects, cover a good part of the window.
    spread = DRAIN_WINDOW / 3 * 1000
    assert max(closes) - min(closes) >= spread, f"closes spread over {max(closes) - min(closes)} ms only"
    assert max(reconnects) - min(reconnects) >= spread, f"reconnects spread over {max(reconnects) - min(reconnects)} ms only"
