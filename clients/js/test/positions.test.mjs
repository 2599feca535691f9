import test from "node:test";
import assert from "node:assert/strict";
import { PushdError } from "../pushd.js";
import { setup, settle, connected } from "./fakes.mjs";

/** A subscription that records everything it is told. */
function recorder(t, channel, extra = {}) {
  const seen = { messages: [], resets: [], subscribed: [], errors: [], joins: [], leaves: [] };
  const sub = t.client.subscribe(channel, {
    onMessage: (m) => seen.messages.push(m),
    onReset: (r) => seen.resets.push(r),
    onSubscribed: (i) => seen.subscribed.push(i),
    onError: (e) => seen.errors.push(e),
    onJoin: (p) => seen.joins.push(p),
    onLeave: (p) => seen.leaves.push(p),
    ...extra,
  });
  return { sub, seen, offsets: () => seen.messages.map((m) => m.offset) };
}

const msg = (channel, offset, data = { n: offset }, event) => ({ type: "message", channel, offset, event, data });

test("a subscribe reply without since stores the position; the next offsets are delivered", async () => {
  const t = setup({ transport: "websocket" });
  const r = recorder(t, "room:1");
  const ws = await connected(t);
  const cmd = ws.ops("subscribe")[0];
  assert.deepEqual(cmd, { id: cmd.id, op: "subscribe", channel: "room:1" }, "no since without a position");
  assert.equal(r.sub.position, null);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 7 });
  assert.deepEqual(r.sub.position, { epoch: "E", offset: 7 });
  assert.deepEqual(r.seen.subscribed, [{ channel: "room:1", epoch: "E", offset: 7, recovered: undefined, replayed: undefined }]);
  ws.frame(msg("room:1", 8, { text: "hi" }, "chat"));
  ws.frame(msg("room:1", 9, { text: "no event" }));
  assert.deepEqual(r.seen.messages, [
    { channel: "room:1", epoch: "E", offset: 8, event: "chat", data: { text: "hi" } },
    { channel: "room:1", epoch: "E", offset: 9, event: undefined, data: { text: "no event" } },
  ]);
  assert.deepEqual(r.sub.position, { epoch: "E", offset: 9 });
  assert.deepEqual(t.client.positions(), { "room:1": { epoch: "E", offset: 9 } });
  assert.equal(r.seen.resets.length, 0);
});

test("messages before the subscribe is confirmed, or for other channels, are not delivered", async () => {
  const t = setup({ transport: "websocket" });
  const r = recorder(t, "room:1");
  const ws = await connected(t);
  ws.frame(msg("room:1", 1));
  ws.frame(msg("room:2", 1));
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 1 });
  assert.deepEqual(r.offsets(), []);
});

test("a message at or below the position is dropped (no duplicates)", async () => {
  const t = setup({ transport: "websocket" });
  const r = recorder(t, "room:1");
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 3 });
  for (const o of [2, 3, 4, 4, 3, 5]) ws.frame(msg("room:1", o));
  assert.deepEqual(r.offsets(), [4, 5]);
  assert.equal(t.client.state, "connected");
});

test("a gap is never delivered: the client reconnects and resubscribes with since, and the replay fills it", async () => {
  const t = setup({ transport: "websocket", random: () => 0.5 });
  const r = recorder(t, "room:1");
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 3 });
  ws.frame(msg("room:1", 4));
  ws.frame(msg("room:1", 6)); // 5 is missing
  ws.frame(msg("room:1", 7));
  assert.deepEqual(r.offsets(), [4], "neither 6 nor what follows it on that connection");
  assert.equal(ws.closedByClient, 1000);
  const d = t.named("disconnected").at(-1);
  assert.equal(d.code, 4010);
  assert.equal(d.delay, 250, "a prompt reconnect: random() * 500");
  t.clock.advance(250);
  await settle(1);
  const ws2 = t.ws();
  assert.notEqual(ws2, ws);
  ws2.welcome();
  assert.deepEqual(ws2.ops("subscribe")[0].since, { epoch: "E", offset: 4 });
  ws2.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 7, recovered: true, replayed: 3 });
  for (const o of [5, 6, 7, 8]) ws2.frame(msg("room:1", o));
  assert.deepEqual(r.offsets(), [4, 5, 6, 7, 8]);
});

