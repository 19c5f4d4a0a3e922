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
=========================  ==========================================================================

``replies`` maps a model name to the content answered to requests for that model, like ``x-fake-content``, and
``failures`` to an error status, like ``x-fake-status``, for clients that cannot set headers (litellm).
``delays`` holds the seconds that the first requests, in the order they arrive, wait before their answer: for
requests the proxy makes on its own, which carry the client's headers.

With ``vllm=True`` it behaves like vLLM where the proxy cares: ``/v1/models`` says ``owned_by: vllm``,
``/health`` answers, and ``return_token_ids`` / ``logprobs`` are honoured, in streams too. Run it alone with
``python -m tests.fake_upstream --port 0`` (it prints its base URL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

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
    delays: list[float] = field(default_factory=list)  # seconds the first requests wait, in order of arrival
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        if self.vllm:
            app.router.add_get("/health", self.health)
        return app

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
        return web.json_response(
            {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": owner}]}
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "text_completion")

    async def _answer(self, request: web.Request, operation: str) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Seen(request.path, dict(request.headers), body))
        h = request.headers
        try:
            if len(self.requests) <= len(self.delays):
                await asyncio.sleep(self.delays[len(self.requests) - 1])
            if "x-fake-delay" in h:
                await asyncio.sleep(float(h["x-fake-delay"]))
            if "x-fake-status" in h or body.get("model") in self.failures:
                status = int(h.get("x-fake-status") or self.failures[body["model"]])
                headers = {"Retry-After": h["x-fake-retry-after"]} if "x-fake-retry-after" in h else {}
                error = {"error": {"message": f"fake failure {status}", "type": "fake_error", "code": status}}
                return web.json_response(error, status=status, headers=headers)
            content = h.get("x-fake-content", self.replies.get(body.get("model", "")))
            if body.get("stream"):
                return await self._stream(request, operation, body, content)
            return web.json_response(self._completion(operation, body, content))
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise

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
            "id": f"cmpl-{time.monotonic_ns()}",
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
        limits = {
            k: int(h[f"x-fake-{k}-after"]) for k in ("stall", "truncate", "drop", "garble") if f"x-fake-{k}-after" in h
        }
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        ident = f"chatcmpl-{time.monotonic_ns()}"
        n = int(body.get("n") or 1)
        for i in range(chunks + 1):
            if i == limits.get("stall"):
                await asyncio.sleep(3600)
            if i == limits.get("truncate"):
                await out.write_eof()
                return out
            if i == limits.get("drop"):
                assert request.transport is not None
                request.transport.abort()
                return out
            if i == limits.get("garble"):
                await out.write(b"data: {this is not json\n\n")
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


def _pieces(text: str, n: int) -> list[str]:
    """``text`` cut into ``n`` consecutive pieces (some empty when it is short)."""
    n = max(n, 1)
    return [text[k * len(text) // n : (k + 1) * len(text) // n] for k in range(n)]


async def _serve(port: int, vllm: bool) -> None:
    fake = await FakeUpstream(vllm=vllm).start(port)
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
