#!/usr/bin/env python3
"""Durable ingest throughput and latency of the sidecar, against a no-op aiohttp baseline.

What is measured
  1. bench/noop_server.py (same aiohttp, same event loop, a handler that only reads the body
     and answers 202) under wrk: 50 keep-alive connections, one wrk thread, POSTing the
     example Dify event to /api/v1/integrations/dify/telemetry, then batches of 100
     (--event large: the 2 KB interaction of bench/redact.py instead).
  2. The real sidecar (no API key, so it only accepts and spools: SQLite WAL,
     synchronous=FULL by default, group commit) under exactly the same load.
  Each measurement is preceded by a warm-up run (default 2 s) and lasts 10 s. Both
  servers run on one CPU (the one not under load idles) and wrk on another (taskset).
  In each of --rounds rounds (default 3) both are started afresh, their single-event
  runs made back to back, then their batch runs; which goes first alternates.

How to read it
  - Each round prints its figures; the verdicts use the median over the rounds (the ratio
    is taken per round, from two runs seconds apart: this VM's speed drifts by up to 15 %
    over a minute), so a neighbour's burst on a shared or virtual machine spoils one
    round, not the result.
  - "ratio" is sidecar req/s / no-op req/s for single events: the share of the bare HTTP
    stack's speed left after making every event durable. Target >= 65 %.
  - p50/p99 are wrk's latency percentiles for single events. Target p99 <= 10 ms.
  - Each run also prints the server's CPU time per request (all its threads, from /proc)
    and how much of a core it used. Near 100 %, req/s is set by that cost; well under,
    the server waited on something (fsync, the load). The no-op server's own figure
    shows how fast the machine was during that run: it drifts minute to minute here.
  - "batched events/s" is req/s x 100 for batches of 100 events. Target >= 100,000.
  - Every figure is printed with its target and PASS/MISS; nothing is asserted.
  - Any non-2xx answer or socket error is printed in a "!!!" banner: the figure of that
    run measured error answers, not ingest.
  - After the sidecar stopped, the spool's rows are counted read-only and compared with
    the 2xx answers wrk counted. Rows >= 2xx is expected (requests still in flight when
    wrk stopped are committed but not counted by wrk); rows < 2xx means a 202 was given
    for an event that is not on disk: LOSS, printed loudly.

Run from the repository root:  python bench/ingest.py [--duration 10] [--synchronous NORMAL]
Needs wrk (apt-get install wrk); exits 2 without it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from _common import (
    BATCH_PATH,
    EVENT,
    LARGE_EVENT,
    ROOT,
    SINGLE_PATH,
    Child,
    ChildError,
    WrkResult,
    batch_body,
    complain_about_logs,
    cpu_plan,
    event_body,
    filesystem_of,
    get_text,
    have_wrk,
    loud,
    metric_sum,
    run_wrk,
    same_filesystem,
    say,
    sidecar_sections,
    smoke,
    spool_rows,
    start_noop,
    start_sidecar,
    stop_on_signals,
    verdict,
    write_config,
    wrk_missing_exit,
)

BATCH_EVENTS = 100
TARGET_RATIO = 0.65
TARGET_P99_MS = 10.0
TARGET_BATCH_EVENTS_S = 100_000
EVENTS = {"seed": EVENT, "large": LARGE_EVENT}


@dataclass
class Runs:
    """The wrk runs against one server; events_per_request per run for the spool check."""

    single: WrkResult
    batch: WrkResult
    all: list[tuple[WrkResult, int]]
    single_cpu_us: float  # the server's CPU time per single-event request, all threads


class Target:
    """One server under test and the wrk runs made against it."""

    def __init__(
        self, name: str, child: Child, port: int, args: argparse.Namespace, tmp: Path,
        cpu: int | None,
    ) -> None:
        self.name, self.child, self.args, self.tmp, self.cpu = name, child, args, tmp, cpu
        self.base = f"http://127.0.0.1:{port}"
        event = EVENTS[args.event]
        self.single_body, self.many_body = event_body(event), batch_body(BATCH_EVENTS, event)
        self.runs: list[tuple[WrkResult, int]] = []
        self.cpu_us: dict[str, float] = {}
        self.single: WrkResult | None = None
        self.batch: WrkResult | None = None

    def wrk(self, label: str, path: str, body: bytes, seconds: int, events: int) -> WrkResult:
        say(f"  {self.name} wrk {label}: {seconds}s, {self.args.connections} connections ...")
        before = self.child.cpu_seconds()
        r = run_wrk(
            f"{self.name} {label}", self.base + path, body, workdir=self.tmp,
            connections=self.args.connections, seconds=seconds, cpu=self.cpu,
        )
        used = self.child.cpu_seconds() - before
        self.runs.append((r, events))
        self.cpu_us[label] = 1e6 * used / r.requests
        # Well under 100 %: the server waited (on fsync, say), and req/s says less about cost.
        say(
            f"    {r.rps:12,.0f} req/s  p50 {r.p50:7.2f} ms  p99 {r.p99:7.2f} ms  "
            f"{r.requests:,} requests, {r.non2xx} non-2xx, socket errors {r.errors - r.non2xx}\n"
            f"    server CPU {self.cpu_us[label]:.1f} us per request, "
            f"{used / max(r.seconds, 1e-9):.0%} of a core"
        )
        return r

    def measure_single(self) -> None:
        if self.args.warmup > 0:
            self.wrk("warm-up single", SINGLE_PATH, self.single_body, self.args.warmup, 1)
        self.single = self.wrk("single", SINGLE_PATH, self.single_body, self.args.duration, 1)

    def measure_batch(self) -> None:
        label = f"batch x{BATCH_EVENTS}"
        if self.args.warmup > 0:
            self.wrk(f"warm-up {label}", BATCH_PATH, self.many_body, self.args.warmup,
                     BATCH_EVENTS)
        self.batch = self.wrk(label, BATCH_PATH, self.many_body, self.args.duration,
                              BATCH_EVENTS)

    def result(self) -> Runs:
        assert self.single is not None and self.batch is not None
        return Runs(self.single, self.batch, self.runs, self.cpu_us["single"])


@dataclass
class SidecarResult:
    runs: Runs
    received_metric: float
    exit_code: int | None
    rows: int | None
    rows_error: str | None


@dataclass
class Round:
    noop: Runs
    side: SidecarResult

    @property
    def ratio(self) -> float:
        n = self.noop.single.rps
        return self.side.runs.single.rps / n if n else 0.0

    @property
    def batch_eps(self) -> float:
        return self.side.runs.batch.rps * BATCH_EVENTS


def bench_round(
    args: argparse.Namespace, tmp: Path, cpus: tuple[int | None, int | None], noop_first: bool
) -> Round:
    """Both servers started (on the same CPU; the one not under load idles), then their
    single-event runs back to back and their batch runs back to back: the ratio compares
    two runs seconds apart, not a minute, over which this VM's speed drifts by up to 15 %.
    Which goes first alternates between rounds, so neither server is always measured in
    the other's wake (its last checkpoint, say)."""
    tmp.mkdir(exist_ok=True)
    spool = tmp / "spool.db"
    config = write_config(tmp / "sidecar.toml", sidecar_sections(spool, args.synchronous))
    say(f"\nno-op aiohttp server and sidecar (synchronous={args.synchronous}, no API key) "
        f"on CPU {cpus[0]}, wrk on CPU {cpus[1]}; spool {spool}")
    codes: dict[str, int | None] = {}
    # Each child stopped whatever happens after it started: a signal (KeyboardInterrupt,
    # see stop_on_signals) or a failing stop of the other must not leave one running.
    with contextlib.ExitStack() as stack:
        noop_child, noop_port = start_noop(cpus[0])
        stack.callback(noop_child.stop)
        side_child, side_port = start_sidecar(config, cpus[0])
        stack.callback(lambda: codes.update(sidecar=side_child.stop()))
        noop = Target("no-op", noop_child, noop_port, args, tmp, cpus[1])
        side = Target("sidecar", side_child, side_port, args, tmp, cpus[1])
        smoke("noop", noop.base + SINGLE_PATH, noop.single_body)
        smoke("sidecar", side.base + SINGLE_PATH, side.single_body)
        order = (noop, side) if noop_first else (side, noop)
        for target in order:
            target.measure_single()
        for target in order:
            target.measure_batch()
        time.sleep(1.0)  # let requests still in flight when wrk stopped commit
        received = metric_sum(get_text(side.base + "/metrics"),
                              "precogx_sidecar_events_received_total")
    code = codes["sidecar"]
    complain_about_logs(side_child)
    if code != 0:
        loud(f"the sidecar exited with code {code} after SIGTERM (expected 0)")
    rows: int | None = None
    rows_error: str | None = None
    try:
        rows = spool_rows(spool)[0]
    except sqlite3.Error as e:
        rows_error = f"{type(e).__name__}: {e}"
    return Round(noop.result(), SidecarResult(side.result(), received, code, rows, rows_error))


