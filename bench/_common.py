"""Shared pieces of the benchmarks: child processes, CPU pinning, wrk, configs, the spool.

Nothing here asserts: the benchmarks print figures and say PASS/MISS next to each target.
Every child process is started through :class:`Child`, whose ``stop()`` is meant for a
``finally`` block (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SINGLE_PATH = "/api/v1/integrations/dify/telemetry"
BATCH_PATH = "/api/v1/telemetry/batch"
TEST_KEY = "px_test_key"

# The example interaction from the Dify guide; every benchmark posts exactly this.
EVENT: dict[str, Any] = {
    "agentId": "dify-test-app",
    "prompt": "Hello, this is a test message",
    "response": "Hi! I received your test message successfully.",
    "appId": "test-app-123",
    "conversationId": "conv-456",
    "userId": "user-789",
    "metadata": {"platform": "dify", "test": True},
}


# A 2 KB support-desk interaction as a Dify app would send it: PII in the text and in
# metadata, a pasted API key, tool calls. bench/redact.py redacts it; bench/ingest.py
# --event large posts it.
PROMPT = (
    "Hi, I'm writing again about my order #884213 from 2026-11-02. The parcel was supposed "
    "to arrive within 3-5 business days, but the tracking page has said 'in transit' for "
    "twelve days now. I was also charged twice: my statement shows two payments of $129.99 "
    "on the card 4111 1111 1111 1111, one on the 3rd and one on the 4th. Could you refund "
    "the duplicate and tell me where the parcel is? You can reach me at "
    "jane.doe@example.com or call me on +1 (415) 555-0132 between 9am and 5pm Pacific. "
    "Our shop integration also started failing yesterday with a 401 error; the developer "
    "says the key we use is sk-proj-Qw8eRt5yUi2oPa7sDf4gHj1kLz9xCv6bNm3 and that it worked "
    "with version 2.4.1 of your SDK on Chrome/120.0.6099.109. Is there an outage, or do we "
    "need to rotate it? Thanks a lot for your help, and sorry for the long message."
)
RESPONSE = (
    "Hello Jane, thank you for your patience and sorry for the trouble. I can see order "
    "#884213 and the two payments of $129.99. I have refunded the duplicate payment; it "
    "will show on your statement within 5-7 business days. The parcel is held at the local "
    "depot because the address label was damaged, and it will be delivered tomorrow before "
    "noon. About the 401 error: please never share API keys in a ticket. I have revoked "
    "the key you pasted; your developer can create a new one in the dashboard under "
    "Settings > API keys. Let me know if there is anything else I can do."
)
LARGE_EVENT: dict[str, Any] = {
    "agentId": "dify-support-bot",
    "prompt": PROMPT,
    "response": RESPONSE,
    "appId": "support-app-7",
    "conversationId": "conv-5f2c9a",
    "userId": "user-48213",
    "sessionId": "sess-91ab",
    "metadata": {
        "platform": "dify",
        "customer_email": "jane.doe@example.com",
        "customer_name": "Jane Doe",
        "customer_phone": "+1 415 555 0132",
        "account_id": "ACC-00918273",
        "ip": "203.0.113.42",
        "locale": "en-US",
        "tier": "gold",
    },
    "toolCalls": [
        {
            "name": "lookup_order",
            "input": {"order_id": "884213", "account_number": "DE89370400440532013000"},
            "output": {"status": "held_at_depot", "eta": "2026-11-24"},
        },
        {
            "name": "refund_payment",
            "input": {"payment_id": "pay_3PqLm9", "amount": 129.99, "card_last4": "1111"},
            "output": "refunded",
        },
    ],
}


def event_body(event: dict[str, Any] = EVENT) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def batch_body(n: int, event: dict[str, Any] = EVENT) -> bytes:
    return json.dumps({"interactions": [event] * n}, separators=(",", ":")).encode()


# -- output --------------------------------------------------------------------


def say(*parts: object) -> None:
    print(*parts, flush=True)


def loud(message: str) -> None:
    """A problem that makes a figure untrustworthy: impossible to miss in the output."""
    bar = "!" * 78
    say(f"\n{bar}\n!!! {message}\n{bar}\n")


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so every ``finally`` stops its children.

    Python's default SIGTERM ends the process at once, leaving the servers running; and
    a script started in the background by a non-interactive shell inherits SIGINT ignored.
    """

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- CPUs ----------------------------------------------------------------------


