#!/usr/bin/env bash
# Profile-guided release build of `marga`: the build we measure and recommend for production.
#
#   bench/pgo.sh          # → target/pgo/release/marga   (make build-pgo calls this)
#
# 1. builds an instrumented marga (-Cprofile-generate) into target/pgo-generate;
# 2. runs it through the production request mix against the mock upstream
#    (bench/pgo_train.py, ~40 s);
# 3. merges its profile with llvm-profdata into target/pgo-profile/marga.profdata;
# 4. builds marga again with -Cprofile-use into target/pgo.
# On the benchmark's 2-core VM this cut Marga's CPU per request by 11-19 % and the p50
# latency it adds by 9-21 % (BENCHMARKS.md, stop 23). Two extra release builds: ~15-20 min on
# 2 cores from nothing, each in its own target directory so none undoes another.
#
# Needs llvm-profdata of the same LLVM major version as rustc (`rustc -vV`): rustup's
# `llvm-tools` component, or the distribution's llvm-N package (Debian: llvm-22 for
# rustc 1.95). LLVM_PROFDATA=/path/to/llvm-profdata picks one explicitly. Without one the
# script exits with status 2 before building anything (bench/run.sh then installs llvm-N).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf '[pgo] %s\n' "$*" >&2; }

llvm_major="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
host="$(rustc -vV | sed -n 's/^host: //p')"
find_profdata() {
  local candidate
  for candidate in "${LLVM_PROFDATA:-}" \
      "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" \
      "$(command -v "llvm-profdata-$llvm_major" || true)" \
      "/usr/lib/llvm-$llvm_major/bin/llvm-profdata" \
      "$(command -v llvm-profdata || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] \
        && "$candidate" --version 2>/dev/null | grep -q "LLVM version $llvm_major\."; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
if ! profdata="$(find_profdata)"; then
  say "no llvm-profdata for LLVM $llvm_major (rustc's) found."
  say "install one: rustup component add llvm-tools, or apt-get install llvm-$llvm_major,"
  say "or set LLVM_PROFDATA=/path/to/llvm-profdata."
  exit 2
fi

profile_dir="$root/target/pgo-profile"
rm -rf "$profile_dir"
mkdir -p "$profile_dir/raw"

say "1/4 instrumented build (target/pgo-generate)"
CARGO_TARGET_DIR="$root/target/pgo-generate" \
  RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$profile_dir/raw" \
  cargo build --release -p marga-gateway --bin marga
cargo build --release -p mock-upstream
# Build scripts ran instrumented too and left their profiles: only the server's count.
rm -rf "$profile_dir/raw" && mkdir -p "$profile_dir/raw"

say "2/4 training on the request mix (bench/pgo_train.py)"
python3 bench/pgo_train.py "$root/target/pgo-generate/release/marga"

say "3/4 merging the profile ($profdata)"
"$profdata" merge -o "$profile_dir/marga.profdata" "$profile_dir/raw"

say "4/4 optimised build (target/pgo)"
CARGO_TARGET_DIR="$root/target/pgo" \
  RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profile_dir/marga.profdata" \
  cargo build --release -p marga-gateway --bin marga
say "done: target/pgo/release/marga"
