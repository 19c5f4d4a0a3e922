"""The agent: asks the model to read a sentence into a JSON object, and when the answer holds none, says so and
asks again.

It is written only against the ``openai`` SDK and knows nothing of Lightwire: the client it is given reads
``OPENAI_BASE_URL`` like any other, and no request carries a header of Lightwire's. The conversation of one
sentence is one growing list of messages, so a sidecar that links conversations sees an attempt's turns as one
session.

The prompt: a system message naming the keys, one worked example as an earlier turn (its names, city and item are
in no sentence the generator writes), then the sentence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import openai

from examples import harness
from examples.extraction.tasks import KEYS, Task

MAX_TURNS = 2
MAX_TOKENS = 80  # an answer is ~30 tokens; this bounds a model that rambles

INSTRUCTIONS = (
    'Read the order in the sentence into JSON with the keys "name" (full name), "city", "item" (singular) and'
    ' "quantity" (a number). Answer with the JSON object only.'
)
EXAMPLES = (
    (
        "Lena Fischer from Bergamo bought 3 radios.",
        json.dumps({"name": "Lena Fischer", "city": "Bergamo", "item": "radio", "quantity": 3}),
    ),
)
RETRY = "Error: {error}\nAnswer with the JSON object only."
QUESTION_INDEX = 1 + 2 * len(EXAMPLES)  # where the sentence is in every call's messages: after the system and examples


@dataclass
class Turn:
    """One call: the model's reply and the object read from it (or why none could be)."""

    response_id: str
    content: str
    answer: dict[str, Any] | None
    error: str | None = None


class Attempt(harness.Attempt[Turn]):
    """All the turns of one sentence; the answer is the last turn's object (``None`` when no turn gave one)."""

    @property
    def answer(self) -> dict[str, Any] | None:
        return self.turns[-1].answer if self.turns else None


async def solve(
    client: openai.AsyncOpenAI, task: Task, *, model: str, temperature: float, max_turns: int = MAX_TURNS
) -> Attempt:
    """Read ``task.question`` (nothing else of the task is read) with up to ``max_turns`` calls to the model."""
    messages: list[Any] = [*prompt(), {"role": "user", "content": task.question}]
    attempt = Attempt(task.question)
    for _ in range(max_turns):
        response = await client.chat.completions.create(
            model=model, messages=messages, temperature=temperature, max_tokens=MAX_TOKENS
        )
        content = response.choices[0].message.content or ""
        answer, error = parse(content)
        attempt.turns.append(Turn(response.id, content, answer, error))
        if error is None:
            break
        messages += [
            {"role": "assistant", "content": content},
            {"role": "user", "content": RETRY.format(error=error)},
        ]
    return attempt


def prompt() -> list[dict[str, str]]:
    """The messages before the sentence: the instructions, then the worked example."""
    messages = [{"role": "system", "content": INSTRUCTIONS}]
    for sentence, answer in EXAMPLES:
        messages += [{"role": "user", "content": sentence}, {"role": "assistant", "content": answer}]
    return messages


def parse(content: str) -> tuple[dict[str, Any] | None, str | None]:
    """The first JSON object in a reply (prose or a ``` fence around it is ignored) and, when there is none or it
    lacks a key, why (to send back)."""
    start = content.find("{")
    if start < 0:
        return None, "no JSON object found in the answer"
    try:
        answer, _ = json.JSONDecoder().raw_decode(content[start:])
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg}"
    if not isinstance(answer, dict):
        return None, "no JSON object found in the answer"
    missing = [key for key in KEYS if key not in answer]
    if missing:
        return answer, "missing " + ", ".join(f'"{key}"' for key in missing)
    return answer, None
