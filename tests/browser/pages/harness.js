// The browser suite's test page. It imports the client module from a pushd node, makes
// clients, and records everything they report, for the tests to read:
//
//   clients[i]           the Pushd instances (clients[0] is also window.client)
//   logs[i].received     every message handed to onMessage: {channel, epoch, offset, event, data, node, t}
//   logs[i].events       every event: {t, name, info}; names are the client's events ("state",
//                        "connected", "disconnected", "stopped", "fallback"), the subscription
//                        callbacks ("subscribed", "reset", "error", "join", "leave") and "getToken"
//   logs[i].tokenCalls   how many times getToken was called
//
// window.received and window.events are client 0's lists.
"use strict";

window.clients = [];
window.logs = [];

const CLIENT_EVENTS = ["state", "connected", "disconnected", "stopped", "fallback"];

// A JSON copy of what a callback received (events may carry objects that cannot be cloned).
function plain(value) {
  if (value instanceof Error) return { name: value.name, code: value.code, message: value.message };
  try {
    return JSON.parse(JSON.stringify(value ?? null));
  } catch (e) {
    return String(value);
  }
}

function record(log, name, info) {
  log.events.push({ t: Date.now(), name, info: plain(info) });
}

const encoder = new TextEncoder();

function base64url(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// An HS256 JWT signed with WebCrypto: {sub, ...claims, exp: now + ttl_s}. The page knows the
// secret only because this is a test; a real app fetches its tokens from its backend.
async function mintToken({ secret, ttl_s, claims }) {
  const header = base64url(encoder.encode(JSON.stringify({ alg: "HS256", typ: "JWT" })));
  const body = { ...claims, exp: Math.floor(Date.now() / 1000) + ttl_s };
  const payload = base64url(encoder.encode(JSON.stringify(body)));
  const key = await crypto.subtle.importKey("raw", encoder.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const signature = await crypto.subtle.sign("HMAC", key, encoder.encode(`${header}.${payload}`));
  return `${header}.${payload}.${base64url(signature)}`;
}

window.harness = {
  // Imports the client module; returns the names it exports.
  async load(moduleUrl) {
    const module = await import(moduleUrl);
    window.Pushd = module.Pushd;
    window.PushdError = module.PushdError;
    return Object.keys(module);
  },

  // new Pushd(options); `token: {secret, ttl_s, claims}` becomes a getToken that mints a fresh
  // token on every call. Returns the client's index.
  create(options = {}) {
    const { token, ...rest } = options;
    const i = clients.length;
    const log = { received: [], events: [], tokenCalls: 0 };
    if (token) {
      rest.getToken = async () => {
        log.tokenCalls += 1;
        record(log, "getToken", { n: log.tokenCalls });
        return mintToken(token);
      };
    }
    const client = new window.Pushd(rest);
    for (const name of CLIENT_EVENTS) client.on(name, (info) => record(log, name, info));
    clients.push(client);
    logs.push(log);
    if (i === 0) {
      window.client = client;
      window.received = log.received;
      window.events = log.events;
    }
    return i;
  },

  // client.subscribe(channel, options) with every callback recorded.
  subscribe(i, channel, options = {}) {
    const client = clients[i];
    const log = logs[i];
    const on = (name) => (info) => record(log, name, { channel, ...plain(info) });
    client.subscribe(channel, {
      ...options,
      onMessage(m) {
        log.received.push({
          channel: m.channel, epoch: m.epoch, offset: m.offset, event: m.event, data: m.data,
          node: client.node, t: Date.now(),
        });
      },
      onSubscribed: on("subscribed"),
      onReset: on("reset"),
      onError: (err) => record(log, "error", { channel, error: plain(err) }),
      onJoin: on("join"),
      onLeave: on("leave"),
    });
  },
};
