#!/usr/bin/env python3
"""Streaming (SSE) measurements for the Marga benchmark. Standard library only.

Two modes, both speaking HTTP/1.1 over raw sockets so that nothing between the
socket and the clock buffers or parses more than needed:

  latency  N streams over C persistent connections (one blocking thread each).
           Per stream: time to response headers, time to the first SSE event
           (first byte of the body: the model's first chunk), and the gaps
           between consecutive SSE events as they arrive.

  hold     N concurrent streams (asyncio) against a slow upstream; samples the
           gateway's resident memory (VmRSS of --pid) while they are open.

Prints one JSON object on stdout.
"""

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit

PROMPT = "please write a short answer about benchmarks and gateways today"


def request_bytes(url, auth, model):
    u = urlsplit(url)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Authorization: {auth}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return (u.hostname, u.port), head + body


class Dechunker:
    """Incremental decoder for a chunked (or Content-Length) HTTP/1.1 body."""

    def __init__(self, headers):
        self.buf = b""
        self.chunked = b"transfer-encoding: chunked" in headers.lower()
        self.remaining = None  # bytes left in the current chunk / whole body
        if not self.chunked:
            for line in headers.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    self.remaining = int(line.split(b":", 1)[1])
        self.done = (not self.chunked) and self.remaining == 0

    def feed(self, data):
        """Returns the decoded body bytes now available."""
        self.buf += data
        out = []
        if not self.chunked:
            take = self.buf if self.remaining is None else self.buf[: self.remaining]
            self.buf = self.buf[len(take):]
            if self.remaining is not None:
                self.remaining -= len(take)
                self.done = self.remaining == 0
            return take
        while True:
            if self.remaining is None or self.remaining == 0:
                if self.remaining == 0:  # CRLF after a chunk's data
                    if len(self.buf) < 2:
                        break
                    self.buf = self.buf[2:]
                    self.remaining = None
                i = self.buf.find(b"\r\n")
                if i < 0:
                    break
                size = int(self.buf[:i].split(b";")[0], 16)
                self.buf = self.buf[i + 2:]
                if size == 0:
                    # Last chunk; we send no trailers, so expect the final CRLF.
                    self.done = True
                    self.buf = self.buf[2:]
                    break
                self.remaining = size
            take = self.buf[: self.remaining]
            if not take:
                break
            out.append(take)
            self.buf = self.buf[len(take):]
            self.remaining -= len(take)
            if self.remaining > 0:
                break
        return b"".join(out)


def has_content(event):
    """True if an SSE event is a chat chunk with non-empty delta content."""
    if not event.startswith(b"data: {"):
        return False
    try:
        chunk = json.loads(event[6:])
    except ValueError:
        return False
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])


def read_headers(sock, buf):
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed before headers")
        buf += data
    i = buf.index(b"\r\n\r\n")
    return buf[:i], buf[i + 4:]


def one_stream(sock, req):
    """Sends one streaming request on a connected socket and reads it to the end."""
    t0 = time.perf_counter_ns()
    sock.sendall(req)
    headers, rest = read_headers(sock, b"")
    t_headers = time.perf_counter_ns()
    status = int(headers.split(b" ", 2)[1])
    dec = Dechunker(headers)
    events = []  # arrival time of each complete SSE event
    pending = b""
    done_seen = False
    first_content = None  # arrival of the first event carrying generated text
    content_times = []  # arrival of every event carrying generated text
    done_at = None

    def take(data, now):
        nonlocal pending, done_seen, first_content, done_at
        pending += dec.feed(data)
        while True:
            j = pending.find(b"\n\n")
            if j < 0:
                break
            ev, pending = pending[:j], pending[j + 2:]
            ev = ev.strip()
            if ev:
                events.append(now)
                if ev == b"data: [DONE]":
                    done_seen = True
                    done_at = now
                elif has_content(ev):
                    content_times.append(now)
                    if first_content is None:
                        first_content = now

    if rest:
        take(rest, t_headers)
    while not dec.done:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed mid-stream")
        take(data, time.perf_counter_ns())
    return {
        "status": status,
        "headers_ns": t_headers - t0,
        "first_event_ns": (events[0] - t0) if events else None,
        "first_content_ns": (first_content - t0) if first_content else None,
        "gaps_ns": [b - a for a, b in zip(content_times, content_times[1:])],
        "done_ns": (done_at - t0) if done_at else None,
        "events": len(events),
        "done": done_seen,
    }


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def latency_mode(args):
    addr, req = request_bytes(args.url, args.auth, args.model)
    results, errors = [], []
    lock = threading.Lock()
    counter = iter(range(args.streams))

    def worker():
        sock = None
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                break
            try:
                if sock is None:
                    sock = socket.create_connection(addr)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                r = one_stream(sock, req)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e))
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0

    ok = [r for r in results if r["status"] == 200 and r["done"]]
    us = lambda ns: None if ns is None else round(ns / 1000.0, 1)  # noqa: E731
    hdr = [r["headers_ns"] for r in ok]
    first = [r["first_event_ns"] for r in ok]
    ttft = [r["first_content_ns"] for r in ok if r["first_content_ns"] is not None]
    # Gaps between consecutive content events: the relay of generated text.
    # (The prelude is covered by TTFB/TTFT, the tail by time to [DONE].)
    gaps = [g for r in ok for g in r["gaps_ns"]]
    done = [r["done_ns"] for r in ok]
    out = {
        "streams": args.streams,
        "ok": len(ok),
        "bad_status": sum(1 for r in results if r["status"] != 200),
        "incomplete": sum(1 for r in results if r["status"] == 200 and not r["done"]),
        "errors": len(errors),
        "error_sample": errors[:3],
        "wall_s": round(wall, 2),
        "events_per_stream": statistics.median([r["events"] for r in ok]) if ok else None,
        "headers_p50_us": us(pct(hdr, 50)),
        "headers_p99_us": us(pct(hdr, 99)),
        "ttfb_p50_us": us(pct(first, 50)),
        "ttfb_p90_us": us(pct(first, 90)),
        "ttfb_p99_us": us(pct(first, 99)),
        "ttft_p50_us": us(pct(ttft, 50)),
        "ttft_p90_us": us(pct(ttft, 90)),
        "ttft_p99_us": us(pct(ttft, 99)),
        "done_p50_us": us(pct(done, 50)),
        "done_p99_us": us(pct(done, 99)),
        "gap_p50_us": us(pct(gaps, 50)),
        "gap_p90_us": us(pct(gaps, 90)),
        "gap_p99_us": us(pct(gaps, 99)),
        "gap_max_us": us(max(gaps) if gaps else None),
        "gap_mean_us": us(statistics.fmean(gaps) if gaps else None),
        "gaps": len(gaps),
    }
    print(json.dumps(out))