test("after a drop every channel is resubscribed with its last position", async () => {
  const t = setup({ transport: "websocket" });
  const a = recorder(t, "a");
  const b = recorder(t, "b");
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "a", epoch: "EA", offset: 10 }, "a");
  ws.replyTo("subscribe", { channel: "b", epoch: "EB", offset: 0 }, "b");
  ws.frame(msg("a", 11));
  ws.frame(msg("b", 1));
  ws.frame(msg("b", 2));
  const c = recorder(t, "c"); // sent at once while connected
  assert.equal(ws.ops("subscribe").length, 3);
  ws.serverClose(1006);
  t.clock.advance(1000);
  await settle(1);
  const ws2 = t.ws();
  ws2.welcome();
  const subs = Object.fromEntries(ws2.ops("subscribe").map((s) => [s.channel, s.since]));
  assert.deepEqual(subs, { a: { epoch: "EA", offset: 11 }, b: { epoch: "EB", offset: 2 }, c: undefined });
  assert.equal(a.sub.position.offset, 11);
  assert.equal(b.sub.position.offset, 2);
  assert.equal(c.sub.position, null);
});

test("recovered:true keeps the position, and the replayed messages follow the reply in order", async () => {
  const t = setup({ transport: "websocket" });
  const r = recorder(t, "room:7", { since: { epoch: "E", offset: 2 } });
  const ws = await connected(t);
  assert.deepEqual(ws.ops("subscribe")[0].since, { epoch: "E", offset: 2 });
  ws.replyTo("subscribe", { channel: "room:7", epoch: "E", offset: 5, recovered: true, replayed: 3 });
  assert.deepEqual(r.sub.position, { epoch: "E", offset: 2 }, "not jumped to the reply's offset");
  for (const o of [3, 4, 5, 6]) ws.frame(msg("room:7", o));
  assert.deepEqual(r.offsets(), [3, 4, 5, 6]);
  assert.equal(r.seen.resets.length, 0);
  assert.deepEqual(r.seen.subscribed[0], { channel: "room:7", epoch: "E", offset: 5, recovered: true, replayed: 3 });
});

test("recovered:false reaches the app as a reset and stores the reply's position", async () => {
  const t = setup({ transport: "websocket" });
  const r = recorder(t, "room:42", { since: { epoch: "OLD", offset: 2 } });
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:42", epoch: "NEW", offset: 5, recovered: false, replayed: 0 });
  assert.deepEqual(r.seen.resets, [{ channel: "room:42", epoch: "NEW", offset: 5, reason: "not_recovered" }]);
  assert.deepEqual(r.sub.position, { epoch: "NEW", offset: 5 });
  ws.frame(msg("room:42", 5));
  ws.frame(msg("room:42", 6));
  assert.deepEqual(r.seen.messages.map((m) => [m.epoch, m.offset]), [["NEW", 6]]);
});

test("a reset frame stores its position, reaches the app, and delivery continues in the new epoch", async () => {
  const t = setup({ transport: "websocket" });
  const r = recorder(t, "quiet");
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "quiet", epoch: "E1", offset: 9 });
  ws.frame(msg("quiet", 10));
  ws.frame({ type: "reset", channel: "quiet", epoch: "E2", offset: 0 });
  assert.deepEqual(r.seen.resets, [{ channel: "quiet", epoch: "E2", offset: 0, reason: "reset" }]);
  assert.deepEqual(r.sub.position, { epoch: "E2", offset: 0 });
  ws.frame(msg("quiet", 1));
  assert.deepEqual(r.seen.messages.map((m) => [m.epoch, m.offset]), [["E1", 10], ["E2", 1]]);
});

test("positions passed to the constructor are the first since, and positions() snapshots them", async () => {
  const t = setup({ transport: "websocket", positions: { "room:1": { epoch: "E", offset: 40 } } });
  const r = recorder(t, "room:1");
  assert.deepEqual(t.client.positions(), { "room:1": { epoch: "E", offset: 40 } });
  const snapshot = t.client.positions();
  snapshot["room:1"].offset = 999;
  assert.equal(r.sub.position.offset, 40, "a snapshot, not the live object");
  const ws = await connected(t);
  assert.deepEqual(ws.ops("subscribe")[0].since, { epoch: "E", offset: 40 });
  // Used once: after an unsubscribe, a new subscribe starts live.
  r.sub.unsubscribe();
  recorder(t, "room:1");
  assert.equal(ws.ops("subscribe")[1].since, undefined);
});

