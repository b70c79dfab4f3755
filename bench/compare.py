#!/usr/bin/env python3
"""Compare Marga builds in one run: A/B (or more) against one mock upstream.

    python3 bench/compare.py OLD_BINARY NEW_BINARY [...] [--workloads chat,embed,stream]
                             [--rounds 3] [--duration 5] [--rates 1000]

Each binary gets its own fresh data directory, the same generated config as bench.py and
an inference key (so the whole request path runs). Binaries alternate within each round
(the order flips every round), so background load on a shared machine hits them alike;
the median round is reported. Prints max throughput (wrk, closed loop, 64 connections) and
Marga's CPU time per request for each, and with --rates, latency at fixed open-loop rates
(oha). Save an old build first, e.g. `cp target/release/marga /tmp/marga-before`.

Uses bench.py's helpers; the tools are those bench/run.sh installs (wrk, oha).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench as B  # noqa: E402


def start(binary, index, config_text, tmp):
    data = tmp / f"data-{index}"
    data.mkdir()
    cfg = tmp / f"marga-{index}.toml"
    cfg.write_text(config_text)
    port = B.free_port()
    env = dict(os.environ, MARGA_MASTER_KEY=B.MASTER_KEY, RUST_LOG="warn")
    cmd = [binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data), "--config", str(cfg)]
    proc = B.track(subprocess.Popen(cmd, env=env, stdout=open(tmp / f"marga-{index}.log", "w"),
                                    stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    B.wait_http(url + "/health")
    return {"binary": binary, "proc": proc, "url": url, "key": B.provision(url, "inference")}


def measure(target, workload, bodies, args, rate=None):
    url = target["url"] + B.PATHS[workload]
    body, auth = bodies[(workload, "marga")], f"Bearer {target['key']}"
    before = B.cpu_ticks([target["proc"].pid])
    if rate is None:
        r = B.run_wrk(url, body, auth, args.duration, args.connections, 1, "")
        requests = r["requests"]
        result = {"rps": requests / (r["duration_us"] / 1e6)}
    else:
        o = B.run_oha(url, body, auth, args.duration, args.connections, rate, "")
        requests = rate * args.duration
        p = o["latencyPercentiles"]
        result = {"p50_us": p["p50"] * 1e6, "p99_us": p["p99"] * 1e6}
    ticks = B.cpu_ticks([target["proc"].pid]) - before
    result["cpu_us_per_req"] = ticks / B.CLK_TCK * 1e6 / max(requests, 1)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binaries", nargs="+", help="marga binaries to compare (the first is the reference)")
    ap.add_argument("--workloads", default="chat,embed,stream")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rates", default="", help="e.g. 1000,5000: also latency at these open-loop rates")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r]
    tmp = Path(tempfile.mkdtemp(prefix="marga-compare-"))
    try:
        _, mock_url = B.start_mock(0, "", tmp, "mock")
        config_text = B.marga_config({"mock": mock_url, "mockstream": mock_url, "mockslow": mock_url}, 2)
        targets = [start(b, i, config_text, tmp) for i, b in enumerate(args.binaries)]
        bodies = B.bodies(tmp)
        results = {}
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else targets[::-1]
            for workload in args.workloads.split(","):
                for rate in [None] + rates:
                    for t in order:
                        if rnd == 0 and rate is None:
                            measure(t, workload, bodies, argparse.Namespace(**{**vars(args), "duration": 1}))
                        r = measure(t, workload, bodies, args, rate)
                        results.setdefault((workload, rate, t["binary"]), []).append(r)
                        B.log(f"round {rnd + 1} {workload:6} {rate or 'max':>5} {t['binary']}: "
                              + "  ".join(f"{k} {v:,.1f}" for k, v in r.items()))
        report(results, args.binaries)
    finally:
        B.cleanup()


def report(results, binaries):
    print("\n| workload | load | binary | req/s or p50/p99 µs (median round) | CPU µs/req | vs first |")
    print("|---|---|---|---|---:|---:|")
    for (workload, rate, binary), runs in results.items():
        med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
        first = results[(workload, rate, binaries[0])]
        ref = statistics.median(r["cpu_us_per_req"] for r in first)
        if rate is None:
            shown = f"{med('rps'):,.0f} req/s"
            ratio = med("rps") / statistics.median(r["rps"] for r in first)
            vs = f"{ratio:.2f}× req/s, {med('cpu_us_per_req') / ref:.2f}× CPU"
        else:
            shown = f"{med('p50_us'):,.0f} / {med('p99_us'):,.0f}"
            vs = f"{med('cpu_us_per_req') / ref:.2f}× CPU"
        print(f"| {workload} | {rate or 'max'} | `{binary}` | {shown} | {med('cpu_us_per_req'):.1f} | {vs} |")


if __name__ == "__main__":
    main()
