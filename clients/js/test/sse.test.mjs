import test from "node:test";
import assert from "node:assert/strict";
import { setup, settle } from "./fakes.mjs";

const reply = (channel, epoch, offset, extra = {}) => ({ type: "reply", id: null, ok: true, channel, epoch, offset, ...extra });
const message = (channel, offset, data, event) => ({ type: "message", channel, offset, event, data });
const last = (t, name) => t.named(name).at(-1);

/** Subscriptions recording messages and resets, per channel. */
function record(t, channels, options = {}) {
  const log = [];
  const subs = {};
  for (const ch of channels) {
    subs[ch] = t.client.subscribe(ch, {
      onMessage: (m) => log.push(["message", m.channel, m.epoch, m.offset, m.event, m.data]),
      onReset: (r) => log.push(["reset", r.channel, r.epoch, r.offset, r.reason]),
      onError: (e) => log.push(["error", ch, e.code]),
      ...options[ch],
    });
  }
  return { log, subs };
}

/** Connects over SSE and answers the request with a stream; returns the request. */
async function openStream(t) {
  t.client.connect();
  await settle();
  return t.fetch.requests.at(-1).stream();
}

test("the SSE URL names every channel in order, the token, and no since without positions", async () => {
  const t = setup({ transport: "sse", getToken: async () => "T1", user: "alice" });
  record(t, ["room:1", "news"]);
  t.client.connect();
  await settle();
  const url = t.fetch.requests[0].url;
  assert.equal(url.origin + url.pathname, "http://node.test:8080/sse");
  assert.deepEqual(url.searchParams.getAll("channel"), ["room:1", "news"]);
  assert.equal(url.searchParams.get("token"), "T1");
  assert.equal(url.searchParams.get("user"), "alice");
  assert.equal(url.searchParams.has("since"), false);
  assert.equal(t.fetch.requests[0].init.headers.accept, "text/event-stream");
  assert.ok(t.fetch.requests[0].init.signal, "abortable");
});

test("the cursor is epoch:offset per channel in order, an empty part for a channel without a position", async () => {
  const t = setup({
    transport: "sse",
    positions: { a: { epoch: "e1", offset: 5 }, c: { epoch: "e3", offset: 0 } },
  });
  record(t, ["a", "b", "c"]);
  t.client.connect();
  await settle();
  assert.equal(t.fetch.requests[0].url.searchParams.get("since"), "e1:5,,e3:0");
});

const STREAM = [
  "retry: 1000\n\n",
  `id: d.5.1\nevent: welcome\ndata: ${JSON.stringify({ type: "welcome", conn: "n1.3", node: "n1", user: "alice", channels: [reply("room:1", "E1", 5), reply("news", "E2", 1)] })}\n\n`,
  `id: d.6.1\nevent: message\ndata: ${JSON.stringify(message("room:1", 6, { text: "héllo ✓" }, "chat"))}\n\n`,
  ": ping\n\n",
  `id: d.6.2\nevent: message\ndata: ${JSON.stringify(message("news", 2, { headline: "second" }))}\n\n`,
  `id: d.6.2\nevent: message\ndata: ${JSON.stringify(message("news", 2, { headline: "duplicate" }))}\n\n`,
  `event: message\r\ndata: ${JSON.stringify(message("room:1", 7, "crlf"))}\r\n\r\n`,
  `event: message\rdata: ${JSON.stringify(message("room:1", 8, "cr"))}\r\r`,
  `:comment without space\nevent:message\ndata:${JSON.stringify(message("room:1", 9, "no space"))}\n\n`,
  `event: message\r\ndata: {"type":"message","channel":"room:1",\r\ndata: "offset":10,"data":"two data lines"}\r\n\r\n`,
].join("");
const EXPECTED = [
  ["message", "room:1", "E1", 6, "chat", { text: "héllo ✓" }],
  ["message", "news", "E2", 2, undefined, { headline: "second" }],
  ["message", "room:1", "E1", 7, undefined, "crlf"],
  ["message", "room:1", "E1", 8, undefined, "cr"],
  ["message", "room:1", "E1", 9, undefined, "no space"],
  ["message", "room:1", "E1", 10, undefined, "two data lines"],
];

test("the event stream parses in one chunk: events, comments, CRLF and CR line ends", async () => {
  const t = setup({ transport: "sse" });
  const { log } = record(t, ["room:1", "news"]);
  const req = await openStream(t);
  req.push(STREAM);
  await settle();
  assert.deepEqual(log, EXPECTED);
  assert.equal(t.client.state, "connected");
  assert.equal(t.client.transport, "sse");
  assert.equal(t.client.conn, "n1.3");
});

