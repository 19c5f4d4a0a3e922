"""A sidecar in a fleet (``lightwire serve --share LOCATION``): it ships what it records, and follows the registry.

* **Shipping**: every ``share_interval`` seconds, and once more on shutdown after the store has written
  everything, the rows committed since the last shipment go to the share as Parquet segments
  (:mod:`store.segments`). A share that cannot take them delays shipping; nothing is lost (the local store keeps
  them and the next shipment retries).
* **Following**: every ``share_poll`` seconds the sidecar reads the learner's ``registry.json`` and routes to
  what it says: the active version for new sessions, the canary for the same fraction of sessions (a hash of the
  session id, so every sidecar sends a given session to the same arm). The learner loads every version into
  every vLLM replica before it names it in the registry; a sidecar only switches names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from proxy.config import Config
from proxy.policy import Policy, Version
from store.segments import Shipper
from store.share import Registry, Share, read_registry
from store.writer import Writer

log = logging.getLogger(__name__)

SHIPPER = web.AppKey("shipper", Shipper)


def open_share(config: Config) -> Share:
    """The configured share, with a local folder next to the store for what a remote share needs staged."""
    assert config.share is not None
    return Share(config.share, cache_dir=Path(config.db).resolve().with_name(Path(config.db).name + ".share"))


@contextlib.asynccontextmanager
async def shipping(config: Config, writer: Writer) -> AsyncIterator[Shipper]:
    """Ship the store's new rows to the share in the background; on exit, ship everything that was written."""
    shipper = await asyncio.to_thread(Shipper, open_share(config), writer.cursor)
    log.info("shipping to %s as %s every %.1f s", config.share, shipper.sidecar_id, config.share_interval)
    task = asyncio.create_task(_ship_forever(shipper, config.share_interval))
    try:
        yield shipper
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await writer.flush()
        try:
            await asyncio.to_thread(shipper.ship)
        except Exception as exc:  # kept in the store: the next start ships them
            log.error("could not ship the last rows to %s (%s); they ship on the next start", config.share, exc)
        log.info("shipped %d rows in %d segments to %s", shipper.shipped_rows, shipper.segments, config.share)


async def _ship_forever(shipper: Shipper, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(shipper.ship)
        except Exception as exc:
            log.warning("shipping to %s failed (%s); retrying in %.1f s", shipper.share, exc, interval)


# -- following the registry ----------------------------------------------------------------------------------------


async def follow(share: Share, policy: Policy, poll: float) -> None:
    """Route as the share's registry says, read every ``poll`` seconds, until cancelled."""
    seen: Registry | None = None
    while True:
        try:
            registry = await asyncio.to_thread(read_registry, share)
        except Exception as exc:
            log.warning("could not read the registry in %s: %s", share.location, exc)
        else:
            if registry is not None and registry != seen:
                apply(policy, registry)
                log.info("registry: serving %s%s", policy.active.label, _canary_note(policy))
                seen = registry
        await asyncio.sleep(poll)


def apply(policy: Policy, registry: Registry) -> None:
    """Make the policy route as the registry says."""
    active = _version(policy, registry, registry.active)
    if active != policy.active:
        if policy.history and policy.history[-1] == active:
            policy.roll_back()  # so that sessions pinned to the version left stop getting it
        else:
            policy.activate(active)
    if registry.canary is None:
        policy.stop_canary()
    else:
        canary = _version(policy, registry, registry.canary)
        if (canary, registry.fraction) != (policy.canary, policy.canary_fraction):
            policy.start_canary(canary, registry.fraction)


def _version(policy: Policy, registry: Registry, name: str | None) -> Version:
    if name is None:
        return policy.base
    entry = registry.versions[name]
    return Version(name, entry["served_name"], lora_path=Path(entry["lora_path"]))


def registry_of(policy: Policy) -> Registry:
    """The registry that makes followers route as ``policy`` does (the learner's, in ``lora`` swap mode)."""
    served = [policy.active, policy.canary, *policy.history[-1:]]
    return Registry(
        versions={
            v.version: {"served_name": v.served_name, "lora_path": str(v.lora_path)}
            for v in served
            if v is not None and v.version is not None and v.lora_path is not None
        },
        active=policy.active.version,
        canary=policy.canary.version if policy.canary else None,
        fraction=policy.canary_fraction if policy.canary else 0.0,
        base=policy.base.served_name,
    )


def _canary_note(policy: Policy) -> str:
    return f", canary {policy.canary.label} on {policy.canary_fraction:.0%} of sessions" if policy.canary else ""
