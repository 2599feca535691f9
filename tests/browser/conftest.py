"""Shared fixtures of the browser suite.

Every test starts its own processes on free loopback ports (pushd nodes, Redis, HAProxy) and
drives the JavaScript client that a node serves at `/client.js` inside a headless Chromium. The
page is `pages/harness.html`, served by a small HTTP server on its own port (so it is another
origin than the nodes, like a real app). `pages/harness.js` records everything the client
reports: `window.received` (messages), `window.events` (events), `window.client`.

Every process a test starts is killed when the test ends, whether it passed or not; when it
failed, the tail of each process log and the page's console are printed.
"""

import csv
import io
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PAGES = HERE / "pages"
ARTIFACTS = REPO / "target" / "browser"
PUSHD_BIN = os.environ.get("PUSHD_BIN", str(REPO / "target" / "debug" / "pushd"))
PUSHCTL_BIN = os.environ.get("PUSHCTL_BIN", str(REPO / "target" / "debug" / "pushctl"))
DEPLOY_HAPROXY = REPO / "deploy" / "haproxy" / "haproxy.cfg"

#: How long any single wait lasts before the test fails: generous, for a slow two-core machine.
TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    """A channel or user name no other test uses: `prefix` plus random hex."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def wait_until(condition, what: str, timeout: float = TIMEOUT, interval: float = 0.05, ignore=()):
    """Polls `condition()` until it returns something truthy and returns that.

    Fails the test naming `what` after `timeout` seconds. Exceptions of the types in `ignore`
    (e.g. connection refused while a process starts) count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except ignore as e:  # noqa: PERF203 - a poll loop
            last_error = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample in `/metrics` text (0 when the series is absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series = head[len(name):]
        if series and not series.startswith("{"):
            continue  # another metric whose name starts the same
        found = dict(
            part.split("=", 1) for part in series.strip("{}").split(",") if part
        )
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == str(v) for k, v in labels.items()):
            return float(value)
    return 0.0


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


class Processes:
    """The processes one test started, each logging to its own file under the test's tmp dir.

    `kill_all()` (run by the `procs` fixture at teardown) SIGKILLs whatever still runs."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log_path = self.log_dir / f"{len(self.started):02d}-{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        self.started.append((name, process, log_path))
        return process

    def kill_all(self):
        for _, process, _ in reversed(self.started):
            if process.poll() is None:
                process.kill()
        for _, process, _ in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def tails(self, lines: int = 30) -> str:
        out = []
        for name, process, path in self.started:
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {name} (pid {process.pid}, exit {process.poll()}) {path}")
            out.extend(text)
        return "\n".join(out)


class Node:
    """One pushd process on a fixed loopback port, so it can be killed and started again there.

    Without `--token-secret` in `args` it runs in dev mode. `node_id` is what the client sees
    as `client.node`."""

    def __init__(self, procs: Processes, node_id: str, args=(), redis_url: str | None = None, port: int | None = None):
        self.procs = procs
        self.node_id = node_id
        self.args = list(args)
        self.redis_url = redis_url
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "Node":
        if not os.access(PUSHD_BIN, os.X_OK):
            pytest.fail(f"{PUSHD_BIN} missing: cargo build -p pushd --bin pushd (or set PUSHD_BIN)")
        argv = [PUSHD_BIN, "--listen", self.addr, "--node-id", self.node_id]
        if self.redis_url:
            argv += ["--redis-url", self.redis_url]
        self.process = self.procs.spawn(f"pushd-{self.node_id}", argv + self.args)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self):
        """Waits until `/readyz` answers 200 (listening, engine reachable, not draining)."""

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"pushd {self.node_id} exited with {self.process.returncode}:\n{self.procs.tails()}")
            return requests.get(self.url + "/readyz", timeout=2).status_code == 200

        wait_until(ready, f"pushd {self.node_id} to be ready", ignore=(requests.RequestException,))

    def kill(self):
        """SIGKILL: the node dies without a word, as in a crash; returns once it is gone."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=TIMEOUT)

    def terminate(self):
        """SIGTERM: the node starts its graceful drain (see docs/OPERATIONS.md)."""
        self.process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        return self.process.wait(timeout=timeout)

    def restart(self) -> "Node":
        """Starts a new process on the same port with the same flags (the old one must be gone)."""
        assert self.process.poll() is not None, "the previous process still runs"
        return self.start()

    def connections(self, **query) -> list[dict]:
        """`GET /admin/connections` (dev mode: no admin key), the cluster's connections."""
        r = requests.get(self.url + "/admin/connections", params=query, timeout=10)
        r.raise_for_status()
        return r.json()["connections"]

    def metrics(self) -> str:
        r = requests.get(self.url + "/metrics", timeout=10)
        r.raise_for_status()
        return r.text


