import test from "node:test";
import assert from "node:assert/strict";
import { Pushd } from "../pushd.js";
import { setup, settle, connected } from "./fakes.mjs";

const reply = (channel, epoch, offset) => ({ type: "reply", id: null, ok: true, channel, epoch, offset });
const last = (t, name) => t.named(name).at(-1);

// ---- fallback --------------------------------------------------------------------------------

/** Closes the current WebSocket before it opened, the way a refused or blocked upgrade ends. */
async function refuseWebSocket(t) {
  await settle(1);
  t.ws().serverClose(1006);
  await settle();
}

test("auto: one WebSocket that fails before open is an ordinary failure with backoff, not a fallback", async () => {
  const t = setup({ random: () => 0.5 });
  t.client.subscribe("a", () => {});
  t.client.connect();
  await refuseWebSocket(t); // a node down or draining, a blip
  assert.equal(t.fetch.requests.length, 0, "no SSE yet");
  assert.equal(t.client.state, "disconnected");
  assert.equal(last(t, "disconnected").delay, 250);
  t.clock.advance(250);
  await settle(1);
  assert.equal(t.sockets.length, 2, "WebSocket again");
  t.ws().welcome(); // it works now
  assert.equal(t.client.transport, "websocket");
  assert.equal(t.named("fallback").length, 0);
});

test("auto: a WebSocket that opened resets the count; only two failures in a row fall back", async () => {
  const t = setup({ random: () => 0.5 });
  t.client.subscribe("a", () => {});
  t.client.connect();
  await refuseWebSocket(t);
  t.clock.advance(250);
  await settle(1);
  t.ws().open(); // opened: the transport works
  t.ws().serverClose(1006);
  await settle();
  assert.equal(t.fetch.requests.length, 0, "a WebSocket that opened and then closed does not fall back");
  assert.equal(t.client.state, "disconnected");
  t.clock.advance(last(t, "disconnected").delay);
  await refuseWebSocket(t);
  assert.equal(t.fetch.requests.length, 0, "one failure before open since the last open");
  t.clock.advance(last(t, "disconnected").delay);
  await refuseWebSocket(t);
  assert.equal(t.fetch.requests.length, 1, "the second in a row falls back");
});

test("auto: the second WebSocket in a row that fails before open falls back to SSE at once, at its URL", async () => {
  let n = 0;
  const t = setup({ url: ["http://a.test", "http://b.test"], random: () => 0.9, getToken: async () => `T${++n}` });
  t.client.subscribe("a", () => {});
  t.client.connect();
  await refuseWebSocket(t);
  assert.equal(t.sockets[0].url.host, "b.test");
  t.clock.advance(last(t, "disconnected").delay);
  await settle(1);
  const ws = t.ws();
  assert.equal(ws.url.host, "a.test", "the next URL: the count is over any URL");
  ws.serverClose(1006);
  await settle();
  assert.equal(t.clock.timers.size, 1, "no backoff timer, only the connect timeout");
  assert.equal(t.fetch.requests.length, 1);
  const req = t.fetch.requests[0];
  assert.equal(req.url.host, "a.test");
  assert.equal(req.url.searchParams.get("token"), "T2", "the token just fetched");
  assert.equal(t.named("disconnected").length, 1, "only the first failure");
  req.stream().welcome([reply("a", "E", 0)]);
  await settle();
  assert.equal(t.client.state, "connected");
  assert.equal(t.client.transport, "sse");
  assert.deepEqual(last(t, "fallback"), { name: "fallback", from: "websocket", to: "sse" });
  assert.deepEqual(last(t, "connected"), { name: "connected", transport: "sse", node: "n1", conn: "n1.2", user: "alice" });
});

test("auto: after a fallback, reconnects use SSE for 5 minutes, then WebSocket first again", async () => {
  const t = setup({ random: () => 0, pingInterval: 3600 }); // random 0: every retry at once
  t.client.subscribe("a", () => {});
  t.client.connect();
  await refuseWebSocket(t);
  await refuseWebSocket(t);
  const req = t.fetch.requests[0].stream();
  req.welcome([reply("a", "E", 0)]); // the fallback, at t = 0
  await settle();
  t.clock.advance(60000);
  req.end(); // dropped a minute later
  await settle();
  assert.equal(t.sockets.length, 2, "no WebSocket tried");
  assert.equal(t.fetch.requests.length, 2);
  const req2 = t.fetch.requests[1].stream();
  req2.welcome([reply("a", "E", 0)]);
  await settle();
  assert.equal(t.named("fallback").length, 1, "announced once");
  t.clock.advance(239999);
  req2.end(); // just before the 5 minutes are over
  await settle();
  assert.equal(t.sockets.length, 2);
  const req3 = t.fetch.requests[2].stream();
  req3.welcome([reply("a", "E", 0)]);
  await settle();
  t.clock.advance(1);
  req3.end(); // 5 minutes after the fallback
  await settle();
  assert.equal(t.sockets.length, 3, "WebSocket first again");
  assert.equal(t.fetch.requests.length, 3);
});

