"""The learning policy: a base model on one or more vLLM replicas, the adapter versions it serves, and which
replica and version each call gets.

Two ways to serve a version (``swap_mode``):

* ``lora``: each version is a LoRA adapter loaded into every replica under its own name (``lw-v3``); routing
  switches between names, so several versions (active, canary, previous) are served at once.
* ``merged``: the active version is merged into the base weights and reloaded into the running server, which
  then serves it at full speed under the base model's name. Candidates can still be served as LoRA adapters on
  top of it (a canary), since they are trained from the active weights.

A canary takes a fraction of *sessions*, chosen by a hash of the session id, never part of one. A session keeps
the version it started with while that version is still loaded. Each replica has a gate: while weights are
reloaded into it (merged mode) new calls wait for it instead of failing, and calls already running finish first.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import BackendUnavailable
from proxy.upstream import Upstream

PINNED_SESSIONS = 100_000
# How long a call waits for a replica that is reloading weights before it gets a 503.
REPLICA_WAIT_S = 30.0
RETRY_AFTER_S = "5"


@dataclass(frozen=True, slots=True)
class Version:
    """One set of weights the policy can serve."""

    version: str | None  # None: the base model
    served_name: str  # the ``model`` to ask vLLM for
    lora_path: Path | None = None  # served as a LoRA adapter from this folder
    merged_path: Path | None = None  # or merged into the base weights, from this folder

    @property
    def label(self) -> str:
        return self.version or "base"


class Replica:
    """One vLLM server; ``is_ready`` says whether it can take calls (a managed server may be restarting).

    A replica whose weights are unknown (a reload failed and so did putting the served weights back) is ``stale``:
    it takes no call until :meth:`proxy.publish.Publisher.restore` has loaded the served versions into it.
    """

    def __init__(self, upstream: Upstream, is_ready: Callable[[], bool]) -> None:
        self.upstream = upstream
        self._is_ready = is_ready
        self.stale = False
        self.open = asyncio.Event()
        self.open.set()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def root_url(self) -> str:
        """The server's root (``/collective_rpc``, ``/health`` live there), without ``/v1``."""
        return self.upstream.base_url.removesuffix("/v1")

    def is_ready(self) -> bool:
        return self._is_ready() and not self.stale

    def usable(self) -> bool:
        return self.open.is_set() and self.is_ready()


class Policy:
    def __init__(self, replicas: list[Replica], *, base: Version, mode: str) -> None:
        self.replicas = replicas
        self.mode = mode
        self.base = base
        self.active = base
        self.history: list[Version] = []  # earlier active versions, the latest last: what rollback returns to
        self.canary: Version | None = None
        self.canary_fraction = 0.0
        self.in_flight: Counter[str] = Counter()
        self._drained: dict[str, asyncio.Event] = {}
        self._pins: OrderedDict[str, Version] = OrderedDict()
        self._turn = itertools.count()

    # -- the request path ---------------------------------------------------------------------------------

    async def acquire(self, session_id: str | None) -> tuple[Replica, Version]:
        """A replica and the version to serve this call with; :meth:`release` them when the call is over."""
        replica = await self._replica()
        version = self._version_for(session_id)
        replica.in_flight += 1
        replica.idle.clear()
        self.in_flight[version.label] += 1
        return replica, version

    def release(self, replica: Replica, version: Version) -> None:
        replica.in_flight -= 1
        if replica.in_flight == 0:
            replica.idle.set()
        self.in_flight[version.label] -= 1
        if self.in_flight[version.label] == 0:
            del self.in_flight[version.label]
            drained = self._drained.pop(version.label, None)
            if drained is not None:
                drained.set()

    def ready(self) -> bool:
        return any(r.is_ready() for r in self.replicas)

    async def _replica(self) -> Replica:
        if not self.replicas:
            raise BackendUnavailable("The model is still starting.", headers={"Retry-After": RETRY_AFTER_S})
        n = len(self.replicas)
        start = next(self._turn)
        for i in range(n):
            replica = self.replicas[(start + i) % n]
            if replica.usable():
                return replica
        # A replica that is reloading weights comes back in seconds: wait for it. A server that is starting or
        # restarting takes a minute or more: say so at once, so that clients back off instead of piling up.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REPLICA_WAIT_S
        while loop.time() < deadline and any(r.is_ready() for r in self.replicas):
            await asyncio.sleep(0.05)
            for replica in self.replicas:
                if replica.usable():
                    return replica
        raise BackendUnavailable(
            "No model replica is ready (starting or restarting); try again shortly.",
            headers={"Retry-After": RETRY_AFTER_S},
        )

    def _version_for(self, session_id: str | None) -> Version:
        if session_id is not None:
            pinned = self._pins.get(session_id)
            if pinned is not None and self._servable(pinned):
                self._pins.move_to_end(session_id)
                return pinned
        version = self.active
        if self.canary is not None and session_id is not None and session_fraction(session_id) < self.canary_fraction:
            version = self.canary
        if session_id is not None:
            self._pins[session_id] = version
            while len(self._pins) > PINNED_SESSIONS:
                self._pins.popitem(last=False)
        return version

    def _servable(self, version: Version) -> bool:
        if version == self.active or version == self.canary:
            return True
        # An older version stays servable while it is still loaded as a LoRA adapter (lora mode keeps the
        # previous active version loaded for rollback).
        return self.mode == "lora" and version.lora_path is not None and version in self.history[-1:]

    # -- changes, made by the publisher ---------------------------------------------------------------------

    def activate(self, version: Version) -> Version:
        """Serve ``version`` to every new session from now on; returns the version it replaces."""
        previous = self.active
        if previous != version:
            self.history.append(previous)
        self.active = version
        if self.canary == version:
            self.canary, self.canary_fraction = None, 0.0
        return previous

    def start_canary(self, version: Version, fraction: float) -> None:
        self.canary, self.canary_fraction = version, fraction

    def stop_canary(self) -> Version | None:
        canary, self.canary, self.canary_fraction = self.canary, None, 0.0
        return canary

    def roll_back(self) -> tuple[Version, Version]:
        """Return to the previous active version; returns (the version left, the version now active)."""
        if not self.history:
            raise ValueError("there is no earlier version to roll back to")
        left = self.active
        self.active = self.history.pop()
        return left, self.active

    async def drained(self, version: Version) -> None:
        """Wait until no call is being served with ``version``."""
        if self.in_flight[version.label] == 0:
            return
        event = self._drained.setdefault(version.label, asyncio.Event())
        await event.wait()


def session_fraction(session_id: str) -> float:
    """A stable number in [0, 1) for a session: the same session is always on the same side of a canary."""
    return int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=8).digest(), "big") / 2**64