test("the event stream parses the same split into two chunks at every byte", async () => {
  const bytes = new TextEncoder().encode(STREAM);
  for (let cut = 1; cut < bytes.length; cut++) {
    const t = setup({ transport: "sse" });
    const { log } = record(t, ["room:1", "news"]);
    const req = await openStream(t);
    req.pushBytes(bytes.slice(0, cut)); // may cut a UTF-8 sequence, a CRLF, a field name
    req.pushBytes(bytes.slice(cut));
    await settle(3);
    assert.deepEqual(log, EXPECTED, `split at byte ${cut}`);
  }
});

test("the event stream parses the same one byte at a time", async () => {
  const t = setup({ transport: "sse" });
  const { log } = record(t, ["room:1", "news"]);
  const req = await openStream(t);
  for (const b of new TextEncoder().encode(STREAM)) req.pushBytes(new Uint8Array([b]));
  await settle(20);
  assert.deepEqual(log, EXPECTED);
});

test("the SSE welcome's replies are handled like WebSocket replies (recovered true/false)", async () => {
  const t = setup({
    transport: "sse",
    positions: { a: { epoch: "EA", offset: 3 }, b: { epoch: "OLD", offset: 9 } },
  });
  const subscribed = [];
  const { log, subs } = record(t, ["a", "b", "c"], {
    c: { onSubscribed: (i) => subscribed.push(i) },
  });
  const req = await openStream(t);
  req.welcome([
    reply("a", "EA", 5, { recovered: true, replayed: 2 }),
    reply("b", "NEW", 4, { recovered: false, replayed: 0 }),
    reply("c", "EC", 0),
  ]);
  req.event(message("a", 4, "r1"));
  req.event(message("a", 5, "r2"));
  req.event(message("b", 4, "old"));
  req.event(message("b", 5, "live"));
  req.event(message("c", 1, "c1"));
  await settle();
  assert.deepEqual(log, [
    ["reset", "b", "NEW", 4, "not_recovered"],
    ["message", "a", "EA", 4, undefined, "r1"],
    ["message", "a", "EA", 5, undefined, "r2"],
    ["message", "b", "NEW", 5, undefined, "live"],
    ["message", "c", "EC", 1, undefined, "c1"],
  ]);
  assert.deepEqual(subscribed, [{ channel: "c", epoch: "EC", offset: 0, recovered: undefined, replayed: undefined }]);
  assert.deepEqual(subs.a.position, { epoch: "EA", offset: 5 });
  req.event({ type: "reset", channel: "c", epoch: "EC2", offset: 0 });
  await settle();
  assert.deepEqual(log.at(-1), ["reset", "c", "EC2", 0, "reset"]);
});

test("a gap over SSE is not delivered: the stream is aborted and reopened with the cursor", async () => {
  const t = setup({ transport: "sse", random: () => 0.5 });
  const { log } = record(t, ["a"]);
  const req = await openStream(t);
  req.welcome([reply("a", "E", 1)]);
  req.event(message("a", 2, "ok"));
  req.event(message("a", 4, "gap"));
  await settle();
  assert.deepEqual(log, [["message", "a", "E", 2, undefined, "ok"]]);
  assert.equal(req.aborted, true);
  assert.equal(last(t, "disconnected").code, 4010);
  t.clock.advance(250);
  await settle();
  assert.equal(t.fetch.requests.at(-1).url.searchParams.get("since"), "E:2");
});

test("a close event ends the stream with its close code: 1012 drains, 4009 stops", async () => {
  const t = setup({ transport: "sse", random: () => 0.5 });
  record(t, ["a"]);
  const req = await openStream(t);
  req.welcome([reply("a", "E", 0)]);
  req.event({ type: "close", code: 1012, reason: "server restarting: reconnect" });
  await settle();
  assert.equal(req.aborted, true);
  assert.deepEqual(last(t, "disconnected"), {
    name: "disconnected", code: 1012, reason: "server restarting: reconnect", willReconnect: true, delay: 1000,
  });
  t.clock.advance(1000);
  await settle();
  const req2 = t.fetch.requests.at(-1).stream();
  assert.equal(req2.url.searchParams.get("since"), "E:0");
  req2.welcome([reply("a", "E", 0, { recovered: true, replayed: 0 })]);
  req2.event({ type: "close", code: 4009, reason: "kicked by the backend" });
  await settle();
  assert.equal(t.client.state, "stopped");
  assert.deepEqual(last(t, "stopped"), { name: "stopped", code: 4009, reason: "kicked by the backend" });
});

