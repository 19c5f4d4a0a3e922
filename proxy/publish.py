"""Publishing adapter versions into vLLM with no call dropped, and taking them back.

Every step talks to vLLM over its HTTP API only:

* **register**: check the folder (``optimizers.checks``), copy it into the adapters directory under a new
  version name (``v1``, ``v2``... never reused, so a name always means the same weights), record it as a
  candidate.
* **activate**, ``lora`` mode: load it into every replica under ``lw-<version>-<hash of its weights>`` (two
  sidecars sharing a vLLM never mix up their ``v1``s), check that each lists it and
  answers a one-token request with it, then switch routing at once. The version it replaces stays loaded (for a
  fast rollback); older ones are unloaded once their last call has finished.
* **activate**, ``merged`` mode: merge it into its parent's weights in a separate process, then, replica by
  replica is not enough for a clean record, so for all replicas together: close their gates (new calls wait),
  let running calls finish (bounded by ``swap_drain_timeout``), reload the weights (``/collective_rpc
  reload_weights``, ~0.2 s), clear the prefix cache, probe each replica (one token, finite logprob), switch
  routing, open the gates. If any replica fails, every replica gets the weights it served before: replicas never
  serve different weights under one label. One that cannot even get those back is ``stale`` (no calls) until
  restored.
* **canary**: load as a LoRA adapter and route a fraction of sessions to it.
* **rollback**: return to the previous active version (LoRA: switch back; merged: reload its weights).

A failure at any step leaves the current version serving and marks the candidate ``failed`` with the reason.
After a vLLM restart, :meth:`Publisher.restore` loads the active version again before the server takes calls;
it may be repeated (a Lightwire restarted while vLLM still holds its adapters): an adapter's name always means the
same weights, so one already loaded under that name is the one wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from optimizers.checks import CONFIG_FILE, WEIGHTS_FILE, AdapterRejected, base_linear_modules, check_adapter
from proxy.errors import HTTPError, InvalidRequest, NotFound, UpstreamError
from proxy.policy import Policy, Replica, Version
from store.adapters import Adapter, new_adapter

log = logging.getLogger(__name__)
T = TypeVar("T")

VLLM_TIMEOUT = aiohttp.ClientTimeout(total=120)
# The canary request a version must answer before it gets calls: one token for a one-token prompt. Through a LoRA
# on vLLM-CPU prefill costs ~5 ms a token: a chat "Hi" (its template adds ~30 tokens) took 218 ms, this one 90 ms.
# Its logprob must be finite: weights that overflowed give NaN.
PROBE = {"prompt": "Hi", "max_tokens": 1, "temperature": 0, "logprobs": 1}


class PublishFailed(UpstreamError):
    """A version could not be put into service; the current one still serves."""


class Publisher:
    def __init__(
        self,
        policy: Policy,
        session: aiohttp.ClientSession,
        *,
        adapters_dir: Path,
        base_dir: Path | None,
        max_rank: int,
        drain_timeout: float,
        save: Callable[[Adapter], Awaitable[None]],
        adapters: list[Adapter],
    ) -> None:
        self.policy = policy
        self.session = session
        self.adapters_dir = adapters_dir
        self.base_dir = base_dir
        self.max_rank = max_rank
        self.drain_timeout = drain_timeout
        self._save = save
        self.adapters = {a.version: a for a in adapters}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._loaded: set[str] = set()  # LoRA names loaded into the replicas
        self._base_modules = base_linear_modules(base_dir) if base_dir else None

    # -- what the optimizer reads (optimizers.ports.Publishing) -----------------------------------------------

    @property
    def active(self) -> Version:
        return self.policy.active

    @property
    def mode(self) -> str:
        return self.policy.mode

    async def complete(self, body: dict[str, Any]) -> tuple[int, Any]:
        """One chat completion from a replica that serves now (the offline evaluation's replays)."""
        replica = next(r for r in self.policy.replicas if r.usable())
        return await replica.upstream.complete(body)

    # -- the admin operations ---------------------------------------------------------------------------------

    async def register(
        self, path: Path, *, parent: str | None = None, algorithm: str | None = None, data: dict[str, Any] | None = None
    ) -> Adapter:
        """Check an adapter folder and record it as a candidate under a new version name."""
        try:
            await asyncio.to_thread(check_adapter, path, max_rank=self.max_rank, base_modules=self._base_modules)
        except AdapterRejected as exc:
            raise InvalidRequest(str(exc), param="path") from None
        if parent is not None:
            self._get(parent)
        async with self._lock:
            version = f"v{len(self.adapters) + 1}"
            folder = self.adapters_dir / version / "adapter"
            digest = await asyncio.to_thread(_copy_folder, path, folder)
            adapter = new_adapter(
                version,
                str(folder),
                lora_name=f"lw-{version}-{digest[:8]}",
                parent=parent or self.policy.active.version,
                algorithm=algorithm or "registered",
                data=data,
            )
            await self._record(adapter)
        return adapter

    async def activate(self, version: str) -> Adapter:
        async with self._lock:
            adapter = self._get(version)
            if self.policy.active.version == version:
                return adapter
            if self.policy.mode == "merged":
                target = await self._guarded(adapter, self._merge(adapter))
                await self._guarded(adapter, self._reload_all(target.merged_path, lambda: self.policy.activate(target)))
                canary = self.policy.stop_canary()  # a canary adapter was trained on the weights just replaced
                if canary is not None:
                    await self._set_status(canary.version, "candidate", "its base weights were replaced")
                # Served merged now: its LoRA form (loaded to be evaluated) is no longer needed.
                self._unload_later([self._version(adapter, as_lora=True), *([canary] if canary else [])])
            else:
                target = await self._guarded(adapter, self._load_lora(adapter))
                self.policy.activate(target)
            self._retire_later()
            previous = self.policy.history[-1]
            await self._set_status(previous.version, "retired", f"replaced by {version}")
            return await self._record(adapter.with_status("active", merged_path=_str(target.merged_path)))

    async def start_canary(self, version: str, fraction: float) -> Adapter:
        if not 0 < fraction <= 1:
            raise InvalidRequest("fraction must be in (0, 1].", param="fraction")
        async with self._lock:
            adapter = self._get(version)
            target = await self._guarded(adapter, self._load_lora(adapter))
            previous = self.policy.canary
            self.policy.start_canary(target, fraction)
            if previous is not None and previous.version != version:
                await self._set_status(previous.version, "candidate", "replaced by another canary")
            return await self._record(adapter.with_status("canary"))

    async def load_candidate(self, version: str) -> Version:
        """Load a version as a LoRA adapter into every replica without routing any session to it (to evaluate)."""
        async with self._lock:
            adapter = self._get(version)
            return await self._guarded(adapter, self._load_lora(adapter))

    async def reject(self, version: str, reason: str) -> None:
        """Take a candidate (or canary) out of service for good: it is retired with the reason."""
        async with self._lock:
            adapter = self._get(version)
            if self.policy.canary is not None and self.policy.canary.version == version:
                self.policy.stop_canary()
            self._unload_later([self._version(adapter, as_lora=True)])
            await self._record(adapter.with_status("retired", reason))

    async def rollback(self) -> dict[str, Any]:
        """Stop a running canary, or else return to the previous active version."""
        async with self._lock:
            canary = self.policy.stop_canary()
            if canary is not None:
                await self._set_status(canary.version, "retired", "canary rolled back")
                return {"rolled_back": canary.label, "active": self.policy.active.label}
            if not self.policy.history:
                raise InvalidRequest("There is no earlier version to roll back to.")
            previous = self.policy.history[-1]
            if self.policy.mode == "merged":
                left, _ = await self._reload_all(previous.merged_path, self.policy.roll_back)
            else:
                if previous.version is not None:  # it may have been unloaded since: load it again first
                    await self._load_lora(self._get(previous.version))
                left, _ = self.policy.roll_back()
                self._unload_later([left])
            await self._set_status(left.version, "retired", "rolled back")
            if previous.version is not None:
                await self._set_status(previous.version, "active", None)
            return {"rolled_back": left.label, "active": self.policy.active.label}

    async def restore(self, replica: Replica) -> None:
        """Bring a freshly (re)started replica to the served versions (merged weights, loaded adapters) and check
        that it answers with each version that gets calls. Safe to repeat on a replica that has them already."""
        async with self._lock:
            active = self.policy.active
            if active.merged_path is not None:
                await self._reload(replica, active.merged_path)
            for version in self._served():
                if version is not None and version.lora_path is not None:
                    await self._load_into(replica, version.served_name, str(version.lora_path))
            for version in {active, self.policy.canary}:
                if version is not None and version.version is not None:  # the base needs nothing loaded
                    await self._probe(replica, version.served_name)
            replica.stale = False

    async def serves_routed(self, replica: Replica) -> bool:
        """Whether a replica lists every adapter that calls are routed to (a restarted vLLM lists none)."""
        names = {v.served_name for v in (self.policy.active, self.policy.canary) if v is not None and v.lora_path}
        if not names:
            return True
        models = await self._vllm(replica, "/v1/models", None, method="GET")
        return names <= {m.get("id") for m in models.get("data", [])}

    def resume(self) -> None:
        """Serve what the registry says was active when Lightwire last stopped (before any replica starts)."""
        for adapter in self.adapters.values():
            if adapter.status == "active":
                self.policy.activate(self._version(adapter))

    # -- steps ------------------------------------------------------------------------------------------------

    async def _load_lora(self, adapter: Adapter) -> Version:
        target = self._version(adapter, as_lora=True)
        loaded = []
        try:
            for replica in self.policy.replicas:
                await self._load_into(replica, target.served_name, adapter.path)
                loaded.append(replica)
                await self._check_serves(replica, target.served_name)
        except BaseException:
            for replica in loaded:
                await self._unload(replica, target.served_name)
            raise
        self._loaded.add(target.served_name)
        return target

    async def _load_into(self, replica: Replica, name: str, folder: str) -> None:
        """Load a LoRA into one replica (idempotent). A folder that lost its files since it was checked (deleted by
        hand, a cleaned temporary folder) never reaches vLLM, which would answer only "No adapter found for
        <path>"."""
        missing = [file for file in (CONFIG_FILE, WEIGHTS_FILE) if not (Path(folder) / file).is_file()]
        if missing:
            raise PublishFailed(f"{folder} has lost {' and '.join(missing)}: vLLM is not asked to load it")
        await self._vllm(replica, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder}, exists_ok=True)

    async def _merge(self, adapter: Adapter) -> Version:
        if self.base_dir is None:
            raise PublishFailed("merged mode needs the base model folder (--model-dir) on this machine")
        parent = self.adapters.get(adapter.parent or "")
        base = Path(parent.merged_path) if parent is not None and parent.merged_path else self.base_dir
        out = self.adapters_dir / adapter.version / "merged"
        if not (out / "config.json").is_file():
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "optimizers.merge",
                "--base",
                str(base),
                "--adapter",
                adapter.path,
                "--out",
                str(out),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await proc.communicate()
            if proc.returncode != 0:
                raise PublishFailed(f"merging {adapter.version} failed: {output.decode()[-2000:]}")
        return Version(adapter.version, self.policy.base.served_name, merged_path=out)

    async def _reload_all(self, weights: Path | None, switch: Callable[[], T]) -> T:
        """Swap every replica's weights (None: the base model's) with no call lost, then ``switch`` routing."""
        weights = weights or self.base_dir
        if weights is None or not (weights / "config.json").is_file():
            # vLLM's reload_weights leaves a half-loaded model behind when the folder is not a model.
            raise PublishFailed(f"{weights} is not a model folder")
        replicas = self.policy.replicas
        for replica in replicas:
            replica.open.clear()  # new calls wait at the gate
        try:
            with contextlib.suppress(TimeoutError):  # past the bound, calls still running see the new weights
                async with asyncio.timeout(self.drain_timeout):
                    await asyncio.gather(*(r.idle.wait() for r in replicas))
            touched: list[Replica] = []
            try:
                for replica in replicas:
                    touched.append(replica)  # a reload that fails may have loaded part of the weights
                    await self._reload(replica, weights)
                    await self._probe(replica, self.policy.base.served_name)
            except PublishFailed:
                await self._put_back(touched)
                raise
            return switch()
        finally:
            for replica in replicas:
                replica.open.set()

    async def _put_back(self, replicas: list[Replica]) -> None:
        """Reload the weights served now into replicas that a failed reload touched; mark stale those that fail."""
        weights = self.policy.active.merged_path or self.base_dir
        assert weights is not None  # _reload_all checked that there is a base folder
        for replica in replicas:
            try:
                await self._reload(replica, weights)
                await self._probe(replica, self.policy.base.served_name)
            except PublishFailed as exc:
                replica.stale = True
                log.error(
                    "%s is out of service until restored: its weights could not be put back: %s", replica.root_url, exc
                )

    async def _reload(self, replica: Replica, weights: Path) -> None:
        await self._vllm(
            replica, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(weights)}}
        )
        await self._vllm(replica, "/reset_prefix_cache", None)

    async def _check_serves(self, replica: Replica, name: str) -> None:
        models = await self._vllm(replica, "/v1/models", None, method="GET")
        if name not in {m.get("id") for m in models.get("data", [])}:
            raise PublishFailed(f"{replica.root_url} does not list {name} after loading it")
        await self._probe(replica, name)

    async def _probe(self, replica: Replica, name: str) -> None:
        """One token from ``name`` on ``replica``; fails unless it comes with a finite logprob (when given one)."""
        answer = await self._vllm(replica, "/v1/completions", {"model": name, **PROBE})
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices:
            raise PublishFailed(f"{replica.root_url} answered the probe of {name} with no choice: {str(answer)[:200]}")
        logprobs = (choices[0].get("logprobs") or {}).get("token_logprobs") or []
        if not all(isinstance(x, float | int) and math.isfinite(x) for x in logprobs):
            raise PublishFailed(f"{replica.root_url} serves {name} with non-finite logprobs {logprobs}: broken weights")

    def _retire_later(self) -> None:
        """Unload LoRA versions no longer active, canary or previous."""
        keep = self._served()
        self._unload_later([v for v in self.policy.history[:-1] if v.served_name in self._loaded and v not in keep])

    def _served(self) -> set[Version | None]:
        """The versions that may get calls now: active, canary, and the previous one (kept for rollback)."""
        return {self.policy.active, self.policy.canary, *self.policy.history[-1:]}

    def _unload_later(self, versions: list[Version]) -> None:
        """Unload LoRA versions from every replica once their last call has finished."""
        versions = [v for v in versions if v.lora_path is not None]

        async def unload() -> None:
            for version in versions:
                await self.policy.drained(version)
                if version in self._served() or version.served_name not in self._loaded:
                    continue  # served again meanwhile (a rollback, a new activation), or gone already
                async with self._lock:
                    for replica in self.policy.replicas:
                        await self._unload(replica, version.served_name)
                    self._loaded.discard(version.served_name)

        if versions:
            task = asyncio.create_task(unload())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _unload(self, replica: Replica, name: str) -> None:
        with contextlib.suppress(HTTPError, aiohttp.ClientError):
            await self._vllm(replica, "/v1/unload_lora_adapter", {"lora_name": name})

    async def _vllm(
        self, replica: Replica, path: str, body: dict[str, Any] | None, *, method: str = "POST", exists_ok: bool = False
    ) -> Any:
        try:
            async with self.session.request(
                method, replica.root_url + path, json=body, headers=replica.upstream.auth(), timeout=VLLM_TIMEOUT
            ) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PublishFailed(f"vLLM at {replica.root_url} did not answer {path}: {exc}") from None
        if exists_ok and resp.status == 400 and "already been loaded" in text:
            return None
        if resp.status >= 400:
            raise PublishFailed(f"vLLM answered {path} with {resp.status}: {text[:500]}")
        return json.loads(text) if resp.content_type == "application/json" else text

    # -- the registry -----------------------------------------------------------------------------------------

    async def _guarded(self, adapter: Adapter, step: Awaitable[Version]) -> Version:
        try:
            return await step
        except (PublishFailed, OSError) as exc:
            await self._record(adapter.with_status("failed", str(exc)))
            log.error("publishing %s failed: %s", adapter.version, exc)
            raise PublishFailed(f"{adapter.version} was not published: {exc}") from None

    async def _record(self, adapter: Adapter) -> Adapter:
        self.adapters[adapter.version] = adapter
        await self._save(adapter)
        return adapter

    async def _set_status(self, version: str | None, status: str, message: str | None) -> None:
        if version is not None and version in self.adapters:
            await self._record(self.adapters[version].with_status(status, message))

    def _get(self, version: str) -> Adapter:
        try:
            return self.adapters[version]
        except KeyError:
            raise NotFound(f"No adapter version {version!r}.", param="version") from None

    def _version(self, adapter: Adapter, *, as_lora: bool = False) -> Version:
        if adapter.merged_path and not as_lora:
            return Version(adapter.version, self.policy.base.served_name, merged_path=Path(adapter.merged_path))
        return Version(adapter.version, adapter.served_name or "", lora_path=Path(adapter.path))


def _copy_folder(source: Path, target: Path) -> str:
    """Copy an adapter folder; return a sha256 of its new place and its weights, for its LoRA name.

    vLLM knows a loaded LoRA by its name alone, and answers a second load of a name it holds with "already
    loaded". Two sidecars sharing a vLLM server, each with its own adapters folder, must never take the other's
    loaded copy for their own: vLLM reads that folder again whenever the LoRA is evicted from its slots, and the
    other sidecar may have deleted it by then.
    """
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target)
    digest = hashlib.sha256(str(target.resolve()).encode())
    digest.update((target / WEIGHTS_FILE).read_bytes())
    return digest.hexdigest()


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None
