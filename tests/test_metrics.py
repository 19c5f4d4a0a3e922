"""``GET /metrics``, scraped and parsed as Prometheus does, against the calls, rewards and swaps that were sent."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy
from tests.fake_upstream import FakeUpstream
from tests.test_admin import wait_for_store
from tests.test_ui import admin, chat, root, start_policy, tiny_adapter


async def scrape(proxy: Proxy) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample: name -> sorted labels -> value, once the rows submitted so far are committed."""
    await admin(proxy, "/admin/stats")  # it flushes the store first
    async with aiohttp.ClientSession() as http, http.get(root(proxy) + "/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


async def test_metrics_count_the_calls_and_feedback_sent(proxy: Proxy, fake: FakeUpstream) -> None:
    question = [{"role": "user", "content": "Hi"}]
    spans = [await chat(proxy, "a", question) for _ in range(3)]
    for _ in range(2):
        await chat(proxy, "b", question, stream=True)
    with pytest.raises(openai.InternalServerError):
        await chat(proxy, "b", question, extra_headers={"x-fake-status": "500"})
    async with openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0) as client:
        await client.completions.create(model="text-model", prompt="Count:")
    await admin(proxy, "/feedback", {"span_id": spans[0], "reward": 1})
    await admin(proxy, "/feedback", {"session_id": "a", "reward": 0.5, "name": "style"})
    await wait_for_store(root(proxy), spans=7, feedback=2)

    got = await scrape(proxy)
    chat_route, text_route = "/v1/chat/completions", "/v1/completions"
    assert got["lightwire_calls_total"] == {
        labels(route=chat_route, model="agent", status="200", version="base"): 5,
        labels(route=chat_route, model="agent", status="500", version="base"): 1,
        labels(route=text_route, model="text-model", status="200", version="base"): 1,
    }
    assert got["lightwire_call_duration_seconds_count"] == {labels(route=chat_route): 6, labels(route=text_route): 1}
    assert got["lightwire_time_to_first_chunk_seconds_count"] == {labels(route=chat_route): 2}
    assert got["lightwire_spans_written_total"] == {(): 7}
    assert got["lightwire_feedback_total"] == {labels(source="api"): 2}
    # The reward named "reward" (1 on the first call; "style" is another reward) averaged over the rewarded calls.
    assert got["lightwire_reward_mean"] == {labels(version="base"): 1.0}
    assert got["lightwire_rewarded_calls"] == {labels(version="base"): 1}
    assert got["lightwire_store_pending_rows"] == {(): 0}
    assert got["lightwire_store_rejected_rows_total"] == {(): 0}
    assert "lightwire_active_version_info" not in got  # no policy: this sidecar forwards to an upstream


