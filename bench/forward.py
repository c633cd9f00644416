#!/usr/bin/env python3
"""How fast the forwarder drains a backlog to a local upstream, in batch mode.

What is measured
  1. The fake PrecogX (tests/fake_precogx.py) starts as a subprocess.
  2. Prefill: a sidecar WITHOUT an API key accepts N events (default 200,000) posted as
     batches of 500 by an aiohttp client with a few requests in flight, then stops
     (SIGTERM). Its spool must then hold N pending events.
  3. Drain: the same spool, a sidecar WITH the API key pointed at the fake, upstream
     mode = batch, batch_max_events = 500, concurrency = 2. The clock runs from its
     "listening on" line until precogx_sidecar_spool_events{state="pending"} is 0
     (/metrics polled every 0.2 s; the forwarder starts a few ms before that line).
  4. Both stop with SIGTERM; the fake prints how many interactions it received.

How to read it
  - "drain events/s" = N / drain time: the figure compared with the target of
    >= 50,000 events/s (PASS/MISS; nothing is asserted).
  - "steady events/s" comes from events_delivered_total between the first and the last
    poll: the same rate without the start-up and the final partial poll interval.
  - The fake must have received >= N interactions (more means redeliveries, which the
    protocol allows); fewer is printed loudly as a SHORTFALL, as is any event left
    pending or dead in the spool afterwards.
  - The sidecar runs on one CPU and the fake on the other, so they do not steal time
    from each other; the fake does real work per event (JSON parsing, validation), so on
    a slow machine it can be the bottleneck: its CPU time is printed to tell.

Run from the repository root:  python bench/forward.py [--events 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from _common import (
    BATCH_PATH,
    EVENT,
    TEST_KEY,
    Child,
    ChildError,
    complain_about_logs,
    cpu_plan,
    filesystem_of,
    get_text,
    loud,
    metric,
    say,
    sidecar_sections,
    spool_rows,
    start_fake,
    start_sidecar,
    stop_on_signals,
    verdict,
    write_config,
)

TARGET_EVENTS_S = 50_000
POLL_S = 0.2
PREFILL_BATCH = 500


async def _prefill(base: str, events: int, in_flight: int) -> int:
    """POST ``events`` as batches of PREFILL_BATCH; the number of events answered 202."""
    sizes = [PREFILL_BATCH] * (events // PREFILL_BATCH)
    if events % PREFILL_BATCH:
        sizes.append(events % PREFILL_BATCH)
    bodies = {n: orjson.dumps({"interactions": [EVENT] * n}) for n in set(sizes)}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in sizes:
        queue.put_nowait(n)
    accepted = 0
    failures: list[str] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while not queue.empty() and len(failures) < 5:
            n = queue.get_nowait()
            async with session.post(
                base + BATCH_PATH, data=bodies[n], headers={"Content-Type": "application/json"}
            ) as resp:
                body = await resp.read()
            if resp.status == 202 and orjson.loads(body).get("accepted") == n:
                accepted += n
            else:
                failures.append(f"{resp.status}: {body[:200]!r}")

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(in_flight)))
    if failures:
        loud(f"prefill: {len(failures)} batches refused, e.g. {failures[0]}")
    return accepted


def prefill(config: Path, spool: Path, args: argparse.Namespace, cpu: int | None) -> int:
    say(f"\n== prefill: {args.events:,} events in batches of {PREFILL_BATCH}, "
        f"{args.prefill_concurrency} in flight, sidecar without API key (CPU {cpu})")
    child, port = start_sidecar(config, cpu)
    try:
        started = time.monotonic()
        accepted = asyncio.run(_prefill(f"http://127.0.0.1:{port}", args.events,
                                        args.prefill_concurrency))
        took = time.monotonic() - started
        say(f"  {accepted:,} events accepted in {took:.1f} s ({accepted / took:,.0f} events/s, "
            f"synchronous={args.synchronous})")
    finally:
        code = child.stop()
    complain_about_logs(child)
    if code != 0:
        loud(f"prefill sidecar exited with code {code} after SIGTERM (expected 0)")
    total, pending = spool_rows(spool)
    say(f"  spool after prefill: {total:,} events, {pending:,} pending")
    if pending < args.events:
        loud(f"the spool holds only {pending:,} pending events, {args.events:,} were posted")
    return pending


@dataclass
class Drain:
    took: float | None  # seconds from "listening on" to pending == 0; None: timed out
    steady: float | None  # events/s between the first and the last poll
    startup: float  # seconds from launch to "listening on"
    child: Child


def drain(config: Path, expected: int, args: argparse.Namespace, cpu: int | None) -> Drain:
    say(f"\n== drain: sidecar with API key, batch_max_events={args.batch_max_events}, "
        f"concurrency={args.concurrency} (CPU {cpu})")
    launched = time.monotonic()
    child, port = start_sidecar(config, cpu)
    ready = time.monotonic()
    say(f"  ready {ready - launched:.2f} s after launch; polling /metrics every {POLL_S} s")
    url = f"http://127.0.0.1:{port}/metrics"
    samples: list[tuple[float, float, float]] = []  # (t, delivered, pending)
    took: float | None = None
    try:
        deadline = ready + args.timeout
        next_report = ready + 2.0
        while time.monotonic() < deadline:
            text = get_text(url)
            now = time.monotonic()
            delivered = metric(text, "precogx_sidecar_events_delivered_total") or 0.0
            pending = metric(text, "precogx_sidecar_spool_events", 'state="pending"')
            samples.append((now, delivered, pending if pending is not None else -1))
            if pending is None:
                raise ChildError("no precogx_sidecar_spool_events{state=\"pending\"} in /metrics")
            if pending <= 0 or delivered >= expected:
                took = now - ready
                break
            if now >= next_report:
                say(f"  t={now - ready:5.1f}s delivered {delivered:10,.0f}  "
                    f"pending {pending:10,.0f}")
                next_report += 2.0
            time.sleep(POLL_S)
        else:
            loud(f"drain did not finish within {args.timeout} s")
    except BaseException:
        child.stop()
        raise
    steady = None
    if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
        (t0, d0, _), (t1, d1, _) = samples[0], samples[-1]
        steady = (d1 - d0) / (t1 - t0)
    final = samples[-1] if samples else None
    if final is not None:
        say(f"  t={final[0] - ready:5.1f}s delivered {final[1]:10,.0f}  pending {final[2]:10,.0f}")
    return Drain(took, steady, ready - launched, child)


def fake_summary(fake: Child) -> tuple[int, int] | None:
    for line in fake.output("stdout"):
        if m := re.search(r"stopped: (\d+) interactions in (\d+) requests", line):
            return int(m.group(1)), int(m.group(2))
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200_000, help="backlog size (<= ~300k)")
    parser.add_argument("--batch-max-events", type=int, default=500,
                        help="the draining sidecar's upstream.batch_max_events")
    parser.add_argument("--concurrency", type=int, default=2, help="upstream.concurrency")
    parser.add_argument("--linger-ms", type=int, default=50, help="upstream.linger_ms")
    parser.add_argument("--prefill-concurrency", type=int, default=4,
                        help="prefill requests in flight")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                        type=str.upper, help="the sidecar's spool.synchronous")
    parser.add_argument("--timeout", type=float, default=75.0, help="drain time limit, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    stop_on_signals()

    sidecar_cpu, fake_cpu = cpu_plan()
    tmp = Path(tempfile.mkdtemp(prefix="precogx-bench-forward-", dir="/tmp"))
    spool = tmp / "spool.db"
    key_file = tmp / "api-key"
    key_file.write_text(TEST_KEY + "\n")
    say(f"spool {spool}: {filesystem_of(tmp)}")
    say(f"sidecar on CPU {sidecar_cpu}, fake PrecogX (and this script) on CPU {fake_cpu}")
    if fake_cpu is not None:
        os.sched_setaffinity(0, {fake_cpu})

    fake: Child | None = None
    sidecar: Child | None = None
    result: Drain | None = None
    fake_cpu_s: float | None = None
    sidecar_cpu_s: float | None = None
    prefilled = 0
    leftover: tuple[int, int] | None = None
    try:
        fake, upstream = start_fake(fake_cpu)
        say(f"fake PrecogX at {upstream}")
        plain = write_config(tmp / "prefill.toml", sidecar_sections(spool, args.synchronous))
        prefilled = prefill(plain, spool, args, sidecar_cpu)
        upstream_cfg: dict[str, object] = {
            "url": upstream,
            "api_key_file": str(key_file),
            "mode": "batch",
            "batch_max_events": args.batch_max_events,
            "linger_ms": args.linger_ms,
            "concurrency": args.concurrency,
        }
        keyed = write_config(
            tmp / "drain.toml", sidecar_sections(spool, args.synchronous, upstream_cfg)
        )
        fake_cpu_before = cpu_seconds(fake.proc.pid)
        result = drain(keyed, prefilled, args, sidecar_cpu)
        sidecar = result.child
        fake_cpu_after = cpu_seconds(fake.proc.pid)
        sidecar_cpu_s = cpu_seconds(sidecar.proc.pid)
        if fake_cpu_before is not None and fake_cpu_after is not None:
            fake_cpu_s = fake_cpu_after - fake_cpu_before
        code = sidecar.stop()
        complain_about_logs(sidecar)
        if code != 0:
            loud(f"draining sidecar exited with code {code} after SIGTERM (expected 0)")
        leftover = spool_rows(spool)
    except (ChildError, sqlite3.Error, OSError) as e:
        loud(f"benchmark aborted: {e}")
        return 1
    except KeyboardInterrupt:
        loud("interrupted: servers stopped, no figures")
        return 130
    finally:
        if sidecar is not None:
            sidecar.stop()
        if fake is not None:
            fake.stop()
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    assert fake is not None and result is not None
    took, steady = result.took, result.steady
    received = fake_summary(fake)
    say("\n" + "=" * 78)
    say(f"RESULTS  ({prefilled:,} events, batch_max_events={args.batch_max_events}, "
        f"concurrency={args.concurrency}, synchronous={args.synchronous})")
    say("=" * 78)
    if took is None:
        loud(f"the backlog was not drained within {args.timeout} s: no drain rate")
    else:
        rate = prefilled / took
        say(f"drain time                 {took:10.2f} s    (+/- {POLL_S} s: the poll interval)")
        say(f"drain events/s             {rate:10,.0f}    target >= {TARGET_EVENTS_S:,}  "
            f"{verdict(rate >= TARGET_EVENTS_S)}")
    if steady is not None:
        say(f"steady events/s (metrics)  {steady:10,.0f}")
    if sidecar_cpu_s is not None and took:
        say(f"sidecar CPU busy           {sidecar_cpu_s / (took + result.startup):10.0%}    "
            "(all its threads, from launch; 100% = one CPU)")
    if fake_cpu_s is not None and took:
        say(f"fake PrecogX CPU busy      {fake_cpu_s / took:10.0%}    (100% = it was the limit)")
    if received is None:
        loud("the fake did not print its 'stopped:' line: cannot verify delivery\n"
             + fake.tail())
    else:
        count, requests = received
        say(f"fake received              {count:10,} interactions in {requests:,} requests "
            f"({count / max(requests, 1):,.0f} per request)")
        if count < prefilled:
            loud(f"SHORTFALL: the fake received {count:,} of {prefilled:,} events "
                 f"({prefilled - count:,} missing)")
        elif count > prefilled:
            say(f"  ({count - prefilled:,} redeliveries: allowed, the upstream dedups by "
                "sidecar_event_id)")
    if leftover is not None:
        total, pending = leftover
        say(f"spool afterwards           {total:10,} events ({pending:,} pending)")
        if total:
            loud(f"{total:,} events still in the spool after the drain "
                 f"({pending:,} pending, {total - pending:,} dead)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
