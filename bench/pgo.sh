#!/usr/bin/env bash
# Profile-guided release build of `marga`: the build we measure and recommend for production.
#
#   bench/pgo.sh          # → target/pgo/marga   (make build-pgo calls this)
#
# 1. builds an instrumented marga (-Cprofile-generate) into target/pgo-generate;
# 2. runs it through the production request mix against the mock upstream
#    (bench/pgo_train.py, ~40 s);
# 3. merges its profile with llvm-profdata into target/pgo-profile/marga.profdata;
# 4. builds marga again with -Cprofile-use into target/pgo (target/pgo/release/marga);
# 5. when llvm-bolt is at hand (BOLT=0 skips it): instruments that binary with BOLT, trains
#    it the same way and lays its code out again by where the training went (hot blocks of
#    every function together, cold ones split off, functions ordered by their calls).
# The result is target/pgo/marga. On the benchmark's 2-core VM profile-guided compilation cut
# Marga's CPU per request by 11-19 % and the p50 latency it adds by 9-21 % (BENCHMARKS.md,
# stop 23); BOLT's layout is measured in stop 24's section. Two extra release builds: ~15-20
# min on 2 cores from nothing, each in its own target directory so none undoes another.
#
# Needs llvm-profdata of the same LLVM major version as rustc (`rustc -vV`): rustup's
# `llvm-tools` component, or the distribution's llvm-N package (Debian: llvm-22 for
# rustc 1.95). LLVM_PROFDATA=/path/to/llvm-profdata picks one explicitly. Without one the
# script exits with status 2 before building anything (bench/run.sh then installs llvm-N).
# llvm-bolt (Debian: bolt-N; LLVM_BOLT=/path/to/llvm-bolt) is optional: without it the
# profile-guided binary is the result.
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

find_bolt() {
  local candidate
  for candidate in "${LLVM_BOLT:-}" "$(command -v "llvm-bolt-$llvm_major" || true)" \
      "/usr/lib/llvm-$llvm_major/bin/llvm-bolt" "$(command -v llvm-bolt || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
bolt=""
link_relocs=""
if [ "${BOLT:-1}" != 0 ] && bolt="$(find_bolt)"; then
  # BOLT moves whole functions only in a binary that kept its relocations.
  link_relocs="-Clink-arg=-Wl,--emit-relocs"
else
  bolt=""
  say "no llvm-bolt (or BOLT=0): the result is the profile-guided build without BOLT's layout"
fi
steps=$([ -n "$bolt" ] && echo 5 || echo 4)

profile_dir="$root/target/pgo-profile"
rm -rf "$profile_dir"
mkdir -p "$profile_dir/raw"

say "1/$steps instrumented build (target/pgo-generate)"
CARGO_TARGET_DIR="$root/target/pgo-generate" \
  RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$profile_dir/raw" \
  cargo build --release -p marga-gateway --bin marga
cargo build --release -p mock-upstream
# Build scripts ran instrumented too and left their profiles: only the server's count.
rm -rf "$profile_dir/raw" && mkdir -p "$profile_dir/raw"

say "2/$steps training on the request mix (bench/pgo_train.py)"
python3 bench/pgo_train.py "$root/target/pgo-generate/release/marga"

say "3/$steps merging the profile ($profdata)"
"$profdata" merge -o "$profile_dir/marga.profdata" "$profile_dir/raw"

say "4/$steps optimised build (target/pgo)"
CARGO_TARGET_DIR="$root/target/pgo" \
  RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profile_dir/marga.profdata $link_relocs" \
  cargo build --release -p marga-gateway --bin marga
built="$root/target/pgo/release/marga"
final="$root/target/pgo/marga"
if [ -z "$bolt" ]; then
  cp "$built" "$final"
  say "done: target/pgo/marga"
  exit 0
fi

say "5/5 BOLT: instrumenting, training, laying out ($bolt)"
instrumented="$root/target/pgo/marga-bolt-instrumented"
# (Run as an `if` condition, where `set -e` does not apply: each step says when it failed.)
bolt_layout() {
  rm -f "$profile_dir/marga.fdata"
  "$bolt" "$built" -o "$instrumented" -instrument \
    --instrumentation-file="$profile_dir/marga.fdata" > "$profile_dir/bolt-instrument.log" 2>&1 || return 1
  python3 bench/pgo_train.py "$instrumented" || return 1
  "$bolt" "$built" -o "$final.tmp" -data="$profile_dir/marga.fdata" \
    -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold -split-eh \
    -icf=safe -use-gnu-stack -dyno-stats > "$profile_dir/bolt.log" 2>&1 || return 1
  mv "$final.tmp" "$final"
}
if bolt_layout; then
  say "done: target/pgo/marga"
else
  # A layout that failed must not cost the profile-guided build: it is the result then.
  cp "$built" "$final"
  say "BOLT failed (logs in target/pgo-profile): target/pgo/marga is the profile-guided build"
fi
rm -f "$instrumented" "$final.tmp"
