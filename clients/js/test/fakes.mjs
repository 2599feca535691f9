// Test doubles for the client: a controllable clock, a scripted WebSocket, a fetch() whose
// response body the test streams chunk by chunk, and a window that fires online/offline and
// visibility events. Shared by the *.test.mjs files.

import { Pushd } from "../pushd.js";

/** setTimeout/clearTimeout/now on a clock that moves only when the test says so. */
export class FakeClock {
  constructor() {
    this.t = 0;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.t + Math.max(0, ms || 0), fn, ms });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
    this.now = () => this.t;
  }

  /** Moves the clock, firing due timers in time order (timers set meanwhile included). */
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      let next = null;
      for (const [id, timer] of this.timers) {
        if (timer.at <= end && (!next || timer.at < next[1].at)) next = [id, timer];
      }
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
    }
    this.t = end;
  }
}

/** A WebSocket class whose instances record what the client sends and let the test play the server. */
export function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = new URL(url);
      this.sent = [];
      this.readyState = 0;
      this.closedByClient = null;
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code) {
      this.closedByClient = code ?? 1000;
      this.readyState = 3;
    }
    // The server side:
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    frame(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) });
    }
    welcome(extra = {}) {
      this.open();
      this.frame({ type: "welcome", conn: "n1.1", node: "n1", user: "alice", ping_interval: 25, ...extra });
    }
    /** The server closes (or the network drops, 1006). */
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    /** Commands sent with this op. */
    ops(op) {
      return this.sent.filter((c) => c.op === op);
    }
    /** Answers the last command with this op (and channel) with ok and these fields. */
    replyTo(op, fields = {}, channel) {
      const cmd = this.sent.filter((c) => c.op === op && (channel === undefined || c.channel === channel)).at(-1);
      if (!cmd) throw new Error(`no ${op} command sent`);
      this.frame({ type: "reply", id: cmd.id, ok: true, ...fields });
      return cmd;
    }
  }
  FakeWebSocket.sockets = sockets;
  return FakeWebSocket;
}

/** A fetch() recording each request; the test answers with a stream or an HTTP error. */
export function fakeFetch() {
  const requests = [];
  const fetch = (url, init) =>
    new Promise((resolve, reject) => {
      const req = { url: new URL(url), init, aborted: false, controller: null };
      req.stream = () => {
        const body = new ReadableStream({
          start(c) {
            req.controller = c;
          },
        });
        resolve(new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } }));
        return req;
      };
      req.push = (text) => req.controller.enqueue(new TextEncoder().encode(text));
      req.pushBytes = (bytes) => req.controller.enqueue(bytes);
      req.end = () => req.controller.close();
      req.fail = (status, code, message) => {
        const body = JSON.stringify({ error: { code, message } });
        resolve(new Response(body, { status, headers: { "content-type": "application/json" } }));
      };
      req.networkError = () => reject(new TypeError("Failed to fetch"));
      /** Sends an event the way the server writes it. */
      req.event = (frame, id = "x") => req.push(`id: ${id}\nevent: ${frame.type}\ndata: ${JSON.stringify(frame)}\n\n`);
      req.welcome = (channels = [], extra = {}) =>
        req.event({ type: "welcome", conn: "n1.2", node: "n1", user: "alice", channels, ...extra });
      init.signal?.addEventListener("abort", () => {
        req.aborted = true;
        reject(new DOMException("aborted", "AbortError"));
        try {
          req.controller?.error(new DOMException("aborted", "AbortError"));
        } catch {
          // already closed
        }
      });
      requests.push(req);
    });
  fetch.requests = requests;
  return fetch;
}

/** A window with online/offline and a document with visibilitychange. */
export function fakeWindow() {
  const target = new EventTarget();
  const doc = new EventTarget();
  doc.visibilityState = "visible";
  target.document = doc;
  target.navigator = { onLine: true };
  target.fire = (name) => target.dispatchEvent(new Event(name));
  target.setVisibility = (state) => {
    doc.visibilityState = state;
    doc.dispatchEvent(new Event("visibilitychange"));
  };
  return target;
}

/** Lets fetch responses, stream reads and promise callbacks run. */
export async function settle(rounds = 8) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}

/** random() returning these values in turn, then the last one forever. */
export function randomSeq(...values) {
  let i = 0;
  return () => values[Math.min(i++, values.length - 1)];
}

/**
 * A client wired to fakes; records every event it emits. Options override the defaults
 * (one URL, random 0.5, a fake window).
 */
export function setup(options = {}) {
  const clock = new FakeClock();
  const WebSocket = fakeWebSocketClass();
  const fetch = fakeFetch();
  const win = fakeWindow();
  const client = new Pushd({
    url: "http://node.test:8080",
    WebSocket,
    fetch,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.5,
    window: win,
    ...options,
  });
  const events = [];
  for (const name of ["state", "connected", "disconnected", "stopped", "fallback"]) {
    client.on(name, (e) => events.push({ name, ...e }));
  }
  const named = (name) => events.filter((e) => e.name === name);
  const ws = () => WebSocket.sockets.at(-1);
  return { client, clock, WebSocket, fetch, win, events, named, ws, sockets: WebSocket.sockets };
}

/** Connects and welcomes over WebSocket; flushes the token await first. */
export async function connected(t, welcome = {}) {
  t.client.connect();
  await settle(1);
  t.ws().welcome(welcome);
  return t.ws();
}
