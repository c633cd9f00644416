"""``precogx-sidecar check-config`` / ``run`` config handling, as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sidecar import __version__
from tests.conftest import ROOT, StartSidecar, sidecar_command, write_config

TOKEN = "px_tok_SECRETSECRET654321"
API_KEY = "px_live_SECRETSECRET123456"
PREFIX = "precogx-sidecar: config error:"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRECOGX_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sidecar_command(*args),
        cwd=tmp_path,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_config_error(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stderr.endswith("\n")
    assert lines[0].startswith(PREFIX)
    for name in names:
        assert name in lines[0]


# -- check-config: the happy paths ------------------------------------------------------


def test_check_config_without_file_prints_defaults(tmp_path: Path) -> None:
    result = cli(tmp_path, "check-config")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    parsed = tomllib.loads(result.stdout)
    assert parsed["server"]["host"] == "127.0.0.1"
    assert parsed["server"]["port"] == 8787
    assert parsed["server"]["ingest_token"] == ""
    assert parsed["spool"]["path"] == "./precogx-spool.db"
    assert parsed["upstream"]["url"] == "https://api.precogx.ai/api/v1"
    assert parsed["retry"]["max_backoff_s"] == 300.0
    assert "# effective configuration (from defaults)" in result.stdout
    assert "NOT SET" in result.stdout
    # check-config only reads: no spool file appears in the working directory
    assert list(tmp_path.iterdir()) == []


def test_check_config_with_file_masks_token_and_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {"server": {"port": 9001, "ingest_token": TOKEN}, "upstream": {"mode": "single"}},
    )
    result = cli(tmp_path, "check-config", "--config", str(path), PRECOGX_API_KEY=API_KEY)
    assert result.returncode == 0, result.stderr
    for stream in (result.stdout, result.stderr):
        assert TOKEN not in stream
        assert API_KEY not in stream
    assert "NOT SET" not in result.stdout
    assert "upstream API key: set (from env PRECOGX_API_KEY)" in result.stdout
    parsed = tomllib.loads(result.stdout)
    assert parsed["server"]["port"] == 9001
    assert parsed["server"]["ingest_token"] == "********"
    assert parsed["upstream"]["mode"] == "single"
    assert f"(from {path})" in result.stdout


def test_check_config_key_file_and_token_env(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")
    path = write_config(tmp_path, {"upstream": {"api_key_file": str(key_file)}})
    result = cli(
        tmp_path, "check-config", "--config", str(path), PRECOGX_SIDECAR_INGEST_TOKEN=TOKEN
    )
    assert result.returncode == 0, result.stderr
    for stream in (result.stdout, result.stderr):
        assert TOKEN not in stream
        assert API_KEY not in stream
    assert f"upstream API key: set (from {key_file})" in result.stdout
    assert tomllib.loads(result.stdout)["server"]["ingest_token"] == "********"


def test_check_config_file_from_env_and_env_overrides(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"server": {"port": 9001}, "log": {"level": "debug"}})
    result = cli(
        tmp_path, "check-config",
        PRECOGX_SIDECAR_CONFIG=str(path), PRECOGX_SIDECAR_SERVER_PORT="9002",
    )
    assert result.returncode == 0, result.stderr
    parsed = tomllib.loads(result.stdout)
    assert parsed["server"]["port"] == 9002
    assert parsed["log"]["level"] == "debug"


def test_check_config_warns_on_open_unauthenticated_listener(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, {"server": {"host": "0.0.0.0", "allow_unauthenticated": True}}
    )
    result = cli(tmp_path, "check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["server"]["host"] == "0.0.0.0"
    assert result.stderr.startswith("warning:")
    assert "allow_unauthenticated" in result.stderr


# -- check-config: broken configurations ------------------------------------------------

BROKEN: list[Any] = [
    pytest.param("[server]\nprot = 8080\n", ["server.prot", "unknown key"], id="unknown-key"),
    pytest.param("[sever]\nport = 8080\n", ["sever", "unknown section"], id="unknown-section"),
    pytest.param('[server]\nport = "x"\n', ["server.port", "expected int"], id="wrong-type"),
    pytest.param("[server]\nport = -1\n", ["server.port", ">= 0"], id="out-of-range"),
    pytest.param('[spool]\nwhen_full = "drop_newest"\n', ["spool.when_full"], id="choice"),
    pytest.param("[server\nport = 1\n", ["sidecar.toml", "not valid TOML"], id="bad-toml"),
    pytest.param('[upstream]\nurl = "ftp://x"\n', ["upstream.url"], id="bad-url"),
    pytest.param('[server]\nhost = "0.0.0.0"\n', ["server.ingest_token"], id="open-no-token"),
    pytest.param('[upstream]\napi_key_file = "missing-key"\n',
                 ["upstream.api_key_file", "missing-key"], id="missing-key-file"),
]


@pytest.mark.parametrize(("toml", "names"), BROKEN)
def test_check_config_broken_file(tmp_path: Path, toml: str, names: list[str]) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(toml)
    result = cli(tmp_path, "check-config", "--config", str(path))
    assert_config_error(result, *names)


def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = cli(tmp_path, "check-config", "--config", str(path))
    assert_config_error(result, str(path), "not found")


def test_check_config_bad_env_value(tmp_path: Path) -> None:
    result = cli(tmp_path, "check-config", PRECOGX_SIDECAR_SERVER_PORT="eighty")
    assert_config_error(result, "server.port", "PRECOGX_SIDECAR_SERVER_PORT")


def test_check_config_wrong_typed_secret_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text("[server]\ningest_token = 987654321987\n")
    result = cli(tmp_path, "check-config", "--config", str(path))
    assert_config_error(result, "server.ingest_token", "expected str")
    assert "987654321987" not in result.stderr


def test_check_config_empty_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("\n")
    path = write_config(tmp_path, {"upstream": {"api_key_file": str(key_file)}})
    result = cli(tmp_path, "check-config", "--config", str(path), PRECOGX_API_KEY=API_KEY)
    assert_config_error(result, "upstream.api_key_file", "empty")
    assert API_KEY not in result.stderr


# -- run ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        pytest.param("[server]\nprot = 8080\n", ["server.prot"], id="unknown-key"),
        pytest.param('[server]\nport = "x"\n', ["server.port"], id="wrong-type"),
        pytest.param("[server\n", ["sidecar.toml", "not valid TOML"], id="bad-toml"),
    ],
)
def test_run_with_config_error(tmp_path: Path, toml: str, names: list[str]) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(toml)
    result = cli(tmp_path, "run", "--config", str(path))
    assert_config_error(result, *names)
    # refused before anything was opened
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sidecar.toml"]


def test_run_with_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = cli(tmp_path, "run", "--config", str(path))
    assert_config_error(result, str(path))


def test_run_open_host_without_token(tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    path = write_config(
        tmp_path, {"server": {"host": "0.0.0.0", "port": 0}, "spool": {"path": str(spool)}}
    )
    result = cli(tmp_path, "run", "--config", str(path))
    assert_config_error(result, "server.ingest_token", "0.0.0.0")
    assert not spool.exists()


# -- the command line itself ----------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    result = cli(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"precogx-sidecar {__version__}"
    assert __version__ == "0.1.0"


def test_no_subcommand_exits_2(tmp_path: Path) -> None:
    result = cli(tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_subcommand_exits_2(tmp_path: Path) -> None:
    result = cli(tmp_path, "frobnicate")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


async def test_a_second_sidecar_on_the_same_spool_does_not_start(
    start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """Both would hand out the same ids for different events."""
    running = await start_sidecar()
    config = tmp_path / "second.toml"
    config.write_text(
        f'[server]\nport = 0\n[spool]\npath = "{running.config.spool.path}"\n'
    )
    result = await asyncio.to_thread(cli, tmp_path, "run", "--config", str(config))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another sidecar is running on this spool" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "config_text", "expected"), [
    (["dead-letters", "show", "9" * 23], "", "is not an event id (1 to 2^63-1)"),
    (["dead-letters", "replay", "--id", "0"], "", "is not an event id"),
    (["dead-letters", "list", "--since", "9" * 400 + "d"], "", "is too long ago"),
    (["dead-letters", "list", "--reason", "bogus"], "", "invalid choice: 'bogus'"),
    (["spool", "stats"], '[spool]\npath = "."\n', "spool.path: cannot open"),
    (["healthcheck"], '[server]\nhost = "exa mple"\n', "can't contain control characters"),
    (["healthcheck"], '[server]\nhost = "[::1]"\n', "does not appear to be an IPv4 or IPv6"),
])
def test_odd_cli_arguments_get_one_line_not_a_traceback(
    tmp_path: Path, args: list[str], config_text: str, expected: str
) -> None:
    """Found by a bad-input hunt: each of these was a Python traceback, or (--reason)
    silently matched nothing."""
    config_file = tmp_path / "c.toml"
    config_file.write_text(config_text)
    result = cli(tmp_path, *args, "--config", str(config_file))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]


def test_redact_refuses_an_event_nested_too_deeply_to_store(tmp_path: Path) -> None:
    event = b'{"agentId": "a", "prompt": "p", "response": "r", "metadata": {"x": '
    event += b"[" * 300 + b"]" * 300 + b"}}"
    (tmp_path / "deep.json").write_bytes(event)
    result = cli(tmp_path, "redact", "deep.json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "deep.json: the event cannot be stored" in result.stderr


@pytest.mark.parametrize("host", ["[::1]", "256.0.0.1"])
def test_a_host_no_socket_can_take_is_named_as_server_host(tmp_path: Path, host: str) -> None:
    """It was reported as a server.port problem."""
    config_file = tmp_path / "c.toml"
    config_file.write_text(
        f'[server]\nhost = "{host}"\nport = 0\ningest_token = "token-0123456789"\n'
        f'[spool]\npath = "{tmp_path / "s.db"}"\n'
    )
    result = cli(tmp_path, "run", "--config", str(config_file))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"server.host: '{host}' is no address or name this host can listen on" in last


def test_a_short_hmac_key_is_refused_in_a_readable_line(tmp_path: Path) -> None:
    """The key was registered as a secret before it was refused, and masked wherever it
    occurred: the key "short" made "...is shorter" read "...is ********er"."""
    config = tmp_path / "c.toml"
    config.write_text('[[redaction.rules]]\nname = "u"\npath = "userId"\naction = "hash"\n')
    result = cli(tmp_path, "check-config", "--config", str(config),
                 PRECOGX_SIDECAR_REDACTION_HMAC_KEY="short")
    assert_config_error(result, "at least 16 bytes", "is shorter")
    assert "****" not in result.stderr


def test_a_reader_gone_early_gets_no_traceback(tmp_path: Path) -> None:
    """`dead-letters list | head` ended in a BrokenPipeError traceback (twice over)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        done = subprocess.run(
            sidecar_command("check-config"), stdout=write_end, stderr=subprocess.PIPE,
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr


def test_a_start_up_error_is_a_json_line_when_logs_are(tmp_path: Path) -> None:
    """The Docker image logs JSON: its one start-up error was the only plain line."""
    config_file = tmp_path / "c.toml"
    config_file.write_text(
        '[server]\nhost = "256.0.0.1"\nport = 0\ningest_token = "token-0123456789"\n'
        f'[spool]\npath = "{tmp_path / "s.db"}"\n[log]\nformat = "json"\n'
    )
    result = cli(tmp_path, "run", "--config", str(config_file))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["level"] == "critical" and line["msg"].startswith("cannot start: server.host")


@pytest.mark.parametrize("set_in", ["env", "file"])
def test_a_config_error_is_a_json_line_when_logs_are(tmp_path: Path, set_in: str) -> None:
    """The Docker image's commonest start-up error (JSON logs, no ingest token on 0.0.0.0)
    was a plain line; so was any config error with JSON logs asked for in the environment."""
    config_file = tmp_path / "c.toml"
    config_file.write_text(
        '[server]\nhost = "0.0.0.0"\n' + ('[log]\nformat = "json"\n' if set_in == "file" else "")
    )
    env = {"PRECOGX_SIDECAR_LOG_FORMAT": "json"} if set_in == "env" else {}
    result = cli(tmp_path, "run", "--config", str(config_file), **env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["level"] == "critical"
    assert line["msg"].startswith("config error: server.ingest_token: required")
    # A file that cannot be read at all: the environment still says JSON.
    result = cli(tmp_path, "run", "--config", str(tmp_path / "missing.toml"),
                 PRECOGX_SIDECAR_LOG_FORMAT="JSON")
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["msg"].endswith("missing.toml: config file not found")
    # A file that asks for JSON and does not load: as far as it can be read, it is.
    config_file.write_text('[log]\nformat = "json"\n[server]\nmax_body_bytes = "big"\n')
    result = cli(tmp_path, "run", "--config", str(config_file))
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["msg"].startswith("config error: server.max_body_bytes")


def test_a_config_error_never_prints_the_api_key_from_the_environment(tmp_path: Path) -> None:
    """Set in the URL's variable by mistake, the key was printed in the error refusing it."""
    key = "px_live_WrongVariable0123456789"
    result = cli(tmp_path, "check-config", PRECOGX_API_KEY=key,
                 PRECOGX_SIDECAR_UPSTREAM_URL=f"https://h.io/api/v1/{key}/telemetry/batch")
    assert_config_error(result, "upstream.url")
    assert key not in result.stderr
