import test from "node:test";
import assert from "node:assert/strict";
import { PushdError } from "../pushd.js";
import { setup, settle, connected } from "./fakes.mjs";

const rejectsWith = (promise, code) =>
  assert.rejects(promise, (e) => {
    assert.ok(e instanceof PushdError, `a PushdError, got ${e}`);
    assert.equal(e.code, code);
    return true;
  });

test("replies are matched by id, whatever order they come in", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t);
  const pub = t.client.publish("room:1", { text: "hi" }, { event: "chat", idempotencyKey: "k-1" });
  const pres = t.client.presence("room:1");
  const hist = t.client.history("room:1", { limit: 50, since: 12 });
  const [p, q, h] = ws.sent;
  assert.deepEqual(p, { id: p.id, op: "publish", channel: "room:1", data: { text: "hi" }, event: "chat", idempotency_key: "k-1" });
  assert.deepEqual(q, { id: q.id, op: "presence", channel: "room:1" });
  assert.deepEqual(h, { id: h.id, op: "history", channel: "room:1", limit: 50, since: 12 });
  assert.equal(new Set([p.id, q.id, h.id]).size, 3);
  // Replies in reverse order, with other frames in between.
  ws.frame({
    type: "reply", id: h.id, ok: true, channel: "room:1", epoch: "E", top: 15,
    publications: [{ offset: 13, event: "chat", data: { a: 1 }, time_ms: 5 }],
  });
  ws.frame({ type: "message", channel: "room:9", offset: 1, data: 1 });
  ws.frame({ type: "reply", id: q.id, ok: true, channel: "room:1", clients: [{ user: "alice", conn: "n1.1", node: "n1" }] });
  ws.frame({ type: "reply", id: p.id, ok: true, channel: "room:1", epoch: "E", offset: 16 });
  assert.deepEqual(await pub, { channel: "room:1", epoch: "E", offset: 16 });
  assert.deepEqual(await pres, [{ user: "alice", conn: "n1.1", node: "n1" }]);
  assert.deepEqual(await hist, {
    channel: "room:1", epoch: "E", top: 15,
    publications: [{ offset: 13, event: "chat", data: { a: 1 }, time_ms: 5 }],
  });
});

test("publish without options sends neither event nor idempotency_key; history without options sends only the channel", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t);
  t.client.publish("room:1", 42);
  t.client.history("room:1");
  assert.deepEqual(ws.sent.map(({ id, ...rest }) => rest), [
    { op: "publish", channel: "room:1", data: 42 },
    { op: "history", channel: "room:1" },
  ]);
});

test("ping resolves to the round trip in ms", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t);
  t.clock.advance(1000);
  const rtt = t.client.ping();
  t.clock.advance(37);
  ws.replyTo("ping");
  assert.equal(await rtt, 37);
});

test("an error reply rejects with the server's code and message", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t);
  const pub = t.client.publish("room:1", { x: 1 });
  const cmd = ws.ops("publish")[0];
  ws.frame({ type: "reply", id: cmd.id, ok: false, error: { code: "forbidden", message: "not allowed to publish to channel room:1" } });
  await assert.rejects(pub, (e) => e instanceof PushdError && e.code === "forbidden" && e.message === "not allowed to publish to channel room:1");
});

test("calls in flight reject on disconnect: disconnected, except publish: outcome_unknown", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t);
  const pub = t.client.publish("room:1", 1);
  const pres = t.client.presence("room:1");
  const hist = t.client.history("room:1");
  const rtt = t.client.ping();
  ws.serverClose(1006);
  await rejectsWith(pub, "outcome_unknown");
  await rejectsWith(pres, "disconnected");
  await rejectsWith(hist, "disconnected");
  await rejectsWith(rtt, "disconnected");
  // A reply arriving late from the dead socket changes nothing, not even a call of the next
  // connection that happens to wait for a reply.
  t.clock.advance(250);
  await settle(1);
  const ws2 = t.ws();
  ws2.welcome();
  const pres2 = t.client.presence("room:2");
  let settled = false;
  pres2.then(() => (settled = true), () => (settled = true));
  ws.frame({ type: "reply", id: ws.ops("presence")[0].id, ok: true, clients: [] });
  ws.frame({ type: "reply", id: ws2.ops("presence")[0].id, ok: true, clients: [{ user: "late", conn: "x", node: "x" }] });
  await settle(2);
  assert.equal(settled, false, "nothing from the old socket reaches the new call");
  assert.equal(t.client.state, "connected");
  ws2.replyTo("presence", { channel: "room:2", clients: [{ user: "bob", conn: "n1.9", node: "n1" }] });
  assert.deepEqual(await pres2, [{ user: "bob", conn: "n1.9", node: "n1" }]);
});

test("calls made while not connected wait for the next connection", async () => {
  const t = setup({ transport: "websocket" });
  const pres = t.client.presence("room:1"); // idle: not even connecting yet
  t.client.connect();
  await settle(1);
  t.clock.advance(3000);
  const ws = t.ws();
  assert.equal(ws.sent.length, 0, "nothing is sent before the welcome");
  ws.welcome();
  ws.replyTo("presence", { channel: "room:1", clients: [] });
  assert.deepEqual(await pres, []);
});

