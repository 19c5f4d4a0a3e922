"""The service around an example agent: runs its tasks, scores each attempt, and posts the reward to Lightwire.

What differs between examples is an :class:`Example`: its questions, its agent, its reward. What they share is
here: an :class:`Attempt` (the turns of one question), running tasks concurrently through the ``openai`` SDK,
posting each attempt's reward to ``POST /feedback`` naming the agent's last response id (that call's answer is
the one judged, and Lightwire has linked the attempt's earlier turns into the same session, so session credit
assignment reaches them), the success table by family, and the command line. Held-out evaluation posts nothing:
the calls are recorded, but an unrewarded call teaches the trainer nothing. The reward is computed here, where
the reference answer lives; the trainer never sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import httpx
import openai
from tqdm import tqdm

from examples.templates import SPLITS, Split

DEFAULT_BASE_URL = "http://127.0.0.1:8400/v1"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # Lightwire routes any model name to the policy
DEFAULT_CONCURRENCY = 8
FEEDBACK_TIMEOUT = 30.0

log = logging.getLogger("examples")


class Task(Protocol):
    """One question of an example (a frozen dataclass): what the agent is asked, and where it comes from."""

    @property
    def id(self) -> str: ...
    @property
    def question(self) -> str: ...
    @property
    def family(self) -> str: ...
    @property
    def template(self) -> str: ...


class Turn(Protocol):
    """One model call of an attempt: the response id the client saw, and what went wrong with the reply."""

    @property
    def response_id(self) -> str: ...
    @property
    def error(self) -> str | None: ...


TurnT = TypeVar("TurnT", bound=Turn)


@dataclass
class Attempt(Generic[TurnT]):
    """All the turns of one question, in order; the answer judged is the last turn's."""

    question: str
    turns: list[TurnT] = field(default_factory=list)

    @property
    def response_ids(self) -> list[str]:
        return [turn.response_id for turn in self.turns]

    @property
    def last_response_id(self) -> str | None:
        return self.turns[-1].response_id if self.turns else None

    @property
    def errors(self) -> list[str | None]:
        return [turn.error for turn in self.turns]


@dataclass(frozen=True)
class Example:
    """An example agent and the service around it: what differs between examples."""

    name: str
    families: tuple[str, ...]  # in the order tables show them
    questions: Callable[[Split, int, int], Sequence[Any]]  # (split, n, seed); a longer list starts with a shorter
    solve: Callable[..., Awaitable[Attempt[Any]]]  # (client, task, *, model, temperature): the agent's attempt
    score: Callable[[Any, Any], Awaitable[float]]  # (task, attempt): the reward, in [0, 1]; 1.0 is a success
    details: Callable[[Any], dict[str, Any]]  # what an attempt's record (``--jsonl``) shows of its turns
    judge: str  # a span hook (``module:function``) scoring a recorded call as ``score`` does
    environment: Mapping[str, str] = field(default_factory=dict)  # what ``judge`` needs in the sidecar's process


@dataclass(frozen=True)
class Outcome:
    """One attempt at one task and how it was judged."""

    task: Any
    attempt: Any
    reward: float
    posted: bool

    @property
    def solved(self) -> bool:
        return self.reward == 1.0


def repeat(tasks: Sequence[Task], times: int) -> list[Any]:
    """Every task ``times`` times in a row (a group, for group-relative rewards), with ids ``<id>.<r>``."""
    return [dataclasses.replace(t, id=f"{t.id}.{r}") for t in tasks for r in range(times)]  # type: ignore[type-var]


def feedback_url(base_url: str) -> str:
    """``/feedback`` of the sidecar behind an OpenAI base URL (``.../v1``, or ``.../s/<session>/v1``)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    head, sep, _ = root.rpartition("/s/")
    return f"{head if sep else root}/feedback"


async def post_feedback(http: httpx.AsyncClient, url: str, response_id: str, value: float) -> None:
    """Post ``value`` as the reward of the call that answered ``response_id``; raises on an error status."""
    answer = await http.post(url, json={"response_id": response_id, "reward": value})
    answer.raise_for_status()


async def run_tasks(
    client: openai.AsyncOpenAI,
    example: Example,
    task_list: Sequence[Task],
    *,
    model: str,
    temperature: float,
    feedback: httpx.AsyncClient | None,
    url: str = "",
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: bool = False,
) -> list[Outcome]:
    """Solve every task (``concurrency`` at a time), score it, and post its reward to ``url`` unless ``feedback``
    is ``None``. A task whose calls fail is logged and left out of the outcomes, which keep the tasks' order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(task: Task) -> Outcome | None:
        async with gate:
            try:
                attempt = await example.solve(client, task, model=model, temperature=temperature)
            except openai.APIError as exc:
                log.warning("%s: the model call failed: %s", task.id, exc)
                return None
        value = await example.score(task, attempt)
        posted = False
        if feedback is not None and attempt.last_response_id is not None:
            try:
                await post_feedback(feedback, url, attempt.last_response_id, value)
                posted = True
            except httpx.HTTPError as exc:
                log.warning("%s: feedback was not accepted: %s", task.id, exc)
        return Outcome(task, attempt, value, posted)

    jobs = [asyncio.ensure_future(one(task)) for task in task_list]
    outcomes = []
    try:
        for job in tqdm(asyncio.as_completed(jobs), total=len(jobs), disable=not progress, unit="task"):
            outcome = await job
            if outcome is not None:
                outcomes.append(outcome)
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
    order = {task.id: i for i, task in enumerate(task_list)}
    return sorted(outcomes, key=lambda o: order[o.task.id])


