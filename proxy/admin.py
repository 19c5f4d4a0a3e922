"""Datasets and numbers out of the store: the admin API and the ``lightwire export`` / ``stats`` commands.

HTTP, guarded like every ``/admin/`` path (the admin key, or the client keys when none is set):

* ``GET /admin/export?format=jsonl|parquet&since=ISO&min_reward=R&session_split=0.1`` answers the dataset file
  (:mod:`store.export`), built in a worker thread from the store writer's cursor; its metadata, the content of
  ``<file>.meta.json``, is in the ``x-lightwire-export-meta`` header. ``credit_policy``, ``discount`` and
  ``reward_name`` default to the sidecar's settings.
* ``GET /admin/stats`` answers :class:`store.stats.Stats` as JSON.

The commands read the database file themselves (read-only) when they can. DuckDB lets one process open a file,
so while a sidecar holds it they ask that sidecar (``--url``) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import orjson
from aiohttp import web

from proxy import config as settings
from proxy.config import Config
from proxy.errors import ConfigError, InvalidRequest, json_response
from store import credit, export, stats
from store.writer import Writer

META_HEADER = "x-lightwire-export-meta"
CONTENT_TYPES = {"jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}
CHUNK_BYTES = 1 << 20
CONNECT_TIMEOUT = 10.0  # seconds to reach the sidecar; an export itself may take long


def add_routes(router: web.UrlDispatcher, *, writer: web.AppKey[Writer], config: web.AppKey[Config]) -> None:
    """Add the routes, given the keys under which the application holds its store writer and settings."""
    router.add_routes(AdminApi(writer=writer, config=config).routes())


class AdminApi:
    """The ``/admin/`` routes, over the store writer and settings an application holds under these keys."""

    def __init__(self, *, writer: web.AppKey[Writer], config: web.AppKey[Config]) -> None:
        self._writer = writer
        self._config = config

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/admin/export", self.get_export), web.get("/admin/stats", self.get_stats)]

    async def get_export(self, request: web.Request) -> web.StreamResponse:
        config, writer = request.app[self._config], request.app[self._writer]
        options = _query_options(request.query, config)
        await writer.flush()  # calls and rewards accepted before this request are in the dataset
        with tempfile.TemporaryDirectory(dir=config.db.parent, prefix=".lightwire-export-") as tmp:
            path = Path(tmp) / f"lightwire.{options.format}"
            meta = await asyncio.to_thread(_export, writer, path, options)
            response = web.StreamResponse(
                headers={
                    "Content-Type": CONTENT_TYPES[options.format],
                    "Content-Disposition": f'attachment; filename="lightwire-export.{options.format}"',
                    META_HEADER: json.dumps(meta),
                }
            )
            response.content_length = path.stat().st_size
            await response.prepare(request)
            with open(path, "rb") as fh:
                while chunk := await asyncio.to_thread(fh.read, CHUNK_BYTES):
                    await response.write(chunk)
            await response.write_eof()
            return response

    async def get_stats(self, request: web.Request) -> web.Response:
        config, writer = request.app[self._config], request.app[self._writer]
        policy, discount, name = _query_credit(request.query, config)
        await writer.flush()

        def collect() -> stats.Stats:
            with writer.cursor() as con:
                return stats.collect(con, policy=policy, discount=discount, reward_name=name)

        return json_response((await asyncio.to_thread(collect)).to_dict())


def _export(writer: Writer, path: Path, options: export.Options) -> dict[str, Any]:
    with writer.cursor() as con:
        return export.write(con, path, options)


def _query_credit(query: Mapping[str, str], config: Config) -> tuple[str, float, str]:
    try:
        discount = float(query.get("discount", config.discount))
    except ValueError:
        raise InvalidRequest("discount must be a number.", param="discount") from None
    policy = query.get("credit_policy", config.credit_policy)
    if policy not in credit.POLICIES:
        raise InvalidRequest(f"credit_policy must be one of {', '.join(credit.POLICIES)}.", param="credit_policy")
    return policy, discount, query.get("reward_name", credit.DEFAULT_NAME)


def _query_options(query: Mapping[str, str], config: Config) -> export.Options:
    policy, discount, name = _query_credit(query, config)
    try:
        return export.Options(
            format=query.get("format", "jsonl"),
            credit_policy=policy,
            discount=discount,
            reward_name=name,
            since=iso_time(query["since"]) if "since" in query else None,
            min_reward=float(query["min_reward"]) if "min_reward" in query else None,
            session_split=float(query.get("session_split", export.DEFAULT_SESSION_SPLIT)),
        )
    except ValueError as exc:
        raise InvalidRequest(f"Invalid export parameters: {exc}.") from None


def iso_time(text: str) -> datetime:
    """An ISO 8601 date or time; without a zone, UTC."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- the commands --------------------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("dataset")
    data.add_argument("--format", choices=export.FORMATS, default="jsonl", help="File format (default: jsonl).")
    data.add_argument("--out", type=Path, required=True, help="File to write; its metadata goes to FILE.meta.json.")
    data.add_argument("--since", type=iso_time, help="Only calls started at or after this ISO time (no zone: UTC).")
    data.add_argument("--min-reward", type=float, help="Only records whose credited reward is at least this.")
    data.add_argument(
        "--session-split",
        type=float,
        default=export.DEFAULT_SESSION_SPLIT,
        help="Fraction of sessions marked heldout, chosen by a hash of the session id (default: 0.1).",
    )
    _add_source_arguments(parser)


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    _add_source_arguments(parser)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    rewards = parser.add_argument_group("rewards (default: the settings, as for lightwire serve)")
    rewards.add_argument("--credit-policy", choices=credit.POLICIES, help="Session reward to turns.")
    rewards.add_argument("--discount", type=float, help="Discount per turn from the end, for discounted.")
    rewards.add_argument(
        "--reward-name", default=credit.DEFAULT_NAME, help="The named reward to credit (default: reward)."
    )
    source = parser.add_argument_group("where the store is")
    source.add_argument("--config", type=Path, help="TOML file with settings (keys as in the README table).")
    source.add_argument(
        "--db", type=Path, help="DuckDB file to read when no sidecar holds it (default: the db setting)."
    )
    source.add_argument("--url", help="The sidecar to ask when it holds the file (default: its host and port).")
    source.add_argument("--admin-key", help="Key for the sidecar's admin API (default: LIGHTWIRE_ADMIN_KEY).")


