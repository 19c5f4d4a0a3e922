"""Where calls go: the learning policy on vLLM, a plain OpenAI-compatible upstream, and the routes between them.

* With neither ``--upstream`` nor ``--vllm``, Lightwire serves its embedded default: it prepares
  SmolLM2-135M-Instruct once (or serves ``--model-dir``) and runs vLLM as a supervised child process.
* ``--vllm URL`` (repeatable) serves the policy from vLLM servers that run elsewhere, one per replica.

Either way the policy starts in the background: the proxy listens at once, and until the policy can serve a call
``/readyz`` and every call routed to it answer 503 with ``Retry-After``, naming the stage it is in
(:attr:`Backends.stage`: preparing the model, starting vLLM, waiting for a ``--vllm`` server, ...).
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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from optimizers.embedded import DEFAULT_MODEL_NAME, prepare_default_model
from proxy import http1, providers
from proxy.config import Config
from proxy.errors import BackendUnavailable, ConfigError, InvalidRequest, NotFound
from proxy.fleet import apply, follow, open_share
from proxy.policy import Policy, Replica, Version
from proxy.publish import Publisher, PublishFailed
from proxy.upstream import Upstream, clients
from proxy.vllm_server import VllmOptions, VllmServer
from store import adapters as registry
from store.share import read_registry
from store.writer import Writer

log = logging.getLogger(__name__)

POLICY = "policy"
UPSTREAM = "upstream"
HEALTH_INTERVAL_S = 5.0
#: How long to wait before asking a ``--vllm`` server that does not answer again: doubled up to the maximum.
ATTACH_RETRY_S = 1.0
ATTACH_RETRY_MAX_S = 10.0
RETRY_AFTER_S = "5"

#: Called with the policy after every change the publisher makes (the learner writes the share's registry).
OnPublish = Callable[[Policy], Awaitable[None]]


@dataclass
class Backends:
    session: aiohttp.ClientSession
    pool: http1.Pool
    upstream: Upstream | None = None
    policy: Policy | None = None
    publisher: Publisher | None = None
    routes: dict[str, str] = field(default_factory=dict)
    providers: tuple[str, ...] = ()  # litellm model names
    serves_policy: bool = False  # a policy is configured; it may still be starting (``policy`` is None until then)
    stage: str = "starting"  # what the policy is doing while it cannot serve: preparing the model, starting vLLM...
    problem: str | None = None  # why the policy will not serve at all, when it will not
    follows: str | None = None  # the share whose registry this sidecar routes by (fleet mode: no publisher here)

    def target(self, model: str) -> str:
        """Where a requested model name goes: ``policy``, ``upstream``, or a provider model."""
        target = self.routes.get(model)
        if target is None:
            target = model if model in self.providers else POLICY if self.serves_policy else UPSTREAM
        unavailable = (target == POLICY and not self.serves_policy) or (target == UPSTREAM and self.upstream is None)
        if unavailable or target not in (POLICY, UPSTREAM, *self.providers):
            raise NotFound(
                f"The model {model!r} is routed to {target}, which this sidecar does not run.", param="model"
            )
        return target

    async def complete(self, body: dict[str, Any]) -> tuple[int, Any]:
        """One chat completion through the route ``body``'s model goes to, as a call would get it but recorded
        nowhere (a memory run's offline replays; an :class:`optimizers.ports.Completing`): status and body. A
        provider model is asked through litellm, as its calls are: it is no OpenAI-compatible URL but a provider's
        own API, keys and errors."""
        target = self.target(body["model"])
        if target == UPSTREAM:
            assert self.upstream is not None
            return await self.upstream.complete(body)
        if target != POLICY:
            fields = {k: v for k, v in body.items() if k not in ("model", "messages")}
            return 200, await providers.complete(target, body["messages"], **fields)
        policy = self.require_policy()
        replica, served = await policy.acquire(None)
        try:
            return await replica.upstream.complete({**body, "model": served.served_name})
        finally:
            policy.release(replica, served)

    def policy_state(self) -> str:
        """``ready`` when the policy can take a call now, else what it is doing or what went wrong."""
        if self.problem is not None:
            return self.problem
        if self.policy is None or not self.policy.ready():
            return self.stage
        return "ready"

    def require_policy(self) -> Policy:
        """The policy, ready for a call; else a 503 with ``Retry-After`` that says why it is not."""
        state = self.policy_state()
        if state != "ready" or self.policy is None:
            raise BackendUnavailable(
                f"The model cannot take calls yet: {state}. Try again shortly.", headers={"Retry-After": RETRY_AFTER_S}
            )
        return self.policy

    def require_publisher(self) -> Publisher:
        if self.follows is not None:
            raise InvalidRequest(
                f"This sidecar follows the registry in {self.follows}: its learner (lightwire learn) publishes."
            )
        if self.publisher is None:
            raise BackendUnavailable(
                "Adapters need the policy backend, which is not ready (or not configured).",
                headers={"Retry-After": "5"},
            )
        return self.publisher


BACKENDS = web.AppKey("backends", Backends)


@contextlib.asynccontextmanager
async def backends(config: Config, writer: Writer, *, on_publish: OnPublish | None = None) -> AsyncIterator[Backends]:
    """Everything calls are forwarded to, for the app's lifetime. With a share and no ``on_publish`` (a fleet's
    sidecar), the policy follows the share's registry instead of publishing versions itself."""
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
                forward_client_auth=True,  # an agent's own provider key passes through; Lightwire's keys never
                own_keys=(*config.api_keys, *([config.admin_key] if config.admin_key else [])),
            )
        serve = _serve_attached if config.vllm else _serve_embedded
        found.serves_policy = bool(config.vllm) or not (config.upstream or config.provider_models)
        if not found.serves_policy:
            yield found
            return
        serving = asyncio.create_task(_serve_policy(serve(config, writer, found, on_publish), found))
        try:
            yield found
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving


