"""config.load, render, check_listen_auth and read_api_key, with explicit env= and tmp files."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sidecar import config
from sidecar.config import MIB, Config, ConfigError
from tests.conftest import write_config

TOKEN = "tok_SECRETSECRET_987654"


def load_file(tmp_path: Path, sections: dict[str, dict[str, Any]], **env: str) -> Config:
    return config.load(str(write_config(tmp_path, sections)), env=env)


def non_secret_values(cfg: Config) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, section in cfg.sections().items():
        out[name] = {
            f.name: getattr(section, f.name)
            for f in dataclasses.fields(section)
            if not f.metadata["secret"]
        }
    return out


# -- defaults -------------------------------------------------------------------------


def test_defaults_without_file_or_env() -> None:
    cfg = config.load(None, env={})
    assert cfg.source == "defaults"
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.port == 8787
    assert cfg.server.ingest_token == ""
    assert cfg.server.allow_unauthenticated is False
    assert cfg.server.max_body_bytes == MIB
    assert cfg.spool.path == "./precogx-spool.db"
    assert cfg.spool.when_full == "reject"
    assert cfg.spool.synchronous == "FULL"
    assert cfg.upstream.url == "https://api.precogx.ai/api/v1"
    assert cfg.upstream.api_key_file == ""
    assert cfg.upstream.mode == "batch"
    assert cfg.upstream.batch_max_events == 100
    assert cfg.upstream.batch_max_bytes == 1024 * 1024
    assert cfg.upstream.linger_ms == 500
    assert cfg.upstream.concurrency == 2
    assert cfg.retry.initial_backoff_s == 1.0
    assert cfg.retry.max_backoff_s == 300.0
    assert cfg.log.level == "info"
    assert cfg.log.format == "text"


def test_load_does_not_read_process_environment_when_env_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PRECOGX_SIDECAR_SERVER_PORT", "1234")
    assert config.load(None, env={}).server.port == 8787
    assert config.load(None).server.port == 1234


# -- layering -------------------------------------------------------------------------


def test_file_values_override_defaults(tmp_path: Path) -> None:
    cfg = load_file(
        tmp_path,
        {
            "server": {"host": "::1", "port": 9000, "allow_unauthenticated": True},
            "spool": {"path": "/var/lib/x.db", "when_full": "drop_oldest"},
            "upstream": {"url": "http://localhost:1/api", "mode": "single", "linger_ms": 0},
            "retry": {"initial_backoff_s": 2, "max_backoff_s": 10.5},
        },
    )
    assert cfg.source == str(tmp_path / "sidecar.toml")
    assert cfg.server.host == "::1"
    assert cfg.server.port == 9000
    assert cfg.server.allow_unauthenticated is True
    assert cfg.spool.path == "/var/lib/x.db"
    assert cfg.spool.when_full == "drop_oldest"
    assert cfg.upstream.url == "http://localhost:1/api"
    assert cfg.upstream.mode == "single"
    assert cfg.upstream.linger_ms == 0
    # an int given for a float setting becomes a float
    assert cfg.retry.initial_backoff_s == 2.0
    assert isinstance(cfg.retry.initial_backoff_s, float)
    assert cfg.retry.max_backoff_s == 10.5
    # untouched settings keep their defaults
    assert cfg.upstream.concurrency == 2
    assert cfg.spool.synchronous == "FULL"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    cfg = config.load(str(path), env={})
    assert non_secret_values(cfg) == non_secret_values(config.load(None, env={}))


@pytest.mark.parametrize(
    ("var", "text", "section", "key", "expected"),
    [
        ("PRECOGX_SIDECAR_SERVER_PORT", "9100", "server", "port", 9100),
        ("PRECOGX_SIDECAR_SERVER_PORT", " 9101 ", "server", "port", 9101),
        ("PRECOGX_SIDECAR_SERVER_HOST", "0.0.0.0", "server", "host", "0.0.0.0"),
        ("PRECOGX_SIDECAR_RETRY_MAX_BACKOFF_S", "12.5", "retry", "max_backoff_s", 12.5),
        ("PRECOGX_SIDECAR_RETRY_MAX_BACKOFF_S", "60", "retry", "max_backoff_s", 60.0),
        ("PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED", "true", "server",
         "allow_unauthenticated", True),
        ("PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED", "TRUE", "server",
         "allow_unauthenticated", True),
        ("PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED", "1", "server",
         "allow_unauthenticated", True),
        ("PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED", "yes", "server",
         "allow_unauthenticated", True),
        ("PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED", "on", "server",
         "allow_unauthenticated", True),
        ("PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED", "0", "server",
         "allow_unauthenticated", False),
        ("PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED", "false", "server",
         "allow_unauthenticated", False),
        ("PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED", "off", "server",
         "allow_unauthenticated", False),
        ("PRECOGX_SIDECAR_SPOOL_WHEN_FULL", "drop_oldest", "spool", "when_full", "drop_oldest"),
        ("PRECOGX_SIDECAR_UPSTREAM_MODE", "single", "upstream", "mode", "single"),
        ("PRECOGX_SIDECAR_LOG_FORMAT", "json", "log", "format", "json"),
        ("PRECOGX_SIDECAR_SERVER_INGEST_TOKEN", TOKEN, "server", "ingest_token", TOKEN),
    ],
)
def test_env_overrides_file(
    tmp_path: Path, var: str, text: str, section: str, key: str, expected: Any
) -> None:
    # the file sets something different from both the default and the env value
    file_values: dict[str, dict[str, Any]] = {
        "server": {"port": 9000, "host": "127.0.0.2", "allow_unauthenticated": True,
                   "ingest_token": "from-file-token"},
        "retry": {"max_backoff_s": 99.0},
        "spool": {"when_full": "reject"},
        "upstream": {"mode": "batch"},
        "log": {"format": "text"},
    }
    if expected is True:
        file_values["server"]["allow_unauthenticated"] = False
    cfg = load_file(tmp_path, file_values, **{var: text})
    value = getattr(getattr(cfg, section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_config_file_named_by_env(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"server": {"port": 9200}})
    cfg = config.load(None, env={"PRECOGX_SIDECAR_CONFIG": str(path)})
    assert cfg.server.port == 9200
    assert cfg.source == str(path)


def test_explicit_path_wins_over_config_env(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"server": {"port": 9200}})
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 9300\n")
    cfg = config.load(str(path), env={"PRECOGX_SIDECAR_CONFIG": str(other)})
    assert cfg.server.port == 9200


def test_ingest_token_env_sets_server_ingest_token(tmp_path: Path) -> None:
    cfg = load_file(
        tmp_path,
        {"server": {"ingest_token": "from-file-token"}},
        PRECOGX_SIDECAR_INGEST_TOKEN=TOKEN,
    )
    assert cfg.server.ingest_token == TOKEN
    assert config.load(None, env={"PRECOGX_SIDECAR_INGEST_TOKEN": TOKEN}).server.ingest_token \
        == TOKEN


def test_empty_ingest_token_env_does_not_clear_file_token(tmp_path: Path) -> None:
    cfg = load_file(
        tmp_path, {"server": {"ingest_token": "from-file-token"}},
        PRECOGX_SIDECAR_INGEST_TOKEN="",
    )
    assert cfg.server.ingest_token == "from-file-token"


def test_unrelated_env_vars_are_ignored() -> None:
    cfg = config.load(None, env={"PRECOGX_API_KEY": "k", "HOME": "/root", "PORT": "1"})
    assert cfg.server.port == 8787


def test_kubernetes_service_links_are_not_unknown_settings() -> None:
    """A Service named precogx-sidecar puts these in every pod of its namespace: they
    stopped the sidecar's start as unknown variables."""
    links = {
        "PRECOGX_SIDECAR_SERVICE_HOST": "10.0.0.11", "PRECOGX_SIDECAR_SERVICE_PORT": "8787",
        "PRECOGX_SIDECAR_SERVICE_PORT_HTTP": "8787",
        "PRECOGX_SIDECAR_PORT": "tcp://10.0.0.11:8787",
        "PRECOGX_SIDECAR_PORT_8787_TCP": "tcp://10.0.0.11:8787",
        "PRECOGX_SIDECAR_PORT_8787_TCP_PROTO": "tcp",
        "PRECOGX_SIDECAR_PORT_8787_TCP_PORT": "8787",
        "PRECOGX_SIDECAR_PORT_8787_TCP_ADDR": "10.0.0.11",
    }
    assert config.load(None, env=links).server.port == 8787
    # Without a link's value, the bare one is a typo.
    with pytest.raises(ConfigError, match="did you mean PRECOGX_SIDECAR_SERVER_PORT"):
        config.load(None, env={"PRECOGX_SIDECAR_PORT": "9000"})


