"""A node dies under a browser client: nothing is lost and nothing comes twice.

Three dev-mode nodes share one Redis behind HAProxy running `deploy/haproxy/haproxy.cfg`. The
page connects through HAProxy; a backend publishes continuously through HAProxy too (each
publish with an idempotency key, retried until acknowledged). The node the page is on is
SIGKILLed: the client reconnects through HAProxy to a surviving node and resubscribes from its
position, and in the end what the page handed the app is exactly the channel's history.
"""

from conftest import Publisher, assert_matches_history, deploy_haproxy, history, unique


def test_a_client_on_a_killed_node_reconnects_elsewhere_and_ends_with_exactly_the_history(
    procs, redis, start_node, harness
):
    nodes = [start_node(f"n{i}", redis=redis) for i in (1, 2, 3)]
    by_id = {n.node_id: n for n in nodes}
    lb = deploy_haproxy(procs, nodes)
    for i in (1, 2, 3):
        lb.wait_status(f"pushd-{i}", "UP")

    channel = unique("room:failover-")
    page = harness(nodes[0].url + "/client.js")
    c = page.create(url=lb.url, transport="websocket", user="alice", backoff={"base": 200, "max": 1000})
    page.subscribe(c, channel)
    page.connect(c)
    first = page.wait_connected(c)
    page.wait_event(c, "subscribed")
    assert first["transport"] == "websocket"
    assert first["node"] in by_id, f"the welcome names node {first['node']!r}, not one of {list(by_id)}"

    publisher = Publisher(lb.url, channel, interval=0.02)
    publisher.start()
    try:
        page.wait_count(c, channel, 30, "the first messages to reach the page")

        victim = by_id[page.prop(c, "node")]
        mark = page.event_count(c)
        received_before = len(page.received(c, channel))
        victim.kill()

        moved = page.wait_connected(c, not_node=victim.node_id, after=mark)
        assert moved["node"] in by_id and moved["node"] != victim.node_id
        # Keep publishing until the page has had live messages on its new node, then stop.
        page.wait(
            "([i, c, n]) => logs[i].received.filter(m => m.channel === c && m.node === n).length >= 30",
            [c, channel, moved["node"]],
            "30 messages on the node the page moved to",
        )
    finally:
        acked = publisher.stop()

    page.wait_caught_up(c, channel, acked)

    survivor = by_id[moved["node"]]
    epoch, stored = history(survivor.url, channel)
    received = page.received(c, channel)
    assert_matches_history(received, stored)
    assert {m["epoch"] for m in page.messages(c, channel)} == {epoch}
    # The history is exactly the acknowledged publishes: a publish retried across the kill
    # (same idempotency key) was stored once.
    assert stored == [(o, d) for o, d, _ in acked]
    assert len(received) >= received_before + 30

    drops = [e["info"] for e in page.events(c, "disconnected")]
    assert drops and all(d["willReconnect"] for d in drops), drops
    assert not page.events(c, "stopped")
    resubscribes = [e["info"] for e in page.events(c, "subscribed")][1:]
    assert resubscribes and resubscribes[-1]["recovered"] is True, resubscribes
