"""Every setting the sidecar has, with its default, in one place.

Settings come from three layers, later ones winning: the defaults below, a TOML
file (``--config`` or ``PRECOGX_SIDECAR_CONFIG``) and environment variables named
``PRECOGX_SIDECAR_<SECTION>_<KEY>``. A bad value stops start-up with one line
that names the key, the problem and where the value came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "PRECOGX_SIDECAR_"
ENV_CONFIG_FILE = "PRECOGX_SIDECAR_CONFIG"
ENV_API_KEY = "PRECOGX_API_KEY"
ENV_INGEST_TOKEN = "PRECOGX_SIDECAR_INGEST_TOKEN"
MIB = 1024 * 1024


class ConfigError(Exception):
    """A setting that cannot be used; ``str()`` is the one line shown to the operator."""


# Ceilings for settings without one of their own: a count or size past 2**53 - 1 no
# longer fits SQLite's integers once added to, and seconds past 1e9 (some 30 years)
# overflow the event loop's timers. Either stopped delivery long after start-up.
MAX_INT = 2**53 - 1
MAX_FLOAT = 1e9

# Shorter tokens are guessable, and a secret too short to scrub from logs safely (it
# would mask ordinary words) must not exist.
MIN_TOKEN_CHARS = 8


def _opt(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    env_only: bool = False,
    doc: str = "",
) -> Any:
    metadata = {
        "ge": ge, "gt": gt, "le": le, "choices": choices, "secret": secret,
        "env_only": env_only, "doc": doc,
    }
    if isinstance(default, list):  # a fresh list per instance, never a shared one
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


DEFAULT_UPSTREAM_URL = "https://api.precogx.ai/api/v1"

@dataclass
class ServerConfig:
    host: str = _opt("127.0.0.1", doc="address to listen on")
    port: int = _opt(8787, ge=0, le=65535, doc="TCP port (0 picks a free one)")
    ingest_token: str = _opt("", secret=True, doc="token clients must send")
    allow_unauthenticated: bool = _opt(False, doc="allow no token on a non-loopback host")
    max_body_bytes: int = _opt(MIB, ge=1024, doc="largest request body accepted")
    body_timeout_s: float = _opt(60.0, gt=0, doc="longest wait for the rest of a body")
    idempotency_ttl_s: float = _opt(86400.0, gt=0, doc="how long Idempotency-Keys are kept")
    shutdown_grace_s: float = _opt(10.0, ge=0, doc="time in-flight upstream requests get")


@dataclass
class SpoolConfig:
    path: str = _opt("./precogx-spool.db", doc="SQLite file holding undelivered events")
    max_events: int = _opt(1_000_000, ge=1, doc="events (pending + dead) the spool may hold")
    max_bytes: int = _opt(1024 * MIB, ge=MIB, doc="payload bytes the spool may hold")
    max_dead_events: int = _opt(100_000, ge=0, doc="dead letters kept (oldest pruned)")
    when_full: str = _opt("reject", choices=("reject", "drop_oldest"), doc="full spool policy")
    synchronous: str = _opt("FULL", choices=("FULL", "NORMAL"), doc="SQLite durability level")
    commit_max_events: int = _opt(5000, ge=1, doc="most events in one group commit")
    checkpoint_interval_s: float = _opt(
        1.0, gt=0, doc="how often the WAL is checkpointed and freed room given back"
    )
    min_free_bytes: int = _opt(
        64 * MIB, ge=0, doc="free disk kept for deliveries and checkpoints (0 = no check)"
    )


@dataclass
class UpstreamConfig:
    url: str = _opt(DEFAULT_UPSTREAM_URL, doc="PrecogX API base URL")
    api_key_file: str = _opt("", doc="file holding the API key (else env PRECOGX_API_KEY)")
    mode: str = _opt("batch", choices=("batch", "single"), doc="one request per batch or event")
    batch_max_events: int = _opt(100, ge=1, doc="events per batch")
    batch_max_bytes: int = _opt(MIB, ge=1024, doc="payload bytes per batch")
    linger_ms: int = _opt(500, ge=0, doc="how long a part-filled batch waits")
    concurrency: int = _opt(2, ge=1, doc="upstream requests in flight")
    timeout_s: float = _opt(30.0, gt=0, doc="one upstream request's time limit")
    requests_per_minute: float = _opt(0.0, ge=0, doc="request rate limit (0 = none)")
    burst: int = _opt(0, ge=0, doc="requests allowed at once (0 = requests_per_minute)")


@dataclass
class RetryConfig:
    initial_backoff_s: float = _opt(1.0, gt=0, doc="first retry delay (full jitter)")
    max_backoff_s: float = _opt(300.0, gt=0, doc="longest retry delay")
    max_age_s: float = _opt(7 * 86400.0, gt=0, doc="dead-letter events older than this")


@dataclass
class DifyConfig:
    extension_token: str = _opt("", secret=True, doc="API-based Extension key (empty: off)")
    pair_idle_s: float = _opt(60.0, gt=0, doc="output idle time before a pair is recorded")
    input_wait_s: float = _opt(120.0, gt=0, doc="how long an input waits for its output")
    max_open: int = _opt(10_000, ge=1, doc="unfinished conversations held in memory")


@dataclass
class RedactionConfig:
    mask_secrets: bool = _opt(True, doc="mask credentials (API keys, tokens, JWTs) everywhere")
    hmac_key_file: str = _opt("", doc="file holding the key of the hash action")
    hmac_key: str = _opt("", secret=True, env_only=True, doc="the key of the hash action")
    # _opt turns the [] into a default_factory: no instance shares it.
    rules: list[Any] = _opt([], doc="[[redaction.rules]], applied in order")  # noqa: RUF009


@dataclass
class LogConfig:
    level: str = _opt("info", choices=("debug", "info", "warning", "error"), doc="log level")
    format: str = _opt("text", choices=("text", "json"), doc="log line format")


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    redaction: RedactionConfig = field(default_factory=RedactionConfig)
    dify: DifyConfig = field(default_factory=DifyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = field(default="defaults", compare=False)

    def sections(self) -> dict[str, Any]:
        fields = dataclasses.fields(self)
        return {f.name: getattr(self, f.name) for f in fields if f.name != "source"}


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the effective configuration; raise ConfigError naming the first bad key."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG_FILE) or None
    raw = _read_toml(path) if path else {}
    config = Config(source=path or "defaults")
    _apply_file(config, raw, path or "")
    _apply_env(config, env)
    if env.get(ENV_INGEST_TOKEN):
        config.server.ingest_token = env[ENV_INGEST_TOKEN]
    _check_cross_field(config)
    return config


def requested_log_format(path: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The log format a configuration asks for, read as far as it can be when it does not
    load: an error about it must reach a JSON log pipeline as JSON."""
    env = os.environ if env is None else env
    asked = env.get(f"{ENV_PREFIX}LOG_FORMAT")
    if asked is None:
        try:
            path = path or env.get(ENV_CONFIG_FILE)
            asked = _read_toml(path)["log"]["format"] if path else None
        except (ConfigError, KeyError, TypeError):
            asked = None
    return "json" if isinstance(asked, str) and asked.strip().lower() == "json" else "text"


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None


