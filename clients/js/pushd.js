/**
 * pushd browser client: one dependency-free ES module, served by every node at /client.js.
 *
 *   import { Pushd } from "/client.js";
 *   const client = new Pushd();               // the node this module came from
 *   client.subscribe("room:1", (msg) => console.log(msg.offset, msg.data));
 *   client.connect();
 *
 * It keeps one connection (WebSocket, or a fetch()-streamed SSE fallback), remembers the last
 * position {epoch, offset} handled on every channel, and resubscribes with it after every
 * reconnect, so the node replays what was missed. A message is never delivered twice, out of
 * order or after a silent gap: when the node cannot replay, the app gets a reset event and
 * reloads that channel from its own backend. The wire protocol is docs/PROTOCOL.md.
 */

/** Close codes after which reconnecting cannot help (protocol errors, banned, kicked). */
const STOP_CODES = new Set([1002, 1003, 1007, 1009, 4003, 4009]);
/** Jitter before the prompt reconnect that follows a slow-consumer close or a gap (doubling while it repeats). */
const PROMPT_JITTER = 500;
/** After a fallback to SSE, reconnects keep using SSE this long before trying WebSocket again. */
const SSE_STICKY_MS = 5 * 60 * 1000;
/** "auto" falls back to SSE after this many WebSocket attempts in a row failed before opening. */
const FALLBACK_AFTER = 2;
/**
 * The resubscribe after a welcome is paced to stay inside the node's command rate limit, a
 * token bucket of `--rate-burst` (default 100) refilled at `--rate-limit` per second (default
 * 50); going over it closes the connection with 4008, and the next welcome would do the same.
 * The first 64 go at once (leaving a third of the default burst for the app's calls and
 * heartbeat pings), the rest at 25 per second (half the default refill rate).
 */
const RESUBSCRIBE_BURST = 64;
const RESUBSCRIBE_RATE = 25;
/** The channel name syntax, to name the culprit when an SSE request is refused as bad_channel. */
const CHANNEL_NAME = /^[A-Za-z0-9_.:@/=-]{1,128}$/;

/** An error with a stable `code` (the server's error code, or one of this client's own). */
export class PushdError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = "PushdError";
    this.code = code;
  }
}

/** The client: one connection to one node at a time, any number of channel subscriptions. */
export class Pushd {
  constructor(options = {}) {
    const o = options;
    this._urls = baseUrls(o.url);
    this._mode = o.transport ?? "auto";
    if (!["auto", "websocket", "sse"].includes(this._mode)) {
      throw new PushdError("bad_request", `transport must be "auto", "websocket" or "sse", not ${this._mode}`);
    }
    this._getToken = o.getToken ?? null;
    this._user = o.user ?? null;
    this._backoff = { base: o.backoff?.base ?? 500, max: o.backoff?.max ?? 30000 };
    this._connectTimeout = o.connectTimeout ?? 10000;
    this._stableAfter = o.stableAfter ?? 10000;
    this._drainJitter = o.drainJitter ?? 2000;
    this._rateLimitedDelay = o.rateLimitedDelay ?? 10000;
    this._grace = o.heartbeatGrace ?? 10000;
    this._pingMs = (o.pingInterval ?? 25) * 1000; // when a welcome does not say its ping_interval
    this._initial = new Map(Object.entries(o.positions ?? {}));
    // Test seams. Globals are wrapped, not stored: browsers refuse `this`-less host methods.
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    this._fetch = o.fetch ?? ((url, init) => globalThis.fetch(url, init));
    this._setTimeout = o.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    this._clearTimeout = o.clearTimeout ?? ((t) => globalThis.clearTimeout(t));
    this._random = o.random ?? Math.random;
    this._now = o.now ?? Date.now;
    this._window = o.window !== undefined ? o.window : typeof window === "undefined" ? null : window;

    this._listeners = new Map(); // event name -> Set of functions
    this._subs = new Map(); // channel -> Subscription, in subscribe order (the SSE cursor order)
    this._calls = new Map(); // command id -> reply handler, on the current connection
    this._waiting = new Set(); // calls made while not connected
    this._nextId = 1;
    this._conn = null; // the current Attempt; anything from an older one is ignored
    this._state = "idle";
    this._transport = null;
    this._failures = 0; // consecutive failed attempts: the backoff exponent
    this._wsUnopened = 0; // consecutive WebSocket attempts that failed before opening
    this._urlIndex = Math.floor((this._urls.length > 1 ? this._random() : 0) * this._urls.length);
    this._retryTimer = null;
    this._wait = null; // what the client waits on while disconnected: {code, reason, at, rateLimited}
    this._tokenRetried = false; // a token was fetched again after 4001/4011 and not yet welcomed
    this._sseUntil = -Infinity; // until then, "auto" goes straight to SSE
    this._offline = false;
    this._parked = false; // SSE with no channel to stream: waits for a subscribe
    this._restartQueued = false;
    this._unlisten = null;
    this.node = null;
    this.conn = null;
    this.userId = null;
  }

  get state() {
    return this._state;
  }

  get transport() {
    return this._transport;
  }

  // ---- events -------------------------------------------------------------------------------