# -- errors ---------------------------------------------------------------------------

FILE_ERRORS = [
    pytest.param("[bogus]\nx = 1\n", ["bogus", "unknown section", "known", "server"],
                 id="unknown-section"),
    pytest.param("[server]\nprot = 1\n", ["server.prot", "unknown key", "known", "port"],
                 id="unknown-key"),
    pytest.param("server = 1\n", ["server", "table"], id="section-not-a-table"),
    pytest.param('[server]\nport = "x"\n', ["server.port", "expected int", "'x'"],
                 id="port-string"),
    pytest.param("[server]\nport = true\n", ["server.port", "expected int"], id="bool-for-int"),
    pytest.param("[server]\nport = 80.5\n", ["server.port", "expected int"],
                 id="float-for-int"),
    pytest.param("[server]\nallow_unauthenticated = 1\n",
                 ["server.allow_unauthenticated", "expected bool"], id="int-for-bool"),
    pytest.param('[server]\nallow_unauthenticated = "true"\n',
                 ["server.allow_unauthenticated", "expected bool"], id="str-for-bool"),
    pytest.param("[server]\nhost = 127\n", ["server.host", "expected str"], id="int-for-str"),
    pytest.param('[retry]\nmax_backoff_s = "10"\n', ["retry.max_backoff_s", "expected float"],
                 id="str-for-float"),
    pytest.param("[retry]\nmax_backoff_s = false\n", ["retry.max_backoff_s", "expected float"],
                 id="bool-for-float"),
    pytest.param("[server]\nport = -1\n", ["server.port", ">= 0", "-1"], id="port-negative"),
    pytest.param("[spool]\nmax_events = 0\n", ["spool.max_events", ">= 1"],
                 id="max-events-zero"),
    pytest.param("[upstream]\nconcurrency = 0\n", ["upstream.concurrency", ">= 1"],
                 id="concurrency-zero"),
    pytest.param("[server]\nmax_body_bytes = 10\n", ["server.max_body_bytes", ">= 1024"],
                 id="body-too-small"),
    pytest.param("[retry]\ninitial_backoff_s = 0\n", ["retry.initial_backoff_s", "> 0"],
                 id="backoff-zero"),
    pytest.param("[server]\nidempotency_ttl_s = nan\n",
                 ["server.idempotency_ttl_s", "finite"], id="nan-float"),
    pytest.param("[retry]\nmax_backoff_s = inf\n", ["retry.max_backoff_s", "finite"],
                 id="inf-float"),
    pytest.param('[spool]\nwhen_full = "drop_newest"\n',
                 ["spool.when_full", "'reject'", "'drop_oldest'", "'drop_newest'"],
                 id="choice-when-full"),
    pytest.param('[spool]\nsynchronous = "OFF"\n', ["spool.synchronous", "'FULL'", "'OFF'"],
                 id="choice-synchronous"),
    pytest.param('[upstream]\nmode = "stream"\n', ["upstream.mode", "'stream'"],
                 id="choice-mode"),
    pytest.param('[log]\nlevel = "trace"\n', ["log.level", "'trace'"], id="choice-log-level"),
    pytest.param("[retry]\ninitial_backoff_s = 10\nmax_backoff_s = 5\n",
                 ["retry.max_backoff_s", "retry.initial_backoff_s"], id="max-below-initial"),
    pytest.param('[upstream]\nurl = "ftp://example.com"\n', ["upstream.url", "http"],
                 id="url-ftp"),
    pytest.param('[upstream]\nurl = "api.precogx.ai"\n', ["upstream.url", "http"],
                 id="url-no-scheme"),
    pytest.param('[spool]\npath = "  "\n', ["spool.path", "empty"], id="spool-path-empty"),
    pytest.param("[upstream]\nbatch_max_events = 99999999999999999999999\n",
                 ["upstream.batch_max_events", "<= 9007199254740991"], id="int-past-ceiling"),
    pytest.param("[retry]\nmax_age_s = 1e300\n", ["retry.max_age_s", "<= 1000000000.0"],
                 id="float-past-ceiling"),
    pytest.param('[server]\ningest_token = "token-with-a-space "\n',
                 ["server.ingest_token", "whitespace", "could ever send it"], id="token-padded"),
    pytest.param('[dify]\nextension_token = "token\\twith-a-tab"\n',
                 ["dify.extension_token", "control character"], id="token-control"),
    pytest.param("[spool]\nmax_bytes = 1048576\n[upstream]\nbatch_max_bytes = 2097152\n",
                 ["upstream.batch_max_bytes", "spool.max_bytes"], id="batch-bigger-than-spool"),
]