def _apply_file(config: Config, raw: dict[str, Any], path: str) -> None:
    sections = config.sections()
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"{name}: unknown section in {path} (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: must be a [{name}] table in {path}")
        for key, value in values.items():
            _refuse_env_only(sections[name], name, key, path)
            _set(sections[name], f"{name}.{key}", key, value, f"in {path}")


def _refuse_env_only(section: Any, section_name: str, key: str, path: str) -> None:
    """Keys that must never sit in a config file, where they end up in backups and repos."""
    for f in dataclasses.fields(section):
        if f.name == key and f.metadata["env_only"]:
            var = f"{ENV_PREFIX}{section_name}_{key}".upper()
            raise ConfigError(
                f"{section_name}.{key}: must not be set in {path}; use env {var} "
                f"or {section_name}.{key}_file"
            )


def _apply_env(config: Config, env: Mapping[str, str]) -> None:
    known = {ENV_CONFIG_FILE, ENV_INGEST_TOKEN}
    for section_name, section in config.sections().items():
        fields = dataclasses.fields(section)
        known.update(f"{ENV_PREFIX}{section_name}_{f.name}".upper() for f in fields)
    # A misspelt variable would otherwise be ignored without a word, like an unknown key.
    for var in sorted(env):
        if var.startswith(ENV_PREFIX) and var not in known and not _service_link(var, env[var]):
            hint = " (did you mean PRECOGX_SIDECAR_SERVER_PORT?)" if var == _BARE_PORT else ""
            raise ConfigError(
                f"{var}: unknown environment variable{hint} (see config.example.toml)"
            )
    for section_name, section in config.sections().items():
        for f in dataclasses.fields(section):
            var = f"{ENV_PREFIX}{section_name}_{f.name}".upper()
            if var in env:
                value = _parse_env(f.type, env[var], f"{section_name}.{f.name}", var)
                _set(section, f"{section_name}.{f.name}", f.name, value, f"from env {var}")


