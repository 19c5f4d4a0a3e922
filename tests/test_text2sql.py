"""The text-to-SQL example: its database, its questions, its reward, and the agent through a real Lightwire proxy."""

from __future__ import annotations

import asyncio
import hashlib
import re
import sqlite3
import sys
from pathlib import Path

import httpx
import openai
import pytest

from examples import harness
from examples.text2sql import agent, db, service, tasks
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream

MODEL = "text2sql-model"


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return db.build(tmp_path_factory.mktemp("text2sql") / "shop.sqlite")


def sdk(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)


class Script(dict):
    """``FakeUpstream.replies`` that answers a model's requests with the next line of a script, then the last."""

    def __init__(self, model: str, lines: list[str]) -> None:
        super().__init__({model: lines[0]})
        self.lines = {model: list(lines)}

    def get(self, model, default=None):
        lines = self.lines.get(model)
        if not lines:
            return default
        return lines.pop(0) if len(lines) > 1 else lines[0]


# -- the database ------------------------------------------------------------------------------------------


def test_the_database_is_the_same_file_for_a_seed_and_another_for_another_seed(tmp_path: Path) -> None:
    def digest(seed: int, name: str) -> str:
        return hashlib.sha256(db.build(tmp_path / name, seed).read_bytes()).hexdigest()

    assert digest(0, "a.sqlite") == digest(0, "b.sqlite")
    assert digest(0, "a.sqlite") != digest(1, "c.sqlite")
    db.main(["--out", str(tmp_path / "cli.sqlite")])
    assert (tmp_path / "cli.sqlite").read_bytes() == (tmp_path / "a.sqlite").read_bytes()


def test_the_tables_are_related_and_every_row_is_referenced(shop: Path) -> None:
    with sqlite3.connect(shop) as con:
        counts = {
            t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("customers", "products", "orders")
        }
        dangling = con.execute(
            "SELECT COUNT(*) FROM orders LEFT JOIN customers ON orders.customer_id = customers.id"
            " LEFT JOIN products ON orders.product_id = products.id WHERE customers.id IS NULL OR products.id IS NULL"
        ).fetchone()[0]
        unordered = con.execute(
            "SELECT (SELECT COUNT(*) FROM customers WHERE id NOT IN (SELECT customer_id FROM orders)),"
            " (SELECT COUNT(*) FROM products WHERE id NOT IN (SELECT product_id FROM orders))"
        ).fetchone()
        ties = con.execute(
            "SELECT (SELECT COUNT(*) - COUNT(DISTINCT age) FROM customers),"
            " (SELECT COUNT(*) - COUNT(DISTINCT price) FROM products)"
        ).fetchone()
    assert counts == {"customers": 40, "products": 24, "orders": 400}
    assert dangling == 0 and unordered == (0, 0) and ties == (0, 0)


# -- the questions -----------------------------------------------------------------------------------------


def test_templates_cover_every_family() -> None:
    by_family = {f: [t.name for t in tasks.TEMPLATES if t.family == f] for f in tasks.FAMILIES}
    assert len(tasks.TEMPLATES) >= 20 and all(len(names) >= 4 for names in by_family.values())
    assert len({t.name for t in tasks.TEMPLATES}) == len(tasks.TEMPLATES)
    assert all(t.slots and len(t.phrasings) >= 2 for t in tasks.TEMPLATES)


def test_train_and_heldout_are_disjoint_and_fixed_by_the_seed() -> None:
    train, heldout = tasks.questions("train", 500), tasks.questions("heldout", 200)
    assert not {t.question for t in train} & {t.question for t in heldout}
    assert not {t.sql for t in train} & {t.sql for t in heldout}
    for slot in tasks.VALUES:
        assert not set(tasks.value_pools("train")[slot]) & set(tasks.value_pools("heldout")[slot]), slot
    # every template keeps one phrasing out of training, and held-out questions use it
    withheld = set()
    for template in tasks.TEMPLATES:
        kept = set(tasks.phrasings(template, "train"))
        assert len(kept) == len(template.phrasings) - 1
        withheld |= set(template.phrasings) - kept
    assert not {phrasing_of(t) for t in train} & withheld
    assert {phrasing_of(t) for t in heldout} & withheld
    # fixed by the seed: the same list again, a longer list starts with it, another seed differs
    assert tasks.questions("heldout", 20) == heldout[:20]
    assert tasks.questions("heldout", 20, seed=1) != heldout[:20]
    assert [t.family for t in heldout[:10]] == [*tasks.FAMILY_CYCLE, *tasks.FAMILY_CYCLE[:3]]


