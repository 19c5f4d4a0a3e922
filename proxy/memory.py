"""Experiential memory on the request path: worked examples from the best-rewarded trajectories, put in front of
a chat call's conversation, for any backend (the policy, a plain upstream, a provider model).

A *trajectory* is the conversation of one rewarded session as its last turn saw it, without system messages,
ending with the rewarded answer (its id: the span id of that last turn). A *bank* is a set of them per model (the
name the client asked for), built by an optimizer run (:mod:`optimizers.memory`) and served as a version: active,
as a canary on a fraction of sessions, rolled back (:mod:`proxy.memory_publish`).

For a call on a route where memory is on (setting ``memory``), the bank that serves its session looks up the
``memory_examples`` trajectories most similar to the conversation so far, by BM25 (`bm25s
<https://github.com/xhluska/bm25s>`_ builds the index: its term-document weights, in compressed columns). A
lookup sums the columns of at most ``QUERY_TERMS`` of the call's terms, the rarest first, in one
``numpy.bincount``. Terms found in more than half the trajectories are left out: their BM25 weight (idf below
log 2, against ~9 for a rare term among 10,000) barely moves the ranking, and their columns are the longest, so
they would cost the most (an agent's fixed prompt is in every trajectory). ``bench/memory_lookup.py`` times it.

Each example is the trajectory's messages less those it shares, from the start, with the call (an agent's own
fixed examples), inserted after the call's system messages, the most similar last (next to the question). What
goes upstream has them; the client's response, the span's ``request`` (the body as the client sent it) and so
training data do not: the span records the bank (``memory_version``) and the trajectories (``memory_examples``,
empty when the bank had nothing similar).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from proxy import protocol
from proxy.policy import session_fraction
from store.memory import Trajectory, read_bank


@contextmanager
def _numba_unimportable() -> Iterator[None]:
    """Imports within find no numba. bm25s imports numba whenever it can (vLLM installs it) for a JIT backend
    of its own retrieval, which is not used here: the index is built with numpy and looked up below. Loaded, numba
    and llvmlite cost the sidecar ~106 MB of RSS (219 -> 113 MB after ``import proxy.app``) and 0.3 s of start."""
    if "numba" in sys.modules:  # already loaded by someone else: nothing to save
        yield
        return
    sys.modules["numba"] = None  # type: ignore[assignment]  # None here makes ``import numba`` raise ImportError
    try:
        yield
    finally:
        del sys.modules["numba"]


with _numba_unimportable():
    import bm25s
    from bm25s.stopwords import STOPWORDS_EN

if TYPE_CHECKING:
    from proxy.relay import Call

TERM = re.compile(r"\w\w+")
STOPWORDS = frozenset(STOPWORDS_EN)
QUERY_TERMS = 32  # the call's rarest terms that a lookup scores; bounds its cost whatever the conversation
ALL_ROUTES = "*"


@dataclass(frozen=True, slots=True)
class Injection:
    """What memory added to one call: the bank, the trajectories' ids, and the messages sent upstream."""

    version: str
    ids: tuple[str, ...]  # none: the bank served the call and had nothing similar (its canary arm still counts it)
    messages: list[Any]

    def __bool__(self) -> bool:
        return bool(self.ids)


def terms(text: str) -> list[str]:
    return [t for t in TERM.findall(text.lower()) if t not in STOPWORDS]


def conversation_text(messages: Iterable[Any]) -> str:
    """The text of a conversation's messages other than system ones (content strings and text parts)."""
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") in ("system", "developer"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        for tool_call in message.get("tool_calls") or ():
            function = tool_call.get("function") if isinstance(tool_call, dict) else None
            if isinstance(function, dict):
                parts.append(f"{function.get('name', '')} {function.get('arguments', '')}")
    return "\n".join(parts)


