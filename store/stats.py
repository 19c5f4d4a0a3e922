"""The numbers ``lightwire stats`` shows: calls, sessions, how much is rewarded, and the mean reward, overall,
per adapter version (``base``: no adapter) and per day (UTC).

Definitions:

* the spans counted are the agents' calls; answers the sidecar sampled to complete a group (``group_samples``)
  are counted apart as ``samples``, and are in no session, group or mean below;
* a session is *rewarded* when any feedback row names it or one of its calls;
* a span *has feedback* when a feedback row names that call itself;
* the *mean reward* is that of successful calls with a reward named ``reward_name`` after credit assignment
  (:func:`store.export.turn_rewards`), the same values an exported dataset carries; ``rewarded`` counts them.

:func:`collect` returns plain data (:meth:`Stats.to_dict` is the JSON of ``GET /admin/stats``); :func:`format_text`
renders it as a text table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import duckdb

from store import credit
from store.export import OK, snapshot, turn_rewards
from store.spans import MODEL_CALL, SAMPLE_SOURCE

BASE = "base"
# The agents' model calls: every span but the sidecar's own group samples and other /v1/ paths.
CALLS = f"(SELECT * FROM spans WHERE session_source IS DISTINCT FROM '{SAMPLE_SOURCE}' AND {MODEL_CALL})"


@dataclass(slots=True)
class Group:
    """The calls of one adapter version or one day."""

    key: str
    spans: int = 0
    sessions: int = 0
    rewarded: int = 0
    mean_reward: float | None = None


@dataclass(slots=True)
class Stats:
    spans: int
    failed_spans: int
    samples: int
    sessions: int
    feedback: int
    rewarded_sessions: int
    spans_with_feedback: int
    rewarded: int
    mean_reward: float | None
    reward_name: str
    credit_policy: str
    discount: float
    by_adapter: list[Group] = field(default_factory=list)
    by_day: list[Group] = field(default_factory=list)

    @property
    def rewarded_session_fraction(self) -> float:
        return self.rewarded_sessions / self.sessions if self.sessions else 0.0

    @property
    def feedback_span_fraction(self) -> float:
        return self.spans_with_feedback / self.spans if self.spans else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``GET /admin/stats``: every field, and the two fractions."""
        return {
            **asdict(self),
            "rewarded_session_fraction": self.rewarded_session_fraction,
            "feedback_span_fraction": self.feedback_span_fraction,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        """The inverse of :meth:`to_dict` (the CLI reads ``GET /admin/stats`` with it)."""
        values = {f.name: data[f.name] for f in fields(cls)}
        for key in ("by_adapter", "by_day"):
            values[key] = [Group(**group) for group in data[key]]
        return cls(**values)


def collect(
    con: duckdb.DuckDBPyConnection, *, policy: str, discount: float, reward_name: str = credit.DEFAULT_NAME
) -> Stats:
    with snapshot(con):
        return _collect(con, policy=policy, discount=discount, reward_name=reward_name)


def _collect(con: duckdb.DuckDBPyConnection, *, policy: str, discount: float, reward_name: str) -> Stats:
    spans, ok_spans, sessions, with_feedback, samples = _one(
        con,
        f"""
        SELECT count(*), count(*) FILTER (WHERE {OK}), count(DISTINCT coalesce(session_id, span_id)),
               count(*) FILTER (WHERE span_id IN (SELECT span_id FROM feedback)),
               (SELECT count(*) FROM spans WHERE session_source = '{SAMPLE_SOURCE}')
        FROM {CALLS}
        """,
    )
    feedback, rewarded_sessions = _one(
        con,
        f"""
        SELECT (SELECT count(*) FROM feedback), count(*)
        FROM (SELECT DISTINCT coalesce(session_id, span_id) AS session FROM {CALLS})
        WHERE session IN (SELECT coalesce(f.session_id, s.session_id) FROM feedback f LEFT JOIN spans s USING (span_id))
        """,
    )
    rewards = {
        span_id: named[reward_name]
        for span_id, named in turn_rewards(con, policy=policy, discount=discount).items()
        if reward_name in named
    }
    overall, by_adapter, by_day = _Tally(), _Tallies(), _Tallies()
    rows = con.execute(
        f"""
        SELECT span_id, coalesce(session_id, span_id), coalesce(adapter_version, '{BASE}'),
               CAST(timezone('UTC', start_time) AS DATE)::VARCHAR
        FROM {CALLS} ORDER BY start_time
        """
    ).fetchall()
    for span_id, session, adapter, day in rows:
        reward = rewards.get(span_id)
        for tally in (overall, by_adapter.of(adapter), by_day.of(day)):
            tally.add(session, reward)
    return Stats(
        spans=spans,
        failed_spans=spans - ok_spans,
        samples=samples,
        sessions=sessions,
        feedback=feedback,
        rewarded_sessions=rewarded_sessions,
        spans_with_feedback=with_feedback,
        rewarded=overall.rewarded,
        mean_reward=overall.mean,
        reward_name=reward_name,
        credit_policy=policy,
        discount=discount,
        by_adapter=by_adapter.groups(),
        by_day=sorted(by_day.groups(), key=lambda g: g.key),
    )


def format_text(stats: Stats) -> str:
    """A readable summary and two tables."""
    rule = stats.credit_policy + (f" {stats.discount:g}" if stats.credit_policy == "discounted" else "")
    samples = f" (and {stats.samples} group samples)" if stats.samples else ""
    lines = [
        f"spans: {stats.spans} ({stats.failed_spans} failed){samples} in {stats.sessions} sessions; "
        f"{stats.feedback} feedback rows",
        f"rewarded sessions: {stats.rewarded_sessions} of {stats.sessions} ({stats.rewarded_session_fraction:.1%}); "
        f"spans with feedback: {stats.spans_with_feedback} of {stats.spans} ({stats.feedback_span_fraction:.1%})",
        f"mean {stats.reward_name}: {_number(stats.mean_reward)} over {stats.rewarded} rewarded spans (credit: {rule})",
    ]
    for title, groups in (("adapter", stats.by_adapter), ("day", stats.by_day)):
        lines += ["", *_table(title, groups)]
    return "\n".join(lines)


def _table(title: str, groups: list[Group]) -> list[str]:
    header = (title, "spans", "sessions", "rewarded", "mean reward")
    rows = [(g.key, str(g.spans), str(g.sessions), str(g.rewarded), _number(g.mean_reward)) for g in groups]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _one(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[Any, ...]:
    row = con.execute(sql).fetchone()
    assert row is not None
    return row


class _Tally:
    def __init__(self) -> None:
        self.spans = 0
        self.sessions: set[str] = set()
        self.rewarded = 0
        self.total = 0.0

    def add(self, session: str, reward: float | None) -> None:
        self.spans += 1
        self.sessions.add(session)
        if reward is not None:
            self.rewarded += 1
            self.total += reward

    @property
    def mean(self) -> float | None:
        return self.total / self.rewarded if self.rewarded else None


class _Tallies:
    """Tallies by key, in the order keys first appear."""

    def __init__(self) -> None:
        self._by_key: dict[str, _Tally] = {}

    def of(self, key: str) -> _Tally:
        return self._by_key.setdefault(key, _Tally())

    def groups(self) -> list[Group]:
        return [Group(key, t.spans, len(t.sessions), t.rewarded, t.mean) for key, t in self._by_key.items()]
