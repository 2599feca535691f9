import test from "node:test";
import assert from "node:assert/strict";
import { setup, settle, connected } from "./fakes.mjs";

test("reconnect({delay}) drops the connection now and opens the next one after the delay", async () => {
  const t = setup({ url: ["http://a.test", "http://b.test"] });
  t.client.subscribe("a", () => {});
  t.client.connect();
  await connected(t);
  const first = t.sockets.length;
  t.client.reconnect({ delay: 3000 });
  await settle();
  assert.equal(t.client.state, "disconnected");
  const gone = t.named("disconnected").at(-1);
  assert.equal(gone.delay, 3000);
  assert.equal(gone.willReconnect, true);
  t.clock.advance(2999);
  await settle();
  assert.equal(t.sockets.length, first, "nothing opened before the delay");
  t.clock.advance(1);
  await settle();
  assert.equal(t.sockets.length, first + 1, "one new attempt after it");
  assert.equal(t.client.state, "connecting");
});
