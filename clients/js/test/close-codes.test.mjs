import test from "node:test";
import assert from "node:assert/strict";
import { setup, settle, connected } from "./fakes.mjs";

const last = (t, name) => t.named(name).at(-1);

/** A connected client whose server then closes with `code`; random() is 0.5, backoff base 500. */
async function closedWith(code, options = {}) {
  const t = setup({ transport: "websocket", random: () => 0.5, ...options });
  await connected(t);
  t.ws().serverClose(code, `reason ${code}`);
  return t;
}

test("close() closes with 1000, does not reconnect, emits stopped", async () => {
  const t = setup({ transport: "websocket" });
  const ws = await connected(t);
  t.client.close();
  assert.equal(ws.closedByClient, 1000);
  assert.equal(t.client.state, "stopped");
  assert.deepEqual(last(t, "stopped"), { name: "stopped", code: 1000, reason: "closed by the client" });
  assert.equal(last(t, "disconnected").willReconnect, false);
  ws.serverClose(1000); // the echo of our close: nothing
  t.clock.advance(60000);
  await settle(1);
  assert.equal(t.sockets.length, 1);
  assert.equal(t.clock.timers.size, 0, "no timer left behind");
});

for (const code of [1001, 1006, 1011, 1000, 4999]) {
  test(`${code} reconnects with backoff (a failure)`, async () => {
    const t = await closedWith(code);
    const d = last(t, "disconnected");
    assert.deepEqual(d, { name: "disconnected", code, reason: `reason ${code}`, willReconnect: true, delay: 250 });
    assert.equal(t.client.state, "disconnected");
    t.clock.advance(249);
    await settle(1);
    assert.equal(t.sockets.length, 1);
    t.clock.advance(1);
    await settle(1);
    assert.equal(t.sockets.length, 2);
    t.ws().serverClose(1006);
    assert.equal(last(t, "disconnected").delay, 500, "the second failure in a row doubles the window");
  });
}

test("1012 (drain): prompt reconnect within drainJitter, not counted as a failure, next URL", async () => {
  const t = setup({
    url: ["http://a.test", "http://b.test"],
    transport: "websocket",
    random: () => 0.25, // also picks the first URL: floor(0.25 * 2) = 0
    drainJitter: 2000,
    backoff: { base: 1000, max: 30000 },
  });
  t.client.connect();
  await settle(1);
  assert.equal(t.ws().url.host, "a.test");
  t.ws().serverClose(1006); // one failure: 0.25 * 1000
  assert.equal(last(t, "disconnected").delay, 250);
  t.clock.advance(250);
  await settle(1);
  assert.equal(t.ws().url.host, "b.test", "the next URL after a failure");
  t.ws().welcome();
  t.clock.advance(10000); // up for stableAfter: the backoff starts over
  t.ws().serverClose(1012, "server restarting: reconnect");
  assert.equal(last(t, "disconnected").delay, 500, "random() * drainJitter");
  t.clock.advance(500);
  await settle(1);
  assert.equal(t.ws().url.host, "a.test", "the next URL after a drain");
  t.ws().serverClose(1012);
  assert.equal(last(t, "disconnected").delay, 500, "drains do not grow the backoff");
  t.clock.advance(500);
  await settle(1);
  t.ws().serverClose(1006);
  assert.equal(last(t, "disconnected").delay, 250, "first counted failure since the connection was stable");
});

test("4010 (slow consumer): prompt reconnect with small jitter and a replay from the positions", async () => {
  const t = setup({ transport: "websocket", random: () => 0.5 });
  t.client.subscribe("room:1", () => {});
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 8 });
  ws.serverClose(4010, "slow consumer");
  assert.equal(last(t, "disconnected").delay, 250);
  t.clock.advance(250);
  await settle(1);
  t.ws().welcome();
  assert.deepEqual(t.ws().ops("subscribe")[0].since, { epoch: "E", offset: 8 });
});

