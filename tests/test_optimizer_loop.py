"""The optimizer end to end on the real model and a real vLLM: export, train in a child process, evaluate
offline with reward hooks or online as a canary on live sessions, then publish or reject, and record the run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy import config as settings
from proxy.vllm_server import VllmServer
from tests.conftest import Proxy, read_rows
from tests.vllm_fixtures import VLLM_SETUP_TIMEOUT_S

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.training,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.timeout(VLLM_SETUP_TIMEOUT_S + 600),
]

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello politely."]


@asynccontextmanager
async def sidecar(
    server: VllmServer, model_dir: Path, tmp_path: Path, hook: str | None, **overrides: Any
) -> AsyncIterator[Proxy]:
    """A sidecar on the shared vLLM whose span hook (which also scores every call) judges candidates; without
    one, candidates are evaluated online."""
    config = settings.load(
        environ={},
        vllm=(server.base_url + "/v1",),
        model_dir=model_dir,
        swap_mode="merged",
        optimize=False,
        span_hooks=(f"tests.reward_hooks:{hook}",) if hook else (),
        eval_split=0.35,
        eval_max_prompts=4,
        adapters_dir=tmp_path / "adapters",
        runs_dir=tmp_path / "runs",
        db=tmp_path / "lw.duckdb",
        train_learning_rate=1e-3,
        **overrides,
    )
    proxy = await Proxy(config).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def admin(proxy: Proxy, method: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http,  # a run takes minutes
        http.request(method, proxy.url.removesuffix("/v1") + path, json={}) as resp,
    ):
        return resp.status, await resp.json()


async def traffic(proxy: Proxy, *, reward: float | None, sessions: str = "task") -> None:
    """Twelve one-turn sessions, answered by the served model, each rewarded."""
    root = proxy.url.removesuffix("/v1")
    async with aiohttp.ClientSession() as http:
        for i in range(12):
            client = openai.AsyncOpenAI(
                base_url=proxy.url,
                api_key="k",
                max_retries=0,
                default_headers={"x-lightwire-session": f"{sessions}-{i}"},
            )
            await client.chat.completions.create(
                model="agent",
                messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                temperature=1.0,
                max_tokens=24,
            )
            if reward is not None:
                async with http.post(root + "/feedback", json={"session_id": f"{sessions}-{i}", "reward": reward}) as r:
                    assert r.status == 200


async def test_a_run_trains_on_rewarded_turns_and_publishes_a_candidate_as_good_as_the_active(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with sidecar(vllm_server, embedded_model_dir, tmp_path, "always_one") as proxy:
        await traffic(proxy, reward=1.0)
        status, run = await admin(proxy, "POST", "/admin/train")
        assert status == 200, run
        assert run["status"] == "published" and run["candidate"] == "v1" and run["parent"] is None
        assert run["data"]["records"] == 12 and run["data"]["splits"]["heldout"] >= 1
        assert run["training"]["losses"] and all(loss > 0 for loss in run["training"]["losses"])
        assert run["evaluation"]["method"] == "offline" and run["evaluation"]["means"]["candidate"] == 1.0
        assert (await admin(proxy, "GET", "/admin/adapters"))[1]["active"] == "v1"
        # The next calls are served by the published version (merged into the served weights), and the next run
        # learns from them only: v1 learned the earlier ones (train_window = new).
        await traffic(proxy, reward=1.0, sessions="later")
        status, second = await admin(proxy, "POST", "/admin/train")
        assert status == 200 and second["parent"] == "v1", second
        assert second["data"]["records"] == 12 and second["data"]["since"] == run["data"]["until"]
        published = [second["candidate"], "v1"] if second["status"] == "published" else ["v1"]
        for version in published:
            status, rolled = await admin(proxy, "POST", "/admin/rollback")  # leave vLLM with the base weights
            assert status == 200 and rolled["rolled_back"] == version
        assert rolled["active"] == "base"
    served = read_rows(tmp_path / "lw.duckdb", "SELECT adapter_version FROM spans ORDER BY start_time")
    assert [r["adapter_version"] for r in served] == [None] * 12 + ["v1"] * 12
    recorded = read_rows(tmp_path / "lw.duckdb", "SELECT status, candidate, data FROM runs ORDER BY started_at")
    assert [(r["status"], r["candidate"]) for r in recorded] == [("published", "v1"), (second["status"], "v2")]


async def test_a_worse_candidate_is_never_promoted(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with sidecar(vllm_server, embedded_model_dir, tmp_path, "prefers_base") as proxy:
        await traffic(proxy, reward=1.0)
        status, run = await admin(proxy, "POST", "/admin/train")
        assert status == 200 and run["status"] == "rejected", run
        means = run["evaluation"]["means"]
        assert means == {"active": 1.0, "candidate": 0.0}
        listing = (await admin(proxy, "GET", "/admin/adapters"))[1]
        assert listing["active"] == "base" and listing["data"][0]["status"] == "retired"


async def test_a_run_with_nothing_rewarded_ends_without_an_adapter(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with sidecar(vllm_server, embedded_model_dir, tmp_path, None) as proxy:
        await traffic(proxy, reward=None)
        status, run = await admin(proxy, "POST", "/admin/train")
        assert status == 200 and run["status"] == "no_data" and run["candidate"] is None
        assert "no usable data" in run["reason"]
        assert (await admin(proxy, "GET", "/admin/adapters"))[1]["data"] == []
        assert [r["status"] for r in (await admin(proxy, "GET", "/admin/runs"))[1]["data"]] == ["no_data"]


async def ask(proxy: Proxy, session: str) -> str:
    """One more turn in ``session``; the model that answered."""
    client = openai.AsyncOpenAI(
        base_url=proxy.url, api_key="k", max_retries=0, default_headers={"x-lightwire-session": session}
    )
    question = [{"role": "user", "content": QUESTIONS[0]}]
    return (await client.chat.completions.create(model="agent", messages=question, max_tokens=4)).model


async def canary_sessions(proxy: Proxy, run: asyncio.Task[tuple[int, Any]], rewards: dict[str, float]) -> list[str]:
    """While ``run`` evaluates its candidate as a canary: two-turn sessions, each rewarded by the arm that served it
    (``rewards[arm]``). Returns the arm of each session that ended before the evaluation decided."""
    root = proxy.url.removesuffix("/v1")
    arms: list[str] = []
    async with aiohttp.ClientSession() as http:
        while not run.done():
            async with http.get(root + "/healthz") as resp:
                if (await resp.json())["policy"]["canary"] is None:  # still training
                    await asyncio.sleep(1)
                    continue
            if not arms:  # a rewarded session from before the canary carries on: not evidence for either arm
                await ask(proxy, "task-0")
            session = f"eval-{len(arms)}"
            client = openai.AsyncOpenAI(
                base_url=proxy.url, api_key="k", max_retries=0, default_headers={"x-lightwire-session": session}
            )
            messages: list[Any] = [{"role": "user", "content": QUESTIONS[len(arms) % len(QUESTIONS)]}]
            served = []
            for _ in range(2):
                answer = await client.chat.completions.create(
                    model="agent", messages=messages, temperature=1.0, max_tokens=8
                )
                served.append(answer.model)  # the canary answers under its LoRA name, lw-<version>-<hash>
                messages += [{"role": "assistant", "content": answer.choices[0].message.content}]
                messages += [{"role": "user", "content": "Tell me more."}]
            arm = "candidate" if served[0].startswith("lw-") else "active"
            async with http.post(root + "/feedback", json={"session_id": session, "reward": rewards[arm]}) as resp:
                assert resp.status == 200
            if (await admin(proxy, "GET", "/admin/runs"))[1]["data"][-1]["evaluation"] is not None:
                break  # decided during this session: its second turn may have met the swap or the retirement
            assert served[0] == served[1], f"session {session} straddled arms: {served}"
            arms.append(arm)
    return arms


async def evaluate_online(proxy: Proxy, rewards: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
    """Train on rewarded turns, then evaluate the candidate online with rewarded canary sessions."""
    await traffic(proxy, reward=1.0)
    run = asyncio.create_task(admin(proxy, "POST", "/admin/train"))
    arms = await canary_sessions(proxy, run, rewards)
    status, record = await run
    assert status == 200, record
    return record, arms


def assert_whole_sessions(db: Path, sessions: int) -> None:
    """The two turns of every canary session that ended before the decision were served by one version."""
    rows = read_rows(
        db,
        "SELECT session_id, list(DISTINCT coalesce(adapter_version, 'base')) AS versions, count(*) AS turns "
        "FROM spans WHERE session_id LIKE 'eval-%' AND turn_index < 2 GROUP BY session_id",
    )
    clean = {f"eval-{i}" for i in range(sessions)}
    assert clean <= {r["session_id"] for r in rows}
    assert all(len(r["versions"]) == 1 and r["turns"] == 2 for r in rows if r["session_id"] in clean)


async def test_online_a_better_candidate_is_promoted_once_each_arm_has_enough_rewarded_sessions(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    overrides = {"eval_min_sessions": 3, "eval_timeout": 300.0}
    async with sidecar(vllm_server, embedded_model_dir, tmp_path, None, **overrides) as proxy:
        run, arms = await evaluate_online(proxy, {"candidate": 1.0, "active": 0.0})
        assert run["status"] == "published" and run["candidate"] == "v1", run
        evaluation = run["evaluation"]
        assert evaluation["method"] == "online" and evaluation["promote"] is True
        candidate, active = evaluation["arms"]["candidate"], evaluation["arms"]["active"]
        assert (candidate["mean"], active["mean"]) == (1.0, 0.0)
        # It decided at the first poll with 3 rewarded sessions in each arm. Only sessions that began during the
        # canary count: task-0 (rewarded 1.0 before it, served by the active version) would lift the active mean.
        assert 3 <= candidate["sessions"] <= arms.count("candidate") + 1
        assert 3 <= active["sessions"] <= arms.count("active") + 1
        assert (await admin(proxy, "GET", "/admin/adapters"))[1]["active"] == "v1"
        rolled = (await admin(proxy, "POST", "/admin/rollback"))[1]  # leave vLLM with the base weights
        assert rolled == {"rolled_back": "v1", "active": "base"}
    assert_whole_sessions(tmp_path / "lw.duckdb", len(arms))


async def test_online_a_clearly_worse_candidate_is_retired_early_and_stops_serving(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    # eval_min_sessions is far off: only the early one-sided test can end this evaluation in time.
    overrides = {"eval_min_sessions": 100, "eval_timeout": 300.0}
    async with sidecar(vllm_server, embedded_model_dir, tmp_path, None, **overrides) as proxy:
        run, arms = await evaluate_online(proxy, {"candidate": 0.0, "active": 1.0})
        assert run["status"] == "rejected" and run["candidate"] == "v1", run
        evaluation = run["evaluation"]
        assert evaluation["promote"] is False and "clearly worse, stopped early" in evaluation["why"]
        candidate, active = evaluation["arms"]["candidate"], evaluation["arms"]["active"]
        assert (candidate["mean"], active["mean"]) == (0.0, 1.0)
        assert 5 <= candidate["sessions"] < 100 and 5 <= active["sessions"] < 100
        listing = (await admin(proxy, "GET", "/admin/adapters"))[1]
        assert listing["active"] == "base" and listing["data"][0]["status"] == "retired"
        health = (await admin(proxy, "GET", "/healthz"))[1]
        assert health["policy"]["canary"] is None
        # A retired candidate serves no one, not even the sessions it served during the canary.
        for session in [f"eval-{i}" for i, arm in enumerate(arms) if arm == "candidate"][:2]:
            assert not (await ask(proxy, session)).startswith("lw-")
    assert_whole_sessions(tmp_path / "lw.duckdb", len(arms))
