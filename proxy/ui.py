"""The dashboard: ``GET /ui`` serves a page (``proxy/ui/``: HTML, one plain script, one stylesheet; no build step,
nothing from the internet) that reads the admin API below. The page's files hold no data and are served without a
key; everything they show comes from ``/admin/`` endpoints, guarded by the admin key (the page asks for it once
and keeps it for the browser tab).

==================================  ===========================================================================
``GET /admin/overview``             the numbers of ``/admin/stats``, the mean reward of each adapter version
                                    over time, the added latency of the last hour's calls (p50, p99), what
                                    the policy serves (active, canary and its arms), last runs
``GET /admin/sessions``             sessions, the latest first; filters: ``since``, ``until`` (ISO times),
                                    ``version``, ``model``, ``status`` (ok | failed), ``min_reward``,
                                    ``max_reward``, ``limit``
``GET /admin/sessions/{session}``   one session's calls (request, response, latency, tokens) and its feedback
==================================  ===========================================================================

The adapters page uses ``GET /admin/adapters``, ``GET /admin/runs`` and their actions (:mod:`proxy.adapters_api`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from optimizers import canary
from proxy.adapters_api import OPTIMIZER
from proxy.admin import iso_time
from proxy.backends import BACKENDS
from proxy.config import Config
from proxy.errors import InvalidRequest, NotFound, json_response
from store import browse, stats
from store.writer import Writer

FILES = Path(__file__).parent / "ui"
# The page's files: path -> (file, content type). These paths need no key.
SHELL = {
    "/ui": ("index.html", "text/html"),
    "/ui/app.js": ("app.js", "text/javascript"),
    "/ui/chart.js": ("chart.js", "text/javascript"),
    "/ui/style.css": ("style.css", "text/css"),
}
LAST_RUNS = 5


def add_routes(router: web.UrlDispatcher, *, writer: web.AppKey[Writer], config: web.AppKey[Config]) -> None:
    """Add the page and its endpoints, given the keys under which the application holds its writer and settings."""
    api = DashboardApi(writer=writer, config=config)
    for path in SHELL:
        router.add_get(path, shell_file)
    router.add_get("/admin/overview", api.overview)
    router.add_get("/admin/sessions", api.sessions)
    router.add_get("/admin/sessions/{session}", api.session)


async def shell_file(request: web.Request) -> web.FileResponse:
    name, content_type = SHELL[request.path]
    return web.FileResponse(FILES / name, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


class DashboardApi:
    def __init__(self, *, writer: web.AppKey[Writer], config: web.AppKey[Config]) -> None:
        self._writer = writer
        self._config = config

    async def overview(self, request: web.Request) -> web.Response:
        config, writer = request.app[self._config], request.app[self._writer]
        policy = _policy(request)
        canary_since = _canary_since(request, policy)

        def read() -> dict[str, Any]:
            with writer.cursor() as con:
                found = stats.collect(con, policy=config.credit_policy, discount=config.discount)
                series = browse.reward_series(con, policy=config.credit_policy, discount=config.discount)
                latency = browse.added_latency(con)
                if policy is not None and policy["canary"] is not None and canary_since is not None:
                    arms = canary.arm_rewards(con, canary_since, policy["canary"])
                    policy["arms"] = {arm: arms.get(arm, canary.Arm()).public() for arm in canary.ARMS}
            return {"stats": found.to_dict(), "series": series, "latency": latency, "policy": policy}

        await writer.flush()
        body = await asyncio.to_thread(read)
        runs = await request.app[OPTIMIZER].runs()
        body["runs"] = [run.public() for run in reversed(runs[-LAST_RUNS:])]
        return json_response(body)

    async def sessions(self, request: web.Request) -> web.Response:
        writer, where = request.app[self._writer], _filter(request.query)
        await writer.flush()

        def read() -> list[dict[str, Any]]:
            with writer.cursor() as con:
                return browse.sessions(con, where)

        return json_response({"object": "list", "data": await asyncio.to_thread(read)})

    async def session(self, request: web.Request) -> web.Response:
        writer, session_id = request.app[self._writer], request.match_info["session"]
        await writer.flush()

        def read() -> dict[str, Any] | None:
            with writer.cursor() as con:
                return browse.session(con, session_id)

        found = await asyncio.to_thread(read)
        if found is None:
            raise NotFound(f"No session {session_id!r} in the store.", param="session")
        return json_response(found)


def _policy(request: web.Request) -> dict[str, Any] | None:
    """What the policy serves, or None when this sidecar only forwards to an upstream."""
    found = request.app[BACKENDS]
    if found.policy is None:
        return None
    policy = found.policy
    return {
        "state": found.policy_state(),
        "mode": policy.mode,
        "base": policy.base.served_name,
        "active": policy.active.label,
        "canary": policy.canary.version if policy.canary else None,
        "canary_fraction": policy.canary_fraction,
        "arms": None,
    }


def _canary_since(request: web.Request, policy: dict[str, Any] | None) -> datetime | None:
    """When the canary started: its adapter's last status change."""
    publisher = request.app[BACKENDS].publisher
    if policy is None or policy["canary"] is None or publisher is None:
        return None
    adapter = publisher.adapters.get(policy["canary"])
    return adapter.updated_at if adapter is not None else None


def _filter(query: Mapping[str, str]) -> browse.SessionFilter:
    if query.get("status") and query["status"] not in browse.STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(browse.STATUSES)}.", param="status")
    try:
        return browse.SessionFilter(
            since=iso_time(query["since"]) if query.get("since") else None,
            until=iso_time(query["until"]) if query.get("until") else None,
            version=query.get("version") or None,
            model=query.get("model") or None,
            status=query.get("status") or None,
            min_reward=float(query["min_reward"]) if query.get("min_reward") else None,
            max_reward=float(query["max_reward"]) if query.get("max_reward") else None,
            limit=int(query.get("limit", 100)),
        )
    except ValueError as exc:
        raise InvalidRequest(f"Invalid session filter: {exc}.") from None