  /** Adds an event listener; returns a function that removes it. */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
  }

  /** Calls listeners; one that throws is reported and does not stop the others or the client. */
  _emit(name, payload) {
    for (const fn of [...(this._listeners.get(name) ?? [])]) safeCall(fn, payload);
  }

  /** Every state change is an event, so a UI can show it; `attempt` counts from 1 while connecting. */
  _setState(state, { code = null, reason = null, delay = null } = {}) {
    this._state = state;
    const attempt = state === "connecting" ? this._failures + 1 : this._failures;
    this._emit("state", { state, transport: this._transport, node: this.node, code, reason, attempt, delay });
  }

  // ---- lifecycle ----------------------------------------------------------------------------

  /** Starts connecting (also after close() or a stop). A no-op while connecting or connected. */
  connect() {
    if (this._state === "connecting" || this._state === "connected") return;
    if (this._state === "idle" || this._state === "stopped") {
      this._failures = 0;
      this._wsUnopened = 0;
      this._tokenRetried = false;
    }
    this._open();
  }

  /** Stops for good: closes the connection with 1000 and rejects every pending call ("closed"). */
  close() {
    this._halt(1000, "closed by the client", "closed");
  }

  /**
   * Drops the current connection and reconnects after `delay` ms (default: at once), without
   * backoff and on the next URL: for an app that knows its network changed, or a demo that
   * shows what a drop replays.
   */
  reconnect({ delay = 0 } = {}) {
    if (this._state === "idle" || this._state === "stopped") return this.connect();
    this._teardown("disconnected");
    this._clearRetry();
    this._retry(1000, "reconnect requested", delay);
  }

  /** Each subscribed channel's position, to persist (e.g. in sessionStorage) and pass back as `positions`. */
  positions() {
    const out = {};
    for (const [channel, sub] of this._subs) if (sub._pos) out[channel] = { ...sub._pos };
    return out;
  }

  /**
   * Starts one connection attempt on the chosen transport, after fetching a fresh token.
   * getToken() gets connectTimeout to answer; the socket or request then gets connectTimeout
   * of its own to reach the welcome.
   */
  async _open() {
    this._teardown("disconnected");
    this._clearRetry();
    this._wait = null;
    this._parked = false;
    this._listen();
    if (this._isOffline()) return this._retry(1006, "the browser is offline", 0);
    const conn = this._begin(this._pickTransport(), this._urls[this._urlIndex]);
    this._setState("connecting");
    if (this._conn !== conn) return;
    this._arm(conn, "getToken timed out");
    try {
      // Awaited even without getToken, so subscribe() calls made in the same tick are included.
      conn.token = this._getToken ? await this._getToken() : await undefined;
    } catch (e) {
      if (this._conn === conn) this._ended(conn, 1006, `getToken failed: ${e?.message ?? e}`, false);
      return;
    }
    if (this._conn === conn) this._start(conn);
  }

  /** A new attempt; it becomes the only one whose events count. */
  _begin(kind, base) {
    const conn = new Attempt(kind, base, this._now());
    this._conn = conn;
    this._transport = kind;
    return conn;
  }

  /** The token is there: open the socket or request, with connectTimeout to reach the welcome. */
  _start(conn) {
    conn.ready = true;
    this._arm(conn, "connect timeout");
    if (conn.kind === "websocket") this._openWebSocket(conn);
    else this._openSse(conn);
  }

  /** (Re)starts the timer that ends the attempt as a failure unless it is welcomed first. */
  _arm(conn, reason) {
    this._clearTimeout(conn.connectTimer);
    conn.connectTimer = this._setTimeout(() => this._ended(conn, 1006, reason), this._connectTimeout);
  }

  /** "auto" tries WebSocket first, except shortly after a fallback proved it blocked. */
  _pickTransport() {
    if (this._mode !== "auto") return this._mode;
    if (!this._WebSocket || this._now() < this._sseUntil) return "sse";
    return "websocket";
  }

  /**
   * Closes the current attempt or connection, if any: its socket or stream and its timers.
   * Calls waiting for a reply on it reject with `lost` ("disconnected" or "closed"); a publish
   * that may have been stored rejects with "outcome_unknown" instead.
   */
  _teardown(lost) {
    const conn = this._conn;
    if (!conn) return;
    this._conn = null;
    for (const timer of [conn.connectTimer, conn.beatTimer, conn.paceTimer, conn.stableTimer]) this._clearTimeout(timer);
    conn.pace = [];
    for (const sub of this._subs.values()) this._clearSubRetry(sub);
    if (conn.ws) {
      conn.ws.onopen = conn.ws.onmessage = conn.ws.onclose = conn.ws.onerror = null;
      try {
        conn.ws.close(1000);
      } catch {
        // already closing
      }
    }
    conn.abort?.();
    const calls = [...this._calls.values()];
    this._calls.clear();
    for (const call of calls) call.lost(lost);
  }

  /**
   * The attempt or connection ended (close code, SSE close event, failure or local decision).
   * In "auto" mode, the second WebSocket in a row that fails before opening falls back to SSE
   * at once; otherwise the close-code policy decides between a reconnect (when) and a stop.
   */
  _ended(conn, code, reason, mayFallBack = true) {
    if (conn !== this._conn) return;
    if (mayFallBack && this._failedBeforeOpen(conn) && ++this._wsUnopened >= FALLBACK_AFTER) {
      return this._fallBack(conn);
    }
    this._teardown("disconnected");
    const delay = this._policy(code);
    if (delay === null) this._halt(code, reason, "closed");
    else this._retry(code, reason, delay);
  }

  /** A WebSocket of "auto" mode that had its token but never opened (refused, blocked, down). */
  _failedBeforeOpen(conn) {
    return this._mode === "auto" && conn.kind === "websocket" && conn.ready && !conn.opened;
  }

  /** Replaces a WebSocket that would not open with SSE at the same URL, with the same token. */
  _fallBack(ws) {
    this._teardown("disconnected");
    const sse = this._begin("sse", ws.base);
    sse.token = ws.token;
    sse.fallback = true;
    this._start(sse);
  }

  /** What a close code means: ms until the next attempt, or null to stop. See the README's table. */
  _policy(code) {
    if (STOP_CODES.has(code)) return null;
    if (code === 4001 || code === 4011) return this._tokenPolicy(code);
    if (code === 1012) return this._random() * this._drainJitter;
    if (code === 4010) return this._failure(0, PROMPT_JITTER);
    if (code === 4008) return this._failure(this._rateLimitedDelay);
    return this._failure(0);
  }

  /**
   * 4001 (token refused) and 4011 (token expired). The first one since the last welcome gets
   * an immediate retry with a fresh token. Without getToken a 4001 cannot get better: stop.
   * After that retry, a 4001 again stops, and a 4011 again backs off.
   */
  _tokenPolicy(code) {
    const freshTokenMayHelp = code === 4011 || this._getToken !== null;
    if (freshTokenMayHelp && !this._tokenRetried) {
      this._tokenRetried = true;
      return 0;
    }
    if (code === 4001) return null;
    return this._failure(0);
  }

  /** Counts a failure; full jitter: random() * min(max, base * 2^(n-1)), plus `extra`. */
  _failure(extra, base = this._backoff.base) {
    this._failures += 1;
    return extra + this._random() * Math.min(this._backoff.max, base * 2 ** (this._failures - 1));
  }

  /** Goes "disconnected" and schedules the next attempt on the next URL (none while offline). */
  _retry(code, reason, delay) {
    this._urlIndex = (this._urlIndex + 1) % this._urls.length;
    const at = delay === null ? null : this._now() + delay;
    this._wait = { code, reason, at, rateLimited: code === 4008 };
    if (this._isOffline()) delay = null;
    this._setState("disconnected", { code, reason, delay });
    this._emit("disconnected", { code, reason, willReconnect: true, delay });
    if (this._state !== "disconnected" || delay === null) return;
    this._schedule(delay);
  }

  /** Opens the next attempt after `delay` ms (0: now), replacing any pending one. */
  _schedule(delay) {
    this._clearRetry();
    if (delay === 0) return void this._open();
    this._retryTimer = this._setTimeout(() => {
      this._retryTimer = null;
      this._open();
    }, delay);
  }

  _clearRetry() {
    if (this._retryTimer !== null) this._clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  /** Stops for good (close(), or a close code that forbids reconnecting). */
  _halt(code, reason, lost) {
    const was = this._state;
    this._teardown(lost);
    this._clearRetry();
    this._wait = null;
    this._parked = false;
    this._unlisten?.();
    this._unlisten = null;
    for (const call of [...this._waiting]) this._unwait(call, new PushdError("closed", "the client is stopped"));
    if (was === "stopped") return;
    if (was !== "idle") this._emit("disconnected", { code, reason, willReconnect: false, delay: null });
    this._setState("stopped", { code, reason });
    this._emit("stopped", { code, reason });
  }

  // ---- browser signals ----------------------------------------------------------------------

  /**
   * Follows the browser's online/offline and visibility events: no retries while offline; when
   * the network comes back or the page is looked at again, the pending wait is cut short,
   * except a rate-limit back-off (4008, SSE 429), which the node asked for.
   */
  _listen() {
    const win = this._window;
    if (this._unlisten || !win?.addEventListener) return;
    this._offline = false; // events missed while not listening: navigator.onLine tells from now on
    const doc = win.document?.addEventListener ? win.document : win;
    const online = () => {
      this._offline = false;
      this._cameOnline();
    };
    const offline = () => {
      this._offline = true;
      this._wentOffline();
    };
    const visibility = () => {
      const visible = (win.document ?? win).visibilityState !== "hidden";
      if (visible && this._state === "disconnected" && this._retryTimer !== null && !this._wait?.rateLimited) {
        this._schedule(0);
      }
    };
    win.addEventListener("online", online);
    win.addEventListener("offline", offline);
    doc.addEventListener("visibilitychange", visibility);
    this._unlisten = () => {
      win.removeEventListener("online", online);
      win.removeEventListener("offline", offline);
      doc.removeEventListener("visibilitychange", visibility);
    };
  }

  _isOffline() {
    return this._offline || this._window?.navigator?.onLine === false;
  }

  /** Abandons an attempt in progress or a pending retry; an open connection is left to its heartbeat. */
  _wentOffline() {
    if (this._state === "connecting") {
      this._teardown("disconnected");
      this._retry(1006, "the browser is offline", null);
    } else if (this._state === "disconnected" && this._retryTimer !== null) {
      this._clearRetry();
      this._setState("disconnected", { code: 1006, reason: "the browser is offline" });
      this._emit("disconnected", { code: 1006, reason: "the browser is offline", willReconnect: true, delay: null });
    }
  }

  /**
   * The network is back: try again soon, after random() * backoff.base (clients that went
   * offline together do not all come back in the same millisecond), or at the end of a
   * rate-limit back-off.
   */
  _cameOnline() {
    if (this._state !== "disconnected" || this._parked) return;
    const wait = this._wait;
    const delay = wait?.rateLimited && wait.at !== null ? Math.max(0, wait.at - this._now()) : this._random() * this._backoff.base;
    this._setState("disconnected", { code: wait?.code ?? null, reason: wait?.reason ?? null, delay });
    if (this._state === "disconnected") this._schedule(delay);
  }

  // ---- WebSocket ----------------------------------------------------------------------------

  _openWebSocket(conn) {
    let ws;
    try {
      ws = new this._WebSocket(endpoint(conn.base, "/ws", this._authParams(conn.token)));
    } catch (e) {
      return this._ended(conn, 1006, `WebSocket failed: ${e?.message ?? e}`);
    }
    conn.ws = ws;
    ws.onopen = () => {
      conn.opened = true;
      this._wsUnopened = 0;
    };
    ws.onmessage = (e) => this._receive(conn, e.data);
    ws.onclose = (e) => this._ended(conn, e.code, e.reason);
  }

  /** ?token= and, for dev mode, ?user= (both transports put them in the URL: browsers cannot set headers). */
  _authParams(token) {
    const params = [];
    if (token != null) params.push(["token", token]);
    if (this._user != null) params.push(["user", this._user]);
    return params;
  }

  /** One WebSocket text frame. */
  _receive(conn, text) {
    if (conn !== this._conn) return;
    conn.rx += 1;
    conn.lastRx = this._now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // not JSON: nothing this client can act on
    }
    this._frame(conn, frame);
  }

  /** Sends one command with a fresh id; `handler` gets the reply, or `lost` if the connection ends first. */
  _command(conn, cmd, handler) {
    this._send(conn, JSON.stringify(cmd), handler);
  }

  /** Sends a command serialised without its id (`{"op":...}`); the id goes in front. */
  _send(conn, json, handler) {
    const id = this._nextId++;
    this._calls.set(id, handler);
    try {
      conn.ws.send(`{"id":${id},${json.slice(1)}`);
    } catch (e) {
      this._calls.delete(id);
      throw e;
    }
  }

  // ---- server frames (both transports) -------------------------------------------------------

  _frame(conn, f) {
    switch (f?.type) {
      case "welcome":
        return this._welcome(conn, f);
      case "reply":
        return this._reply(f);
      case "message":
        return this._message(conn, f);
      case "reset":
        return this._reset(conn, f);
      case "join":
      case "leave":
        return this._presenceEvent(conn, f);
      case "close": // SSE's last event: the same codes as a WebSocket close
        return this._ended(conn, f.code, f.reason, false);
    }
  }

  /**
   * The node accepted the connection. The steps come in this order on purpose:
   * 1. the bookkeeping (timers, node, conn, userId), so that everything after it, app
   *    callbacks included, sees this connection's values;
   * 2. the resubscribe (WebSocket), before any app callback: a subscribe() made from a "state"
   *    or "connected" listener then joins the end of its queue, instead of going out twice or
   *    ahead of the channels subscribed before it;
   * 3. the events; a listener may close or replace the connection, so each later step checks;
   * 4. the subscribe replies the SSE welcome carries, so onSubscribed and onReset come after
   *    "connected", as on WebSocket, where the replies arrive later;
   * 5. the calls made while not connected, last: the subscribes that restore delivery take
   *    the first places in the node's command budget.
   */
  _welcome(conn, f) {
    if (conn.welcomed) return;
    this._accept(conn, f);
    if (conn.kind === "websocket") this._resubscribeAll(conn);
    this._beat(conn);
    if (!this._announce(conn)) return;
    if (conn.kind === "sse") this._sseReplies(conn, f.channels ?? []);
    this._flushWaiting(conn);
  }

  /**
   * Records the welcome. The backoff is reset only once the connection has stayed up for
   * stableAfter (a node that accepts and then closes at once must not be retried at the first
   * backoff step forever); the fresh-token retry is allowed again at once, the token worked.
   */
  _accept(conn, f) {
    conn.welcomed = true;
    this._clearTimeout(conn.connectTimer);
    this._tokenRetried = false;
    conn.stableTimer = this._setTimeout(() => {
      this._failures = 0;
    }, this._stableAfter);
    conn.pingMs = f.ping_interval > 0 ? f.ping_interval * 1000 : this._pingMs;
    this.node = f.node ?? null;
    this.conn = f.conn ?? null;
    this.userId = f.user ?? null;
    if (conn.fallback) this._sseUntil = this._now() + SSE_STICKY_MS;
  }

  /** "connected" (and "fallback"); false if a listener ended or replaced the connection. */
  _announce(conn) {
    this._setState("connected");
    if (this._conn === conn && conn.fallback) this._emit("fallback", { from: "websocket", to: "sse" });
    if (this._conn === conn) this._emit("connected", { transport: conn.kind, node: this.node, conn: this.conn, user: this.userId });
    return this._conn === conn;
  }

  _sseReplies(conn, replies) {
    for (const reply of replies) {
      if (this._conn !== conn) return;
      this._subscribed(conn, conn.sent.get(reply.channel), reply);
    }
  }

  /** Sends the calls made while not connected; one that cannot be sent rejects, the others go on. */
  _flushWaiting(conn) {
    for (const call of [...this._waiting]) {
      if (this._conn !== conn) return;
      this._unwait(call);
      this._trySendCall(conn, call);
    }
  }

  /** Replies are matched by id: other frames may come between a command and its reply. */
  _reply(f) {
    const handler = f.id == null ? undefined : this._calls.get(f.id);
    if (!handler) return; // a heartbeat ping's reply, or one from an unsubscribe we no longer track
    this._calls.delete(f.id);
    handler.reply(f);
  }

  /**
   * A message: delivered only if it is the next offset of a channel confirmed on this connection.
   * At or below the position it is a duplicate and dropped. Above the next offset it is a gap:
   * never delivered; the connection is dropped so the resubscribe with `since` replays it.
   */
  _message(conn, f) {
    const sub = this._subs.get(f.channel);
    if (!sub || sub._live !== conn || typeof f.offset !== "number") return;
    const pos = sub._pos;
    if (f.offset <= pos.offset) return;
    if (f.offset !== pos.offset + 1) {
      return this._ended(conn, 4010, `missed messages on ${f.channel}: reconnecting to replay`, false);
    }
    sub._pos = { epoch: pos.epoch, offset: f.offset };
    const msg = { channel: f.channel, epoch: pos.epoch, offset: f.offset, event: f.event, data: f.data };
    safeCall(sub._handlers.onMessage, msg);
  }

  /** The channel's history was lost: new position, and the app must reload the channel. */
  _reset(conn, f) {
    const sub = this._subs.get(f.channel);
    if (!sub || sub._live !== conn) return;
    sub._pos = { epoch: f.epoch, offset: f.offset };
    this._tellReset(sub, { channel: f.channel, epoch: f.epoch, offset: f.offset, reason: "reset" });
  }

  /**
   * A reset reaches the subscription's onReset and the client's "reset" listeners. With
   * neither, the console says so: messages may be missing and nobody reloads the channel.
   */
  _tellReset(sub, info) {
    const handler = sub._handlers.onReset;
    const listened = (this._listeners.get("reset")?.size ?? 0) > 0;
    safeCall(handler, { ...info });
    this._emit("reset", { ...info });
    if (!handler && !listened) {
      console.warn(`pushd: channel ${info.channel} was reset (${info.reason}): messages may be missing; the app must reload it (pass onReset, or listen to "reset")`);
    }
  }

  _presenceEvent(conn, f) {
    const sub = this._subs.get(f.channel);
    if (!sub || sub._live !== conn) return;
    const fn = f.type === "join" ? sub._handlers.onJoin : sub._handlers.onLeave;
    safeCall(fn, { channel: f.channel, user: f.user, conn: f.conn });
  }

  // ---- subscriptions ------------------------------------------------------------------------

  /** Subscribes a channel; `handlers` is a function (onMessage) or an object of callbacks and `since`. */
  subscribe(channel, handlers = {}) {
    if (typeof channel !== "string") throw new TypeError("subscribe(channel): channel must be a string");
    if (typeof handlers === "function") handlers = { onMessage: handlers };
    if (this._subs.has(channel)) {
      throw new PushdError("already_subscribed", `already subscribed to ${channel}`);
    }
    const since = handlers.since ?? this._initial.get(channel) ?? null;
    if (since && (typeof since.epoch !== "string" || !Number.isInteger(since.offset))) {
      throw new PushdError("bad_request", "since must be {epoch: string, offset: integer}");
    }
    this._initial.delete(channel);
    const sub = new Subscription(this, channel, handlers, since && { epoch: since.epoch, offset: since.offset });
    this._subs.set(channel, sub);
    const conn = this._conn;
    if (conn?.welcomed && conn.kind === "websocket") this._subscribeNow(conn, sub);
    else if (conn?.kind === "sse" || this._parked) this._sseChanged();
    return sub;
  }

  /** A subscribe while connected: at once, or at the end of a resubscribe still being paced. */
  _subscribeNow(conn, sub) {
    if (conn.pace.length) conn.pace.push(sub);
    else this._sendSubscribe(conn, sub);
  }

  /** Forgets the channel at once (so it may be subscribed again), then tells the node. */
  _unsubscribe(sub) {
    if (this._subs.get(sub.channel) !== sub) return;
    this._forget(sub);
    const conn = this._conn;
    if (conn?.kind === "sse") return this._sseChanged();
    if (conn && sub._sentOn === conn) {
      this._command(conn, { op: "unsubscribe", channel: sub.channel }, { reply() {}, lost() {} });
    }
  }

  _forget(sub) {
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
    this._clearSubRetry(sub);
  }

  /** Resubscribes every channel after a welcome, in subscribe order: a burst, then paced. */
  _resubscribeAll(conn) {
    conn.pace = [...this._subs.values()];
    this._pace(conn, RESUBSCRIBE_BURST);
  }

  /** Sends up to `n` queued subscribes; the rest wait a second for the next RESUBSCRIBE_RATE. */
  _pace(conn, n) {
    conn.paceTimer = null;
    for (let sent = 0; sent < n && conn.pace.length; ) {
      const sub = conn.pace.shift();
      if (this._subs.get(sub.channel) !== sub) continue; // unsubscribed while it waited
      this._sendSubscribe(conn, sub);
      sent += 1;
    }
    if (conn.pace.length) conn.paceTimer = this._setTimeout(() => this._pace(conn, RESUBSCRIBE_RATE), 1000);
  }

  /** Sends a (re)subscribe, with `since` = the stored position when there is one. */
  _sendSubscribe(conn, sub) {
    const since = sub._pos;
    const cmd = { op: "subscribe", channel: sub.channel };
    if (since) cmd.since = { ...since };
    sub._sentOn = conn;
    this._command(conn, cmd, { reply: (r) => this._subscribed(conn, { sub, since }, r), lost() {} });
  }

  /**
   * A subscribe reply. `recovered: true`: the position stays, the replay follows. Otherwise the
   * reply's position is stored, and `recovered: false` (a position was sent but cannot be
   * resumed) reaches the app as a reset.
   */
  _subscribed(conn, sent, r) {
    const sub = sent?.sub;
    if (!sub || this._subs.get(sub.channel) !== sub) return; // unsubscribed meanwhile
    if (!r.ok) return this._refused(conn, sub, r.error);
    sub._live = conn;
    sub._retries = 0;
    if (r.recovered !== true || !sent.since) sub._pos = { epoch: r.epoch, offset: r.offset };
    const info = { channel: sub.channel, epoch: r.epoch, offset: r.offset, recovered: r.recovered, replayed: r.replayed };
    safeCall(sub._handlers.onSubscribed, info);
    if (r.recovered === false && sent.since) {
      this._tellReset(sub, { channel: sub.channel, epoch: r.epoch, offset: r.offset, reason: "not_recovered" });
    }
  }

  /** A refused subscribe: "unavailable" is retried after a backoff; any other refusal drops it. */
  _refused(conn, sub, error) {
    const code = error?.code ?? "error";
    if (code === "unavailable" && conn.kind === "websocket") {
      sub._retries += 1;
      const { base, max } = this._backoff;
      const delay = this._random() * Math.min(max, base * 2 ** (sub._retries - 1));
      this._clearSubRetry(sub);
      sub._retryTimer = this._setTimeout(() => {
        sub._retryTimer = null;
        if (this._conn === conn && this._subs.get(sub.channel) === sub) this._sendSubscribe(conn, sub);
      }, delay);
      return;
    }
    this._drop(sub, new PushdError(code, error?.message));
  }

  _clearSubRetry(sub) {
    if (sub._retryTimer !== null) this._clearTimeout(sub._retryTimer);
    sub._retryTimer = null;
  }

  /** A refused subscription is forgotten; the app hears why (or the console does, without onError). */
  _drop(sub, err) {
    this._forget(sub);
    if (sub._handlers.onError) safeCall(sub._handlers.onError, err);
    else report(err);
  }

  // ---- calls --------------------------------------------------------------------------------

  /** Publishes on the socket (the token needs `pubs`). Resolves to the stored position. */
  publish(channel, data, { event, idempotencyKey } = {}) {
    const cmd = { op: "publish", channel, data };
    if (event) cmd.event = event;
    if (idempotencyKey) cmd.idempotency_key = idempotencyKey;
    return this._call(cmd, (r) => ({ channel: r.channel, epoch: r.epoch, offset: r.offset }));
  }

  /** Connections subscribed to a channel, across the cluster. */
  presence(channel) {
    const shape = (r) => (r.clients ?? []).map(({ user, conn, node }) => ({ user, conn, node }));
    return this._call({ op: "presence", channel }, shape);
  }

  /** A channel's stored messages, oldest first: the newest `limit`, or those after offset `since`. */
  history(channel, { limit, since } = {}) {
    const cmd = { op: "history", channel };
    if (limit != null) cmd.limit = limit;
    if (since != null) cmd.since = typeof since === "object" ? since.offset : since;
    const shape = (r) => ({ channel: r.channel, epoch: r.epoch, top: r.top, publications: r.publications ?? [] });
    return this._call(cmd, shape);
  }

  /** A round trip to the node, in ms. */
  ping() {
    return this._call({ op: "ping" }, (r, sentAt) => this._now() - sentAt);
  }

  /**
   * Sends a command now if connected over WebSocket, or when the next connection is up. It is
   * serialised here, so a value JSON cannot carry (a BigInt, a cycle) rejects at once.
   */
  _call(cmd, shape) {
    return new Promise((resolve, reject) => {
      if (this._state === "stopped") return reject(new PushdError("closed", "the client is stopped"));
      if (this._mode === "sse") return reject(notSupported(cmd.op));
      let json;
      try {
        json = JSON.stringify(cmd);
      } catch (e) {
        return reject(new PushdError("bad_request", `${cmd.op}: cannot be sent as JSON: ${e?.message ?? e}`));
      }
      const call = { op: cmd.op, json, shape, resolve, reject, timer: null };
      const conn = this._conn;
      if (conn?.welcomed) return this._trySendCall(conn, call);
      call.timer = this._setTimeout(() => {
        this._unwait(call, new PushdError("unavailable", `no connection within ${this._connectTimeout} ms`));
      }, this._connectTimeout);
      this._waiting.add(call);
    });
  }

  _unwait(call, err) {
    this._waiting.delete(call);
    this._clearTimeout(call.timer);
    if (err) call.reject(err);
  }

  /** Sends a call; if the socket refuses it, the call rejects and nothing is thrown. */
  _trySendCall(conn, call) {
    try {
      this._sendCall(conn, call);
    } catch (e) {
      call.reject(new PushdError("disconnected", `${call.op} could not be sent: ${e?.message ?? e}`));
    }
  }

  _sendCall(conn, call) {
    if (conn.kind !== "websocket") return call.reject(notSupported(call.op));
    const sentAt = this._now();
    const publish = call.op === "publish";
    this._send(conn, call.json, {
      reply: (r) => {
        if (r.ok) call.resolve(call.shape(r, sentAt));
        else call.reject(new PushdError(r.error?.code ?? "error", r.error?.message));
      },
      lost: (code) => {
        if (publish && code === "disconnected") {
          call.reject(new PushdError("outcome_unknown", "the connection dropped before the reply: the message may have been stored; retry with the same idempotencyKey"));
        } else {
          call.reject(new PushdError(code, `the connection ${code === "closed" ? "was closed" : "dropped"} before the reply`));
        }
      },
    });
  }

  // ---- heartbeat ----------------------------------------------------------------------------

  /**
   * Notices a dead connection (browsers hide WebSocket pings from scripts). WebSocket: quiet for
   * ping_interval -> send {"op":"ping"}; still nothing heartbeatGrace later -> dead. SSE: the
   * server writes ": ping" every ping_interval (from the welcome; the pingInterval option for
   * nodes that do not say); nothing for that + heartbeatGrace -> dead. The timer is re-armed
   * from the last arrival, not reset per frame.
   */
  _beat(conn) {
    if (conn !== this._conn) return;
    const quiet = this._now() - conn.lastRx;
    const again = (ms) => {
      conn.beatTimer = this._setTimeout(() => this._beat(conn), ms);
    };
    if (conn.kind === "sse") {
      const limit = conn.pingMs + this._grace;
      return quiet >= limit ? this._ended(conn, 1006, "heartbeat timeout", false) : again(limit - quiet);
    }
    if (conn.probe) {
      if (conn.rx === conn.probe.rx) {
        const waited = this._now() - conn.probe.at;
        return waited >= this._grace ? this._ended(conn, 1006, "heartbeat timeout", false) : again(this._grace - waited);
      }
      conn.probe = null;
    }
    if (quiet < conn.pingMs) return again(conn.pingMs - quiet);
    conn.probe = { rx: conn.rx, at: this._now() };
    conn.ws.send('{"op":"ping"}');
    again(this._grace);
  }

  // ---- SSE ----------------------------------------------------------------------------------

  /**
   * Opens a fetch()-streamed SSE request for every subscribed channel, resuming each from its
   * position (EventSource can neither show ": ping" and HTTP statuses nor take our cursor).
   */
  async _openSse(conn) {
    const subs = [...this._subs.values()];
    if (!subs.length) return this._park(conn);
    conn.channels = subs.map((s) => s.channel);
    conn.sent = new Map(subs.map((s) => [s.channel, { sub: s, since: s._pos }]));
    const params = [...conn.channels.map((c) => ["channel", c]), ...this._authParams(conn.token)];
    const cursor = sseCursor(subs.map((s) => s._pos));
    if (cursor) params.push(["since", cursor]);
    const ctl = new AbortController();
    conn.abort = () => ctl.abort();
    let res;
    try {
      const init = { signal: ctl.signal, headers: { accept: "text/event-stream" }, cache: "no-store" };
      res = await this._fetch(endpoint(conn.base, "/sse", params), init);
    } catch (e) {
      return this._ended(conn, 1006, `SSE request failed: ${e?.message ?? e}`);
    }
    if (conn !== this._conn) return;
    if (!res.ok) return this._sseRefused(conn, res);
    if (!res.body) return this._ended(conn, 1006, "the SSE response has no body");
    conn.opened = true;
    await this._readStream(conn, res.body);
  }

  /** Reads the stream chunk by chunk; events are handled in order, synchronously, as they parse. */
  async _readStream(conn, body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    const feed = eventStreamParser((name, data) => {
      if (conn !== this._conn) return;
      let frame;
      try {
        frame = JSON.parse(data);
      } catch {
        return;
      }
      this._frame(conn, frame);
    });
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (conn !== this._conn) break;
        if (done) return this._ended(conn, 1006, "the stream ended");
        conn.rx += 1;
        conn.lastRx = this._now();
        feed(decoder.decode(value, { stream: true }));
        if (conn !== this._conn) break; // an event ended it (close, gap)
      }
    } catch (e) {
      if (conn === this._conn) return this._ended(conn, 1006, `the stream failed: ${e?.message ?? e}`);
    }
    reader.cancel().catch(() => {});
  }

  /**
   * An HTTP refusal, mapped onto the close-code policy. Refused channels (403 forbidden naming
   * one, 400 bad_channel, 400 too_many_channels) get their onError and are dropped, and the
   * rest restart at once; any other refusal is a failure with backoff.
   */
  async _sseRefused(conn, res) {
    let error = null;
    try {
      error = (await res.json())?.error ?? null;
    } catch {
      // no JSON body
    }
    if (conn !== this._conn) return;
    const code = error?.code ?? "error";
    const message = error?.message ?? `HTTP ${res.status}`;
    if (res.status === 401) return this._ended(conn, code === "token_expired" ? 4011 : 4001, message, false);
    if (res.status === 429) return this._ended(conn, 4008, message, false);
    // HTTP has no status of its own for a ban: the node answers 403 with a message that starts
    // with "banned" (a WebSocket is closed with 4003), so that prefix is what tells it apart.
    if (res.status === 403 && message.startsWith("banned")) return this._ended(conn, 4003, message, false);
    const refused = refusedChannels(conn.channels, code, message);
    if (!refused.length) return this._ended(conn, 1006, message, false);
    const subs = refused.map((channel) => conn.sent.get(channel).sub);
    this._teardown("disconnected");
    for (const sub of subs) this._drop(sub, new PushdError(code, message));
    if (this._state === "connecting") this._open();
  }

  /** SSE with no channel: nothing to stream until a subscribe. */
  _park(conn) {
    if (conn !== this._conn) return;
    this._teardown("disconnected");
    this._parked = true;
    const reason = "no channel to stream over SSE";
    this._setState("disconnected", { reason });
    this._emit("disconnected", { code: null, reason, willReconnect: true, delay: null });
  }

  /**
   * SSE's channel list is fixed per request: a subscribe or unsubscribe restarts the stream
   * from the current positions. Changes made in the same tick make one restart.
   */
  _sseChanged() {
    if (this._restartQueued) return;
    this._restartQueued = true;
    queueMicrotask(() => {
      this._restartQueued = false;
      if (this._parked) {
        if (this._subs.size) this._open();
        return;
      }
      const conn = this._conn;
      if (!conn || conn.kind !== "sse" || !conn.sent || sameSubs(conn.sent, this._subs)) return;
      this._teardown("disconnected");
      this._open();
    });
  }
}

