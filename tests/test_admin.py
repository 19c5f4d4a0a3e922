"""``GET /admin/export``, ``GET /admin/stats`` and the ``lightwire export`` / ``stats`` commands: through the
sidecar's HTTP API while it holds the store, from the file once it has stopped."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.admin import META_HEADER
from tests.conftest import Proxy
from tests.fake_upstream import FakeUpstream
from tests.test_export import read_records, record_sessions
from tests.test_serve_process import ServeProcess, free_port

# What :func:`record_sessions` leaves in the store.
SPANS, FEEDBACK = 5, 4


async def lightwire(*args: str) -> tuple[int, str, str]:
    """Run the ``lightwire`` command; no LIGHTWIRE_* variable of the test's environment leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTWIRE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def get(base: str, path: str, key: str | None = None, **params: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http, http.get(base + path, params=params, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def wait_for_store(base: str, *, spans: int, feedback: int, key: str | None = None) -> dict[str, Any]:
    """Wait until the sidecar's store has committed this many spans and feedback rows."""
    for _ in range(200):
        status, _, body = await get(base, "/admin/stats", key)
        assert status == 200, body
        stats = json.loads(body)
        if stats["spans"] >= spans and stats["feedback"] >= feedback:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"the store did not reach {spans} spans and {feedback} feedback rows")


async def test_export_and_stats_while_serving_then_from_the_file(vllm_fake: FakeUpstream, tmp_path: Path) -> None:
    db = tmp_path / "spans.duckdb"
    server = await ServeProcess(vllm_fake.url, db).start()
    base = server.url.removesuffix("/v1")
    try:
        sent = await record_sessions(server.url)
        await wait_for_store(base, spans=SPANS, feedback=FEEDBACK)
        code, out, err = await lightwire(
            "export", "--out", str(tmp_path / "live.jsonl"), "--db", str(db), "--url", base
        )
        assert code == 0, err
        assert out.startswith("5 records (") and f"from {base} to" in out
        code, live_stats, err = await lightwire("stats", "--json", "--db", str(db), "--url", server.url)
        assert code == 0, err
    finally:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert (await server.wait())[0] == 0
    code, out, err = await lightwire("export", "--out", str(tmp_path / "stopped.jsonl"), "--db", str(db), "--url", base)
    assert code == 0, err
    assert f"from {db} to" in out
    assert (tmp_path / "stopped.jsonl").read_bytes() == (tmp_path / "live.jsonl").read_bytes()
    live_meta = json.loads((tmp_path / "live.jsonl.meta.json").read_text())
    assert live_meta["sha256"] == hashlib.sha256((tmp_path / "live.jsonl").read_bytes()).hexdigest()
    records = read_records(tmp_path / "live.jsonl")
    first, pair, other, text = sent.spans
    assert [(r["span_id"], r["reward"]) for r in records] == [
        (first, pytest.approx(0.81)),
        (pair, 0.2),
        (pair, 0.2),
        (other, None),
        (text, 1.0),
    ]
    code, file_stats, err = await lightwire("stats", "--json", "--db", str(db))
    assert code == 0, err
    assert json.loads(file_stats) == json.loads(live_stats)
    code, table, err = await lightwire("stats", "--db", str(db))
    assert code == 0, err
    assert "spans: 5 (1 failed) in 2 sessions; 4 feedback rows" in table
    assert "rewarded sessions: 1 of 2 (50.0%); spans with feedback: 1 of 5 (20.0%)" in table


async def test_the_admin_key_guards_the_export(fake: FakeUpstream, start_proxy, tmp_path: Path) -> None:
    """The proxy runs in this process and holds the file, so the command goes through HTTP."""
    proxy: Proxy = await start_proxy(fake.url, admin_key="adm")
    await openai.AsyncOpenAI(base_url=proxy.url, api_key="k").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    base, out = proxy.url.removesuffix("/v1"), tmp_path / "data" / "d.parquet"
    await wait_for_store(base, spans=1, feedback=0, key="adm")
    command = ["export", "--format", "parquet", "--out", str(out), "--db", str(proxy.config.db), "--url", base]
    code, _, err = await lightwire(*command)
    assert code == 1 and f"the sidecar at {base} answered 401: Incorrect or missing API key" in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    code, _, err = await lightwire(*command, "--admin-key", "adm")
    assert code == 0, err
    assert out.read_bytes()[:4] == b"PAR1" and len(read_records(out)) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.parquet", "d.parquet.meta.json"]


async def test_admin_export_answers_the_file_and_its_metadata(vllm_proxy: Proxy) -> None:
    base = vllm_proxy.url.removesuffix("/v1")
    sent = await record_sessions(vllm_proxy.url)
    await wait_for_store(base, spans=SPANS, feedback=FEEDBACK)
    since = "2000-01-01T00:00:00+00:00"
    status, headers, body = await get(base, "/admin/export", min_reward="0.5", since=since, session_split="1")
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    meta = json.loads(headers[META_HEADER])
    assert meta["sha256"] == hashlib.sha256(body).hexdigest() and meta["records"] == 2
    assert meta["filters"] == {"since": since, "min_reward": 0.5, "session_split": 1.0}
    records = [json.loads(line) for line in body.splitlines()]
    assert [(r["span_id"], r["split"]) for r in records] == [(sent.spans[0], "heldout"), (sent.spans[3], "heldout")]
    status, headers, body = await get(base, "/admin/export", format="parquet", credit_policy="last")
    assert status == 200 and body[:4] == b"PAR1"
    assert json.loads(headers[META_HEADER])["credit_policy"] == "last"
    status, _, body = await get(base, "/admin/stats")
    stats = json.loads(body)
    assert (stats["spans"], stats["failed_spans"], stats["sessions"], stats["rewarded"]) == (5, 1, 2, 3)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"format": "csv"}, "format must be jsonl or parquet"),
        ({"since": "yesterday"}, "Invalid isoformat string"),
        ({"min_reward": "high"}, "could not convert string to float"),
        ({"session_split": "2"}, "session_split must be between 0 and 1"),
        ({"credit_policy": "first"}, "credit_policy must be one of"),
        ({"discount": "x"}, "discount must be a number"),
    ],
)
async def test_admin_export_refuses_bad_parameters(proxy: Proxy, params: dict[str, str], message: str) -> None:
    status, _, body = await get(proxy.url.removesuffix("/v1"), "/admin/export", **params)
    error = json.loads(body)["error"]
    assert status == 400 and message in error["message"] and error["type"] == "invalid_request_error"
    if "format" not in params:  # the credit and reward settings are checked for stats too
        status, _, body = await get(proxy.url.removesuffix("/v1"), "/admin/stats", **params)
        assert status == (400 if {"credit_policy", "discount"} & set(params) else 200), body


async def test_without_a_file_or_a_sidecar_the_command_says_so(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    db = tmp_path / "missing.duckdb"
    code, _, err = await lightwire("stats", "--db", str(db), "--url", url)
    assert code == 1 and f"{db} does not exist, and the sidecar at {url} failed" in err
