"""Where calls go: the learning policy on vLLM, a plain OpenAI-compatible upstream, and the routes between them.

* With neither ``--upstream`` nor ``--vllm``, Lightwire serves its embedded default: it prepares
  SmolLM2-135M-Instruct once (or serves ``--model-dir``) and runs vLLM as a supervised child process. The proxy
  listens at once and answers 503 with ``Retry-After`` until the model is ready.
* ``--vllm URL`` (repeatable) serves the policy from vLLM servers that run elsewhere, one per replica.
* ``--upstream URL`` forwards to any OpenAI-compatible server, untouched.
* ``--provider-model NAME`` (repeatable) makes a litellm model callable, e.g. ``openai/gpt-4o-mini``.

Routes map the model name an agent asks for to a target (``--route gpt-4o-mini=policy``), so agent code keeps
its model name. Without a route, a provider model's own name reaches it, and other calls go to the policy when
there is one, else to the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from optimizers.publish import Publisher
from proxy import http1
from proxy.config import Config
from proxy.embedded import DEFAULT_MODEL_NAME, prepare_default_model
from proxy.errors import BackendUnavailable, ConfigError, NotFound
from proxy.policy import Policy, Replica, Version
from proxy.upstream import Upstream, clients
from proxy.vllm_server import VllmOptions, VllmServer
from store import adapters as registry
from store.writer import Writer

log = logging.getLogger(__name__)

POLICY = "policy"
UPSTREAM = "upstream"
HEALTH_INTERVAL_S = 5.0


@dataclass
class Backends:
    session: aiohttp.ClientSession
    pool: http1.Pool
    upstream: Upstream | None = None
    policy: Policy | None = None
    publisher: Publisher | None = None
    routes: dict[str, str] = field(default_factory=dict)
    providers: tuple[str, ...] = ()  # litellm model names
    problem: str | None = None  # why the policy cannot serve, when it cannot

    def target(self, model: str) -> str:
        """Where a requested model name goes: ``policy``, ``upstream``, or a provider model."""
        target = self.routes.get(model)
        if target is None:
            target = model if model in self.providers else POLICY if self.policy is not None else UPSTREAM
        unavailable = (target == POLICY and self.policy is None) or (target == UPSTREAM and self.upstream is None)
        if unavailable or target not in (POLICY, UPSTREAM, *self.providers):
            raise NotFound(
                f"The model {model!r} is routed to {target}, which this sidecar does not run.", param="model"
            )
        return target

    def require_publisher(self) -> Publisher:
        if self.publisher is None:
            raise BackendUnavailable(
                "Adapters need the policy backend, which is not ready (or not configured).",
                headers={"Retry-After": "5"},
            )
        return self.publisher


BACKENDS = web.AppKey("backends", Backends)


@contextlib.asynccontextmanager
async def backends(config: Config, writer: Writer) -> AsyncIterator[Backends]:
    """Everything calls are forwarded to, for the app's lifetime."""
    async with clients(config) as (session, pool):
        found = Backends(
            session, pool, routes=dict(r.split("=", 1) for r in config.routes), providers=config.provider_models
        )
        if config.upstream:
            found.upstream = Upstream(
                config.upstream,
                session,
                pool,
                api_key=config.upstream_api_key,
                capture_tokens=config.capture_tokens,
                forward_client_auth=not config.api_keys,
            )
        async with contextlib.AsyncExitStack() as stack:
            if config.vllm:
                await stack.enter_async_context(_attached_policy(config, writer, found))
            elif not config.upstream and not config.provider_models:
                await stack.enter_async_context(_embedded_policy(config, writer, found))
            yield found


@contextlib.asynccontextmanager
async def _attached_policy(config: Config, writer: Writer, found: Backends) -> AsyncIterator[None]:
    """The policy on vLLM servers that run elsewhere (the production sidecar): watched, never started here."""
    healthy: dict[str, bool] = {}
    replicas = []
    for url in config.vllm:
        upstream = Upstream(url, found.session, found.pool, capture_tokens=config.capture_tokens)
        healthy[url] = True
        replicas.append(Replica(upstream, lambda url=url: healthy[url]))  # type: ignore[misc]
    base_name = await _served_base_name(found.session, config.vllm[0])
    mode = "lora" if config.swap_mode == "auto" else config.swap_mode
    found.policy = Policy(replicas, base=Version(None, base_name), mode=mode)
    found.publisher = await _publisher(config, writer, found, base_dir=config.model_dir)
    for replica in replicas:
        await found.publisher.restore(replica)
    watcher = asyncio.create_task(_watch_health(found.session, healthy))
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