def rss_kb(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


async def hold_mode(args):
    (host, port), req = request_bytes(args.url, args.auth, args.model)
    stats = {"started": 0, "headers": 0, "first_event": 0, "done": 0, "errors": 0, "bad_status": 0}
    open_now = 0
    max_open = 0
    errs = []
    codes = {}
    gate = asyncio.Semaphore(args.connect_burst)

    async def stream():
        nonlocal open_now, max_open
        try:
            async with gate:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(req)
                await writer.drain()
                stats["started"] += 1
                head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                stats["bad_status"] += 1
                codes[status] = codes.get(status, 0) + 1
                if len(errs) < 3:
                    try:
                        body = await asyncio.wait_for(reader.read(400), 2)
                    except Exception:  # noqa: BLE001
                        body = b""
                    errs.append(f"HTTP {status}: {body[-300:].decode(errors='replace')}")
                writer.close()
                return
            stats["headers"] += 1
            open_now += 1
            max_open = max(max_open, open_now)
            dec = Dechunker(head)
            body = b""
            first = False
            try:
                while not dec.done:
                    # A slow reader: small reads with a pause between them.
                    data = await reader.read(args.read_bytes)
                    if not data:
                        raise ConnectionError("closed mid-stream")
                    body += dec.feed(data)
                    if not first and b"\n\n" in body:
                        first = True
                        stats["first_event"] += 1
                    if args.read_pause_ms:
                        await asyncio.sleep(args.read_pause_ms / 1000.0)
            finally:
                open_now -= 1
            if b"data: [DONE]" in body:
                stats["done"] += 1
            writer.close()
        except Exception as e:  # noqa: BLE001 - counted and reported
            stats["errors"] += 1
            if len(errs) < 3:
                errs.append(repr(e))

    samples = []
    stop = asyncio.Event()

    async def sampler():
        while not stop.is_set():
            samples.append((open_now, rss_kb(args.pid)))
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    rss_before = rss_kb(args.pid)
    s = asyncio.create_task(sampler())
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(stream() for _ in range(args.streams))), args.timeout)
    stop.set()
    await s
    wall = time.monotonic() - t0
    rss_vals = [r for _, r in samples if r is not None]
    full = [r for o, r in samples if r is not None and o >= int(args.streams * 0.99)]
    out = dict(stats)
    out.update({
        "streams": args.streams,
        "max_open": max_open,
        "wall_s": round(wall, 2),
        "error_sample": errs,
        "bad_status_codes": codes,
        "rss_before_kb": rss_before,
        "rss_peak_kb": max(rss_vals) if rss_vals else None,
        "rss_full_median_kb": int(statistics.median(full)) if full else None,
        "samples_full": len(full),
        "hwm_kb": rss_kb(args.pid, "VmHWM"),
    })
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["latency", "hold"])
    ap.add_argument("--url", required=True, help="…/v1/chat/completions")
    ap.add_argument("--auth", default="Bearer x", help="Authorization header value")
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16, help="latency mode: connections/threads")
    ap.add_argument("--pid", type=int, help="hold mode: process whose RSS is sampled")
    ap.add_argument("--connect-burst", type=int, default=256, help="hold mode: connects in flight at once")
    ap.add_argument("--read-bytes", type=int, default=512, help="hold mode: bytes per read")
    ap.add_argument("--read-pause-ms", type=float, default=10, help="hold mode: pause after each read")
    ap.add_argument("--timeout", type=float, default=120, help="hold mode: give up after this many seconds")
    args = ap.parse_args()
    if args.mode == "latency":
        latency_mode(args)
    else:
        if args.pid is None:
            ap.error("hold needs --pid")
        asyncio.run(hold_mode(args))


if __name__ == "__main__":
    sys.exit(main())
