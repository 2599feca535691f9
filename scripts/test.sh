#!/usr/bin/env bash
# The test command: everything CI runs after fmt and clippy. Installs what it needs, builds the
# binaries the end-to-end tests start as real processes, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""

# Installs Debian `package` unless `command` is already there.
need() {
  local command=$1 package=$2
  command -v "$command" >/dev/null 2>&1 && return
  echo "$command not found: installing Debian's $package" >&2
  need_package "$package"
}

need_package() {
  local package=$1
  if [ -z "$apt_updated" ]; then
    $sudo apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$package" >/dev/null
}

# The Redis engine's tests start their own redis-server processes; the deployment tests run the
# compose file's HAProxy and Prometheus configs natively (promtool comes with prometheus).
need redis-server redis-server
need redis-cli redis-tools
need haproxy haproxy
need prometheus prometheus
need promtool prometheus
need python3 python3
# The TLS suites make their certificates with openssl.
need openssl openssl
# The JavaScript client's unit tests run under Node's own test runner; the browser suite drives
# Debian's Chromium (Playwright's own browser download is never used).
need node nodejs
need chromium chromium

# PyPI tools live in a venv of their own under target/ (the tests look there first).
venv=target/tools/venv
if [ ! -x "$venv/bin/check-jsonschema" ] || ! "$venv/bin/python" -c 'import playwright, pytest' 2>/dev/null; then
  echo "check-jsonschema, playwright or pytest not found: installing them into $venv" >&2
  python3 -c 'import ensurepip, venv' 2>/dev/null || need_package python3-venv
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check check-jsonschema playwright pytest
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest not found: installing it (once)" >&2
  cargo install --locked cargo-nextest
fi

# The drain, signal, pushctl and deployment tests run the real pushd, pushctl and pushload.
cargo build -p pushd --bin pushd -p pushctl --bin pushctl -p pushload --bin pushload

status=0
cargo nextest run --workspace --no-fail-fast "$@" || status=$?

# The browser client: its pure logic under Node, then the whole of it in Chromium against real
# nodes, Redis and HAProxy (tests/browser/README.md).
node --test clients/js/test/ || status=$?
"$venv/bin/python" -m pytest tests/browser -q || status=$?
exit $status