def cpu_plan() -> tuple[int | None, int | None]:
    """(server CPU, load CPU): the first two CPUs this process may use, or Nones."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def pinned(cmd: Sequence[str], cpu: int | None) -> list[str]:
    """``cmd`` restricted to one CPU (taskset execs it, so the pid stays the program's)."""
    if cpu is None:
        return list(cmd)
    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *cmd]
    # No util-linux: a tiny Python shim sets the affinity, then execs the real program.
    shim = (
        "import os,sys; os.sched_setaffinity(0, {int(sys.argv[1])}); "
        "os.execvp(sys.argv[2], sys.argv[2:])"
    )
    return [sys.executable, "-c", shim, str(cpu), *cmd]


# -- child processes -----------------------------------------------------------


class ChildError(Exception):
    pass


def child_env(api_key: str | None = None) -> dict[str, str]:
    """Our environment minus anything that would reconfigure the sidecar behind our back."""
    env = {
        k: v for k, v in os.environ.items()
        if k != "PRECOGX_API_KEY" and not k.startswith("PRECOGX_SIDECAR_")
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")  # honoured
    }
    if api_key is not None:
        env["PRECOGX_API_KEY"] = api_key
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """A subprocess whose stdout and stderr are drained into memory by two threads.

    Draining matters: a child that logs into a full pipe blocks, which would show up
    as a mysterious throughput cliff in a benchmark.
    """

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.lines: list[tuple[str, str]] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=env or child_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._drain, args=(s, label), daemon=True)
            for s, label in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr"))
        ]
        for t in self._threads:
            t.start()

    def _drain(self, stream: IO[str], label: str) -> None:
        for line in stream:
            with self._cond:
                self.lines.append((label, line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, stream: str, timeout: float = 30.0) -> re.Match[str]:
        """The first line of ``stream`` matching ``pattern``; ChildError on exit or timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for label, line in self.lines[seen:]:
                    if label == stream and (m := regex.search(line)):
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None:
                    raise ChildError(
                        f"{self.name} exited with {self.proc.returncode} before printing "
                        f"{pattern!r}:\n{self.tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChildError(
                        f"{self.name}: no {pattern!r} within {timeout}s:\n{self.tail()}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def output(self, stream: str | None = None) -> list[str]:
        with self._cond:
            return [line for label, line in self.lines if stream is None or label == stream]

    def tail(self, n: int = 20) -> str:
        return "\n".join(f"  [{self.name}] {line}" for line in self.output()[-n:])

    def cpu_seconds(self) -> float:
        """User + system CPU time of the child, all its threads, so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                loud(f"{self.name} ignored SIGTERM for {timeout}s: killing it")
                self.proc.kill()
                self.proc.wait(10)
        for t in self._threads:
            t.join(2)
        return self.proc.returncode


def start_noop(cpu: int | None) -> tuple[Child, int]:
    cmd = [sys.executable, str(BENCH / "noop_server.py"), "--port", "0"]
    return _start_server("noop", pinned(cmd, cpu), "stdout", 20)


def start_sidecar(config: Path, cpu: int | None) -> tuple[Child, int]:
    cmd = [sys.executable, "-m", "sidecar", "run", "--config", str(config)]
    return _start_server("sidecar", pinned(cmd, cpu), "stderr", 60)


def _start_server(name: str, cmd: list[str], stream: str, timeout: float) -> tuple[Child, int]:
    """Start a server and wait for its ``listening on`` line; returns it and its port."""
    child = Child(name, cmd)
    try:
        m = child.wait_for(r"listening on http://127\.0\.0\.1:(\d+)", stream, timeout)
    except BaseException:
        child.stop()
        raise
    return child, int(m.group(1))


def start_fake(cpu: int | None, max_batch_events: int | None = None) -> tuple[Child, str]:
    cmd = [sys.executable, str(ROOT / "tests" / "fake_precogx.py"), "--port", "0",
           "--api-key", TEST_KEY]
    if max_batch_events is not None:
        cmd += ["--max-batch-events", str(max_batch_events)]
    child = Child("fake-precogx", pinned(cmd, cpu))
    try:
        m = child.wait_for(r"listening (http://\S+)", "stdout", 20)
    except BaseException:
        child.stop()
        raise
    return child, m.group(1)


def complain_about_logs(child: Child) -> None:
    """Print the child's ERROR/Traceback lines, if any: they usually explain a bad figure."""
    bad = [line for line in child.output() if " ERROR " in line or "Traceback" in line]
    if bad:
        loud(f"{child.name} logged {len(bad)} error line(s); first ones:")
        for line in bad[:10]:
            say(f"  {line}")


# -- sidecar config --------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


Section = dict[str, object] | list[dict[str, object]]


def write_config(path: Path, sections: dict[str, Section]) -> Path:
    """A TOML file; a section given as a list of tables becomes an array of tables."""
    lines: list[str] = []
    for name, section in sections.items():
        for values in section if isinstance(section, list) else [section]:
            lines.append(f"[[{name}]]" if isinstance(section, list) else f"[{name}]")
            lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def sidecar_sections(
    spool: Path, synchronous: str, upstream: dict[str, object] | None = None
) -> dict[str, Section]:
    """A bench sidecar: free port, big spool limits, log level info.

    Level info, not warning: the ``listening on`` line we wait for is logged at info.
    Nothing is logged per request at info, so it costs nothing during the load.
    """
    return {
        "server": {"port": 0},
        "spool": {
            "path": str(spool),
            "synchronous": synchronous,
            # The default max_events (1,000,000) would fill during the batched run.
            "max_events": 100_000_000,
            "max_bytes": 64 * 1024 * 1024 * 1024,
        },
        "upstream": upstream or {},
        "log": {"level": "info"},
    }


# -- HTTP (loopback only, tiny helpers for sync code) ----------------------------


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in Prometheus text, e.g. ``metric(t, "x", 'state="pending"')``."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def metric_sum(text: str, name: str) -> float:
    """All samples of ``name`` (any labels) added up."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- disk and spool --------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    real = os.path.realpath(path)
    best = ("?", "?", "/")
    with open("/proc/mounts") as f:
        for line in f:
            device, mount, fstype = line.split()[:3]
            mount = mount.replace("\\040", " ")
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[2]):
                best = (device, fstype, mount)
    return f"{best[1]} on {best[0]} (mounted at {best[2]})"


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def spool_rows(path: Path) -> tuple[int, int]:
    """(all rows, pending rows) of a spool, opened read-only after its sidecar stopped."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        total = db.execute("SELECT count(*) FROM events").fetchone()[0]
        pending = db.execute("SELECT count(*) FROM events WHERE state = 'pending'").fetchone()[0]
        return int(total), int(pending)
    finally:
        db.close()


# -- wrk -------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}  # to milliseconds


@dataclass
class WrkResult:
    label: str
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    latency_ms: dict[int, float] = field(default_factory=dict)  # percentile -> ms
    non2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    output: str = ""

    @property
    def ok(self) -> int:
        """Completed requests answered 2xx (wrk counts 3xx as fine too; we send none)."""
        return self.requests - self.non2xx

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())

    @property
    def p50(self) -> float:
        return self.latency_ms.get(50, float("nan"))

    @property
    def p99(self) -> float:
        return self.latency_ms.get(99, float("nan"))


