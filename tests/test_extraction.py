"""The extraction example: its sentences, its reward, and the agent through a real Lightwire, in process and as
``lightwire serve``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import httpx
import openai
import pytest

from examples import harness
from examples.extraction import agent, service, tasks
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream
from tests.test_serve_process import ServeProcess

MODEL = "extraction-model"
ROOT = Path(__file__).parents[1]


def reply(task: tasks.Task, **changes: object) -> str:
    """The JSON a model would answer for ``task``, with some fields changed."""
    return json.dumps({**task.answer, **changes})


# -- the sentences -----------------------------------------------------------------------------------------


def test_sentences_are_fixed_by_the_seed_and_cycle_through_the_families() -> None:
    heldout = tasks.questions("heldout", 40)
    assert tasks.questions("heldout", 20) == heldout[:20]
    assert tasks.questions("heldout", 20, seed=1) != heldout[:20]
    assert [t.family for t in heldout[:6]] == [*tasks.FAMILIES, *tasks.FAMILIES[:2]]
    assert {t.template for t in heldout} == {t.name for t in tasks.TEMPLATES}
    assert len({t.question for t in heldout}) == len(heldout)


def test_train_and_heldout_share_no_sentence_name_city_or_item() -> None:
    train, heldout = tasks.questions("train", 800), tasks.questions("heldout", 300)
    assert not {t.question for t in train} & {t.question for t in heldout}
    for key in ("name", "city", "item"):
        assert not {t.answer[key] for t in train} & {t.answer[key] for t in heldout}, key
    # one phrasing of every template is never used in training; held-out sentences use it
    for template in tasks.TEMPLATES:
        assert len(tasks.GENERATOR.phrasings(template, "train", 0)) == len(template.phrasings) - 1


@pytest.mark.parametrize("seed", [0, 5])
def test_every_sentence_states_its_answer_and_leads_back_to_it(seed: int) -> None:
    for split in tasks.SPLITS:
        for task in tasks.questions(split, 200, seed):
            answer = task.answer
            assert set(answer) == set(tasks.KEYS) and type(answer["quantity"]) is int
            assert answer["name"] in task.question and answer["city"] in task.question
            assert f"{tasks.Item(answer['item']):s}" in task.question
            words = {str(answer["quantity"]), tasks.WORDS[answer["quantity"]], tasks.WORDS[answer["quantity"]].title()}
            assert any(w in task.question.split() for w in words), task.question
            found = tasks.find(task.question)
            assert found is not None and (found.answer, found.template) == (answer, task.template), task.question
    assert tasks.find("Anna Berg from Atlantis ordered 4 lamps.") is None  # not a city of the generator
    assert tasks.find("What is the capital of France?") is None


def test_items_are_written_in_the_plural_and_quantities_in_words() -> None:
    assert f"{tasks.Item('scarf'):s} {tasks.Item('lamp'):s} {tasks.Item('lamp')}" == "scarves lamps lamp"
    assert f"{tasks.Quantity(7):w} {tasks.Quantity(12):W} {tasks.Quantity(3)}" == "seven Twelve 3"


# -- the reward --------------------------------------------------------------------------------------------


def test_the_reward_is_the_fraction_of_fields_exactly_right() -> None:
    task = tasks.questions("train", 1)[0]
    assert service.reward(task.answer, task.answer) == 1.0
    assert service.reward({**task.answer, "quantity": float(task.answer["quantity"])}, task.answer) == 1.0
    assert service.reward({**task.answer, "quantity": str(task.answer["quantity"])}, task.answer) == 0.75
    assert service.reward({**task.answer, "city": "Bergamo", "item": "x"}, task.answer) == 0.5
    assert service.reward({**task.answer, "note": "rush"}, task.answer) == 0.8  # an extra key is a wrong field
    assert service.reward({"quantity": task.answer["quantity"]}, task.answer) == 0.25
    assert service.reward(None, task.answer) == 0.0
    assert service.reward({"quantity": True}, {"quantity": 1}) == 0.0


def test_no_wrong_answer_gets_a_full_reward() -> None:
    """Every answer that differs from the right one in any field (another value of the pools, the plural, the
    case, spacing, the quantity as a word or a string) scores below 1."""
    for task in tasks.questions("heldout", 40):
        answer = task.answer
        wrong = [
            *({"name": n} for n in tasks.NAMES if n != answer["name"]),
            *({"city": c} for c in tasks.CITIES if c != answer["city"]),
            *({"item": i} for i in tasks.ITEMS if i != answer["item"]),
            *({"quantity": q} for q in range(13) if q != answer["quantity"]),
            {"name": answer["name"].upper()},
            {"name": answer["name"].split()[0]},
            {"city": answer["city"] + " "},
            {"item": f"{tasks.Item(answer['item']):s}"},
            {"quantity": tasks.WORDS[answer["quantity"]]},
            {"quantity": str(answer["quantity"])},
            {"quantity": None},
        ]
        for changes in wrong:
            assert service.reward({**answer, **changes}, answer) < 1.0, changes
        for key in tasks.KEYS:
            assert service.reward({k: v for k, v in answer.items() if k != key}, answer) < 1.0


def test_the_answer_is_read_from_prose_and_fences_and_a_missing_key_is_named() -> None:
    content = 'Sure:\n```json\n{"name": "A B", "city": "C", "item": "d", "quantity": 2}\n```'
    assert agent.parse(content) == ({"name": "A B", "city": "C", "item": "d", "quantity": 2}, None)
    assert agent.parse("I do not know.") == (None, "no JSON object found in the answer")
    assert agent.parse('{"name": "A B", "city": }')[1] == "invalid JSON: Expecting value"
    assert agent.parse('{"name": "A B", "city": "C"}') == ({"name": "A B", "city": "C"}, 'missing "item", "quantity"')


def test_the_judge_hook_scores_a_recorded_call_as_the_service_would() -> None:
    task = tasks.questions("heldout", 3)[2]
    messages = [*agent.prompt(), {"role": "user", "content": task.question}]

    def span(content: str, history: list[dict[str, str]] = []) -> dict[str, object]:  # noqa: B006
        answer = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        return {"request": {"messages": messages + history}, "response": answer}

    assert service.judge(span(reply(task))) == 1.0
    retry = [{"role": "assistant", "content": "?"}, {"role": "user", "content": agent.RETRY.format(error="e")}]
    assert service.judge(span(reply(task), retry)) == 1.0  # a later turn of the same sentence
    assert service.judge(span(reply(task, city="Bergamo"))) == 0.75
    assert service.judge(span("I do not know.")) == 0.0
    other = {"request": {"messages": [{"role": "user", "content": "What is the capital of France?"}]}}
    assert service.judge(other) is None  # not this agent's call


# -- the agent through Lightwire ---------------------------------------------------------------------------


async def test_an_answer_without_json_is_sent_back_and_the_turns_are_one_session(
    fake: FakeUpstream, start_proxy
) -> None:
    proxy: Proxy = await start_proxy(fake.url)
    task = tasks.questions("train", 1)[0]
    fake.replies = {MODEL: "The order is by " + task.answer["name"]}
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    async with httpx.AsyncClient() as http:
        [outcome] = await harness.run_tasks(
            client, service.EXAMPLE, [task], model=MODEL, temperature=1.0, feedback=http,
            url=harness.feedback_url(proxy.url),
        )  # fmt: skip
    assert [t.error for t in outcome.attempt.turns] == ["no JSON object found in the answer"] * agent.MAX_TURNS
    assert outcome.reward == 0.0 and outcome.posted
    assert "no JSON object found" in fake.requests[1].body["messages"][-1]["content"]
    spans = await proxy.spans()
    assert [s["session_source"] for s in spans] == ["new", "linked"]
    [row] = read_rows(proxy.config.db, "SELECT * FROM feedback")
    assert (row["span_id"], row["value"]) == (spans[-1]["span_id"], 0.0)


async def test_the_agent_runs_against_lightwire_serve_through_openai_base_url(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """End to end, as a user runs it: ``lightwire serve --upstream``, and the service's command line with only
    ``OPENAI_BASE_URL`` pointing at it; every call is a span, every reward is feedback on it."""
    store = tmp_path / "lightwire.duckdb"
    serve = await ServeProcess(fake.url, store).start()
    try:
        train = tasks.questions("train", 3)
        fake.replies = {MODEL: reply(train[0])}  # right for the first sentence; for the others, some fields
        command = [sys.executable, "-m", "examples.extraction.service", "--model", MODEL, "--n", "3"]
        command += ["--jsonl", str(tmp_path / "attempts.jsonl")]
        env = {**os.environ, "OPENAI_BASE_URL": serve.url, "OPENAI_API_KEY": "k"}
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env
        )
        out, err = await asyncio.wait_for(child.communicate(), timeout=60)
        assert child.returncode == 0, err.decode()
    finally:
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        code, log = await serve.wait()
    assert code == 0, log
    lines = out.decode().splitlines()
    assert lines[-2].split() == ["all", "1/3", "33%"]
    assert "feedback posted for 3 of 3" in lines[-1]
    attempts = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    expected = [service.reward(json.loads(reply(train[0])), t.answer) for t in train]
    assert [a["reward"] for a in attempts] == expected and expected[0] == 1.0 and max(expected[1:]) < 1.0

    spans = read_rows(store, "SELECT * FROM spans ORDER BY start_time")
    assert len(spans) == 3 and {s["http_status"] for s in spans} == {200}
    assert {s["request"]["messages"][-1]["content"] for s in spans} == {t.question for t in train}
    feedback = read_rows(store, "SELECT * FROM feedback")
    by_span = {s["span_id"]: s["response_id"] for s in spans}
    assert sorted((by_span[f["span_id"]], f["value"]) for f in feedback) == sorted(
        (a["response_ids"][-1], a["reward"]) for a in attempts
    )
    assert not [h for seen in fake.requests for h in seen.headers if h.lower().startswith("x-lightwire")]