# What Kubernetes puts in every pod of a namespace holding a Service named
# precogx-sidecar (and Docker's legacy links): PRECOGX_SIDECAR_SERVICE_HOST,
# PRECOGX_SIDECAR_PORT=tcp://..., PRECOGX_SIDECAR_PORT_8787_TCP_ADDR and so on.
_SERVICE_LINK = re.compile(
    r"PRECOGX_SIDECAR_(?:SERVICE_HOST|SERVICE_PORT(?:_\w+)?|PORT(?:_\d+_(?:TCP|UDP|SCTP)\w*)?)"
)
_BARE_PORT = "PRECOGX_SIDECAR_PORT"


def _service_link(var: str, value: str) -> bool:
    # The bare PORT only with a link's value: else it is a typo of SERVER_PORT.
    return _SERVICE_LINK.fullmatch(var) is not None and (var != _BARE_PORT or "://" in value)


def _parse_env(type_name: Any, text: str, key: str, var: str) -> Any:
    try:
        if type_name == "bool":
            if text.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if text.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if type_name == "int":
            return int(text)
        if type_name == "float":
            return float(text)
        if type_name.startswith("list"):
            return json.loads(text)
    except RecursionError:  # "[[[[..." nested past what the parser can follow
        raise ConfigError(f"{key}: nested too deeply (from env {var})") from None
    except ValueError:
        raise ConfigError(f"{key}: expected {type_name}, got {text!r} (from env {var})") from None
    return text


def _set(section: Any, key: str, name: str, value: Any, origin: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        known = ", ".join(fields)
        raise ConfigError(f"{key}: unknown key {origin} (known in this section: {known})")
    f = fields[name]
    value = _check_type(f.type, value, key, origin, secret=f.metadata["secret"])
    value = _canonical_choice(f.metadata["choices"], value)
    _check_bounds(f.metadata, value, key, origin)
    setattr(section, name, value)


def _check_type(type_name: Any, value: Any, key: str, origin: str, *, secret: bool) -> Any:
    shown = "(hidden)" if secret else repr(value)
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "list[Any]": isinstance(value, list),
    }[type_name]
    if not ok:
        raise ConfigError(f"{key}: expected {type_name}, got {shown} {origin}")
    if type_name == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {shown} {origin}")
    return value


def _canonical_choice(choices: tuple[str, ...] | None, value: Any) -> Any:
    """``synchronous = "full"`` means "FULL": choices are matched without regard to case."""
    if choices is None or not isinstance(value, str):
        return value
    return next((c for c in choices if c.lower() == value.lower()), value)


