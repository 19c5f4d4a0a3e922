"""What the example agents share: the question generator, the service's plumbing, and the demo's loop run against
a real Lightwire whose policy is the fake vLLM."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench import learning
from examples import demo, harness, templates
from examples.extraction import agent, tasks
from examples.extraction import service as extraction
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream


class Loud(str):
    """A value that ``{slot:!}`` writes in capitals."""

    def __format__(self, spec: str) -> str:
        return self.upper() if spec == "!" else str(self)


GENERATOR = templates.Generator(
    "test",
    (
        tasks.Template("greet", "easy", ("Hello {who}.", "Hi {who}!", "Hey {who:!}!")),
        tasks.Template("move", "hard", ("{who} went to {where}.", "{who:!} drove to {where}.")),
    ),
    ("easy", "easy", "hard"),
    {"who": tuple(Loud(n) for n in ("ann", "bob", "cid", "dan", "eve", "fay")), "where": ("x", "y", "z")},
)


# -- the generator -----------------------------------------------------------------------------------------


def test_pools_split_every_slot_in_two_fixed_by_the_seed() -> None:
    for seed in (0, 1):
        train, heldout = GENERATOR.pools("train", seed), GENERATOR.pools("heldout", seed)
        for slot, values in GENERATOR.values.items():
            assert sorted(train[slot] + heldout[slot]) == sorted(values)
            assert len(heldout[slot]) == round(len(values) / 3)
    assert GENERATOR.pools("train", 0) == GENERATOR.pools("train", 0)
    assert any(GENERATOR.pools("train", s) != GENERATOR.pools("train", 0) for s in range(1, 5))


def test_questions_cycle_through_the_families_and_read_back_into_their_values() -> None:
    drawn = GENERATOR.draw("heldout", 30, seed=0)
    assert [t.family for t, _, _ in drawn[:6]] == ["easy", "easy", "hard"] * 2
    assert GENERATOR.draw("heldout", 10, seed=0) == drawn[:10]
    assert GENERATOR.draw("heldout", 10, seed=1) != drawn[:10]
    assert {t.name for t, _, _ in drawn} == {"greet", "move"}
    for template, values, question in drawn:
        assert GENERATOR.match(question) == (template, values, "heldout")
    train = GENERATOR.draw("train", 60, seed=0)
    for template, values, question in train:
        assert GENERATOR.match(question) == (template, values, "train")
    assert not {q for _, _, q in train} & {q for _, _, q in drawn}
    withheld = {p for t in GENERATOR.templates for p in t.phrasings} - {
        p for t in GENERATOR.templates for p in GENERATOR.phrasings(t, "train", 0)
    }
    assert len(withheld) == 2 and withheld <= {p for t, _, q in drawn for p in t.phrasings}
    template, values, _ = GENERATOR.match("Hey ANN!")
    assert (template.name, values) == ("greet", {"who": "ann"})  # the spec wrote it in capitals
    assert GENERATOR.match("Hey ann!") is None  # no value is written so with that spec
    assert GENERATOR.match("Hello nobody.") is None


# -- the service's plumbing --------------------------------------------------------------------------------


def test_feedback_is_found_beside_the_base_url_and_repeats_get_their_own_ids() -> None:
    assert harness.feedback_url("http://h:8400/v1") == "http://h:8400/feedback"
    assert harness.feedback_url("http://h:8400/v1/") == "http://h:8400/feedback"
    assert harness.feedback_url("http://h/s/abc/v1") == "http://h/feedback"
    first, second = tasks.questions("train", 2)
    repeated = harness.repeat([first, second], 2)
    assert [t.id for t in repeated] == ["train-0.0", "train-0.1", "train-1.0", "train-1.1"]
    assert [t.question for t in repeated] == [first.question] * 2 + [second.question] * 2


def test_the_table_counts_successes_per_family_in_order() -> None:
    heldout = tasks.questions("heldout", 5)
    rewards = [1.0, 0.75, 1.0, 0.0, 0.0]
    outcomes = [harness.Outcome(t, None, r, posted=False) for t, r in zip(heldout, rewards, strict=True)]
    assert harness.success_by_family(outcomes, tasks.FAMILIES) == {
        "plain": (1, 2), "words": (0, 1), "reordered": (1, 1), "distractor": (0, 1), "all": (2, 5),
    }  # fmt: skip


async def test_a_task_whose_call_fails_is_left_out_and_the_others_keep_their_order(
    fake: FakeUpstream, start_proxy
) -> None:
    proxy: Proxy = await start_proxy(fake.url)
    heldout = tasks.questions("heldout", 4)
    fake.replies = {"good": json.dumps(heldout[2].answer)}
    fake.failures = {"bad": 500}
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    example = extraction.EXAMPLE
    outcomes = await harness.run_tasks(client, example, heldout, model="good", temperature=0.0, feedback=None)
    assert [o.task.id for o in outcomes] == [t.id for t in heldout]
    assert [o.solved for o in outcomes] == [False, False, True, False]
    assert await harness.run_tasks(client, example, heldout, model="bad", temperature=0.0, feedback=None) == []
    lines = harness.report(outcomes, tasks.FAMILIES).splitlines()
    assert lines[-2].split() == ["all", "1/4", "25%"]
    mean = sum(o.reward for o in outcomes) / 4
    assert lines[-1] == f"mean reward {mean:.2f}; mean turns 1.00; feedback posted for 0 of 4"


# -- the demo's loop ---------------------------------------------------------------------------------------


async def test_a_round_with_serve_defaults_measures_works_and_records(
    vllm_fake: FakeUpstream, start_proxy, tmp_path: Path
) -> None:
    """One round of the loop against a sidecar whose policy is the fake vLLM: held-out measured before and
    after, every training attempt rewarded, the table, ``rounds.json`` and the curve written; the demo starts no
    run of its own (with the demo's settings it does: ``tests/test_demo.py``, on the real model)."""
    proxy: Proxy = await start_proxy("", vllm=(vllm_fake.url,), optimize=False)
    heldout = tasks.questions("heldout", 8)
    vllm_fake.replies = {"fake-model": json.dumps(heldout[0].answer)}
    options = demo.Options(
        task="extraction", serve_defaults=True, workdir=tmp_path, rounds=1, heldout=8, questions=4,
        samples=2,
    )  # fmt: skip
    said: list[str] = []
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    async with client, httpx.AsyncClient(timeout=60) as admin:
        rounds = await demo.Rounds(options, tmp_path, extraction.EXAMPLE, proxy.url, client, admin, said.append).run()
    base, first = rounds
    assert (base.round, base.version, first.round) == (0, "base", 1)
    assert base.heldout_solved["all"] == first.heldout_solved["all"] == [1, 8]
    assert base.heldout["plain"] == 0.5 and first.train_attempts == 8
    assert (first.version, first.canary, first.run["status"]) == ("base", None, None)  # no run: optimize is off
    assert said[0].split()[:4] == ["round", "version", "held-out", *tasks.FAMILIES[:1]]
    assert [line.split()[0] for line in said[1:]] == ["0", "1"]
    report = json.loads((tmp_path / "rounds.json").read_text())
    assert report["options"]["serve_defaults"] == "True" and len(report["rounds"]) == 2
    assert (tmp_path / "learning_curve.png").read_bytes().startswith(b"\x89PNG")
    await proxy.stop()
    rewards = read_rows(proxy.config.db, "SELECT value FROM feedback")
    assert len(rewards) == 8 and sum(r["value"] for r in rewards) / 8 == pytest.approx(first.train_reward)


async def test_the_demo_on_a_plain_upstream_learns_by_memory_alone(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lightwire demo --upstream``: a real ``lightwire serve`` that only forwards, so each round's learning is a
    memory run. The model reads the sentence and gets it right only with a worked example before it, or by luck
    (every other sentence): the published bank must reach the next round's held-out calls, and the spans keep the
    calls as the agent made them (no example in them). Which sentences the bank holds, and so which held-out
    sentences find a similar one, depends on the random session ids' train/held-out split."""
    FIRST_CALL = agent.QUESTION_INDEX + 1  # messages in the agent's first call for a sentence

    def lucky(question: str) -> bool:
        return zlib.crc32(question.encode()) % 2 == 0

    def model(messages: list[dict[str, Any]]) -> str:
        question = messages[-1]["content"]
        task = tasks.find(question)
        if task is None:  # the demo's first call, asking whether the model answers at all
            return "Hello"
        shown = len(messages) > FIRST_CALL  # a worked example from the bank came before the agent's own
        return json.dumps(task.answer if shown or lucky(question) else {**task.answer, "quantity": 0})

    fake.reply_to = model
    # The offline evaluation replays the held-out split's first calls: with 32 rewarded sessions, the default
    # tenth leaves none 3 % of the time (0.9 ** 32), and a run with nothing to evaluate on publishes nothing.
    monkeypatch.setenv("LIGHTWIRE_EVAL_SPLIT", "0.3")  # none: 0.7 ** 32 = 1e-5
    options = demo.Options(
        task="extraction", upstream=fake.url, workdir=tmp_path, rounds=1, heldout=16, questions=32, samples=1,
        quiet=True,
    )  # fmt: skip
    base, first = await demo.run_demo(options)
    assert (base.version, first.version, first.run["status"]) == ("base", "m1", "published"), first.run
    assert base.heldout["all"] < 0.5 and first.heldout["all"] > base.heldout["all"] + 0.25  # luck; and examples
    spans = read_rows(tmp_path / "lightwire.duckdb", "SELECT request, memory_version, memory_examples FROM spans")
    served = [s for s in spans if s["memory_version"] == "m1"]  # the second measurement's calls
    assert len(spans) == 1 + 16 + 32 + 16 and len(served) == 16
    helped = [bool(s["memory_examples"]) or lucky(s["request"]["messages"][-1]["content"]) for s in served]
    assert first.heldout_solved["all"] == [sum(helped), 16]  # the spans name the examples the model was shown
    assert max(len(s["request"]["messages"]) for s in spans) == FIRST_CALL


@pytest.mark.parametrize(
    ("task", "upstream", "gain", "group", "met"),
    [
        ("extraction", None, 27.5, 0.0, True),
        ("text2sql", None, 27.5, 0.3, False),  # too few points
        ("text2sql", None, 47.5, 0.0, False),  # no family the base model never solves rose above 20 %
        ("text2sql", None, 47.5, 0.3, True),
        ("text2sql", "http://127.0.0.1:8000/v1", 2.5, 0.0, True),  # memory alone: a rise at all
        ("text2sql", "http://127.0.0.1:8000/v1", 0.0, 0.0, False),
    ],
)
def test_the_learning_report_checks_the_task_s_own_target(
    task: str, upstream: str | None, gain: float, group: float, met: bool
) -> None:
    def row(number: int, minutes: float, rate: float, group: float = 0.0) -> demo.Round:
        return demo.Round(number, f"v{number}", minutes, {"all": rate, "group": group}, {"all": [round(40 * rate), 40]})

    rounds = [row(0, 0.5, 0.40), row(1, 10.0, 0.40 + gain / 100, group), row(2, 21.0, 0.95, 1.0)]  # the last: late
    options = demo.Options(task=task, serve_defaults=True, upstream=upstream)
    report = learning.report(rounds, options, 1300.0, 2.0)
    assert report["target"]["gain_points"] == gain and report["target"]["met"] is met
    best = "v1" if gain else "v0"
    assert report["target"]["best_within_target_time"]["version"] == best
    assert report["target"]["first_gain_minutes"] == (10.0 if gain else 21.0)
    assert report["options"]["task"] == task and report["options"]["serve_defaults"] == "True"