/**
 * One connection attempt and, once welcomed, the connection it became. Its stages, in order:
 * `ready` (the token is there and the socket or request has been started), `opened` (the
 * WebSocket opened, or the SSE response came with status 200: the transport works, but the
 * node has not accepted yet), `welcomed` (the node's welcome arrived: accepted, commands go).
 */
class Attempt {
  constructor(kind, base, now) {
    this.kind = kind; // "websocket" or "sse"
    this.base = base; // the node's base URL
    this.token = undefined; // from getToken(); undefined without it
    this.ready = false; // the token is there, the socket or request started
    this.opened = false; // the transport is up, not yet accepted
    this.welcomed = false; // the node accepted: the connection is live
    this.fallback = false; // an SSE attempt standing in for WebSockets that would not open
    this.ws = null; // WebSocket: the socket
    this.abort = null; // SSE: aborts the request and its stream
    this.channels = null; // SSE: the requested channels, in request order
    this.sent = null; // SSE: channel -> {sub, since} as requested
    this.rx = 0; // frames (WebSocket) or chunks (SSE) received
    this.lastRx = now; // when the last one arrived
    this.pingMs = 0; // the node's heartbeat period, from the welcome
    this.probe = null; // WebSocket: the heartbeat ping waiting for any frame, {rx, at}
    this.pace = []; // WebSocket: subscriptions still to (re)subscribe, in subscribe order
    this.connectTimer = null; // ends the attempt: first getToken's limit, then the welcome's
    this.beatTimer = null; // the next heartbeat check
    this.paceTimer = null; // the next batch of `pace`
    this.stableTimer = null; // resets the backoff once the connection has stayed up stableAfter
  }
}