class Index:
    """One model's trajectories and their BM25 index."""

    def __init__(self, trajectories: Sequence[Trajectory]) -> None:
        self.trajectories = list(trajectories)
        retriever = bm25s.BM25()
        retriever.index([terms(conversation_text(t.messages)) for t in self.trajectories], show_progress=False)
        self.vocabulary: dict[str, int] = retriever.vocab_dict
        self.weights = np.asarray(retriever.scores["data"], dtype=np.float64)
        self.rows = np.asarray(retriever.scores["indices"], dtype=np.int64)
        self.starts = np.asarray(retriever.scores["indptr"], dtype=np.int64)
        self.frequency = np.diff(self.starts)  # trajectories holding each term: fewer, rarer
        self.common = max(1, len(self.trajectories) // 2)  # a term in more trajectories is scored only alone

    def lookup(self, text: str, k: int) -> list[tuple[Trajectory, float]]:
        """The ``k`` trajectories most similar to ``text`` (score > 0), the most similar first. Terms held by more
        than half the trajectories are scored only when the call shares no rarer one: in a large bank they would
        cost the most and tell the least; in a young bank of a few trajectories of one task, all its words are
        common, and leaving them out left nearly every call without an example."""
        known = {self.vocabulary[t] for t in TERM.findall(text.lower()) if t in self.vocabulary}
        if not known:
            return []
        ids = np.fromiter(known, dtype=np.int64, count=len(known))
        rare = ids[self.frequency[ids] <= self.common]
        if len(rare):
            ids = rare
        if len(ids) > QUERY_TERMS:
            ids = ids[np.argpartition(self.frequency[ids], QUERY_TERMS)[:QUERY_TERMS]]
        starts, lengths = self.starts[ids], self.frequency[ids]
        total = int(lengths.sum())
        offsets = np.cumsum(lengths) - lengths
        positions = np.repeat(starts - offsets, lengths) + np.arange(total)
        scores = np.bincount(self.rows[positions], weights=self.weights[positions], minlength=len(self.trajectories))
        k = min(k, len(scores))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(self.trajectories[i], float(scores[i])) for i in best if scores[i] > 0]


class Bank:
    """A bank version, loaded: an index per model."""

    def __init__(self, version: str, trajectories: Iterable[Trajectory]) -> None:
        self.version = version
        by_model: dict[str, list[Trajectory]] = {}
        for trajectory in trajectories:
            by_model.setdefault(trajectory.model, []).append(trajectory)
        self.indexes = {model: Index(items) for model, items in by_model.items()}

    @classmethod
    def load(cls, version: str, path: Path) -> Bank:
        return cls(version, read_bank(path))

    def __len__(self) -> int:
        return sum(len(index.trajectories) for index in self.indexes.values())

    def examples(self, model: str, messages: list[Any], k: int) -> Injection:
        """The call's messages with up to ``k`` worked examples after its system messages (none when none fit)."""
        index = self.indexes.get(model)
        if index is None:
            return Injection(self.version, (), messages)
        head = 0
        while head < len(messages) and isinstance(messages[head], dict) and messages[head].get("role") == "system":
            head += 1
        rest = messages[head:]
        found = index.lookup(conversation_text(rest), k)
        added: list[dict[str, Any]] = []
        ids = []
        for trajectory, _ in reversed(found):  # the most similar nearest to the question
            example = _unshared(trajectory.messages, rest)
            if example:
                added.extend(example)
                ids.append(trajectory.id)
        if not ids:
            return Injection(self.version, (), messages)
        return Injection(self.version, tuple(ids), [*messages[:head], *added, *rest])


def _unshared(example: Sequence[dict[str, Any]], conversation: Sequence[Any]) -> list[dict[str, Any]]:
    """The example's messages after those it shares with the conversation from the start, beginning with a user
    message; the call's own last message is never counted as shared (an example of the very same question keeps
    it, with its answer)."""
    shared = 0
    for mine, theirs in zip(example, conversation[:-1], strict=False):
        if mine != theirs:
            break
        shared += 1
    while shared > 0 and shared < len(example) and example[shared].get("role") != "user":
        shared -= 1
    return list(example[shared:]) if shared < len(example) else []


class Memory:
    """Which bank serves which session, for one proxy; the request path's part is :meth:`inject`."""

    def __init__(self, *, routes: Sequence[str], examples: int) -> None:
        self.routes = frozenset(routes)
        self.examples = examples
        self.active: Bank | None = None
        self.canary: Bank | None = None
        self.canary_fraction = 0.0
        self.history: list[Bank | None] = []  # earlier active banks, the latest last: what rollback returns to

    def on_for(self, model: Any) -> bool:
        return ALL_ROUTES in self.routes or model in self.routes

    def inject(self, call: Call) -> None:
        """Give ``call`` its worked examples, when memory is on for its route and a bank has some."""
        if self.active is None and self.canary is None:
            return
        body = call.body
        if call.operation != protocol.CHAT or not self.on_for(body["model"]):
            return
        bank = self.bank_for(call.session_id)
        messages = body.get("messages")
        if bank is not None and isinstance(messages, list):
            call.memory = bank.examples(body["model"], messages, self.examples)

    def bank_for(self, session_id: str | None) -> Bank | None:
        """The canary takes sessions from the top of the hash range, an adapter canary from the bottom: while both
        run (each at most half), no session is in both, so that neither's evidence is the other's doing."""
        canary = self.canary
        if canary is not None and session_id is not None and session_fraction(session_id) >= 1 - self.canary_fraction:
            return canary
        return self.active

    @property
    def label(self) -> str | None:
        return self.active.version if self.active else None


MEMORY = web.AppKey("memory", Memory)
