"""The ``lightwire`` command: parses its arguments and calls into the package; nothing else."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from proxy import adapters_api, admin, memory_api
from proxy import config as settings
from proxy.errors import ConfigError

# Net new container objects between two young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000
# Seconds a thread may hold the GIL while another waits for it (CPython's default: 5 ms). The store's writer thread
# turns calls into rows in Python (~12 us a call); with the default, the event loop waited up to 5 ms for each
# hand-back, a wait every call in flight then shared (``bench/loop_lag.py`` measures it).
GIL_SWITCH_INTERVAL = 0.001


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        from examples import demo

        demo.main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="lightwire", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(  # listed here; its own parser, imported only when it runs, reads its arguments
        "demo", help="Watch an unmodified agent (text-to-SQL, or --task extraction) learn from its own traffic."
    )
    serve = commands.add_parser("serve", help="Run the proxy: forward model calls and record them.")
    settings.add_arguments(serve)
    learn = commands.add_parser(
        "learn", help="Be a fleet's one learner: read the sidecars' data in --share, train, publish into --vllm."
    )
    settings.add_arguments(learn)
    commands.add_parser("settings", help="Print every setting as a Markdown table.")
    admin.add_export_arguments(commands.add_parser("export", help="Write a training dataset and its metadata."))
    admin.add_stats_arguments(commands.add_parser("stats", help="Show calls, sessions and rewards."))
    adapters_api.add_sidecar_arguments(
        commands.add_parser("train", help="Run the optimizer now in the running sidecar: train, evaluate, publish.")
    )
    adapters_api.add_cli_arguments(commands.add_parser("adapters", help="List, register, activate, canary, roll back."))
    memory_api.add_cli_arguments(
        commands.add_parser("memory", help="Memory banks: list, build, activate, canary, roll back.")
    )
    store = commands.add_parser("store", help="Look after the store's file.")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    reimport = store_commands.add_parser(
        "reimport", help="Write the rows the store refused (<db>.rejected.jsonl) into it; run with the sidecar stopped."
    )
    reimport.add_argument("--config", type=Path, help="TOML file with settings (keys as in the README table).")
    reimport.add_argument("--db", type=Path, help="The DuckDB file (default: the db setting).")
    args = parser.parse_args(argv)
    if args.command == "settings":
        print(settings.markdown_table())
        return
    try:
        config = settings.load(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "serve":
        try:
            serve_forever(config)
        except ConfigError as exc:  # found while building the app, e.g. a reward hook that does not import
            parser.error(str(exc))
    elif args.command == "learn":
        from proxy.learner import learn_main

        try:
            learn_main(config)
        except ConfigError as exc:
            parser.error(str(exc))
    elif args.command == "export":
        admin.export_main(args)
    elif args.command == "stats":
        admin.stats_main(args)
    elif args.command == "train":
        adapters_api.train_main(args)
    elif args.command == "adapters":
        adapters_api.cli_main(args)
    elif args.command == "memory":
        memory_api.cli_main(args)
    elif args.command == "store":
        reimport_main(config)


def reimport_main(config: settings.Config) -> None:
    import duckdb

    from store.reimport import reimport

    try:
        report = reimport(config.db)
    except duckdb.IOException as exc:
        raise SystemExit(f"lightwire store reimport: cannot open {config.db} (stop the sidecar first): {exc}") from None
    print(report.summary())
    if report.refused or report.unreadable:
        raise SystemExit(1)


def serve_forever(config: settings.Config) -> None:
    """Serve until SIGINT or SIGTERM, on uvloop: with the proxy pinned to one core (``bench/proxy_overhead.py``),
    it took 6-10 % less CPU a call than asyncio's own loop (1.16 against 1.24 ms at 700 calls/s, 0.55 against
    0.61 ms at concurrency 32, medians of three interleaved runs) and answered 10 % more calls at concurrency 32."""
    import uvloop

    from proxy.app import create_app

    log = logging.getLogger("lightwire")
    log.info("settings: %s", config.redacted())
    app = create_app(config)
    app.on_startup.append(settle_heap)  # runs after the app's own start-up (its cleanup contexts)
    web.run_app(
        app,
        loop=uvloop.new_event_loop(),
        host=config.host,
        port=config.port,
        shutdown_timeout=config.shutdown_timeout,
        handler_cancellation=True,
        access_log=log.getChild("access") if config.log_level == "debug" else None,
        print=lambda message: log.info(message.strip()),
    )


async def settle_heap(app: web.Application) -> None:
    """Once everything long-lived exists, keep Python's cycle collector off it and run it less often; and make
    other threads hand the GIL back to the event loop sooner (``GIL_SWITCH_INTERVAL``).

    Serving makes no reference cycles on its success path (its objects go by reference counting), so collections
    are nearly pure cost: at 3,000 calls/s they took ~10% of the CPU, and every full one walked the ~100,000 objects
    of the imported libraries, pausing the event loop for ~40 ms (``bench/proxy_overhead.py``, chat at c=32).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
