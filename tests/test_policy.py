"""Which replica a call gets while servers start, restart or reload weights: a call waits for a reload (seconds)
but gets a 503 with ``Retry-After`` at once while no server is up (a start takes a minute or more)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from proxy.errors import BackendUnavailable
from proxy.http1 import Pool
from proxy.policy import Policy, Replica, Version
from proxy.upstream import Upstream

BASE = Version(None, "base")


async def make_policy(ready: list[bool]) -> tuple[Policy, list[Replica]]:
    session, pool = aiohttp.ClientSession(), Pool()
    replicas = [
        Replica(Upstream(f"http://127.0.0.1:{9000 + i}/v1", session, pool), lambda i=i: ready[i])
        for i in range(len(ready))
    ]
    return Policy(replicas, base=BASE, mode="lora"), replicas


async def test_no_server_up_means_503_at_once() -> None:
    policy, replicas = await make_policy([False, False])
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as raised:
        await policy.acquire("s1")
    assert time.monotonic() - started < 0.5
    assert raised.value.headers["Retry-After"]
    await replicas[0].upstream.session.close()


async def test_a_call_waits_for_a_replica_reloading_weights_and_skips_one_that_is_down() -> None:
    policy, replicas = await make_policy([False, True])
    replicas[1].open.clear()  # reloading weights
    waiting = asyncio.create_task(policy.acquire("s1"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    replicas[1].open.set()
    replica, version = await asyncio.wait_for(waiting, 1)
    assert replica is replicas[1] and version is BASE
    assert policy.in_flight == {"base": 1}
    policy.release(replica, version)
    assert replica.idle.is_set() and not policy.in_flight
    await replicas[0].upstream.session.close()
