"""Crash tests: a real ``python -m sidecar run`` process, killed with a real SIGKILL.

The promise under test: a 202 means the events are on disk, so no acknowledged
event is ever lost, whatever happens to the process afterwards. Events that were
in flight when the process died (never acknowledged) may or may not arrive, and
an event may arrive twice (at-least-once); both are fine.

Nothing here sleeps to synchronise: the tests await the sidecar's "listening on"
line, HTTP answers, the fake upstream's arrivals and the process's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import os
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import (
    EXAMPLE_EVENT,
    ROOT,
    missing,
    sidecar_command,
    sidecar_sections,
    write_config,
)
from tests.fake_precogx import Delay, FakePrecogX, Respond

SINGLE_PATH = "/api/v1/integrations/dify/telemetry"
BATCH_PATH = "/api/v1/telemetry/batch"
BATCH_SIZE = 20
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+).*event loop (\w+)")
START_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 20.0
DELIVERY_TIMEOUT_S = 30.0
# The sidecar as where uvloop is not installed: its import fails, and the CLI falls back
# to asyncio's loop. The other crash tests run on uvloop when it is installed, as the
# Docker image does (the in-process tests run on pytest-aiohttp's asyncio loop).
WITHOUT_UVLOOP = [
    "-c", "import sys; sys.modules['uvloop'] = None; "
    "from sidecar.cli import main; raise SystemExit(main())",
]


# -- the sidecar as a subprocess ---------------------------------------------------


@dataclass
class SidecarProcess:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    listening: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    drain: asyncio.Task[None] | None = None
    url: str = ""
    loop: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(line[:500] for line in self.lines[-n:])

    async def kill(self) -> int:
        """SIGKILL: no shutdown code runs, whatever was not fsync'ed is gone."""
        if self.proc.returncode is None:
            self.proc.kill()
        return await self.wait()

    async def terminate(self) -> int:
        """SIGTERM, then the exit code (the graceful shutdown must finish on its own)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        try:
            code = await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT_S)
            if self.drain is not None:
                # stderr reaches EOF once the process is gone; the task then ends by itself.
                await asyncio.wait_for(self.drain, EXIT_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(
                f"sidecar pid {self.pid} did not exit within {EXIT_TIMEOUT_S}s\n{self.log_tail()}"
            ) from None
        return code

    async def read_stderr(self) -> None:
        """Keep the pipe empty for the process's whole life, whatever the line lengths."""
        stderr = self.proc.stderr
        assert stderr is not None
        partial = b""
        while chunk := await stderr.read(1 << 16):
            *complete, partial = (partial + chunk).split(b"\n")
            for raw in complete:
                self._line(raw)
        if partial:
            self._line(partial)
        if not self.listening.done():
            self.listening.set_exception(EOFError("stderr closed before the listening line"))

    def _line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace")
        self.lines.append(line)
        if not self.listening.done() and (match := LISTENING.search(line)):
            self.loop = match.group(2)
            self.listening.set_result(match.group(1))


