#!/usr/bin/env python3
"""Where Marga's request hop spends its time, stage by stage, read with uprobes.

The request hop (bench/hops.py) runs from the client's request reaching Marga to Marga's
request leaving for the upstream. This script splits it: it sends the same sequential streams
as hops.py (a pause before each, so that every request finds the serving thread asleep), while
`perf` records, on Marga's serving threads only, the return of the `recvfrom` that reads the
request, the entry of a few functions along the path (uprobes: a breakpoint each, ≈ 1-2 µs
added per stage), and the `writev` that sends the upstream request. Per stream, each stage's
first entry is timed from that `recvfrom`; p50 / p90 over the streams, in µs:

  handler         hyper has parsed the request and axum routed it: the handler's first poll
  authenticate    the key checked against the accounts cache
  parse           the body read; the JSON parse begins
  plan            admission done (limits, guardrails, credit reservation); routes planned
  upstream call   the provider's request built; hyper's client takes it
  writev          the request leaves for the upstream

Needs root (perf probe) and a release build with symbols (the default profile keeps them).

    python3 bench/stages.py [--streams 150] [--bin target/release]
"""

import argparse
import atexit
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
import hops  # noqa: E402

# Stage name, and the demangled symbols (`nm -C`) whose entry marks it, in path order.
STAGES = [
    ("handler", re.compile(r"^marga_gateway::http::chat::chat_completions::\{\{closure\}\}$")),
    ("authenticate", re.compile(r"^marga_gateway::accounts::Accounts::authenticate$")),
    ("parse", re.compile(r"^marga_gateway::http::extract::parse_json$")),
    ("plan", re.compile(r"^marga_gateway::pipeline::plan::plan$")),
    ("upstream call", re.compile(r"^hyper_util::client::legacy::client::Client<C,B>::send_request::\{\{closure\}\}$")),
]
GROUP = "marga_stages"
EVENT = re.compile(r"^\s*(\S+)\s+(\d+\.\d+):\s+(\S+):")


def text_delta(binary):
    """Virtual address minus file offset of the executable segment (uprobes take offsets)."""
    out = subprocess.run(["readelf", "-lW", str(binary)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD" and "E" in fields[-2]:
            return int(fields[2], 16) - int(fields[1], 16)
    raise SystemExit("no executable LOAD segment in " + str(binary))


def add_probes(binary):
    """One uprobe per symbol of each stage; returns {probe name: stage}."""
    delta = text_delta(binary)
    symbols = subprocess.run(["nm", "-C", str(binary)], capture_output=True, text=True, check=True).stdout
    probes, count = {}, 0
    subprocess.run(["perf", "probe", "-q", "-d", f"{GROUP}:*"], capture_output=True)
    for line in symbols.splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 3 or parts[1] not in ("t", "T"):
            continue
        for stage, pattern in STAGES:
            if pattern.match(parts[2]):
                name = f"s{count}"
                count += 1
                offset = int(parts[0], 16) - delta
                subprocess.run(["perf", "probe", "-q", "-x", str(binary), "-a", f"{GROUP}:{name}=0x{offset:x}"],
                               check=True, capture_output=True)
                probes[name] = stage
    atexit.register(lambda: subprocess.run(["perf", "probe", "-q", "-d", f"{GROUP}:*"], capture_output=True))
    missing = {stage for stage, _ in STAGES} - set(probes.values())
    if missing:
        raise SystemExit(f"no symbol found for: {', '.join(sorted(missing))} (a release build with symbols?)")
    return probes


def events(data):
    """(thread name, time, event) of every recorded event, in order."""
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,time,event"],
                         capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        m = EVENT.match(line)
        if m and m.group(1).startswith("marga-http"):
            found.append((m.group(1), float(m.group(2)), m.group(3)))
    return found


def stage_times(found, probes):
    """Per request, {stage: µs since its recvfrom}, up to the upstream writev. A request is
    found by its authentication (the handler is polled again later, when the upstream answers)."""
    streams = []
    for i, (thread, _, event) in enumerate(found):
        if probes.get(event.split(":")[-1]) != "authenticate":
            continue
        begin = next((j for j in range(i - 1, -1, -1)
                      if found[j][0] == thread and found[j][2].endswith("sys_exit_recvfrom")), None)
        if begin is None:
            continue
        start, times = found[begin][1], {}
        for th, t, e in found[begin + 1:]:
            if th != thread:
                continue
            if e.endswith("sys_enter_writev"):
                times["writev"] = (t - start) * 1e6
                break
            stage = probes.get(e.split(":")[-1])
            if stage:
                times.setdefault(stage, (t - start) * 1e6)
        if "writev" in times and "upstream call" in times:
            streams.append(times)
    return streams


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hops.stream_options(ap, 150)
    a = hops.parse_stream_options(ap)
    probes = add_probes((a.bin / "marga").resolve())
    tmp = Path(tempfile.mkdtemp(prefix="marga-stages-"))
    _, mock_url = bench.start_mock(a.chunk_delay_ms, None, tmp, "mockstream")
    url, key = hops.start_gateway("marga", mock_url, tmp)
    pid = bench.PROCS[-1].pid
    hops.run_streams(url, key, 20, a.pause_ms / 1000)  # warm-up
    data = tmp / "perf.data"
    rec = subprocess.Popen(["perf", "record", "-q", "-o", str(data), "-p", str(pid), "-e", f"{GROUP}:*",
                            "-e", "syscalls:sys_exit_recvfrom", "-e", "syscalls:sys_enter_writev"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    hops.run_streams(url, key, a.streams, a.pause_ms / 1000)
    rec.send_signal(2)
    rec.wait()
    streams = stage_times(events(data), probes)
    print(f"{len(streams)} streams; µs since the request's recvfrom, p50 / p90 (cumulative)")
    for stage in [s for s, _ in STAGES] + ["writev"]:
        values = sorted(s[stage] for s in streams if stage in s)
        if values:
            print(f"  {stage:14s} {statistics.median(values):6.0f} / {values[int(0.9 * (len(values) - 1))]:6.0f}")


if __name__ == "__main__":
    main()
