"""``lightwire learn --share LOCATION --vllm URL [--vllm URL2]``: the one learner of a fleet of sidecars.

Read it top to bottom:

1. **Hold the share.** Take its lease (:class:`store.share.Lease`); while another learner holds it, wait and say
   so. Renew it every third of ``lease_ttl``; a learner that finds it taken stops (it had lapsed).
2. **Gather.** Every ``share_interval`` seconds, import every sidecar's new segments into this learner's own
   store (``--db``): spans, feedback (joined to its call wherever that was served) and session ends.
3. **Optimize**, with the same loop as a single sidecar (:class:`optimizers.loop.Optimizer`): export, credit,
   train, evaluate, publish. Versions are loaded into every ``--vllm`` replica as LoRA adapters.
4. **Publish the registry.** After every change (a canary started, a version activated, retired, rolled back),
   ``registry.json`` in the share is rewritten whole (temporary name, then rename); the sidecars read it every
   ``share_poll`` seconds and route to what it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from optimizers.loop import Optimizer
from proxy.backends import Backends, backends
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.fleet import open_share, registry_of
from proxy.hooks import judges
from proxy.policy import Policy
from proxy.publish import Publisher
from store.adapters import Adapter
from store.feedback import Feedback, SessionEnd
from store.runs import Run
from store.segments import Importer
from store.share import Lease, Share, write_registry
from store.spans import Span
from store.writer import Writer

log = logging.getLogger(__name__)

WAIT_NOTE_S = 30.0  # how often a waiting learner says again who holds the share
READY_POLL_S = 0.2


class LeaseLost(RuntimeError):
    """Another learner holds the share now: this one's lease lapsed."""


def learn_main(config: Config) -> None:
    """Run the learner until SIGINT or SIGTERM."""
    if not config.share or not config.vllm:
        raise ConfigError("lightwire learn needs --share LOCATION and at least one --vllm URL")

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await learn(config)

    asyncio.run(main())


async def learn(config: Config) -> None:
    share = open_share(config)
    lease = Lease(share, f"{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}", config.lease_ttl)
    await hold(lease)
    try:
        writer = Writer(
            config.db,
            kinds=[Span, Feedback, SessionEnd, Adapter, Run],
            memory_limit_mb=config.db_memory_limit_mb,
            cache_mb=config.db_cache_mb,
            threads=config.db_threads,
        )
        writer.open()
        try:
            await _learn(config, share, lease, writer)
        finally:
            await writer.close()
    finally:
        await asyncio.to_thread(lease.release)
        log.info("released the share %s", share.location)


async def hold(lease: Lease) -> None:
    """Take the lease, waiting (and saying so) while another learner holds it."""
    said = 0.0
    while (held := await asyncio.to_thread(lease.try_take)) is not None:
        if time.monotonic() - said > WAIT_NOTE_S:
            left = max(0.0, float(held.get("expires_at", 0)) - time.time())
            log.warning(
                "the share %s is held by the learner %s (its lease runs %.0f s more unless renewed); waiting",
                lease.share.location,
                held.get("holder"),
                left,
            )
            said = time.monotonic()
        await asyncio.sleep(lease.ttl / 3)
    log.info("holding the share %s as %s", lease.share.location, lease.holder)


async def _learn(config: Config, share: Share, lease: Lease, writer: Writer) -> None:
    async def publish(policy: Policy) -> None:
        await asyncio.to_thread(write_registry, share, registry_of(policy))

    judging = judges(config.eval_hooks or config.span_hooks, config)
    async with backends(config, writer, on_publish=publish) as found:
        publisher = await _ready(found)
        await publish(publisher.policy)  # what was active when this learner (or its predecessor) stopped
        optimizer = Optimizer(config, writer, lambda: found.publisher, judging)
        await optimizer.close_interrupted()  # runs a killed learner left running
        importer = Importer(share, writer.cursor)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_import_forever(importer, config.share_interval))
            tasks.create_task(_keep(lease))
            tasks.create_task(optimizer.loop())


async def _ready(found: Backends) -> Publisher:
    """The publisher, once the active version is loaded into every replica."""
    while found.publisher is None or found.policy is None:
        if found.problem is not None:
            raise RuntimeError(found.problem)
        await asyncio.sleep(READY_POLL_S)
    return found.publisher


async def _import_forever(importer: Importer, interval: float) -> None:
    while True:
        try:
            await asyncio.to_thread(importer.run)
        except Exception:
            log.exception("importing from %s failed; retrying in %.1f s", importer.share.location, interval)
        await asyncio.sleep(interval)


async def _keep(lease: Lease) -> None:
    while True:
        await asyncio.sleep(lease.ttl / 3)
        if not await asyncio.to_thread(lease.renew):
            raise LeaseLost(f"another learner holds {lease.share.location} now; this one stops")