async def _serve_policy(serve: Coroutine[None, None, None], found: Backends) -> None:
    """Run the policy's start-up and serving in the background; a failure is told by /healthz and every call."""
    try:
        await serve
    except Exception as exc:
        found.problem = f"the policy could not be served: {exc}"
        log.exception("the policy could not be served; calls to it get 503")


async def _serve_attached(config: Config, writer: Writer, found: Backends, on_publish: OnPublish | None) -> None:
    """The policy on vLLM servers that run elsewhere (the production sidecar): watched, never started here."""
    ready = dict.fromkeys(config.vllm, False)  # a replica takes calls once it serves the policy's versions
    replicas = {
        url: Replica(
            Upstream(
                url, found.session, found.pool, api_key=config.upstream_api_key, capture_tokens=config.capture_tokens
            ),
            lambda url=url: ready[url],  # type: ignore[misc]
        )
        for url in config.vllm
    }
    base_name = await _wait_for_base_name(found, replicas[config.vllm[0]].upstream)
    mode = "lora" if config.swap_mode == "auto" else config.swap_mode
    policy = Policy(list(replicas.values()), base=Version(None, base_name), mode=mode)
    if config.share and on_publish is None:
        await _follow(config, found, policy, replicas, ready)
        return
    found.stage = "loading the served versions into vLLM"
    publisher = await _publisher(config, writer, found, policy, base_dir=config.model_dir, on_publish=on_publish)
    found.policy = policy  # not ready until a replica serves the active version: calls and /readyz get 503
    await _watch_replicas(found, policy, replicas, ready, publisher)


async def _follow(
    config: Config, found: Backends, policy: Policy, replicas: dict[str, Replica], ready: dict[str, bool]
) -> None:
    """A fleet's sidecar: route as the share's registry says (read before the first call), watch the replicas."""
    share = open_share(config)
    found.stage = f"reading the registry in {config.share}"
    found.follows = config.share
    registry = await asyncio.to_thread(read_registry, share)
    if registry is not None:
        apply(policy, registry)
    found.policy = policy
    log.info("following %s: serving %s", config.share, policy.active.label)
    await asyncio.gather(
        follow(share, policy, config.share_poll), _watch_replicas(found, policy, replicas, ready, publisher=None)
    )


NO_REPLICA = "no vLLM replica is ready (not answering its health check, or being restored)"