def success_by_family(outcomes: Sequence[Outcome], families: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``family -> (solved, attempted)``, families in the order given (those attempted), then ``all``."""
    table = {family: (0, 0) for family in families}
    for outcome in outcomes:
        solved, attempted = table[outcome.task.family]
        table[outcome.task.family] = (solved + outcome.solved, attempted + 1)
    table = {family: counts for family, counts in table.items() if counts[1]}
    table["all"] = (sum(s for s, _ in table.values()), sum(n for _, n in table.values()))
    return table


def report(outcomes: Sequence[Outcome], families: Sequence[str]) -> str:
    """The success rate per family as a small table, and the mean reward and number of turns."""
    lines = [f"{'family':<10} {'solved':>9} {'rate':>6}"]
    for family, (solved, attempted) in success_by_family(outcomes, families).items():
        lines.append(f"{family:<10} {f'{solved}/{attempted}':>9} {solved / attempted:>6.0%}")
    if outcomes:
        turns = sum(len(o.attempt.turns) for o in outcomes) / len(outcomes)
        mean = sum(o.reward for o in outcomes) / len(outcomes)
        posted = sum(o.posted for o in outcomes)
        lines.append(f"mean reward {mean:.2f}; mean turns {turns:.2f}; feedback posted for {posted} of {len(outcomes)}")
    return "\n".join(lines)


def recorded_call(span: dict[str, Any], index: int) -> tuple[str, str] | None:
    """The question of a recorded call (its message at ``index``, where the agent puts it) and the reply's
    content; None when the call has no message there (it is not the agent's). What a judge hook reads."""
    messages = (span.get("request") or {}).get("messages") or []
    if len(messages) <= index:
        return None
    choices = (span.get("response") or {}).get("choices") or [{}]
    return str(messages[index].get("content") or ""), (choices[0].get("message") or {}).get("content") or ""


def record(example: Example, outcome: Outcome) -> dict[str, Any]:
    """One outcome as a JSON-able dict (for ``--jsonl``)."""
    return {
        "id": outcome.task.id,
        "family": outcome.task.family,
        "template": outcome.task.template,
        "question": outcome.task.question,
        **example.details(outcome.attempt),
        "errors": outcome.attempt.errors,
        "response_ids": outcome.attempt.response_ids,
        "reward": outcome.reward,
        "posted": outcome.posted,
    }


# -- the command line -----------------------------------------------------------------------------------------


def parser(description: str, default_seed: int) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """The command line every example's service takes, and its ``what`` group, for the example's own options."""
    cli = argparse.ArgumentParser(description=description)
    where = cli.add_argument_group("where")
    where.add_argument(
        "--base-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL), help="OpenAI base URL (sidecar)"
    )
    where.add_argument("--model", default=DEFAULT_MODEL, help="model name the agent asks for")
    where.add_argument(
        "--admin-key", default=os.environ.get("LIGHTWIRE_ADMIN_KEY"), help="key for /feedback (default: API key)"
    )
    what = cli.add_argument_group("what")
    what.add_argument("--split", choices=SPLITS, default="train", help="train questions, or held-out ones")
    what.add_argument("--n", type=int, default=20, help="number of questions")
    what.add_argument("--repeat", type=int, default=1, help="attempts per question (a group, for group rewards)")
    what.add_argument("--seed", type=int, default=default_seed, help="seed of the questions and the split")
    how = cli.add_argument_group("how")
    how.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    how.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="questions in flight at once")
    how.add_argument("--no-feedback", action="store_true", help="post no rewards (held-out evaluation)")
    how.add_argument("--jsonl", type=Path, default=None, help="also write one JSON record per attempt here")
    return cli, what


async def run(args: argparse.Namespace, example: Example) -> list[Outcome]:
    """Run the questions the command line asks for, through the sidecar it names."""
    task_list = repeat(example.questions(args.split, args.n, args.seed), args.repeat)
    api_key = os.environ.get("OPENAI_API_KEY") or "none"
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=api_key)
    headers = {"Authorization": f"Bearer {args.admin_key or api_key}"}
    async with client, httpx.AsyncClient(headers=headers, timeout=FEEDBACK_TIMEOUT) as http:
        return await run_tasks(
            client,
            example,
            task_list,
            model=args.model,
            temperature=args.temperature,
            feedback=None if args.no_feedback else http,
            url=feedback_url(args.base_url),
            concurrency=args.concurrency,
            progress=sys.stderr.isatty(),
        )


def main(args: argparse.Namespace, example: Example) -> int:
    """The command: run the questions, write the records, print the table."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        outcomes = asyncio.run(run(args, example))
    except KeyboardInterrupt:
        return 130
    if args.jsonl is not None:
        with args.jsonl.open("w") as out:
            out.writelines(json.dumps(record(example, o)) + "\n" for o in outcomes)
    print(report(outcomes, example.families))
    return 0
