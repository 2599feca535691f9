"""Short-lived tokens: the node closes the socket when the token expires (4011), the client asks
`getToken` for a fresh one and reconnects, again and again, and no message is lost or repeated.

The node runs outside dev mode (`--token-secret`, `--api-key`) and allows the test page's
origin only. The page's `getToken` mints an HS256 JWT with WebCrypto that expires 3 seconds
later (the page knows the secret because this is a test; a real app asks its backend). A backend
publishes continuously through `/api/publish` with the API key.
"""

from conftest import Publisher, assert_matches_history, history, unique

SECRET = "browser-suite-secret-0123456789abcdef"
API_KEY = "browser-suite-api-key"


def test_expiring_tokens_are_refreshed_through_get_token_and_every_message_arrives_once_in_order(
    start_node, harness, page_server
):
    node = start_node("tok", "--token-secret", SECRET, "--api-key", API_KEY, "--allowed-origins", page_server)
    api = {"Authorization": f"Bearer {API_KEY}"}

    channel = unique("room:tokens-")
    page = harness(node.url + "/client.js")
    c = page.create(url=node.url, transport="websocket", token={"secret": SECRET, "ttl_s": 3, "claims": {"sub": "dave"}})
    page.subscribe(c, channel)
    page.connect(c)
    welcome = page.wait_connected(c)
    assert welcome["user"] == "dave", "the node took the user from the token"
    page.wait_event(c, "subscribed")

    publisher = Publisher(node.url, channel, interval=0.02, headers=api)
    publisher.start()
    try:
        page.wait(
            "i => logs[i].events.filter(e => e.name === 'disconnected' && e.info.code === 4011).length >= 3"
            " && logs[i].events.filter(e => e.name === 'connected').length >= 4",
            c,
            "three token expiries, each followed by a reconnect",
        )
        count = len(page.received(c, channel))
        page.wait_count(c, channel, count + 20, "live messages after the last reconnect")
    finally:
        acked = publisher.stop()

    page.wait_caught_up(c, channel, acked)
    _, stored = history(node.url, channel, headers=api)
    assert stored == [(o, d) for o, d, _ in acked]
    assert_matches_history(page.received(c, channel), stored)

    log = page.log(c)
    drops = [e["info"] for e in log["events"] if e["name"] == "disconnected"]
    expiries = [d for d in drops if d["code"] == 4011]
    assert len(expiries) >= 3 and all(d["willReconnect"] for d in expiries), drops
    connects = [e["info"] for e in log["events"] if e["name"] == "connected"]
    assert all(w["user"] == "dave" for w in connects), connects
    assert log["tokenCalls"] >= len(connects) >= 4, f"getToken called {log['tokenCalls']} times for {len(connects)} connections"
    assert not [e for e in log["events"] if e["name"] in ("stopped", "reset")]
    resubscribes = [e["info"] for e in log["events"] if e["name"] == "subscribed"][1:]
    assert len(resubscribes) >= 3 and all(r["recovered"] is True for r in resubscribes), resubscribes
