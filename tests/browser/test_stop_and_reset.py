"""The two ends of the reconnect policy.

- A kick with a ban (`POST /admin/kick` with `ban_s`) closes the socket with 4009: the client
  stops for good and never tries again, while other users carry on. A new client of the banned
  user is refused with 4003 and stops too.
- A resume the node cannot honour (the history was lost: a memory-engine node restarted with a
  new epoch) reaches the app as a reset with reason "not_recovered", and live messages of the
  new epoch follow it.
"""

import time

import requests

from conftest import assert_matches_history, history, metric, publish, unique

#: How long the kicked client is watched for a reconnect attempt: many times its backoff (at
#: most 0.5 s here), so a client that did not stop would have tried several times.
WATCH_S = 3.0


def test_a_kick_with_a_ban_stops_the_client_for_good_and_a_new_connection_is_refused(start_node, harness):
    node = start_node("k")
    channel = unique("room:kick-")
    page = harness(node.url + "/client.js")
    fast = {"base": 100, "max": 500}
    mallory = page.create(url=node.url, transport="websocket", user="mallory", backoff=fast)
    bob = page.create(url=node.url, transport="websocket", user="bob", backoff=fast)
    for i in (mallory, bob):
        page.subscribe(i, channel)
        page.connect(i)
        page.wait_event(i, "subscribed")
    assert [c["user"] for c in node.connections(user="mallory")] == ["mallory"]

    r = requests.post(node.url + "/admin/kick", json={"user": "mallory", "ban_s": 60}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 1, r.text

    stopped = page.wait_event(mallory, "stopped", "the kicked client to stop")["info"]
    assert stopped["code"] == 4009, stopped
    last_drop = page.events(mallory, "disconnected")[-1]["info"]
    assert last_drop["code"] == 4009 and last_drop["willReconnect"] is False, last_drop

    # Watch: the kicked client makes no attempt (an attempt would show as a connection, or as a
    # refusal of the banned user), while bob's connection carries on.
    metrics = node.metrics()
    opened = metric(metrics, "pushd_connections_opened_total", transport="ws")
    assert metric(metrics, "pushd_connections_refused_total", reason="banned") == 0
    events_at_stop = page.event_count(mallory)
    deadline = time.monotonic() + WATCH_S
    n = 0
    while time.monotonic() < deadline:
        publish(node.url, channel, {"n": n})
        n += 1
        page.wait_count(bob, channel, n)
        assert page.prop(mallory, "state") == "stopped"
        assert node.connections(user="mallory") == []
        metrics = node.metrics()
        assert metric(metrics, "pushd_connections_refused_total", reason="banned") == 0
        assert metric(metrics, "pushd_connections_opened_total", transport="ws") == opened
    assert page.event_count(mallory) == events_at_stop, page.events(mallory)[events_at_stop:]
    assert page.received(mallory, channel) == []
    assert page.prop(bob, "state") == "connected"

    # The ban holds: mallory's next client is refused (4003) and stops as well.
    again = page.create(url=node.url, transport="websocket", user="mallory", backoff=fast)
    page.subscribe(again, channel)
    page.connect(again)
    refused = page.wait_event(again, "stopped", "mallory's new client to be refused")["info"]
    assert refused["code"] == 4003, refused
    assert not page.events(again, "connected")
    assert metric(node.metrics(), "pushd_connections_refused_total", reason="banned") == 1
    assert node.connections(user="mallory") == []

    _, stored = history(node.url, channel)
    assert_matches_history(page.received(bob, channel), stored, who="bob")


def test_a_lost_history_reaches_the_app_as_a_not_recovered_reset_then_live_messages_follow(start_node, harness):
    node = start_node("m1")  # the memory engine: a restart loses every channel's history
    channel = unique("room:reset-")
    page = harness(node.url + "/client.js")
    c = page.create(url=node.url, transport="websocket", user="erin", backoff={"base": 200, "max": 1000})
    page.subscribe(c, channel)
    page.connect(c)
    page.wait_event(c, "subscribed")
    for n in range(5):
        publish(node.url, channel, {"before": n})
    page.wait_count(c, channel, 5)
    old_epoch, old_stored = history(node.url, channel)

    mark = page.event_count(c)
    node.kill()
    page.wait_event(c, "disconnected", after=mark)
    node.restart()  # same port, empty memory: the channel starts over in a new epoch
    for n in range(2):
        publish(node.url, channel, {"after": n})

    reset = page.wait_event(c, "reset", "the reset", after=mark)["info"]
    new_epoch, _ = history(node.url, channel)
    assert new_epoch != old_epoch
    assert reset["channel"] == channel and reset["reason"] == "not_recovered", reset
    assert reset["epoch"] == new_epoch, reset
    resubscribed = page.events(c, "subscribed")[-1]["info"]
    assert resubscribed["recovered"] is False, resubscribed

    for n in range(2, 5):
        publish(node.url, channel, {"after": n})
    page.wait_offset(c, channel, 5, "the live messages after the reset")

    _, new_stored = history(node.url, channel)
    assert [d for _, d in new_stored] == [{"after": n} for n in range(5)]
    messages = page.messages(c, channel)
    before = [(m["offset"], m["data"]) for m in messages if m["epoch"] == old_epoch]
    after = [(m["offset"], m["data"]) for m in messages if m["epoch"] == new_epoch]
    assert len(before) + len(after) == len(messages), messages
    assert_matches_history(before, old_stored, who="the page before the restart")
    # After the reset: exactly the new epoch's messages past the reset's position.
    assert_matches_history(after, [(o, d) for o, d in new_stored if o > reset["offset"]], who="the page after the reset")
    assert after, "live messages arrived after the reset"
    assert page.prop(c, "state") == "connected"
