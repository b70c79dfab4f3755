#!/usr/bin/env python3
"""Failover latency: how long a request takes when its first route is dead, against the same
request served directly by a healthy route. Starts two mock upstreams and Marga (release
binaries, 127.0.0.1 only), sends sequential requests, prints p50/p99 per case, and stops
everything it started.

Cases (model → routes, in order):
  healthy    → B
  refused    → dead (nothing listens on its port), B
  503        → A (answers 503), B
  503-stream → A (answers 503), B, streamed: time to the first content event

With the default breaker settings the dead route's breaker opens after 5 failures, after which
it is tried last: the "first 5" rows show the cost before the breaker learns, the rest after.
Usage: python3 bench/failover.py [--requests 200]
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mock(scenario=None):
    proc = subprocess.Popen([os.path.join(BIN, "mock-upstream"), "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    base = line.split("listening on ", 1)[1]
    if scenario:
        host, port = base.replace("http://", "").split(":")
        conn = http.client.HTTPConnection(host, int(port))
        conn.request("POST", "/__mock/scenario", json.dumps(scenario), {"content-type": "application/json"})
        conn.getresponse().read()
    return proc, base


def config(a, b, dead_port):
    route = lambda p: f'{{ provider = "{p}", model = "m", input_per_mtok = "0.1", output_per_mtok = "0.1", currency = "USD" }}'
    return f"""
[routing]
default_strategy = "ordered"
[providers.a]
kind = "openai"
base_url = "{a}/v1"
api_key = "x"
region = "US"
[providers.b]
kind = "openai"
base_url = "{b}/v1"
api_key = "x"
region = "US"
[providers.dead]
kind = "openai"
base_url = "http://127.0.0.1:{dead_port}/v1"
api_key = "x"
region = "US"
[models."f/healthy"]
routes = [{route("b")}]
[models."f/refused"]
routes = [{route("dead")}, {route("b")}]
[models."f/503"]
routes = [{route("a")}, {route("b")}]
"""


def timed(port, model, stream):
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "stream": stream}
    conn = http.client.HTTPConnection("127.0.0.1", port)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"authorization": "Bearer mk", "content-type": "application/json"})
    resp = conn.getresponse()
    if stream:
        while True:
            line = resp.readline()
            if not line or b'"content":"' in line and b'"content":""' not in line:
                break
        elapsed = time.perf_counter() - start
        resp.read()
    else:
        resp.read()
        elapsed = time.perf_counter() - start
    assert resp.status == 200, (model, resp.status)
    served_by = resp.getheader("x-br-provider")
    conn.close()
    return elapsed * 1e6, served_by


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    procs = []
    try:
        a, a_base = start_mock({"fail_first": 10**12, "fail_status": 503})
        b, b_base = start_mock()
        procs += [a, b]
        work = tempfile.mkdtemp(prefix="marga-failover-")
        with open(os.path.join(work, "c.toml"), "w") as f:
            f.write(config(a_base, b_base, free_port()))
        port = free_port()
        env = dict(os.environ, MARGA_MASTER_KEY="mk")
        marga = subprocess.Popen([os.path.join(BIN, "marga"), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(work, "d"),
                                  "--config", os.path.join(work, "c.toml")], env=env, stderr=subprocess.DEVNULL)
        procs.append(marga)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        print(f"| case | first 5 p50 µs | after p50 / p99 µs | served by |")
        print(f"|---|---:|---:|---|")
        for label, model, stream in [("healthy", "f/healthy", False), ("refused", "f/refused", False), ("503", "f/503", False), ("503, streamed (TTFT)", "f/503", True)]:
            samples = [timed(port, model, stream) for _ in range(args.requests)]
            first = [s for s, _ in samples[:5]]
            rest = [s for s, _ in samples[5:]]
            served = sorted({p for _, p in samples})
            print(f"| {label} | {statistics.median(first):,.0f} | {pct(rest, 0.5):,.0f} / {pct(rest, 0.99):,.0f} | {', '.join(served)} |")
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    sys.exit(main())
