// Type declarations for pushd.js, the pushd browser client.

/** A channel position: the last message handled, inside one history (epoch) of the channel. */
export interface Position {
  epoch: string;
  offset: number;
}

export type State = "idle" | "connecting" | "connected" | "disconnected" | "stopped";
export type Transport = "websocket" | "sse";

/** An error with a stable code: the server's error code, or one of the client's own. */
export declare class PushdError extends Error {
  constructor(code: string, message?: string);
  readonly name: "PushdError";
  /**
   * Server codes: "forbidden", "bad_channel", "bad_request", "already_subscribed", "too_many_channels",
   * "payload_too_large", "presence_disabled", "unavailable", "outcome_unknown", ...
   * Client codes: "closed" (close() or a stop), "disconnected" (the connection dropped before the
   * reply), "outcome_unknown" (a publish whose connection dropped: retry with the same
   * idempotencyKey), "unavailable" (no connection within connectTimeout), "not_supported" (a
   * command over SSE), "already_subscribed" (subscribe() twice on one client), "bad_request" (a
   * call whose payload cannot be serialised as JSON).
   */
  code: string;
}

export interface PushdOptions {
  /**
   * Node base URLs ("https://push.example.com"; ws:// and wss:// accepted). The client uses
   * <base>/ws and <base>/sse. Default: the origin this module was loaded from. With several, it
   * starts at a random one and moves to the next after a failed attempt or a drop.
   */
  url?: string | string[];
  /**
   * Default "auto": WebSocket first, SSE after two WebSocket attempts in a row failed before
   * opening (then SSE for 5 minutes). Calls need the WebSocket: over SSE they reject "not_supported".
   */
  transport?: "auto" | Transport;
  /** Called before every connection attempt; its token is sent as ?token=. */
  getToken?: () => string | Promise<string>;
  /** Dev mode only: sent as ?user= (ignored by nodes that check tokens). */
  user?: string;
  /** Full-jitter backoff: before attempt n, random() * min(max, base * 2^(n-1)) ms. Default {base: 500, max: 30000}. */
  backoff?: { base?: number; max?: number };
  /**
   * ms getToken() may take, then ms the socket or request may take to reach the welcome (each
   * its own limit; going over ends the attempt as a failure); also how long calls wait for a
   * connection. Default 10000.
   */
  connectTimeout?: number;
  /** ms a connection must stay up after its welcome before the backoff starts over from its first step. Default 10000. */
  stableAfter?: number;
  /** ms: the reconnect after a 1012 (node draining) waits random() * drainJitter. Default 2000. */
  drainJitter?: number;
  /** ms added to the backoff after a 4008 (rate limited). Default 10000. */
  rateLimitedDelay?: number;
  /** ms to wait for any frame after a heartbeat ping (WebSocket) or past pingInterval (SSE). Default 10000. */
  heartbeatGrace?: number;
  /** seconds between the node's heartbeats, used only when its welcome does not say (`ping_interval`). Default 25. */
  pingInterval?: number;
  /** Positions to resume from, e.g. restored from sessionStorage; each is used by the first subscribe of its channel. */
  positions?: Record<string, Position>;
  // Test seams; they default to the globals.
  WebSocket?: { new (url: string): WebSocket };
  fetch?: (url: string, init?: RequestInit) => Promise<Response>;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: any) => void;
  random?: () => number;
  now?: () => number;
  /** For online/offline and visibilitychange events; null for none. */
  window?: EventTarget | null;
}

export interface Message<T = unknown> {
  channel: string;
  epoch: string;
  offset: number;
  /** undefined when the publisher set none. */
  event: string | undefined;
  data: T;
}

export interface ResetInfo {
  channel: string;
  epoch: string;
  offset: number;
  /** "not_recovered": the resubscribe could not replay; "reset": the channel's history was lost. */
  reason: "not_recovered" | "reset";
}

export interface PresenceEvent {
  channel: string;
  user: string;
  conn: string;
}

export interface SubscribedInfo {
  channel: string;
  epoch: string;
  offset: number;
  /** Present only when the subscribe resumed from a position. */
  recovered?: boolean;
  replayed?: number;
}