/** One channel subscription, as returned by subscribe(). */
class Subscription {
  constructor(client, channel, handlers, since) {
    this._client = client;
    this._handlers = handlers;
    this._pos = since; // {epoch, offset} of the last message handled, or null
    this._live = null; // the connection on which the subscribe was confirmed
    this._sentOn = null; // the connection the last subscribe went out on
    this._retries = 0; // "unavailable" replies in a row
    this._retryTimer = null; // the subscribe retry after an "unavailable" reply
    this.channel = channel;
  }

  get position() {
    return this._pos ? { ...this._pos } : null;
  }

  unsubscribe() {
    this._client._unsubscribe(this);
  }
}

// ---- helpers ----------------------------------------------------------------------------------

/** Node base URLs: http(s), or ws(s) turned into http(s); a trailing /ws or /sse is dropped. */
function baseUrls(url) {
  const list = url == null ? [new URL(import.meta.url).origin] : [].concat(url);
  if (!list.length) throw new PushdError("bad_request", "url: give at least one node URL");
  return list.map((u) => {
    const parsed = new URL(u);
    if (parsed.protocol === "ws:") parsed.protocol = "http:";
    if (parsed.protocol === "wss:") parsed.protocol = "https:";
    const path = parsed.pathname.replace(/\/(ws|sse)\/?$/, "").replace(/\/$/, "");
    return parsed.origin + path;
  });
}