class Redis:
    """A throwaway redis-server without persistence."""

    def __init__(self, procs: Processes):
        self.port = free_port()
        self.process = procs.spawn(
            "redis",
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        )

        def pong():
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(pong, "redis-server to answer PING", ignore=(OSError,))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


class Haproxy:
    """A native haproxy running `config`; `env` fills the config's `${VARS}`.

    Every config used here binds `HAPROXY_PUBLIC` (the apps' frontend) and `HAPROXY_STATS` (the
    stats page, read as CSV to see which servers HAProxy holds UP or DOWN)."""

    def __init__(self, procs: Processes, config: Path, env: dict[str, str]):
        self.public = free_port()
        self.stats = free_port()
        env = {
            "HAPROXY_PUBLIC": f"127.0.0.1:{self.public}",
            "HAPROXY_STATS": f"127.0.0.1:{self.stats}",
            "HAPROXY_ADMIN": f"127.0.0.1:{free_port()}",
            **env,
        }
        self.process = procs.spawn("haproxy", ["haproxy", "-db", "-f", str(config)], env=env)
        wait_until(lambda: socket.create_connection(("127.0.0.1", self.public), timeout=2).close() or True,
                   "haproxy to listen", ignore=(OSError,))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.public}"

    def statuses(self, backend: str = "pushd") -> dict[str, str]:
        """`{server name: status}` of one backend ("UP", "DOWN", "UP 1/2", ...)."""
        text = requests.get(f"http://127.0.0.1:{self.stats}/;csv", timeout=5).text.lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            r["svname"]: r["status"]
            for r in rows
            if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_status(self, server: str, status: str, backend: str = "pushd"):
        """Waits until HAProxy's health checks hold `server` in `status` (exactly "UP"/"DOWN")."""
        wait_until(lambda: self.statuses(backend).get(server) == status,
                   f"haproxy to hold {backend}/{server} {status}", ignore=(requests.RequestException,))


def deploy_haproxy(procs: Processes, nodes: list[Node]) -> Haproxy:
    """`deploy/haproxy/haproxy.cfg`, unchanged, in front of `nodes` (pushd-1 = nodes[0], ...).

    The nodes serve /admin/* on their one listener (dev mode, no --admin-listen), so the admin
    backend points at the same addresses."""
    env = {}
    for i, node in enumerate(nodes, 1):
        env[f"PUSHD_{i}"] = node.addr
        env[f"PUSHD_{i}_ADMIN"] = node.addr
    return Haproxy(procs, DEPLOY_HAPROXY, env)


# --------------------------------------------------------------------------------------------
# The server API: history and a publishing backend
# --------------------------------------------------------------------------------------------


def history(base_url: str, channel: str, headers: dict | None = None) -> tuple[str, list[tuple[int, object]]]:
    """The channel's whole stored history through `GET /api/history`, paged with `since`:
    `(epoch, [(offset, data), ...])`, oldest first."""
    epoch, out, since = None, [], 0
    while True:
        r = requests.get(
            base_url + "/api/history",
            params={"channel": channel, "since": since, "limit": 1000},
            headers=headers or {},
            timeout=10,
        )
        assert r.status_code == 200, f"/api/history answered {r.status_code}: {r.text}"
        body = r.json()
        assert epoch in (None, body["epoch"]), "the epoch changed while paging the history"
        epoch = body["epoch"]
        page = [(p["offset"], p["data"]) for p in body["publications"]]
        out += page
        if not page or page[-1][0] >= body["top"]:
            return epoch, out
        since = page[-1][0]


def publish(base_url: str, channel: str, data, headers: dict | None = None, key: str | None = None) -> dict:
    """One `POST /api/publish`, retried with the same idempotency key while the answer is not a
    200 (a node going away mid-request); returns `{channel, epoch, offset}`."""
    key = key or uuid.uuid4().hex
    body = {"channel": channel, "data": data, "idempotency_key": key}

    def attempt():
        r = requests.post(base_url + "/api/publish", json=body, headers=headers or {}, timeout=5)
        if 400 <= r.status_code < 500:
            raise AssertionError(f"/api/publish refused {body}: {r.status_code} {r.text}")
        return r.json() if r.status_code == 200 else None

    return wait_until(attempt, f"publish {body} to be acknowledged", ignore=(requests.RequestException,))


