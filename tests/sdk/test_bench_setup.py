"""The benchmark's own setup, checked on every test run: `bench/bench.py`'s generated config
is accepted by the real gateway, and every workload body the benchmark scripts send
(`bench.py`, `compare.py`, `instructions.py`: the OpenAI-compatible relay and the Anthropic
and Gemini adapters) is served through it with the benchmark's inference key, so the scripts
cannot drift from the gateway unnoticed. Nothing is timed here: benchmarks are not tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO_ROOT, _binary

sys.path.insert(0, str(REPO_ROOT / "bench"))
import bench  # noqa: E402


@pytest.fixture(scope="module")
def bench_gateway():
    marga, mock = _binary("MARGA_BIN", "marga"), _binary("MOCK_BIN", "mock-upstream")
    if marga.parent != mock.parent:
        pytest.skip("bench.py takes both binaries from one directory")
    bench.use_binaries(marga.parent)
    tmp = Path(tempfile.mkdtemp(prefix="marga-bench-setup-"))
    try:
        _, base = bench.start_mock(0, None, tmp, "mock")
        config = bench.marga_config({"mock": base, "mockstream": base, "mockslow": base}, 5)
        _, url, _ = bench.start_marga(config, tmp, None, tmp)
        yield url, bench.provision(url, "inference"), config, tmp
    finally:
        bench.cleanup()
        bench.PROCS.clear()


def test_the_benchmark_config_passes_check_config(bench_gateway):
    _, _, config, tmp = bench_gateway
    path = tmp / "check.toml"
    path.write_text(config)
    checked = subprocess.run([str(bench.MARGA), "check-config", "--config", str(path)],
                             capture_output=True, text=True, timeout=60)
    said = checked.stdout + checked.stderr
    assert checked.returncode == 0, said
    for provider in ("mock,", "mockstream", "mockanthropic", "mockgemini", "mock5"):
        assert provider in said, said


@pytest.mark.parametrize("workload", ["chat", "embed", "embed1536", "stream", "chat-anthropic",
                                      "stream-anthropic", "chat-gemini", "stream-gemini",
                                      "embed1536-gemini"])
def test_every_benchmark_workload_is_served(bench_gateway, workload):
    url, key, _, tmp = bench_gateway
    body = bench.bodies(tmp)[(workload, "marga")].read_bytes()
    request = urllib.request.Request(url + bench.PATHS[workload], data=body, method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    if json.loads(body).get("stream"):
        events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", text
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), text
        assert chunks[-1]["usage"]["completion_tokens"] > 0, text
    else:
        answer = json.loads(text)
        assert answer.get("usage", {}).get("total_tokens", 0) > 0, text
