"""Datasets from real calls: records read back equal what was sent and received, rewards are credited, filters
and the train/heldout split hold, in JSONL and Parquet, with a metadata file that describes the data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import openai
import orjson
import pytest

from store import export
from tests.conftest import Proxy
from tests.fake_upstream import PROMPT_IDS

SYSTEM = {"role": "system", "content": "You answer briefly."}


@dataclass
class Recorded:
    """What the agent sent and got back, by span id, for comparing with the dataset."""

    sent: dict[str, Any] = field(default_factory=dict)
    got: dict[str, list[Any]] = field(default_factory=dict)
    spans: list[str] = field(default_factory=list)


async def post_feedback(url: str, body: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url.removesuffix("/v1") + "/feedback", data=orjson.dumps(body)) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def record_sessions(url: str) -> Recorded:
    """Session s1: a chat call, a chat call with n=2, a failed call, a streamed text completion; s2: one chat
    call. s1 is rewarded twice (the latest counts), its n=2 turn has feedback of its own; s2 none."""
    out = Recorded()
    s1 = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0, default_headers={"x-lightwire-session": "s1"})
    s2 = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0, default_headers={"x-lightwire-session": "s2"})
    for client, n, question in ((s1, 1, "What is 2+2?"), (s1, 2, "And 3+3?"), (s2, 1, "Hello?")):
        messages = [SYSTEM, {"role": "user", "content": question}]
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=messages, n=n)
        span_id = raw.headers["x-lightwire-span-id"]
        out.spans.append(span_id)
        out.sent[span_id] = messages
        out.got[span_id] = [c.message.model_dump(exclude_none=True) for c in raw.parse().choices]
    with pytest.raises(openai.InternalServerError):
        await s1.chat.completions.create(model="m", messages=[SYSTEM], extra_headers={"x-fake-status": "500"})
    raw_stream = await s1.completions.with_raw_response.create(model="m", prompt="Count:", stream=True)
    out.spans.append(raw_stream.headers["x-lightwire-span-id"])
    out.sent[out.spans[-1]] = "Count:"
    out.got[out.spans[-1]] = ["".join([chunk.choices[0].text async for chunk in raw_stream.parse()])]
    await post_feedback(url, {"session_id": "s1", "reward": 0.0})
    await post_feedback(url, {"session_id": "s1", "reward": 1.0})
    await post_feedback(url, {"span_id": out.spans[1], "reward": 0.2})
    await post_feedback(url, {"session_id": "s1", "reward": 3.0, "name": "thumbs"})
    return out


@pytest.fixture
async def recorded(vllm_proxy: Proxy) -> tuple[Path, Recorded]:
    """A store holding :func:`record_sessions`'s calls, closed (the proxy stopped)."""
    out = await record_sessions(vllm_proxy.url)
    await vllm_proxy.stop()
    return vllm_proxy.config.db, out