@pytest.mark.parametrize(("toml", "expected"), FILE_ERRORS)
def test_file_errors(tmp_path: Path, toml: str, expected: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), env={})
    message = str(info.value)
    for part in expected:
        assert part in message
    assert "\n" not in message


def test_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = -1\n")
    with pytest.raises(ConfigError, match=r"in .*bad\.toml"):
        config.load(str(path), env={})


@pytest.mark.parametrize("port", [65536, 70000])
def test_port_above_65535_rejected(tmp_path: Path, port: int) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[server]\nport = {port}\n")
    with pytest.raises(ConfigError, match=r"server\.port"):
        config.load(str(path), env={})


ENV_ERRORS = [
    pytest.param("PRECOGX_SIDECAR_SERVER_PORT", "x",
                 ["server.port", "expected int", "'x'", "PRECOGX_SIDECAR_SERVER_PORT"],
                 id="port-not-int"),
    pytest.param("PRECOGX_SIDECAR_SERVER_PORT", "80.5",
                 ["server.port", "expected int", "PRECOGX_SIDECAR_SERVER_PORT"],
                 id="port-float"),
    pytest.param("PRECOGX_SIDECAR_SERVER_PORT", "", ["server.port", "expected int"],
                 id="port-empty"),
    pytest.param("PRECOGX_SIDECAR_SERVER_PORT", "-1",
                 ["server.port", ">= 0", "PRECOGX_SIDECAR_SERVER_PORT"], id="port-negative"),
    pytest.param("PRECOGX_SIDECAR_SPOOL_MAX_EVENTS", "0", ["spool.max_events", ">= 1"],
                 id="max-events-zero"),
    pytest.param("PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED", "maybe",
                 ["server.allow_unauthenticated", "expected bool", "'maybe'",
                  "PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED"], id="bool-garbage"),
    pytest.param("PRECOGX_SIDECAR_RETRY_MAX_BACKOFF_S", "soon",
                 ["retry.max_backoff_s", "expected float", "PRECOGX_SIDECAR_RETRY_MAX_BACKOFF_S"],
                 id="float-garbage"),
    pytest.param("PRECOGX_SIDECAR_RETRY_MAX_BACKOFF_S", "nan",
                 ["retry.max_backoff_s", "finite", "PRECOGX_SIDECAR_RETRY_MAX_BACKOFF_S"],
                 id="float-nan"),
    pytest.param("PRECOGX_SIDECAR_RETRY_MAX_BACKOFF_S", "inf",
                 ["retry.max_backoff_s", "finite"], id="float-inf"),
    pytest.param("PRECOGX_SIDECAR_SERVER_IDEMPOTENCY_TTL_S", "-inf",
                 ["server.idempotency_ttl_s", "finite"], id="float-minus-inf"),
    pytest.param("PRECOGX_SIDECAR_SPOOL_WHEN_FULL", "drop_newest",
                 ["spool.when_full", "'drop_newest'", "PRECOGX_SIDECAR_SPOOL_WHEN_FULL"],
                 id="choice"),
    pytest.param("PRECOGX_SIDECAR_UPSTREAM_URL", "localhost:8080", ["upstream.url", "http"],
                 id="url"),
    pytest.param("PRECOGX_SIDECAR_REDACTION_RULES", "[" * 100_000,
                 ["redaction.rules", "nested too deeply"], id="rules-nested-too-deeply"),
    pytest.param("PRECOGX_SIDECAR_INGEST_TOKEN", "abcdefgh12 ",
                 ["server.ingest_token", "whitespace"], id="token-trailing-space"),
    pytest.param("PRECOGX_SIDECAR_RETRY_INITIAL_BACKOFF_S", "400",
                 ["retry.max_backoff_s", "retry.initial_backoff_s"], id="initial-above-max"),
]


