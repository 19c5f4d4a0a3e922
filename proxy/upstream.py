"""An OpenAI-compatible backend reached over HTTP: the clients that reach it (the request path's own, aiohttp for
everything else), headers, and whether it can return exact tokens (vLLM can)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
from multidict import CIMultiDict

from proxy import http1
from proxy.config import Config

log = logging.getLogger(__name__)

# Headers that describe one hop, or that aiohttp sets itself; never copied across the proxy.
HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Content-Encoding",
        "Accept-Encoding",
        "Expect",  # 100-continue is answered by the hop that receives it (aiohttp, for clients)
        "Date",
        "Server",
    )
)
# Client headers that belong to Lightwire, not to the backend.
OWN_HEADERS = frozenset({"authorization", "traceparent", "x-lightwire-session"})
PROBE_TIMEOUT = 5.0
PROBE_RETRY = 30.0  # seconds before asking an unreachable backend again what it is


class Upstream:
    """One OpenAI-compatible base URL (``http://host:port/v1``) and how to talk to it."""

    def __init__(
        self,
        base_url: str | Callable[[], str],
        session: aiohttp.ClientSession,
        pool: http1.Pool,
        *,
        api_key: str | None = None,
        capture_tokens: str = "auto",
        forward_client_auth: bool = True,
    ) -> None:
        self._base_url = base_url
        self.session = session
        self.pool = pool
        self._api_key = api_key
        self._forward_client_auth = forward_client_auth
        self._capture = {"always": True, "never": False}.get(capture_tokens)
        self.provider = "vllm" if self._capture else "openai"
        self._probe_lock = asyncio.Lock()
        self._next_probe = 0.0

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``; a managed server's port changes when it is restarted."""
        base = self._base_url() if callable(self._base_url) else self._base_url
        return base.rstrip("/")

    def url(self, path: str) -> str:
        return self.base_url + path

    async def post(self, path: str, headers: CIMultiDict[str], body: bytes) -> http1.Response:
        """A model call's request, through the request path's client; the caller closes the response."""
        return await self.pool.post(self.url(path), headers, body)

    def headers(self, incoming: Mapping[str, str], *, traceparent: str) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in incoming.items() if k.lower() not in HOP_HEADERS and k.lower() not in OWN_HEADERS
        )
        if self._api_key:
            out["Authorization"] = f"Bearer {self._api_key}"
        elif self._forward_client_auth and "Authorization" in incoming:
            out["Authorization"] = incoming["Authorization"]
        out["traceparent"] = traceparent
        return out

    async def capture_tokens(self) -> bool:
        """Whether to ask this backend for token ids and logprobs; with ``auto``, whether it is vLLM."""
        if self._capture is None and time.monotonic() >= self._next_probe:
            async with self._probe_lock:
                if self._capture is None and time.monotonic() >= self._next_probe:
                    self._capture = await self._is_vllm()
                    self._next_probe = time.monotonic() + PROBE_RETRY
                    if self._capture is not None:
                        self.provider = "vllm" if self._capture else "openai"
        return bool(self._capture)

    async def _is_vllm(self) -> bool | None:
        """True for vLLM, False for another server, None when it could not be asked (asked again later)."""
        try:
            async with self.session.get(
                self.url("/models"),
                headers=self.headers({}, traceparent=""),
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            ) as resp:
                models = (await resp.json()).get("data") or []
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            log.warning("could not list the upstream's models (%s); token capture off for now", exc)
            return None
        return any(m.get("owned_by") == "vllm" for m in models)


def response_headers(upstream_headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The upstream's response headers that the client should see (Retry-After, x-request-id, rate limits...)."""
    return CIMultiDict((k, v) for k, v in upstream_headers.items() if k.lower() not in HOP_HEADERS)


@contextlib.asynccontextmanager
async def clients(config: Config) -> AsyncIterator[tuple[aiohttp.ClientSession, http1.Pool]]:
    """The backends' clients for the app's lifetime: aiohttp's session, and the request path's pool.

    Only connecting has a timeout here: waiting for headers and for each chunk are timed by the relay, since a
    non-streaming generation may take minutes before its first byte.
    """
    connector = aiohttp.TCPConnector(limit=config.upstream_connections, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout, sock_connect=config.connect_timeout)
    pool = http1.Pool(config.upstream_connections, connect_timeout=config.connect_timeout)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=True) as session:
            yield session, pool
    finally:
        pool.close()
