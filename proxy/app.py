"""The HTTP edge: ``create_app(config)`` builds the aiohttp application, its routes and everything long-lived
(store writer, OpenTelemetry exporter, upstream client session), each owned by a cleanup context that starts it
and, on shutdown, closes it: in-flight calls finish first, then the client session closes, then the store
writes what is queued, then the exporter drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from optimizers.loop import OPTIMIZER, Optimizer, running
from proxy import adapters_api, admin, protocol, providers
from proxy.backends import BACKENDS, POLICY, UPSTREAM, Backends, backends
from proxy.config import Config
from proxy.errors import (
    BackendUnavailable,
    HTTPError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UpstreamError,
    json_response,
)
from proxy.feedback import FEEDBACK_DESK, FeedbackDesk, end_session, post_feedback
from proxy.groups import SAMPLER, sampling
from proxy.hooks import HOOKS, HookRunner, load_hook
from proxy.relay import CLIENT_GONE, SPAN_HEADER, Call, forward
from proxy.sessions import SESSION_HEADER, Sessions
from proxy.telemetry import Exporter, TraceIds
from proxy.upstream import response_headers
from store import queries
from store.adapters import Adapter
from store.feedback import Feedback, SessionEnd
from store.runs import Run
from store.spans import Span
from store.writer import Record, Writer

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
WRITER = web.AppKey("writer", Writer)
EXPORTER = web.AppKey("exporter", Exporter)
SESSIONS = web.AppKey("sessions", Sessions)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Paths answered without any key, and path prefixes guarded by the admin key.
PUBLIC_PATHS = frozenset({"/healthz"})
ADMIN_PREFIXES = ("/feedback", "/sessions/", "/admin/")
# Where a session's calls come from when the agent names it; its turn count may then be in the store already.
NAMED_SESSION_SOURCES = frozenset({"header", "path", "traceparent"})


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[errors_middleware, auth_middleware])
    app[CONFIG] = config
    hooks = HookRunner(config, group_timeout=config.group_timeout)  # a bad hook name is a ConfigError here
    if hooks.active:
        app[HOOKS] = hooks
    if config.otlp_endpoint:
        app.cleanup_ctx.append(exporter_ctx)
    app.cleanup_ctx.append(writer_ctx)
    app.cleanup_ctx.append(sessions_ctx)
    if hooks.active:
        app.cleanup_ctx.append(hooks_ctx)  # stops before the feedback desk and the writer it scores through
    app.cleanup_ctx.append(backends_ctx)
    app.cleanup_ctx.append(optimizer_ctx)
    if config.group_samples:
        app.cleanup_ctx.append(sampler_ctx)  # stops first: samples still running are cancelled
    for prefix in ("", "/s/{session}"):
        app.router.add_post(prefix + "/v1/chat/completions", chat_completions)
        app.router.add_post(prefix + "/v1/completions", completions)
        app.router.add_get(prefix + "/v1/models", models)
    app.router.add_post("/feedback", post_feedback)
    app.router.add_post("/sessions/{session}/end", end_session)
    adapters_api.add_routes(app.router)
    admin.add_routes(app.router, writer=WRITER, config=CONFIG)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


# -- long-lived parts ---------------------------------------------------------------------------------------


async def exporter_ctx(app: web.Application) -> AsyncIterator[None]:
    exporter = Exporter(app[CONFIG].otlp_endpoint or "")
    app[EXPORTER] = exporter
    yield
    await asyncio.to_thread(exporter.shutdown)


async def writer_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    exporter, hooks = app.get(EXPORTER), app.get(HOOKS)

    def on_commit(records: list[Record]) -> None:
        if exporter is not None:
            exporter.export([r.span for r in records if isinstance(r, Call) and isinstance(r.span, Span)])
        if hooks is not None:
            hooks.committed(records)

    writer = Writer(
        config.db,
        kinds=[Span, Feedback, SessionEnd, Adapter, Run],
        max_pending=config.max_pending_spans,
        flush_interval=config.flush_interval_ms / 1000,
        on_commit=on_commit if exporter or hooks else None,
    )
    writer.open()
    app[WRITER] = writer
    yield
    await writer.close()
    log.info("store closed: %d spans written", writer.written)


async def sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    sessions = app[SESSIONS] = Sessions()
    app[FEEDBACK_DESK] = FeedbackDesk(app[WRITER], sessions)
    sweeper = asyncio.create_task(close_idle_sessions(app))
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper


async def optimizer_ctx(app: web.Application) -> AsyncIterator[None]:
    """The optimizer, running in the background when ``optimize`` is on (it waits for the policy to be ready)."""
    config, found = app[CONFIG], app[BACKENDS]
    judges = tuple(load_hook(name, "eval") for name in config.eval_hooks)
    if not judges and HOOKS in app:
        judges = tuple(app[HOOKS].hooks["span"])
    optimizer = app[OPTIMIZER] = Optimizer(config, app[WRITER], found, judges)
    if not (config.optimize and (config.vllm or (not config.upstream and not config.provider_models))):
        yield
        return
    async with running(optimizer):
        yield


async def sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    async with sampling(app[CONFIG], app[WRITER], app[BACKENDS]) as sampler:
        app[SAMPLER] = sampler
        yield


async def hooks_ctx(app: web.Application) -> AsyncIterator[None]:
    async with app[HOOKS].run(app[WRITER], app[FEEDBACK_DESK]):
        yield


async def close_idle_sessions(app: web.Application) -> None:
    timeout = app[CONFIG].session_idle_timeout
    writer, sessions = app[WRITER], app[SESSIONS]
    while True:
        await asyncio.sleep(min(timeout / 4, 5.0))
        for session_id in sessions.idle(timeout):
            await writer.reserve()
            writer.submit(SessionEnd(session_id=session_id, ended_at=datetime.now(UTC), end_reason="idle"))


async def backends_ctx(app: web.Application) -> AsyncIterator[None]:
    async with backends(app[CONFIG], app[WRITER]) as found:
        app[BACKENDS] = found
        yield


# -- middlewares --------------------------------------------------------------------------------------------


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves in OpenAI's shape, so that SDK clients show its message."""
    try:
        return await handler(request)
    except HTTPError as exc:
        return exc.response()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_mb
        return PayloadTooLarge(f"The request body is larger than the {limit:g} MiB limit.").response()
    except web.HTTPNotFound:
        return NotFound(f"Unknown path {request.path}.").response()
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return InvalidRequest(f"{request.method} is not allowed on {request.path}; use {allowed}.").response()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Model calls need a client key when some are set; admin paths need the admin key when it is set."""
    config = request.app[CONFIG]
    keys = config.api_keys
    if config.admin_key and request.path.startswith(ADMIN_PREFIXES):
        keys = (config.admin_key,)
    if keys and request.path not in PUBLIC_PATHS:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not any(hmac.compare_digest(given, key.encode()) for key in keys):
            raise Unauthorized("Incorrect or missing API key for this Lightwire proxy.")
    return await handler(request)


# -- routes -------------------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await model_call(request, protocol.CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await model_call(request, protocol.TEXT_COMPLETION)


async def model_call(request: web.Request, operation: str) -> web.StreamResponse:
    """Validate, reserve a place in the store, forward, and record exactly one span whatever happens."""
    raw = await request.read()
    body = protocol.parse_request(operation, raw)
    writer, found, sessions = request.app[WRITER], request.app[BACKENDS], request.app[SESSIONS]
    target = found.target(body["model"])
    call = Call(operation, body, raw, TraceIds.new(request.headers.get("traceparent")), target)
    messages = body.get("messages") if operation == protocol.CHAT else None
    call.session_id, call.session_source, conversation = sessions.attribute(
        header=request.headers.get(SESSION_HEADER),
        path=request.match_info.get("session"),
        trace_id=call.ids.trace_id if call.ids.parent_span_id else None,
        messages=messages,
    )
    earlier_turns = None
    if call.session_source in NAMED_SESSION_SOURCES and not sessions.is_known(call.session_id):
        earlier_turns = await asyncio.to_thread(_count_turns, writer, call.session_id)
    await writer.reserve()
    call.turn_index = sessions.begin(call.session_id, earlier_turns)
    sessions.remember_call(call.ids.span_id, None, call.session_id)
    try:
        if target == POLICY:
            return await _forward_to_policy(request, call, found)
        if target == UPSTREAM:
            assert found.upstream is not None
            return await forward(request, call, found.upstream, request.app[CONFIG])
        return await providers.forward(request, call, target, request.app[CONFIG])
    except HTTPError as exc:
        call.fail(exc.status, exc.code or exc.type, exc.message)
        exc.headers[SPAN_HEADER] = call.ids.span_id
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        call.fail(CLIENT_GONE, "client_disconnected", "The client closed the connection.")
        raise
    finally:
        call.end()
        writer.submit(call)
        sessions.finish(call.session_id, conversation, call.replies())
        response_id = call.response.get("id") if call.response else None
        sessions.remember_call(call.ids.span_id, response_id, call.session_id)
        if target == POLICY and SAMPLER in request.app:
            request.app[SAMPLER].after(call, request.headers)  # in the background, once the answer is complete


async def _forward_to_policy(request: web.Request, call: Call, found: Backends) -> web.StreamResponse:
    assert found.policy is not None
    if found.problem:
        raise BackendUnavailable(found.problem)
    replica, version = await found.policy.acquire(call.session_id)
    call.adapter_version = version.version
    try:
        return await forward(request, call, replica.upstream, request.app[CONFIG], model=version.served_name)
    finally:
        found.policy.release(replica, version)


def _count_turns(writer: Writer, session_id: str) -> int:
    with writer.cursor() as con:
        return queries.session_turns(con, session_id)


async def models(request: web.Request) -> web.Response:
    found = request.app[BACKENDS]
    if found.policy is not None:
        replica = next((r for r in found.policy.replicas if r.usable()), None)
        if replica is None:
            raise BackendUnavailable("The model is still starting.", headers={"Retry-After": "5"})
        upstream = replica.upstream
    else:
        assert found.upstream is not None
        upstream = found.upstream
    headers = upstream.headers(request.headers, traceparent=TraceIds.new(None).traceparent)
    try:
        async with upstream.session.get(upstream.url("/models"), headers=headers) as resp:
            return web.Response(body=await resp.read(), status=resp.status, headers=response_headers(resp.headers))
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"Could not reach the upstream: {exc}.") from None


async def healthz(request: web.Request) -> web.Response:
    """Liveness, and what is being served: always 200 while the process works."""
    writer, found = request.app[WRITER], request.app[BACKENDS]
    body: dict[str, Any] = {"status": "ok", "spans_written": writer.written, "spans_pending": writer.pending}
    if HOOKS in request.app:
        body["hooks"] = request.app[HOOKS].stats()
    if found.policy is not None:
        policy = found.policy
        body["policy"] = {
            "ready": policy.ready(),
            "mode": policy.mode,
            "base": policy.base.served_name,
            "active": policy.active.label,
            "canary": policy.canary.label if policy.canary else None,
            "canary_fraction": policy.canary_fraction,
            "problem": found.problem,
        }
    return json_response(body)


async def readyz(request: web.Request) -> web.Response:
    """200 once calls can be served, else 503: for orchestrators and scripts that wait for the model."""
    policy = request.app[BACKENDS].policy
    if policy is not None and not policy.ready():
        raise BackendUnavailable("The model is still starting.", headers={"Retry-After": "5"})
    return json_response({"status": "ready"})