def _check_bounds(meta: Mapping[str, Any], value: Any, key: str, origin: str) -> None:
    if meta["ge"] is not None and value < meta["ge"]:
        raise ConfigError(f"{key}: must be >= {meta['ge']}, got {value!r} {origin}")
    if meta["gt"] is not None and value <= meta["gt"]:
        raise ConfigError(f"{key}: must be > {meta['gt']}, got {value!r} {origin}")
    if meta["le"] is not None and value > meta["le"]:
        raise ConfigError(f"{key}: must be <= {meta['le']}, got {value!r} {origin}")
    if not isinstance(value, bool):
        ceiling = MAX_INT if isinstance(value, int) else MAX_FLOAT
        if isinstance(value, int | float) and value > ceiling:
            raise ConfigError(f"{key}: must be <= {ceiling!r}, got {value!r} {origin}")
    if meta["choices"] is not None and value not in meta["choices"]:
        options = " or ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{key}: must be {options}, got {value!r} {origin}")


# The endpoint's own path at the end of upstream.url: the base URL was given as the
# whole endpoint, which would then be appended a second time.
_ENDPOINT_TAIL = re.compile(r"/telemetry(?:/[^/]*)?/*$")
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})


def _check_upstream_url(config: Config) -> None:
    url = config.upstream.url
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError as e:  # "http://[::1": not echoed, it may hold credentials
        raise ConfigError(f"upstream.url: {e}") from None
    if "@" in parsed.netloc:
        # Printed by check-config and in the log (and in the errors below): the key
        # belongs in its own setting.
        raise ConfigError(
            "upstream.url: must not hold credentials (user:password@); set the key with "
            "PRECOGX_API_KEY or upstream.api_key_file"
        )
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        scheme = f"scheme {parsed.scheme!r}" if parsed.scheme else "no scheme"
        raise ConfigError(
            f"upstream.url: must be an http:// or https:// URL with a host, got {scheme}"
            f"{'' if parsed.hostname else ' and no host'} (the value is not shown: it may "
            "be a key set in the wrong variable)")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:  # its message quotes the port's text
        raise ConfigError(
            f"upstream.url: the port must be a number up to 65535, got {_shown(parsed)}"
        ) from None
    # The endpoint path is appended: a query, a fragment or a space would end up in it.
    if url != url.strip() or parsed.query or parsed.fragment or "#" in url:
        raise ConfigError(
            f"upstream.url: must be a base URL without spaces, ?query or #fragment (the "
            f"endpoint path is appended to it), got {_shown(parsed)}"
        )
    if _ENDPOINT_TAIL.search(parsed.path):
        raise ConfigError(
            f"upstream.url: must be the API's base URL (e.g. {DEFAULT_UPSTREAM_URL}), not an "
            f"endpoint: the endpoint path is appended to it, got {_shown(parsed)}"
        )
    if port == config.server.port and parsed.hostname in {*_LOOPBACK_NAMES, config.server.host}:
        raise ConfigError(
            f"upstream.url: points at this sidecar itself (port {port}): events would go "
            "round in a loop; set PrecogX's URL (or your proxy's)"
        )


def _shown(parsed: urllib.parse.SplitResult) -> str:
    """The URL in an error, without its port text, query and fragment: the key pasted
    into one of them (?api_key=...) would be printed before it is known as a secret."""
    host = parsed.hostname or ""
    shown = f"{parsed.scheme}://{f'[{host}]' if ':' in host else host}{parsed.path}"
    hidden = [part for part, held in (
        ("port", ":" in parsed.netloc.rpartition("]")[2]), ("?query", parsed.query),
        ("#fragment", parsed.fragment or "#" in parsed.geturl()),
    ) if held]
    return repr(shown) + (f" ({', '.join(hidden)} not shown)" if hidden else "")