def parse_wrk(label: str, text: str) -> WrkResult:
    r = WrkResult(label, output=text)
    for line in text.splitlines():
        if m := re.match(r"\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", line):
            r.latency_ms[int(m.group(1))] = float(m.group(2)) * _UNITS[m.group(3)]
        elif m := re.match(r"\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", line):
            r.requests = int(m.group(1))
            r.seconds = float(m.group(2)) * _UNITS[m.group(3)] / 1e3
        elif m := re.match(r"\s*Requests/sec:\s+([\d.]+)", line):
            r.rps = float(m.group(1))
        elif m := re.match(r"\s*Non-2xx or 3xx responses:\s+(\d+)", line):
            r.non2xx = int(m.group(1))
        elif m := re.match(
            r"\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", line
        ):
            r.socket_errors = dict(
                zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
            )
    return r


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    label: str,
    url: str,
    body: bytes,
    *,
    workdir: Path,
    connections: int,
    seconds: int,
    cpu: int | None,
) -> WrkResult:
    """One bounded wrk run (one thread, keep-alive) POSTing ``body``; loud on errors."""
    body_file = workdir / f"body-{len(body)}.json"
    body_file.write_bytes(body)
    script = workdir / f"post-{len(body)}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local f = assert(io.open({json.dumps(str(body_file))}, \"rb\"))\n"
        'wrk.body = f:read("*a")\n'
        "f:close()\n"
    )
    cmd = [
        "wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency",
        "--timeout", "10s", "-s", str(script), url,
    ]
    proc = subprocess.run(
        pinned(cmd, cpu), capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if proc.returncode != 0:
        raise ChildError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result = parse_wrk(label, proc.stdout)
    if not result.requests or not result.rps:
        raise ChildError(f"could not parse wrk's output:\n{proc.stdout}")
    if result.errors:
        loud(
            f"{label}: wrk saw ERRORS: {result.non2xx} non-2xx responses, socket errors "
            f"{result.socket_errors} out of {result.requests} requests"
        )
    return result


def smoke(name: str, url: str, body: bytes) -> None:
    """One request before the load: wrk must measure accepted events, not error answers."""
    status, answer = post(url, body)
    if status != 202:
        raise ChildError(f"{name}: smoke request to {url} got {status}: {answer[:300]!r}")


Starter = Callable[[int | None], tuple[Child, int]]


def side_by_side(
    starters: Sequence[Starter], body: bytes, *, workdir: Path, connections: int,
    warmup: int, seconds: int, cpus: tuple[int | None, int | None],
) -> list[tuple[float, WrkResult]]:
    """Servers loaded at once on one CPU, each under its own wrk on the other: for each,
    its CPU time per request (us) and its wrk run.

    For comparing two builds or configurations of the sidecar: run one after the other,
    they can meet different machines (a neighbour's burst, a slower host core), which
    moves such comparisons by 20 %; loaded together they meet the same one. Sharing the
    CPU costs each server some cache misses and changes its batching, so the figures are
    not those of a server alone: this morning the no-op server's CPU per request rose
    by about a third side by side and the sidecar's hardly moved. Compare like with like.
    """
    servers: list[tuple[Child, str, Path]] = []
    try:
        for i, start in enumerate(starters):
            child, port = start(cpus[0])
            servers.append((child, f"http://127.0.0.1:{port}", workdir / f"server-{i}"))
        for child, base, wrk_dir in servers:
            smoke(child.name, base + SINGLE_PATH, body)
            wrk_dir.mkdir(parents=True, exist_ok=True)

        def load(seconds: int) -> list[WrkResult]:
            with ThreadPoolExecutor(len(servers)) as pool:
                runs = [
                    pool.submit(run_wrk, f"{child.name} side by side", base + SINGLE_PATH, body,
                                workdir=wrk_dir, connections=connections, seconds=seconds,
                                cpu=cpus[1])
                    for child, base, wrk_dir in servers
                ]
                return [r.result() for r in runs]

        if warmup > 0:
            load(warmup)
        before = [child.cpu_seconds() for child, _, _ in servers]
        runs = load(seconds)
        used = [child.cpu_seconds() - b for (child, _, _), b in zip(servers, before, strict=True)]
    finally:
        for child, _, _ in servers:
            child.stop()
    return [(1e6 * u / r.requests, r) for u, r in zip(used, runs, strict=True)]


def wrk_missing_exit() -> None:
    print(
        "wrk (the HTTP load generator) is not installed.\n"
        "Install it with:  apt-get update && apt-get install -y wrk",
        file=sys.stderr,
    )
    raise SystemExit(2)
