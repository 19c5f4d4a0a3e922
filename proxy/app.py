"""The HTTP edge: ``create_app(config)`` builds the aiohttp application, its routes and everything long-lived
(store writer, OpenTelemetry exporter, upstream client session), each owned by a cleanup context that starts it
and, on shutdown, closes it: in-flight calls finish first, then the client session closes, then the store
writes what is queued, then the exporter drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from optimizers.loop import Optimizer, running
from optimizers.memory import Builder
from optimizers.ports import Judge
from proxy import adapters_api, admin, memory_api, metrics, passthrough, protocol, providers, responses, ui
from proxy.adapters_api import OPTIMIZER
from proxy.backends import BACKENDS, POLICY, UPSTREAM, Backends, backends
from proxy.config import Config
from proxy.errors import (
    BackendUnavailable,
    Forbidden,
    HTTPError,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StoreError,
    Unauthorized,
    UpstreamError,
    json_response,
)
from proxy.feedback import FEEDBACK_DESK, FeedbackDesk, end_session, post_feedback
from proxy.fleet import SHIPPER, shipping
from proxy.groups import SAMPLER, sampling
from proxy.hooks import HOOKS, HookRunner, judges
from proxy.loopwatch import LOOP_WATCH, loop_watch_ctx, watch_middleware
from proxy.memory import MEMORY, Memory
from proxy.memory_api import MEMORY_BUILDER
from proxy.memory_publish import BANKS, BankPublisher
from proxy.relay import Call, failures_recorded, forward
from proxy.sessions import SESSION_HEADER, Ended, Sessions
from proxy.telemetry import Exporter, TraceIds
from proxy.upstream import response_headers
from store import items, queries
from store.adapters import Adapter
from store.feedback import Feedback, SessionEnd
from store.memory import MemoryBank
from store.runs import Run
from store.spans import Span, model_calls
from store.writer import Record, StoreUnavailable, Writer

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
WRITER = web.AppKey("writer", Writer)
EXPORTER = web.AppKey("exporter", Exporter)
SESSIONS = web.AppKey("sessions", Sessions)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Paths answered without any key (orchestrators probe them; the dashboard's files hold no data: it reads /admin/),
# and path prefixes guarded by the admin key.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", *ui.SHELL})
ADMIN_PREFIXES = ("/feedback", "/sessions/", "/admin/", "/metrics")
# Where a session's calls come from when the agent names it; its turn count may then be in the store already.
# Session ends recorded in one go before calls get the loop again: a busy sidecar's full index pushes out
# hundreds of sessions a second, and 3,500 ends in one go held the loop for ~13 ms.
ENDS_PER_TURN = 100
NAMED_SESSION_SOURCES = frozenset({"header", "path", "traceparent", "previous_response", "conversation"})


def create_app(config: Config) -> web.Application:
    middlewares = [watch_middleware, errors_middleware, auth_middleware]
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[CONFIG] = config
    hooks = HookRunner(config, group_timeout=config.group_timeout)  # a bad hook name is a ConfigError here
    if hooks.active:
        app[HOOKS] = hooks
    app.cleanup_ctx.append(loop_watch_ctx)
    if config.otlp_endpoint:
        app.cleanup_ctx.append(exporter_ctx)
    app.cleanup_ctx.append(writer_ctx)
    if config.share:
        app.cleanup_ctx.append(share_ctx)  # stops after everything that writes: ships the last rows
    app.cleanup_ctx.append(sessions_ctx)
    if hooks.active:
        app.cleanup_ctx.append(hooks_ctx)  # stops before the feedback desk and the writer it scores through
    app.cleanup_ctx.append(open_sessions_ctx)  # ends open sessions before the hooks stop
    app.cleanup_ctx.append(backends_ctx)
    app.cleanup_ctx.append(optimizer_ctx)
    app.on_shutdown.append(stop_runs)
    app.cleanup_ctx.append(memory_ctx)
    if config.group_samples or config.explore_samples:
        app.cleanup_ctx.append(sampler_ctx)  # stops first: samples still running are cancelled
    other_paths = passthrough.handler(writer=WRITER, config=CONFIG)
    for prefix in ("", "/s/{session}"):
        app.router.add_post(prefix + "/v1/chat/completions", chat_completions)
        app.router.add_post(prefix + "/v1/completions", completions)
        app.router.add_post(prefix + "/v1/responses", responses_create)
        app.router.add_get(prefix + "/v1/models", models)
        app.router.add_route("*", prefix + "/v1/{tail:.+}", other_paths)
    app.router.add_post("/feedback", post_feedback)
    app.router.add_post("/sessions/{session}/end", end_session)
    adapters_api.add_routes(app.router)
    memory_api.add_routes(app.router)
    admin.add_routes(app.router, writer=WRITER, config=CONFIG)
    ui.add_routes(app.router, writer=WRITER, config=CONFIG)
    metrics.add_routes(app, writer=WRITER, config=CONFIG)
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
    exporter, hooks, counted = app.get(EXPORTER), app.get(HOOKS), app[metrics.METRICS]
    loop = asyncio.get_running_loop()

    def on_commit(records: list[Record]) -> None:
        if exporter is not None:
            exporter.export(model_calls(records))
        if hooks is not None:
            hooks.committed(records)
        counted.committed(records)
        ends = [(r.session_id, r.turns) for r in records if isinstance(r, SessionEnd)]
        if ends and SESSIONS in app:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(app[SESSIONS].settled, ends)

    writer = Writer(
        config.db,
        kinds=[Span, Feedback, SessionEnd, Adapter, Run, MemoryBank],
        max_pending=config.max_pending_spans,
        flush_interval=config.flush_interval_ms / 1000,
        wait_timeout=config.store_wait_timeout,
        on_commit=on_commit,
        memory_limit_mb=config.db_memory_limit_mb,
        cache_mb=config.db_cache_mb,
        threads=config.db_threads,
    )
    writer.open()
    app[WRITER] = writer
    yield
    await writer.close()
    log.info("store closed: %d rows written (spans, feedback, sessions, ...)", writer.written)


async def share_ctx(app: web.Application) -> AsyncIterator[None]:
    async with shipping(app[CONFIG], app[WRITER]) as shipper:
        app[SHIPPER] = shipper
        yield


async def sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    sessions = app[SESSIONS] = Sessions(app[CONFIG].session_index_size)
    # In a fleet, feedback may name a call another sidecar served: it is kept and shipped for the learner to join.
    app[FEEDBACK_DESK] = FeedbackDesk(app[WRITER], sessions, accept_unknown=app[CONFIG].share is not None)
    sweeper = asyncio.create_task(close_idle_sessions(app))
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper


async def open_sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    """At start, end the sessions a proxy held when it stopped without ending them (SIGKILL, a crash: ``end_reason``
    "interrupted"); at shutdown, once calls in flight are done, end the sessions still open ("shutdown"). Both
    while the session hooks run: they score them (at shutdown, within their drain time)."""
    writer = app[WRITER]
    interrupted = await writer.read(queries.interrupted_sessions, lean=True)  # every span: not kept in the cache
    if interrupted:
        ended = [(session_id, turns, first) for session_id, turns, first, _ in interrupted]
        await end_sessions(writer, ended, "interrupted", forever=True)
        with contextlib.suppress(StoreUnavailable):  # committed before calls come, which count on from them
            await writer.flush()
        log.warning("%d sessions left open by an earlier stop (a crash or SIGKILL): ended", len(interrupted))
    yield
    ended = app[SESSIONS].end_all()
    try:
        await end_sessions(writer, ended, "shutdown")
        await writer.flush()  # committed: the hooks have them
    except StoreUnavailable as exc:
        log.error("sessions open at shutdown: not all %d ended (%s)", len(ended), exc)
    else:
        log.info("sessions open at shutdown: %d ended", len(ended))


async def optimizer_ctx(app: web.Application) -> AsyncIterator[None]:
    """The optimizer, running in the background when ``optimize`` is on (it waits for the policy to be ready)."""
    config, found = app[CONFIG], app[BACKENDS]
    optimizer = app[OPTIMIZER] = Optimizer(config, app[WRITER], lambda: found.publisher, _judges(config))
    await optimizer.close_interrupted()
    if not (config.optimize and found.serves_policy) or config.share:  # a fleet's learner optimizes, not its sidecars
        yield
        return
    async with running(optimizer.loop):
        yield


async def stop_runs(app: web.Application) -> None:
    """Optimizer runs are cancelled when shutdown begins, before the server waits for requests in flight: a run
    may take minutes, and a ``POST /admin/train`` waiting for one gets its answer (503, run cancelled)."""
    await app[OPTIMIZER].stop()


async def memory_ctx(app: web.Application) -> AsyncIterator[None]:
    """Memory banks: the active one serves from the start; with memory on for a route, runs build new ones."""
    config = app[CONFIG]
    memory = app[MEMORY] = Memory(routes=config.memory, examples=config.memory_examples)
    banks = app[BANKS] = BankPublisher(memory, app[WRITER], folder=(config.adapters_dir / "memory").resolve())
    await banks.start()
    builder = app[MEMORY_BUILDER] = Builder(config, app[WRITER], banks, app[BACKENDS].complete, _judges(config))
    if not config.memory:
        yield
        return
    async with running(builder.loop):
        yield


def _judges(config: Config) -> tuple[Judge, ...]:
    """What judges candidates offline: the ``eval_hooks``, else the span hooks."""
    return judges(config.eval_hooks or config.span_hooks, config)


async def sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    async with sampling(app[CONFIG], app[WRITER], app[BACKENDS]) as sampler:
        app[SAMPLER] = sampler
        yield


async def hooks_ctx(app: web.Application) -> AsyncIterator[None]:
    async with app[HOOKS].run(app[WRITER], app[FEEDBACK_DESK]):
        yield


async def close_idle_sessions(app: web.Application) -> None:
    """End the sessions that went idle or that the full index pushed out: on a busy sidecar, hundreds a second
    once the index is full, so the sweep runs every second and lets calls run between chunks of ends."""
    timeout = app[CONFIG].session_idle_timeout
    writer, sessions = app[WRITER], app[SESSIONS]
    while True:
        await asyncio.sleep(min(timeout / 4, 1.0))
        await end_sessions(writer, sessions.idle(timeout), "idle", forever=True)


async def end_sessions(writer: Writer, ended: list[Ended], reason: str, *, forever: bool = False) -> None:
    """Record the end of each session, giving the event loop back to calls after every ``ENDS_PER_TURN``."""
    ended_at = datetime.now(UTC)
    for n, (session_id, turns, started) in enumerate(ended, 1):
        await writer.reserve(forever=forever)
        writer.submit(SessionEnd(session_id, ended_at, reason, turns, started))
        if n % ENDS_PER_TURN == 0:
            await asyncio.sleep(0)


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
    except StoreUnavailable as exc:
        return StoreError(str(exc), headers={"Retry-After": "5"}).response()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_mb
        return PayloadTooLarge(f"The request body is larger than the {limit:g} MiB limit.").response()
    except web.HTTPNotFound:
        return NotFound(f"Unknown path {request.path}.").response()
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return InvalidRequest(f"{request.method} is not allowed on {request.path}; use {allowed}.").response()
    except ConnectionResetError:
        raise  # the client is gone: there is no one to answer
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        if request.writer.output_size > 0:
            raise  # the answer has begun: aiohttp closes the connection
        return InternalError("Lightwire failed to handle this request; its log has the details.").response()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Model calls need a client key when some are set; admin paths need the admin key when it is set.

    The admin API (``/admin/``: adapters, runs, export of all traffic) is off with 403 when the proxy listens
    beyond this machine and no ``admin_key`` is set: client keys are handed to agents, and no key at all would
    open it to the network. ``/feedback`` and ``/sessions`` stay guarded by the client keys, as documented.
    """
    config = request.app[CONFIG]
    if request.path.startswith("/admin/") and not config.admin_key and not is_loopback(config.host):
        raise Forbidden(
            f"The admin API is off: this sidecar listens on {config.host or 'every address'}, beyond this machine, "
            "and no admin_key is set. Set admin_key (LIGHTWIRE_ADMIN_KEY or --admin-key) and send it as a Bearer "
            "token."
        )
    keys = config.api_keys
    if config.admin_key and request.path.startswith(ADMIN_PREFIXES):
        keys = (config.admin_key,)
    if keys and request.path not in PUBLIC_PATHS:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not any(hmac.compare_digest(given, key.encode()) for key in keys):
            raise Unauthorized("Incorrect or missing API key for this Lightwire proxy.")
    return await handler(request)


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine only (a name other than localhost: no)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- routes -------------------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await model_call(request, protocol.CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await model_call(request, protocol.TEXT_COMPLETION)


async def responses_create(request: web.Request) -> web.StreamResponse:
    return await model_call(request, responses.RESPONSES)


async def model_call(request: web.Request, operation: str) -> web.StreamResponse:
    """Validate, reserve a place in the store, forward, and record exactly one span whatever happens."""
    raw = await request.read()
    started = time.perf_counter()  # from here on, the time is Lightwire's or the backend's
    writer, found, sessions = request.app[WRITER], request.app[BACKENDS], request.app[SESSIONS]
    continued = None
    if operation == responses.RESPONSES:
        body = responses.parse_request(raw)
        messages = None if body.get("previous_response_id") else responses.conversation_messages(body)
        continued = await _continued(writer, sessions, body)
    else:
        body = protocol.parse_request(operation, raw)
        messages = body.get("messages") if operation == protocol.CHAT else None
    target = found.target(body["model"])
    call = Call(operation, body, raw, TraceIds.new(request.headers.get("traceparent")), target, started=started)
    call.session_id, call.session_source, conversation = sessions.attribute(
        header=request.headers.get(SESSION_HEADER),
        path=request.match_info.get("session"),
        trace_id=call.ids.trace_id if call.ids.parent_span_id else None,
        continued=continued,
        messages=messages,
    )
    recorded = None
    if call.session_source in NAMED_SESSION_SOURCES and not sessions.is_known(call.session_id):
        record = await writer.read(queries.session_record, call.session_id)
        recorded = (record[0], record[1] or call.start_time) if record else None
    await writer.reserve()  # from here on, the finally clause submits the call: its place is always given back
    try:
        with failures_recorded(call):
            call.turn_index = sessions.begin(call.session_id, recorded, now=call.start_time)
            sessions.remember_call(call.ids.span_id, None, call.session_id)
            request.app[MEMORY].inject(call)
            if target == POLICY:
                return await _forward_to_policy(request, call, found)
            if target == UPSTREAM:
                assert found.upstream is not None
                return await forward(request, call, found.upstream, request.app[CONFIG])
            return await providers.forward(request, call, target, request.app[CONFIG])
    finally:
        call.end()
        writer.submit(call.settled())
        sessions.finish(call.session_id, conversation, call.replies())
        response_id = call.response.get("id") if call.response else None
        sessions.remember_call(call.ids.span_id, response_id, call.session_id)
        if target == POLICY and SAMPLER in request.app:
            request.app[SAMPLER].after(call, request.headers)  # in the background, once the answer is complete


async def _forward_to_policy(request: web.Request, call: Call, found: Backends) -> web.StreamResponse:
    policy = found.require_policy()
    replica, version = await policy.acquire(call.session_id)
    call.adapter_version = version.version
    try:
        return await forward(request, call, replica.upstream, request.app[CONFIG], model=version.served_name)
    finally:
        policy.release(replica, version)


async def _continued(writer: Writer, sessions: Sessions, body: dict[str, Any]) -> tuple[str, str] | None:
    """The session a Responses call continues, and how it is known: the session of the response named by
    ``previous_response_id`` (recent calls in memory, else the store), else its ``conversation`` id."""
    previous = body.get("previous_response_id")
    if previous:
        found: tuple[str, str | None] | None = sessions.find_call(previous)
        if found is None:
            await writer.flush()
            found = await writer.read(lambda con: queries.find_call(con, response_id=previous))
        if found is not None and found[1] is not None:
            return found[1], "previous_response"
    conversation = items.conversation_id(body)
    return (conversation, "conversation") if conversation else None


async def models(request: web.Request) -> web.Response:
    """The backend's models, then the names the sidecar routes elsewhere (routes, provider models)."""
    found = request.app[BACKENDS]
    listed: list[dict[str, Any]] = []
    upstream = None
    if found.serves_policy:
        replica = next((r for r in found.require_policy().replicas if r.usable()), None)
        if replica is None:
            raise BackendUnavailable("Every model replica is reloading weights.", headers={"Retry-After": "5"})
        upstream = replica.upstream
    elif found.upstream is not None:
        upstream = found.upstream
    if upstream is not None:
        headers = upstream.headers(request.headers, traceparent=TraceIds.new(None).traceparent)
        try:
            async with upstream.session.get(upstream.url("/models"), headers=headers) as resp:
                content = await resp.read()
                if resp.status != 200:
                    return web.Response(body=content, status=resp.status, headers=response_headers(resp.headers))
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"Could not reach the upstream: {exc}.") from None
        try:
            listed = [m for m in orjson.loads(content).get("data") or () if isinstance(m, dict)]
        except (orjson.JSONDecodeError, AttributeError):
            raise UpstreamError("The upstream's model list is not an OpenAI list object.") from None
    known = {m.get("id") for m in listed}
    for name, target in [*found.routes.items(), *((p, p) for p in found.providers)]:
        if name not in known:
            known.add(name)
            listed.append({"id": name, "object": "model", "created": 0, "owned_by": f"lightwire:{target}"})
    return json_response({"object": "list", "data": listed})