test("history then subscribe with since: nothing missed, nothing twice", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t);
  const pending = t.client.history("room:1", { limit: 50 });
  ws.replyTo("history", {
    channel: "room:1",
    epoch: "E",
    top: 15,
    publications: [{ offset: 15, event: "chat", data: "x", time_ms: 1 }],
  });
  const h = await pending;
  const r = recorder(t, "room:1", { since: { epoch: h.epoch, offset: h.top } });
  assert.deepEqual(ws.ops("subscribe")[0].since, { epoch: "E", offset: 15 });
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 17, recovered: true, replayed: 2 });
  for (const o of [15, 16, 17]) ws.frame(msg("room:1", o));
  assert.deepEqual(r.offsets(), [16, 17]);
});

test("a refused subscribe calls onError with the server's code and drops the subscription", async () => {
  const t = setup({ transport: "websocket" });
  const r = recorder(t, "user:bob");
  const ws = await connected(t);
  const cmd = ws.ops("subscribe")[0];
  ws.frame({ type: "reply", id: cmd.id, ok: false, error: { code: "forbidden", message: "not allowed to subscribe to channel user:bob" } });
  assert.equal(r.seen.errors.length, 1);
  assert.ok(r.seen.errors[0] instanceof PushdError);
  assert.equal(r.seen.errors[0].code, "forbidden");
  assert.equal(r.seen.errors[0].message, "not allowed to subscribe to channel user:bob");
  assert.deepEqual(t.client.positions(), {});
  ws.serverClose(1006);
  t.clock.advance(1000);
  await settle(1);
  t.ws().welcome();
  assert.equal(t.ws().ops("subscribe").length, 0, "not resubscribed");
  recorder(t, "user:bob"); // the channel may be subscribed again
});

test("an unavailable subscribe is retried on the same connection, not dropped", async () => {
  const t = setup({ transport: "websocket", random: () => 1, backoff: { base: 100, max: 1000 } });
  const r = recorder(t, "room:1");
  const ws = await connected(t);
  const cmd = ws.ops("subscribe")[0];
  ws.frame({ type: "reply", id: cmd.id, ok: false, error: { code: "unavailable", message: "store down" } });
  assert.equal(r.seen.errors.length, 0);
  t.clock.advance(100);
  assert.equal(ws.ops("subscribe").length, 2);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 0 });
  assert.deepEqual(r.sub.position, { epoch: "E", offset: 0 });
});

test("subscribing a channel twice throws already_subscribed; a function is onMessage", async () => {
  const t = setup({ transport: "websocket" });
  const got = [];
  const sub = t.client.subscribe("room:1", (m) => got.push(m.offset));
  assert.equal(sub.channel, "room:1");
  assert.throws(() => t.client.subscribe("room:1", () => {}), (e) => e instanceof PushdError && e.code === "already_subscribed");
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 0 });
  ws.frame(msg("room:1", 1));
  assert.deepEqual(got, [1]);
});

test("unsubscribe sends unsubscribe and stops delivery; frames after it are ignored", async () => {
  const t = setup({ transport: "websocket" });
  const r = recorder(t, "room:1");
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 0 });
  r.sub.unsubscribe();
  r.sub.unsubscribe(); // idempotent
  assert.deepEqual(ws.ops("unsubscribe").map((c) => c.channel), ["room:1"]);
  ws.frame(msg("room:1", 1));
  ws.replyTo("unsubscribe", { channel: "room:1" });
  assert.deepEqual(r.offsets(), []);
  assert.deepEqual(t.client.positions(), {});
});

test("join and leave reach the subscription", async () => {
  const t = setup({ transport: "websocket" });
  const r = recorder(t, "room:1");
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 0 });
  ws.frame({ type: "join", channel: "room:1", user: "bob", conn: "n1.2" });
  ws.frame({ type: "leave", channel: "room:1", user: "bob", conn: "n1.2" });
  assert.deepEqual(r.seen.joins, [{ channel: "room:1", user: "bob", conn: "n1.2" }]);
  assert.deepEqual(r.seen.leaves, [{ channel: "room:1", user: "bob", conn: "n1.2" }]);
});

