"""Reward hooks for tests: deterministic judges of which version answered, or of who asked."""

from __future__ import annotations

from typing import Any

BASE_MODEL = "SmolLM2-135M-Instruct"


def always_one(span: dict[str, Any]) -> float:
    """Every answer is as good as any other: a candidate ties with the active version."""
    return 1.0


def prefers_base(span: dict[str, Any]) -> float:
    """Only the base model's answers are good: any candidate adapter is worse."""
    return 1.0 if (span.get("response") or {}).get("model") == BASE_MODEL else 0.0


def is_sample(span: dict[str, Any]) -> float:
    """The sidecar's extra samples score 1, clients' own answers 0: a group whose rewards differ."""
    return 1.0 if span.get("session_source") == "sample" else 0.0


def turns(session: dict[str, Any]) -> float:
    """A session hook: the number of calls the session made."""
    return float(len(session["spans"]))


def _answer(span: dict[str, Any]) -> str:
    return str(span["response"]["choices"][0]["message"]["content"])


def _questions(span: dict[str, Any]) -> list[str]:
    return [m["content"] for m in span["request"]["messages"] if m["role"] == "user"]


def repeats_the_question(span: dict[str, Any]) -> float:
    """The answer repeats the question the call asked (its last user message): 1, otherwise 0."""
    return 1.0 if _answer(span) == _questions(span)[-1] else 0.0


def repeats_the_first_question(span: dict[str, Any]) -> float:
    """Reads the question by position, as a judge of a one-question agent may: the first user message."""
    return 1.0 if _answer(span) == _questions(span)[0] else 0.0
