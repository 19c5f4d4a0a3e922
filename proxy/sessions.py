"""Which calls belong together: a session id and a turn index for every call, with no change to the agent.

The session comes from the first of:

1. the ``x-lightwire-session`` header (sent by the agent or injected by the service's own HTTP layer);
2. a path prefix, ``OPENAI_BASE_URL=http://sidecar:8400/s/<session>/v1``;
3. the W3C ``traceparent`` header: its trace id, for agents already instrumented with OpenTelemetry;
4. for a Responses call, the session of the response its ``previous_response_id`` names, else its
   ``conversation`` id (found by the caller: ``continued``);
5. automatic linking: a chat call whose messages begin with an earlier call's messages followed by that call's
   assistant reply (anything, e.g. tool results, may follow) continues that call's session. Otherwise the call
   starts a new session.

Linking keeps a bounded index from the hash of a conversation prefix ending with an assistant reply to the
session that produced the reply: one dictionary look-up per assistant message in the request, no scan. Each
choice of an ``n > 1`` call registers its own reply. Identical histories (same system prompt, same question, same
greedy answer in two conversations) register the same key twice; each continuation claims the oldest unclaimed
session, and once all are claimed (a retry, or a branch) the call joins the most recent one.

The turn index is the call's order in its session, from 0. A session leaves memory only by ending (ended, idle,
pushed out, shutdown), and its row in the store keeps its turn count and first call: a later call of it counts on
from there, with no index over the spans (:func:`store.queries.session_record`). Until the end is committed, the
count stays here (until ``settled``), so that a call in between does not find the store without it.

Memory: each of the three tables (sessions in flight or recently active, conversation prefixes, recent calls by
span and response id) holds at most ``session_index_size`` entries, dropping the least recently used: about
1 KB a call in all (``bench/soak.py`` measures RSS). A conversation continued after more calls than that went by
starts a new session; feedback for a call no longer remembered is looked up in the store. Ended sessions whose
rows are not yet committed are held besides: those of the last flush interval or two, or while the store fails.

What the tables hold is kept out of the cycle collector's way. A session's state and a call's ids are strings and
numbers, in tables of their own, so a call adds no container. A tracked object per entry made full collections
grow with the index (over 100 ms once it held ~100,000 calls); and even tuples of strings and numbers, which the
collector stops tracking once it has seen them, were seen first by a young collection, and a table that drops an
entry for each one it adds leaves the collector's count of new objects where it was: young collections came
seldom, and found 50,000-80,000 such tuples, pausing the event loop for 17-50 ms each (the soak's p99). The
conversation prefixes' claims are still tuples, one or two a linkable call.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.telemetry import time_ordered_hex

SESSION_HEADER = "x-lightwire-session"
MAX_SESSION_ID = 256
# Sessions remembered per identical conversation prefix (identical histories in several conversations).
MAX_CLAIMS = 16


# A session leaving memory, as its row records it: (session id, turns, its first call's start time).
Ended = tuple[str, int, datetime]
# The sessions whose reply ended a conversation prefix, oldest first, each with whether a call continued it.
Claims = tuple[tuple[str, bool], ...]


class Sessions:
    """In-memory session bookkeeping of one proxy process (the store keeps the record)."""

    def __init__(self, capacity: int) -> None:
        """Remember at most ``capacity`` sessions, conversation prefixes and calls (``session_index_size``)."""
        self.capacity = capacity
        # The sessions in memory: the time.monotonic() of each one's last activity, least recent first; and by
        # session, its next turn index, its first call's start time, and its calls in flight (when any).
        self.active: OrderedDict[str, float] = OrderedDict()
        self._turns: dict[str, int] = {}
        self._started: dict[str, datetime] = {}
        self._in_flight: dict[str, int] = {}
        self._replies: OrderedDict[bytes, Claims] = OrderedDict()  # conversation-prefix hash -> its claims
        self._call_sessions: OrderedDict[str, str] = OrderedDict()  # recent calls: span id -> session id
        self._response_spans: OrderedDict[str, str] = OrderedDict()  # and their response id -> span id
        self._evicted: list[Ended] = []  # sessions pushed out of ``active`` by newer ones, not yet ended
        self._ending: dict[str, tuple[int, datetime]] = {}  # ended, their rows not yet known to be committed

    def attribute(
        self,
        *,
        header: str | None,
        path: str | None,
        trace_id: str | None,
        messages: list[Any] | None,
        continued: tuple[str, str] | None = None,
    ) -> tuple[str, str, bytes | None]:
        """The call's session id, where it came from (header, path, traceparent, the source of ``continued``,
        linked or new), and for linked and new calls the hash of their messages, for :meth:`finish` to remember
        the reply by."""
        for source, value in (("header", header), ("path", path)):
            if value:
                return value[:MAX_SESSION_ID], source, None
        if trace_id:
            return trace_id, "traceparent", None
        if continued is not None:
            return continued[0][:MAX_SESSION_ID], continued[1], None
        if not messages:
            return _new_session(), "new", None
        hashes = _prefix_hashes(messages)
        linked = self._link(messages, hashes)
        return (linked, "linked", hashes[-1]) if linked is not None else (_new_session(), "new", hashes[-1])

    def begin(
        self, session_id: str, recorded: tuple[int, datetime] | None = None, *, now: datetime | None = None
    ) -> int:
        """Count a call into its session; return its turn index. ``recorded`` (turns, the first call's start)
        seeds a session not in memory, from its row in the store; ``now`` is when this call started (its span's
        start_time), by default now."""
        new = session_id not in self.active
        if new:
            turn, self._started[session_id] = self._ending.pop(session_id, recorded or (0, now or datetime.now(UTC)))
        else:
            turn = self._turns[session_id]
        self._turns[session_id] = turn + 1
        self._in_flight[session_id] = self._in_flight.get(session_id, 0) + 1
        self.active[session_id] = time.monotonic()
        self.active.move_to_end(session_id)
        if new:
            while len(self.active) > self.capacity:
                self._evicted.append(self._leave(self.active.popitem(last=False)[0]))
        return turn

    def is_known(self, session_id: str) -> bool:
        return session_id in self.active or session_id in self._ending

    def finish(self, session_id: str, conversation: bytes | None, replies: Iterable[dict[str, Any]]) -> None:
        """A call ended: note when its session was last active and, for a linkable conversation (its hash from
        :meth:`attribute`), remember each reply as a point that a later call may continue from."""
        if session_id in self.active:
            in_flight = self._in_flight.pop(session_id, 0) - 1
            if in_flight:
                self._in_flight[session_id] = in_flight
            self.active[session_id] = time.monotonic()
            self.active.move_to_end(session_id)
        if conversation is None:
            return
        for reply in replies:
            key = _extend(conversation, reply)
            claims = self._replies.get(key)
            if claims is None:
                self._replies[key] = ((session_id, False),)
                self._trim(self._replies)
            elif all(claimant != session_id for claimant, _ in claims):
                self._replies[key] = (*claims, (session_id, False))[-MAX_CLAIMS:]

    def remember_call(self, span_id: str, response_id: str | None, session_id: str) -> None:
        """Recent calls by span id and response id, for feedback that arrives before their rows are written."""
        self._call_sessions[span_id] = session_id
        self._trim(self._call_sessions)
        if response_id:
            self._response_spans[response_id] = span_id
            self._trim(self._response_spans)

    def find_call(self, key: str) -> tuple[str, str] | None:
        """``(span_id, session_id)`` of a recent call, by span id or response id."""
        span_id = self._response_spans.get(key, key)
        session_id = self._call_sessions.get(span_id)
        return None if session_id is None else (span_id, session_id)

    def idle(self, timeout: float) -> list[Ended]:
        """Sessions with nothing in flight and no call for ``timeout`` seconds, and those the index had no room
        for (the least recently active, so that every session is ended once); they leave memory.

        ``active`` is kept in order of last activity, so only the sessions that went idle are looked at (and
        those with a call running since before the cutoff).
        """
        cutoff = time.monotonic() - timeout
        gone = []
        for session_id, last_seen in self.active.items():
            if last_seen >= cutoff:
                break
            if session_id not in self._in_flight:
                gone.append(session_id)
        for session_id in gone:
            del self.active[session_id]
        ended = [self._leave(session_id) for session_id in gone] + self._evicted
        self._evicted = []
        return ended

    def end(self, session_id: str) -> Ended | None:
        """End a session on request: what its row records, or None when it is not in memory."""
        if self.active.pop(session_id, None) is not None:
            return self._leave(session_id)
        ending = self._ending.get(session_id)
        return (session_id, *ending) if ending else None

    def end_all(self) -> list[Ended]:
        """Every open session leaves memory (the process is stopping)."""
        ended = [self._leave(session_id) for session_id in self.active]
        self.active.clear()
        return ended

    def settled(self, ends: Iterable[tuple[str, int | None]]) -> None:
        """These ends (session id, turns) are committed: the store answers for those sessions from now on."""
        for session_id, turns in ends:
            ending = self._ending.get(session_id)
            if ending is not None and ending[0] == turns:  # not back, nor ended again since with more turns
                del self._ending[session_id]

    def _leave(self, session_id: str) -> Ended:
        """The session's state leaves the tables (its entry in ``active`` is the caller's to remove)."""
        next_turn, started = self._turns.pop(session_id), self._started.pop(session_id)
        self._in_flight.pop(session_id, None)
        self._ending[session_id] = (next_turn, started)
        return session_id, next_turn, started

    def _link(self, messages: list[Any], hashes: list[bytes]) -> str | None:
        for i in range(len(messages) - 1, -1, -1):
            if isinstance(messages[i], dict) and messages[i].get("role") == "assistant":
                key = hashes[i + 1]
                claims = self._replies.get(key)
                if claims:
                    # the oldest unclaimed session, or once all are claimed the most recent one
                    j = next((j for j, (_, claimed) in enumerate(claims) if not claimed), len(claims) - 1)
                    session_id = claims[j][0]
                    self._replies[key] = (*claims[:j], (session_id, True), *claims[j + 1 :])
                    self._replies.move_to_end(key)
                    return session_id
        return None

    def _trim(self, table: OrderedDict[Any, Any]) -> None:
        while len(table) > self.capacity:
            table.popitem(last=False)


def _new_session() -> str:
    return "lw-" + time_ordered_hex(12)


def _prefix_hashes(messages: list[Any]) -> list[bytes]:
    """``out[i]`` is the hash of ``messages[:i]``; each step hashes one message onto the previous digest."""
    out = [b""]
    for message in messages:
        out.append(_extend(out[-1], message))
    return out


def _extend(digest: bytes, message: Any) -> bytes:
    return hashlib.blake2b(digest + _canonical(message), digest_size=16).digest()


def _canonical(message: Any) -> bytes:
    """A message as it identifies a conversation: what an agent sends back of a reply, and nothing else.

    SDKs re-send a reply with extra fields (``refusal``, ``annotations``...) and ``None`` for empty content, and
    may turn text into content parts; none of that changes the conversation.
    """
    if not isinstance(message, dict):
        return orjson.dumps(message, option=orjson.OPT_SORT_KEYS)
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(texts) if len(texts) == len(content) else content
    calls = [
        (c.get("id"), (c.get("function") or {}).get("name"), (c.get("function") or {}).get("arguments"))
        for c in message.get("tool_calls") or ()
        if isinstance(c, dict)
    ]
    canonical = [message.get("role"), content or "", message.get("name"), message.get("tool_call_id"), calls]
    return orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
