#!/usr/bin/env python3
"""Turns a bench results .jsonl into Markdown tables and a target check.

Usage: report.py RESULTS.jsonl [--out RESULTS.md]
"""

import argparse
import json
import sys

# Targets from the performance issue (2-core machine, everything shared).
MIN_THROUGHPUT_VS_NGINX = 0.5
MAX_ADDED_P50_US = 150
MAX_ADDED_P99_US = 1000
MAX_TTFB_ADDED_US = 100
MAX_GAP_ADDED_US = 100  # "nothing measurable": within the client's noise
MAX_IDLE_MIB = 60
MAX_HOLD_MIB = 250


def f(v, nd=0):
    if v is None:
        return "–"
    if isinstance(v, float) and nd == 0:
        return f"{v:,.0f}"
    if isinstance(v, (int, float)):
        return f"{v:,.{nd}f}"
    return str(v)


def ratio(a, b):
    return None if not a or not b else a / b


def mib(kb):
    return None if kb is None else kb / 1024


def render(rows):
    out = []
    w = out.append
    meta = next((r for r in rows if r["kind"] == "meta"), {})
    m = meta.get("machine", {})
    w(f"# Marga benchmark — {meta.get('started', '?')}\n")
    dirty = meta.get("dirty") or []
    w(f"- command: `{meta.get('command', '?')}` (git {meta.get('git', '?')}"
      + (f", uncommitted changes in {', '.join(dirty)})" if dirty else ")"))
    w(f"- machine: {m.get('nproc')} CPUs, {m.get('cpu')}, {m.get('ram_gib')} GiB RAM, Linux {m.get('kernel')}, "
      f"load average at start {m.get('load_avg_start')}")
    w(f"- tools: {meta.get('wrk')}; {meta.get('oha')}; {meta.get('nginx')}")
    if meta.get("marga"):
        kind = {"target/pgo/marga": " (the profile-guided build with BOLT's layout when llvm-bolt was found, bench/pgo.sh)",
                "target/pgo/release/marga": " (the profile-guided build, bench/pgo.sh)",
                "target/release/marga": " (the plain release build, not profile-guided)"}.get(meta["marga"], "")
        w(f"- marga binary: `{meta['marga']}`{kind}")
    hot = meta.get("hot_functions")
    if hot:
        share = hot["in_binary"] / max(hot["listed"], 1)
        w(f"- symbol order: {hot['in_binary']:,} of the {hot['listed']:,} names in hot-functions.txt are in the binary"
          + (" — **stale list**: regenerate it with `python3 bench/hot_functions.py` and rebuild" if share < 0.8 else ""))
    end = next((r for r in rows if r["kind"] == "end"), {})
    if end:
        w(f"- load average at end {end.get('load_avg_end')} (the machine is shared: compare ratios within this run)")
    a = meta.get("args", {})
    w(f"- settings: {a.get('rounds')} rounds × {a.get('duration')} s per run (targets alternate; median round), {a.get('connections')} connections, wrk threads {a.get('wrk_threads')}, "
      f"nginx worker_processes {a.get('nginx_workers')}, Marga called with the {a.get('marga_key', 'master')} key, pinning mock={a.get('mock_cpus') or 'none'} "
      f"proxy={a.get('proxy_cpus') or 'none'} loadgen={a.get('loadgen_cpus') or 'none'}\n")
    checks = []

    tp = [r for r in rows if r["kind"] == "throughput"]
    if tp:
        w("## Max throughput (wrk, closed loop)\n")
        w("| workload | direct req/s | nginx req/s | marga req/s | marga/direct | marga/nginx | nginx/direct "
          "| marga CPU µs/req | nginx CPU µs/req | marga cores | errors (d/n/m) |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for wl in dict.fromkeys(r["workload"] for r in tp):
            by = {r["target"]: r for r in tp if r["workload"] == wl}
            for mt in [t for t in ("marga", "marga5") if t in by]:
                d, n, g = by.get("direct", {}), by.get("nginx", {}), by[mt]
                label = wl if mt == "marga" else f"{wl} (5 routes)"
                rn = ratio(g.get("rps"), n.get("rps"))
                w(f"| {label} | {f(d.get('rps'))} | {f(n.get('rps'))} | {f(g.get('rps'))} "
                  f"| {f(ratio(g.get('rps'), d.get('rps')), 2)} | {f(rn, 2)} "
                  f"| {f(ratio(n.get('rps'), d.get('rps')), 2)} | {f(g.get('cpu_us_per_req'), 1)} "
                  f"| {f(n.get('cpu_us_per_req'), 1)} | {f(g.get('cpu_cores'), 2)} "
                  f"| {d.get('errors')}/{n.get('errors')}/{g.get('errors')} |")
                if rn is not None:
                    checks.append((f"throughput {label}: marga ≥ {MIN_THROUGHPUT_VS_NGINX}× nginx",
                                   f"{rn:.2f}×", rn >= MIN_THROUGHPUT_VS_NGINX))
        w("")

    lat = [r for r in rows if r["kind"] == "latency"]
    if lat:
        w("## Latency at fixed open-loop rates (oha -q, latency correction on)\n")
        w("| workload | rate | direct p50/p99 µs | nginx p50/p99 µs | marga p50/p99 µs | nginx added p50/p99 "
          "| **marga added p50/p99** | marga achieved req/s | marga CPU µs/req | nginx CPU µs/req | non-200/errors (m) |")
        w("|---|---:|---|---|---|---|---|---:|---:|---:|---|")
        keys = dict.fromkeys((r["workload"], r["rate"]) for r in lat)
        for wl, rate in keys:
            by = {r["target"]: r for r in lat if r["workload"] == wl and r["rate"] == rate}
            d, n, g = by.get("direct", {}), by.get("nginx", {}), by.get("marga", {})
            pp = lambda r: f"{f(r.get('p50_us'))} / {f(r.get('p99_us'))}"  # noqa: E731
            add = lambda r, k: None if r.get(k) is None or d.get(k) is None else r[k] - d[k]  # noqa: E731
            w(f"| {wl} | {rate} | {pp(d)} | {pp(n)} | {pp(g)} | {f(add(n, 'p50_us'))} / {f(add(n, 'p99_us'))} "
              f"| **{f(add(g, 'p50_us'))} / {f(add(g, 'p99_us'))}** | {f(g.get('achieved_rps'))} "
              f"| {f(g.get('cpu_us_per_req'), 1)} | {f(n.get('cpu_us_per_req'), 1)} | {g.get('non_200')}/{g.get('errors')} |")
            a50, a99 = add(g, "p50_us"), add(g, "p99_us")
            if a50 is not None:
                checks.append((f"latency {wl} @{rate}/s: added p50 ≤ {MAX_ADDED_P50_US} µs", f"{a50:,.0f} µs",
                               a50 <= MAX_ADDED_P50_US))
                checks.append((f"latency {wl} @{rate}/s: added p99 ≤ {MAX_ADDED_P99_US} µs", f"{a99:,.0f} µs",
                               a99 <= MAX_ADDED_P99_US))
        w("")

    st = [r for r in rows if r["kind"] == "streaming"]
    if st:
        by = {r["target"]: r for r in st}
        d = by.get("direct", {})
        w(f"## Streaming (stream_client.py; mock waits {st[0].get('chunk_delay_ms')} ms between chunks)\n")
        w("TTFB = first body byte (first SSE event); TTFT = first event carrying generated text. "
          "Gaps = time between consecutive content events. [DONE] = time to the end of the stream.\n")
        w("| target | streams ok | events/stream | TTFB p50/p99 µs | TTFB added p50/p99 | TTFT p50/p99 µs "
          "| **TTFT added p50/p99** | gap p50/p99 µs | **gap added p50/p99** | gap mean µs | gap max µs "
          "| [DONE] added p50 µs |")
        w("|---|---:|---:|---|---|---|---|---|---|---:|---:|---:|")
        for name in ("direct", "nginx", "marga"):
            r = by.get(name)
            if not r:
                continue
            add = lambda k: None if r.get(k) is None or d.get(k) is None else r[k] - d[k]  # noqa: E731
            two = lambda a, b: f"{f(a)} / {f(b)}"  # noqa: E731
            w(f"| {name} | {r['ok']}/{r['streams']} | {f(r.get('events_per_stream'))} "
              f"| {two(r.get('ttfb_p50_us'), r.get('ttfb_p99_us'))} | {two(add('ttfb_p50_us'), add('ttfb_p99_us'))} "
              f"| {two(r.get('ttft_p50_us'), r.get('ttft_p99_us'))} | **{two(add('ttft_p50_us'), add('ttft_p99_us'))}** "
              f"| {two(r.get('gap_p50_us'), r.get('gap_p99_us'))} | **{two(add('gap_p50_us'), add('gap_p99_us'))}** "
              f"| {f(r.get('gap_mean_us'))} | {f(r.get('gap_max_us'))} | {f(add('done_p50_us'))} |")
        g = by.get("marga")
        if g and d:
            t = g["ttfb_p50_us"] - d["ttfb_p50_us"]
            checks.append((f"streaming: first body byte added (p50) ≤ {MAX_TTFB_ADDED_US} µs", f"{t:,.0f} µs",
                           t <= MAX_TTFB_ADDED_US))
            t = g["ttft_p50_us"] - d["ttft_p50_us"]
            checks.append((f"streaming: first content token added (p50) ≤ {MAX_TTFB_ADDED_US} µs", f"{t:,.0f} µs",
                           t <= MAX_TTFB_ADDED_US))
            gp = g["gap_p50_us"] - d["gap_p50_us"]
            checks.append((f"streaming: inter-chunk gap added (p50) ≤ {MAX_GAP_ADDED_US} µs (not measurable)",
                           f"{gp:,.0f} µs", abs(gp) <= MAX_GAP_ADDED_US))
            checks.append(("streaming: every stream complete", f"{g['ok']}/{g['streams']}", g["ok"] == g["streams"]))
        w("")

    mem = {r["what"]: r for r in rows if r["kind"] == "memory"}
    if mem:
        w("## Marga memory\n")
        w("| when | RSS MiB | notes |")
        w("|---|---:|---|")
        if "idle_start" in mem:
            v = mib(mem["idle_start"]["rss_kb"])
            w(f"| idle, after start | {f(v, 1)} | |")
            checks.append((f"memory: idle RSS ≤ {MAX_IDLE_MIB} MiB", f"{v:.1f} MiB", v <= MAX_IDLE_MIB))
        if "after_load" in mem:
            x = mem["after_load"]
            w(f"| idle, after the load phases (≈{x['requests']:,} requests) | {f(mib(x['rss_kb']), 1)} "
              f"| VmHWM {f(mib(x['hwm_kb']), 1)}; Marga is then restarted for the hold |")
        if "idle_before_hold" in mem:
            w(f"| idle, fresh process before the hold | {f(mib(mem['idle_before_hold']['rss_kb']), 1)} | |")
        if "after_cancel" in mem:
            v = mib(mem["after_cancel"]["rss_kb"])
            w(f"| 3 s after one client disconnects mid-stream (Marga loads its tokenizer to count) | {f(v, 1)} | |")
        if "after_tokenizer_idle" in mem:
            v = mib(mem["after_tokenizer_idle"]["rss_kb"])
            w(f"| idle, {mem['after_tokenizer_idle'].get('after_s', '?')} s after that disconnect "
              f"(the tokenizer is dropped after 10 s unused) | {f(v, 1)} | |")
            checks.append((f"memory: idle RSS after a mid-stream disconnect (tokenizer used, then dropped) "
                           f"≤ {MAX_IDLE_MIB} MiB", f"{v:.1f} MiB", v <= MAX_IDLE_MIB))
        h = mem.get("hold")
        if h:
            base = h.get("rss_before_kb") or 0
            per = (h["rss_peak_kb"] - base) / h["streams"] if h.get("rss_peak_kb") else None
            w(f"| holding {h['streams']} streams (peak sample) | {f(mib(h['rss_peak_kb']), 1)} "
              f"| ≈{f(per, 1)} KiB per stream; median while ≥99 % open {f(mib(h['rss_full_median_kb']), 1)}; "
              f"max open {h['max_open']}; done {h['done']}, errors {h['errors']}, bad status {h['bad_status']}; "
              f"chunk delay {h.get('chunk_delay_ms')} ms |")
            v = mib(h["rss_peak_kb"])
            checks.append((f"memory: RSS holding {h['streams']} streams ≤ {MAX_HOLD_MIB} MiB", f"{v:.1f} MiB",
                           v <= MAX_HOLD_MIB))
            checks.append((f"memory: all {h['streams']} held streams open at once and complete",
                           f"max open {h['max_open']}, done {h['done']}",
                           h["max_open"] == h["streams"] and h["done"] == h["streams"]))
        if "idle_after_hold" in mem:
            w(f"| 5 s after the hold | {f(mib(mem['idle_after_hold']['rss_kb']), 1)} | |")
        if "idle_30s_after_hold" in mem:
            v = mib(mem["idle_30s_after_hold"]["rss_kb"])
            w(f"| idle, 30 s after the hold | {f(v, 1)} | |")
            checks.append((f"memory: idle RSS 30 s after the held streams ended ≤ {MAX_IDLE_MIB} MiB", f"{v:.1f} MiB",
                           v <= MAX_IDLE_MIB))
        if "end" in mem:
            w(f"| end of run | {f(mib(mem['end']['rss_kb']), 1)} | peak VmHWM {f(mib(mem['end']['hwm_kb']), 1)} |")
        w("")

    for rl in [r for r in rows if r["kind"] == "request_log"]:
        w(f"Request log: {rl['rows']} rows in `generations`, {int(rl['dropped'])} dropped "
          f"(≈{rl['marga_requests_counted']} completed requests counted by the clients, warm-ups excluded).\n")

    if checks:
        w("## Targets\n")
        w("| target | measured | met |")
        w("|---|---:|---|")
        for name, val, ok in checks:
            w(f"| {name} | {val} | {'yes' if ok else '**NO**'} |")
        w("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--out")
    a = ap.parse_args()
    with open(a.jsonl) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    md = render(rows)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(md + "\n")
    print(md)


if __name__ == "__main__":
    sys.exit(main())