class Publisher(threading.Thread):
    """A backend that publishes `{"n": 0}`, `{"n": 1}`, ... to one channel every `interval`
    seconds through `POST /api/publish`, each with its own idempotency key, retrying a failed
    publish with the same key until it is acknowledged. `acked` lists `(offset, data, epoch)` of
    every acknowledged publish, in order."""

    def __init__(self, base_url: str, channel: str, interval: float = 0.02, headers: dict | None = None):
        super().__init__(daemon=True)
        self.base_url, self.channel, self.interval, self.headers = base_url, channel, interval, headers
        self.acked: list[tuple[int, object, str]] = []
        self.error: BaseException | None = None
        self._stop_requested = threading.Event()
        self.prefix = uuid.uuid4().hex[:8]

    def run(self):
        n = 0
        try:
            while not self._stop_requested.is_set():
                data = {"n": n}
                ack = publish(self.base_url, self.channel, data, self.headers, key=f"{self.prefix}-{n}")
                self.acked.append((ack["offset"], data, ack["epoch"]))
                n += 1
                self._stop_requested.wait(self.interval)  # the publishing pace, not a wait for an event
        except BaseException as e:  # reported by stop()
            self.error = e

    def wait_acked(self, count: int):
        """Waits until at least `count` publishes were acknowledged."""
        wait_until(lambda: len(self.acked) >= count or self.error, f"{count} acknowledged publishes")
        self._raise()

    def stop(self) -> list[tuple[int, object, str]]:
        """Stops after the publish under way is acknowledged; returns `acked`."""
        self._stop_requested.set()
        self.join(TIMEOUT * 2)
        assert not self.is_alive(), "the publisher did not stop"
        self._raise()
        return self.acked

    def _raise(self):
        if self.error:
            raise AssertionError(f"the publisher failed: {self.error!r}") from self.error


def assert_matches_history(received: list[tuple[int, object]], stored: list[tuple[int, object]], who: str = "the page"):
    """`received` (what a client handed the app, in order) is exactly `stored`: the same
    offsets and data, in the same order, nothing missing, nothing twice."""
    offsets = [o for o, _ in received]
    dupes = sorted({o for o in offsets if offsets.count(o) > 1})
    assert not dupes, f"{who} got offsets twice: {dupes[:20]}"
    assert offsets == sorted(offsets), f"{who} got offsets out of order: {offsets[:50]}..."
    want = [o for o, _ in stored]
    missing = sorted(set(want) - set(offsets))
    extra = sorted(set(offsets) - set(want))
    assert not missing, f"{who} missed offsets {missing[:20]} (of {len(want)} stored)"
    assert not extra, f"{who} got offsets that are not in the history: {extra[:20]}"
    for (o, got), (_, stored_data) in zip(received, stored):
        assert got == stored_data, f"{who} got {got!r} at offset {o}; the history holds {stored_data!r}"
    assert received == stored


# --------------------------------------------------------------------------------------------
# The browser and the test page
# --------------------------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


