"""A fake OpenAI-compatible upstream: a real aiohttp server on a loopback port, for fault and overhead tests.

Each request may steer it with headers (the proxy passes unknown headers through untouched):

=========================  ==========================================================================
``x-fake-status: 429``     answer with this status and an OpenAI error body
``x-fake-retry-after: 7``  add a ``Retry-After`` header
``x-fake-delay: 0.5``      wait this many seconds before the response headers
``x-fake-chunks: 5``       stream this many content chunks
``x-fake-chunk-delay: s``  wait between chunks
``x-fake-stall-after: n``  stop sending (connection open) after n chunks
``x-fake-truncate-after``  end the body cleanly after n chunks, without ``[DONE]``
``x-fake-drop-after: n``   drop the TCP connection after n chunks
``x-fake-garble-after: n`` send a chunk that is not JSON after n chunks
``x-fake-content: text``   answer with this content (streams: cut into the chunks)
``x-fake-insert: raw``     streams: send ``data: raw`` as an extra event before chunk
                           ``x-fake-insert-after`` (default 1); otherwise answer ``raw`` as the body
``x-fake-fault: kind``     ``reset-before-headers``: drop the connection before answering;
                           ``reset-mid-body`` / ``stall-mid-body``: send headers and half the body, then
                           drop the connection / keep it open and send nothing more
=========================  ==========================================================================

``replies`` maps a model name to the content answered to requests for that model, like ``x-fake-content``, and
``failures`` to an error status, like ``x-fake-status``, for clients that cannot set headers (litellm).
``reply_to`` answers a chat call with the content it makes of the request's messages (a model that reads them).
``/v1/responses`` speaks the Responses API, streams too (:mod:`tests.fake_responses`); other paths are answered
by :meth:`FakeUpstream.other`.
``delays`` holds the seconds that the first requests, in the order they arrive, wait before their answer: for
requests the proxy makes on its own, which carry the client's headers.

With ``vllm=True`` it behaves like vLLM where the proxy cares: ``/v1/models`` says ``owned_by: vllm``,
``/health`` answers, ``return_token_ids`` / ``logprobs`` are honoured, in streams too, and LoRA adapters can be
loaded and unloaded by name (``/v1/load_lora_adapter``; then listed by ``/v1/models`` and answered like any
model). With ``dev_mode=True`` it also accepts vLLM's weight reloads (``/collective_rpc``,
``/reset_prefix_cache``) and does nothing. ``broken_loras`` is the error status with which chat calls
through a loaded adapter answer while its load and one-token probe (a text completion) succeed: an adapter
that loads but fails in use. ``api_key`` guards ``/v1`` as vLLM's ``--api-key`` does (401 without
``Bearer <key>``), ``authorizations`` records the path and Authorization header of every request, and
``connections`` its path and the client's port (which connection it came over). Run
it alone with ``python -m tests.fake_upstream --port 0`` (it prints
its base URL; it then keeps no requests, for benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests import fake_responses

WORDS = ["Hello", " from", " the", " fake", " upstream", ".", " It", " streams", " words", " slowly"]
PROMPT_IDS = [1, 2, 3, 4]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeUpstream:
    vllm: bool = False
    requests: list[Seen] = field(default_factory=list)
    disconnects: int = 0  # requests whose client went away before the response was complete
    replies: dict[str, str] = field(default_factory=dict)  # model -> content of its answers
    failures: dict[str, int] = field(default_factory=dict)  # model -> the error status it answers with
    reply_to: Callable[[list[dict[str, Any]]], str] | None = None  # chat messages -> the content of the answer
    delays: list[float] = field(default_factory=list)  # seconds the first requests wait, in order of arrival
    keep_requests: bool = True  # False: count them only (a long benchmark would fill memory with them)
    received: int = 0
    model_ids: list[str] = field(default_factory=lambda: ["fake-model"])  # what /v1/models lists
    loras: dict[str, str] = field(default_factory=dict)  # vllm: loaded adapter name -> its path
    load_seconds: float = 0.0  # vllm: how long loading an adapter takes
    broken_loras: int | None = None  # vllm: the status of chat calls through a loaded adapter
    api_key: str | None = None  # as vLLM's --api-key: /v1 requests need it
    authorizations: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization) of each
    connections: list[tuple[str, int]] = field(default_factory=list)  # (path, the client's port) of each
    dev_mode: bool = False
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # Responses API: response id -> response
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets /v1/slow-stream send its second chunk
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.models)
        if self.vllm:
            app.router.add_get("/health", self.health)
            app.router.add_post("/v1/load_lora_adapter", self.load_lora)
            app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)
        if self.dev_mode:
            app.router.add_post("/collective_rpc", self.accept)
            app.router.add_post("/reset_prefix_cache", self.accept)
        app.router.add_route("*", "/v1/{tail:.+}", self.other)
        return app

    @web.middleware
    async def guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization")
        if self.keep_requests:
            self.authorizations.append((request.path, given))
            assert request.transport is not None
            self.connections.append((request.path, request.transport.get_extra_info("peername")[1]))
        if self.api_key and request.path.startswith("/v1") and given != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def start(self, port: int = 0) -> FakeUpstream:
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # -- handlers -----------------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        owner = "vllm" if self.vllm else "fake"
        listed = [{"id": name, "object": "model", "owned_by": owner} for name in self.model_ids]
        parent = self.model_ids[0] if self.model_ids else None
        adapters = [{"id": name, "object": "model", "owned_by": owner, "parent": parent} for name in self.loras]
        return web.json_response({"object": "list", "data": [*listed, *adapters]})

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(self.load_seconds)
        if body["lora_name"] in self.loras:  # vLLM's answer, which the publisher recognizes
            return web.Response(status=400, text=f"The lora adapter '{body['lora_name']}' has already been loaded.")
        self.loras[body["lora_name"]] = body["lora_path"]
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        self.loras.pop((await request.json())["lora_name"], None)
        return web.Response(text="Success")

    async def other(self, request: web.Request) -> web.StreamResponse:
        """Any other path: ``/v1/embeddings`` answers like OpenAI; ``/v1/slow-stream`` sends one chunk, then a
        second once ``release`` is set; anything else echoes what arrived (method, query, content type, size)."""
        raw = await request.read()
        body = orjson.loads(raw) if request.content_type == "application/json" else {"size": len(raw)}
        self.requests.append(Seen(request.path, dict(request.headers), body))
        if request.path == "/v1/embeddings":
            data = [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]
            usage = {"prompt_tokens": 3, "total_tokens": 3}
            return web.json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})
        if request.path == "/v1/slow-stream":
            out = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await out.prepare(request)
            await out.write(b"first ")
            await self.release.wait()
            await out.write(b"second")
            await out.write_eof()
            return out
        echo = {"method": request.method, "query": dict(request.query), "content_type": request.content_type}
        return web.json_response({**echo, "size": len(raw)}, status=int(request.query.get("status", 200)))

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def accept(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "text_completion")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "responses")

    async def _answer(self, request: web.Request, operation: str) -> web.StreamResponse:
        body = await request.json()
        self.received += 1
        if self.keep_requests:
            self.requests.append(Seen(request.path, dict(request.headers), body))
        h = request.headers
        try:
            if self.received <= len(self.delays):
                await asyncio.sleep(self.delays[self.received - 1])
            if "x-fake-delay" in h:
                await asyncio.sleep(float(h["x-fake-delay"]))
            broken = self.broken_loras if operation == "chat" and body.get("model") in self.loras else None
            if "x-fake-status" in h or body.get("model") in self.failures or broken:
                status = int(h.get("x-fake-status") or broken or self.failures[body["model"]])
                headers = {"Retry-After": h["x-fake-retry-after"]} if "x-fake-retry-after" in h else {}
                error = {"error": {"message": f"fake failure {status}", "type": "fake_error", "code": status}}
                return web.json_response(error, status=status, headers=headers)
            fault = h.get("x-fake-fault")
            if fault == "reset-before-headers":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            content = h.get("x-fake-content", self.replies.get(body.get("model", "")))
            if content is None and self.reply_to is not None and operation == "chat":
                content = self.reply_to(body["messages"])
            if operation == "responses":
                return await self._respond(request, body, content)
            if body.get("stream"):
                return await self._stream(request, operation, body, content)
            if "x-fake-insert" in h:
                return web.Response(body=h["x-fake-insert"].encode(), content_type="application/json")
            answer = orjson.dumps(self._completion(operation, body, content))
            if fault in ("reset-mid-body", "stall-mid-body"):
                return await self._half_body(request, answer, stall=fault == "stall-mid-body")
            return web.Response(body=answer, content_type="application/json")
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise

    async def _respond(self, request: web.Request, body: dict[str, Any], content: str | None) -> web.StreamResponse:
        previous = body.get("previous_response_id")
        if previous and previous not in self.stored:
            error = {"message": f"Response with id '{previous}' not found.", "type": "invalid_request_error"}
            return web.json_response({"error": {**error, "param": "previous_response_id", "code": None}}, status=404)
        chunks = int(request.headers.get("x-fake-chunks", 5))
        pieces = [WORDS[i % len(WORDS)] for i in range(chunks)] if content is None else _pieces(content, chunks)
        if not body.get("stream"):
            answer = fake_responses.response(body, pieces, vllm=self.vllm)
            self._store(body, answer)
            return web.json_response(answer)
        stream, first_delta = fake_responses.events(body, pieces, vllm=self.vllm)
        self._store(body, stream[-1]["response"])
        deltas = sum(1 for e in stream if e["type"].endswith(".delta"))
        return await self._send(request, [(e["type"], orjson.dumps(e)) for e in stream], first_delta, deltas)

    def _store(self, body: dict[str, Any], answer: dict[str, Any]) -> None:
        if not self.vllm and body.get("store", True):
            self.stored[answer["id"]] = answer

    async def _send(
        self, request: web.Request, events: list[tuple[str, bytes]], first: int, deltas: int
    ) -> web.StreamResponse:
        """Send typed server-sent events, with the stream faults of the ``x-fake-*`` headers (counted in events
        from ``first``, the first of ``deltas`` delta events; the chunk delay comes after each of them)."""
        h = request.headers
        delay = float(h.get("x-fake-chunk-delay", 0))
        limits = _faults(h, offset=first)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        for i, (kind, data) in enumerate(events):
            if await _fault(request, out, limits, i, b"event: response.output_text.delta\ndata: {not json\n\n"):
                return out
            await out.write(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
            if delay and first <= i < first + deltas:
                await asyncio.sleep(delay)
        await out.write_eof()
        return out

    async def _half_body(self, request: web.Request, answer: bytes, *, stall: bool) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "application/json"})
        out.content_length = len(answer)
        await out.prepare(request)
        await out.write(answer[: len(answer) // 2])
        if stall:
            await asyncio.sleep(3600)
        assert request.transport is not None
        request.transport.abort()
        return out

    def _completion(self, operation: str, body: dict[str, Any], content: str | None = None) -> dict[str, Any]:
        n = int(body.get("n") or 1)
        text = "".join(WORDS[:5]) if content is None else content
        tokens = list(range(100, 105))
        choices = []
        for i in range(n):
            choice: dict[str, Any] = {"index": i, "finish_reason": "stop", "logprobs": None}
            if operation == "chat":
                choice["message"] = {"role": "assistant", "content": text}
                if body.get("tools"):
                    name = body["tools"][0]["function"]["name"]
                    choice["message"] = {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": '{"x": 1}'}}
                        ],
                    }
                    choice["finish_reason"] = "tool_calls"
                if self.vllm and body.get("logprobs"):
                    choice["logprobs"] = {
                        "content": [{"token": w, "logprob": -0.5, "bytes": None, "top_logprobs": []} for w in WORDS[:5]]
                    }
            else:
                choice["text"] = text
                if self.vllm and body.get("logprobs") is not None:
                    choice["logprobs"] = {
                        "tokens": WORDS[:5],
                        "token_logprobs": [-0.5] * 5,
                        "top_logprobs": None,
                        "text_offset": [0] * 5,
                    }
            if self.vllm and body.get("return_token_ids"):
                choice["token_ids"] = tokens
            choices.append(choice)
        response: dict[str, Any] = {
            "id": f"cmpl-{uuid.uuid4().hex}",  # random, as vLLM's are (sequential ids index far smaller)
            "object": "chat.completion" if operation == "chat" else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": choices,
            "usage": {"prompt_tokens": 4, "completion_tokens": 5 * n, "total_tokens": 4 + 5 * n},
        }
        if self.vllm and body.get("return_token_ids"):
            response["prompt_token_ids"] = PROMPT_IDS
        return response

    async def _stream(
        self, request: web.Request, operation: str, body: dict[str, Any], content: str | None = None
    ) -> web.StreamResponse:
        h = request.headers
        chunks = int(h.get("x-fake-chunks", 5))
        words = WORDS if content is None else _pieces(content, chunks)
        delay = float(h.get("x-fake-chunk-delay", 0))
        limits = _faults(h)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        n = int(body.get("n") or 1)
        for i in range(chunks + 1):
            if await _fault(request, out, limits, i, b"data: {this is not json\n\n"):
                return out
            if i == int(h.get("x-fake-insert-after", 1)) and "x-fake-insert" in h:
                await out.write(b"data: " + h["x-fake-insert"].encode() + b"\n\n")
            last = i == chunks
            for c in range(n):
                chunk = self._chunk(operation, body, ident, i, c, last, words)
                await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if delay and not last:
                await asyncio.sleep(delay)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 4, "completion_tokens": chunks * n, "total_tokens": 4 + chunks * n}
            final = {
                "id": ident,
                "object": "chat.completion.chunk",
                "model": body["model"],
                "choices": [],
                "usage": usage,
            }
            await out.write(b"data: " + orjson.dumps(final) + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    def _chunk(
        self, operation: str, body: dict[str, Any], ident: str, i: int, c: int, last: bool, words: list[str] = WORDS
    ) -> dict[str, Any]:
        word = words[i % len(words)]
        choice: dict[str, Any] = {"index": c, "finish_reason": "stop" if last else None, "logprobs": None}
        tools = body.get("tools")
        if operation == "chat":
            if last:
                delta: dict[str, Any] = {}
                choice["finish_reason"] = "tool_calls" if tools else "stop"
            elif tools:
                name = tools[0]["function"]["name"]
                piece = ['{"x"', ": ", "1", "}"][i % 4] if i < 4 else ""
                call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
                if i == 0:
                    call = {
                        "index": 0,
                        "id": f"call_{c}",
                        "type": "function",
                        "function": {"name": name, "arguments": piece},
                    }
                delta = {"tool_calls": [call]} if piece or i == 0 else {}
            else:
                delta = {"content": word}
                if i == 0:
                    delta["role"] = "assistant"
            choice["delta"] = delta
            if self.vllm and body.get("logprobs") and not last:
                choice["logprobs"] = {"content": [{"token": word, "logprob": -0.25, "bytes": None, "top_logprobs": []}]}
        else:
            choice["text"] = "" if last else word
            if self.vllm and body.get("logprobs") is not None and not last:
                choice["logprobs"] = {
                    "tokens": [word],
                    "token_logprobs": [-0.25],
                    "top_logprobs": None,
                    "text_offset": [0],
                }
        if self.vllm and body.get("return_token_ids") and not last:
            choice["token_ids"] = [200 + i]
        chunk: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk" if operation == "chat" else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [choice],
        }
        if self.vllm and body.get("return_token_ids") and i == 0 and c == 0:
            chunk["prompt_token_ids"] = PROMPT_IDS
        return chunk


def _faults(headers: Any, *, offset: int = 0) -> dict[str, int]:
    """The stream faults asked for (``x-fake-stall-after``...): the event index at which each happens."""
    kinds = ("stall", "truncate", "drop", "garble")
    return {k: int(headers[f"x-fake-{k}-after"]) + offset for k in kinds if f"x-fake-{k}-after" in headers}


async def _fault(request: web.Request, out: web.StreamResponse, limits: dict[str, int], i: int, garbage: bytes) -> bool:
    """Act out the fault due before event ``i``; True when the stream ends here (truncated or dropped)."""
    if i == limits.get("stall"):
        await asyncio.sleep(3600)
    if i == limits.get("truncate"):
        await out.write_eof()
        return True
    if i == limits.get("drop"):
        assert request.transport is not None
        request.transport.abort()
        return True
    if i == limits.get("garble"):
        await out.write(garbage)
    return False


def _pieces(text: str, n: int) -> list[str]:
    """``text`` cut into ``n`` consecutive pieces (some empty when it is short)."""
    n = max(n, 1)
    return [text[k * len(text) // n : (k + 1) * len(text) // n] for k in range(n)]


async def _serve(port: int, vllm: bool) -> None:
    fake = await FakeUpstream(vllm=vllm, keep_requests=False).start(port)
    print(fake.url, flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI upstream.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--vllm", action="store_true", help="behave like vLLM (token ids, logprobs)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.vllm))


if __name__ == "__main__":
    main()
