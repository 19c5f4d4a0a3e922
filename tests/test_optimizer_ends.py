"""How optimizer runs end when things go wrong: a candidate whose calls fail is never published, a client that
goes away does not stop a run, and a shutdown mid-run ends its canary and records it. The trainer is real (the
embedded model); the fake upstream stands in for vLLM (it loads LoRA adapters by name), since vLLM's behaviour is
not what is tested here, and guards its API with a key as ``vllm serve --api-key`` does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import openai
import pytest

from proxy import config as settings
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello politely."]
VLLM_KEY = "sk-vllm"
training = pytest.mark.training
pytestmark = pytest.mark.timeout(600)


@asynccontextmanager
async def sidecar(model_dir: Path, tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Proxy, FakeUpstream]]:
    """A sidecar whose policy is the fake vLLM, with twelve rewarded one-turn sessions in its store."""
    vllm = await FakeUpstream(vllm=True, api_key=VLLM_KEY).start()
    config = settings.load(
        environ={},
        vllm=(vllm.url,),
        upstream_api_key=VLLM_KEY,
        api_keys=("lw-client",),
        admin_key="lw-admin",
        model_dir=model_dir,
        swap_mode="lora",
        optimize=False,
        eval_split=0.35,
        eval_max_prompts=4,
        adapters_dir=tmp_path / "adapters",
        runs_dir=tmp_path / "runs",
        db=tmp_path / "lw.duckdb",
        **overrides,
    )
    proxy = await Proxy(config).start()
    try:
        for i in range(12):
            agent = openai.AsyncOpenAI(
                base_url=proxy.url,
                api_key="lw-client",
                max_retries=0,
                default_headers={"x-lightwire-session": f"task-{i}"},
            )
            await agent.chat.completions.create(
                model="agent", messages=[{"role": "user", "content": QUESTIONS[i % 4]}], temperature=1.0
            )
            assert (await admin(proxy, "POST", "/feedback", {"session_id": f"task-{i}", "reward": 1.0}))[0] == 200
        yield proxy, vllm
    finally:
        await proxy.stop()
        await vllm.stop()


async def admin(proxy: Proxy, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http,  # a run takes minutes
        http.request(
            method,
            proxy.url.removesuffix("/v1") + path,
            json=body if body is not None else {},
            headers={"Authorization": "Bearer lw-admin"},
        ) as resp,
    ):
        return resp.status, await resp.json()


async def until(check: Callable[[], Any], *, timeout: float = 200) -> Any:
    async with asyncio.timeout(timeout):
        while not (found := await check()):
            await asyncio.sleep(0.2)
    return found


async def canary_serving(proxy: Proxy) -> bool:
    return (await admin(proxy, "GET", "/healthz"))[1]["policy"]["canary"] is not None


@training
async def test_a_candidate_whose_calls_fail_is_retired_however_its_answers_score(
    training_model_dir: Path, tmp_path: Path
) -> None:
    # The judge gives every answer 1: the candidate's error bodies would tie with the active version's answers.
    async with sidecar(training_model_dir, tmp_path, eval_hooks=("tests.reward_hooks:always_one",)) as (proxy, vllm):
        vllm.broken_loras = 500  # the candidate loads and answers its probe, then its chat calls fail
        status, run = await admin(proxy, "POST", "/admin/train")
        assert status == 200 and run["status"] == "rejected", run
        evaluation = run["evaluation"]
        prompts = evaluation["prompts"]
        assert prompts >= 1 and evaluation["failed"] == {"active": 0, "candidate": prompts}
        assert evaluation["promote"] is False and evaluation["means"] is None
        assert f"{prompts} of the candidate's {prompts} held-out calls failed" in run["reason"]
        listing = (await admin(proxy, "GET", "/admin/adapters"))[1]
        assert listing["active"] == "base" and listing["data"][0]["status"] == "retired"
        # Every request the sidecar made of vLLM (the calls, the adapter's load and probe, the evaluation's
        # replays) carried upstream_api_key, never the client's or the admin's key.
        assert {given for path, given in vllm.authorizations if path.startswith("/v1")} == {f"Bearer {VLLM_KEY}"}
        assert "/v1/load_lora_adapter" in {path for path, _ in vllm.authorizations}


@training
async def test_a_client_that_goes_away_does_not_stop_the_run_which_ends_and_is_recorded(
    training_model_dir: Path, tmp_path: Path
) -> None:
    async with sidecar(training_model_dir, tmp_path, eval_timeout=1.0) as (proxy, _):  # online: no judges
        request = asyncio.create_task(admin(proxy, "POST", "/admin/train"))
        await until(lambda: canary_serving(proxy))
        request.cancel()  # the client drops the connection (Ctrl-C on lightwire train)
        with pytest.raises(asyncio.CancelledError):
            await request

        async def ended() -> Any:
            [run] = (await admin(proxy, "GET", "/admin/runs"))[1]["data"]
            return run if run["status"] != "running" else None

        run = await until(ended)
        assert run["status"] == "rejected" and "not enough rewarded sessions" in run["reason"], run
        assert not await canary_serving(proxy)
        assert (await admin(proxy, "GET", "/admin/adapters"))[1]["data"][0]["status"] == "retired"


@training
async def test_a_shutdown_mid_run_ends_its_canary_and_records_the_run_cancelled(
    training_model_dir: Path, tmp_path: Path
) -> None:
    async with sidecar(training_model_dir, tmp_path, eval_timeout=300.0) as (proxy, _):
        request = asyncio.create_task(admin(proxy, "POST", "/admin/train"))
        await until(lambda: canary_serving(proxy))
        await proxy.stop()  # SIGTERM: the run is cancelled before the server waits for requests in flight
        status, answer = await request
        assert status == 503 and "the run was cancelled" in answer["error"]["message"], answer
    [run] = read_rows(tmp_path / "lw.duckdb", "SELECT * FROM runs")
    assert run["status"] == "cancelled" and run["reason"] == "the sidecar shut down during the run"
    assert run["ended_at"] is not None and run["candidate"] == "v1"
    [adapter] = read_rows(tmp_path / "lw.duckdb", "SELECT version, status, message FROM adapters")
    assert adapter["status"] == "retired" and "cancelled" in adapter["message"], adapter


async def test_a_run_a_killed_sidecar_left_running_is_recorded_cancelled_at_the_next_start(
    fake: FakeUpstream, start_proxy: Any, tmp_path: Path
) -> None:
    first = await start_proxy(fake.url)
    await first.stop()
    with duckdb.connect(str(first.config.db)) as con:  # what a SIGKILL mid-run leaves behind
        con.execute(
            "INSERT INTO runs (run_id, status, algorithm, started_at) VALUES ('run-killed', 'running', 'sft', now())"
        )
    second = await start_proxy(fake.url, db=first.config.db)
    [run] = (await admin(second, "GET", "/admin/runs"))[1]["data"]
    assert run["status"] == "cancelled" and run["reason"] == "the sidecar stopped during the run"
    assert run["ended_at"] is not None
