"""``precogx-sidecar`` and its subcommands. Results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from sidecar import __version__, config, logs
from sidecar.config import Config, ConfigError

log = logging.getLogger("sidecar")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="precogx-sidecar",
        description="Durable forwarding of Dify interactions to PrecogX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--config", metavar="FILE",
            help="TOML config file (default: env PRECOGX_SIDECAR_CONFIG)",
        )
        p.set_defaults(handler=handler)
        return p

    command("run", _run, "Run the sidecar until SIGTERM or SIGINT.")
    command(
        "check-config", _check_config,
        "Print the effective configuration (secrets masked); exit 1 on an error.",
    )
    return parser


def _load(args: argparse.Namespace) -> Config:
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
        return _fail(f"config error: {e}")
    logs.setup(cfg.log.level, cfg.log.format)

    async def serve() -> None:
        await Server(cfg).serve()

    try:
        _run_loop(serve)
    except (ConfigError, StartupError) as e:
        return _fail(f"cannot start: {e}")
    except KeyboardInterrupt:
        pass
    return 0


def _run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
        warning = config.check_listen_auth(cfg)
        key = config.read_api_key(cfg)
    except ConfigError as e:
        return _fail(f"config error: {e}")
    origin = f"from {cfg.upstream.api_key_file}" if cfg.upstream.api_key_file else (
        f"from env {config.ENV_API_KEY}"
    )
    state = f"set ({origin})" if key else "NOT SET: events will be spooled but not forwarded"
    sys.stdout.write(config.render(cfg, state))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