async def test_metrics_show_swaps_and_the_version_that_served(
    start_proxy: Any, vllm_fake: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_policy(start_proxy, vllm_fake, tmp_path)
    question = [{"role": "user", "content": "Hi"}]
    await chat(proxy, "before", question)
    for name in ("a1", "a2"):
        await admin(proxy, "/admin/adapters", {"path": str(tiny_adapter(tmp_path / name))})
    await admin(proxy, "/admin/adapters/v1/activate", {})
    await admin(proxy, "/admin/adapters/v2/canary", {"fraction": 0.25})
    await chat(proxy, "after", question)
    await wait_for_store(root(proxy), spans=2, feedback=0)
    await admin(proxy, "/admin/rollback", {})  # stops the canary

    got = await scrape(proxy)
    versions = {dict(key)["version"]: value for key, value in got["lightwire_calls_total"].items()}
    assert versions == {"base": 1, "v1": 1} or versions == {"base": 1, "v2": 1}
    assert got["lightwire_active_version_info"] == {labels(version="v1"): 1}
    assert "lightwire_canary_fraction" not in got  # no canary: no sample
    await admin(proxy, "/admin/adapters/v2/canary", {"fraction": 0.25})
    assert (await scrape(proxy))["lightwire_canary_fraction"] == {labels(version="v2"): 0.25}
    transitions = (await scrape(proxy))["lightwire_adapter_transitions_total"]
    # registered twice; v1 activated; v2 a canary, retired by the rollback, a canary again.
    assert transitions == {
        labels(status="candidate"): 2,
        labels(status="active"): 1,
        labels(status="canary"): 2,
        labels(status="retired"): 1,
    }


def histogram(got: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **where: str) -> dict[str, float]:
    """One series of a histogram: its count, its sum and each bucket (``le``) as a cumulative count."""
    series = {"count": got[f"{name}_count"][labels(**where)], "sum": got[f"{name}_sum"][labels(**where)]}
    for key, value in got[f"{name}_bucket"].items():
        bucket = dict(key)
        bound = bucket.pop("le")
        if bucket == where:
            series[bound] = value
    return series


async def test_added_latency_leaves_out_the_time_the_backend_takes(proxy: Proxy, fake: FakeUpstream) -> None:
    """The backend waits 200 ms before answering, and streams its chunks 50 ms apart: that is its own time.
    Lightwire's time is what remains of each call, far less."""
    question = [{"role": "user", "content": "Hi"}]
    stall = {"x-fake-delay": "0.2"}
    slow_chunks = {**stall, "x-fake-chunks": "4", "x-fake-chunk-delay": "0.05"}
    await asyncio.gather(
        *(chat(proxy, f"body{n}", question, extra_headers=stall) for n in range(3)),
        *(chat(proxy, f"stream{n}", question, stream=True, extra_headers=slow_chunks) for n in range(2)),
    )

    got = await scrape(proxy)
    route = "/v1/chat/completions"
    assert got["lightwire_call_duration_seconds_bucket"][labels(route=route, le="0.1")] == 0  # each took 200 ms+
    for stream, calls, backend_s in (("false", 3, 0.2), ("true", 2, 0.2 + 4 * 0.05)):
        added = histogram(got, "lightwire_added_latency_seconds", route=route, stream=stream)
        assert added["count"] == calls
        assert added["0.1"] == calls, added  # each call's added time is well under the backend's 200 ms
        assert 0 < added["sum"] < calls * backend_s / 2
    spans = await proxy.spans()
    for span in spans:
        backend_ms = 200 if not span["request_stream"] else 400
        assert backend_ms <= span["upstream_duration_ms"] < span["duration_ms"]
        assert span["duration_ms"] - span["upstream_duration_ms"] < 100


async def test_waiting_for_the_store_is_added_latency_and_a_wait_that_times_out_is_counted(
    start_proxy: Any, fake: FakeUpstream
) -> None:
    """With one place in the store's queue, a call waits for the call that holds it: time Lightwire adds. When
    the wait outlasts ``store_wait_timeout``, the call gets 503 and ``lightwire_store_unavailable_total`` counts it."""
    proxy = await start_proxy(fake.url, max_pending_spans=1, store_wait_timeout=1.0)
    question = [{"role": "user", "content": "Hi"}]

    async def behind(holder_delay: float) -> Any:
        """A call that holds the only place for ``holder_delay`` seconds, and a streamed call sent behind it."""
        received = fake.received
        holder = asyncio.create_task(chat(proxy, "holder", question, extra_headers={"x-fake-delay": str(holder_delay)}))
        while fake.received == received:  # the holder has its place and reached the backend
            await asyncio.sleep(0.01)
        try:
            return await chat(proxy, "waiter", question, stream=True)
        finally:
            await holder

    await behind(0.4)  # the stream waits ~0.4 s for its place, then is served at once
    with pytest.raises(openai.APIStatusError) as refused:
        await behind(1.6)
    assert refused.value.status_code == 503 and refused.value.code == "store_unavailable"

    got = await scrape(proxy)
    route = "/v1/chat/completions"
    held = histogram(got, "lightwire_added_latency_seconds", route=route, stream="false")
    waited = histogram(got, "lightwire_added_latency_seconds", route=route, stream="true")
    assert held["count"] == 2 and held["0.1"] == 2, held  # the holders spent their time on the backend
    assert waited["count"] == 1 and waited["0.1"] == 0 and waited["sum"] >= 0.25, waited  # no 503: no span
    assert got["lightwire_store_unavailable_total"] == {(): 1}
    assert got["lightwire_store_write_failures_total"] == {(): 0}
    assert got["lightwire_store_writer_restarts_total"] == {(): 0}