# The targets, like the figures for orientation, are set on uvloop: the loop the
# sidecar runs on when installed, as in the Docker image. Without it both servers run on
# asyncio's loop, which slows the sidecar relatively more than the no-op.
NO_UVLOOP = ("uvloop is not installed: both servers run asyncio's own loop, and the targets "
             "are set on uvloop (pip install -e '.[speed]'); the ratio comes out some "
             "3 points lower")


def event_loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def report(rounds: list[Round], args: argparse.Namespace) -> None:
    say("\n" + "=" * 78)
    say(f"RESULTS  ({args.event} event of {len(event_body(EVENTS[args.event])):,} bytes, "
        f"synchronous={args.synchronous}, {args.connections} connections, "
        f"{args.duration}s per run, {len(rounds)} round(s), no-op and sidecar back to back, "
        f"event loop {event_loop()})")
    say("=" * 78)
    if event_loop() != "uvloop":
        loud(NO_UVLOOP)
    say(f"{'round':>5} {'no-op req/s':>12} {'sidecar req/s':>14} {'ratio':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'batched events/s':>17} {'CPU us/req no-op, sidecar':>26}")
    for i, r in enumerate(rounds, 1):
        s = r.side.runs.single
        say(f"{i:>5} {r.noop.single.rps:12,.0f} {s.rps:14,.0f} {r.ratio:7.1%} {s.p50:7.2f} "
            f"{s.p99:7.2f} {r.batch_eps:17,.0f} "
            f"{r.noop.single_cpu_us:17.1f}, {r.side.runs.single_cpu_us:6.1f}")
    # Medians: a neighbour's burst on a shared machine spoils a run, not the figure.
    ratio = statistics.median(r.ratio for r in rounds)
    p99 = statistics.median(r.side.runs.single.p99 for r in rounds)
    batch_eps = statistics.median(r.batch_eps for r in rounds)
    errors = sum(x.errors for r in rounds for x, _ in r.noop.all + r.side.runs.all)
    say(f"\n{'median over rounds':34}{'measured':>12}   target")
    say(f"{'ratio sidecar / no-op':34}{ratio:12.1%}   >= {TARGET_RATIO:.0%}  "
        f"{verdict(ratio >= TARGET_RATIO)}")
    say(f"{'single event p99 (ms)':34}{p99:12.2f}   <= {TARGET_P99_MS:g} ms  "
        f"{verdict(p99 <= TARGET_P99_MS)}")
    say(f"{'batched events/s':34}{batch_eps:12,.0f}   >= {TARGET_BATCH_EVENTS_S:,}  "
        f"{verdict(batch_eps >= TARGET_BATCH_EVENTS_S)}")
    say(f"{'non-2xx + socket errors (all runs)':34}{errors:12,}   == 0  {verdict(errors == 0)}")
    for i, r in enumerate(rounds, 1):
        check_spool(i, r.side)
    if errors:
        loud(f"{errors} errors during the runs: the figures above include error answers")


