"""Fixtures for the SDK compatibility tests: the real `marga` binary in front of two
`mock-upstream` processes, driven through the official `openai` Python SDK.

Processes, started once per session:

* mock A: serves the `mock-openai`, `mock-anthropic` and `mock-gemini` providers;
* mock B: serves the `backup` provider (the second route of `test/failover`);
* marga: with a generated config (below), a temporary data dir and a fixed master key.

Binaries come from `MARGA_BIN` and `MOCK_BIN` (paths, relative to the repository root or
absolute), default `target/release/marga` and `target/release/mock-upstream`; `make test`
sets both. Each process's output goes to a log file in the session's temporary directory;
when startup fails the logs are shown, and when a test fails the end of the gateway's log is
printed in the summary.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MASTER_KEY = "sk-marga-sdk-" + secrets.token_hex(16)
STARTUP_TIMEOUT_S = 60.0
# Every SDK call in these tests is bounded by this, so a hung stream fails one test instead
# of hanging the run.
CLIENT_TIMEOUT_S = 30.0

# Environment variables passed on to the child processes; everything else (provider API
# keys that would enable catalog providers, MARGA_* settings) is left out so the run is
# hermetic.
_ENV_KEEP = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "RUST_BACKTRACE", "RUST_LOG"}


# --------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------


def _set_pdeathsig() -> None:
    """In the child, before exec: die with the parent (Linux), so a killed pytest leaves
    no orphaned servers behind."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - best effort, not available everywhere
        pass


class Child:
    """A child process whose output (one stream, or both merged) is copied line by line to
    a log file by a thread that also watches for the readiness line."""

    def __init__(self, name: str, argv: list[str], log_path: Path, ready: re.Pattern[str], env: dict[str, str]):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._ready = ready
        self._match: Optional[re.Match[str]] = None
        self._event = threading.Event()
        self._log = open(log_path, "w", encoding="utf-8", errors="replace")
        self._log.write(f"$ {' '.join(argv)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(log_path.parent),
            preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
        )
        self._thread = threading.Thread(target=self._pump, name=f"log-{name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self._log.write(line)
            self._log.flush()
            if self._match is None:
                found = self._ready.search(line)
                if found:
                    self._match = found
                    self._event.set()
        self._event.set()  # EOF: the process ended; wake the waiter

    def wait_ready(self, timeout: float) -> re.Match[str]:
        """The readiness line's match; raises if the process exits or times out first."""
        self._event.wait(timeout)
        if self._match is not None:
            return self._match
        try:
            code: Optional[int] = self.proc.wait(timeout=2)  # at EOF the process is exiting
        except subprocess.TimeoutExpired:
            code = None
        state = f"exited with status {code}" if code is not None else f"printed no readiness line within {timeout:.0f}s"
        raise RuntimeError(f"{self.name} {state}")

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._thread.join(timeout=5)
        self._log.close()


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith("LC_")}
    env.setdefault("RUST_LOG", "info")
    env.setdefault("NO_COLOR", "1")
    env.update(extra)
    return env


def _binary(env_var: str, name: str) -> Path:
    given = os.environ.get(env_var)
    path = Path(given) if given else Path("target") / "release" / name
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.is_file():
        raise RuntimeError(
            f"{name} binary not found at {path} (set {env_var}, or build it: "
            f"`cargo build --release -p {'marga-gateway' if name == 'marga' else name}`, or run `make test`)"
        )
    return path


# --------------------------------------------------------------------------------------
# Mock upstream control
# --------------------------------------------------------------------------------------


