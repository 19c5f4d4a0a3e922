"""Experiential memory: BM25 retrieval of the best-rewarded trajectories, worked examples sent upstream (never to
the client, never into the span's request), and memory banks as versions built, gated, activated and rolled back,
through a real proxy in front of the fake upstream as a plain ``--upstream``."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import subprocess
import sys
from typing import Any

import aiohttp
import bm25s
import duckdb
import openai
import orjson

from proxy.memory import QUERY_TERMS, Bank, Index, conversation_text, terms
from proxy.policy import session_fraction
from store import export
from store.memory import Trajectory
from tests.conftest import Proxy
from tests.fake_upstream import PROMPT_IDS, WORDS, FakeUpstream
from tests.test_admin import lightwire

SYSTEM = {"role": "system", "content": "You write SQLite queries."}
SOLVED = {  # question -> the answer that was rewarded
    "How many orders were shipped to Paris?": "SELECT COUNT(*) FROM orders WHERE city = 'Paris';",
    "List the names of employees hired in 2020.": "SELECT name FROM employees WHERE hired = 2020;",
    "What is the average price of products?": "SELECT AVG(price) FROM products;",
}
HELDOUT = {"How many products cost more than 100?": "SELECT COUNT(*) FROM products WHERE price > 100;"}
SPLIT = 0.5
FAILED = {"Which customers never placed orders?": "SELECT * FROM nothing;"}


def trajectory(i: int, question: str, answer: str, model: str = "agent") -> Trajectory:
    return Trajectory(
        f"t{i}", model, 1.0, ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    )


def test_lookup_ranks_as_bm25s_does_and_keeps_only_matches() -> None:
    corpus = [trajectory(i, q, a) for i, (q, a) in enumerate({**SOLVED, **FAILED}.items())]
    index = Index(corpus)
    reference = bm25s.BM25()
    reference.index([terms(conversation_text(t.messages)) for t in corpus], show_progress=False)
    for query in ("how many orders shipped paris", "employees hired names", "average price products orders"):
        ids, scores = reference.retrieve([terms(query)], k=2, show_progress=False)
        expected = [(corpus[i].id, round(float(s), 4)) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]
        assert [(t.id, round(s, 4)) for t, s in index.lookup(query, 2)] == expected, query
    assert index.lookup("zebra giraffe", 2) == []  # no shared term: nothing, rather than a random example
    [(only, score)] = index.lookup("Paris", 2)
    assert only.id == "t0" and score > 0


def test_the_sidecar_indexes_and_looks_up_without_loading_numba() -> None:
    """bm25s imports numba when it can, for a JIT backend the sidecar never uses; numba and llvmlite would be ~106
    MB of its RSS. In a fresh interpreter (this one may have loaded numba), the whole proxy plus an index built and
    looked up leave neither loaded, though numba is installed (vLLM needs it)."""
    assert importlib.util.find_spec("numba") is not None, "vLLM installs numba; without it this test proves nothing"
    code = """if True:
        import sys
        import proxy.app
        from proxy.memory import Index
        from store.memory import Trajectory
        chat = ({"role": "user", "content": "orders shipped to Paris"}, {"role": "assistant", "content": "SELECT 1;"})
        [(found, _)] = Index([Trajectory("t0", "agent", 1.0, chat)]).lookup("Paris orders", 1)
        print(found.id, sorted(name for name in ("numba", "llvmlite") if name in sys.modules))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["t0", "[]"], out


def test_a_long_conversation_is_looked_up_by_its_rarest_terms() -> None:
    common = " ".join(f"word{i}" for i in range(2 * QUERY_TERMS))  # in every trajectory: worth ~nothing
    corpus = [trajectory(i, f"{common} topic{i}", "ok") for i in range(50)]
    [(found, _)] = Index(corpus).lookup(f"{common} topic37", 1)
    assert found.id == "t37"


def test_a_young_bank_of_one_task_still_gives_examples() -> None:
    """Two solved questions of one kind share all their words: each is in more than half the bank. A call that
    shares only those gets both rather than none (as before: 17 of 948 calls in the
    plain-upstream text-to-SQL run got an example, and memory alone gained nothing)."""
    corpus = [
        trajectory(0, "List the products with a price above 60.", "SELECT name FROM products WHERE price > 60;"),
        trajectory(1, "Which products cost more than 140?", "SELECT name FROM products WHERE price > 140;"),
    ]
    assert len(Index(corpus).lookup("Show the products whose price is below 10.", 2)) == 2
    [(rare, _)] = Index(corpus).lookup("Show the products whose price is below 60.", 2)  # "60" is in one: it decides
    assert rare.id == "t0"