def check_spool(round_no: int, side: SidecarResult) -> None:
    """Every event answered 2xx must be a row of the spool."""
    expected = 1 + sum(r.ok * events for r, events in side.runs.all)  # 1: the smoke request
    say(f"\nround {round_no} spool check: events answered 2xx (wrk, incl. warm-ups + 1 smoke) "
        f"= {expected:,}; events_received metric = {side.received_metric:,.0f}")
    if side.rows is None:
        loud(f"could not count the spool's rows: {side.rows_error}")
    elif side.rows < expected:
        loud(f"LOSS: the spool holds {side.rows:,} events but {expected:,} were answered 2xx "
             f"({expected - side.rows:,} missing)")
    else:
        say(f"spool rows = {side.rows:,} >= 2xx count: OK (+{side.rows - expected:,}: requests "
            "still in flight when wrk stopped, committed but not counted by wrk)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, default=50, help="keep-alive connections")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                        type=str.upper, help="the sidecar's spool.synchronous")
    parser.add_argument("--rounds", type=int, default=3,
                        help="both servers measured this many times; medians reported")
    parser.add_argument("--event", choices=sorted(EVENTS), default="seed",
                        help="seed: the Dify guide's example (the targets are set for it); "
                             "large: a 2 KB interaction with PII and a pasted API key, "
                             "which the default credential rule masks")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    stop_on_signals()
    if not have_wrk():
        wrk_missing_exit()

    all_cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = cpu_plan()
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})  # keep this script off the server's CPU too
    tmp = Path(tempfile.mkdtemp(prefix="precogx-bench-ingest-", dir="/tmp"))
    say(f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"event loop for both servers: {event_loop()}")
    if event_loop() != "uvloop":
        loud(NO_UVLOOP)
    say(f"CPUs available: {all_cpus}; server on CPU {server_cpu}, "
        f"wrk (and this script) on CPU {load_cpu}")
    if load_cpu is None:
        loud("fewer than 2 CPUs: nothing is pinned, server and wrk share the CPU")
    say(f"spool dir {tmp}: {filesystem_of(tmp)}; same filesystem as {ROOT}: "
        f"{'yes' if same_filesystem(tmp, ROOT) else 'NO'}")
    rounds: list[Round] = []
    try:
        for i in range(args.rounds):
            say(f"\n#### round {i + 1} of {args.rounds}")
            round_dir = tmp / f"round-{i + 1}"
            rounds.append(bench_round(args, round_dir, (server_cpu, load_cpu), i % 2 == 0))
            if not args.keep:  # a round's spool can hold millions of events
                shutil.rmtree(round_dir, ignore_errors=True)
            # On the disk before the next round: the writes of this one (its final
            # checkpoint, the removal) stalled the next round's first fsyncs, a p99 of
            # 24-34 ms in the second round, which starts with the sidecar.
            os.sync()
    except ChildError as e:
        loud(f"benchmark aborted: {e}")
        return 1
    except KeyboardInterrupt:
        loud("interrupted: servers stopped, no figures")
        return 130
    finally:
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(rounds, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