@contextlib.asynccontextmanager
async def _embedded_policy(config: Config, writer: Writer, found: Backends) -> AsyncIterator[None]:
    """The embedded default: prepare the model and run vLLM as a child, in the background."""
    starting = asyncio.create_task(_run_embedded(config, writer, found))
    yield
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting


async def _run_embedded(config: Config, writer: Writer, found: Backends) -> None:
    try:
        await _serve_embedded(config, writer, found)
    except Exception as exc:
        found.problem = f"the embedded model could not be served: {exc}"
        log.exception("the embedded model could not be served; calls get 503")
        raise


async def _serve_embedded(config: Config, writer: Writer, found: Backends) -> None:
    if config.model_dir is None:
        log.info("preparing the embedded model %s (once; about 30 s the first time)", DEFAULT_MODEL_NAME)
        model_dir = await asyncio.to_thread(prepare_default_model, config.cache_dir)
        name = DEFAULT_MODEL_NAME
    else:
        model_dir, name = config.model_dir, config.model_dir.name
    mode = config.swap_mode if config.swap_mode != "auto" else ("lora" if shutil.which("nvidia-smi") else "merged")
    options = VllmOptions(
        model_dir=model_dir,
        served_model_name=name,
        log_path=config.cache_dir / "vllm.log",
        max_lora_rank=config.max_lora_rank,
        kv_cache_space_gib=config.vllm_kv_cache_gib,
    )
    # A restarted server comes back with the base weights: the publisher loads the served versions again first.
    server = VllmServer(options, on_start=lambda _: publisher.restore(replica))
    replica = Replica(
        Upstream(lambda: server.base_url + "/v1", found.session, found.pool, capture_tokens=config.capture_tokens),
        lambda: server.ready,
    )
    policy = found.policy = Policy([replica], base=Version(None, name), mode=mode)
    publisher = await _publisher(config, writer, found, base_dir=model_dir)
    log.info("starting vLLM for %s (%s swap mode); calls get 503 until it is ready", name, mode)
    async with server.running(wait_ready=False):
        await server.wait_ready()
        log.info("the policy is ready: serving %s", policy.active.label)
        await asyncio.Event().wait()  # until cancelled at shutdown


async def _publisher(config: Config, writer: Writer, found: Backends, *, base_dir: Path | None) -> Publisher:
    assert found.policy is not None

    async def save(adapter: registry.Adapter) -> None:
        await writer.reserve()
        writer.submit(adapter)

    def load() -> list[registry.Adapter]:
        with writer.cursor() as con:
            return registry.load_all(con)

    publisher = Publisher(
        found.policy,
        found.session,
        adapters_dir=config.adapters_dir.resolve(),
        base_dir=base_dir,
        max_rank=config.max_lora_rank,
        drain_timeout=config.swap_drain_timeout,
        save=save,
        adapters=await asyncio.to_thread(load),
    )
    publisher.resume()
    found.publisher = publisher
    return publisher


async def _served_base_name(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.get(url.rstrip("/") + "/models", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            models = (await resp.json())["data"]
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot list the models of the vLLM server at {url}: {exc}") from None
    bases = [m["id"] for m in models if not m.get("parent")]
    if not bases:
        raise ConfigError(f"the vLLM server at {url} serves no base model")
    return str(bases[0])


async def _watch_health(session: aiohttp.ClientSession, healthy: dict[str, bool]) -> None:
    while True:
        for url in healthy:
            try:
                async with session.get(
                    url.rstrip("/").removesuffix("/v1") + "/health",
                    timeout=aiohttp.ClientTimeout(total=HEALTH_INTERVAL_S),
                ) as resp:
                    healthy[url] = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                healthy[url] = False
        await asyncio.sleep(HEALTH_INTERVAL_S)