def phrasing_of(task: tasks.Task) -> str:
    """The phrasing a question was made from."""
    [template] = [t for t in tasks.TEMPLATES if t.name == task.template]
    found = [p for p in template.phrasings if re.fullmatch(re.sub(r"\\{\w+\\}", ".+", re.escape(p)), task.question)]
    assert len(found) == 1, task
    return found[0]


@pytest.mark.parametrize("split", tasks.SPLITS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_reference_query_runs_and_has_an_answer(split: tasks.Split, seed: int, tmp_path: Path) -> None:
    shop = db.build(tmp_path / "shop.sqlite", seed)
    questions = tasks.questions(split, 300)
    assert {t.template for t in questions} == {t.name for t in tasks.TEMPLATES}
    for task in questions:
        assert agent.run_sql(shop, task.sql), task


# -- the reward --------------------------------------------------------------------------------------------


def score(shop: Path, task: tasks.Task, sql: str) -> float:
    return service.reward(agent.run_sql(shop, sql), agent.run_sql(shop, task.sql), ordered=task.ordered)


def task_of(template: str, split: tasks.Split = "train") -> tasks.Task:
    return next(t for t in tasks.questions(split, 200) if t.template == template)


def test_reward_is_one_for_the_same_result_set_and_zero_otherwise(shop: Path) -> None:
    city = task_of("customers_in_city")
    name = city.sql.split("'")[1]
    assert score(shop, city, city.sql) == 1.0
    assert score(shop, city, f"SELECT name FROM customers WHERE city = '{name}' ORDER BY age DESC") == 1.0
    with_duplicates = (
        f"SELECT customers.name FROM customers JOIN orders ON customer_id = customers.id WHERE city = '{name}'"
    )
    assert len(agent.run_sql(shop, with_duplicates)) > len(agent.run_sql(shop, city.sql))
    assert score(shop, city, with_duplicates) == 1.0
    assert score(shop, city, "SELECT name FROM customers") == 0.0
    assert score(shop, city, f"SELECT name, age FROM customers WHERE city = '{name}'") == 0.0
    assert service.reward(None, agent.run_sql(shop, city.sql), ordered=False) == 0.0

    grouped = task_of("older_customers_per_city")
    columns_swapped = grouped.sql.replace("SELECT city, COUNT(*)", "SELECT COUNT(*), city")
    assert score(shop, grouped, columns_swapped) == 1.0

    average = task_of("average_price_in_category")
    assert score(shop, average, average.sql.replace("AVG(price)", "SUM(price) / COUNT(*)")) == 1.0
    assert score(shop, average, average.sql.replace("AVG", "MAX")) == 0.0


def test_reward_keeps_row_order_only_when_the_reference_sorts(shop: Path) -> None:
    top = task_of("most_expensive_products")
    assert top.ordered
    k = top.sql.rsplit(" ", 1)[1]
    assert score(shop, top, top.sql) == 1.0
    reversed_order = f"SELECT name FROM (SELECT name, price FROM products ORDER BY price DESC LIMIT {k}) ORDER BY price"
    assert score(shop, top, reversed_order) == 0.0
    assert score(shop, top, f"SELECT name FROM products ORDER BY price LIMIT {k}") == 0.0
    assert service.reward([(1,), (2,)], [(2,), (1,)], ordered=False) == 1.0
    assert service.reward([(1,), (2,)], [(2,), (1,)], ordered=True) == 0.0
    assert service.reward([(0.1 + 0.2,)], [(0.3,)], ordered=False) == 1.0


@pytest.mark.parametrize("seed", [0, 3])
def test_a_question_text_leads_back_to_its_reference_query(seed: int) -> None:
    for split in tasks.SPLITS:
        for task in tasks.questions(split, 150, seed):
            found = tasks.find(task.question)
            assert found is not None, task.question
            assert (found.sql, found.family, found.template) == (task.sql, task.family, task.template)
    assert tasks.find("Which customers live in Atlantis?") is None  # not a city of the database
    assert tasks.find("What is the capital of France?") is None


def test_the_judge_hook_scores_a_recorded_call_as_the_service_would(
    shop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(service.DB_ENV, str(shop))
    task = tasks.questions("heldout", 3)[2]
    messages = [*agent.prompt(shop), {"role": "user", "content": task.question}]

    def span(content: str, history: list[dict[str, str]] = []) -> dict[str, object]:  # noqa: B006
        reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        return {"request": {"messages": messages + history}, "response": reply}

    assert service.judge(span(f"```sql\n{task.sql};\n```")) == 1.0
    retry = [{"role": "assistant", "content": "SELECT"}, {"role": "user", "content": agent.RETRY.format(error="e")}]
    assert service.judge(span(task.sql, retry)) == 1.0  # a later turn of the same question
    assert service.judge(span("SELECT name FROM customers")) == 0.0  # runs, wrong rows
    assert service.judge(span("SELECT nme FROM customers")) == 0.0  # fails
    assert service.judge(span("I do not know.")) == 0.0  # no SQL
    other = {"request": {"messages": [{"role": "user", "content": "What is the capital of France?"}]}}
    assert service.judge(other) is None  # not this agent's call


def test_the_sql_is_read_from_fences_prose_and_the_first_statement() -> None:
    assert agent.parse_sql("```sql\nSELECT name\nFROM customers;\n```") == "SELECT name FROM customers"
    assert agent.parse_sql("Sure! Here it is: select 1; select 2;") == "select 1"
    assert agent.parse_sql("SELECT ';' AS x; DROP TABLE orders") == "SELECT ';' AS x"
    assert agent.parse_sql("SELECT 1\n\nThis query returns one.") == "SELECT 1"
    assert agent.parse_sql("I do not know.") is None


def test_the_agent_cannot_write_and_a_runaway_query_is_stopped(shop: Path) -> None:
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        agent.run_sql(shop, "DELETE FROM orders")
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        agent.run_sql(shop, "SELECT COUNT(*) FROM orders a, orders b, orders c, orders d")


def test_the_prompt_shows_the_schema_and_two_examples(shop: Path) -> None:
    system, *examples = agent.prompt(shop)
    assert "customers(id, name, city, age)" in system["content"]
    assert "orders.customer_id = customers.id" in system["content"]
    assert [m["role"] for m in examples] == ["user", "assistant"] * 2


# -- the agent through Lightwire ---------------------------------------------------------------------------


async def test_a_bad_query_is_sent_back_and_retried_and_the_turns_are_one_session(
    fake: FakeUpstream, start_proxy, shop: Path
) -> None:
    proxy = await start_proxy(fake.url)
    task = task_of("customers_in_city")
    fake.replies = Script(MODEL, ["SELECT nme FROM customers", "```sql\nSELECT nam FROM customers;\n```", task.sql])
    async with httpx.AsyncClient() as http:
        [outcome] = await harness.run_tasks(
            sdk(proxy), service.example(shop), [task], model=MODEL, temperature=1.0, feedback=http,
            url=harness.feedback_url(proxy.url),
        )  # fmt: skip
    attempt = outcome.attempt
    assert attempt.sqls == ["SELECT nme FROM customers", "SELECT nam FROM customers", task.sql]
    assert [t.error for t in attempt.turns] == ["no such column: nme", "no such column: nam", None]
    assert outcome.reward == 1.0 and outcome.posted

    second, third = fake.requests[1].body["messages"], fake.requests[2].body["messages"]
    assert second[-2] == {"role": "assistant", "content": "SELECT nme FROM customers"}
    assert "no such column: nme" in second[-1]["content"] and "no such column: nam" in third[-1]["content"]
    assert third[: len(second)] == second
    assert not [h for seen in fake.requests for h in seen.headers if h.lower().startswith("x-lightwire")]

    spans = await proxy.spans()
    assert [s["response_id"] for s in spans] == attempt.response_ids
    assert len({s["session_id"] for s in spans}) == 1
    assert [s["turn_index"] for s in spans] == [0, 1, 2]
    assert [s["session_source"] for s in spans] == ["new", "linked", "linked"]
    [row] = read_rows(proxy.config.db, "SELECT * FROM feedback")
    assert (row["span_id"], row["session_id"], row["value"]) == (spans[2]["span_id"], spans[0]["session_id"], 1.0)


async def test_the_agent_gives_up_after_three_turns_and_gets_reward_zero(
    fake: FakeUpstream, start_proxy, shop: Path
) -> None:
    proxy = await start_proxy(fake.url)
    fake.replies = {MODEL: "I am not sure which table to use."}
    async with httpx.AsyncClient() as http:
        [outcome] = await harness.run_tasks(
            sdk(proxy), service.example(shop), [task_of("youngest_customers")], model=MODEL, temperature=1.0,
            feedback=http, url=harness.feedback_url(proxy.url),
        )  # fmt: skip
    assert outcome.attempt.sqls == [None, None, None] and outcome.attempt.rows is None
    assert "no SQL query found" in fake.requests[2].body["messages"][-1]["content"]
    spans = await proxy.spans()
    [row] = read_rows(proxy.config.db, "SELECT * FROM feedback")
    assert (row["span_id"], row["value"]) == (spans[-1]["span_id"], 0.0)
    assert [s["turn_index"] for s in spans] == [0, 1, 2]


async def test_concurrent_attempts_stay_in_their_own_sessions(fake: FakeUpstream, start_proxy, shop: Path) -> None:
    proxy = await start_proxy(fake.url)
    fake.replies = {MODEL: "SELECT nme FROM customers"}  # every attempt: 3 failing turns, identical histories too
    questions = tasks.questions("train", 6) * 2
    outcomes = await harness.run_tasks(
        sdk(proxy), service.example(shop), questions, model=MODEL, temperature=1.0, feedback=None
    )
    spans = await proxy.spans()
    assert len(outcomes) == 12 and len(spans) == 36
    sessions: dict[str, list[int]] = {}
    for span in spans:
        sessions.setdefault(span["session_id"], []).append(span["turn_index"])
    assert sorted(sorted(turns) for turns in sessions.values()) == [[0, 1, 2]] * 12


async def test_heldout_evaluation_posts_no_feedback(fake: FakeUpstream, start_proxy, shop: Path) -> None:
    proxy = await start_proxy(fake.url)
    heldout = tasks.questions("heldout", 5)
    fake.replies = {MODEL: heldout[0].sql}
    outcomes = await harness.run_tasks(
        sdk(proxy), service.example(shop), heldout, model=MODEL, temperature=0.0, feedback=None
    )
    assert [o.reward for o in outcomes] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert not any(o.posted for o in outcomes)
    assert len(await proxy.spans()) == 5
    assert read_rows(proxy.config.db, "SELECT * FROM feedback") == []


async def test_the_command_line_runs_questions_and_prints_success_per_family(
    fake: FakeUpstream, start_proxy, tmp_path: Path
) -> None:
    proxy = await start_proxy(fake.url)
    train = tasks.questions("train", 7)
    fake.replies = {MODEL: train[1].sql}  # the aggregate question is answered right, the others wrong
    command = [sys.executable, "-m", "examples.text2sql.service", "--base-url", proxy.url, "--model", MODEL]
    command += ["--split", "train", "--n", "7", "--db", str(tmp_path / "shop.sqlite"), "--jsonl", str(tmp_path / "o")]
    child = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[1]
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[1].split() == ["filter", "0/2", "0%"] and lines[2].split() == ["aggregate", "1/2", "50%"]
    assert lines[6].split() == ["all", "1/7", "14%"]
    assert "feedback posted for 7 of 7" in lines[7]
    assert len((tmp_path / "o").read_text().splitlines()) == 7
    await proxy.stop()
    rewards = read_rows(proxy.config.db, "SELECT value FROM feedback")
    assert sorted(r["value"] for r in rewards) == [0.0] * 6 + [1.0]
