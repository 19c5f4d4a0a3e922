"""The admin API for adapter versions (guarded by the admin key); ``lightwire adapters`` calls it.

==========================================  ===============================================================
``GET  /admin/adapters``                    every version, with its status and where it came from
``POST /admin/adapters``                    register a folder: ``{"path", "parent"?, "algorithm"?}``
``POST /admin/adapters/{version}/activate`` serve it to every new session
``POST /admin/adapters/{version}/canary``   serve it to a fraction of sessions: ``{"fraction": 0.1}``
``POST /admin/rollback``                    stop the canary, or return to the previous active version
==========================================  ===============================================================
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from optimizers.publish import Publisher
from proxy.backends import BACKENDS
from proxy.errors import InvalidRequest, json_response
from proxy.feedback import json_object


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/adapters", list_adapters)
    router.add_post("/admin/adapters", register)
    router.add_post("/admin/adapters/{version}/activate", activate)
    router.add_post("/admin/adapters/{version}/canary", canary)
    router.add_post("/admin/rollback", rollback)


def _publisher(request: web.Request) -> Publisher:
    return request.app[BACKENDS].require_publisher()


async def list_adapters(request: web.Request) -> web.Response:
    publisher = _publisher(request)
    policy = publisher.policy
    return json_response(
        {
            "object": "list",
            "mode": policy.mode,
            "active": policy.active.label,
            "canary": policy.canary.label if policy.canary else None,
            "canary_fraction": policy.canary_fraction,
            "data": [a.public() for a in publisher.adapters.values()],
        }
    )


async def register(request: web.Request) -> web.Response:
    body = json_object(await request.read())
    path = body.get("path")
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path must name an adapter folder on the sidecar's machine.", param="path")
    adapter = await _publisher(request).register(
        Path(path), parent=body.get("parent"), algorithm=body.get("algorithm"), data=body.get("data")
    )
    return json_response(adapter.public())


async def activate(request: web.Request) -> web.Response:
    adapter = await _publisher(request).activate(request.match_info["version"])
    return json_response(adapter.public())


async def canary(request: web.Request) -> web.Response:
    body = json_object(await request.read())
    fraction = body.get("fraction")
    if not isinstance(fraction, int | float) or isinstance(fraction, bool):
        raise InvalidRequest("fraction must be a number in (0, 1].", param="fraction")
    adapter = await _publisher(request).start_canary(request.match_info["version"], float(fraction))
    return json_response(adapter.public())


async def rollback(request: web.Request) -> web.Response:
    return json_response(await _publisher(request).rollback())
