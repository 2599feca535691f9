"""A node that stops answering without closing anything is noticed by the client's heartbeat.

Two dev-mode nodes share one Redis; the page's client is given both URLs. The node the page is
on is frozen with SIGSTOP: its sockets stay open, no close frame and no RST ever come, so only
the client's own heartbeat (browsers do not expose WebSocket pings to pages: the client sends
`{"op":"ping"}` when the connection has been quiet for the welcome's `ping_interval` and gives
up `heartbeatGrace` later) can tell that the connection is dead. The client reconnects to the
other node and resumes; a backend publishing through that node throughout, the page ends with
exactly the channel's history.
"""

import signal

from conftest import Publisher, assert_matches_history, history, unique


def test_a_frozen_node_is_noticed_by_the_heartbeat_and_the_client_resumes_on_the_other(
    redis, start_node, harness
):
    nodes = [start_node(f"h{i}", "--ping-interval", "1", redis=redis) for i in (1, 2)]
    by_id = {n.node_id: n for n in nodes}
    channel = unique("room:heartbeat-")
    page = harness(nodes[0].url + "/client.js")
    c = page.create(url=[n.url for n in nodes], transport="websocket", user="alice",
                    heartbeatGrace=1500, backoff={"base": 200, "max": 1000})
    page.subscribe(c, channel)
    page.connect(c)
    first = page.wait_connected(c)
    page.wait_event(c, "subscribed")
    frozen = by_id[first["node"]]
    other = next(n for n in nodes if n is not frozen)

    publisher = Publisher(other.url, channel, interval=0.02)
    publisher.start()
    try:
        page.wait_count(c, channel, 20, "the first messages to reach the page")
        mark = page.event_count(c)
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            gone = page.wait_event(c, "disconnected", "the heartbeat to give the frozen node up", after=mark)
            assert gone["info"]["reason"] == "heartbeat timeout", gone
            assert gone["info"]["willReconnect"] is True, gone
            moved = page.wait_connected(c, not_node=frozen.node_id, after=mark)
            assert moved["node"] == other.node_id
            page.wait(
                "([i, c, n]) => logs[i].received.filter(m => m.channel === c && m.node === n).length >= 20",
                [c, channel, other.node_id],
                "20 messages on the other node",
            )
        finally:
            frozen.process.send_signal(signal.SIGCONT)
    finally:
        acked = publisher.stop()

    page.wait_caught_up(c, channel, acked)
    _, stored = history(other.url, channel)
    assert_matches_history(page.received(c, channel), stored)
    resubscribe = [e["info"] for e in page.events(c, "subscribed")][-1]
    assert resubscribe["recovered"] is True, resubscribe
    assert not page.events(c, "stopped")
