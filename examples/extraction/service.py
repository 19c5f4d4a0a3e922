"""The service around the extraction agent: runs sentences, scores each answer, and posts the reward to Lightwire.

The reward is the fraction of fields exactly right: each of the four keys whose value equals the answer's (the
same string; for the quantity, the same number, not a string of it), over four, or over the number of keys when
the object has more (an extra key counts as a wrong field). A success is a reward of 1.0: every field right and
nothing else. The trainer never sees the answer, only the reward.

Run it against a sidecar::

    python -m examples.extraction.service --base-url http://127.0.0.1:8400/v1 --split train --n 200
    python -m examples.extraction.service --split heldout --n 40 --temperature 0 --no-feedback
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from examples import harness
from examples.extraction import agent, tasks


def reward(answer: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> float:
    """The fraction of ``expected``'s fields that ``answer`` has exactly right (0.0 without an answer)."""
    if answer is None:
        return 0.0
    right = sum(key in answer and _same(answer[key], value) for key, value in expected.items())
    return right / max(len(expected), len(answer))


def _same(value: Any, expected: Any) -> bool:
    """Equal and of the same JSON type (``4`` is not ``"4"``, ``true`` is not ``1``, ``4.0`` is ``4``)."""
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(expected, int | float):
        return isinstance(value, int | float) and value == expected
    return isinstance(value, str) and value == expected


def judge(span: dict[str, Any]) -> float | None:
    """The reward the service would give one recorded call, as a span hook (``examples.extraction.service:judge``).

    The sentence is read from the call's messages and its answer recovered from the templates (:func:`tasks.find`).
    None for a call that is not one of this agent's sentences. Meant as an ``eval_hook`` (or a span hook scoring
    background samples the client never saw); the trainer still learns only from the rewards the service posts.
    """
    call = harness.recorded_call(span, agent.QUESTION_INDEX)
    task = tasks.find(call[0]) if call else None
    if call is None or task is None:
        return None
    answer, _ = agent.parse(call[1])
    return reward(answer, task.answer)


async def score(task: tasks.Task, attempt: agent.Attempt) -> float:
    """The reward of an attempt: its last answer's fields against the task's."""
    return reward(attempt.answer, task.answer)


EXAMPLE = harness.Example(
    name="extraction",
    families=tasks.FAMILIES,
    questions=tasks.questions,
    solve=agent.solve,
    score=score,
    details=lambda attempt: {"answers": [turn.content for turn in attempt.turns]},
    judge="examples.extraction.service:judge",
)


def main(argv: Sequence[str] | None = None) -> int:
    cli, _ = harness.parser("Run the extraction agent over sentences; post rewards to Lightwire.", tasks.DEFAULT_SEED)
    return harness.main(cli.parse_args(argv), EXAMPLE)


if __name__ == "__main__":
    sys.exit(main())
