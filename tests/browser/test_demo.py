"""The demo chat a dev-mode node serves at `/demo`, used the way a person would.

Two users open the page (two browser contexts), join a new room, talk, and see each other's
messages and presence. Then one turns the bot on (it publishes every second through the server
API) and presses "drop connection": the page reconnects, says it replayed the messages it
missed, and its list for the room is exactly the channel's history. Screenshots of the
conversation and of the replay are saved to target/browser/demo.png and demo-replay.png.
"""

import re

import requests

from conftest import ARTIFACTS, HERE, TIMEOUT, Haproxy, assert_matches_history, history, unique, wait_until

MS = TIMEOUT * 1000


def until(page, predicate, what, arg=None):
    """Waits until the JS `predicate(arg)` holds on the demo page; fails naming `what` and
    saying what the page showed."""
    try:
        page.wait_for_function(predicate, arg=arg, timeout=MS, polling=100)
    except Exception as e:
        shown = page.evaluate(
            "() => [document.querySelector('#state')?.dataset.state, document.querySelector('#notice')?.textContent]"
        )
        raise AssertionError(f"timed out after {TIMEOUT:.0f} s waiting for {what}; the page showed state "
                             f"{shown[0]!r} and notice {shown[1]!r}") from e


def open_demo(new_page, node, user):
    """A demo tab that picked a name in the form and connected."""
    page = new_page()
    page.set_viewport_size({"width": 1200, "height": 720})
    page.goto(node.url + "/demo")
    page.fill("#user", user)
    page.click("#connect")
    connected(page, f"{user}'s page to connect")
    assert page.text_content("#transport") == "websocket"
    assert page.text_content("#node") == node.node_id
    return page


def join(page, room):
    """Adds and opens a room through the "new room" form."""
    page.fill("#new-room", room)
    page.click("#add-room")
    until(page, """r => document.querySelector(`#rooms button[data-room="${r}"][data-active]`) !== null
                       && window.pushdDemo.rooms.has(r)""", f"room {room} to open", room)


def say(page, text):
    page.fill("#text", text)
    page.click("#send")


def shows(page, channel, text):
    """Waits until the message list shows `text` on `channel`."""
    until(
        page,
        """([c, t]) => [...document.querySelectorAll(`#messages li[data-channel="${c}"][data-offset]`)]
                         .some(li => li.querySelector(".text")?.textContent === t)""",
        f"the list to show {text!r}",
        [channel, text],
    )


def connected(page, what):
    until(page, "() => document.querySelector('#state').dataset.state === 'connected'", what)


def room_list(page, room):
    """The page's own list for a room (`window.pushdDemo.rooms`), as `[(offset, data)]`."""
    items = page.evaluate("r => window.pushdDemo.rooms.get(r).map(m => [m.offset, m.user, m.text])", room)
    return [(offset, {"user": user, "text": text}) for offset, user, text in items]


