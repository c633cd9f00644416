"""`precogx-sidecar healthcheck`, the Docker HEALTHCHECK, against a live and a dead port."""

from __future__ import annotations

import asyncio
import os
import socket

from tests.conftest import ROOT, StartSidecar, sidecar_command


async def healthcheck(port: int) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRECOGX_")}
    env.update(PYTHONPATH=str(ROOT), PRECOGX_SIDECAR_SERVER_PORT=str(port),
               PRECOGX_SIDECAR_SERVER_HOST="0.0.0.0", PRECOGX_SIDECAR_INGEST_TOKEN="t0ken-ok")
    proc = await asyncio.create_subprocess_exec(
        *sidecar_command("healthcheck"), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_healthy_sidecar_passes(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar()
    assert sidecar.server.port is not None
    code, out, _ = await healthcheck(sidecar.server.port)
    assert (code, out.strip()) == (0, "ok")


async def test_nothing_listening_fails_with_one_line() -> None:
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = await healthcheck(port)
    assert code == 1 and out == ""
    assert err.startswith(f"precogx-sidecar: http://127.0.0.1:{port}/healthz")
    assert "Traceback" not in err