def _check_cross_field(config: Config) -> None:
    _check_upstream_url(config)
    for key, token in (("server.ingest_token", config.server.ingest_token),
                       ("dify.extension_token", config.dify.extension_token)):
        if token and len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"{key}: must be at least {MIN_TOKEN_CHARS} characters "
                f"(got {len(token)}; e.g. openssl rand -hex 16)"
            )
        if token != token.strip() or not token.isprintable():
            # HTTP strips a header value's ends and cannot carry control characters.
            raise ConfigError(
                f"{key}: starts or ends with whitespace, or holds a control character: "
                "no request could ever send it"
            )
    if config.retry.max_backoff_s < config.retry.initial_backoff_s:
        raise ConfigError(
            "retry.max_backoff_s: must be >= retry.initial_backoff_s "
            f"({config.retry.max_backoff_s} < {config.retry.initial_backoff_s})"
        )
    if config.spool.path.strip() == "":
        raise ConfigError("spool.path: must not be empty")
    if config.upstream.batch_max_bytes > config.spool.max_bytes:
        raise ConfigError("upstream.batch_max_bytes: must not exceed spool.max_bytes")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_auth(config: Config) -> str | None:
    """Refuse an open, token-less listener; return a warning when the operator allowed it."""
    server = config.server
    if server.ingest_token or is_loopback(server.host):
        return None
    if server.allow_unauthenticated:
        return (
            f"listening on {server.host} without an ingest token "
            "(server.allow_unauthenticated = true): anyone who can reach it can write events"
        )
    raise ConfigError(
        f"server.ingest_token: required when server.host is not loopback ({server.host!r}); "
        f"set it or env {ENV_INGEST_TOKEN}, or set server.allow_unauthenticated = true"
    )


def read_api_key(config: Config, env: Mapping[str, str] | None = None) -> str:
    """The upstream key from ``upstream.api_key_file`` or env, '' when none is set.

    Read again on SIGHUP, so a rotated key file takes effect without a restart.
    """
    env = os.environ if env is None else env
    path = config.upstream.api_key_file
    if path:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"upstream.api_key_file: cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"upstream.api_key_file: {path} is not UTF-8 text") from None
        if not key:
            raise ConfigError(f"upstream.api_key_file: {path} is empty")
        return _header_safe(key, f"upstream.api_key_file: {path}")
    return _header_safe(env.get(ENV_API_KEY, "").strip(), ENV_API_KEY)


def _header_safe(key: str, origin: str) -> str:
    """The key goes out as the x-api-key header: a line break or other control character
    (two keys in one file) would make every send fail, so it stops start-up instead
    (and a SIGHUP keeps the old key). Never shows the key."""
    if not key.isascii() or not key.isprintable() or " " in key:
        raise ConfigError(f"{origin}: the API key holds a space, a line break or another "
                          "character an HTTP header cannot carry: one key, on one line")
    return key


def render(config: Config, api_key_state: str, rule_lines: Sequence[str] = ()) -> str:
    """The effective configuration as TOML, secrets masked, for ``check-config``.

    Rules are listed as comments (one line each, from the redactor), so the output
    still loads as a config file.
    """
    lines = [
        f"# effective configuration (from {config.source})",
        f"# upstream API key: {api_key_state}",
    ]
    for section_name, section in config.sections().items():
        lines.append(f"\n[{section_name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.metadata["env_only"]:
                lines.append(f"# {f.name}: {'set' if value else 'not set'} (env only)")
            elif f.metadata["secret"]:
                lines.append(f'{f.name} = "{"********" if value else ""}"')
            elif isinstance(value, list):
                lines.append(f"# {f.name}: {len(value)} configured")
                lines.extend(f"#   {line}" for line in rule_lines)
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string once non-ASCII is escaped too.
        return json.dumps(value, ensure_ascii=True)
    return repr(value)
