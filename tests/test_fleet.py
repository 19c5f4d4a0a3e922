"""Fleet mode with a folder share: sidecars ship what they record as Parquet segments, feedback sent to another
sidecar than the one that served joins its call at the learner, sidecars follow the registry, one learner holds
the share. Real proxies on loopback, the fake upstream, DuckDB reading the share."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import openai
import orjson

from proxy import config as settings
from proxy.fleet import registry_of
from proxy.policy import Policy, Version
from store import queries
from store.migrations import migrate
from store.segments import Importer, Shipper
from store.share import Lease, Registry, Share, write_registry
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream

MESSAGES = [{"role": "user", "content": "Hi"}]
FAST = {"share_interval": 0.05, "share_poll": 0.05}


async def start(share: Path, db: Path, **overrides: Any) -> Proxy:
    config = settings.load(environ={}, share=str(share), db=db, **FAST, **overrides)
    return await Proxy(config).start()


async def call(proxy: Proxy, session: str, model: str = "agent") -> tuple[str, str]:
    """One chat call in ``session``; returns its span id and response id."""
    client = openai.AsyncOpenAI(
        base_url=proxy.url, api_key="k", max_retries=0, default_headers={"x-lightwire-session": session}
    )
    raw = await client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    return raw.headers["x-lightwire-span-id"], raw.parse().id


async def post(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    root = proxy.url.removesuffix("/v1")
    async with aiohttp.ClientSession() as http, http.post(root + path, data=orjson.dumps(body)) as resp:
        return resp.status, orjson.loads(await resp.read())


async def health(proxy: Proxy) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(proxy.url.removesuffix("/v1") + "/healthz") as resp:
        return await resp.json()


async def until(proxy: Proxy, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll ``/healthz`` until ``check`` holds (a loaded machine may take a while: no time limit but the test's)."""
    while not check(body := await health(proxy)):
        await asyncio.sleep(0.02)
    return body


def in_share(share: Path, sql: str) -> list[tuple[Any, ...]]:
    """Query the share's segments as the learner does: DuckDB over the Parquet files (``{kind}`` globs them)."""
    with duckdb.connect() as con:
        return con.execute(sql.format(**{k: f"read_parquet('{share}/{k}/*.parquet')" for k in KINDS})).fetchall()


KINDS = ("spans", "feedback", "sessions")


async def test_a_sidecar_ships_every_span_feedback_and_session_end_as_segments(tmp_path: Path, fake) -> None:
    share = tmp_path / "share"
    proxy = await start(share, tmp_path / "a.duckdb", upstream=fake.url)
    spans = [await call(proxy, f"s{i % 3}") for i in range(12)]
    assert (await post(proxy, "/feedback", {"span_id": spans[0][0], "reward": 1}))[0] == 200
    assert (await post(proxy, "/sessions/s1/end", {}))[0] == 200
    await until(proxy, lambda body: body["share"]["rows_shipped"] >= 12 + 2)  # shipped while serving
    spans.append(await call(proxy, "s9"))  # and one just before shutdown, shipped on the way out
    await proxy.stop()

    local = {row["span_id"] for row in read_rows(proxy.config.db, "SELECT span_id FROM spans")}
    shipped = [row[0] for row in in_share(share, "SELECT span_id FROM {spans}")]
    assert sorted(shipped) == sorted(local) == sorted(s for s, _ in spans)  # each once
    assert in_share(share, "SELECT span_id, value FROM {feedback}") == [(spans[0][0], 1.0)]
    ended = sorted(in_share(share, "SELECT session_id, end_reason FROM {sessions}"))
    assert ended == [("s0", "shutdown"), ("s1", "ended"), ("s2", "shutdown"), ("s9", "shutdown")]  # open at stop
    names = [p.name for p in (share / "spans").iterdir()]
    assert all(n.endswith(".parquet") for n in names) and len(names) >= 2  # none left half-written
    marks = read_rows(proxy.config.db, "SELECT kind, seq FROM shipped ORDER BY kind")
    assert [m["kind"] for m in marks] == ["feedback", "sessions", "spans"]


