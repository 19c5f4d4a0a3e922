"""An OpenAI-compatible backend reached over HTTP: the clients that reach it, headers, and whether it can return
exact tokens (vLLM can).

:class:`Upstream` is the one client for completions to a vLLM server or any OpenAI-compatible backend: the relay's
(:meth:`Upstream.send`, read as it arrives), group samples' (:meth:`Upstream.exchange`) and offline evaluations'
(:meth:`Upstream.complete`) all go through the request path's pool (:mod:`proxy.http1`), with the keys that
:meth:`Upstream.headers` lets through: the backend's ``upstream_api_key``, never Lightwire's own keys. Requests
that are not completions (model lists, health checks, vLLM's admin API) use aiohttp. Provider models are reached
through litellm instead (:mod:`proxy.providers`): each provider has its own API, keys and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from proxy import http1
from proxy.config import Config
from proxy.errors import UpstreamError
from proxy.telemetry import TraceIds

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
COMPLETION_TIMEOUT = 300.0  # seconds for a whole completion off the request path (an offline evaluation's replay)


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
        forward_client_auth: bool = False,
        own_keys: Collection[str] = (),
    ) -> None:
        """``api_key``: the backend's own credentials, sent with every request. Without it, and only with
        ``forward_client_auth``, the client's Authorization header goes through, unless its token is one of
        ``own_keys`` (Lightwire's client and admin keys, which never leave the process)."""
        self._base_url = base_url
        self.session = session
        self.pool = pool
        self._api_key = api_key
        self._forward_client_auth = forward_client_auth
        self._own_keys = frozenset(own_keys)
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

    async def send(self, path: str, payload: bytes, *, incoming: Mapping[str, str], traceparent: str) -> http1.Response:
        """POST a JSON ``payload`` with the headers :meth:`headers` makes of ``incoming``; return once the status
        and headers have arrived. The caller times it and closes the response."""
        headers = self.headers(incoming, traceparent=traceparent)
        headers["Content-Type"] = "application/json"
        return await self.pool.post(self.url(path), headers, payload)

    async def exchange(
        self, path: str, body: dict[str, Any], *, incoming: Mapping[str, str], traceparent: str, timeout: float
    ) -> tuple[int, bytes]:
        """:meth:`send` ``body`` and read the answer whole, all within ``timeout`` seconds: its status and bytes.
        Raises :class:`~proxy.http1.HTTPClientError` or :class:`TimeoutError`."""
        async with asyncio.timeout(timeout):
            resp = await self.send(path, orjson.dumps(body), incoming=incoming, traceparent=traceparent)
            try:
                return resp.status, await resp.read()
            finally:
                resp.close()

    async def complete(self, body: dict[str, Any], *, timeout: float = COMPLETION_TIMEOUT) -> tuple[int, Any]:
        """One chat completion, whole, in a trace of its own: its status and JSON body; a backend that cannot be
        reached, or answers no JSON, gives 502 and an error body, as a client would get."""
        url = self.url("/chat/completions")
        try:
            status, raw = await self.exchange(
                "/chat/completions", body, incoming={}, traceparent=TraceIds.new(None).traceparent, timeout=timeout
            )
            return status, orjson.loads(raw)
        except (http1.HTTPClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            return UpstreamError.status, UpstreamError(f"{url} did not answer: {exc}").body()

    def headers(self, incoming: Mapping[str, str], *, traceparent: str) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in incoming.items() if k.lower() not in HOP_HEADERS and k.lower() not in OWN_HEADERS
        )
        out.update(self.auth())
        given = incoming.get("Authorization")
        if not self._api_key and self._forward_client_auth and given and not self._is_own(given):
            out["Authorization"] = given
        out["traceparent"] = traceparent
        return out

    def auth(self) -> dict[str, str]:
        """The backend's own credentials as headers (none without ``api_key``): for the requests the sidecar
        makes by itself (listing models, loading adapters)."""
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _is_own(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else authorization.strip()
        return any(hmac.compare_digest(token.encode(), key.encode()) for key in self._own_keys)

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
                headers=self.auth(),
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
    """The backends' clients for the app's lifetime: the pool every completion goes through, and aiohttp's
    session for the other requests.

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
