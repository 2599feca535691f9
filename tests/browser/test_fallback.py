"""Where WebSockets cannot pass, the client falls back to SSE and keeps every guarantee.

The page reaches node `a` only through `haproxy/no-websocket.cfg`, which answers `/ws` with 403
itself. The client (transport "auto", its URL defaulting to where the module came from: the
proxy) falls back to SSE. Node `b` shares `a`'s Redis and is not behind the proxy: a backend
publishes through it continuously, so publishing goes on while `a` is down and the page cannot
reach any node. Then:

- a second channel subscribed while on SSE restarts the stream without losing or repeating
  anything on the first;
- `a` is SIGKILLed and started again on the same port: the client reconnects over SSE and both
  channels resume with what was published meanwhile;
- `client.reconnect()` resumes the same way;

and each channel's messages are exactly its history.
"""

import requests

from conftest import HERE, Haproxy, Publisher, assert_matches_history, history, publish, unique


def test_auto_falls_back_to_sse_behind_a_proxy_that_refuses_websockets_and_resumes_exactly(
    procs, redis, start_node, harness
):
    a = start_node("a", redis=redis)
    b = start_node("b", redis=redis)
    lb = Haproxy(procs, HERE / "haproxy" / "no-websocket.cfg", {"PUSHD_1": a.addr})
    # The proxy does what it is meant to: no WebSocket upgrade reaches the node.
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert requests.get(lb.url + "/ws?user=probe", headers=upgrade, timeout=10).status_code == 403

    first, second = unique("room:sse-a-"), unique("room:sse-b-")
    page = harness(lb.url + "/client.js")
    c = page.create(transport="auto", user="carol", backoff={"base": 200, "max": 1000})
    page.subscribe(c, first)
    page.connect(c)

    fallback = page.wait_event(c, "fallback", "the client to fall back from WebSocket")["info"]
    assert fallback == {"from": "websocket", "to": "sse"}
    connected = page.wait_connected(c)
    assert connected["transport"] == "sse" and connected["node"] == "a" and connected["user"] == "carol"
    assert page.prop(c, "transport") == "sse"
    page.wait_event(c, "subscribed")

    publisher = Publisher(b.url, first, interval=0.02)
    publisher.start()
    try:
        page.wait_count(c, first, 20, "messages over SSE")

        # A second channel while on SSE: the stream restarts with both channels, the first
        # resuming from its position.
        mark = page.event_count(c)
        page.subscribe(c, second)
        page.wait(
            "([i, ch, after]) => logs[i].events.some((e, k) => k >= after && e.name === 'subscribed' && e.info.channel === ch)",
            [c, second, mark],
            "the second channel to be subscribed",
        )
        for n in range(3):
            publish(b.url, second, {"second": n})
        page.wait_count(c, second, 3)
        count = len(page.received(c, first))
        page.wait_count(c, first, count + 20, "the first channel to go on after the second was added")

        # The node dies; publishing goes on through b while the page cannot reach any node.
        mark = page.event_count(c)
        a.kill()
        page.wait_event(c, "disconnected", after=mark)
        publisher.wait_acked(len(publisher.acked) + 25)
        for n in range(3, 6):
            publish(b.url, second, {"second": n})
        missed_first = publisher.acked[-1][0]
        a.restart()
        again = page.wait_connected(c, after=mark)
        assert again["transport"] == "sse" and again["node"] == "a"
        page.wait_offset(c, first, missed_first, "the first channel's replay")
        page.wait_count(c, second, 6, "the second channel's replay")
        # The first resubscribe of each channel after the kill is the one that resumed it.
        resumed = {}
        for e in page.events(c)[mark:]:
            if e["name"] == "subscribed":
                resumed.setdefault(e["info"]["channel"], e["info"])
        assert resumed[first]["recovered"] is True and resumed[first]["replayed"] >= 25, resumed
        assert resumed[second]["recovered"] is True and resumed[second]["replayed"] >= 3, resumed

        # An explicit reconnect resumes the same way.
        mark = page.event_count(c)
        page.call("i => clients[i].reconnect()", c)
        page.wait_connected(c, after=mark)
        count = len(page.received(c, first))
        page.wait_count(c, first, count + 20, "live messages after reconnect()")
    finally:
        acked = publisher.stop()

    page.wait_caught_up(c, first, acked)
    assert page.prop(c, "transport") == "sse"

    _, stored_first = history(b.url, first)
    _, stored_second = history(b.url, second)
    assert stored_first == [(o, d) for o, d, _ in acked]
    assert_matches_history(page.received(c, first), stored_first, who=f"the page on {first}")
    assert_matches_history(page.received(c, second), stored_second, who=f"the page on {second}")
    assert [d for _, d in stored_second] == [{"second": n} for n in range(6)]
    assert not page.events(c, "stopped")
    assert not page.events(c, "reset")
