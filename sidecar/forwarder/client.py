"""The upstream PrecogX API as the forwarder sees it: events in, an Outcome out."""

from __future__ import annotations

import logging
import urllib.parse
import urllib.request
from collections.abc import Sequence

import aiohttp

from sidecar import __version__
from sidecar.config import UpstreamConfig
from sidecar.forwarder.retry import Outcome
from sidecar.logs import register_secret
from sidecar.spool import StoredEvent

log = logging.getLogger("sidecar.forwarder")

BODY_EXCERPT_BYTES = 2048
BATCH_PATH = "/telemetry/batch"
SINGLE_PATH = "/integrations/dify/telemetry"


def batch_body(events: Sequence[StoredEvent]) -> bytes:
    # The payloads are already JSON: joining bytes beats parsing and dumping them again.
    return b'{"interactions":[' + b",".join(e.payload for e in events) + b"]}"


async def _excerpt(response: aiohttp.ClientResponse) -> str:
    """The start of the body, read to its end: a body cut short means we cannot know
    what the upstream kept, so it must count as a failure and be sent again. Streamed,
    so that memory stays bounded whatever its size."""
    kept = bytearray()
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        kept += chunk[: BODY_EXCERPT_BYTES - len(kept)]
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        return f"[{size} bytes, Content-Encoding: {encoding}]"
    return kept.decode("utf-8", "replace") + ("..." if size > len(kept) else "")


def _env_proxy(url: str) -> str | None:
    """HTTPS_PROXY / HTTP_PROXY for ``url`` unless NO_PROXY exempts its host, read once:
    aiohttp's trust_env would also send ~/.netrc credentials to PrecogX, and look the
    file up again for every request. Only HTTP proxies: aiohttp speaks no SOCKS."""
    parsed = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parsed.hostname or ""):
        return None
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy  # "host:3128", as curl takes it
    try:
        shown = urllib.parse.urlsplit(proxy)
        shown.port  # noqa: B018 - raises for a port that is no number
    except ValueError:
        log.warning("%s_PROXY is no URL the sidecar can read: sending to PrecogX directly",
                    parsed.scheme.upper())
        return None
    if shown.password:
        register_secret(shown.password)  # an error naming the URL must not show it
    if shown.scheme not in ("http", "https"):
        log.warning("%s_PROXY is a %s proxy, which the sidecar cannot use: sending to "
                    "PrecogX directly", parsed.scheme.upper(), shown.scheme)
        return None
    log.info("upstream requests go through the proxy %s://%s (%s_PROXY)",
             shown.scheme, shown.hostname, parsed.scheme.upper())
    return proxy


class UpstreamClient:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.api_key = ""
        base = config.url.rstrip("/")
        self._url = base + (BATCH_PATH if config.mode == "batch" else SINGLE_PATH)
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None

    async def start(self) -> None:
        self._proxy = _env_proxy(self._url)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.config.concurrency + 1),
            # Only an excerpt of an answer is kept: a compressed one is never asked for,
            # nor inflated (a few hundred KiB of gzip can inflate to gigabytes).
            auto_decompress=False,
            headers={
                "Accept-Encoding": "identity",
                "Content-Type": "application/json",
                "User-Agent": f"precogx-sidecar/{__version__}",
            },
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, events: Sequence[StoredEvent], idempotency_key: str) -> Outcome:
        assert self._session is not None
        body = batch_body(events) if self.config.mode == "batch" else events[0].payload
        headers = {"x-api-key": self.api_key, "Idempotency-Key": idempotency_key}
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False, proxy=self._proxy
            ) as response:
                excerpt = await _excerpt(response)
                if 300 <= response.status < 400 and "Location" in response.headers:
                    # Redirects are not followed (the key would go along): say where to.
                    excerpt = f"Location: {response.headers['Location']}; {excerpt}"
                return Outcome(
                    status=response.status,
                    retry_after=response.headers.get("Retry-After"),
                    body=excerpt,
                )
        except TimeoutError:
            return Outcome(error="timeout", body=f"no answer within {self.config.timeout_s}s")
        except (aiohttp.ClientError, OSError) as e:
            return Outcome(error="connection", body=f"{type(e).__name__}: {e}"[:500])