test("4011 (token expired): a fresh token and an immediate reconnect", async () => {
  let n = 0;
  const t = setup({ transport: "websocket", getToken: async () => `tok-${++n}` });
  t.client.connect();
  await settle(1);
  assert.equal(t.ws().url.searchParams.get("token"), "tok-1");
  t.ws().welcome();
  t.ws().serverClose(4011, "token expired: get a new token");
  assert.equal(last(t, "disconnected").delay, 0);
  await settle(1);
  assert.equal(t.sockets.length, 2, "no timer: at once");
  assert.equal(t.ws().url.searchParams.get("token"), "tok-2");
  // Refused as expired again before any welcome: now it backs off instead of spinning.
  t.ws().open();
  t.ws().serverClose(4011);
  assert.equal(last(t, "disconnected").delay, 250);
});

test("4001 with getToken: one retry with a fresh token; refused again: stopped", async () => {
  let n = 0;
  const t = setup({ transport: "websocket", getToken: async () => `tok-${++n}` });
  t.client.connect();
  await settle(1);
  t.ws().open();
  t.ws().serverClose(4001, "invalid token: InvalidSignature");
  assert.equal(last(t, "disconnected").delay, 0);
  await settle(1);
  assert.equal(t.ws().url.searchParams.get("token"), "tok-2");
  t.ws().open();
  t.ws().serverClose(4001, "invalid token: InvalidSignature");
  assert.equal(t.client.state, "stopped");
  assert.deepEqual(last(t, "stopped"), { name: "stopped", code: 4001, reason: "invalid token: InvalidSignature" });
  t.clock.advance(120000);
  await settle(1);
  assert.equal(t.sockets.length, 2);
});

test("4001 after a welcome had reset the retry: one more fresh token is tried", async () => {
  let n = 0;
  const t = setup({ transport: "websocket", getToken: async () => `tok-${++n}` });
  t.client.connect();
  await settle(1);
  t.ws().open();
  t.ws().serverClose(4001);
  await settle(1);
  t.ws().welcome(); // the fresh token worked
  t.ws().serverClose(4001);
  assert.equal(t.client.state, "connecting", "not stopped: straight into the next attempt");
  assert.equal(t.named("stopped").length, 0);
  await settle(1);
  assert.equal(t.sockets.length, 3);
  assert.equal(t.ws().url.searchParams.get("token"), "tok-3");
});

test("4001 without getToken: stopped at once", async () => {
  const t = await closedWith(4001);
  assert.equal(t.client.state, "stopped");
  assert.deepEqual(last(t, "stopped"), { name: "stopped", code: 4001, reason: "reason 4001" });
});

for (const code of [4003, 4009, 1002, 1003, 1007, 1009]) {
  test(`${code} stops for good; stopped carries code and reason`, async () => {
    const t = await closedWith(code);
    assert.equal(t.client.state, "stopped");
    assert.deepEqual(last(t, "stopped"), { name: "stopped", code, reason: `reason ${code}` });
    assert.deepEqual(last(t, "disconnected"), { name: "disconnected", code, reason: `reason ${code}`, willReconnect: false, delay: null });
    t.clock.advance(600000);
    await settle(1);
    assert.equal(t.sockets.length, 1);
  });
}

test("after a stop, connect() starts again", async () => {
  const t = await closedWith(4009);
  t.client.connect();
  await settle(1);
  assert.equal(t.sockets.length, 2);
  assert.equal(t.client.state, "connecting");
});

test("4008 (rate limited): rateLimitedDelay + jitter, and it counts as a failure", async () => {
  const t = await closedWith(4008, { random: () => 0.5, rateLimitedDelay: 10000 });
  assert.equal(last(t, "disconnected").delay, 10250);
  t.clock.advance(10250);
  await settle(1);
  t.ws().serverClose(1006);
  assert.equal(last(t, "disconnected").delay, 500, "the second failure in a row");
});

test("reconnect() drops the connection and reconnects at once, resubscribing from the positions", async () => {
  const t = setup({ transport: "websocket" });
  t.client.subscribe("room:1", () => {});
  const ws = await connected(t);
  ws.replyTo("subscribe", { channel: "room:1", epoch: "E", offset: 3 });
  t.client.reconnect();
  assert.equal(ws.closedByClient, 1000);
  assert.deepEqual(last(t, "disconnected"), {
    name: "disconnected", code: 1000, reason: "reconnect requested", willReconnect: true, delay: 0,
  });
  await settle(1);
  t.ws().welcome();
  assert.deepEqual(t.ws().ops("subscribe")[0].since, { epoch: "E", offset: 3 });
});