export interface SubscribeOptions<T = unknown> {
  onMessage?(msg: Message<T>): void;
  /**
   * Reload this channel's state from your backend; live delivery continues after {epoch, offset}.
   * The client-level "reset" event fires too.
   */
  onReset?(info: ResetInfo): void;
  onJoin?(p: PresenceEvent): void;
  onLeave?(p: PresenceEvent): void;
  /** Every time the (re)subscribe is confirmed. */
  onSubscribed?(info: SubscribedInfo): void;
  /** The subscribe was refused (err.code e.g. "forbidden", "bad_channel"); the subscription is dropped. */
  onError?(err: PushdError): void;
  /** Start after this position: the node replays what follows it. */
  since?: Position;
}

export interface Subscription {
  readonly channel: string;
  /** The last position handled (at first the `since` given, if any); null until the first subscribe reply otherwise. */
  readonly position: Position | null;
  unsubscribe(): void;
}

export interface PublishResult {
  channel: string;
  epoch: string;
  offset: number;
}

export interface PresenceEntry {
  user: string;
  conn: string;
  node: string;
}

export interface Publication<T = unknown> {
  offset: number;
  event?: string;
  data: T;
  time_ms: number;
}

export interface HistoryResult<T = unknown> {
  channel: string;
  epoch: string;
  /** The channel's last offset: subscribe with since {epoch, offset: top} to continue from here. */
  top: number;
  /** Oldest first. */
  publications: Publication<T>[];
}

export interface StateEvent {
  state: State;
  transport: Transport | null;
  node: string | null;
  code: number | null;
  reason: string | null;
  /**
   * connecting: the number of this attempt since a connection last stayed up for stableAfter
   * (1 = first); otherwise consecutive failures so far.
   */
  attempt: number;
  /** disconnected: ms until the next attempt (null: waiting for the network or a channel). Sent again when `online` shortens the wait. */
  delay: number | null;
}

export interface PushdEvents {
  state: StateEvent;
  /** node, conn and user as the welcome gave them (null if it left one out). */
  connected: { transport: Transport; node: string | null; conn: string | null; user: string | null };
  disconnected: { code: number | null; reason: string | null; willReconnect: boolean; delay: number | null };
  stopped: { code: number; reason: string };
  fallback: { from: "websocket"; to: "sse" };
  /**
   * Every reset, of every channel, after the subscription's own onReset: messages may be
   * missing, reload the channel. With neither an onReset nor a "reset" listener, the client
   * warns on the console.
   */
  reset: ResetInfo;
}

export declare class Pushd {
  constructor(options?: PushdOptions);

  readonly state: State;
  /** Of the current or last connection. */
  readonly transport: Transport | null;
  /** From the last welcome. */
  readonly node: string | null;
  readonly conn: string | null;
  readonly userId: string | null;

  /** Returns a function that removes the listener. */
  on<K extends keyof PushdEvents>(name: K, fn: (event: PushdEvents[K]) => void): () => void;
  off<K extends keyof PushdEvents>(name: K, fn: (event: PushdEvents[K]) => void): void;

  /** Starts connecting (the constructor does not). Also restarts after close() or a stop. */
  connect(): void;
  /** Stops for good: closes with 1000, no reconnect; pending calls reject with "closed". */
  close(): void;
  /** Drops the current connection and reconnects after `delay` ms (default 0: at once), without backoff. */
  reconnect(options?: { delay?: number }): void;
  /** Every subscribed channel's position, for persistence. */
  positions(): Record<string, Position>;

  /** Throws PushdError "already_subscribed" if this client already subscribes the channel. */
  subscribe<T = unknown>(channel: string, handlers?: SubscribeOptions<T> | ((msg: Message<T>) => void)): Subscription;

  /**
   * WebSocket only; the token needs a `pubs` glob for the channel. Rejects "bad_request" at once
   * if `data` cannot be serialised as JSON (a BigInt, a cycle).
   */
  publish(channel: string, data: unknown, options?: { event?: string; idempotencyKey?: string }): Promise<PublishResult>;
  /** WebSocket only. */
  presence(channel: string): Promise<PresenceEntry[]>;
  /** WebSocket only. `since`: an offset (messages after it); without it, the newest `limit` (default 100, at most 1000). */
  history<T = unknown>(channel: string, options?: { limit?: number; since?: number | Position }): Promise<HistoryResult<T>>;
  /** WebSocket only. Resolves to the round trip in ms. */
  ping(): Promise<number>;
}