def write(db: Path, path: Path, **options: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with duckdb.connect(str(db), read_only=True) as con:
        meta = export.write(con, path, export.Options(**options))
    return read_records(path), meta


def read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]
    with duckdb.connect() as con:
        cursor = con.execute("SELECT * FROM read_parquet(?)", [str(path)])
        names, kinds = [d[0] for d in cursor.description], [str(d[1]) for d in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:  # JSON columns (prompts of mixed kinds) hold JSON text
        for name, kind in zip(names, kinds, strict=True):
            if kind == "JSON" and row[name] is not None:
                row[name] = json.loads(row[name])
    return rows


async def test_jsonl_records_equal_what_was_sent_and_received(recorded: tuple[Path, Recorded], tmp_path: Path) -> None:
    db, sent = recorded
    records, meta = write(db, tmp_path / "data.jsonl")
    first, pair, other, text = sent.spans
    assert [(r["span_id"], r["choice"]) for r in records] == [(first, 0), (pair, 0), (pair, 1), (other, 0), (text, 0)]
    for r in records:
        assert r["messages"] == r["prompt"] == sent.sent[r["span_id"]]
        assert r["prompt_token_ids"] == PROMPT_IDS
    chat = [r for r in records if r["ability"] == "chat"]
    assert [r["completion"] for r in chat] == [[sent.got[r["span_id"]][r["choice"]]] for r in chat]
    assert all(r["completion"] == [{"role": "assistant", "content": "Hello from the fake upstream"}] for r in chat)
    assert all(r["completion_token_ids"] == [100, 101, 102, 103, 104] for r in chat)
    assert all(r["completion_logprobs"] == [-0.5] * 5 for r in chat)
    [streamed] = [r for r in records if r["ability"] == "text_completion"]
    assert streamed["completion"] == sent.got[text][0] == "Hello from the fake upstream"
    assert streamed["completion_token_ids"] == [200, 201, 202, 203, 204]
    assert streamed["completion_logprobs"] == [-0.25] * 5
    assert [r["turn_index"] for r in records] == [0, 1, 1, 0, 3]  # the failed call was turn 2 of s1
    assert meta["records"] == 5 and meta["sha256"] == export.file_sha256(tmp_path / "data.jsonl")


async def test_rewards_are_credited_to_turns(recorded: tuple[Path, Recorded], tmp_path: Path) -> None:
    """s1 has three successful turns: discounted 0.9 gives 0.81, (its own 0.2), 1.0; s2 has no reward."""
    db, sent = recorded
    first, pair, other, text = sent.spans
    records, _ = write(db, tmp_path / "d.jsonl", credit_policy="discounted", discount=0.9)
    by_span = {r["span_id"]: r for r in records}
    assert by_span[first]["reward"] == pytest.approx(0.81)
    assert [r["reward"] for r in records if r["span_id"] == pair] == [0.2, 0.2]
    assert by_span[text]["reward"] == 1.0 and by_span[text]["reward_model"]["ground_truth"] == 1.0
    assert by_span[other]["reward"] is None and by_span[other]["rewards"] == {}
    assert by_span[first]["rewards"] == {"reward": pytest.approx(0.81), "thumbs": pytest.approx(2.43)}
    assert by_span[pair]["rewards"] == {"reward": 0.2, "thumbs": pytest.approx(2.7)}
    last, _ = write(db, tmp_path / "l.jsonl", credit_policy="last")
    assert [(r["span_id"], r["reward"]) for r in last] == [
        (first, None),
        (pair, 0.2),
        (pair, 0.2),
        (other, None),
        (text, 1.0),
    ]
    broadcast, _ = write(db, tmp_path / "b.jsonl", credit_policy="broadcast", reward_name="thumbs")
    assert [r["reward"] for r in broadcast] == [3.0, 3.0, 3.0, None, 3.0]


async def test_parquet_holds_the_same_records(recorded: tuple[Path, Recorded], tmp_path: Path) -> None:
    db, _ = recorded
    jsonl, _ = write(db, tmp_path / "d.jsonl")
    parquet, meta = write(db, tmp_path / "d.parquet", format="parquet")
    assert meta["format"] == "parquet" and meta["sha256"] == export.file_sha256(tmp_path / "d.parquet")
    assert (tmp_path / "d.parquet").read_bytes()[:4] == b"PAR1"
    assert parquet == jsonl


async def test_parquet_of_chat_calls_has_message_columns_trl_can_read(vllm_proxy: Proxy, tmp_path: Path) -> None:
    client = openai.AsyncOpenAI(base_url=vllm_proxy.url, api_key="k")
    await client.chat.completions.create(model="m", messages=[SYSTEM, {"role": "user", "content": "hi"}])
    await vllm_proxy.stop()
    records, _ = write(vllm_proxy.config.db, tmp_path / "c.parquet", format="parquet")
    with duckdb.connect() as con:
        sql = "DESCRIBE SELECT prompt, completion, rewards FROM read_parquet(?)"
        kinds = {name: kind for name, kind, *_ in con.execute(sql, [str(tmp_path / "c.parquet")]).fetchall()}
    assert kinds == {
        "prompt": 'STRUCT("role" VARCHAR, "content" VARCHAR)[]',
        "completion": 'STRUCT("role" VARCHAR, "content" VARCHAR)[]',
        "rewards": "JSON",
    }
    assert records[0]["prompt"] == [SYSTEM, {"role": "user", "content": "hi"}]


async def test_chat_exports_load_with_hugging_face_datasets_as_trl_reads_them(
    vllm_proxy: Proxy, tmp_path: Path
) -> None:
    import datasets  # TRL's and verl's reader; it comes with trl (the test extra)

    client = openai.AsyncOpenAI(base_url=vllm_proxy.url, api_key="k", max_retries=0)
    done = await client.chat.completions.create(model="m", messages=[SYSTEM, {"role": "user", "content": "hi"}])
    await post_feedback(vllm_proxy.url, {"response_id": done.id, "reward": 1})
    await vllm_proxy.stop()
    for kind in ("jsonl", "parquet"):
        path = tmp_path / f"d.{kind}"
        write(vllm_proxy.config.db, path, format=kind)
        loaded = datasets.load_dataset(
            "json" if kind == "jsonl" else "parquet",
            data_files=str(path),
            split="train",
            cache_dir=str(tmp_path / "hf"),
        )
        assert loaded.num_rows == 1
        row = loaded[0]
        assert row["prompt"] == [SYSTEM, {"role": "user", "content": "hi"}]
        assert row["completion"][0]["role"] == "assistant" and row["reward"] == 1.0
        assert row["data_source"] == "lightwire" and row["prompt_token_ids"] == PROMPT_IDS


async def test_since_and_min_reward_filter_records(recorded: tuple[Path, Recorded], tmp_path: Path) -> None:
    db, sent = recorded
    first, _, other, text = sent.spans
    with duckdb.connect(str(db), read_only=True) as con:
        [(since,)] = con.execute("SELECT start_time FROM spans WHERE span_id = ?", [other]).fetchall()
    late, meta = write(db, tmp_path / "late.jsonl", since=since)
    assert [(r["span_id"], r["reward"]) for r in late] == [(other, None), (text, 1.0)]
    assert meta["filters"]["since"] == since.isoformat()
    good, meta = write(db, tmp_path / "good.jsonl", min_reward=0.5)
    assert [r["span_id"] for r in good] == [first, text] and meta["filters"]["min_reward"] == 0.5
    assert write(db, tmp_path / "none.jsonl", since=datetime(2999, 1, 1, tzinfo=UTC))[0] == []
    empty, _ = write(db, tmp_path / "none.parquet", format="parquet", min_reward=100)
    assert empty == []


async def test_the_split_follows_the_session_and_is_stable(recorded: tuple[Path, Recorded], tmp_path: Path) -> None:
    db, _ = recorded
    records, meta = write(db, tmp_path / "a.jsonl", session_split=0.5)
    again, _ = write(db, tmp_path / "b.jsonl", session_split=0.5)
    splits = {(r["session_id"], r["split"]) for r in records}
    assert splits == {(r["session_id"], r["split"]) for r in again} and len(splits) == 2
    assert splits == {(s, export.split_of(s, 0.5)) for s in ("s1", "s2")}
    assert meta["splits"] == {
        "train": sum(r["split"] == "train" for r in records),
        "heldout": sum(r["split"] == "heldout" for r in records),
    }
    assert {r["split"] for r in write(db, tmp_path / "c.jsonl", session_split=0.0)[0]} == {"train"}
    assert {r["split"] for r in write(db, tmp_path / "d.jsonl", session_split=1.0)[0]} == {"heldout"}
    heldout = sum(export.split_of(f"session-{i}", 0.1) == "heldout" for i in range(4000))
    assert 300 < heldout < 500


async def test_the_metadata_file_describes_the_data(recorded: tuple[Path, Recorded], tmp_path: Path) -> None:
    db, _ = recorded
    path = tmp_path / "out" / "data.jsonl"
    _, meta = write(db, path, credit_policy="last", session_split=0.25, min_reward=0.0)
    on_disk = json.loads((tmp_path / "out" / "data.jsonl.meta.json").read_text())
    assert on_disk == meta
    assert {k: meta[k] for k in ("format", "credit_policy", "discount", "reward_name", "records")} == {
        "format": "jsonl",
        "credit_policy": "last",
        "discount": 0.9,
        "reward_name": "reward",
        "records": 3,
    }
    assert meta["filters"] == {"since": None, "min_reward": 0.0, "session_split": 0.25}
    assert meta["sha256"] == export.file_sha256(path)
    assert datetime.fromisoformat(meta["created_at"]).tzinfo is not None
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.jsonl", "data.jsonl.meta.json"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "csv"}, "format must be jsonl or parquet"),
        ({"credit_policy": "first"}, "credit_policy must be one of"),
        ({"session_split": 1.5}, "session_split must be between 0 and 1"),
        ({"min_reward": float("nan")}, "must be finite"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        export.Options(**options)
