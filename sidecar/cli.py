"""``precogx-sidecar`` and its subcommands. Results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import logging
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from sidecar import __version__, config, logs
from sidecar.config import Config, ConfigError
from sidecar.metrics import DEAD_LETTER_REASONS
from sidecar.spool import admin

log = logging.getLogger("sidecar")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        code = handler(args)
        sys.stdout.flush()  # here, so that a reader gone early is caught below
    except BrokenPipeError:
        # `dead-letters list | head`: the reader has what it wanted. Python would print a
        # traceback, and again when it flushes stdout at exit: stdout goes nowhere now.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="precogx-sidecar",
        description="Durable forwarding of Dify interactions to PrecogX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _command(sub, "run", _run, "Run the sidecar until SIGTERM or SIGINT.")
    _command(
        sub, "healthcheck", _healthcheck,
        "Exit 0 if the sidecar on the configured port answers /healthz (for Docker).",
    )
    _command(
        sub, "check-config", _check_config,
        "Print the effective configuration (secrets masked); exit 1 on an error.",
    )

    p = _command(
        sub, "redact", _redact,
        "Print an event as it would be stored, and which rule hit where (on stderr).",
    )
    p.add_argument("event", nargs="?", default="-", metavar="EVENT.json",
                   help="the interaction (or a batch body); - or nothing reads stdin")

    dead = sub.add_parser("dead-letters", help="List, show, replay or purge dead letters.")
    dead_sub = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _command(dead_sub, "list", _dead_list, "List dead letters (oldest first).")
    _filters(p, since=True)
    p.add_argument("--json", action="store_true", help="one JSON array on stdout")
    p = _command(dead_sub, "show", _dead_show, "Print one dead letter as JSON.")
    p.add_argument("id", type=_event_id)
    p = _command(dead_sub, "replay", _dead_replay, "Send dead letters again (attempts reset).")
    _filters(p, ids=True, all_=True)
    p = _command(dead_sub, "purge", _dead_purge, "Delete dead letters for good.")
    _filters(p, before=True, all_=True)
    p.add_argument("--yes", action="store_true", help="really delete")

    spool = sub.add_parser("spool", help="Inspect the spool file.")
    spool_sub = spool.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _command(spool_sub, "stats", _spool_stats, "Counts by state, bytes, oldest pending age.")
    p.add_argument("--json", action="store_true", help="JSON on stdout")
    _command(
        spool_sub, "check", _spool_check,
        "SQLite integrity check plus the spool's invariants; exit 1 on a problem.",
    )
    _command(
        spool_sub, "compact", _spool_compact,
        "Rewrite the spool file without its free pages (the sidecar must be stopped).",
    )
    return parser


def _command(
    sub: Any, name: str, handler: Callable[[argparse.Namespace], int], help: str
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    p.add_argument(
        "--config", metavar="FILE",
        help="TOML config file (default: env PRECOGX_SIDECAR_CONFIG)",
    )
    p.set_defaults(handler=handler)
    return p


def _filters(
    p: argparse.ArgumentParser, *, since: bool = False, before: bool = False,
    ids: bool = False, all_: bool = False,
) -> None:
    p.add_argument("--reason", choices=DEAD_LETTER_REASONS, help="only this reason")
    if since:
        p.add_argument("--since", type=_time_arg, help="dead since T (ISO time, or 30m/2h/7d ago)")
    if before:
        p.add_argument("--before", type=_time_arg, help="dead before T (ISO time, or 7d ago)")
    if ids:
        p.add_argument("--id", type=_event_id, action="append", default=[], dest="ids",
                       metavar="ID")
    if all_:
        p.add_argument("--all", action="store_true", help="every dead letter")


def _event_id(text: str) -> int:
    try:
        event_id = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an event id") from None
    if not 1 <= event_id < 2**63:  # SQLite's integers
        raise argparse.ArgumentTypeError(f"{text!r} is not an event id (1 to 2^63-1)")
    return event_id


def _time_arg(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in units:
        try:
            return time.time() - int(text[:-1]) * units[text[-1]]
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{text!r} is too long ago") from None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO time (2026-11-01T10:00:00Z) nor a duration (30m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _load(args: argparse.Namespace) -> Config:
    # Known before the configuration is read: an error quoting a setting that holds it
    # (the key set as upstream.url, say) must not print it.
    logs.register_secret(os.environ.get(config.ENV_API_KEY, ""))
    return config.load(args.config)


def _fail(message: str) -> int:
    print(f"precogx-sidecar: {logs.scrub(message)}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
    from sidecar.server import Server, StartupError

    try:
        cfg = _load(args)
        config.check_listen_auth(cfg)
    except ConfigError as e:
        return _cannot_start(f"config error: {e}", config.requested_log_format(args.config))
    logs.setup(cfg.log.level, cfg.log.format)

    async def serve() -> None:
        await Server(cfg).serve()

    try:
        _run_loop(serve)
    except (ConfigError, StartupError) as e:
        return _cannot_start(f"cannot start: {e}", cfg.log.format)
    except KeyboardInterrupt:
        pass
    return 0


def _cannot_start(message: str, log_format: str) -> int:
    if log_format != "json":
        return _fail(message)
    # A log pipeline that reads JSON lines would drop a plain one.
    logs.setup("info", "json")
    log.critical("%s", message)
    return 1


# The spool's writer thread needs the GIL back after every fsync; on a busy event loop
# it would wait up to the default 5 ms switch interval, a delay every request in the
# group commit then shares. bench/ingest.py measured +10 % single-event and +30 %
# batched throughput at 0.5 ms against 5 ms; 1 ms did 2 % better than 0.5 ms in
# single-event ingest (7 of 7 interleaved pairs; batches the same, p99 no worse):
# each switch costs the event loop too, and below that they cost more than they save.
SWITCH_INTERVAL_S = 0.001

# A batch of 100 events is some 200 short-lived dicts, and with 50 batches awaiting
# their commit the default threshold (700) ran a young collection every few requests,
# promoting live batches into older generations whose collections then took up to
# 25 ms: about 10 % of the batched ingest time in bench/ingest.py. Requests make
# almost no reference cycles, so collecting less often costs little memory.
GC_THRESHOLDS = (10_000, 50, 100)


def _run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # Everything imported so far lives as long as the process: never scan it again.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def _healthcheck(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except ConfigError as e:
        return _fail(f"config error: {e}")
    host = cfg.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{host if ':' not in host else f'[{host}]'}:{cfg.server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            ok = response.status == 200
    except (OSError, ValueError, http.client.InvalidURL) as e:  # a host no URL can hold
        return _fail(f"{url}: {e}")
    print("ok" if ok else "unhealthy")
    return 0 if ok else 1


def _check_config(args: argparse.Namespace) -> int:
    from sidecar.redaction.stage import build_stages

    try:
        cfg = _load(args)
        warning = config.check_listen_auth(cfg)
        key = config.read_api_key(cfg)
        stage, _ = build_stages(cfg)
    except ConfigError as e:
        return _fail(f"config error: {e}")
    origin = f"from {cfg.upstream.api_key_file}" if cfg.upstream.api_key_file else (
        f"from env {config.ENV_API_KEY}"
    )
    state = f"set ({origin})" if key else "NOT SET: events will be spooled but not forwarded"
    sys.stdout.write(config.render(cfg, state, stage.describe()))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _redact(args: argparse.Namespace) -> int:
    from sidecar.receivers.validation import (
        Rejection,
        interactions_of_batch,
        validate_interaction,
    )
    from sidecar.redaction.stage import (
        build_stages,
        escaped_own_secrets_out,
        without_own_secrets,
    )

    try:
        cfg = _load(args)
        stage, _ = build_stages(cfg)
    except ConfigError as e:
        return _fail(f"config error: {e}")
    # Masked in every body, as the running sidecar does. A key file not readable here
    # (rules tried on another machine) is no reason to refuse.
    logs.register_secret(cfg.server.ingest_token)
    logs.register_secret(cfg.dify.extension_token)
    with contextlib.suppress(ConfigError):
        logs.register_secret(config.read_api_key(cfg))
    source = "stdin" if args.event == "-" else args.event
    try:
        raw = sys.stdin.buffer.read() if args.event == "-" else Path(args.event).read_bytes()
        doc = orjson.loads(without_own_secrets(raw))
        escaped_own_secrets_out(raw, doc)
        batch = isinstance(doc, dict) and "interactions" in doc
        items = interactions_of_batch(doc) if batch else [validate_interaction(doc)]
    except OSError as e:
        return _fail(f"{source}: {e.strerror}")
    except orjson.JSONDecodeError as e:
        return _fail(f"{source}: not valid JSON: {e}")
    except Rejection as e:
        return _fail(f"{source}: {e.message}")
    hits = [hit for item in items for hit in stage(item)]
    try:
        _print_json({"interactions": items} if batch else items[0])
    except orjson.JSONEncodeError as e:  # nested past the 255 levels orjson writes
        return _fail(f"{source}: the event cannot be stored: {e}")
    for hit in hits:
        print(f"redacted: rule {hit.rule!r} ({hit.action}) at {hit.path}", file=sys.stderr)
    print(f"{len(hits)} redactions", file=sys.stderr)
    return 0


# -- dead letters and spool ------------------------------------------------------


def _operate(args: argparse.Namespace, run: Callable[[Config], int]) -> int:
    """An operator command on the configured spool; what stops it, as one line."""
    try:
        return run(_load(args))
    except ConfigError as e:
        return _fail(f"config error: {e}")
    except admin.AdminError as e:
        return _fail(str(e))


def _with_spool(args: argparse.Namespace, work: Callable[[Any], int]) -> int:
    def run(cfg: Config) -> int:
        with admin.open_spool(cfg.spool.path) as db:
            return work(db)

    return _operate(args, run)


def _selection(args: argparse.Namespace) -> admin.Selection:
    return admin.Selection(
        reason=args.reason,
        ids=getattr(args, "ids", ()),
        since=getattr(args, "since", None),
        before=getattr(args, "before", None),
    )


def _progress(verb: str) -> admin.Progress:
    def report(done: int, total: int) -> None:
        print(f"{verb} {done}/{total}", file=sys.stderr)

    return report


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _dead_list(args: argparse.Namespace) -> int:
    def work(db: Any) -> int:
        records = admin.list_dead(db, _selection(args))
        if args.json:
            _print_json(records)
            return 0
        print(f"{'ID':>8}  {'DEAD AT':20}  {'REASON':12}  {'STATUS':>6}  {'TRIES':>5}  ERROR")
        for r in records:
            error = (r["error"] or "").replace("\n", " ")[:60]
            print(
                f"{r['id']:>8}  {r['dead_at']:20}  {r['reason']:12}  {r['status'] or '-':>6}  "
                f"{r['attempts']:>5}  {error}"
            )
        print(f"{len(records)} dead letters", file=sys.stderr)
        return 0

    return _with_spool(args, work)


def _dead_show(args: argparse.Namespace) -> int:
    def work(db: Any) -> int:
        _print_json(admin.show_dead(db, args.id))
        return 0

    return _with_spool(args, work)


def _needs_filter(args: argparse.Namespace, verb: str) -> str | None:
    chosen = args.reason or getattr(args, "ids", None) or getattr(args, "before", None)
    if not chosen and not args.all:
        return f"{verb} what? give --reason, {'--id' if verb == 'replay' else '--before'} or --all"
    return None


def _dead_replay(args: argparse.Namespace) -> int:
    if problem := _needs_filter(args, "replay"):
        return _fail(problem)

    def work(db: Any) -> int:
        max_age_s = _load(args).retry.max_age_s
        n = admin.replay(db, _selection(args), _progress("replayed"), max_age_s)
        print(f"{n} dead letters back to pending; a running sidecar sends them within "
              "seconds, a stopped one when it starts")
        return 0

    return _with_spool(args, work)


def _dead_purge(args: argparse.Namespace) -> int:
    if problem := _needs_filter(args, "purge"):
        return _fail(problem)

    def work(db: Any) -> int:
        if not args.yes:
            n = len(admin.list_dead(db, _selection(args)))
            return _fail(f"would delete {n} dead letters for good; add --yes to do it")
        n = admin.purge(db, _selection(args), _progress("purged"))
        print(f"{n} dead letters purged")
        return 0

    return _with_spool(args, work)


def _spool_stats(args: argparse.Namespace) -> int:
    def work(db: Any) -> int:
        stats = admin.stats(db)
        if args.json:
            _print_json(stats)
            return 0
        events = stats["events"]
        print(f"pending      {events['pending']}")
        print(f"dead         {events['dead']}")
        print(f"bytes        {stats['bytes']}")
        age = stats["oldest_pending_age_s"]
        print(f"oldest       {'-' if age is None else f'{age:.1f}s'}")
        for reason, n in stats["dead_by_reason"].items():
            print(f"{'dead/' + reason:<12} {n}")
        print(f"file bytes   {stats['file_bytes']}")
        gives_back = "" if stats["gives_back_space"] else " (kept: see `spool compact`)"
        print(f"free bytes   {stats['free_bytes']}{gives_back}")
        return 0

    return _with_spool(args, work)


def _spool_compact(args: argparse.Namespace) -> int:
    def run(cfg: Config) -> int:
        path = cfg.spool.path
        print(f"compacting {path} (rewrites the whole file) ...", file=sys.stderr)
        done = admin.compact(path)
        print(f"{path}: {done.before} bytes on disk before, {done.after} after")
        if done.reader:
            print("another process was reading the spool: its WAL is cut back at the next "
                  "checkpoint (the sidecar's first, or when that reader ends)", file=sys.stderr)
        return 0

    return _operate(args, run)


def _spool_check(args: argparse.Namespace) -> int:
    def work(db: Any) -> int:
        problems = admin.check(db)
        for problem in problems:
            print(f"problem: {problem}")
        if problems:
            return 1
        print("ok")
        return 0

    return _with_spool(args, work)