test("a throwing onMessage does not break bookkeeping: no redelivery, later messages still arrive", async (ctx) => {
  ctx.mock.method(console, "error", () => {});
  const t = setup({ transport: "websocket" });
  const seen = [];
  t.client.subscribe("room:1", (m) => {
    seen.push(m.offset);
    if (m.offset === 1) throw new Error("app bug");
  });
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 0 });
  ws.frame(msg("room:1", 1));
  ws.frame(msg("room:1", 1));
  ws.frame(msg("room:1", 2));
  assert.deepEqual(seen, [1, 2]);
  assert.equal(console.error.mock.callCount(), 1);
});

// ---- paced resubscribe ----------------------------------------------------------------------------

/** Whether frames sent at these times (ms) stay within a token bucket of `burst`, refilled at `rate`/s. */
function withinBucket(times, burst, rate) {
  let tokens = burst;
  let last = 0;
  for (const at of times) {
    tokens = Math.min(burst, tokens + ((at - last) * rate) / 1000);
    last = at;
    if (tokens < 1) return false;
    tokens -= 1;
  }
  return true;
}

test("the resubscribe after a welcome sends 64 at once, then 25 per second, in subscribe order", async () => {
  const t = setup({ transport: "websocket" });
  const times = [];
  const send = t.WebSocket.prototype.send;
  t.WebSocket.prototype.send = function (text) {
    times.push(t.clock.now());
    send.call(this, text);
  };
  const channels = Array.from({ length: 128 }, (_, i) => `ch:${i}`);
  for (const ch of channels) t.client.subscribe(ch, () => {});
  const ws = await connected(t, { ping_interval: 3600 });
  const sent = () => ws.ops("subscribe").map((c) => c.channel);
  assert.deepEqual(sent(), channels.slice(0, 64));
  t.clock.advance(999);
  assert.equal(sent().length, 64);
  t.clock.advance(1);
  assert.deepEqual(sent(), channels.slice(0, 89));
  const late = t.client.subscribe("late", () => {}); // joins the end of the queue
  assert.equal(sent().length, 89);
  t.clock.advance(2000);
  assert.deepEqual(sent(), [...channels, "late"], "the rest, then the new one, in order");
  assert.equal(t.clock.timers.size, 2, "no pacing timer left: the heartbeat and stableAfter");
  // With the server's defaults (--rate-burst 100, --rate-limit 50) the bucket never runs dry,
  // even with 35 more commands sent at once.
  assert.ok(withinBucket([...times, ...Array(35).fill(0)].sort((x, y) => x - y), 100, 50));
  assert.equal(withinBucket(Array(129).fill(0), 100, 50), false, "all at once would be closed with 4008");
  // Once the queue is empty, a subscribe goes out at once again.
  late.unsubscribe();
  t.client.subscribe("later", () => {});
  assert.equal(sent().at(-1), "later");
});

test("a channel unsubscribed while it waits in the resubscribe queue is not sent, and the queue dies with the connection", async () => {
  const t = setup({ transport: "websocket", random: () => 0.5 });
  const subs = Array.from({ length: 70 }, (_, i) => t.client.subscribe(`ch:${i}`, () => {}));
  const ws = await connected(t);
  assert.equal(ws.ops("subscribe").length, 64);
  subs[65].unsubscribe();
  assert.equal(ws.ops("unsubscribe").length, 0, "never subscribed on this connection");
  t.clock.advance(1000);
  assert.deepEqual(ws.ops("subscribe").slice(64).map((c) => c.channel), ["ch:64", "ch:66", "ch:67", "ch:68", "ch:69"]);
  // Torn down mid-queue: its timer goes with it, and the next welcome starts a new queue.
  const ws2 = await (async () => {
    ws.serverClose(1006);
    t.clock.advance(250);
    await settle(1);
    return t.ws();
  })();
  ws2.welcome();
  assert.equal(ws2.ops("subscribe").length, 64);
  ws2.serverClose(1006);
  assert.equal(t.clock.timers.size, 1, "only the reconnect timer: no pacing timer left");
  t.clock.advance(1000);
  assert.equal(ws2.ops("subscribe").length, 64, "nothing more on the dead socket");
});

// ---- resets reach the app -------------------------------------------------------------------------

