import test from "node:test";
import assert from "node:assert/strict";
import { setup, settle, connected } from "./fakes.mjs";

/** Fails `n` attempts in a row (WebSocket opened, then dropped with 1006), returning each delay. */
async function failInARow(t, n) {
  const delays = [];
  for (let i = 0; i < n; i++) {
    if (i === 0) t.client.connect();
    await settle(1);
    t.ws().open();
    t.ws().serverClose(1006);
    const d = t.named("disconnected").at(-1);
    delays.push(d.delay);
    t.clock.advance(d.delay);
  }
  return delays;
}

test("delay before attempt n is random() * min(max, base * 2^(n-1)), full jitter", async () => {
  const t = setup({ transport: "websocket", random: () => 0.5, backoff: { base: 100, max: 1000 } });
  const delays = await failInARow(t, 6);
  assert.deepEqual(delays, [50, 100, 200, 400, 500, 500]); // 0.5 * 100, 200, 400, 800, then the cap 1000
});

test("full jitter spans [0, cap): random() = 0 retries at once, random() near 1 waits almost the cap", async () => {
  const low = setup({ transport: "websocket", random: () => 0, backoff: { base: 500, max: 30000 } });
  assert.deepEqual(await failInARow(low, 3), [0, 0, 0]);
  const high = setup({ transport: "websocket", random: () => 0.999, backoff: { base: 500, max: 30000 } });
  const delays = await failInARow(high, 8);
  assert.deepEqual(delays.map(Math.round), [500, 999, 1998, 3996, 7992, 15984, 29970, 29970]);
  for (const d of delays) assert.ok(d < 30000);
});

test("default backoff is base 500, max 30000", async () => {
  const t = setup({ transport: "websocket", random: () => 1 });
  const delays = await failInARow(t, 8);
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
});

test("the failure count resets after a welcome", async () => {
  const t = setup({ transport: "websocket", random: () => 1, backoff: { base: 100, max: 100000 } });
  await failInARow(t, 3); // 100, 200, 400; the fourth attempt is now open
  await settle(1);
  t.ws().welcome();
  assert.equal(t.client.state, "connected");
  t.ws().serverClose(1006);
  assert.equal(t.named("disconnected").at(-1).delay, 100, "back to the first step");
});

test("an attempt that reaches no welcome within connectTimeout is abandoned and counts as a failure", async () => {
  const t = setup({ transport: "websocket", random: () => 1, connectTimeout: 5000, backoff: { base: 100, max: 1000 } });
  t.client.connect();
  await settle(1);
  const first = t.ws();
  first.open(); // opened, but no welcome
  t.clock.advance(4999);
  assert.equal(t.client.state, "connecting");
  t.clock.advance(1);
  assert.equal(t.client.state, "disconnected");
  assert.equal(first.closedByClient, 1000, "the abandoned socket is closed");
  const d = t.named("disconnected").at(-1);
  assert.equal(d.reason, "connect timeout");
  assert.equal(d.delay, 100);
  // A late welcome from the abandoned socket is ignored.
  first.frame({ type: "welcome", conn: "x", node: "x", user: "x", ping_interval: 25 });
  assert.equal(t.client.state, "disconnected");
});

test("state events carry the attempt number and the delay", async () => {
  const t = setup({ transport: "websocket", random: () => 1, backoff: { base: 100, max: 1000 } });
  t.client.connect();
  await settle(1);
  t.ws().serverClose(1006);
  t.clock.advance(100);
  await settle(1);
  const states = t.named("state").map((e) => [e.state, e.attempt, e.delay]);
  assert.deepEqual(states, [
    ["connecting", 1, null],
    ["disconnected", 1, 100],
    ["connecting", 2, null],
  ]);
  await connected(t); // the same attempt; connect() is a no-op while connecting
  assert.equal(t.client.state, "connected");
});

test("only one connection at a time: events of an older socket are ignored", async () => {
  const t = setup({ transport: "websocket" });
  const old = await connected(t);
  t.client.reconnect();
  await settle(1);
  assert.equal(t.sockets.length, 2);
  assert.equal(old.closedByClient, 1000);
  old.serverClose(4009, "late kick for the old socket");
  assert.equal(t.client.state, "connecting");
  assert.equal(t.named("stopped").length, 0);
});