def export_main(args: argparse.Namespace) -> None:
    config = settings_of(args)
    try:
        options = export.Options(
            format=args.format,
            credit_policy=config.credit_policy,
            discount=config.discount,
            reward_name=args.reward_name,
            since=args.since,
            min_reward=args.min_reward,
            session_split=args.session_split,
        )
    except ValueError as exc:
        raise SystemExit(f"lightwire export: {exc}") from None
    con = open_read_only(config.db)
    if con is not None:
        with con:
            meta = export.write(con, args.out, options)
        source = str(config.db)
    else:
        remote = sidecar(args, config)
        meta = asyncio.run(remote.export(args.out, options))
        source = remote.base_url
    print(
        f"{meta['records']} records ({meta['splits']['train']} train, {meta['splits']['heldout']} heldout) "
        f"from {source} to {args.out}, metadata in {export.meta_path(args.out)}"
    )


def stats_main(args: argparse.Namespace) -> None:
    config = settings_of(args)
    con = open_read_only(config.db)
    if con is not None:
        with con:
            result = stats.collect(
                con, policy=config.credit_policy, discount=config.discount, reward_name=args.reward_name
            )
    else:
        params = {
            "credit_policy": config.credit_policy,
            "discount": str(config.discount),
            "reward_name": args.reward_name,
        }
        result = asyncio.run(sidecar(args, config).stats(params))
    print(
        orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode() if args.json else stats.format_text(result)
    )


def open_read_only(path: Path) -> duckdb.DuckDBPyConnection | None:
    """A read-only connection to the store, or None when it does not exist here or another process holds it."""
    if not path.exists():
        return None
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            return None
        raise SystemExit(f"lightwire: cannot open {path}: {exc}") from None


def settings_of(args: argparse.Namespace) -> Config:
    try:
        return settings.load(args)
    except ConfigError as exc:
        raise SystemExit(f"lightwire: {exc}") from None


def sidecar(args: argparse.Namespace, config: Config) -> Sidecar:
    if args.url:
        base_url = str(args.url).rstrip("/").removesuffix("/v1")
    else:
        host = "127.0.0.1" if config.host in {"0.0.0.0", "::", ""} else config.host
        base_url = f"http://{host}:{config.port}"
    return Sidecar(base_url, config.admin_key, config.db)


@dataclass(frozen=True)
class Sidecar:
    """The sidecar holding the store, asked over its admin API."""

    base_url: str
    key: str | None
    db: Path  # the file it holds, for messages

    async def export(self, out: Path, options: export.Options) -> dict[str, Any]:
        """Fetch the dataset into ``out``, check its sha256, and write its metadata next to it."""
        params = {
            "format": options.format,
            "credit_policy": options.credit_policy,
            "discount": str(options.discount),
            "reward_name": options.reward_name,
            "session_split": str(options.session_split),
        }
        if options.since is not None:
            params["since"] = options.since.isoformat()
        if options.min_reward is not None:
            params["min_reward"] = str(options.min_reward)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.part")
        digest = hashlib.sha256()
        try:
            async with self._get("/admin/export", params) as resp:
                meta: dict[str, Any] = json.loads(resp.headers[META_HEADER])
                with open(partial, "wb") as fh:
                    async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                        fh.write(chunk)
                        digest.update(chunk)
            if digest.hexdigest() != meta["sha256"]:
                raise SystemExit("lightwire export: the file received does not match the sidecar's sha256")
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        export.write_meta(out, meta)
        return meta

    async def stats(self, params: dict[str, str]) -> stats.Stats:
        async with self._get("/admin/stats", params) as resp:
            return stats.Stats.from_dict(orjson.loads(await resp.read()))

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Any admin endpoint's JSON answer."""
        async with self._get(path, {}, method=method, body=body) as resp:
            return orjson.loads(await resp.read())

    @contextlib.asynccontextmanager
    async def _get(
        self, path: str, params: dict[str, str], *, method: str = "GET", body: dict[str, Any] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A successful response, or :class:`SystemExit` with what went wrong."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        async with aiohttp.ClientSession(timeout=timeout) as http:
            try:
                async with http.request(
                    method, self.base_url + path, params=params, headers=headers, json=body
                ) as resp:
                    if resp.status != 200:
                        raise SystemExit(f"lightwire: the sidecar at {self.base_url} answered {await _message(resp)}")
                    yield resp
            except aiohttp.ClientError as exc:
                state = "is held by another process" if self.db.exists() else "does not exist"
                raise SystemExit(
                    f"lightwire: {self.db} {state}, and the sidecar at {self.base_url} failed: {exc}"
                ) from None


async def _message(resp: aiohttp.ClientResponse) -> str:
    """The status and message of an error response (OpenAI's shape, or any text)."""
    body = await resp.read()
    try:
        message = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = body[:500].decode("utf-8", "replace")
    return f"{resp.status}: {message}"
