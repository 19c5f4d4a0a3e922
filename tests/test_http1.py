"""The request path's HTTP/1.1 client against real servers on loopback: aiohttp ones, raw sockets for the
misbehaving cases, and TLS with a certificate made here."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from proxy.http1 import ConnectError, Pool, ResponseError

JSON = CIMultiDict({"Content-Type": "application/json"})


async def serve(app: web.Application, tls: ssl.SSLContext | None = None) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"{'https' if tls else 'http'}://127.0.0.1:{port}"


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that answers a body with its length, in pieces when asked; it notes each request's client port."""
    ports: list[int] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        body = await request.read()
        if request.query.get("pieces"):
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            for i in range(int(request.query["pieces"])):
                await out.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0.01)
            await out.write_eof()
            return out
        return web.json_response({"length": len(body), "path": request.path_qs, "type": request.content_type})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner, url = await serve(app)
    yield url, ports
    await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handle: Handler) -> AsyncIterator[str]:
    """A server that speaks whatever ``handle`` writes on the socket; its URL."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def answering(answer: bytes) -> Handler:
    """A handler that reads one request, writes ``answer`` as it is, and closes the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    return handle


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = Pool()
    yield pool
    pool.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


async def test_calls_share_one_keep_alive_connection_and_send_what_they_are_given(echo, pool: Pool) -> None:
    url, ports = echo
    for i in range(20):
        resp = await pool.post(f"{url}/v1/chat/completions?x={i}", JSON, b"{}" * i)
        assert (resp.status, resp.content_type) == (200, "application/json")
        assert (
            await resp.read()
            == b'{"length": %d, "path": "/v1/chat/completions?x=%d", "type": "application/json"}'
            % (
                2 * i,
                i,
            )
        )
        resp.close()
    assert len(set(ports)) == 1


async def test_a_connection_idle_past_the_keepalive_is_not_reused(echo) -> None:
    url, ports = echo
    pool = Pool(keepalive=0.2)
    for pause in (0.0, 0.05, 0.3):
        await asyncio.sleep(pause)
        resp = await pool.post(url + "/", JSON, b"{}")
        await resp.read()
        resp.close()
    assert ports[0] == ports[1] != ports[2]
    pool.close()


async def test_a_chunked_body_arrives_piece_by_piece(echo, pool: Pool) -> None:
    url, _ = echo
    resp = await pool.post(f"{url}/stream?pieces=5", JSON, b"{}")
    pieces = []
    while piece := await resp.readany():
        pieces.append(piece)
    resp.close()
    assert b"".join(pieces) == b"".join(b"data: %d\n\n" % i for i in range(5))
    assert len(pieces) >= 3  # not gathered until the end
    again = await pool.post(f"{url}/after", JSON, b"")  # the connection is reused after a chunked body
    assert (await again.read()).startswith(b'{"length": 0')
    again.close()


async def test_a_body_without_a_length_ends_with_the_connection(pool: Pool) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nall of it"
    async with raw_server(answering(answer)) as url:
        resp = await pool.post(url + "/", JSON, b"{}")
        assert await resp.read() == b"all of it"
        resp.close()


async def test_header_values_keep_their_utf_8(pool: Pool) -> None:
    answer = "HTTP/1.1 200 OK\r\nX-Note: café\r\nContent-Length: 0\r\n\r\n".encode()
    async with raw_server(answering(answer)) as url:
        resp = await pool.post(url + "/", JSON, b"{}")
        assert resp.headers["x-note"] == "café"
        resp.close()


async def test_interim_responses_are_skipped(pool: Pool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()

    async with raw_server(handle) as url:
        resp = await pool.post(url + "/", JSON, b"{}")
        assert (resp.status, resp.headers.get("X-Final"), "Link" in resp.headers) == (201, "yes", False)
        assert await resp.read() == b"done"
        resp.close()


async def test_a_connection_the_backend_closed_while_idle_is_replaced_unseen(pool: Pool) -> None:
    """The race keep-alive clients must survive: the backend drops the connection as the request goes out."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the next request on this connection is dropped unanswered
        writer.close()

    async with raw_server(handle) as url:
        for _ in range(3):
            resp = await pool.post(url + "/", JSON, b"{}")
            assert await resp.read() == b"ok"
            resp.close()
        assert connections == 3


async def test_a_fresh_connection_that_breaks_is_an_error_not_a_retry(pool: Pool) -> None:
    attempts = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await read_request(reader)
        writer.close()

    async with raw_server(handle) as url:
        with pytest.raises(ResponseError, match="closed the connection before the response ended"):
            await pool.post(url + "/", JSON, b"{}")
        assert attempts == 1


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", "closed the connection before the response ended"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n", "malformed response"),
    ],
)
async def test_a_truncated_or_garbled_body_is_an_error(answer: bytes, error: str, pool: Pool) -> None:
    async with raw_server(answering(answer)) as url:
        resp = await pool.post(url + "/", JSON, b"{}")
        with pytest.raises(ResponseError, match=error):
            await resp.read()
        resp.close()


async def test_nothing_listening_is_a_connect_error(pool: Pool) -> None:
    async with raw_server(read_request) as url:  # type: ignore[arg-type]
        pass
    with pytest.raises(ConnectError, match=r"cannot connect to 127\.0\.0\.1"):
        await pool.post(url + "/", JSON, b"{}")


async def test_an_abandoned_response_closes_its_connection_at_once(pool: Pool) -> None:
    gone = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # returns when the client closes
        gone.set()

    async with raw_server(handle) as url:
        resp = await pool.post(url + "/", JSON, b"{}")
        assert await resp.readany() == b"first"
        resp.close()
        await asyncio.wait_for(gone.wait(), 2)


async def test_at_most_limit_connections_are_in_use() -> None:
    in_use = most = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal in_use, most
        in_use += 1
        most = max(most, in_use)
        await asyncio.sleep(0.05)
        in_use -= 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", handle)
    runner, url = await serve(app)
    pool = Pool(limit=2)

    async def call() -> bytes:
        resp = await pool.post(url + "/", JSON, b"")
        try:
            return await resp.read()
        finally:
            resp.close()

    assert await asyncio.gather(*(call() for _ in range(6))) == [b"ok"] * 6
    assert most == 2
    pool.close()
    await runner.cleanup()


async def test_https_with_the_certificates_the_environment_trusts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: Pool
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=f"secure {request.secure}")

    app = web.Application()
    app.router.add_post("/", handle)
    runner, url = await serve(app, tls)
    with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await Pool().post(url + "/", JSON, b"")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))  # read when a pool first connects over TLS
    resp = await pool.post(url + "/", JSON, b"")
    assert await resp.read() == b"secure True"
    resp.close()
    await runner.cleanup()


async def test_an_unread_body_stops_the_socket_being_read_until_it_is(pool: Pool) -> None:
    size = 32 << 20  # far beyond what the kernel's socket buffers and the pause threshold hold together
    sent = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size >> 16):
            writer.write(b"x" * (1 << 16))
            await writer.drain()
        sent.set()

    async with raw_server(handle) as url:
        resp = await pool.post(url + "/", JSON, b"{}")
        await asyncio.sleep(0.5)
        assert not sent.is_set()  # the backend waits on us
        assert len(await resp.read()) == size
        assert sent.is_set()
        resp.close()