/** <base><path>?params, with ws(s) for the WebSocket endpoint. */
function endpoint(base, path, params) {
  const url = new URL(base + path);
  if (path === "/ws") url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  for (const [k, v] of params) url.searchParams.append(k, v);
  return url.href;
}

/**
 * The SSE cursor in its `epoch:offset,...` form, one part per channel in request order; a
 * channel with no position yet is an empty part (it starts live). null when nothing to resume.
 */
function sseCursor(positions) {
  if (!positions.some(Boolean)) return null;
  return positions.map((p) => (p ? `${p.epoch}:${p.offset}` : "")).join(",");
}

/**
 * Which requested channels an SSE refusal is about, to be dropped; none means the refusal is
 * not about a channel (an Origin refusal, say) and counts as an ordinary failure.
 * - too_many_channels ("at most N channels per connection"): every channel after the first N,
 *   the newest ones; without a readable N, the newest one.
 * - forbidden: the channel the message ends with ("not allowed to subscribe to channel user:bob").
 * - bad_channel: the channel the message starts with, quoted; else the one that breaks the syntax.
 */
function refusedChannels(channels, code, message) {
  if (code === "too_many_channels") {
    const limit = Number(/at most (\d+) channels/.exec(message)?.[1] ?? NaN);
    const keep = limit < channels.length ? limit : channels.length - 1;
    return channels.slice(keep);
  }
  if (code === "forbidden") {
    const named = /(?:^|\s)channel (\S+)$/.exec(message)?.[1];
    return channels.includes(named) ? [named] : [];
  }
  if (code === "bad_channel") {
    const bad = channels.find((c) => message.startsWith(`${JSON.stringify(c)}:`)) ?? channels.find((c) => !CHANNEL_NAME.test(c));
    return bad === undefined ? [] : [bad];
  }
  return [];
}

