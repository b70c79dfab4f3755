#!/usr/bin/env bash
# Marga benchmark: one command, from the repository root or anywhere.
#
#   bench/run.sh                     # everything (~9 min on 2 cores, after the build)
#   bench/run.sh --quick             # short smoke run (~2.5 min)
#   bench/run.sh --only streaming    # one phase: throughput, latency, streaming, memory
#   bench/run.sh --help              # every option (bench/bench.py)
#
# Installs what is missing (wrk and nginx-light from Debian; oha from crates.io,
# which compiles once for a few minutes), builds the release binaries, then runs
# bench/bench.py. Everything listens on 127.0.0.1; every process started here is
# stopped on exit. Results: bench/results/<timestamp>.{jsonl,md}.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

for arg in "$@"; do
  case "$arg" in
    -h|--help) exec python3 "$here/bench.py" --help ;;
  esac
done

pidfile="$(mktemp -t marga-bench-pids.XXXXXX)"
cleanup() {
  # bench.py stops its processes itself; this is the safety net if it died.
  while read -r pid; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done < "$pidfile"
  rm -f "$pidfile"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
apt_install() {
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "$@" >&2
}
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  echo "[bench] installing wrk and nginx (apt-get)" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  command -v wrk >/dev/null || apt_install wrk
  if ! command -v nginx >/dev/null; then
    apt_install nginx-light || apt_install nginx
    # Debian may start the packaged nginx service; the benchmark runs its own.
    "${sudo_cmd[@]}" service nginx stop >/dev/null 2>&1 || true
  fi
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null; then
  echo "[bench] installing oha (cargo install oha --locked; compiles once, a few minutes)" >&2
  cargo install oha --locked >&2
fi

echo "[bench] building release binaries" >&2
cargo build --release -p marga-gateway -p mock-upstream >&2

# 2,000 held streams need ~4,000 descriptors on the client and gateway sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 20000 2>/dev/null || true

BENCH_PIDFILE="$pidfile" python3 "$here/bench.py" "$@"