@pytest.mark.parametrize(("var", "text", "expected"), ENV_ERRORS)
def test_env_errors(var: str, text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, env={var: text})
    message = str(info.value)
    for part in expected:
        assert part in message
    assert "\n" not in message


def test_env_error_wins_over_valid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PRECOGX_SIDECAR_SERVER_PORT"):
        load_file(tmp_path, {"server": {"port": 9000}}, PRECOGX_SIDECAR_SERVER_PORT="x")


def test_env_can_repair_cross_field_error_in_file(tmp_path: Path) -> None:
    # the cross-field check sees the final values, not the file's alone
    cfg = load_file(
        tmp_path, {"retry": {"initial_backoff_s": 10.0, "max_backoff_s": 5.0}},
        PRECOGX_SIDECAR_RETRY_MAX_BACKOFF_S="20",
    )
    assert cfg.retry.max_backoff_s == 20.0


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(str(path), env={})
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_missing_file_named_by_env(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found"):
        config.load(None, env={"PRECOGX_SIDECAR_CONFIG": str(path)})


def test_directory_as_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path), env={})
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["[server\nport = 1\n", "[server]\nport = \n", "[server]\nport = 1\nport = 2\n",
     "not toml at all"],
)
def test_invalid_toml_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), env={})
    message = str(info.value)
    assert str(path) in message
    assert "not valid TOML" in message
    assert "\n" not in message