class Launcher:
    """Starts sidecars on one config (one spool file) and kills every one left at the end."""

    def __init__(self, tmp_path: Path, fake: FakePrecogX, loop: str = "uvloop") -> None:
        self.loop = loop
        sections = sidecar_sections(tmp_path, fake.url, log={"level": "info"})
        self.config_path = write_config(tmp_path, sections)
        self.spool_path = tmp_path / "spool.db"
        self.started: list[SidecarProcess] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRECOGX_")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )

    async def start(self) -> SidecarProcess:
        command = sidecar_command("run", "--config", str(self.config_path))
        if self.loop == "asyncio":
            command[1:3] = WITHOUT_UVLOOP
        proc = await asyncio.create_subprocess_exec(
            *command,
            cwd=ROOT, env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        sidecar = SidecarProcess(proc)
        self.started.append(sidecar)
        sidecar.drain = asyncio.create_task(sidecar.read_stderr())
        try:
            sidecar.url = await asyncio.wait_for(sidecar.listening, START_TIMEOUT_S)
        except (TimeoutError, EOFError) as e:
            raise AssertionError(
                f"sidecar never logged 'listening on' ({e or 'timeout'}; "
                f"exit code {proc.returncode})\n{sidecar.log_tail()}"
            ) from None
        assert sidecar.loop == self.loop, sidecar.log_tail()
        return sidecar

    async def cleanup(self) -> None:
        for sidecar in self.started:
            if sidecar.proc.returncode is None:
                sidecar.proc.kill()
            await sidecar.proc.wait()
            if sidecar.drain is not None:
                sidecar.drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sidecar.drain


HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


@pytest.fixture
def sidecar_loop() -> str:
    """The loop the sidecar runs on, as the CLI picks it; the tests of both loops
    override it."""
    return "uvloop" if HAVE_UVLOOP else "asyncio"


@pytest.fixture
async def launcher(
    tmp_path: Path, fake: FakePrecogX, sidecar_loop: str
) -> AsyncIterator[Launcher]:
    if sidecar_loop == "uvloop" and not HAVE_UVLOOP:
        missing("uvloop", "pip install -e '.[test,speed]'")
    launcher = Launcher(tmp_path, fake, sidecar_loop)
    try:
        yield launcher
    finally:
        await launcher.cleanup()


# -- the load: concurrent clients that remember every acknowledged id ---------------


@dataclass
class Load:
    session: aiohttp.ClientSession
    url: str
    threshold: int = 0
    acked: dict[int, str] = field(default_factory=dict)  # id -> the event's prompt
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    refusals: list[tuple[int, str]] = field(default_factory=list)  # non-202 answers
    refused: set[str] = field(default_factory=set)  # prompts of refused events
    unanswered: set[str] = field(default_factory=set)  # prompts sent on a failed connection
    problems: list[str] = field(default_factory=list)  # malformed or contradictory 202s
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    clients: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._numbers = itertools.count()
        self._tag = f"{time.monotonic_ns():x}"

    def event(self) -> dict[str, Any]:
        item = dict(EXAMPLE_EVENT)
        item["prompt"] = f"crash test {self._tag} #{next(self._numbers)}"
        item["metadata"] = {"platform": "dify", "test": True}
        return item

    async def post(self, items: list[dict[str, Any]], *, batch: bool) -> int | None:
        """One request; the status, or None when the connection failed."""
        path, body = (BATCH_PATH, {"interactions": items}) if batch else (SINGLE_PATH, items[0])
        try:
            async with self.session.post(self.url + path, json=body) as response:
                status = response.status
                raw = await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self.errors[type(e).__name__] += 1
            self.unanswered.update(item["prompt"] for item in items)
            return None
        self.statuses[status] += 1
        if status != 202:
            self.refusals.append((status, raw.decode(errors="replace")[:300]))
            self.refused.update(item["prompt"] for item in items)
            return status
        doc = orjson.loads(raw)
        ids = doc.get("ids")
        if doc.get("accepted") != len(items) or not isinstance(ids, list) or len(ids) != len(items):
            self.problems.append(f"202 for {len(items)} events answered {doc}")
            return status
        for event_id, item in zip(ids, items, strict=True):
            earlier = self.acked.setdefault(event_id, item["prompt"])
            if earlier != item["prompt"]:
                self.problems.append(f"id {event_id} acknowledged for two different events")
        if self.threshold and len(self.acked) >= self.threshold:
            self.reached.set()
        return status

    async def client(self, *, batch: bool) -> None:
        """Post until the first answer that is not a 202 (a refusal or a dead connection)."""
        while True:
            items = [self.event() for _ in range(BATCH_SIZE if batch else 1)]
            if await self.post(items, batch=batch) != 202:
                return

    def run(self, singles: int, batches: int) -> list[asyncio.Task[None]]:
        self.clients = [
            asyncio.create_task(self.client(batch=i < batches)) for i in range(singles + batches)
        ]
        return self.clients

    async def post_batches(self, n_events: int) -> None:
        """Post n_events in concurrent batches, every one of which must get its 202."""
        chunks = [[self.event() for _ in range(BATCH_SIZE)] for _ in range(n_events // BATCH_SIZE)]
        results = await asyncio.gather(*(self.post(c, batch=True) for c in chunks))
        assert results == [202] * len(chunks), (self.refusals, self.errors)
        assert not self.problems, self.problems
        assert len(self.acked) == n_events


MakeLoad = Callable[..., Load]


@pytest.fixture
async def make_load() -> AsyncIterator[MakeLoad]:
    """``make_load(url, threshold=0)``: a Load whose clients are cancelled at the end."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=15)
    loads: list[Load] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        def make(url: str, threshold: int = 0) -> Load:
            load = Load(session, url, threshold)
            loads.append(load)
            return load

        try:
            yield make
        finally:
            clients = [task for load in loads for task in load.clients]
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)


# -- what arrived upstream ----------------------------------------------------------


class Arrivals:
    """The fake's received interactions, indexed by the sidecar's event id."""

    def __init__(self, fake: FakePrecogX) -> None:
        self.fake = fake
        self.prompts: dict[int, list[str]] = {}
        self.spool_ids: set[str] = set()
        self._seen = 0

    def update(self) -> None:
        for item in self.fake.received[self._seen:]:
            spool_id, _, number = item["metadata"]["sidecar_event_id"].rpartition("-")
            self.spool_ids.add(spool_id)
            self.prompts.setdefault(int(number), []).append(item["prompt"])
        self._seen = len(self.fake.received)

    def missing(self, expected: Mapping[int, str]) -> list[int]:
        """Expected ids that have not arrived (with that very prompt) yet."""
        self.update()
        return sorted(i for i, p in expected.items() if p not in self.prompts.get(i, ()))

    def arrived(self, prompts: set[str]) -> set[str]:
        self.update()
        return {p for ps in self.prompts.values() for p in ps} & prompts

    @property
    def duplicates(self) -> int:
        self.update()
        return sum(len(p) - 1 for p in self.prompts.values())

    async def wait_for(self, expected: Mapping[int, str], sidecar: SidecarProcess) -> None:
        async def until_all_arrived() -> None:
            while self.missing(expected):
                await self.fake.wait_for_received(len(self.fake.received) + 1, DELIVERY_TIMEOUT_S)

        try:
            await asyncio.wait_for(until_all_arrived(), DELIVERY_TIMEOUT_S)
        except TimeoutError:
            lost = self.missing(expected)
            raise AssertionError(
                f"{len(lost)} of {len(expected)} expected events never arrived upstream "
                f"(first: {lost[:10]})\n{sidecar.log_tail()}"
            ) from None


# -- the spool file, read as a bystander -------------------------------------------


@dataclass
class Row:
    state: str
    attempts: int
    prompt: str


def read_spool(path: Path) -> dict[int, Row]:
    """Every event in the spool, opened read-only so nothing (no checkpoint) is changed."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT id, state, attempts, payload FROM events").fetchall()
    return {r[0]: Row(r[1], r[2], orjson.loads(r[3])["prompt"]) for r in rows}


def pending_count(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        (n,) = db.execute("SELECT count(*) FROM events WHERE state = 'pending'").fetchone()
    return int(n)


async def restart_and_drain(
    launcher: Launcher, make_load: MakeLoad, arrivals: Arrivals, acked: Mapping[int, str]
) -> int:
    """Restart on the same spool; every acknowledged event, everything the spool still
    holds and a fresh batch must arrive; a SIGTERM then exits 0 with nothing pending.

    Returns how many interactions the fake received more than once."""
    spooled = read_spool(launcher.spool_path)
    # Durability first, before the restart can muddy the water: each acknowledged
    # event is either upstream already or still in the spool file, with its own payload.
    arrivals.update()
    delivered = arrivals.prompts
    unaccounted = [i for i in acked if i not in spooled and acked[i] not in delivered.get(i, ())]
    assert not unaccounted, f"acknowledged, then neither delivered nor spooled: {unaccounted[:10]}"
    wrong = [i for i in acked if i in spooled and spooled[i].prompt != acked[i]]
    assert not wrong, f"spooled under an acknowledged id with another payload: {wrong[:10]}"
    assert all(row.state == "pending" for row in spooled.values())

    sidecar = await launcher.start()
    # New events after the crash get new ids: none may reuse an id already answered.
    fresh = make_load(sidecar.url)
    await fresh.post_batches(BATCH_SIZE)
    reused = set(fresh.acked) & (set(acked) | set(spooled))
    assert not reused, f"ids handed out again after the restart: {sorted(reused)[:10]}"

    expected = {i: row.prompt for i, row in spooled.items()} | dict(acked) | fresh.acked
    await arrivals.wait_for(expected, sidecar)
    assert len(arrivals.spool_ids) == 1, arrivals.spool_ids  # one spool file, one name

    code = await sidecar.terminate()
    assert code == 0, sidecar.log_tail()
    assert pending_count(launcher.spool_path) == 0, sidecar.log_tail()

    # Once more on the now empty spool: even with every event delivered and deleted,
    # no id already used upstream comes back (the upstream would drop it as a repeat).
    sidecar = await launcher.start()
    last = make_load(sidecar.url)
    await last.post_batches(BATCH_SIZE)
    reused = set(last.acked) & set(expected)
    assert not reused, f"ids handed out again on an empty spool: {sorted(reused)[:10]}"
    await arrivals.wait_for(last.acked, sidecar)
    assert await sidecar.terminate() == 0, sidecar.log_tail()
    return arrivals.duplicates


# -- the tests ----------------------------------------------------------------------


@pytest.mark.parametrize("sidecar_loop", ["uvloop", "asyncio"])
async def test_sigkill_mid_load_loses_nothing_acknowledged(
    launcher: Launcher, fake: FakePrecogX, make_load: MakeLoad
) -> None:
    sidecar = await launcher.start()
    load = make_load(sidecar.url, threshold=1500)
    clients = load.run(singles=35, batches=5)
    await asyncio.wait_for(load.reached.wait(), 30)
    # Requests are in flight right now: every client loops until its first failure.
    code = await sidecar.kill()
    assert code == -signal.SIGKILL
    await asyncio.wait_for(asyncio.gather(*clients), 30)

    # Before the kill nothing but 202s; after it, every client met a dead connection.
    assert set(load.statuses) == {202}, load.refusals[:5]
    assert sum(load.errors.values()) == len(clients), load.errors
    assert not load.problems, load.problems[:5]
    assert len(load.acked) >= 1500

    arrivals = Arrivals(fake)
    duplicates = await restart_and_drain(launcher, make_load, arrivals, load.acked)
    assert set(load.acked) <= set(arrivals.prompts)
    stored_unanswered = len(arrivals.arrived(load.unanswered))
    print(f"acknowledged {len(load.acked)}, received {len(fake.received)}, "
          f"duplicates {duplicates}, errors {dict(load.errors)}, "
          f"stored but unanswered {stored_unanswered}")


async def test_sigkill_while_upstream_failing_then_recovers(
    launcher: Launcher, fake: FakePrecogX, make_load: MakeLoad
) -> None:
    fake.default = Respond(503)
    sidecar = await launcher.start()
    load = make_load(sidecar.url)
    await load.post_batches(300)
    # At most upstream.concurrency (2) deliveries exist, each retrying its own batch:
    # a third request is somebody's retry, sent only after its failure was committed.
    await fake.wait_for_requests(3)
    code = await sidecar.kill()
    assert code == -signal.SIGKILL
    assert fake.received == []

    spooled = read_spool(launcher.spool_path)
    assert set(load.acked) <= set(spooled)
    assert all(spooled[i].state == "pending" for i in load.acked)
    assert max(spooled[i].attempts for i in load.acked) > 0

    fake.default = None
    arrivals = Arrivals(fake)
    await restart_and_drain(launcher, make_load, arrivals, load.acked)
    assert set(load.acked) <= set(arrivals.prompts)


async def test_sigkill_during_delivery(
    launcher: Launcher, fake: FakePrecogX, make_load: MakeLoad
) -> None:
    fake.default = Delay(1.0)  # below upstream.timeout_s (2 s): the sidecar keeps waiting
    sidecar = await launcher.start()
    load = make_load(sidecar.url)
    await load.post_batches(200)
    await fake.wait_for_requests(1)
    # No await between this check and the kill: not one answer has left the fake.
    assert all(r.status is None for r in fake.requests)
    sidecar.proc.kill()
    code = await sidecar.wait()
    assert code == -signal.SIGKILL

    spooled = read_spool(launcher.spool_path)
    assert set(load.acked) <= set(spooled)  # no 2xx ever reached the sidecar

    fake.default = None
    arrivals = Arrivals(fake)
    duplicates = await restart_and_drain(launcher, make_load, arrivals, load.acked)
    assert set(load.acked) <= set(arrivals.prompts)
    print(f"acknowledged {len(load.acked)}, received {len(fake.received)}, "
          f"duplicates {duplicates}")


@pytest.mark.parametrize("sidecar_loop", ["uvloop", "asyncio"])
async def test_sigterm_graceful_shutdown_answers_or_refuses(
    launcher: Launcher, fake: FakePrecogX, make_load: MakeLoad
) -> None:
    sidecar = await launcher.start()
    load = make_load(sidecar.url, threshold=500)
    clients = load.run(singles=35, batches=5)
    await asyncio.wait_for(load.reached.wait(), 30)
    sidecar.proc.send_signal(signal.SIGTERM)
    code = await sidecar.wait()
    await asyncio.wait_for(asyncio.gather(*clients), 30)
    assert code == 0, sidecar.log_tail()

    # Each client stopped at its first non-202: a 503 refusal or a closed connection.
    assert set(load.statuses) <= {202, 503}, load.refusals[:5]
    assert load.statuses[503] + sum(load.errors.values()) == len(clients)
    codes = {orjson.loads(body)["error"]["code"] for _, body in load.refusals}
    assert codes <= {"SHUTTING_DOWN", "SPOOL_UNAVAILABLE"}, load.refusals[:5]
    assert not load.problems, load.problems[:5]

    arrivals = Arrivals(fake)
    duplicates = await restart_and_drain(launcher, make_load, arrivals, load.acked)
    assert set(load.acked) <= set(arrivals.prompts)
    # A 503 promises "nothing was stored": the spool is drained, so it is final now.
    assert not arrivals.arrived(load.refused)
    stored_unanswered = len(arrivals.arrived(load.unanswered))
    print(f"acknowledged {len(load.acked)}, 503s {load.statuses[503]}, "
          f"errors {dict(load.errors)}, duplicates {duplicates}, "
          f"stored but unanswered {stored_unanswered}")


async def test_sigterm_with_a_client_stopped_mid_body_exits_promptly(
    launcher: Launcher,
) -> None:
    """One connection that sent its headers and part of its body held the exit for 60 s
    (aiohttp's default shutdown timeout), longer than Docker waits before SIGKILL, with
    the listener already closed."""
    sidecar = await launcher.start()
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/v1/telemetry/ingest HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"agentId\": "
    )
    await writer.drain()
    # Answered after the loop has read those bytes (sent earlier, on loopback): the
    # handler then waits for the rest of the body.
    async with aiohttp.ClientSession() as session, session.get(sidecar.url + "/healthz") as r:
        assert r.status == 200
    assert await sidecar.terminate() == 0, sidecar.log_tail()  # within EXIT_TIMEOUT_S
    answer = await asyncio.wait_for(reader.read(), 30)  # a refusal, or just closed
    assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer[:200]
    writer.close()