test("a stream that ends without a close event, or a failed request, is a failure with backoff", async () => {
  const t = setup({ transport: "sse", random: () => 1, backoff: { base: 100, max: 1000 } });
  record(t, ["a"]);
  const req = await openStream(t);
  req.welcome([reply("a", "E", 0)]);
  await settle();
  req.end();
  await settle();
  assert.deepEqual([last(t, "disconnected").code, last(t, "disconnected").delay], [1006, 100]);
  t.clock.advance(100);
  await settle();
  t.fetch.requests.at(-1).networkError();
  await settle();
  assert.deepEqual([last(t, "disconnected").code, last(t, "disconnected").delay], [1006, 200]);
});

test("HTTP 401 token_expired: a fresh token at once", async () => {
  let n = 0;
  const t = setup({ transport: "sse", getToken: async () => `T${++n}` });
  record(t, ["a"]);
  t.client.connect();
  await settle();
  t.fetch.requests[0].fail(401, "token_expired", "token expired: fetch a new token and reconnect");
  await settle();
  assert.equal(last(t, "disconnected").code, 4011);
  assert.equal(last(t, "disconnected").delay, 0);
  assert.equal(t.fetch.requests.length, 2);
  assert.equal(t.fetch.requests[1].url.searchParams.get("token"), "T2");
});

test("HTTP 401 unauthorized: one retry with a fresh token, then stopped", async () => {
  let n = 0;
  const t = setup({ transport: "sse", getToken: async () => `T${++n}` });
  record(t, ["a"]);
  t.client.connect();
  await settle();
  t.fetch.requests[0].fail(401, "unauthorized", "invalid token: InvalidSignature");
  await settle();
  assert.equal(t.fetch.requests.length, 2);
  t.fetch.requests[1].fail(401, "unauthorized", "invalid token: InvalidSignature");
  await settle();
  assert.equal(t.client.state, "stopped");
  assert.deepEqual(last(t, "stopped"), { name: "stopped", code: 4001, reason: "invalid token: InvalidSignature" });
});

test("HTTP 403 forbidden on one channel: its onError, dropped, the stream restarts without it", async () => {
  const t = setup({ transport: "sse" });
  const { log } = record(t, ["room:1", "user:bob", "user"]);
  t.client.connect();
  await settle();
  t.fetch.requests[0].fail(403, "forbidden", "not allowed to subscribe to channel user:bob");
  await settle();
  assert.deepEqual(log, [["error", "user:bob", "forbidden"]]);
  assert.equal(t.fetch.requests.length, 2);
  assert.deepEqual(t.fetch.requests[1].url.searchParams.getAll("channel"), ["room:1", "user"]);
  assert.equal(t.named("disconnected").length, 0, "not a failure");
});

test("HTTP 400 bad_channel names the channel the same way", async () => {
  const t = setup({ transport: "sse" });
  const { log } = record(t, ["ok", "bad channel"]);
  t.client.connect();
  await settle();
  t.fetch.requests[0].fail(400, "bad_channel", "\"bad channel\": channel name has a forbidden character ' '");
  await settle();
  assert.deepEqual(log, [["error", "bad channel", "bad_channel"]]);
  assert.deepEqual(t.fetch.requests[1].url.searchParams.getAll("channel"), ["ok"]);
});

test("HTTP 403 banned stops; 429 backs off longer; 503 backs off", async () => {
  const banned = setup({ transport: "sse" });
  record(banned, ["a"]);
  banned.client.connect();
  await settle();
  banned.fetch.requests[0].fail(403, "forbidden", "banned by an operator until 1700000000000 (Unix ms)");
  await settle();
  assert.equal(banned.client.state, "stopped");
  assert.equal(last(banned, "stopped").code, 4003);

  const busy = setup({ transport: "sse", random: () => 0.5, rateLimitedDelay: 10000 });
  record(busy, ["a"]);
  busy.client.connect();
  await settle();
  busy.fetch.requests[0].fail(429, "too_many_connections", "too many connections");
  await settle();
  assert.equal(last(busy, "disconnected").delay, 10250);
  busy.clock.advance(10250);
  await settle();
  busy.fetch.requests[1].fail(503, "unavailable", "draining");
  await settle();
  assert.equal(last(busy, "disconnected").delay, 500, "the second failure");
});

