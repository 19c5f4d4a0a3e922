"""The admin API for memory banks (guarded by the admin key); ``lightwire memory`` calls it.

==========================================  ===============================================================
``GET  /admin/memory``                      every bank version, with its status, counts and evaluation
``POST /admin/memory/build``                a memory run now: select, evaluate, publish; answers the run
``POST /admin/memory/{version}/activate``   serve it to every new call on the routes memory is on for
``POST /admin/memory/{version}/canary``     serve it to a fraction of sessions: ``{"fraction": 0.1}``
``POST /admin/memory/rollback``             stop the canary, or return to the bank active before
==========================================  ===============================================================
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
from aiohttp import web

from optimizers.memory import Builder
from proxy.adapters_api import add_sidecar_arguments
from proxy.admin import settings_of, sidecar
from proxy.errors import InvalidRequest, json_response
from proxy.feedback import json_object
from proxy.memory_publish import BANKS

MEMORY_BUILDER = web.AppKey("memory_builder", Builder)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/memory", list_banks)
    router.add_post("/admin/memory/build", build)
    router.add_post("/admin/memory/rollback", rollback)
    router.add_post("/admin/memory/{version}/activate", activate)
    router.add_post("/admin/memory/{version}/canary", canary)


async def list_banks(request: web.Request) -> web.Response:
    publisher = request.app[BANKS]
    memory = publisher.memory
    return json_response(
        {
            "object": "list",
            "routes": sorted(memory.routes),
            "active": memory.label,
            "canary": memory.canary.version if memory.canary else None,
            "canary_fraction": memory.canary_fraction,
            "data": [bank.public() for bank in publisher.banks.values()],
        }
    )


async def build(request: web.Request) -> web.Response:
    return json_response((await request.app[MEMORY_BUILDER].build()).public())


async def activate(request: web.Request) -> web.Response:
    return json_response((await request.app[BANKS].activate(request.match_info["version"])).public())


async def canary(request: web.Request) -> web.Response:
    fraction = json_object(await request.read()).get("fraction")
    if not isinstance(fraction, int | float) or isinstance(fraction, bool):
        raise InvalidRequest("fraction must be a number in (0, 1].", param="fraction")
    bank = await request.app[BANKS].start_canary(request.match_info["version"], float(fraction))
    return json_response(bank.public())


async def rollback(request: web.Request) -> web.Response:
    return json_response(await request.app[BANKS].rollback())


# -- lightwire memory ...: the same operations from the command line, through a running sidecar -----------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_sidecar_arguments(parser)
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="Every memory bank with its status.")
    actions.add_parser("build", help="Build a bank from the rewarded data now, evaluate it, publish it if as good.")
    actions.add_parser("activate", help="Serve a bank to every new call.").add_argument("version")
    canary_parser = actions.add_parser("canary", help="Serve a bank to a fraction of sessions.")
    canary_parser.add_argument("version")
    canary_parser.add_argument("--fraction", type=float, default=0.1, help="share of sessions (default 0.1)")
    actions.add_parser("rollback", help="Stop the canary, or return to the bank active before.")


def cli_main(args: argparse.Namespace) -> None:
    client = sidecar(args, settings_of(args))
    body: dict[str, Any] | None = {}
    match args.action:
        case "list":
            method, path, body = "GET", "/admin/memory", None
        case "activate":
            method, path = "POST", f"/admin/memory/{args.version}/activate"
        case "canary":
            method, path, body = "POST", f"/admin/memory/{args.version}/canary", {"fraction": args.fraction}
        case _:
            method, path = "POST", f"/admin/memory/{args.action}"
    answer = asyncio.run(client.call(method, path, body))
    if args.action != "list":
        print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
        return
    routes = ", ".join(answer["routes"]) or "none"
    print(f"memory on for {routes}; active {answer['active'] or '-'}, canary {answer['canary'] or '-'}")
    for bank in answer["data"]:
        counts = (bank["data"] or {}).get("trajectories") or {}
        print(
            f"{bank['version']:>5}  {bank['status']:<9}  {sum(counts.values()):>6} trajectories  parent "
            f"{bank['parent'] or '-':<5}  {bank['created_at'][:19]}  {bank['message'] or ''}"
        )
