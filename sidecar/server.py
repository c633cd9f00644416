"""The sidecar's life: startup -> main_loop -> shutdown.

    receivers (HTTP) -> spool (SQLite) -> forwarder (batches to PrecogX)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from sidecar import __version__
from sidecar.aio import cancel_and_wait
from sidecar.app import build_server
from sidecar.config import Config, ConfigError, check_listen_auth, read_api_key
from sidecar.forwarder.client import UpstreamClient
from sidecar.forwarder.forwarder import Forwarder
from sidecar.logs import register_secret
from sidecar.metrics import Metrics
from sidecar.receivers.dify_extension import DifyExtension
from sidecar.receivers.precogx import IngestReceiver
from sidecar.redaction.stage import build_stages
from sidecar.spool import Spool, SpoolInUse, SpoolUnavailable, SpoolVersionError

log = logging.getLogger("sidecar")

PRUNE_EVERY_S = 60.0
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What the last step of a shutdown gives the handlers still running: time for a slow
# redaction to end in its 503 (aiohttp's default, 60 s, outlasted Docker's stop timeout
# over one client that stopped mid-body).
HANDLERS_DRAIN_S = 5.0


class StartupError(Exception):
    """Start-up cannot go on; ``str()`` is the one line for the operator."""


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.spool = Spool(config.spool, config.server.idempotency_ttl_s)
        self.spool.dropped = lambda reason, n: self.metrics.events_dropped.labels(reason).inc(n)
        self.client = UpstreamClient(config.upstream)
        self.forwarder = Forwarder(config, self.spool, self.metrics, self.client)
        redact, redact_inline = build_stages(config, self.metrics)
        self.receiver = IngestReceiver(config.server, self.spool, self.metrics, redact)
        self.dify = DifyExtension(
            config.dify, self.spool, self.metrics, redact, redact_inline,
            config.server.body_timeout_s,
        )
        self.port: int | None = None
        self.should_exit = asyncio.Event()
        self._runner: web.ServerRunner | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._oldest_pending: float | None = None  # received_at of the oldest pending event

    async def serve(self) -> None:
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        if warning := check_listen_auth(self.config):
            log.warning(warning)
        register_secret(self.config.server.ingest_token)
        register_secret(self.config.dify.extension_token)
        api_key = read_api_key(self.config)
        register_secret(api_key)
        await self._open_spool()
        self._export_spool_gauges()
        # Before the first request and scrape, not at the first upkeep pass.
        try:
            await self.spool.check_free_space()
        except (OSError, sqlite3.Error) as e:  # the upkeep pass tries again
            log.warning("cannot tell the spool disk's free space: %s", e)
        await self._track_oldest()
        await self.client.start()
        self.forwarder.set_api_key(api_key)
        self.forwarder.start()
        self.dify.start()
        await self._listen()
        self._install_signal_handlers()
        self._maintenance = asyncio.create_task(self._maintain(), name="maintenance")
        log.info(
            "precogx-sidecar %s listening on http://%s:%s (spool %s, %d pending, %d dead, "
            "event loop %s)",
            __version__, self.config.server.host, self.port, self.config.spool.path,
            self.spool.counts.pending, self.spool.counts.dead, _loop_name(),
        )

    async def main_loop(self) -> None:
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        log.info("shutting down")
        # 1. Refuse new requests (503 + Retry-After): the client keeps them and retries.
        self.receiver.accepting = False
        if self._maintenance is not None:
            await cancel_and_wait(self._maintenance)
        # 2. Let in-flight upstream requests finish within the grace period; what is
        #    not delivered by then stays in the spool for the next start. The Dify
        #    extension goes on answering and recording meanwhile: refusing its calls
        #    would fail users' chats.
        await self.forwarder.stop(self.config.server.shutdown_grace_s)
        await self.client.close()
        # 3. Conversations the Dify extension still holds go to the spool as they stand;
        #    then commit what requests already handed to the spool: they get their 202.
        await self.dify.stop()
        await self.spool.close()
        # 4. Close the listener and the remaining connections. A handler still running
        #    waits for the rest of a body (the spool is closed: it could only answer 503),
        #    or writes an answer: a short wait, then it is cancelled.
        if self._runner is not None:
            await self._runner.cleanup()
        if unrecorded := self.dify.unrecorded_after_stop:
            # Counted too, but no scrape can see the count any more.
            log.warning("%d Dify extension calls came after the spool closed: answered, "
                        "not recorded", unrecorded)
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
        log.info("stopped")

    # -- startup pieces ----------------------------------------------------------

    async def _open_spool(self) -> None:
        try:
            await self.spool.open()
        except (SpoolVersionError, SpoolInUse) as e:
            raise StartupError(f"spool.path: {e}") from None
        except (sqlite3.Error, OSError) as e:
            hint = ""
            if isinstance(e, PermissionError):
                hint = f" (running as uid {os.getuid()}: its directory must be writable by it)"
            raise StartupError(
                f"spool.path: cannot open {self.config.spool.path} as the spool: {e}{hint}"
            ) from None

    def _export_spool_gauges(self) -> None:
        spool, m = self.spool, self.metrics
        m.spool_events.labels("pending").set_function(lambda: spool.counts.pending)
        m.spool_events.labels("inflight").set_function(lambda: len(spool.inflight))
        m.spool_events.labels("dead").set_function(lambda: spool.counts.dead)
        m.spool_bytes.set_function(lambda: spool.counts.bytes)
        m.spool_file_bytes.set_function(spool.file_bytes)
        m.spool_capacity_events.set(self.config.spool.max_events)
        m.spool_capacity_bytes.set(self.config.spool.max_bytes)
        # The age as of the scrape; the oldest event is looked up by the upkeep pass.
        m.oldest_pending_age.set_function(
            lambda: time.time() - self._oldest_pending if self._oldest_pending else 0.0)

    async def _listen(self) -> None:
        server = build_server(self.receiver, self.dify, self.spool, self.forwarder, self.metrics)
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=HANDLERS_DRAIN_S)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.server.host, self.config.server.port, backlog=1024
        )
        try:
            await site.start()
        except socket.gaierror as e:
            raise StartupError(
                f"server.host: {self.config.server.host!r} is no address or name this host "
                f"can listen on (an IPv6 address goes without brackets): {e.strerror}"
            ) from None
        except OSError as e:
            raise StartupError(
                f"server.port: cannot listen on {self.config.server.host}:"
                f"{self.config.server.port}: {e.strerror}"
            ) from None
        sockets = self._runner.addresses
        self.port = sockets[0][1] if sockets else self.config.server.port

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.should_exit.set)
        loop.add_signal_handler(signal.SIGINT, self.should_exit.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_api_key)

    def reload_api_key(self) -> None:
        try:
            key = read_api_key(self.config)
        except ConfigError as e:
            log.error("SIGHUP: keeping the current API key: %s", e)
            return
        register_secret(key)
        log.info("SIGHUP: API key %s", "reloaded" if key else "not set")
        self.forwarder.set_api_key(key)

    # -- background upkeep -------------------------------------------------------

    async def _maintain(self) -> None:
        """Give freed pages back, checkpoint the WAL, watch the disk, track the oldest
        pending event, notice CLI edits, prune keys: each on its own, so that one failing
        (a checkpoint, say) does not stop the others."""
        interval = self.config.spool.checkpoint_interval_s
        last_prune = time.monotonic()
        failing: dict[str, str] = {}  # step -> its error, one line per change
        while True:
            await asyncio.sleep(interval)
            steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                # Before the checkpoint, which cuts the pages given back off the file.
                ("reclaim", self.spool.reclaim),
                ("checkpoint", self.spool.checkpoint),
                ("free space check", self.spool.check_free_space),
                ("oldest event lookup", self._track_oldest),
                # Cheap (one PRAGMA) unless the CLI changed the file: then a recount.
                ("recount", self.spool.sync_external_changes),
            ]
            if time.monotonic() - last_prune >= PRUNE_EVERY_S:
                last_prune = time.monotonic()
                steps.append(("key pruning", self.spool.prune_idempotency_keys))
            for name, step in steps:
                try:
                    await step()
                except (sqlite3.Error, OSError, SpoolUnavailable) as e:
                    if failing.get(name) != str(e):
                        log.warning("spool maintenance: %s failed (will retry): %s", name, e)
                    failing[name] = str(e)
                else:
                    if failing.pop(name, None) is not None:
                        log.info("spool maintenance: %s works again", name)

    async def _track_oldest(self) -> None:
        self._oldest_pending = await self.spool.oldest_pending_received_at()


def _loop_name() -> str:
    """uvloop or asyncio: without uvloop (pip install '.[speed]') the sidecar takes about
    a sixth fewer single events per second, which an operator should be able to see."""
    module = type(asyncio.get_running_loop()).__module__
    return module.partition(".")[0]
