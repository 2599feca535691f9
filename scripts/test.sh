#!/usr/bin/env bash
# The test command: everything CI runs after fmt and clippy. Installs what it needs, builds the
# binaries the end-to-end tests start as real processes, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest not found: installing it (once)" >&2
  cargo install --locked cargo-nextest
fi

# The drain and signal tests run the real pushd binary.
cargo build -p pushd --bin pushd

cargo nextest run --workspace --no-fail-fast "$@"
