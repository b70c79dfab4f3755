#!/usr/bin/env bash
# Marga benchmark: one command, from the repository root or anywhere.
#
#   bench/run.sh                     # everything (~9 min on 2 cores, after the build)
#   bench/run.sh --quick             # short smoke run (~2.5 min)
#   bench/run.sh --only streaming    # one phase: throughput, latency, streaming, memory
#   bench/run.sh --no-pgo            # measure the plain release build instead
#   bench/run.sh --help              # every option (bench/bench.py)
#
# Installs what is missing (wrk and nginx-light from Debian, and Debian's llvm-N
# for llvm-profdata and bolt-N for llvm-bolt; oha from crates.io, which compiles
# once for a few minutes), builds the release binaries and the profile-guided,
# BOLT-laid-out marga (bench/pgo.sh; the plain release build, said so in the
# report, if that cannot be built), then
# runs bench/bench.py. Everything listens on 127.0.0.1; every process started
# here is stopped on exit. Results: bench/results/<timestamp>.{jsonl,md}.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

pgo=1
args=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) exec python3 "$here/bench.py" --help ;;
    --no-pgo) pgo=0 ;;
    *) args+=("$arg") ;;
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
marga="$root/target/release/marga"
if [ "$pgo" = 1 ]; then
  llvm_major="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
  if ! command -v "llvm-bolt-$llvm_major" >/dev/null && ! command -v llvm-bolt >/dev/null; then
    # Optional: without it pgo.sh builds the profile-guided binary alone.
    echo "[bench] installing bolt-$llvm_major for llvm-bolt (apt-get)" >&2
    apt_install "bolt-$llvm_major" || echo "[bench] no bolt-$llvm_major: no BOLT layout" >&2
  fi
  echo "[bench] building the profile-guided marga (bench/pgo.sh)" >&2
  status=0
  "$here/pgo.sh" >&2 || status=$?
  if [ "$status" = 2 ]; then  # no llvm-profdata of rustc's LLVM version: install Debian's
    echo "[bench] installing llvm-$llvm_major for llvm-profdata (apt-get)" >&2
    status=0
    { apt_install "llvm-$llvm_major" && "$here/pgo.sh" >&2; } || status=$?
  fi
  if [ "$status" = 0 ]; then
    marga="$root/target/pgo/marga"
  else
    echo "[bench] the profile-guided build failed: measuring the plain release build" >&2
  fi
fi

# 2,000 held streams need ~4,000 descriptors on the client and gateway sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 20000 2>/dev/null || true

BENCH_PIDFILE="$pidfile" python3 "$here/bench.py" --marga "$marga" "${args[@]}"