def test_two_users_chat_in_the_demo_and_a_dropped_connection_replays_exactly_what_was_missed(start_node, new_page):
    node = start_node("demo")
    room = unique("r")
    channel = f"room:{room}"

    alice = open_demo(new_page, node, "alice")
    join(alice, room)
    say(alice, "hello from alice")
    shows(alice, channel, "hello from alice")

    bob = open_demo(new_page, node, "bob")
    join(bob, room)
    shows(bob, channel, "hello from alice")  # from the history, read when bob joined
    say(bob, "hi alice, bob here")
    shows(alice, channel, "hi alice, bob here")  # live
    shows(bob, channel, "hi alice, bob here")
    say(alice, "welcome, bob: watch the bot when I drop my connection")
    shows(bob, channel, "welcome, bob: watch the bot when I drop my connection")
    for page in (alice, bob):
        for user in ("alice", "bob"):
            until(page, "u => document.querySelector(`#presence li[data-user='${u}']`) !== null",
                  f"presence to show {user}", user)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "demo.png"))

    # The bot publishes every second; the dropped connection misses some and replays them.
    alice.check("#ticker")
    until(alice, """c => document.querySelectorAll(`#messages li[data-channel="${c}"].bot`).length >= 2""",
          "two messages of the bot", channel)
    alice.click("#drop")
    until(alice, "() => /replayed \\d+ missed message/.test(document.querySelector('#notice').textContent)",
          "the notice to say the reconnect replayed the missed messages")
    alice.screenshot(path=str(ARTIFACTS / "demo-replay.png"))
    notice = alice.text_content("#notice")
    replayed = int(re.search(r"replayed (\d+) missed message", notice).group(1))
    assert replayed >= 1, notice
    connected(alice, "alice's page to be connected again")
    # A few more live ticks after the reconnect, then the bot stops.
    offset = alice.evaluate("r => window.pushdDemo.rooms.get(r).at(-1).offset", room)
    until(alice, "([r, o]) => window.pushdDemo.rooms.get(r).at(-1).offset >= o", "two more ticks", [room, offset + 2])
    alice.uncheck("#ticker")
    assert alice.evaluate("() => document.querySelectorAll('#messages li.replayed').length") >= replayed

    # The page's list is exactly the channel's history: same offsets and data, no gap, nothing twice.
    def settled():
        _, stored = history(node.url, channel)
        return stored if room_list(alice, room) == stored and room_list(bob, room) == stored else None

    try:
        stored = wait_until(settled, "the pages' lists to equal the history")
    except AssertionError:
        _, stored = history(node.url, channel)
        assert_matches_history(room_list(alice, room), stored, who="alice's page")
        assert_matches_history(room_list(bob, room), stored, who="bob's page")
        raise
    assert [o for o, _ in stored] == list(range(1, len(stored) + 1))
    assert stored[0][1] == {"user": "alice", "text": "hello from alice"}
    assert stored[1][1] == {"user": "bob", "text": "hi alice, bob here"}
    assert stored[2][1]["user"] == "alice"
    assert sum(1 for _, d in stored if d["user"] == "bot") >= 2 + replayed
    assert not alice.is_visible("#stopped")

    # An operator kicks and bans bob: his page stops for good and says why; alice's goes on.
    kicked = requests.post(node.url + "/admin/kick", timeout=10,
                           json={"user": "bob", "ban_s": 60, "reason": "flooding the room"})
    assert kicked.status_code == 200, kicked.text
    until(bob, "() => document.querySelector('#state').dataset.state === 'stopped'", "bob's page to stop")
    assert bob.is_visible("#stopped")
    why = bob.text_content("#stopped")
    assert "flooding the room" in why and "4009" in why, why
    say(alice, "bob is gone")
    shows(alice, channel, "bob is gone")


def test_the_demo_falls_back_to_sse_behind_a_proxy_that_refuses_websockets_and_still_chats(
    procs, start_node, new_page
):
    # The page and its node are reached only through a proxy that answers /ws with 403: the
    # client falls back to SSE, the room's history comes from the server API, and what is said
    # (published through the API, SSE carrying no commands) comes back over the stream.
    node = start_node("demo-sse")
    lb = Haproxy(procs, HERE / "haproxy" / "no-websocket.cfg", {"PUSHD_1": node.addr})
    room = unique("r")
    channel = f"room:{room}"
    said = requests.post(node.url + "/api/publish", timeout=10,
                         json={"channel": channel, "event": "chat", "data": {"user": "bob", "text": "before alice came"}})
    assert said.status_code == 200, said.text

    page = new_page()
    page.goto(lb.url + "/demo")
    page.fill("#user", "alice")
    page.click("#connect")
    connected(page, "the page to connect through the proxy")
    until(page, "() => document.querySelector('#transport').textContent === 'sse'", "the transport to be SSE")
    join(page, room)
    shows(page, channel, "before alice came")  # the history, read through the server API
    say(page, "hello over sse")
    shows(page, channel, "hello over sse")
    _, stored = history(node.url, channel)
    assert room_list(page, room) == stored
    assert [d["text"] for _, d in stored] == ["before alice came", "hello over sse"]
