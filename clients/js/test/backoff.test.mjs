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

test("the failure count resets once a connection has stayed up for stableAfter", async () => {
  const t = setup({ transport: "websocket", random: () => 1, backoff: { base: 100, max: 100000 }, stableAfter: 10000 });
  await failInARow(t, 3); // 100, 200, 400; the fourth attempt is now open
  await settle(1);
  t.ws().welcome();
  assert.equal(t.client.state, "connected");
  t.clock.advance(10000);
  t.ws().serverClose(1006);
  assert.equal(t.named("disconnected").at(-1).delay, 100, "back to the first step");
});

test("a connection welcomed and then closed at once does not reset the backoff (1011, 4010, 4008)", async () => {
  const t = setup({ transport: "websocket", random: () => 1, backoff: { base: 100, max: 100000 }, stableAfter: 10000 });
  const delays = [];
  for (const code of [1011, 1011, 4010, 1011, 4010, 4008]) {
    if (delays.length === 0) t.client.connect();
    await settle(1);
    t.ws().welcome();
    t.clock.advance(9999); // up, but not for stableAfter
    t.ws().serverClose(code);
    delays.push(t.named("disconnected").at(-1).delay);
    t.clock.advance(delays.at(-1));
  }
  // 4010 grows from its own 500 ms step; 4008 adds rateLimitedDelay (10000) to the backoff.
  assert.deepEqual(delays, [100, 200, 2000, 800, 8000, 10000 + 3200]);
});

test("the backoff is not reset by a connection torn down before stableAfter", async () => {
  const t = setup({ transport: "websocket", random: () => 1, backoff: { base: 100, max: 100000 }, stableAfter: 10000 });
  await connected(t);
  t.ws().serverClose(1006); // the first failure: 100
  t.clock.advance(100);
  await settle(1);
  t.ws().welcome();
  t.clock.advance(5000);
  t.ws().serverClose(1006);
  assert.equal(t.named("disconnected").at(-1).delay, 200);
  t.clock.advance(200);
  await settle(1);
  t.ws().welcome();
  t.clock.advance(5000); // the torn-down connection's stableAfter would have passed by now
  t.ws().serverClose(1006);
  assert.equal(t.named("disconnected").at(-1).delay, 400);
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
  t.client.connect(); // a no-op while connecting: no new attempt, no event
  await settle(1);
  assert.equal(t.sockets.length, 2);
  assert.equal(t.named("state").length, 3);
  t.ws().welcome();
  t.client.connect(); // a no-op while connected too
  await settle(1);
  assert.equal(t.sockets.length, 2);
  assert.deepEqual(t.named("state").map((e) => [e.state, e.attempt, e.delay]).at(-1), ["connected", 1, null]);
  assert.equal(t.named("state").length, 4);
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
