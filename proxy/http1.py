"""The request path's HTTP/1.1 client: pooled keep-alive connections to the backends, parsed by llhttp
(``httptools``, the parser under uvicorn).

Forwarding a call through aiohttp's ``ClientSession`` cost ~190 us of CPU on this machine, a third of all the proxy
spent on a call; a bare exchange on one connection costs ~65 us. This client does only what forwarding needs: POST
a body, read the status and headers, then the body whole or as it arrives. Connections are kept per origin (most
recently used first, ``limit`` in use at once), opened within ``connect_timeout``, over TLS for ``https``; waiting
for headers and chunks is timed by the caller. A connection that the backend closed while it sat idle is replaced
without the caller seeing it, and one idle for longer than ``keepalive`` is not trusted again. Every completion
to an OpenAI-compatible backend goes through it, by way of :class:`proxy.upstream.Upstream`: the relay's, group
samples', offline evaluations'. Other requests (model lists, health checks, vLLM's admin API) use aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
import time
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

# Unread body bytes at which a connection stops reading from its socket (it reads again once they are read).
PAUSE_READING_AT = 1 << 20
# Seconds a connection may sit idle and still be reused (aiohttp's default). Beyond it, a NAT or load balancer may
# have dropped it without a word, and a request sent on it would wait for its whole timeout.
KEEPALIVE_S = 15.0


class HTTPClientError(Exception):
    """The exchange with the backend failed."""


class ConnectError(HTTPClientError):
    """No connection could be opened."""


class ResponseError(HTTPClientError):
    """The connection broke, or what came back is not an HTTP/1.1 response."""


class Origin(NamedTuple):
    https: bool
    host: str
    port: int


class Target(NamedTuple):
    origin: Origin
    host_header: str
    path: str  # with the query


@functools.lru_cache(maxsize=256)
def target(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(Origin(https, parts.hostname, port), parts.netloc.rpartition("@")[2], path)


class Response:
    """A response whose status and headers have arrived; its body is read with :meth:`read` or :meth:`readany`.

    :meth:`close` must follow: it hands a finished connection back to the pool, and closes one whose response
    was not read to its end, which is how the backend learns at once that the call was abandoned.
    """

    def __init__(self, pool: Pool, connection: _Connection) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = connection.status
        self.headers = CIMultiDict(  # decoded as aiohttp decodes them, for aiohttp's server to send on
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in connection.headers
        )
        self.content_type = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()

    async def readany(self) -> bytes:
        """The body bytes that have arrived since the last call, waiting for some; ``b""`` once it is complete."""
        assert self._connection is not None, "response closed"
        return await self._connection.read()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if self._connection is not None:
            self._pool.release(self._connection)
            self._connection = None


class Pool:
    """Keep-alive connections to any number of origins, at most ``limit`` of them in use at once."""

    def __init__(self, limit: int = 256, *, connect_timeout: float = 10.0, keepalive: float = KEEPALIVE_S) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[Origin, list[_Connection]] = collections.defaultdict(list)
        self._tls: ssl.SSLContext | None = None

    async def post(self, url: str, headers: CIMultiDict[str], body: bytes) -> Response:
        """Send the request; return once the response's status and headers have arrived."""
        where = target(url)
        head = [f"POST {where.path} HTTP/1.1\r\nHost: {where.host_header}\r\nContent-Length: {len(body)}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers.items()]
        request = "".join(head).encode("utf-8", "surrogateescape") + b"\r\n" + body
        await self._slots.acquire()
        try:
            connection = self._take(where.origin)
            if connection is not None:
                try:
                    return await self._exchange(connection, request)
                except ResponseError:
                    if connection.received:
                        raise
                    # The backend closed it while it sat idle: nothing of this request was read, send it again.
            return await self._exchange(await self._connect(where.origin), request)
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(self, connection: _Connection, request: bytes) -> Response:
        try:
            await connection.send(request)
        except BaseException:
            connection.abort()
            raise
        return Response(self, connection)

    def release(self, connection: _Connection) -> None:
        """Take back a connection whose response is done with: kept if it can carry another, else closed."""
        self._slots.release()
        if connection.reusable():
            connection.idle_since = time.monotonic()
            self._idle[connection.origin].append(connection)
        else:
            connection.abort()

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.abort()
        self._idle.clear()

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        stale = time.monotonic() - self.keepalive
        while idle:  # the most recently used first; the others are older still
            connection = idle.pop()
            if connection.closed:
                continue
            if connection.idle_since >= stale:
                return connection
            connection.abort()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.https:
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin), origin.host, origin.port, ssl=tls
                )
        except TimeoutError:
            where = f"{origin.host}:{origin.port}"
            raise ConnectError(f"no connection to {where} within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from None
        return connection


class _Connection(asyncio.Protocol):
    """One connection, carrying one exchange at a time; the parser's callbacks fill in the current response."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.closed = False
        self.idle_since = 0.0
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.received = False  # any byte of the current response
        self._headers_done = False
        self._keep_alive = False
        self._complete = False
        self._error: ResponseError | None = None
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False

    async def send(self, request: bytes) -> None:
        """Write a request and wait for its response's headers."""
        assert self._transport is not None
        self._reset()
        self._transport.write(request)
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        while not self._body:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        chunk = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.closed and not self._body

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._error = ResponseError(f"the upstream sent a malformed response ({exc})")
            self.abort()
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and not self._complete and not self._sized():
            self._complete = True  # a body without a length ends when the connection does
        elif not self._complete and self._error is None:
            reason = f": {exc}" if exc else ""
            self._error = ResponseError(f"the upstream closed the connection before the response ended{reason}")
        self._wake()

    def _sized(self) -> bool:
        return any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.headers)

    # -- the parser's callbacks -----------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim response (100 Continue, 103 Early Hints): the real one follows
            self.headers = []
            return
        self.status = status
        self._keep_alive = self._parser.should_keep_alive()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > PAUSE_READING_AT and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._headers_done:  # not the end of an interim response
            self._complete = True
            self._wake()