async def _watch_replicas(
    found: Backends,
    policy: Policy,
    replicas: dict[str, Replica],
    ready: dict[str, bool],
    publisher: Publisher | None,
) -> None:
    """Check every ``--vllm`` replica every few seconds and keep ``ready`` (whether it takes calls) up to date."""
    while True:
        for url, replica in replicas.items():
            ready[url] = await _keep_serving(found.session, publisher, replica, was_ready=ready[url])
        if any(ready.values()) and found.stage != NO_REPLICA:
            found.stage = NO_REPLICA  # what it means once the policy has been ready
            log.info("the policy is ready: serving %s", policy.active.label)
        await asyncio.sleep(HEALTH_INTERVAL_S)


async def _keep_serving(
    session: aiohttp.ClientSession, publisher: Publisher | None, replica: Replica, *, was_ready: bool
) -> bool:
    """Whether a ``--vllm`` replica can take calls; one that comes back (restarted with the base weights and no
    adapters) or lost an adapter gets the served versions again first (idempotent). A fleet's follower (no
    publisher) only checks health: the learner loads the versions into every replica."""
    try:
        async with session.get(
            replica.root_url + "/health", timeout=aiohttp.ClientTimeout(total=HEALTH_INTERVAL_S)
        ) as resp:
            if resp.status != 200:
                return False
        if publisher is None or (was_ready and not replica.stale and await publisher.serves_routed(replica)):
            return True
        await publisher.restore(replica)
    except (aiohttp.ClientError, TimeoutError, PublishFailed) as exc:
        if was_ready or isinstance(exc, PublishFailed):
            log.warning("the vLLM replica at %s cannot take calls: %s", replica.root_url, exc)
        return False
    if was_ready:
        log.warning("the vLLM replica at %s had lost its served versions: loaded them again", replica.root_url)
    return True


async def _wait_for_base_name(found: Backends, upstream: Upstream) -> str:
    """The base model a ``--vllm`` server serves, asked until it answers (it may start after the sidecar)."""
    delay = ATTACH_RETRY_S
    while True:
        found.stage = f"waiting for the vLLM server at {upstream.base_url}"
        try:
            return await _served_base_name(upstream)
        except BackendUnavailable as exc:
            log.warning("%s; asking again in %.0f s", exc.message, delay)
        await asyncio.sleep(delay)
        delay = min(2 * delay, ATTACH_RETRY_MAX_S)


async def _serve_embedded(config: Config, writer: Writer, found: Backends, on_publish: OnPublish | None) -> None:
    if config.model_dir is None:
        found.stage = "preparing the model"
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
    policy = found.policy = Policy([replica], base=Version(None, name), mode=mode)  # ready when vLLM is
    publisher = await _publisher(config, writer, found, policy, base_dir=model_dir, on_publish=on_publish)
    found.stage = "starting vLLM"
    log.info("starting vLLM for %s (%s swap mode); calls get 503 until it is ready", name, mode)
    async with server.running(wait_ready=False):
        await server.wait_ready()
        found.stage = "vLLM is restarting"  # what it means once the policy has been ready
        log.info("the policy is ready: serving %s", policy.active.label)
        await asyncio.Event().wait()  # until cancelled at shutdown


async def _publisher(
    config: Config,
    writer: Writer,
    found: Backends,
    policy: Policy,
    *,
    base_dir: Path | None,
    on_publish: OnPublish | None,
) -> Publisher:
    async def save(adapter: registry.Adapter) -> None:
        await writer.reserve()
        writer.submit(adapter)
        if on_publish is not None:
            await on_publish(policy)

    def load() -> list[registry.Adapter]:
        with writer.cursor() as con:
            return registry.load_all(con)

    publisher = Publisher(
        policy,
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


async def _served_base_name(upstream: Upstream) -> str:
    try:
        async with upstream.session.get(
            upstream.url("/models"), headers=upstream.auth(), timeout=aiohttp.ClientTimeout(total=30)
        ) as resp:
            if resp.status in (401, 403):  # vLLM's --api-key is not upstream_api_key
                text = (await resp.text())[:200]
                raise ConfigError(
                    f"the vLLM server at {upstream.base_url} refused upstream_api_key ({resp.status}: {text})"
                )
            models = (await resp.json())["data"]
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
        raise BackendUnavailable(f"cannot list the models of the vLLM server at {upstream.base_url}: {exc}") from None
    bases = [m["id"] for m in models if not m.get("parent")]
    if not bases:
        raise ConfigError(f"the vLLM server at {upstream.base_url} serves no base model")
    return str(bases[0])