test("auto: once WebSockets fail twice, a WebSocket and SSE failing together count as one failure", async () => {
  const t = setup({ random: () => 1, backoff: { base: 100, max: 10000 } });
  t.client.subscribe("a", () => {});
  t.client.connect();
  await refuseWebSocket(t);
  assert.equal(last(t, "disconnected").delay, 100);
  t.clock.advance(100);
  await refuseWebSocket(t);
  t.fetch.requests[0].networkError();
  await settle();
  assert.equal(t.named("disconnected").length, 2);
  assert.equal(last(t, "disconnected").delay, 200);
  t.clock.advance(200);
  await settle(1);
  assert.equal(t.sockets.length, 3, "WebSocket is tried first again");
  t.ws().serverClose(1006);
  await settle();
  t.fetch.requests[1].fail(503, "unavailable", "node full");
  await settle();
  assert.equal(t.named("disconnected").length, 3);
  assert.equal(last(t, "disconnected").delay, 400, "the third failure");
});

test("auto: WebSockets that never open within connectTimeout, twice, fall back to SSE", async () => {
  const t = setup({ connectTimeout: 3000, random: () => 0 });
  t.client.subscribe("a", () => {});
  t.client.connect();
  await settle(1);
  t.clock.advance(3000);
  await settle();
  assert.equal(t.sockets[0].closedByClient, 1000);
  assert.equal(t.fetch.requests.length, 0);
  t.clock.advance(3000);
  await settle();
  assert.equal(t.sockets[1].closedByClient, 1000);
  assert.equal(t.fetch.requests.length, 1);
});

test("transport websocket never uses SSE", async () => {
  const t = setup({ transport: "websocket", random: () => 0.5 });
  t.client.subscribe("a", () => {});
  t.client.connect();
  await settle(1);
  t.ws().serverClose(1006);
  await settle();
  assert.equal(t.fetch.requests.length, 0);
  assert.equal(last(t, "disconnected").delay, 250);
});

// ---- WebSocket heartbeat -----------------------------------------------------------------------

test("WebSocket heartbeat: quiet for ping_interval sends a ping; silence for the grace after it reconnects", async () => {
  const t = setup({ transport: "websocket", heartbeatGrace: 10000 });
  const ws = await connected(t, { ping_interval: 20 });
  t.clock.advance(19999);
  assert.equal(ws.ops("ping").length, 0);
  t.clock.advance(1);
  assert.deepEqual(ws.sent, [{ op: "ping" }]);
  t.clock.advance(9999);
  assert.equal(t.client.state, "connected");
  t.clock.advance(1);
  assert.equal(t.client.state, "disconnected");
  assert.equal(last(t, "disconnected").reason, "heartbeat timeout");
  assert.equal(ws.closedByClient, 1000);
});

test("WebSocket heartbeat: a reply to the ping keeps the connection; traffic means no ping at all", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t, { ping_interval: 25 });
  t.clock.advance(25000);
  assert.equal(ws.ops("ping").length, 1);
  t.clock.advance(3000);
  ws.frame({ type: "reply", ok: true });
  t.clock.advance(20000);
  assert.equal(t.client.state, "connected");
  assert.equal(ws.ops("ping").length, 1, "25 s after the last frame, not yet");
  // Frames every 10 s: the client never needs to ping.
  for (let i = 0; i < 10; i++) {
    t.clock.advance(2000);
    ws.frame({ type: "join", channel: "x", user: "u", conn: "c" });
    t.clock.advance(8000);
  }
  assert.equal(ws.ops("ping").length, 1);
  assert.equal(t.client.state, "connected");
});

test("WebSocket heartbeat notices a dead connection well within the server's 60 s idle timeout", async () => {
  const t = setup({ transport: "websocket" }); // defaults: ping_interval from the welcome (25), grace 10 s
  await connected(t);
  t.clock.advance(35000);
  assert.equal(t.client.state, "disconnected");
});

// ---- browser signals ----------------------------------------------------------------------------