function sameSubs(sent, subs) {
  if (sent.size !== subs.size) return false;
  for (const [channel, sub] of subs) if (sent.get(channel)?.sub !== sub) return false;
  return true;
}

function notSupported(op) {
  return new PushdError("not_supported", `${op} needs the WebSocket transport`);
}

/**
 * A text/event-stream parser fed with decoded text in chunks split anywhere (even inside a
 * CRLF). Calls onEvent(name, data) per event; comments (": ping") and id/retry are skipped.
 */
function eventStreamParser(onEvent) {
  let pending = "";
  let data = [];
  let name = "";
  let skipLf = false; // the last chunk ended in CR: a leading LF belongs to it
  const line = (l) => {
    if (l === "") {
      if (data.length) onEvent(name || "message", data.join("\n"));
      data = [];
      name = "";
    } else if (l[0] !== ":") {
      const i = l.indexOf(":");
      const field = i < 0 ? l : l.slice(0, i);
      const value = i < 0 ? "" : l.slice(l[i + 1] === " " ? i + 2 : i + 1);
      if (field === "data") data.push(value);
      else if (field === "event") name = value;
    }
  };
  return (text) => {
    if (skipLf && text[0] === "\n") text = text.slice(1);
    skipLf = text.endsWith("\r");
    const re = /\r\n|\r|\n/g;
    let start = 0;
    for (let m = re.exec(text); m; m = re.exec(text)) {
      line(pending + text.slice(start, m.index));
      pending = "";
      start = re.lastIndex;
    }
    pending += text.slice(start);
  };
}

function safeCall(fn, arg) {
  if (!fn) return;
  try {
    fn(arg);
  } catch (e) {
    report(e);
  }
}

/** An app callback threw: report it like an uncaught error, without breaking the client. */
function report(e) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(e);
  else console.error(e);
}
