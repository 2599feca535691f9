#!/usr/bin/env bash
# The test command: everything CI runs after fmt and clippy. Installs what it needs, builds the
# binaries the end-to-end tests start as real processes, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Redis engine's tests start their own redis-server processes.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's redis-server" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest not found: installing it (once)" >&2
  cargo install --locked cargo-nextest
fi

# The drain, signal and pushctl tests run the real pushd and pushctl binaries.
cargo build -p pushd --bin pushd -p pushctl --bin pushctl

cargo nextest run --workspace --no-fail-fast "$@"