test("a waiting call rejects unavailable after connectTimeout", async () => {
  const t = setup({ transport: "websocket", connectTimeout: 4000 });
  t.client.connect();
  await settle(1);
  const pub = t.client.publish("room:1", 1);
  t.clock.advance(4000);
  await rejectsWith(pub, "unavailable");
  t.ws().welcome();
  assert.equal(t.ws().ops("publish").length, 0, "not sent after it was rejected");
});

test("close() rejects pending and waiting calls with closed; calls after it reject at once", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t);
  const pub = t.client.publish("room:1", 1);
  const rtt = t.client.ping();
  t.client.close();
  assert.equal(ws.closedByClient, 1000);
  await rejectsWith(pub, "closed");
  await rejectsWith(rtt, "closed");
  await rejectsWith(t.client.presence("room:1"), "closed");
});

test("over SSE publish, presence, history and ping reject not_supported", async () => {
  const t = setup({ transport: "sse" });
  for (const p of [t.client.publish("a", 1), t.client.presence("a"), t.client.history("a"), t.client.ping()]) {
    await rejectsWith(p, "not_supported");
  }
  const e = await t.client.publish("a", 1).catch((err) => err);
  assert.equal(e.message, "publish needs the WebSocket transport");
});

test("a call waiting when the connection comes up over SSE (fallback) rejects not_supported", async () => {
  const t = setup({ transport: "auto" });
  t.client.subscribe("a", () => {});
  const pub = t.client.publish("a", 1);
  const outcome = pub.catch((e) => e); // handled now: it rejects while the test waits
  t.client.connect();
  await settle(1);
  t.ws().serverClose(1006); // refused before open: a failure with backoff (250 ms)
  t.clock.advance(250);
  await settle(1);
  t.ws().serverClose(1006); // the second in a row: SSE at once
  await settle();
  const req = t.fetch.requests[0].stream();
  req.welcome([{ type: "reply", id: null, ok: true, channel: "a", epoch: "E", offset: 0 }]);
  await settle();
  assert.equal(t.client.transport, "sse");
  const e = await outcome;
  assert.ok(e instanceof PushdError);
  assert.equal(e.code, "not_supported");
});

test("the heartbeat ping has no id and its reply resolves nothing", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t);
  const rtt = t.client.ping();
  t.clock.advance(25000);
  assert.deepEqual(ws.sent.at(-1), { op: "ping" });
  ws.frame({ type: "reply", ok: true });
  ws.frame({ type: "reply", id: null, ok: true });
  let done = false;
  rtt.then(() => (done = true));
  await settle(2);
  assert.equal(done, false);
  ws.frame({ type: "reply", id: ws.ops("ping")[0].id, ok: true });
  await settle(2);
  assert.equal(done, true);
});

test("a call that JSON cannot carry rejects bad_request at once, connected or not, and blocks nothing", async () => {
  const t = setup({ transport: "websocket" });
  const cyclic = {};
  cyclic.self = cyclic;
  const waitingBad = t.client.publish("room:1", { n: 1n });
  const waitingOk = t.client.ping();
  let early = null;
  waitingBad.catch((e) => (early = e));
  await settle(1);
  assert.ok(early instanceof PushdError, "rejected at once, before any connection");
  assert.equal(early.code, "bad_request");
  const ws = await connected(t);
  assert.deepEqual(ws.sent.map((c) => c.op), ["ping"], "the waiting call behind it went out");
  await rejectsWith(t.client.history("room:1", { since: 1n }), "bad_request");
  await rejectsWith(t.client.publish("room:1", cyclic), "bad_request");
  const e = await t.client.publish("room:1", { n: 1n }).catch((err) => err);
  assert.match(e.message, /^publish: cannot be sent as JSON/);
  assert.deepEqual(ws.sent.map((c) => c.op), ["ping"], "nothing else was sent");
  ws.replyTo("ping");
  assert.equal(typeof (await waitingOk), "number");
  assert.equal(t.client.state, "connected");
});

test("a waiting call the socket refuses to send rejects; the welcome and the other calls go on", async () => {
  const t = setup({ transport: "websocket" });
  t.client.subscribe("room:1", () => {});
  const first = t.client.ping();
  const refused = t.client.presence("room:1");
  const last = t.client.history("room:1");
  t.client.connect();
  await settle(1);
  const ws = t.ws();
  const send = ws.send.bind(ws);
  ws.send = (text) => {
    if (JSON.parse(text).op === "presence") throw new Error("socket refused the frame");
    send(text);
  };
  ws.welcome(); // must not throw
  assert.equal(t.client.state, "connected");
  assert.deepEqual(ws.sent.map((c) => c.op), ["subscribe", "ping", "history"]);
  await rejectsWith(refused, "disconnected");
  ws.replyTo("ping");
  ws.replyTo("history", { channel: "room:1", epoch: "E", top: 0, publications: [] });
  assert.equal(typeof (await first), "number");
  assert.deepEqual((await last).publications, []);
});