def _http_json(method: str, url: str, body: Optional[dict[str, Any]] = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


@dataclass
class Mock:
    """One mock-upstream process and its control API."""

    name: str
    base_url: str  # http://127.0.0.1:PORT

    def scenario(self, **fields: Any) -> dict[str, Any]:
        """Sets the failure-injection scenario for the requests that follow, e.g.
        `mock.scenario(fail_first=1, fail_status=503)`."""
        return _http_json("POST", f"{self.base_url}/__mock/scenario", fields)

    def reset(self) -> None:
        _http_json("POST", f"{self.base_url}/__mock/reset", {})

    def stats(self) -> dict[str, Any]:
        return _http_json("GET", f"{self.base_url}/__mock/stats")

    def requests_to(self, path: str) -> int:
        return int(self.stats()["by_path"].get(path, 0))


# --------------------------------------------------------------------------------------
# The gateway
# --------------------------------------------------------------------------------------

PROVIDERS_ON_A = {
    "mock-openai": ("openai", "/v1"),
    "mock-anthropic": ("anthropic", "/v1"),
    "mock-gemini": ("gemini", "/v1beta"),
}

# public model id -> (type, [(provider, upstream model)])
MODELS = {
    "test/openai": ("chat", [("mock-openai", "gpt-4o-mini")]),
    "test/anthropic": ("chat", [("mock-anthropic", "claude-sonnet-4-5")]),
    "test/gemini": ("chat", [("mock-gemini", "gemini-2.5-flash")]),
    "test/failover": ("chat", [("mock-openai", "gpt-4o-mini"), ("backup", "gpt-4o-mini")]),
    "test/openai-embed": ("embedding", [("mock-openai", "text-embedding-3-small")]),
    "test/gemini-embed": ("embedding", [("mock-gemini", "text-embedding-004")]),
}


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string for these values


def render_config(mock_a: Mock, mock_b: Mock) -> str:
    out = [
        "# Generated by tests/sdk/conftest.py",
        "[server]",
        "log_flush_ms = 50",
        "",
        "[routing]",
        "connect_timeout_ms = 2000",
        "first_token_timeout_ms = 10000",
        "total_timeout_ms = 20000",
        "",
    ]
    providers = {pid: (kind, mock_a.base_url + suffix) for pid, (kind, suffix) in PROVIDERS_ON_A.items()}
    providers["backup"] = ("openai", mock_b.base_url + "/v1")
    for pid, (kind, url) in providers.items():
        out += [
            f"[providers.{_toml_str(pid)}]",
            f"kind = {_toml_str(kind)}",
            f"base_url = {_toml_str(url)}",
            f"api_key = {_toml_str('mock-key-' + pid)}",
            'region = "IN"' if pid == "backup" else 'region = "US"',
            "",
        ]
    for model_id, (kind, routes) in MODELS.items():
        output_price = "0" if kind == "embedding" else "0.60"
        out.append(f"[models.{_toml_str(model_id)}]")
        out.append(f"type = {_toml_str(kind)}")
        if kind == "chat":
            out.append('capabilities = ["streaming", "tools"]')
        out.append("routes = [")
        for provider, upstream in routes:
            out.append(
                f"  {{ provider = {_toml_str(provider)}, model = {_toml_str(upstream)}, "
                f'input_per_mtok = "0.15", output_per_mtok = "{output_price}", currency = "USD" }},'
            )
        out += ["]", ""]
    return "\n".join(out)


@dataclass
class Gateway:
    """The running stack, as the tests see it."""

    base_url: str  # http://127.0.0.1:PORT/v1
    key: str
    mock_a: Mock
    mock_b: Mock
    workdir: Path
    children: list[Child] = field(default_factory=list)

    def client(self, **overrides: Any) -> openai.OpenAI:
        """An `openai.OpenAI` client for the gateway. Retries are off by default so that each
        test sees exactly what the gateway answered (override with `max_retries=`)."""
        options: dict[str, Any] = {
            "base_url": self.base_url,
            "api_key": self.key,
            "max_retries": 0,
            "timeout": CLIENT_TIMEOUT_S,
        }
        options.update(overrides)
        return openai.OpenAI(**options)

    def async_client(self, **overrides: Any) -> openai.AsyncOpenAI:
        options: dict[str, Any] = {
            "base_url": self.base_url,
            "api_key": self.key,
            "max_retries": 0,
            "timeout": CLIENT_TIMEOUT_S,
        }
        options.update(overrides)
        return openai.AsyncOpenAI(**options)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(f"--- {c.name} ({c.log_path}) ---\n{c.tail(lines)}" for c in self.children)


_LIVE: list[Child] = []


def _stop_all() -> None:
    while _LIVE:
        _LIVE.pop().stop()


atexit.register(_stop_all)


def _wait_health(url: str, child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s (last: {last})")


def _start_stack(workdir: Path) -> Gateway:
    marga_bin = _binary("MARGA_BIN", "marga")
    mock_bin = _binary("MOCK_BIN", "mock-upstream")
    env = _child_env({})
    mocks = []
    for name in ("mock-a", "mock-b"):
        child = Child(
            name,
            [str(mock_bin), "--listen", "127.0.0.1:0"],
            workdir / f"{name}.log",
            re.compile(r"listening on (http://\S+)"),
            env,
        )
        _LIVE.append(child)
        url = child.wait_ready(STARTUP_TIMEOUT_S).group(1).rstrip("/")
        mocks.append((child, Mock(name, url)))
    (a_child, mock_a), (b_child, mock_b) = mocks

    config = workdir / "marga.toml"
    config.write_text(render_config(mock_a, mock_b), encoding="utf-8")
    data_dir = workdir / "data"
    data_dir.mkdir()
    gateway_child = Child(
        "marga",
        [str(marga_bin), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--config", str(config)],
        workdir / "marga.log",
        re.compile(r"marga listening on (http://\S+)"),
        _child_env({"MARGA_MASTER_KEY": MASTER_KEY}),
    )
    _LIVE.append(gateway_child)
    root = gateway_child.wait_ready(STARTUP_TIMEOUT_S).group(1).rstrip("/")
    _wait_health(f"{root}/health", gateway_child, STARTUP_TIMEOUT_S)
    return Gateway(
        base_url=f"{root}/v1",
        key=MASTER_KEY,
        mock_a=mock_a,
        mock_b=mock_b,
        workdir=workdir,
        children=[a_child, b_child, gateway_child],
    )


_SESSION: dict[str, Gateway] = {}


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("marga-sdk")
    try:
        stack = _start_stack(workdir)
    except Exception as e:  # noqa: BLE001 - reported below, with the logs
        failure = str(e)
    else:
        failure = None
    if failure is not None:
        logs = "\n".join(f"--- {c.name} ({c.log_path}) ---\n{c.tail(80)}" for c in _LIVE)
        _stop_all()
        # One clear message instead of the same error for every test.
        pytest.exit(f"could not start the test stack: {failure}\n{logs}", returncode=1)
    _SESSION["stack"] = stack
    try:
        yield stack
    finally:
        _stop_all()


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> openai.OpenAI:
    """The SDK client every test uses: `openai.OpenAI(base_url=…/v1, api_key=master key)`."""
    return gateway.client()


@pytest.fixture
def mock_a(gateway: Gateway) -> Mock:
    return gateway.mock_a


@pytest.fixture
def mock_b(gateway: Gateway) -> Mock:
    return gateway.mock_b


@pytest.fixture(autouse=True)
def _reset_mocks(request: pytest.FixtureRequest):
    """Both mocks back to their defaults (no failures, counters at zero) before each test.
    Only for tests that use the stack, so a startup failure is reported once per test, not
    twice."""
    if "gateway" not in request.fixturenames:
        yield
        return
    stack: Gateway = request.getfixturevalue("gateway")
    stack.mock_a.reset()
    stack.mock_b.reset()
    yield


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    stack = _SESSION.get("stack")
    if stack is None:
        return
    failed = terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    if not failed:
        return
    terminalreporter.section("test stack logs (tail)")
    terminalreporter.write_line(f"full logs in {stack.workdir}")
    for child in stack.children:
        terminalreporter.write_line(f"--- {child.name}: {child.log_path} ---")
        terminalreporter.write_line(child.tail(40))

