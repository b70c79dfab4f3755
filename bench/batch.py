#!/usr/bin/env python3
"""Batch benchmark: items per second for a 10k-item batch against the mock upstream, and the
gateway's peak memory while a 200 MiB file is uploaded.

    cargo build --release -p marga-gateway -p mock-upstream
    python3 bench/batch.py [--items 10000] [--upload-mib 200] [--bin-dir target/release]

Starts a mock upstream and `marga` (fresh temp data dir, SQLite), both on 127.0.0.1, and
stops them on exit. Standard library only. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

KEY = "marga_mk_bench_" + secrets.token_hex(12)


def start(argv: list[str], ready: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    out = open(log, "w")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    pattern = re.compile(ready)
    assert proc.stdout is not None
    for line in proc.stdout:
        out.write(line)
        found = pattern.search(line)
        if found:
            threading.Thread(target=lambda: [out.write(l) for l in proc.stdout], daemon=True).start()
            return proc, found.group(1).rstrip("/")
    raise RuntimeError(f"{argv[0]} did not start; see {log}")


def request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> dict:
    req = urllib.request.Request(url, data=body, method=method, headers={"authorization": f"Bearer {KEY}", **(headers or {})})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def upload(base: str, purpose: str, chunks, filename: str = "input.jsonl") -> dict:
    """Streams a multipart upload (chunked) so the client never holds the file either."""
    boundary = "bench-" + secrets.token_hex(8)
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head
        yield from chunks
        yield tail

    req = urllib.request.Request(
        f"{base}/v1/files",
        data=body(),
        method="POST",
        headers={"authorization": f"Bearer {KEY}", "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def chat_line(i: int) -> bytes:
    body = {"model": "bench/chat", "max_tokens": 16, "messages": [{"role": "user", "content": f"benchmark item {i}"}]}
    return (json.dumps({"custom_id": f"i{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n").encode()


def run_batch(base: str, items: int) -> tuple[float, dict]:
    data = b"".join(chat_line(i) for i in range(items))
    file = upload(base, "batch", [data])
    started = time.monotonic()
    batch = request("POST", f"{base}/v1/batches", json.dumps({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).encode(), {"content-type": "application/json"})
    while batch["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(0.05)
        batch = request("GET", f"{base}/v1/batches/{batch['id']}")
    return time.monotonic() - started, batch


def big_upload(base: str, pid: int, mib: int) -> tuple[float, int, int]:
    line = chat_line(0)
    per_chunk = (1 << 20) // len(line)
    chunk = line * per_chunk
    target = mib << 20
    count = target // len(chunk)
    before = rss_kib(pid, "VmHWM")
    started = time.monotonic()
    upload(base, "batch", (chunk for _ in range(count)), "big.jsonl")
    elapsed = time.monotonic() - started
    return elapsed, before, rss_kib(pid, "VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--upload-mib", type=int, default=200)
    parser.add_argument("--bin-dir", default="target/release")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    bins = Path(args.bin_dir)
    work = Path(tempfile.mkdtemp(prefix="marga-batch-bench-"))
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    procs = []
    try:
        mock, mock_url = start([str(bins / "mock-upstream"), "--listen", "127.0.0.1:0"], r"listening on (http://\S+)", env, work / "mock.log")
        procs.append(mock)
        config = work / "marga.toml"
        config.write_text(
            f'[batch]\nmax_file_bytes = {(args.upload_mib + 16) << 20}\nconcurrency = {args.concurrency}\nper_provider_concurrency = {args.concurrency}\n\n'
            f'[providers.mock]\nkind = "openai"\nbase_url = "{mock_url}/v1"\napi_key = "sk-mock"\nregion = "US"\n\n'
            '[models."bench/chat"]\nroutes = [{ provider = "mock", model = "gpt-mock", input_per_mtok = "0.15", output_per_mtok = "0.60", currency = "USD" }]\n'
        )
        marga, root = start(
            [str(bins / "marga"), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(work / "data"), "--config", str(config)],
            r"marga listening on (http://\S+)",
            {**env, "MARGA_MASTER_KEY": KEY, "RUST_LOG": "warn"},
            work / "marga.log",
        )
        procs.append(marga)
        idle = rss_kib(marga.pid, "VmRSS")
        # The upload first, so that its peak is not hidden by the batch's.
        elapsed_up, hwm_before, hwm_after = big_upload(root, marga.pid, args.upload_mib)
        elapsed, batch = run_batch(root, args.items)
        counts = batch["request_counts"]
        print("| measure | value |")
        print("|---|---|")
        print(f"| batch of {args.items} chat items (concurrency {args.concurrency}) | {elapsed:.1f} s, **{args.items / elapsed:.0f} items/s** ({counts['completed']} completed, {counts['failed']} failed) |")
        print(f"| RSS idle | {idle / 1024:.1f} MiB |")
        print(f"| upload of {args.upload_mib} MiB (JSONL checked line by line) | {elapsed_up:.1f} s ({args.upload_mib / elapsed_up:.0f} MiB/s) |")
        print(f"| peak RSS before / after the upload (VmHWM) | {hwm_before / 1024:.1f} MiB / {hwm_after / 1024:.1f} MiB |")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
