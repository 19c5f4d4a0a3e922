"""Fleet mode with an S3 share: moto's S3 server on loopback, s3fs as the client, the same sidecar and learner code
as with a folder."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from proxy import config as settings
from store.migrations import migrate
from store.segments import Importer
from store.share import Lease, Registry, Share, read_registry, write_registry
from tests.conftest import Proxy
from tests.test_fleet import call, post

BUCKET = "lightwire-fleet"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3 API on a loopback port, with a bucket; its URL (every fsspec/s3fs client here uses it)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    # moto keeps its buckets per process, not per server: start from none
    urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset", method="POST")).close()
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(anon=False).mkdir(BUCKET)
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


async def test_a_sidecar_ships_to_s3_and_the_learner_imports_from_it(s3: str, fake, tmp_path: Path) -> None:
    location = f"s3://{BUCKET}/prod"
    config = settings.load(environ={}, upstream=fake.url, share=location, db=tmp_path / "a.duckdb", share_interval=0.05)
    sidecar = await Proxy(config).start()
    sent = [await call(sidecar, "s1") for _ in range(4)]
    status, _ = await post(sidecar, "/feedback", {"response_id": "chatcmpl-served-elsewhere", "reward": 1})
    await asyncio.sleep(0.3)
    await sidecar.stop()
    assert status == 202

    listed = s3fs.S3FileSystem().ls(f"{BUCKET}/prod/spans", detail=False)
    assert listed and all(name.endswith(".parquet") for name in listed)  # no staged file left in the bucket
    with duckdb.connect(str(tmp_path / "learner.duckdb")) as con:
        migrate(con)
        share = Share(location, cache_dir=tmp_path / "cache")
        assert Importer(share, con.cursor).run() == 4 + 1 + 1  # calls, feedback, session s1 ended at stop
        spans = {row[0] for row in con.execute("SELECT span_id FROM spans").fetchall()}
        feedback = con.execute("SELECT response_id, value FROM feedback").fetchall()
    assert spans == {span_id for span_id, _ in sent}
    assert feedback == [("chatcmpl-served-elsewhere", 1.0)]


def test_registry_and_lease_on_s3(s3: str) -> None:
    share = Share(f"s3://{BUCKET}/prod")
    assert read_registry(share) is None
    registry = Registry(versions={"v1": {"served_name": "lw-v1", "lora_path": "/adapters/v1"}}, active="v1")
    write_registry(share, registry)
    assert read_registry(share) == registry
    first, second = Lease(share, "first", ttl=30), Lease(share, "second", ttl=30)
    assert first.try_take() is None
    assert (second.try_take() or {}).get("holder") == "first"
