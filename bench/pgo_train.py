#!/usr/bin/env python3
"""Runs an instrumented `marga` (built with `-Cprofile-generate`, or instrumented by BOLT;
see bench/pgo.sh) through the work it does in production, so that the compiler (or BOLT) can
lay out and inline the optimised build for that work: whole and streamed chat completions
over OpenAI-, Anthropic- and Gemini-kind upstreams, embeddings, legacy completions, a model
with five routes, the model list, and the everyday errors (unknown model, malformed body, bad key). The set-up is the
benchmark's (bench.py): the mock upstream, its generated config, an organisation with credit
and an inference key, so auth, admission, the credit lease, routing, the durable charge and
the request log all run. Marga is then stopped with SIGTERM, and writes its profile as it
exits.

    python3 bench/pgo_train.py INSTRUMENTED_MARGA [--seconds 3]

Needs only Python and target/release/mock-upstream; keep-alive connections from a few
threads (a few thousand requests a second is plenty: the profile counts where the code
goes, not how fast).
"""

import argparse
import http.client
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench as B  # noqa: E402

THREADS = 4
PROMPT = B.PROMPT


def workloads(key):
    """(name, method, path, body, headers, expected status) of each kind of request."""
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    chat = {"model": "bench/chat", "messages": [{"role": "user", "content": PROMPT}]}
    stream = {**chat, "model": "bench/stream", "stream": True, "stream_options": {"include_usage": True}}
    return [
        ("chat", "POST", "/v1/chat/completions", chat, auth, 200),
        ("chat, 5 routes", "POST", "/v1/chat/completions", {**chat, "model": "bench/chat5"}, auth, 200),
        ("streamed chat", "POST", "/v1/chat/completions", stream, auth, 200),
        ("embeddings", "POST", "/v1/embeddings", {"model": "bench/embed", "input": PROMPT}, auth, 200),
        ("completions", "POST", "/v1/completions", {"model": "bench/chat", "prompt": PROMPT}, auth, 200),
        ("streamed completions", "POST", "/v1/completions",
         {"model": "bench/stream", "prompt": PROMPT, "stream": True}, auth, 200),
        # The translations are production code too: code the training never runs is compiled
        # as cold. bench.py's config has Anthropic and Gemini upstreams on the same mock.
        ("chat via Anthropic", "POST", "/v1/chat/completions", {**chat, "model": "bench/chat-anthropic"}, auth, 200),
        ("streamed chat via Anthropic", "POST", "/v1/chat/completions",
         {**stream, "model": "bench/chat-anthropic"}, auth, 200),
        ("chat via Gemini", "POST", "/v1/chat/completions", {**chat, "model": "bench/chat-gemini"}, auth, 200),
        ("streamed chat via Gemini", "POST", "/v1/chat/completions", {**stream, "model": "bench/chat-gemini"},
         auth, 200),
        ("embeddings via Gemini", "POST", "/v1/embeddings", {"model": "bench/embed-gemini", "input": PROMPT},
         auth, 200),
        ("models", "GET", "/v1/models", None, auth, 200),
        ("unknown model", "POST", "/v1/chat/completions", {**chat, "model": "nobody/nothing"}, auth, 404),
        ("malformed body", "POST", "/v1/chat/completions", "{", auth, 400),
        # Refused before its body is read, so the connection cannot be reused: one each.
        ("bad key", "POST", "/v1/chat/completions", chat,
         {**auth, "Authorization": "Bearer nope", "Connection": "close"}, 401),
    ]


def drive(url, work, seconds):
    """Sends `work` over THREADS keep-alive connections for `seconds`; returns the count."""
    _, method, path, body, headers, expected = work
    data = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
    host = url.removeprefix("http://")
    deadline = time.monotonic() + seconds
    counts, failures = [0] * THREADS, []

    def run(i):
        conn = http.client.HTTPConnection(host, timeout=10)
        while time.monotonic() < deadline:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != expected:
                failures.append(response.status)
                return
            counts[i] += 1
            if headers.get("Connection") == "close":
                conn.close()
                conn = http.client.HTTPConnection(host, timeout=10)
        conn.close()

    B.in_threads(run, [(i,) for i in range(THREADS)])
    if failures:
        raise SystemExit(f"{work[0]}: status {failures[0]}, expected {expected}")
    return sum(counts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("marga", help="the instrumented marga binary")
    ap.add_argument("--seconds", type=float, default=3, help="per kind of request (the errors get a third)")
    a = ap.parse_args()
    B.MARGA = Path(a.marga)
    tmp = Path(tempfile.mkdtemp(prefix="marga-pgo-"))
    try:
        _, mock = B.start_mock(0, "", tmp, "mock")
        proc, url, _ = B.start_marga(B.marga_config({"mock": mock, "mockstream": mock, "mockslow": mock}, 5),
                                     tmp, "", tmp)
        key = B.provision(url, "inference")
        for work in workloads(key):
            seconds = a.seconds if work[5] == 200 else a.seconds / 3
            B.log(f"{work[0]}: {drive(url, work, seconds):,} requests")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if proc.returncode != 0:
            raise SystemExit(f"marga exited with status {proc.returncode}; see {tmp}/marga.log")
        B.log("marga stopped; its profile is written")
    finally:
        B.cleanup()


if __name__ == "__main__":
    main()