# -- secrets --------------------------------------------------------------------------


def test_wrong_typed_secret_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\ningest_token = 987654321987\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path), env={})
    message = str(info.value)
    assert "server.ingest_token" in message
    assert "expected str" in message
    assert "987654321987" not in message


def test_wrong_typed_non_secret_is_echoed(tmp_path: Path) -> None:
    # the counterpart: the value is hidden because it is secret, not always
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nhost = 987654321987\n")
    with pytest.raises(ConfigError, match="987654321987"):
        config.load(str(path), env={})


def test_render_masks_ingest_token(tmp_path: Path) -> None:
    cfg = load_file(tmp_path, {"server": {"ingest_token": TOKEN}})
    text = config.render(cfg, "set (from env PRECOGX_API_KEY)")
    assert TOKEN not in text
    parsed = tomllib.loads(text)
    assert parsed["server"]["ingest_token"] == "********"
    assert "# upstream API key: set (from env PRECOGX_API_KEY)" in text
    assert str(tmp_path / "sidecar.toml") in text


def test_render_empty_token_stays_empty() -> None:
    parsed = tomllib.loads(config.render(config.load(None, env={}), "NOT SET"))
    assert parsed["server"]["ingest_token"] == ""


def test_render_lists_every_setting() -> None:
    cfg = config.load(None, env={})
    text = config.render(cfg, "NOT SET", ["r1: detector email anywhere -> mask"])
    parsed = tomllib.loads(text)
    assert set(parsed) == set(cfg.sections())
    for name, section in cfg.sections().items():
        fields = dataclasses.fields(section)
        # Env-only secrets and rule lists are shown as comments, so the output still loads.
        commented = {f.name for f in fields if f.metadata["env_only"] or f.name == "rules"}
        assert set(parsed[name]) == {f.name for f in fields} - commented
        for key in commented:
            assert f"# {key}: " in text
    assert "#   r1: detector email anywhere -> mask" in text