class Harness:
    """`pages/harness.html` open in one tab. Clients are made in the page with the module a node
    serves (`load`), then driven and read through `harness.js`. Client `i`'s record is
    `logs[i] = {received: [{channel, epoch, offset, event, data, node, t}], events: [{t, name,
    info}], tokenCalls}`; client 0 is also `window.client`, `window.received`, `window.events`."""

    def __init__(self, page, origin: str):
        self.page = page
        self.origin = origin
        page.goto(origin + "/harness.html")
        page.wait_for_function("() => window.harness !== undefined", timeout=TIMEOUT * 1000)

    def load(self, module_url: str):
        """Imports the client module (e.g. `http://127.0.0.1:PORT/client.js`) into the page."""
        exports = self.page.evaluate("url => harness.load(url)", module_url)
        assert "Pushd" in exports, f"{module_url} exports {exports}, not Pushd"
        return self

    def create(self, **options) -> int:
        """`new Pushd(options)` in the page; returns the client's index. `token={secret, ttl_s,
        claims}` makes a `getToken` that mints an HS256 JWT with WebCrypto on every call."""
        return self.page.evaluate("o => harness.create(o)", options)

    def subscribe(self, i: int, channel: str, **options):
        """`client.subscribe(channel, {...options, onMessage, onReset, onSubscribed, onError})`."""
        self.page.evaluate("([i, c, o]) => harness.subscribe(i, c, o)", [i, channel, options])

    def connect(self, i: int = 0):
        self.page.evaluate("i => clients[i].connect()", i)

    def call(self, js: str, arg=None):
        return self.page.evaluate(js, arg)

    def log(self, i: int = 0) -> dict:
        return self.page.evaluate("i => logs[i]", i)

    def received(self, i: int = 0, channel: str | None = None) -> list[tuple[int, object]]:
        """What client `i` handed the app on `channel`: `[(offset, data), ...]` in order."""
        return [(m["offset"], m["data"]) for m in self.messages(i, channel)]

    def messages(self, i: int = 0, channel: str | None = None) -> list[dict]:
        return self.page.evaluate(
            "([i, c]) => logs[i].received.filter(m => c === null || m.channel === c)", [i, channel]
        )

    def events(self, i: int = 0, name: str | None = None) -> list[dict]:
        return self.page.evaluate("([i, n]) => logs[i].events.filter(e => n === null || e.name === n)", [i, name])

    def prop(self, i: int, name: str):
        """A property of client `i`: `state`, `transport`, `node`, `conn`."""
        return self.page.evaluate("([i, n]) => clients[i][n]", [i, name])

    def wait(self, predicate: str, arg=None, what: str = "", timeout: float = TIMEOUT):
        """Waits until the JS function `predicate(arg)` returns truthy in the page; returns it."""
        try:
            handle = self.page.wait_for_function(predicate, arg=arg, timeout=timeout * 1000, polling=100)
        except Exception as e:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}") from e
        return handle.json_value()

    def wait_connected(self, i: int = 0, not_node: str | None = None, after: int = 0):
        """Waits until client `i` reports a "connected" event (its index in the event list at
        least `after`), on a node other than `not_node` if given; returns that event's info."""
        return self.wait(
            """([i, notNode, after]) => logs[i].events.find((e, k) => k >= after && e.name === "connected"
                   && (notNode === null || e.info.node !== notNode))?.info""",
            [i, not_node, after],
            f"client {i} to connect" + (f" to a node other than {not_node}" if not_node else ""),
        )

    def wait_offset(self, i: int, channel: str, offset: int, what: str = ""):
        """Waits until client `i` handed the app a message of `channel` at `offset` or later."""
        self.wait(
            "([i, c, o]) => logs[i].received.some(m => m.channel === c && m.offset >= o)",
            [i, channel, offset],
            what or f"client {i} to receive {channel} offset {offset}",
        )

    def wait_caught_up(self, i: int, channel: str, acked: list):
        """Waits until client `i` holds the last of the `acked` publishes (`Publisher.stop()`)."""
        last = acked[-1][0]
        self.wait_offset(i, channel, last, f"client {i} to catch up to the last acknowledged offset {last}")

    def wait_count(self, i: int, channel: str, count: int, what: str = ""):
        """Waits until client `i` handed the app at least `count` messages of `channel`."""
        self.wait(
            "([i, c, n]) => logs[i].received.filter(m => m.channel === c).length >= n",
            [i, channel, count],
            what or f"client {i} to receive {count} messages of {channel}",
        )

    def wait_event(self, i: int, name: str, what: str = "", after: int = 0):
        """Waits for client `i`'s first event `name` at index `after` or later; returns it."""
        return self.wait(
            "([i, n, after]) => logs[i].events.find((e, k) => k >= after && e.name === n)",
            [i, name, after],
            what or f"client {i} to report {name}",
        )

    def event_count(self, i: int = 0) -> int:
        return self.page.evaluate("i => logs[i].events.length", i)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item, so fixtures can tell whether it failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def _failed(request) -> bool:
    return any(getattr(getattr(request.node, f"report_{w}", None), "failed", False) for w in ("setup", "call"))


@pytest.fixture
def procs(request, tmp_path):
    """The test's processes; all killed at teardown, with their logs printed if the test failed."""
    p = Processes(tmp_path)
    yield p
    p.kill_all()
    if _failed(request):
        print(f"\n==== process logs of {request.node.name}\n{p.tails()}")


@pytest.fixture
def redis(procs):
    """A fresh redis-server."""
    return Redis(procs)


@pytest.fixture
def start_node(procs):
    """`start_node(node_id, *args, redis=None, port=None)`: a started, ready pushd `Node`."""

    def start(node_id: str, *args: str, redis: Redis | None = None, port: int | None = None, wait: bool = True):
        return Node(procs, node_id, args, redis.url if redis else None, port).start(wait=wait)

    return start


@pytest.fixture(scope="session")
def page_server():
    """The origin serving `pages/` (the harness page), e.g. `http://127.0.0.1:PORT`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(PAGES)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from the system (never a downloaded one)."""
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def new_page(browser, request):
    """`new_page()`: a page in a fresh browser context (own cookies, own storage); closed at
    teardown, with its console printed if the test failed."""
    contexts, consoles = [], []

    def make():
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT * 1000)
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
        contexts.append(context)
        consoles.append(console)
        return page

    yield make
    if _failed(request):
        for k, console in enumerate(consoles):
            print(f"\n==== console of page {k}\n" + "\n".join(console[-60:]))
    for context in contexts:
        context.close()


@pytest.fixture
def harness(new_page, page_server):
    """`harness(module_url)`: a new tab on the harness page with the client module loaded."""

    def open_(module_url: str) -> Harness:
        return Harness(new_page(), page_server).load(module_url)

    return open_


def pytest_configure(config):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

