"""What the optimizers need from the process that runs them, and nothing more: settings, publishers of versions,
a way to ask for completions, and the judges of offline evaluations. The sidecar (``lightwire serve``) and the
fleet's learner (``lightwire learn``) hand these to :class:`optimizers.loop.Optimizer` and
:class:`optimizers.memory.Builder`, and reward hooks get theirs as keywords (:mod:`proxy.hooks`): the optimizers
never import the proxy (``tests/test_layers.py`` checks it).

In the proxy, :class:`proxy.publish.Publisher` (hot-swaps adapters into vLLM) is a :class:`Publishing`,
:class:`proxy.memory_publish.BankPublisher` a :class:`BankPublishing`, :meth:`proxy.backends.Backends.complete` a
:class:`Completing`, :func:`proxy.providers.complete` a :class:`ProviderCall`, :class:`proxy.policy.Version` a
:class:`Served`, and :class:`proxy.config.Config` a :class:`Settings` and a :class:`Judging`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from store.adapters import Adapter
from store.memory import MemoryBank, Trajectory


class Served(Protocol):
    """A set of weights being served: the base model (``version`` None) or an adapter version."""

    @property
    def version(self) -> str | None: ...
    @property
    def served_name(self) -> str: ...
    @property
    def lora_path(self) -> Path | None: ...
    @property
    def merged_path(self) -> Path | None: ...


class Publishing(Protocol):
    """Registers adapters as versions, serves them (to evaluate, as a canary, to everyone) or retires them."""

    @property
    def adapters(self) -> Mapping[str, Adapter]: ...
    @property
    def base_dir(self) -> Path | None: ...
    @property
    def active(self) -> Served: ...
    @property
    def mode(self) -> str: ...

    async def register(
        self, path: Path, *, parent: str | None = None, algorithm: str | None = None, data: dict[str, Any] | None = None
    ) -> Adapter: ...
    async def load_candidate(self, version: str) -> Served: ...
    async def start_canary(self, version: str, fraction: float) -> Adapter: ...
    async def activate(self, version: str) -> Adapter: ...
    async def reject(self, version: str, reason: str) -> None: ...
    async def complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One chat completion from a replica that serves now (offline evaluation): status and body."""
        ...


class BankPublishing(Protocol):
    """Registers memory banks as versions, serves them (as a canary, to everyone) or retires them."""

    @property
    def active_version(self) -> str | None:
        """The bank that serves every call (None: none does)."""
        ...

    async def register(self, trajectories: list[Trajectory], *, data: dict[str, Any]) -> MemoryBank: ...
    async def start_canary(self, version: str, fraction: float) -> MemoryBank: ...
    async def activate(self, version: str) -> MemoryBank: ...
    async def reject(self, version: str, reason: str) -> None: ...
    async def with_examples(
        self, version: str | None, calls: Sequence[tuple[str, list[dict[str, Any]]]]
    ) -> list[list[dict[str, Any]]]:
        """Each call's (model, messages) messages as sent upstream with bank ``version``'s examples (None: none)."""
        ...


class Completing(Protocol):
    """One chat completion through the route its ``model`` goes to, as a call would get it but recorded nowhere (an
    offline evaluation's replay): status and body; a backend that cannot be reached gives 502 and an error body."""

    async def __call__(self, body: dict[str, Any]) -> tuple[int, Any]: ...


class ProviderCall(Protocol):
    """One chat completion from any LLM provider, named as litellm names it (``openai/gpt-4o-mini``), in OpenAI's
    shape; ``kwargs`` are the request's other fields."""

    async def __call__(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Judge:
    """Scores one replayed answer (a span-like dict: request, response, http_status, operation_name); None: no
    opinion."""

    name: str
    score: Callable[[dict[str, Any]], Awaitable[float | None]]


class Settings(Protocol):
    """The settings an optimizer run reads (``proxy.config.Config`` has them all; each documented there)."""

    @property
    def runs_dir(self) -> Path: ...
    @property
    def cache_dir(self) -> Path: ...
    @property
    def train_algorithm(self) -> str: ...
    @property
    def train_min_turns(self) -> int: ...
    @property
    def train_min_interval(self) -> float: ...
    @property
    def train_learning_rate(self) -> float: ...
    @property
    def train_epochs(self) -> int: ...
    @property
    def train_window(self) -> str: ...
    @property
    def train_threads(self) -> int: ...
    @property
    def train_processes(self) -> int: ...
    @property
    def max_lora_rank(self) -> int: ...
    @property
    def credit_policy(self) -> str: ...
    @property
    def discount(self) -> float: ...
    @property
    def eval_split(self) -> float: ...
    @property
    def eval_max_prompts(self) -> int: ...
    @property
    def eval_canary_fraction(self) -> float: ...
    @property
    def eval_min_sessions(self) -> int: ...
    @property
    def eval_timeout(self) -> float: ...
    @property
    def memory_size(self) -> int: ...


class Judging(Protocol):
    """The setting an LLM judge reads (``optimizers.rewards:ruler``)."""

    @property
    def judge_model(self) -> str: ...
