"""Extra samples for group-relative training: more answers to a client's prompt, which the client never sees.

GRPO (:mod:`optimizers.grpo`) learns from the differences between answers to the same prompt, and an agent sends
each prompt once. With ``group_samples = G`` (0: off) the sidecar completes the group: once a chat or text
completion served by the policy has answered the client successfully, it asks the version that answered, in the
background, for ``G - n`` more answers (``n``: the choices the client asked for). Each is a request of its own
with one answer, all sent at once (vLLM batches them, and its prefix cache computes the shared prompt once), so
that each is a span of its own that a span hook scores on its own. A sample is recorded as:

* the client's request (prompt and sampling settings) without ``n``, ``stream`` and ``seed`` (a seed would give
  the client's answer again); token ids and logprobs are asked of vLLM and hidden from the stored response, as
  for any call;
* ``session_source = "sample"``, ``parent_span_id`` the client's call, in the client's trace, and no session:
  credit assignment gives it only its own rewards (the client's session rewards judged the client's answer),
  and the online evaluation and session hooks never count it;
* ``adapter_version`` the version that answered the client (when another version serves that session by the
  time the samples start, there are none).

The export puts samples with the client's answer: the same prompt (GRPO's group), the same opening messages
(``task_key``), the same train/held-out split (the client's session decides it). Only span hooks can score them,
as they score every call: without span hooks, samples carry no reward and train nothing.

Samples never hold up the client: they start once its answer is complete, and nothing waits for them. They do take
backend capacity that the agent's next calls share. At most ``MAX_PENDING`` calls' samples are in flight; calls
past that get none (counted, logged). Greedy calls (``temperature`` 0) get none: every sample would be the same
answer. A sample that fails is logged, not recorded (clients never saw it); at shutdown, samples still running
are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy import http1
from proxy.backends import Backends
from proxy.config import Config
from proxy.errors import HTTPError
from proxy.explore import Explorer, exploring
from proxy.policy import Replica, Version
from proxy.relay import Call
from proxy.telemetry import TraceIds, random_hex
from store.spans import SAMPLE_SOURCE
from store.writer import Writer

log = logging.getLogger(__name__)

MAX_PENDING = 32  # client calls whose samples may be in flight at once
SKIP_LOG_EVERY = 100
NOT_RESENT = ("n", "stream", "stream_options", "seed")


class Sampler:
    """Samples more answers to the policy's calls, for one proxy process."""

    def __init__(self, config: Config, writer: Writer, backends: Backends, explorer: Explorer | None = None) -> None:
        self.size = config.group_samples
        self.explorer = explorer
        self.timeout = config.first_byte_timeout + config.chunk_timeout
        self.writer = writer
        self.backends = backends
        self.recorded = self.failed = self.skipped = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def after(self, call: Call, headers: Mapping[str, str]) -> None:
        """``call``, served by the policy, is over: start its samples in the background. Never waits, never raises."""
        if call.status != 200 or call.error_type is not None or call.response is None:
            return
        greedy = call.body.get("temperature") == 0
        wanted = 0 if greedy or not self.size else self.size - _choices(call.body)
        hotter = self.explorer.wanted(call) if self.explorer is not None else 0
        if wanted < 1 and hotter < 1:
            return
        if len(self._tasks) >= MAX_PENDING:
            self.skipped += 1
            if self.skipped % SKIP_LOG_EVERY == 1:
                log.warning("group samples: %d calls in flight; call %s gets none", MAX_PENDING, call.ids.span_id)
            return
        task = asyncio.create_task(self._sample(call, CIMultiDict(headers), max(wanted, 0), hotter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sample(self, call: Call, headers: CIMultiDict[str], wanted: int, hotter: int = 0) -> None:
        policy = self.backends.policy
        assert policy is not None
        try:
            replica, version = await policy.acquire(call.session_id)
        except HTTPError as exc:
            log.warning("group samples for %s: no replica (%s)", call.ids.span_id, exc.message)
            return
        try:
            if version.version != call.adapter_version:
                return  # the session moved to another version meanwhile: its samples would not be the client's
            temperatures = [None] * wanted + [self.explorer.temperature if self.explorer else None] * hotter
            samples = await asyncio.gather(
                *(self._one(call, replica, version, headers, temperature) for temperature in temperatures)
            )
        finally:
            policy.release(replica, version)
        for sample in samples:
            if sample is not None:
                await self.writer.reserve()
                self.writer.submit(sample.settled())
                self.recorded += 1

    async def _one(
        self, call: Call, replica: Replica, version: Version, headers: CIMultiDict[str], temperature: float | None
    ) -> Call | None:
        """One sample; at ``temperature`` (exploration) instead of the client's when given."""
        body = {k: v for k, v in call.body.items() if k not in NOT_RESENT}
        if temperature is not None:
            body["temperature"] = temperature
        ids = TraceIds(call.ids.trace_id, random_hex(8), call.ids.span_id, call.ids.flags)
        sample = Call(call.operation, body, orjson.dumps(body), ids, call.provider)
        sample.session_source = SAMPLE_SOURCE
        sample.adapter_version = version.version
        upstream = replica.upstream
        outgoing: dict[str, Any] = {**body, "model": version.served_name}
        if await upstream.capture_tokens():
            outgoing, sample.injected = call.wire.ask_for_tokens(outgoing)
        sample.provider = upstream.provider
        try:
            sample.status, sample.response_raw = await upstream.exchange(
                call.wire.path, outgoing, incoming=headers, traceparent=ids.traceparent, timeout=self.timeout
            )
        except (http1.HTTPClientError, TimeoutError) as exc:
            self._failed(call, f"{type(exc).__name__}: {exc}")
            return None
        sample.end()
        if sample.status != 200 or sample.response is None:
            self._failed(call, f"status {sample.status}: {(sample.response_raw or b'')[:200]!r}")
            return None
        return sample

    def _failed(self, call: Call, why: str) -> None:
        self.failed += 1
        log.warning("group sample for %s failed: %s", call.ids.span_id, why)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


SAMPLER = web.AppKey("sampler", Sampler)


@contextlib.asynccontextmanager
async def sampling(config: Config, writer: Writer, backends: Backends) -> AsyncIterator[Sampler]:
    """The sampler for an app's lifetime; samples still running at shutdown are cancelled."""
    if not config.span_hooks:
        log.warning("group or exploration samples are on but no span hook is set: the samples get no reward")
    async with contextlib.AsyncExitStack() as stack:
        explorer = None
        if config.explore_samples:
            explorer = Explorer(
                samples=config.explore_samples,
                temperature=config.explore_temperature,
                attempts=config.explore_attempts,
                budget=config.explore_budget,
            )
            await stack.enter_async_context(exploring(explorer, writer))
        sampler = Sampler(config, writer, backends, explorer)
        try:
            yield sampler
        finally:
            await sampler.stop()