@pytest.mark.parametrize(
    "sections",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {
                "server": {"host": "0.0.0.0", "port": 0, "ingest_token": TOKEN,
                           "allow_unauthenticated": True, "shutdown_grace_s": 0.25},
                "spool": {"path": 'C:\\spool dir\\"odd" name.db', "when_full": "drop_oldest",
                          "synchronous": "NORMAL", "max_events": 5},
                "upstream": {"url": "http://127.0.0.1:9/x", "api_key_file": "/run/key",
                             "mode": "single", "requests_per_minute": 1.5, "burst": 3},
                "retry": {"initial_backoff_s": 0.001, "max_backoff_s": 1e9},
                "log": {"level": "debug", "format": "json"},
            },
            id="everything-changed",
        ),
    ],
)
def test_render_round_trip(tmp_path: Path, sections: dict[str, dict[str, Any]]) -> None:
    cfg = load_file(tmp_path, sections)
    text = config.render(cfg, "NOT SET")
    assert TOKEN not in text
    rendered = tmp_path / "rendered.toml"
    rendered.write_text(text)
    again = config.load(str(rendered), env={})
    assert non_secret_values(again) == non_secret_values(cfg)


def test_render_round_trip_with_control_characters() -> None:
    cfg = config.load(None, env={"PRECOGX_SIDECAR_SPOOL_PATH": "/tmp/a\nb\x01.db"})
    parsed = tomllib.loads(config.render(cfg, "NOT SET"))
    assert parsed["spool"]["path"] == "/tmp/a\nb\x01.db"


# -- check_listen_auth ----------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_without_token_is_fine(host: str) -> None:
    cfg = config.load(None, env={"PRECOGX_SIDECAR_SERVER_HOST": host})
    assert config.is_loopback(host)
    assert config.check_listen_auth(cfg) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com", ""])
def test_open_host_without_token_is_refused(host: str) -> None:
    cfg = config.load(None, env={"PRECOGX_SIDECAR_SERVER_HOST": host})
    assert not config.is_loopback(host)
    with pytest.raises(ConfigError) as info:
        config.check_listen_auth(cfg)
    assert str(info.value).startswith("server.ingest_token:")
    assert "PRECOGX_SIDECAR_INGEST_TOKEN" in str(info.value)


def test_open_host_allowed_unauthenticated_gives_warning() -> None:
    cfg = config.load(
        None,
        env={"PRECOGX_SIDECAR_SERVER_HOST": "0.0.0.0",
             "PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED": "true"},
    )
    warning = config.check_listen_auth(cfg)
    assert isinstance(warning, str)
    assert "0.0.0.0" in warning
    assert "allow_unauthenticated" in warning


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_token_means_no_warning(host: str) -> None:
    cfg = config.load(
        None,
        env={"PRECOGX_SIDECAR_SERVER_HOST": host, "PRECOGX_SIDECAR_INGEST_TOKEN": TOKEN,
             "PRECOGX_SIDECAR_SERVER_ALLOW_UNAUTHENTICATED": "true"},
    )
    assert config.check_listen_auth(cfg) is None