def store_health(app: web.Application) -> dict[str, Any]:
    """The store's part of ``/healthz`` and ``/readyz``: its counts, or a 503 saying why it cannot write."""
    writer = app[WRITER]
    if writer.problem is not None:
        raise StoreError(f"The store cannot write: {writer.problem}", headers={"Retry-After": "5"})
    return {
        "spans_written": writer.written,
        "spans_pending": writer.pending,
        "rows_rejected": writer.rejected,
        "writer_restarts": writer.restarts,
        "writer_catch_ups": writer.catch_ups,
        "store_reattached": writer.reattached,
        "store_memory_mb": {tag: round(used / 2**20, 1) for tag, used in writer.memory.items()},
    }


async def healthz(request: web.Request) -> web.Response:
    """Liveness, and what is being served: 200 while the process works, 503 while its store cannot write."""
    found = request.app[BACKENDS]
    body: dict[str, Any] = {"status": "ok", **store_health(request.app)}
    body["loop"] = request.app[LOOP_WATCH].report()
    if HOOKS in request.app:
        body["hooks"] = request.app[HOOKS].stats()
    if SHIPPER in request.app:
        body["share"] = request.app[SHIPPER].stats()
    if found.serves_policy:
        state = found.policy_state()
        body["policy"] = {"state": state, "ready": state == "ready", "problem": found.problem}
        if found.policy is not None:
            policy = found.policy
            body["policy"] |= {
                "mode": policy.mode,
                "base": policy.base.served_name,
                "active": policy.active.label,
                "canary": policy.canary.label if policy.canary else None,
                "canary_fraction": policy.canary_fraction,
            }
    explorer = request.app[SAMPLER].explorer if SAMPLER in request.app else None
    if explorer is not None:
        body["explore"] = explorer.stats()
    memory = request.app[MEMORY]
    body["memory"] = {
        "routes": sorted(memory.routes),
        "active": memory.label,
        "canary": memory.canary.version if memory.canary else None,
        "canary_fraction": memory.canary_fraction,
    }
    return json_response(body)


async def readyz(request: web.Request) -> web.Response:
    """200 once calls can be served, else 503 saying why: for orchestrators and scripts that wait for the model."""
    store_health(request.app)
    found = request.app[BACKENDS]
    if found.serves_policy:
        found.require_policy()
    return json_response({"status": "ready"})