async def test_shipments_that_overlap_ship_each_row_once(tmp_path: Path, fake) -> None:
    """A shutdown's last shipment can start while a periodic one still runs in its thread (cancelling a task does
    not stop its thread): shipments side by side must not write the same staged segment or ship a row twice."""
    db = tmp_path / "a.duckdb"
    proxy = await Proxy(settings.load(environ={}, db=db, upstream=fake.url)).start()  # no share: nothing ships
    spans = [(await call(proxy, f"s{i}"))[0] for i in range(6)]
    await proxy.stop()
    share = tmp_path / "share"
    with duckdb.connect(str(db)) as con:
        shipper = Shipper(Share(str(share)), con.cursor)
        with ThreadPoolExecutor(4) as pool:
            shipped = sum(pool.map(lambda _: shipper.ship(), range(4)))
    assert shipped == 6 + 6  # six spans and six session ends (open at stop), each once
    assert sorted(row[0] for row in in_share(share, "SELECT span_id FROM {spans}")) == sorted(spans)
    assert not list(share.rglob("*.tmp*"))


async def test_rows_wait_in_the_store_while_the_share_cannot_take_them(tmp_path: Path, fake) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "spans").write_text("not a folder: every spans segment fails")
    proxy = await start(share, tmp_path / "a.duckdb", upstream=fake.url)
    sent = [await call(proxy, "s") for _ in range(5)]
    share_health = (await until(proxy, lambda body: body["share"]["problem"] is not None))["share"]
    assert "spans" in share_health["problem"] and share_health["segments"] == 0
    (share / "spans").unlink()  # the share recovers
    sent += [await call(proxy, "s") for _ in range(3)]
    await proxy.stop()
    assert sorted(r[0] for r in in_share(share, "SELECT span_id FROM {spans}")) == sorted(s for s, _ in sent)


async def test_feedback_posted_to_another_sidecar_joins_its_call_at_the_learner(tmp_path: Path, fake) -> None:
    share = tmp_path / "share"
    a = await start(share, tmp_path / "a.duckdb", upstream=fake.url)
    b = await start(share, tmp_path / "b.duckdb", upstream=fake.url)
    span_a, response_a = await call(a, "sa")
    span_b, _ = await call(b, "sb")

    status, answer = await post(b, "/feedback", {"response_id": response_a, "reward": 0.25})
    assert (status, answer["attached"], answer["span_id"]) == (202, False, None)
    assert (await post(b, "/feedback", {"span_id": span_a, "reward": 0.5, "name": "other"}))[0] == 202
    assert (await post(a, "/feedback", {"session_id": "sb", "reward": 1}))[0] == 202
    assert (await post(b, "/feedback", {"span_id": span_b, "reward": 0}))[0] == 200  # its own call: attached
    await a.stop()
    await b.stop()

    with duckdb.connect(str(tmp_path / "learner.duckdb")) as con:
        migrate(con)
        assert Importer(Share(str(share)), con.cursor).run() == 2 + 4 + 2  # spans, feedback, sessions ended at stop
        rows = con.execute("SELECT name, value, span_id, session_id FROM feedback ORDER BY value").fetchall()
        # segments carry no id keys: the learner makes them, and finds imported calls by them
        assert queries.find_call(con, response_id=response_a) == (span_a, "sa")
        assert queries.session_record(con, "sb")[0] == 1  # type: ignore[index]  # its row, ended at stop
    assert rows == [
        ("reward", 0.0, span_b, "sb"),
        ("reward", 0.25, span_a, "sa"),  # named by response id at b, served by a
        ("other", 0.5, span_a, "sa"),
        ("reward", 1.0, None, "sb"),
    ]


async def test_without_a_share_feedback_for_an_unknown_call_is_still_404(proxy: Proxy) -> None:
    assert (await post(proxy, "/feedback", {"response_id": "chatcmpl-elsewhere", "reward": 1}))[0] == 404


async def test_the_learner_imports_each_segment_once(tmp_path: Path, fake) -> None:
    share = tmp_path / "share"
    a = await start(share, tmp_path / "a.duckdb", upstream=fake.url)
    for _ in range(3):
        await call(a, "s")
    await a.stop()  # everything shipped
    with duckdb.connect(str(tmp_path / "learner.duckdb")) as con:
        migrate(con)
        importer = Importer(Share(str(share)), con.cursor)
        first = importer.run()
        a = await start(share, tmp_path / "a.duckdb", upstream=fake.url)  # the same sidecar again, one more call
        await call(a, "s")
        await a.stop()
        assert (first, importer.run(), importer.run()) == (4, 2, 0)  # 3 calls, the session ended; 1 call, its 2nd end
        assert con.execute("SELECT count(*), count(DISTINCT span_id) FROM spans").fetchone() == (4, 4)
    assert len({p.name.rsplit("-", 1)[0] for p in (share / "spans").iterdir()}) == 1  # one sidecar id throughout