def test_examples_skip_what_the_call_already_has_and_go_after_the_system_messages() -> None:
    fixed = (
        {"role": "user", "content": "Which products cost less than 20?"},
        {"role": "assistant", "content": "SELECT"},
    )
    bank = Bank("m1", [Trajectory("t1", "agent", 1.0, (*fixed, {"role": "user", "content": "orders to Paris"},
                                                       {"role": "assistant", "content": "SELECT 1;"}))])  # fmt: skip
    call = [SYSTEM, *fixed, {"role": "user", "content": "orders to Lyon"}]
    injected = bank.examples("agent", call, 2)
    assert injected is not None and injected.ids == ("t1",)
    assert injected.messages == [SYSTEM, *injected.messages[1:3], *call[1:]]
    assert injected.messages[1:3] == [{"role": "user", "content": "orders to Paris"},
                                      {"role": "assistant", "content": "SELECT 1;"}]  # fmt: skip
    assert not bank.examples("other-model", call, 2)  # banks are per model
    again = [SYSTEM, *fixed, {"role": "user", "content": "orders to Paris"}]  # the very question it solved
    assert bank.examples("agent", again, 2).messages[1:3] == injected.messages[1:3]  # the question and its answer


async def api(proxy: Proxy, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as http:
        url = proxy.url.removesuffix("/v1") + path
        async with http.request(method, url, json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


def session_in(split: str, question: str) -> str:
    return next(s for i in itertools.count() if export.split_of(s := f"{question} #{i}", SPLIT) == split)


async def work(proxy: Proxy, answers: dict[str, str], reward: float, *, split: str = "train") -> None:
    """An agent asks each question in a session of its own, then the service posts the session's reward."""
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    for question, answer in answers.items():
        session = session_in(split, question)
        response = await client.chat.completions.with_raw_response.create(
            model="agent",
            messages=[SYSTEM, {"role": "user", "content": question}],
            extra_headers={"x-fake-content": answer, "x-lightwire-session": session},
        )
        assert response.parse().choices[0].message.content == answer
        await api(proxy, "POST", "/feedback", {"session_id": session, "reward": reward})


async def memory_proxy(fake: FakeUpstream, start_proxy: Any, **overrides: Any) -> Proxy:
    overrides.setdefault("eval_hooks", ("tests.reward_hooks:always_one",))  # offline gate: a tie promotes
    proxy = await start_proxy(fake.url, memory=("agent",), eval_split=SPLIT, **overrides)
    await work(proxy, HELDOUT, 1.0, split="heldout")  # what the offline gate replays; never a worked example
    return proxy


async def test_the_upstream_gets_the_examples_the_client_and_the_span_do_not(
    fake: FakeUpstream, start_proxy: Any
) -> None:
    proxy = await memory_proxy(fake, start_proxy)
    await work(proxy, SOLVED, 1.0)
    await work(proxy, FAILED, 0.0)
    run = await api(proxy, "POST", "/admin/memory/build")
    assert (run["status"], run["candidate"], run["algorithm"]) == ("published", "m1", "memory")
    assert run["data"]["trajectories"] == {"agent": 3}  # the failed session is not a worked example

    question = "How many orders were shipped to Berlin?"
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    call = [SYSTEM, {"role": "user", "content": question}]
    response = await client.chat.completions.with_raw_response.create(model="agent", messages=call)
    span_id = response.headers["x-lightwire-span-id"]
    assert response.parse().choices[0].message.content == "".join(WORDS[:5])  # the fake's own answer, no example
    sent = fake.requests[-1].body["messages"]
    paris = "How many orders were shipped to Paris?"
    assert sent == [
        SYSTEM,
        {"role": "user", "content": paris},
        {"role": "assistant", "content": SOLVED[paris]},
        call[-1],
    ]
    # the only trajectory sharing a term with the call; the failed session's would have (orders) but is no example
    unrelated = [SYSTEM, {"role": "user", "content": "Tell me a joke."}]
    await client.chat.completions.create(model="agent", messages=unrelated)
    assert fake.requests[-1].body["messages"] == unrelated  # nothing similar: nothing added
    await client.chat.completions.create(model="other", messages=call)
    assert fake.requests[-1].body["messages"] == call  # memory is off for this model

    rows = {row["span_id"]: row for row in await proxy.spans()}
    span = rows[span_id]
    assert span["request"]["messages"] == call  # as the client sent it: what training and export read
    paris_span = next(r for r in rows.values() if r["request"]["messages"][-1]["content"] == paris)
    assert span["memory_version"] == "m1"
    assert span["memory_examples"] == [paris_span["span_id"]]  # a trajectory's id: its last turn's span
    unrelated_span, other_span = list(rows.values())[-2:]
    assert (unrelated_span["memory_version"], unrelated_span["memory_examples"]) == ("m1", [])  # served, none fit
    assert (other_span["memory_version"], other_span["memory_examples"]) == (None, None)  # memory off
    assert all(r["memory_version"] is None for r in rows.values() if r["start_time"] < span["start_time"])


async def test_a_bank_is_built_gated_activated_rolled_back_and_kept_across_restarts(
    fake: FakeUpstream, start_proxy: Any, tmp_path: Any
) -> None:
    db = tmp_path / "memory.duckdb"
    proxy = await memory_proxy(fake, start_proxy, db=db, adapters_dir=tmp_path / "adapters")
    assert (await api(proxy, "POST", "/admin/memory/build"))["status"] == "no_data"
    await work(proxy, dict(list(SOLVED.items())[:1]), 1.0)
    assert (await api(proxy, "POST", "/admin/memory/build"))["candidate"] == "m1"
    await work(proxy, dict(list(SOLVED.items())[1:]), 1.0)
    second = await api(proxy, "POST", "/admin/memory/build")
    assert (second["status"], second["parent"], second["data"]["trajectories"]) == ("published", "m1", {"agent": 3})
    listed = await api(proxy, "GET", "/admin/memory")
    assert listed["active"] == "m2" and [b["status"] for b in listed["data"]] == ["retired", "active"]

    assert await api(proxy, "POST", "/admin/memory/rollback") == {"rolled_back": "m2", "active": "m1"}
    assert await api(proxy, "POST", "/admin/memory/rollback") == {"rolled_back": "m1", "active": None}
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    call = [SYSTEM, {"role": "user", "content": "What is the average price of books?"}]
    await client.chat.completions.create(model="agent", messages=call)
    assert fake.requests[-1].body["messages"] == call  # no bank active: nothing added

    await api(proxy, "POST", "/admin/memory/m2/canary", {"fraction": 1.0})
    await client.chat.completions.create(model="agent", messages=call)
    assert len(fake.requests[-1].body["messages"]) == 4  # the canary serves every session at fraction 1
    await api(proxy, "POST", "/admin/memory/m2/activate")
    await proxy.stop()

    again = await memory_proxy(fake, start_proxy, db=db, adapters_dir=tmp_path / "adapters")
    assert (await api(again, "GET", "/admin/memory"))["active"] == "m2"
    client = openai.AsyncOpenAI(base_url=again.url, api_key="k", max_retries=0)
    await client.chat.completions.create(model="agent", messages=call)
    assert len(fake.requests[-1].body["messages"]) == 4  # the active bank serves from the start


async def test_offline_replays_go_over_the_connection_the_calls_left_open(fake: FakeUpstream, start_proxy: Any) -> None:
    """An evaluation's replays are sent by the request path's own client, reusing its kept-alive connection."""
    proxy = await memory_proxy(fake, start_proxy)
    await work(proxy, SOLVED, 1.0)
    assert (await api(proxy, "POST", "/admin/memory/build"))["evaluation"]["prompts"] == 1  # two replays
    ports = [port for path, port in fake.connections if path == "/v1/chat/completions"]
    assert len(ports) == 1 + len(SOLVED) + 2 and set(ports) == {ports[0]}


def first_question(messages: list[dict[str, Any]]) -> str:
    """A model that worked examples confuse: it answers by repeating the first question it is sent."""
    return next(m["content"] for m in messages if m["role"] == "user")


def last_question(messages: list[dict[str, Any]]) -> str:
    """A model that answers the question asked (by repeating it), whatever examples come before it."""
    return [m["content"] for m in messages if m["role"] == "user"][-1]


async def test_a_bank_that_judges_find_worse_is_retired_and_never_serves(fake: FakeUpstream, start_proxy: Any) -> None:
    fake.reply_to = first_question  # given an example, it answers the example's question
    proxy = await memory_proxy(fake, start_proxy, eval_hooks=("tests.reward_hooks:repeats_the_question",))
    await work(proxy, SOLVED, 1.0)
    await work(proxy, {"How many orders were shipped to Rome?": "SELECT 1;"}, 1.0)
    run = await api(proxy, "POST", "/admin/memory/build")
    assert run["status"] == "rejected" and run["evaluation"]["means"]["candidate"] < 1.0
    listed = await api(proxy, "GET", "/admin/memory")
    assert listed["active"] is None and listed["data"][0]["status"] == "retired"


async def test_judges_see_a_replayed_call_as_the_client_made_it(fake: FakeUpstream, start_proxy: Any) -> None:
    """A replay is sent with the bank's examples, but judged as its span would be: with the client's messages. A
    judge reading the question by position would otherwise score an example's question and reject a bank that
    does no harm."""
    fake.reply_to = last_question
    proxy = await memory_proxy(fake, start_proxy, eval_hooks=("tests.reward_hooks:repeats_the_first_question",))
    await work(proxy, SOLVED, 1.0)
    run = await api(proxy, "POST", "/admin/memory/build")
    assert run["evaluation"]["means"] == {"active": 1.0, "candidate": 1.0}
    assert run["status"] == "published"
    assert len(fake.requests[-1].body["messages"]) > 2  # the candidate's replay carried examples


async def test_training_data_is_the_call_as_the_client_sent_it(vllm_fake: FakeUpstream, start_proxy: Any) -> None:
    """On the policy (vLLM logs token ids), a call given examples is exported without the tokens the model saw:
    the trainer tokenizes the client's own messages instead, so that an adapter learns to do without them."""
    proxy = await memory_proxy(vllm_fake, start_proxy, vllm=(vllm_fake.url,), optimize=False)
    await work(proxy, SOLVED, 1.0)
    assert (await api(proxy, "POST", "/admin/memory/build"))["status"] == "published"
    await work(proxy, {"How many orders were shipped to Oslo?": "SELECT 2;"}, 1.0)
    assert len(vllm_fake.requests[-1].body["messages"]) == 4  # the model saw an example
    await proxy.stop()
    with duckdb.connect(str(proxy.config.db), read_only=True) as con:
        records = {r["messages"][-1]["content"]: r for r in export.records(con, export.Options(session_split=SPLIT))}
    remembered, plain = records["How many orders were shipped to Oslo?"], records[next(iter(SOLVED))]
    assert remembered["messages"] == [SYSTEM, {"role": "user", "content": "How many orders were shipped to Oslo?"}]
    assert remembered["prompt_token_ids"] is None and remembered["completion_logprobs"] is None
    assert plain["prompt_token_ids"] == PROMPT_IDS and plain["completion_logprobs"]


async def test_without_judges_a_bank_is_tried_as_a_canary_on_whole_sessions(
    fake: FakeUpstream, start_proxy: Any
) -> None:
    proxy = await start_proxy(
        fake.url, memory=("agent",), eval_split=SPLIT, eval_min_sessions=2, eval_canary_fraction=0.5, eval_timeout=120
    )
    await work(proxy, SOLVED, 1.0)
    build = asyncio.create_task(api(proxy, "POST", "/admin/memory/build"))
    while (await api(proxy, "GET", "/admin/memory"))["canary"] != "m1":
        await asyncio.sleep(0.05)
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    arms: dict[bool, list[str]] = {True: [], False: []}
    for i in itertools.count():
        if min(len(a) for a in arms.values()) >= 2:
            break
        session = f"canary-{i}"
        arms[session_fraction(session) >= 0.5].append(session)
        call = [SYSTEM, {"role": "user", "content": f"How many orders were shipped to city {i}?"}]
        for turn in range(2):  # two turns: a session keeps its bank throughout
            call += [{"role": "assistant", "content": "SELECT 0;"}, {"role": "user", "content": "Again."}] * turn
            await client.chat.completions.create(
                model="agent", messages=call, extra_headers={"x-lightwire-session": session}
            )
            assert (len(fake.requests[-1].body["messages"]) > len(call)) == (session in arms[True])
        await api(proxy, "POST", "/feedback", {"session_id": session, "reward": 1.0})
    run = await build
    assert (run["status"], run["evaluation"]["method"]) == ("published", "online")
    assert run["evaluation"]["arms"]["candidate"]["sessions"] >= 2 and run["evaluation"]["arms"]["active"]["sessions"]
    assert (await api(proxy, "GET", "/admin/memory"))["active"] == "m1"


async def test_the_memory_command_builds_lists_and_rolls_back(fake: FakeUpstream, start_proxy: Any) -> None:
    proxy = await memory_proxy(fake, start_proxy)
    await work(proxy, SOLVED, 1.0)
    base = proxy.url.removesuffix("/v1")
    code, out, err = await lightwire("memory", "--url", base, "build")
    assert code == 0 and orjson.loads(out)["status"] == "published", err
    code, out, err = await lightwire("memory", "--url", base, "list")
    assert code == 0 and "memory on for agent; active m1, canary -" in out, err
    assert "m1  active          3 trajectories" in out
    code, out, err = await lightwire("memory", "--url", base, "rollback")
    assert code == 0 and orjson.loads(out) == {"rolled_back": "m1", "active": None}, err
