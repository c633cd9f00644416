#!/usr/bin/env python3
"""The no-op baseline for bench/ingest.py: the sidecar's HTTP stack with nothing behind it.

Same aiohttp, same event loop (uvloop when installed, as the sidecar), same runner
settings (no access log, backlog 1024, 1 MiB body limit). Its POST handlers at the
sidecar's ingest paths read the whole body and answer 202 with a small JSON body, so
the difference to the sidecar is exactly the sidecar's own work: parsing, validation,
stamping, the SQLite group commit and its fsync.

Run: ``python bench/noop_server.py --port 0``; prints ``listening on http://HOST:PORT``
once ready, serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

PATHS = ("/api/v1/integrations/dify/telemetry", "/api/v1/telemetry/batch")
ANSWER = b'{"accepted":1,"ids":[1]}'
MIB = 1024 * 1024


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, body=ANSWER, content_type="application/json")


async def serve(host: str, port: int, loop_name: str) -> None:
    app = web.Application(client_max_size=MIB)
    app.add_routes([web.post(path, accept) for path in PATHS])
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        real_port = runner.addresses[0][1]
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        print(f"listening on http://{host}:{real_port} (loop: {loop_name})", flush=True)
        await stopping.wait()
    finally:
        await runner.cleanup()


def run(main: Callable[[str], Coroutine[Any, Any, None]]) -> None:
    """Like the sidecar's cli._run_loop: uvloop when installed, else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main("asyncio"))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main("uvloop"))


def main() -> None:
    parser = argparse.ArgumentParser(description="No-op aiohttp ingest server (baseline).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see stdout)")
    args = parser.parse_args()
    run(lambda loop_name: serve(args.host, args.port, loop_name))


if __name__ == "__main__":
    main()
