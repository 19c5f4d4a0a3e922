"""Provider models through litellm, and routes: an agent keeps its model name whatever serves it."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Proxy
from tests.fake_upstream import WORDS, FakeUpstream

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def routed(fake: FakeUpstream, start_proxy, monkeypatch: pytest.MonkeyPatch) -> Proxy:
    """A sidecar with an upstream and a provider model (the fake, reached through litellm's OpenAI client)."""
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    return await start_proxy(
        fake.url, provider_models=("openai/teacher",), routes=("gpt-agent=openai/teacher", "local=upstream")
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_a_routed_model_name_reaches_the_provider(routed: Proxy, fake: FakeUpstream, stream: bool) -> None:
    fake.replies["teacher"] = "Answer from the provider."
    client = openai.AsyncOpenAI(base_url=routed.url, api_key="k", max_retries=0)
    if stream:
        text = "".join(
            [
                c.choices[0].delta.content or ""
                async for c in await client.chat.completions.create(
                    model="gpt-agent", messages=MESSAGES, stream=True, temperature=0.5
                )
                if c.choices
            ]
        )
    else:
        done = await client.chat.completions.create(
            model="gpt-agent", messages=MESSAGES, temperature=0.5, extra_body={"api_base": "http://elsewhere.invalid"}
        )
        text = done.choices[0].message.content or ""
    assert text == "Answer from the provider."
    [sent] = fake.requests
    assert sent.body["model"] == "teacher" and sent.body["temperature"] == 0.5
    assert sent.headers["Authorization"] == "Bearer sk-provider"  # the sidecar's key, not the agent's
    [span] = await routed.spans()
    assert (span["provider_name"], span["request_model"], span["http_status"]) == ("litellm", "gpt-agent", 200)
    assert span["response"]["choices"][0]["message"]["content"] == text


async def test_unrouted_names_go_to_the_upstream_and_routes_can_name_it(routed: Proxy, fake: FakeUpstream) -> None:
    client = openai.AsyncOpenAI(base_url=routed.url, api_key="k", max_retries=0)
    for model in ("something-else", "local"):
        done = await client.chat.completions.create(model=model, messages=MESSAGES)
        assert done.choices[0].message.content == "".join(WORDS[:5])
    assert [r.body["model"] for r in fake.requests] == ["something-else", "local"]
    spans = await routed.spans()
    assert [s["provider_name"] for s in spans] == ["openai", "openai"]


async def test_a_provider_error_keeps_its_status(routed: Proxy, fake: FakeUpstream) -> None:
    fake.failures["teacher"] = 429
    client = openai.AsyncOpenAI(base_url=routed.url, api_key="k", max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="openai/teacher", messages=MESSAGES)
    assert "fake failure 429" in str(caught.value)
    [span] = await routed.spans()
    assert span["http_status"] == 429 and span["provider_name"] == "litellm"


async def test_a_route_to_a_backend_the_sidecar_lacks_is_refused(fake: FakeUpstream, start_proxy) -> None:
    proxy = await start_proxy(fake.url, routes=("x=policy",))
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="routed to policy"):
        await client.chat.completions.create(model="x", messages=MESSAGES)
