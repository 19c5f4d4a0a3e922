"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, against a sidecar whose
traffic was recorded through it (the fake upstream behind it; as a vLLM server when adapters are involved).

With ``LIGHTWIRE_UI_SCREENSHOTS=DIR`` the tests also save the screenshots the README shows (``docs/ui``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
from playwright.async_api import Browser, Dialog, Page, async_playwright

from tests.conftest import Proxy
from tests.fake_upstream import FakeUpstream
from tests.test_admin import wait_for_store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = os.environ.get("LIGHTWIRE_UI_SCREENSHOTS")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def open_page(browser: Browser, proxy: Proxy, hash_: str = "") -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(root(proxy) + "/ui" + hash_)
    return page


async def shot(page: Page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def root(proxy: Proxy) -> str:
    return proxy.url.removesuffix("/v1")


def tiny_adapter(folder: Path, *, rank: int = 2, width: int = 8) -> Path:
    """A peft LoRA folder that passes the publisher's checks (the fake vLLM never runs it)."""
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {"lora_A": np.full((rank, width), 0.01, "<f4"), "lora_B": np.zeros((width, rank), "<f4")}
    header, offset, data = {}, 0, b""
    for name, array in tensors.items():
        raw = array.tobytes()
        key = f"base_model.model.layers.0.self_attn.q_proj.{name}.weight"
        header[key] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        offset, data = offset + len(raw), data + raw
    encoded = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return folder


async def start_policy(start_proxy: Any, vllm_fake: FakeUpstream, tmp_path: Path, **overrides: Any) -> Proxy:
    """A sidecar whose policy is served by the fake vLLM (adapters load into it by name); no optimizer."""
    proxy: Proxy = await start_proxy(
        vllm_fake.url, vllm=(vllm_fake.url,), optimize=False, adapters_dir=tmp_path / "adapters", **overrides
    )
    return proxy


async def admin(proxy: Proxy, path: str, body: dict[str, Any] | None = None) -> Any:
    async with aiohttp.ClientSession() as http:
        request = http.post(root(proxy) + path, json=body) if body is not None else http.get(root(proxy) + path)
        async with request as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def chat(proxy: Proxy, session: str, messages: list[dict[str, Any]], **extra: Any) -> str:
    """One call in ``session``; returns its span id."""
    headers = {"x-lightwire-session": session}
    async with openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0, default_headers=headers) as client:
        raw = await client.chat.completions.with_raw_response.create(model="agent", messages=messages, **extra)
        if extra.get("stream"):
            [chunk async for chunk in raw.parse()]
        return raw.headers["x-lightwire-span-id"]


async def reward(proxy: Proxy, value: float, **target: str) -> None:
    await admin(proxy, "/feedback", {"reward": value, **target})


async def test_the_overview_chart_has_one_series_per_version(
    browser: Browser, start_proxy: Any, vllm_fake: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_policy(start_proxy, vllm_fake, tmp_path)
    question = [{"role": "user", "content": "What is 2+2?"}]
    sessions = 0
    for version, rewards in ((None, (0.2, 0.4, 0.3)), ("v1", (0.5, 0.7)), ("v2", (0.8, 0.9, 1.0))):
        if version is not None:
            registered = await admin(proxy, "/admin/adapters", {"path": str(tiny_adapter(tmp_path / version))})
            assert registered["version"] == version
            await admin(proxy, f"/admin/adapters/{version}/activate", {})
        for value in rewards:
            sessions += 1
            await chat(proxy, f"s{sessions}", question)
            await reward(proxy, value, session_id=f"s{sessions}")
    await wait_for_store(root(proxy), spans=sessions, feedback=sessions)

    page = await open_page(browser, proxy)
    await page.wait_for_selector("svg.chart")
    series = page.locator("svg.chart g.series")
    assert await series.evaluate_all("gs => gs.map(g => g.dataset.version)") == ["base", "v1", "v2"]
    assert await series.evaluate_all("gs => gs.map(g => g.querySelectorAll('circle').length >= 1)") == [True] * 3
    assert await page.text_content("#active-version") == "v2"
    *cards, added = await page.locator(".card .value").all_text_contents()
    assert cards == ["8", "8", "100.0 %", f"{sum((0.2, 0.4, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0)) / 8:.3f}"]
    latency = (await admin(proxy, "/admin/overview"))["latency"]  # the time Lightwire added to the 8 calls
    assert latency["calls"] == 8 and 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert added == f"{latency['p50_ms']:.2f} ms"
    await shot(page, "overview")


async def test_a_session_page_shows_the_turns_and_the_rewards_posted(
    browser: Browser, proxy: Proxy, fake: FakeUpstream
) -> None:
    system = {"role": "system", "content": "You look things up."}
    first = [system, {"role": "user", "content": "Where is the Louvre?"}]
    span = await chat(proxy, "trip", first)
    tool_call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "Louvre"}'}}
    second = [
        *first,
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Paris, rue de Rivoli"},
    ]
    await chat(proxy, "trip", second, stream=True)
    with pytest.raises(openai.InternalServerError):
        await chat(proxy, "broken", first, extra_headers={"x-fake-status": "500"})
    await admin(proxy, "/feedback", {"span_id": span, "reward": 0.25, "name": "helpful", "comment": "too vague"})
    await admin(proxy, "/feedback", {"session_id": "trip", "reward": 1, "comment": "found it"})
    await wait_for_store(root(proxy), spans=3, feedback=2)

    page = await open_page(browser, proxy, "#/sessions")
    await page.wait_for_selector("table a[href='#/session/trip']")
    await page.select_option("select[name=status]", "failed")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_function("location.hash.includes('status=failed')")
    await page.wait_for_selector("table a[href='#/session/trip']", state="detached")  # the filtered table is in
    rows = await page.locator("tbody tr").all_inner_texts()
    assert len(rows) == 1 and "broken" in rows[0]
    await page.click("a:text('clear')")
    await page.click("a[href='#/session/trip']")
    await page.wait_for_selector("article.turn")
    turns = page.locator("article.turn")
    assert await turns.count() == 2
    first_turn, second_turn = await turns.all_inner_texts()
    assert "Where is the Louvre?" in first_turn and "Hello from the fake upstream" in first_turn
    assert "helpful 0.25 (too vague)" in first_turn
    # The second turn shows what is new, the tool call the agent put in its history and the tool's result, not the
    # first question again.
    assert 'lookup({"q": "Louvre"})' in second_turn and "Paris, rue de Rivoli" in second_turn
    assert "Where is the Louvre?" not in second_turn and "first chunk" in second_turn
    rows = await page.locator("section:has(h2:text('Rewards')) tbody tr").all_inner_texts()
    assert [row.split("\t")[:5] for row in rows] == [
        ["helpful", "0.250", "turn 0", "api", "too vague"],
        ["reward", "1.000", "session", "api", "found it"],
    ]
    await shot(page, "session")


async def test_the_activate_button_changes_the_version_that_serves_the_next_call(
    browser: Browser, start_proxy: Any, vllm_fake: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_policy(start_proxy, vllm_fake, tmp_path)
    registered = await admin(proxy, "/admin/adapters", {"path": str(tiny_adapter(tmp_path / "a1"))})
    page = await open_page(browser, proxy, "#/adapters")
    button = page.locator("button.activate[data-version=v1]")
    questions: list[str] = []

    async def answer(dialog: Dialog, accept: bool) -> None:
        questions.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())

    page.once("dialog", lambda dialog: answer(dialog, False))
    await button.click()
    assert questions == ["Serve v1 to every new session?"]
    assert (await admin(proxy, "/admin/adapters"))["active"] == "base"

    page.once("dialog", lambda dialog: answer(dialog, True))
    await button.click()
    await page.wait_for_selector("tr:has(td:text-is('v1')) .badge.active")
    await chat(proxy, "after", [{"role": "user", "content": "Hi"}])
    assert vllm_fake.requests[-1].body["model"] == registered["served_name"]
    await wait_for_store(root(proxy), spans=1, feedback=0)
    assert [t["version"] for t in (await admin(proxy, "/admin/sessions/after"))["turns"]] == ["v1"]
    await shot(page, "adapters")


async def test_with_an_admin_key_the_page_asks_for_it_and_the_data_stays_guarded(
    browser: Browser, start_proxy: Any, fake: FakeUpstream
) -> None:
    proxy: Proxy = await start_proxy(fake.url, admin_key="adm", api_keys=("client",))
    async with aiohttp.ClientSession() as http:
        for path in ("/admin/overview", "/admin/sessions", "/metrics"):
            async with http.get(root(proxy) + path, headers={"Authorization": "Bearer client"}) as resp:
                assert resp.status == 401, path
    page = await open_page(browser, proxy)
    await page.fill("form.login input[name=key]", "wrong")
    await page.click("form.login button")
    await page.wait_for_selector("form.login:has-text('That key was refused.')")
    await page.fill("form.login input[name=key]", "adm")
    await page.click("form.login button")
    await page.wait_for_selector("main[data-page=overview] .cards")
    assert await page.locator("form.login").count() == 0
