#!/usr/bin/env python3
"""Where a stream's first token spends its time, hop by hop, read off the wire.

Starts a mock upstream that waits --chunk-delay-ms (20) between stream events, and either
Marga (an inference key: the whole request path) or nginx (the bare pass-through of bench.py)
in front of it; sends sequential streamed chat requests over one keep-alive connection, a
pause between them, while tcpdump records the loopback traffic of both ports. From the
packets' kernel timestamps, per stream (p50 and p90 over the streams, in µs):

  request hop   the client's request reaches the gateway → the gateway's request leaves
                for the upstream (parse, authenticate, admit, plan, connect or reuse)
  upstream      the gateway's request → the upstream's first bytes back (the mock's share)
  relay hop     the upstream's first content event (the first one sent after the delay)
                → the gateway writes to the client (hold released, event relayed)
  next event    the same for the event after it (the stream already under way)

Nothing in the gateway or the client is instrumented, and the two gateways are measured the
same way, so their hops compare directly. Each hop starts with the gateway asleep (the
upstream paused 20 ms; the client 20 ms between streams): on a VM, waking an idle thread is
a large part of every hop. Needs root (tcpdump) and release binaries.

    python3 bench/hops.py [--target marga|nginx|both] [--streams 300]
"""

import argparse
import atexit
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (bench.py's process helpers and configuration)
import stream_client  # noqa: E402

PACKET = re.compile(r"(\d+\.\d+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): .*length (\d+)")


def start_gateway(target, mock_url, tmp):
    """The gateway's base URL and the key to call it with."""
    if target == "nginx":
        _, ports = bench.start_nginx({"mockstream": mock_url}, tmp, 2, None, tmp)
        return ports["mockstream"], "unused"
    config = bench.marga_config({"mock": mock_url, "mockstream": mock_url, "mockslow": mock_url}, 1)
    _, url, _ = bench.start_marga(config, tmp, None, tmp)
    return url, bench.provision(url, "inference")


def run_streams(url, key, count, pause):
    addr, request = stream_client.request_bytes(url + "/v1/chat/completions", f"Bearer {key}", "bench/stream")
    sock = socket.create_connection(addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    leftover = b""
    for _ in range(count):
        sock.sendall(request)
        head, rest = stream_client.read_headers(sock, leftover)
        body = stream_client.Dechunker(head)
        body.feed(rest)
        while not body.done:
            body.feed(sock.recv(65536))
        leftover = body.buf
        time.sleep(pause)
    sock.close()


def packets(pcap):
    """(time, source port, destination port, payload text) of every packet with a payload."""
    text = subprocess.run(["tcpdump", "-r", str(pcap), "-nn", "-tt", "-A"], capture_output=True, text=True).stdout
    out, current = [], None
    for line in text.splitlines():
        m = PACKET.match(line)
        if m:
            current = [float(m[1]), int(m[2]), int(m[3]), int(m[4]), ""]
            if current[3] > 0:
                out.append(current)
        elif current is not None:
            current[4] += line
    return out


def streams(pkts, gateway_port, upstream_port, delay_s):
    """Per stream: when the request arrived, left, came back, the first content came, went out."""
    found, cur = [], None
    for t, src, dst, _, payload in pkts:
        if dst == gateway_port and "POST" in payload:
            cur = {"arrived": t}
            found.append(cur)
        elif cur is None:
            continue
        elif dst == upstream_port and "POST" in payload and "forwarded" not in cur:
            cur["forwarded"] = t
        elif src == upstream_port and "forwarded" in cur and "answered" not in cur:
            cur["answered"] = t
        elif src == upstream_port and "answered" in cur and "content" not in cur and t - cur["answered"] > delay_s / 4:
            cur["content"] = t
        elif src == gateway_port and "content" in cur and "relayed" not in cur:
            cur["relayed"] = t
        elif src == upstream_port and "relayed" in cur and "next" not in cur and t - cur["content"] > delay_s / 4:
            cur["next"] = t
        elif src == gateway_port and "next" in cur and "next relayed" not in cur:
            cur["next relayed"] = t
    return found


def hop(found, start, end):
    values = sorted((s[end] - s[start]) * 1e6 for s in found if start in s and end in s)
    if not values:
        return "n/a"
    return f"{statistics.median(values):6.0f} / {values[int(0.9 * (len(values) - 1))]:6.0f}"


def measure(target, streams_count, delay_ms, pause):
    tmp = Path(tempfile.mkdtemp(prefix=f"marga-hops-{target}-"))
    _, mock_url = bench.start_mock(delay_ms, None, tmp, "mockstream")
    url, key = start_gateway(target, mock_url, tmp)
    gateway_port, upstream_port = int(url.rsplit(":", 1)[1]), int(mock_url.rsplit(":", 1)[1])
    run_streams(url, key, 20, pause)  # warm-up: connections open, caches filled
    pcap = tmp / "lo.pcap"
    dump = subprocess.Popen(["tcpdump", "-i", "lo", "-s", "256", "-nn", "-w", str(pcap),
                             f"tcp port {gateway_port} or tcp port {upstream_port}"], stderr=subprocess.DEVNULL)
    time.sleep(1)
    run_streams(url, key, streams_count, pause)
    time.sleep(0.3)
    dump.terminate()
    dump.wait()
    found = streams(packets(pcap), gateway_port, upstream_port, delay_ms / 1000)
    print(f"{target:6s} {len(found):4d} streams   request hop {hop(found, 'arrived', 'forwarded')}   "
          f"upstream {hop(found, 'forwarded', 'answered')}   relay hop {hop(found, 'content', 'relayed')}   "
          f"next event {hop(found, 'next', 'next relayed')}   (p50 / p90 µs)")
    bench.cleanup()
    bench.PROCS.clear()


def stream_options(ap, streams):
    """The options of a run of sequential streams (here and in stages.py)."""
    ap.add_argument("--streams", type=int, default=streams)
    ap.add_argument("--chunk-delay-ms", type=int, default=20)
    ap.add_argument("--pause-ms", type=int, default=20, help="between streams")
    ap.add_argument("--bin", type=Path, default=bench.BIN, help="directory with marga and mock-upstream")


def parse_stream_options(ap):
    """Parses them, points bench.py at the binaries, and stops what it starts at exit."""
    a = ap.parse_args()
    bench.use_binaries(a.bin)
    atexit.register(bench.cleanup)
    return a


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["marga", "nginx", "both"], default="both")
    stream_options(ap, 300)
    a = parse_stream_options(ap)
    for target in (["nginx", "marga"] if a.target == "both" else [a.target]):
        measure(target, a.streams, a.chunk_delay_ms, a.pause_ms / 1000)


if __name__ == "__main__":
    main()
