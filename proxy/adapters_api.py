"""The admin API for adapter versions (guarded by the admin key); ``lightwire adapters`` calls it.

==========================================  ===============================================================
``GET  /admin/adapters``                    every version, with its status and where it came from
``POST /admin/adapters``                    register a folder: ``{"path", "parent"?, "algorithm"?}``
``POST /admin/adapters/{version}/activate`` serve it to every new session
``POST /admin/adapters/{version}/canary``   serve it to a fraction of sessions: ``{"fraction": 0.1}``
``POST /admin/rollback``                    stop the canary, or return to the previous active version
``POST /admin/train``                       an optimizer run now: train, evaluate, publish; answers the run
                                            (a client that goes away stops waiting; the run goes on)
``GET  /admin/runs``                        every optimizer run, with its data, losses, evaluation, decision
==========================================  ===============================================================
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from optimizers.errors import RunCancelled
from optimizers.loop import Optimizer
from proxy.admin import settings_of, sidecar
from proxy.backends import BACKENDS
from proxy.errors import BackendUnavailable, InvalidRequest, json_response
from proxy.feedback import json_object
from proxy.publish import Publisher

OPTIMIZER = web.AppKey("optimizer", Optimizer)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/adapters", list_adapters)
    router.add_post("/admin/adapters", register)
    router.add_post("/admin/adapters/{version}/activate", activate)
    router.add_post("/admin/adapters/{version}/canary", canary)
    router.add_post("/admin/rollback", rollback)
    router.add_post("/admin/train", train)
    router.add_get("/admin/runs", runs)


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


async def train(request: web.Request) -> web.Response:
    request.app[BACKENDS].require_publisher()  # 503 at once while the policy is not ready
    try:
        run = await request.app[OPTIMIZER].run()
    except RunCancelled as exc:
        raise BackendUnavailable(f"The sidecar is shutting down: {exc} (see GET /admin/runs).") from None
    return json_response(run.public())


async def runs(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [r.public() for r in await request.app[OPTIMIZER].runs()]})


# -- lightwire adapters ...: the same operations from the command line, through a running sidecar ---------------


def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with settings (keys as in the README table).")
    parser.add_argument("--url", help="The sidecar (default: its host and port from the settings).")
    parser.add_argument("--admin-key", help="Key for the sidecar's admin API (default: LIGHTWIRE_ADMIN_KEY).")


def train_main(args: argparse.Namespace) -> None:
    """``lightwire train``: an optimizer run in the running sidecar, now; prints its record. Ctrl-C stops
    waiting, not the run: it is the sidecar's, and ends (and is recorded) there."""
    client = sidecar(args, settings_of(args))
    try:
        run = asyncio.run(client.call("POST", "/admin/train", {}))
    except KeyboardInterrupt:
        raise SystemExit(
            f"lightwire train: stopped waiting; the run goes on in the sidecar ({client.base_url}/admin/runs)"
        ) from None
    print(orjson.dumps(run, option=orjson.OPT_INDENT_2).decode())


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_sidecar_arguments(parser)
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="Every version with its status.")
    register = actions.add_parser("register", help="Check a peft adapter folder and record it as a candidate.")
    register.add_argument("path", type=Path, help="the adapter folder (on the sidecar's machine)")
    register.add_argument("--parent", help="the version it was trained from (default: the active one)")
    register.add_argument("--algorithm", help="how it was made, for the record")
    for name, text in (
        ("activate", "Serve a version to every new session."),
        ("canary", "Serve a version to a fraction of sessions."),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("version")
        if name == "canary":
            action.add_argument("--fraction", type=float, default=0.1, help="share of sessions (default 0.1)")
    actions.add_parser("rollback", help="Stop the canary, or return to the previous active version.")


def cli_main(args: argparse.Namespace) -> None:
    client = sidecar(args, settings_of(args))
    body: dict[str, Any] | None = {}
    match args.action:
        case "list":
            method, path, body = "GET", "/admin/adapters", None
        case "register":
            method, path = "POST", "/admin/adapters"
            body = {"path": str(args.path.resolve()), "parent": args.parent, "algorithm": args.algorithm}
        case "activate":
            method, path = "POST", f"/admin/adapters/{args.version}/activate"
        case "canary":
            method, path, body = "POST", f"/admin/adapters/{args.version}/canary", {"fraction": args.fraction}
        case _:
            method, path = "POST", "/admin/rollback"
    answer = asyncio.run(client.call(method, path, body))
    if args.action == "list":
        print(f"mode {answer['mode']}, active {answer['active']}, canary {answer['canary'] or '-'}")
        for a in answer["data"]:
            print(
                f"{a['version']:>5}  {a['status']:<9}  {a['algorithm'] or '':<14} parent {a['parent'] or 'base':<5}"
                f"  {a['created_at'][:19]}  {a['message'] or ''}"
            )
    else:
        print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
