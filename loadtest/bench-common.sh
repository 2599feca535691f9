# Sourced by the benchmark scripts in this directory: a scratch directory, the pids of every
# process a script starts, and a cleanup that kills them and removes the directory on exit.
bin=${BIN:-target/release}
work=$(mktemp -d /tmp/pushd-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