test("offline abandons an attempt and stops retrying; online reconnects after random() * backoff.base", async () => {
  const t = setup({ transport: "websocket", random: () => 0.5 });
  t.client.connect();
  await settle(1);
  const first = t.ws();
  t.win.navigator.onLine = false;
  t.win.fire("offline");
  assert.equal(first.closedByClient, 1000);
  assert.equal(t.client.state, "disconnected");
  assert.equal(last(t, "disconnected").delay, null);
  t.clock.advance(600000);
  await settle(1);
  assert.equal(t.sockets.length, 1, "no attempt while offline");
  t.win.navigator.onLine = true;
  t.win.fire("online");
  await settle(1);
  assert.equal(last(t, "state").delay, 250, "the jitter is announced");
  assert.equal(t.sockets.length, 1, "not in the same millisecond as every other client");
  t.clock.advance(250);
  await settle(1);
  assert.equal(t.sockets.length, 2);
  assert.equal(t.client.state, "connecting");
});

test("online jitter spreads clients: random() * backoff.base, whatever backoff was pending", async () => {
  const t = setup({ transport: "websocket", random: () => 0.999, backoff: { base: 1000, max: 30000 } });
  await connected(t);
  for (let i = 0; i < 5; i++) {
    t.ws().serverClose(1006); // failures grow: the pending backoff is long
    t.clock.advance(last(t, "disconnected").delay);
    await settle(1);
  }
  t.ws().serverClose(1006);
  assert.ok(last(t, "disconnected").delay > 15000);
  t.win.fire("online");
  await settle(1);
  t.clock.advance(998);
  await settle(1);
  assert.equal(t.sockets.length, 6);
  t.clock.advance(1);
  await settle(1);
  assert.equal(t.sockets.length, 7, "tried after 999 ms, not after the backoff");
});

test("offline while waiting on a backoff timer cancels it; a drop while offline waits for online", async () => {
  const t = setup({ transport: "websocket", random: () => 0.5 });
  const ws = await connected(t);
  t.win.fire("offline");
  assert.equal(t.client.state, "connected", "an open connection is left to its heartbeat");
  ws.serverClose(1006);
  assert.equal(last(t, "disconnected").delay, null);
  assert.equal(t.clock.timers.size, 0);
  t.win.fire("online");
  t.clock.advance(250);
  await settle(1);
  assert.equal(t.sockets.length, 2);
});

test("a rate-limit back-off (4008) is kept through online and visibility events", async () => {
  const t = setup({ transport: "websocket", random: () => 0.5, rateLimitedDelay: 10000 });
  await connected(t);
  t.ws().serverClose(4008, "rate limited");
  assert.equal(last(t, "disconnected").delay, 10250);
  t.clock.advance(1000);
  t.win.setVisibility("hidden");
  t.win.setVisibility("visible");
  t.win.fire("online");
  await settle(1);
  assert.equal(t.sockets.length, 1, "no attempt before the back-off is over");
  t.win.fire("offline");
  t.clock.advance(4000);
  t.win.fire("online"); // back online 5 s into the 10.25 s back-off
  await settle(1);
  assert.equal(last(t, "state").delay, 5250);
  t.clock.advance(5249);
  await settle(1);
  assert.equal(t.sockets.length, 1);
  t.clock.advance(1);
  await settle(1);
  assert.equal(t.sockets.length, 2);
});

test("an SSE 429 back-off is kept through online and visibility events", async () => {
  const t = setup({ transport: "sse", random: () => 0.5, rateLimitedDelay: 10000 });
  t.client.subscribe("a", () => {});
  t.client.connect();
  await settle();
  t.fetch.requests[0].fail(429, "too_many_connections", "too many connections");
  await settle();
  assert.equal(last(t, "disconnected").delay, 10250);
  t.win.setVisibility("visible");
  t.win.fire("online");
  t.clock.advance(10249);
  await settle();
  assert.equal(t.fetch.requests.length, 1);
  t.clock.advance(1);
  await settle();
  assert.equal(t.fetch.requests.length, 2);
});

test("an offline event seen before close() does not block a later connect()", async () => {
  const t = setup({ transport: "websocket" });
  await connected(t);
  t.win.fire("offline");
  t.client.close();
  t.client.connect(); // the online event came while the client was stopped and not listening
  await settle(1);
  assert.equal(t.sockets.length, 2);
  assert.equal(t.client.state, "connecting");
});

test("the page becoming visible while waiting on a backoff timer tries at once", async () => {
  const t = setup({ transport: "websocket", random: () => 1, backoff: { base: 20000, max: 20000 } });
  await connected(t);
  t.ws().serverClose(1006);
  assert.equal(last(t, "disconnected").delay, 20000);
  t.win.setVisibility("hidden");
  await settle(1);
  assert.equal(t.sockets.length, 1);
  t.win.setVisibility("visible");
  await settle(1);
  assert.equal(t.sockets.length, 2);
  assert.equal(t.clock.timers.size, 1, "the backoff timer is gone; only the connect timeout");
});