test("subscribe and unsubscribe on SSE restart the stream once per tick, from the current positions", async () => {
  const t = setup({ transport: "sse" });
  const { subs } = record(t, ["a"]);
  const req = await openStream(t);
  req.welcome([reply("a", "EA", 3)]);
  req.event(message("a", 4, "x"));
  await settle();
  const b = t.client.subscribe("b", () => {});
  t.client.subscribe("c", () => {});
  b.unsubscribe();
  await settle();
  assert.equal(req.aborted, true);
  assert.equal(t.fetch.requests.length, 2, "one restart for three changes");
  const url = t.fetch.requests[1].url;
  assert.deepEqual(url.searchParams.getAll("channel"), ["a", "c"]);
  assert.equal(url.searchParams.get("since"), "EA:4,");
  // A change undone in the same tick restarts nothing.
  const req2 = t.fetch.requests[1].stream();
  req2.welcome([reply("a", "EA", 4, { recovered: true, replayed: 0 }), reply("c", "EC", 0)]);
  await settle();
  t.client.subscribe("d", () => {}).unsubscribe();
  await settle();
  assert.equal(t.fetch.requests.length, 2);
  assert.equal(subs.a.position.offset, 4);
});

test("SSE with no channel waits for a subscribe instead of sending an empty request", async () => {
  const t = setup({ transport: "sse" });
  t.client.connect();
  await settle();
  assert.equal(t.fetch.requests.length, 0);
  assert.equal(t.client.state, "disconnected");
  assert.equal(last(t, "disconnected").delay, null);
  t.client.subscribe("a", () => {});
  await settle();
  assert.equal(t.fetch.requests.length, 1);
  assert.deepEqual(t.fetch.requests[0].url.searchParams.getAll("channel"), ["a"]);
});

test("SSE heartbeat: ': ping' keeps the stream alive; silence for pingInterval + grace reconnects", async () => {
  const t = setup({ transport: "sse", pingInterval: 25, heartbeatGrace: 10000 });
  record(t, ["a"]);
  const req = await openStream(t);
  req.welcome([reply("a", "E", 0)]);
  await settle();
  for (let i = 0; i < 4; i++) {
    t.clock.advance(25000);
    req.push(": ping\n\n");
    await settle();
  }
  assert.equal(t.client.state, "connected");
  t.clock.advance(34999);
  assert.equal(t.client.state, "connected");
  t.clock.advance(1);
  assert.equal(t.client.state, "disconnected");
  assert.equal(last(t, "disconnected").reason, "heartbeat timeout");
  assert.equal(req.aborted, true);
});

test("close() aborts the stream", async () => {
  const t = setup({ transport: "sse" });
  record(t, ["a"]);
  const req = await openStream(t);
  req.welcome([reply("a", "E", 0)]);
  await settle();
  assert.equal(req.init.signal.aborted, false);
  t.client.close();
  assert.equal(req.init.signal.aborted, true, "the request's signal is aborted");
  assert.equal(req.aborted, true);
  assert.equal(t.client.state, "stopped");
  t.clock.advance(600000);
  await settle();
  assert.equal(t.fetch.requests.length, 1, "no new request");
  assert.equal(t.clock.timers.size, 0, "no heartbeat or retry left");
});

test("HTTP 403 that names no channel (a refused Origin) drops nothing: a failure with backoff", async () => {
  const t = setup({ transport: "sse", random: () => 0.5 });
  const { log } = record(t, ["a", "allowed", "origins"]);
  t.client.connect();
  await settle();
  const message = 'origin "https://app.test" is not allowed: add it to --allowed-origins (PUSHD_ALLOWED_ORIGINS)';
  t.fetch.requests[0].fail(403, "forbidden", message);
  await settle();
  assert.deepEqual(log, []);
  assert.deepEqual(last(t, "disconnected"), { name: "disconnected", code: 1006, reason: message, willReconnect: true, delay: 250 });
  assert.equal(t.fetch.requests.length, 1, "no restart at once");
  t.clock.advance(250);
  await settle();
  assert.deepEqual(t.fetch.requests[1].url.searchParams.getAll("channel"), ["a", "allowed", "origins"]);
});