test("every reset is also a client event \"reset\", after the subscription's onReset", async () => {
  const t = setup({ transport: "websocket" });
  const order = [];
  t.client.on("reset", (info) => order.push(["event", info]));
  t.client.subscribe("a", { since: { epoch: "OLD", offset: 2 }, onReset: (info) => order.push(["onReset", info]) });
  t.client.subscribe("b", () => {}); // the shorthand: no onReset
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "a", epoch: "NEW", offset: 5, recovered: false, replayed: 0 }, "a");
  ws.replyTo("subscribe", { channel: "b", epoch: "EB", offset: 0 }, "b");
  ws.frame({ type: "reset", channel: "b", epoch: "EB2", offset: 0 });
  const a = { channel: "a", epoch: "NEW", offset: 5, reason: "not_recovered" };
  const b = { channel: "b", epoch: "EB2", offset: 0, reason: "reset" };
  assert.deepEqual(order, [["onReset", a], ["event", a], ["event", b]]);
});

test("a reset nobody handles is a console warning naming the channel, once per reset", async (ctx) => {
  const warn = ctx.mock.method(console, "warn", () => {});
  const t = setup({ transport: "websocket" });
  t.client.subscribe("room:9", () => {});
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:9", epoch: "E", offset: 3 });
  ws.frame({ type: "reset", channel: "room:9", epoch: "E2", offset: 0 });
  assert.equal(warn.mock.callCount(), 1);
  assert.match(warn.mock.calls[0].arguments[0], /room:9.*reload/);
  ws.frame({ type: "reset", channel: "room:9", epoch: "E3", offset: 0 });
  assert.equal(warn.mock.callCount(), 2);
  // With a handler or a listener, no warning.
  t.client.subscribe("with-handler", { onReset: () => {} });
  ws.replyTo("subscribe", { channel: "with-handler", epoch: "H", offset: 0 }, "with-handler");
  ws.frame({ type: "reset", channel: "with-handler", epoch: "H2", offset: 0 });
  const off = t.client.on("reset", () => {});
  ws.frame({ type: "reset", channel: "room:9", epoch: "E4", offset: 0 });
  assert.equal(warn.mock.callCount(), 2);
  off();
});

// ---- the subscribe retry after "unavailable" --------------------------------------------------------

test("the subscribe retry timer is cleared by unsubscribe and by the end of the connection", async () => {
  const t = setup({ transport: "websocket", random: () => 1, backoff: { base: 100, max: 1000 } });
  const r = recorder(t, "room:1");
  const ws = await connected(t, { ping_interval: 3600 });
  const refuse = () => {
    const cmd = ws.ops("subscribe").at(-1);
    ws.frame({ type: "reply", id: cmd.id, ok: false, error: { code: "unavailable", message: "store down" } });
  };
  const base = t.clock.timers.size; // heartbeat, stableAfter
  refuse();
  assert.equal(t.clock.timers.size, base + 1);
  r.sub.unsubscribe();
  assert.equal(t.clock.timers.size, base, "unsubscribe clears it");
  const r2 = recorder(t, "room:2");
  refuse();
  assert.equal(t.clock.timers.size, base + 1);
  ws.serverClose(1006);
  assert.equal(t.clock.timers.size, 1, "only the reconnect timer: the teardown cleared it");
  assert.equal(r2.seen.errors.length, 0);
});

// ---- a channel subscribed again --------------------------------------------------------------------

test("subscribe, unsubscribe, subscribe again: frames of the old subscription still arriving are not delivered", async () => {
  const t = setup({ transport: "websocket" });
  const old = recorder(t, "room:1");
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 5 });
  ws.frame(msg("room:1", 6));
  old.sub.unsubscribe();
  const again = recorder(t, "room:1");
  assert.deepEqual(ws.sent.slice(-2).map((c) => [c.op, c.since]), [["unsubscribe", undefined], ["subscribe", undefined]]);
  // The node runs the commands in order: frames of the old subscription until its unsubscribe
  // reply, then the new subscribe's reply and its frames.
  ws.frame(msg("room:1", 7));
  ws.frame(msg("room:1", 8));
  ws.frame({ type: "reset", channel: "room:1", epoch: "E2", offset: 0 });
  ws.frame({ type: "join", channel: "room:1", user: "bob", conn: "n1.2" });
  ws.replyTo("unsubscribe", { channel: "room:1" });
  ws.frame(msg("room:1", 9));
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 9 });
  ws.frame(msg("room:1", 9));
  ws.frame(msg("room:1", 10));
  assert.deepEqual(old.offsets(), [6]);
  assert.deepEqual(again.offsets(), [10]);
  assert.deepEqual([again.seen.resets, again.seen.joins], [[], []]);
  assert.deepEqual(again.sub.position, { epoch: "E", offset: 10 });
  assert.equal(t.client.state, "connected", "no gap was seen");
});