test("close() removes the window listeners", async () => {
  const t = setup({ transport: "websocket" });
  await connected(t);
  t.client.close();
  t.win.fire("online");
  t.win.setVisibility("visible");
  await settle(1);
  assert.equal(t.sockets.length, 1);
  assert.equal(t.client.state, "stopped");
});

test("no window at all (window: null) works", async () => {
  const t = setup({ transport: "websocket", window: null });
  await connected(t);
  assert.equal(t.client.state, "connected");
});

// ---- URLs and tokens ----------------------------------------------------------------------------

test("node URLs: http -> ws, https -> wss, ws(s) accepted, a path prefix kept, /ws and /sse derived", async () => {
  const cases = [
    ["http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws", "http://127.0.0.1:8080/sse"],
    ["https://push.example.com/", "wss://push.example.com/ws", "https://push.example.com/sse"],
    ["wss://push.example.com/prefix", "wss://push.example.com/prefix/ws", "https://push.example.com/prefix/sse"],
    ["ws://h:1/ws", "ws://h:1/ws", "http://h:1/sse"],
  ];
  for (const [url, wsUrl, sseUrl] of cases) {
    const a = setup({ url, transport: "websocket" });
    a.client.connect();
    await settle(1);
    assert.equal(a.ws().url.href, wsUrl, url);
    const b = setup({ url, transport: "sse" });
    b.client.subscribe("c", () => {});
    b.client.connect();
    await settle();
    const got = b.fetch.requests[0].url;
    assert.equal(got.origin + got.pathname, sseUrl, url);
  }
});

test("getToken is called before every attempt; user= is passed", async () => {
  let calls = 0;
  const t = setup({ transport: "websocket", user: "bob", getToken: async () => `T${++calls}` });
  await connected(t);
  assert.equal(t.ws().url.searchParams.get("token"), "T1");
  assert.equal(t.ws().url.searchParams.get("user"), "bob");
  t.ws().serverClose(1006);
  t.clock.advance(1000);
  await settle(1);
  assert.equal(calls, 2);
  assert.equal(t.ws().url.searchParams.get("token"), "T2");
});

test("a getToken that throws is a failed attempt with backoff (and no SSE fallback)", async () => {
  const t = setup({ random: () => 0.5, getToken: async () => { throw new Error("backend down"); } });
  t.client.connect();
  await settle(1);
  assert.equal(t.sockets.length, 0);
  assert.equal(t.fetch.requests.length, 0);
  assert.equal(last(t, "disconnected").reason, "getToken failed: backend down");
  assert.equal(last(t, "disconnected").delay, 250);
});

test("connectTimeout starts once the token is there: a slow getToken does not eat it", async () => {
  let give;
  const t = setup({ transport: "websocket", connectTimeout: 10000, getToken: () => new Promise((r) => (give = r)) });
  t.client.connect();
  await settle(1);
  t.clock.advance(8000); // getToken takes 8 s
  give("T1");
  await settle(1);
  assert.equal(t.sockets.length, 1);
  t.ws().open();
  t.clock.advance(9999); // 17.999 s after connect(), 9.999 s after the token
  assert.equal(t.client.state, "connecting");
  t.ws().welcome();
  assert.equal(t.client.state, "connected");
});

test("a getToken that never settles ends the attempt after connectTimeout, as a failure", async () => {
  let calls = 0;
  const t = setup({ random: () => 0.5, connectTimeout: 5000, getToken: () => (calls++, new Promise(() => {})) });
  t.client.connect();
  await settle(1);
  t.clock.advance(4999);
  assert.equal(t.client.state, "connecting");
  t.clock.advance(1);
  assert.equal(t.client.state, "disconnected");
  assert.deepEqual([last(t, "disconnected").reason, last(t, "disconnected").delay], ["getToken timed out", 250]);
  assert.equal(t.sockets.length + t.fetch.requests.length, 0, "nothing opened, no fallback");
  t.clock.advance(250);
  await settle(1);
  assert.equal(calls, 2, "the next attempt asks again");
  t.clock.advance(5000);
  assert.equal(last(t, "disconnected").delay, 500, "the second failure");
});

test("the constructor does not connect; the url defaults to the module's origin", () => {
  const t = setup({ transport: "websocket" });
  assert.equal(t.client.state, "idle");
  assert.equal(t.sockets.length, 0);
  assert.equal(t.client.transport, null);
  // Loaded from a file: URL in Node, the default origin is "null"; in a browser it is the node's origin.
  assert.throws(() => new Pushd({ WebSocket: t.WebSocket }), TypeError);
  assert.throws(() => new Pushd({ url: "http://x", transport: "carrier-pigeon" }), /transport/);
});