test("HTTP 403 naming a channel only inside the message drops nothing; only a trailing `channel <name>` counts", async () => {
  const t = setup({ transport: "sse", random: () => 0.5 });
  const { log } = record(t, ["room:1", "news"]);
  t.client.connect();
  await settle();
  t.fetch.requests[0].fail(403, "forbidden", "not allowed to subscribe to channel news:eu");
  await settle();
  assert.deepEqual(log, []);
  assert.equal(last(t, "disconnected").delay, 250);
  t.clock.advance(250);
  await settle();
  t.fetch.requests[1].fail(403, "forbidden", "not allowed to subscribe to channel news");
  await settle();
  assert.deepEqual(log, [["error", "news", "forbidden"]]);
  assert.deepEqual(t.fetch.requests[2].url.searchParams.getAll("channel"), ["room:1"]);
});

test("HTTP 400 too_many_channels drops every channel over the limit in one restart", async () => {
  const t = setup({ transport: "sse" });
  const { log } = record(t, ["a", "b", "c", "d", "e"]);
  t.client.connect();
  await settle();
  t.fetch.requests[0].fail(400, "too_many_channels", "at most 2 channels per connection");
  await settle();
  assert.deepEqual(log, [["error", "c", "too_many_channels"], ["error", "d", "too_many_channels"], ["error", "e", "too_many_channels"]]);
  assert.equal(t.fetch.requests.length, 2, "one restart");
  assert.deepEqual(t.fetch.requests[1].url.searchParams.getAll("channel"), ["a", "b"]);
  assert.equal(t.named("disconnected").length, 0, "not a failure");
});

test("HTTP 400 too_many_channels without a readable limit drops the newest channel", async () => {
  const t = setup({ transport: "sse" });
  const { log } = record(t, ["a", "b", "c"]);
  t.client.connect();
  await settle();
  t.fetch.requests[0].fail(400, "too_many_channels", "too many channels");
  await settle();
  assert.deepEqual(log, [["error", "c", "too_many_channels"]]);
  assert.deepEqual(t.fetch.requests[1].url.searchParams.getAll("channel"), ["a", "b"]);
});

test("SSE heartbeat: the welcome's ping_interval wins over the pingInterval option", async () => {
  const t = setup({ transport: "sse", pingInterval: 25, heartbeatGrace: 10000 });
  record(t, ["a"]);
  const req = await openStream(t);
  req.welcome([reply("a", "E", 0)], { ping_interval: 5 });
  await settle();
  t.clock.advance(14999);
  assert.equal(t.client.state, "connected");
  t.clock.advance(1);
  assert.equal(t.client.state, "disconnected", "5 s + the grace, not 25 s + the grace");
  assert.equal(last(t, "disconnected").reason, "heartbeat timeout");
});

test("an SSE restart started from onMessage: the rest of the chunk is delivered once, and the resume misses nothing", async () => {
  const t = setup({ transport: "sse" });
  const log = [];
  t.client.subscribe("a", {
    onMessage: (m) => {
      log.push(["a", m.offset]);
      if (m.offset === 1) t.client.subscribe("b", (mb) => log.push(["b", mb.offset]));
    },
  });
  const req = await openStream(t);
  req.push(
    [
      `event: welcome
data: ${JSON.stringify({ type: "welcome", conn: "n1.2", node: "n1", user: "u", channels: [reply("a", "E", 0)] })}

`,
      `event: message
data: ${JSON.stringify(message("a", 1, "one"))}

`,
      `event: message
data: ${JSON.stringify(message("a", 2, "two"))}

`,
      `event: message
data: ${JSON.stringify(message("a", 3, "three"))}

`,
    ].join(""),
  );
  req.event(message("a", 4, "four, in flight")); // already sent by the node when the restart begins
  await settle();
  assert.deepEqual(log, [["a", 1], ["a", 2], ["a", 3]]);
  assert.equal(req.aborted, true);
  assert.equal(t.fetch.requests.length, 2, "one restart");
  const url = t.fetch.requests[1].url;
  assert.deepEqual(url.searchParams.getAll("channel"), ["a", "b"]);
  assert.equal(url.searchParams.get("since"), "E:3,", "from the last message delivered");
  const req2 = t.fetch.requests[1].stream();
  req2.welcome([reply("a", "E", 4, { recovered: true, replayed: 1 }), reply("b", "EB", 0)]);
  req2.event(message("a", 3, "three again"));
  req2.event(message("a", 4, "four"));
  req2.event(message("b", 1, "b one"));
  await settle();
  assert.deepEqual(log, [["a", 1], ["a", 2], ["a", 3], ["a", 4], ["b", 1]]);
});
