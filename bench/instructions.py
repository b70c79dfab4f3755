#!/usr/bin/env python3
"""Marga's CPU instructions per request, counted by valgrind's callgrind: a figure that does
not move with the machine's noise (the same binary and inputs give the same count within a
few tenths of a percent, whatever else runs), for comparing builds change by change.

    python3 bench/instructions.py [BINARY_DIR ...] [--workloads chat,embed,stream]
    (also: embed1536, chat-anthropic, stream-anthropic, chat-gemini, stream-gemini,
    embed1536-gemini)
                                  [--requests 2000] [--top 0]

Each build directory must hold `marga` and `mock-upstream` (default: target/release). For each
build and workload: the mock upstream and Marga (under callgrind, counting switched off), the
same generated config as bench.py with an inference key (the whole path: auth, admission,
routing, the ledger's charge, the request log), 400 warm-up requests over 4 keep-alive
connections, then counting on for `--requests` more and the writers' flush. Reported per
request: all of Marga's instructions, and by thread: `serving` (the per-core runtimes),
`background` (the writers' runtime), `sqlite` (sqlx's SQLite worker threads), `other`.
The writers' intervals are raised (request log 1 s, ledger 3 s) so that their batches are
about as large as at thousands of requests a second, which callgrind's slowness (≈ 200 req/s)
would otherwise not give. User-space instructions only: system calls and context switches are
not in the count (see bench.py's CPU time for those). `--top N` also prints the N functions
with the most instructions of their own.

Needs valgrind (`apt-get install valgrind`); about a minute per build and workload.
"""

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench as B  # noqa: E402

WRITER_INTERVALS = "\n[log]\nflush_interval_ms = 1000\n\n[billing]\ncommit_interval_ms = 3000\n"
WARM_UP = 400
CONNECTIONS = 4
# A thread is classified by the first of these that a function it ran has in its name: the
# scheduler's module rather than one function of it, because a profile-guided build
# (bench/pgo.sh) inlines `Context::run_task` and its like away.
THREAD_KINDS = [("serving", "scheduler::current_thread::"),
                ("sqlite", "sqlite3_step"),
                ("background", "scheduler::multi_thread::")]


def start_counted_marga(bindir, tmp, out_prefix):
    mock, base = B.start_mock(0, None, tmp, f"mock-{out_prefix.name}")
    config = B.marga_config({"mock": base, "mockstream": base, "mockslow": base}, 5) + WRITER_INTERVALS
    (tmp / "marga.toml").write_text(config)
    data = Path(tempfile.mkdtemp(dir=tmp, prefix="data-"))
    port = B.free_port()
    env = dict(os.environ, MARGA_MASTER_KEY=B.MASTER_KEY, RUST_LOG="warn")
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
           f"--callgrind-out-file={out_prefix}.%p", str(bindir / "marga"), "serve",
           "--listen", f"127.0.0.1:{port}", "--data-dir", str(data), "--config", str(tmp / "marga.toml")]
    proc = B.track(subprocess.Popen(cmd, env=env, stdout=open(f"{out_prefix}.log", "w"), stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    B.wait_http(url + "/health", timeout=120)
    return proc, url, port, mock


def send(port, path, body, key, total):
    """`total` requests over CONNECTIONS keep-alive connections; every answer must be a 200."""
    errors = []

    def one_connection(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for _ in range(n):
            conn.request("POST", path, body, headers)
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200:
                errors.append((response.status, answer[:200]))
                return

    B.in_threads(one_connection, [(total // CONNECTIONS,)] * CONNECTIONS)
    if errors:
        raise SystemExit(f"requests failed: {errors[0]}")
    return total // CONNECTIONS * CONNECTIONS


def callgrind_control(*args):
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def read_profile(path, names):
    """(total instructions, self instructions per function) of one thread's profile; `names`
    (compressed function names, shared by the files of one run) is filled in on the way."""
    self_cost, total = Counter(), 0
    current, in_call = None, False
    for line in open(path, errors="replace"):
        if line.startswith("fn="):
            m = re.match(r"fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
            if m:
                if m.group(2) is not None:
                    names[m.group(1)] = m.group(2)
                current = names.get(m.group(1), m.group(1))
        elif line.startswith("cfn="):
            m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
            if m and m.group(2) is not None:
                names[m.group(1)] = m.group(2)
        elif line.startswith("calls="):
            in_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                if not in_call:
                    self_cost[current] += int(parts[1])
            in_call = False
        elif line.startswith("totals:") or line.startswith("summary:"):
            total = max(total, int(line.split()[1]))
    return total, self_cost


def thread_kind(self_cost):
    for kind, marker in THREAD_KINDS:
        if any(marker in name for name in self_cost):
            return kind
    return "other"


def measure(bindir, workload, requests, tmp):
    out_prefix = tmp / f"cg-{bindir.name}-{workload}"
    proc, url, port, mock = start_counted_marga(bindir, tmp, out_prefix)
    key = B.provision(url, "inference")
    body = B.bodies(tmp)[(workload, "marga")].read_bytes()
    path = B.PATHS[workload]
    send(port, path, body, key, WARM_UP)
    time.sleep(1)
    callgrind_control("--instr=on", str(proc.pid))
    sent = send(port, path, body, key, requests)
    time.sleep(4)  # the request log's and the ledger's next flush
    callgrind_control("--instr=off", str(proc.pid))
    callgrind_control("--dump", str(proc.pid))
    time.sleep(1)
    for p in (proc, mock):
        p.terminate()
        p.wait(timeout=60)
    by_kind, functions, names = Counter(), Counter(), {}
    for path in sorted(tmp.glob(f"{out_prefix.name}.{proc.pid}*")):
        total, self_cost = read_profile(path, names)
        if total:
            by_kind[thread_kind(self_cost)] += total
            functions.update(self_cost)
    return {"workload": workload, "build": str(bindir), "requests": sent,
            "per_request": {k: round(v / sent) for k, v in by_kind.items()},
            "total_per_request": round(sum(by_kind.values()) / sent)}, functions


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="*", default=[str(B.BIN)])
    ap.add_argument("--workloads", default="chat")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--top", type=int, default=0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="marga-instructions-"))
    results = {}
    try:
        for workload in args.workloads.split(","):
            for build in args.builds:
                B.BIN = Path(build).resolve()
                row, functions = measure(B.BIN, workload, args.requests, tmp)
                results[(workload, build)] = row
                print(json.dumps(row), flush=True)
                for name, cost in functions.most_common(args.top):
                    print(f"  {cost / row['requests']:9.0f}  {name[:140]}")
    finally:
        B.cleanup()
    print(f"\n| workload | build | instructions / request | serving | background | sqlite | other |\n|---|---|---:|---:|---:|---:|---:|")
    for (workload, build), row in results.items():
        base = results[(workload, args.builds[0])]["total_per_request"]
        k = row["per_request"]
        ratio = f" ({row['total_per_request'] / base:.3f}×)" if build != args.builds[0] else ""
        print(f"| {workload} | {build} | {row['total_per_request']:,}{ratio} | {k.get('serving', 0):,} | "
              f"{k.get('background', 0):,} | {k.get('sqlite', 0):,} | {k.get('other', 0):,} |")


if __name__ == "__main__":
    main()