# -- following the registry ----------------------------------------------------------------------------------------


async def test_sidecars_route_as_the_registry_says_and_record_the_version(tmp_path: Path) -> None:
    vllm = await FakeUpstream(vllm=True).start()
    share = tmp_path / "share"
    try:
        sidecars = [await start(share, tmp_path / f"{n}.duckdb", vllm=(vllm.url,)) for n in "ab"]
        await call(sidecars[0], "before")
        lora = Version("v1", "lw-v1-abc", lora_path=tmp_path / "v1")
        learner = Policy([], base=Version(None, "fake-model"), mode="lora")
        learner.activate(lora)
        write_registry(Share(str(share)), registry_of(learner))
        for sidecar in sidecars:
            await until(sidecar, lambda body: body["policy"]["active"] == "v1")
        for sidecar in sidecars:
            await call(sidecar, "after")
        canary = Version("v2", "lw-v2-def", lora_path=tmp_path / "v2")
        learner.start_canary(canary, 0.5)
        write_registry(Share(str(share)), registry_of(learner))
        for sidecar in sidecars:
            await until(sidecar, lambda body: body["policy"]["canary"] == "v2")
        sessions = [f"c{i}" for i in range(16)]
        for session in sessions:
            for sidecar in sidecars:
                await call(sidecar, session)
        spans = [await sidecar.spans() for sidecar in sidecars]
    finally:
        await vllm.stop()
    assert [(s["session_id"], s["adapter_version"], s["response_model"]) for s in spans[0][:2]] == [
        ("before", None, "fake-model"),
        ("after", "v1", "lw-v1-abc"),
    ]
    arms = [{s["session_id"]: s["adapter_version"] for s in rows if s["session_id"] in sessions} for rows in spans]
    assert arms[0] == arms[1]  # each session on the same arm at both sidecars
    assert set(arms[0].values()) == {"v1", "v2"}
    assert next(s["response_model"] for s in spans[1] if s["adapter_version"] == "v2") == "lw-v2-def"


async def test_a_sidecar_refuses_to_publish_versions_itself(tmp_path: Path) -> None:
    vllm = await FakeUpstream(vllm=True).start()
    try:
        sidecar = await start(tmp_path / "share", tmp_path / "a.duckdb", vllm=(vllm.url,))
        status, body = await post(sidecar, "/admin/adapters/v1/activate", {})
        await sidecar.stop()
    finally:
        await vllm.stop()
    assert status == 400 and "lightwire learn" in body["error"]["message"]


def test_the_registry_names_what_followers_may_serve(tmp_path: Path) -> None:
    policy = Policy([], base=Version(None, "base"), mode="lora")
    policy.activate(Version("v1", "lw-v1", lora_path=tmp_path / "v1"))
    policy.activate(Version("v2", "lw-v2", lora_path=tmp_path / "v2"))
    registry = registry_of(policy)
    assert (registry.active, sorted(registry.versions), registry.base) == ("v2", ["v1", "v2"], "base")
    assert Registry.from_json(registry.to_json()) == registry


# -- one learner ---------------------------------------------------------------------------------------------------


def test_one_learner_holds_the_share_and_a_crashed_ones_lease_lapses(tmp_path: Path) -> None:
    share = Share(str(tmp_path / "share"))
    first, second = Lease(share, "first", ttl=0.6), Lease(share, "second", ttl=0.6)
    assert first.try_take() is None
    held = second.try_take()
    assert held is not None and held["holder"] == "first"
    assert first.renew()
    time.sleep(first.ttl + 0.05)  # first stops renewing (it crashed): its lease lapses, second takes the share
    assert second.try_take() is None
    assert not first.renew()  # first finds out that it lost the share


async def test_a_second_learner_waits_and_says_so(tmp_path: Path) -> None:
    share = tmp_path / "share"
    Lease(Share(str(share)), "other-learner", ttl=60).try_take()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "learn",
        "--share",
        str(share),
        "--vllm",
        "http://127.0.0.1:9/v1",
        "--db",
        str(tmp_path / "learner.duckdb"),
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(60):
            while b"held by the learner other-learner" not in (line := await proc.stderr.readline()):
                assert line, "the learner exited without saying why it waits"
    finally:
        proc.terminate()
        await proc.wait()
    assert not (tmp_path / "learner.duckdb").exists()  # it waited before touching anything