def test_refusal_names_the_host() -> None:
    cfg = config.load(None, env={"PRECOGX_SIDECAR_SERVER_HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match=r"'0\.0\.0\.0'"):
        config.check_listen_auth(cfg)


# -- read_api_key ---------------------------------------------------------------------


def key_file_config(path: Path) -> Config:
    return config.load(None, env={"PRECOGX_SIDECAR_UPSTREAM_API_KEY_FILE": str(path)})


def test_api_key_from_file_is_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  px_live_FILEKEY123 \n\n")
    cfg = key_file_config(key_file)
    assert config.read_api_key(cfg, env={}) == "px_live_FILEKEY123"


def test_api_key_file_wins_over_env(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("px_live_FILEKEY123\n")
    cfg = key_file_config(key_file)
    assert config.read_api_key(cfg, env={"PRECOGX_API_KEY": "px_env"}) == "px_live_FILEKEY123"


def test_api_key_file_is_read_again(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("first\n")
    cfg = key_file_config(key_file)
    assert config.read_api_key(cfg, env={}) == "first"
    key_file.write_text("second\n")
    assert config.read_api_key(cfg, env={}) == "second"


@pytest.mark.parametrize("content", ["", "\n", "   \n\t\n"])
def test_empty_api_key_file_is_an_error(tmp_path: Path, content: str) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(content)
    with pytest.raises(ConfigError) as info:
        config.read_api_key(key_file_config(key_file), env={"PRECOGX_API_KEY": "px_env"})
    assert "upstream.api_key_file" in str(info.value)
    assert "empty" in str(info.value)


@pytest.mark.parametrize("key", ["px_live_a\npx_live_b", "px_live_a px_live_b",
                                 "px_live_a\x00", "px_live_é"])
def test_an_api_key_no_header_can_carry_is_an_error(tmp_path: Path, key: str) -> None:
    """Two keys in one file made every send fail inside the forwarder, for ever."""
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    ways: list[tuple[Config, dict[str, str]]] = [
        (key_file_config(key_file), {}),
        (config.load(None, env={}), {"PRECOGX_API_KEY": key}),
    ]
    for cfg, env in ways:
        with pytest.raises(ConfigError, match="one key, on one line") as info:
            config.read_api_key(cfg, env=env)
        assert key not in str(info.value) and "px_live_a" not in str(info.value)


def test_missing_api_key_file_is_an_error(tmp_path: Path) -> None:
    key_file = tmp_path / "missing-key"
    with pytest.raises(ConfigError) as info:
        config.read_api_key(key_file_config(key_file), env={"PRECOGX_API_KEY": "px_env"})
    assert "upstream.api_key_file" in str(info.value)
    assert str(key_file) in str(info.value)


def test_non_utf8_api_key_file_is_a_config_error(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"\xff\xfepx_live\n")
    with pytest.raises(ConfigError, match=r"upstream\.api_key_file"):
        config.read_api_key(key_file_config(key_file), env={})


def test_api_key_from_env_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRECOGX_API_KEY", "px_process_env")
    cfg = config.load(None, env={})
    assert config.read_api_key(cfg, env={"PRECOGX_API_KEY": " px_live_ENV \n"}) == "px_live_ENV"
    assert config.read_api_key(cfg, env={}) == ""
    assert config.read_api_key(cfg) == "px_process_env"


def test_no_api_key_is_empty_string() -> None:
    cfg = config.load(None, env={})
    assert config.read_api_key(cfg, env={}) == ""
    assert config.read_api_key(cfg, env={"PRECOGX_API_KEY": "  "}) == ""


def test_misspelt_env_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="PRECOGX_SIDECAR_SERVER_PROT: unknown environment"):
        config.load(None, env={"PRECOGX_SIDECAR_SERVER_PROT": "9000"})


def test_choices_ignore_case() -> None:
    cfg = config.load(None, env={"PRECOGX_SIDECAR_SPOOL_SYNCHRONOUS": "normal",
                          "PRECOGX_SIDECAR_LOG_LEVEL": "INFO"})
    assert (cfg.spool.synchronous, cfg.log.level) == ("NORMAL", "info")


@pytest.mark.parametrize(("content", "problem"), [
    (b"[server]\nport = 1\xff\n", "not UTF-8 text (byte 17)"),
    (b"[server]\nport = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
])
def test_a_config_file_python_cannot_read_is_one_line(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), env={})
    assert str(info.value) == f"{path}: not valid TOML: {problem}"


@pytest.mark.parametrize("url", ["https://", "ftp://example.com", "api.precogx.ai"])
def test_upstream_url_needs_scheme_and_host(url: str) -> None:
    with pytest.raises(ConfigError, match=r"upstream\.url"):
        config.load(None, env={"PRECOGX_SIDECAR_UPSTREAM_URL": url})


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:99999/api/v1", "the port must be a number up to 65535"),
    ("http://h:abc/api/v1", "the port must be a number up to 65535"),
    ("http://[::1/api/v1", "Invalid IPv6 URL"),
    ("http://me:px_live_k@[::1/api/v1", "Invalid IPv6 URL"),
])
def test_upstream_url_with_a_bad_port_or_host_stops_start_up(url: str, problem: str) -> None:
    """Accepted before, and then retried for ever as a connection failure (or a traceback)."""
    with pytest.raises(ConfigError) as info:
        config.load(None, env={"PRECOGX_SIDECAR_UPSTREAM_URL": url})
    assert str(info.value).startswith("upstream.url: ") and problem in str(info.value)
    assert "px_live_k" not in str(info.value)


@pytest.mark.parametrize(("url", "problem"), [
    # The endpoint path is appended: each of these sent requests to a wrong path (a
    # query or fragment swallowed it, a space became %20, the path came twice), where
    # every answer was a 404.
    ("https://h.io/api/v1?tenant=x", "without spaces, ?query or #fragment"),
    ("https://h.io/api/v1#frag", "without spaces, ?query or #fragment"),
    ("https://h.io/api/v1 ", "without spaces, ?query or #fragment"),
    ("https://h.io/api/v1/telemetry/batch", "not an endpoint"),
    ("https://h.io/api/v1/integrations/dify/telemetry/", "not an endpoint"),
    # The sidecar's own address: events went round in a loop, counted as delivered.
    ("http://127.0.0.1:8787/api/v1", "points at this sidecar itself"),
    ("http://localhost:8787/api/v1", "points at this sidecar itself"),
])
def test_an_upstream_url_that_cannot_be_the_api_base_stops_start_up(
    url: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, env={"PRECOGX_SIDECAR_UPSTREAM_URL": url})
    assert str(info.value).startswith("upstream.url: ") and problem in str(info.value)


@pytest.mark.parametrize(("url", "got"), [
    ("https://h.io/api/v1?api_key=px_live_k", "got 'https://h.io/api/v1' (?query not shown)"),
    ("https://h.io/api/v1#px_live_k", "got 'https://h.io/api/v1' (#fragment not shown)"),
    ("https://h.io:px_live_k/api/v1", "got 'https://h.io/api/v1' (port not shown)"),
    ("https://[::1]:px_live_k/api/v1", "got 'https://[::1]/api/v1' (port not shown)"),
    # The key set in the URL's variable by mistake.
    ("ftp://h.io/api/v1?k=px_live_k", "got scheme 'ftp' (the value is not shown"),
    ("px_live_k0123456789abcdef", "got no scheme and no host (the value is not shown"),
    ("https//h.io/px_live_k", "got no scheme and no host (the value is not shown"),
])
def test_a_refused_upstream_url_never_shows_a_key_pasted_into_it(url: str, got: str) -> None:
    """Printed by check-config and at start-up before a key from a file is known as a
    secret: a key pasted into the URL was printed with it."""
    with pytest.raises(ConfigError) as info:
        config.load(None, env={"PRECOGX_SIDECAR_UPSTREAM_URL": url})
    assert got in str(info.value) and "px_live_k" not in str(info.value)


@pytest.mark.parametrize("url", [
    "https://api.precogx.ai/api/v1", "https://api.precogx.ai/api/v1/", "http://proxy:8080",
    "http://127.0.0.1:8788/api/v1", "https://h.io/telemetry-gateway/api/v1",
])
def test_upstream_base_urls_are_accepted(url: str) -> None:
    assert config.load(None, env={"PRECOGX_SIDECAR_UPSTREAM_URL": url}).upstream.url == url


@pytest.mark.parametrize(("variable", "key"), [
    ("PRECOGX_SIDECAR_INGEST_TOKEN", "server.ingest_token"),
    ("PRECOGX_SIDECAR_DIFY_EXTENSION_TOKEN", "dify.extension_token"),
])
def test_a_short_token_is_refused_without_showing_it(variable: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, env={variable: "s3cr3t7"})
    assert str(info.value).startswith(f"{key}: must be at least 8 characters")
    assert "s3cr3t7" not in str(info.value)
    assert config.load(None, env={variable: "s3cr3t78"})  # eight will do


@pytest.mark.parametrize("url", ["https://me:px_live_k@h.io/api/v1", "ftp://px_live_k@h.io"])
def test_credentials_in_the_upstream_url_are_refused_without_showing_them(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, env={"PRECOGX_SIDECAR_UPSTREAM_URL": url})
    assert str(info.value).startswith("upstream.url: must not hold credentials")
    assert "px_live_k" not in str(info.value)
