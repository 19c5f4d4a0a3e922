"""The share: where a fleet's sidecars hand their data to one learner, and the learner hands back the registry.

A share is a folder on a shared volume or an fsspec URL (``s3://bucket/prefix``, ``memory://...``). Under it::

    spans/<sidecar>-<seq>.parquet       immutable segments (store.segments): what one sidecar recorded,
    feedback/<sidecar>-<seq>.parquet    up to its store's share_seq <seq>; never rewritten
    sessions/<sidecar>-<seq>.parquet
    registry.json                       the learner's versions, the active one, the canary and its fraction
    learner.lease                       which learner holds the share, until when

Nothing is ever read half-written: in a folder every file is written under a temporary name (no ``.parquet``
ending), flushed to disk with ``fsync`` and renamed into place; an object store makes an object visible only once
its upload has completed. Readers list ``*.parquet`` (or read ``registry.json``) and see whole files only.

The lease is a file with an expiry that its holder renews; a learner that crashed stops renewing and loses the
share once ``lease_ttl`` has passed. Taking it is write-then-read-back (no compare-and-swap on every store): two
learners starting within a moment of each other may both write, and the one that reads back its own name holds
it; hosts sharing a share need clocks in step to well under ``lease_ttl``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import orjson

log = logging.getLogger(__name__)

REGISTRY = "registry.json"
LEASE = "learner.lease"
SEGMENT_SUFFIX = ".parquet"
TEMP_SUFFIX = ".tmp"
# How long a learner waits after writing the lease before reading it back: another learner's write in the same
# moment lands within this.
LEASE_SETTLE_S = 0.2


class Share:
    """One share location: a local folder (``fsync``'d renames) or an fsspec filesystem."""

    def __init__(self, location: str, *, cache_dir: Path | None = None) -> None:
        self.location = location
        self.remote = "://" in location and not location.startswith("file://")
        if self.remote:
            self.fs, self.root = fsspec.core.url_to_fs(location)
            self.root = self.root.rstrip("/")
        else:
            self.folder = Path(location.removeprefix("file://")).resolve()
            self.folder.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir  # where segments of a remote share are kept to be read

    def __repr__(self) -> str:
        return f"Share({self.location!r})"

    # -- writing --------------------------------------------------------------------------------------------------

    def staging(self, name: str) -> Path:
        """A local path to write ``name``'s content to before :meth:`put` moves it in (same volume for a folder)."""
        if self.remote:
            assert self.cache_dir is not None, "a remote share needs a local staging folder"
            path = self.cache_dir / "staging" / (name + TEMP_SUFFIX)
        else:
            path = self.folder / (name + TEMP_SUFFIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def put(self, staged: Path, name: str) -> None:
        """Move a staged file in under ``name``, durably: it is whole in the share when this returns."""
        if self.remote:
            self.fs.put_file(str(staged), f"{self.root}/{name}")
            staged.unlink()
            return
        target = self.folder / name
        _fsync(staged)
        os.replace(staged, target)
        _fsync(target.parent)

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.remote:  # one upload: the object appears whole
            self.fs.pipe_file(f"{self.root}/{name}", data)
            return
        staged = self.staging(name)
        staged.write_bytes(data)
        self.put(staged, name)

    # -- reading --------------------------------------------------------------------------------------------------

    def read_bytes(self, name: str) -> bytes | None:
        """The file's content, or None when there is none."""
        try:
            if self.remote:
                return bytes(self.fs.cat_file(f"{self.root}/{name}"))
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def segments(self, kind: str) -> list[str]:
        """The names (``kind/file.parquet``) of the complete segments of one kind, sorted."""
        if self.remote:
            prefix = f"{self.root}/{kind}"
            self.fs.invalidate_cache(prefix)  # s3fs and others cache listings: new segments would go unseen
            try:
                found = [p.rsplit("/", 1)[-1] for p in self.fs.ls(prefix, detail=False)]
            except FileNotFoundError:
                return []
        else:
            folder = self.folder / kind
            found = [e.name for e in os.scandir(folder)] if folder.is_dir() else []
        return sorted(f"{kind}/{n}" for n in found if n.endswith(SEGMENT_SUFFIX))

    def local_path(self, name: str) -> Path:
        """A local file with the segment's content (a remote one is fetched once: segments never change)."""
        if not self.remote:
            return self.folder / name
        assert self.cache_dir is not None, "a remote share needs a local cache folder"
        path = self.cache_dir / "segments" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + TEMP_SUFFIX)
            self.fs.get_file(f"{self.root}/{name}", str(partial))
            os.replace(partial, path)
        return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the registry --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Registry:
    """What the learner serves: each version the sidecars may route to, which is active, which is the canary."""

    versions: dict[str, dict[str, str]] = field(default_factory=dict)  # version -> {served_name, lora_path}
    active: str | None = None  # None: the base model
    canary: str | None = None
    fraction: float = 0.0
    base: str | None = None  # the base model's served name

    def to_json(self) -> bytes:
        return orjson.dumps({**asdict(self), "updated_at": time.time()}, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes) -> Registry:
        raw: dict[str, Any] = orjson.loads(data)
        raw.pop("updated_at", None)
        return cls(**raw)


def write_registry(share: Share, registry: Registry) -> None:
    share.write_bytes(REGISTRY, registry.to_json())


def read_registry(share: Share) -> Registry | None:
    data = share.read_bytes(REGISTRY)
    return Registry.from_json(data) if data else None


# -- the learner's lease -------------------------------------------------------------------------------------------


class Lease:
    """The learner role over one share, held by renewing an expiring file."""

    def __init__(self, share: Share, holder: str, ttl: float) -> None:
        self.share = share
        self.holder = holder
        self.ttl = ttl

    def current(self) -> dict[str, Any] | None:
        """The lease as it stands: ``{"holder", "expires_at"}`` (unix time), or None when there is none."""
        data = self.share.read_bytes(LEASE)
        with contextlib.suppress(orjson.JSONDecodeError):
            return orjson.loads(data) if data else None
        return None

    def try_take(self) -> dict[str, Any] | None:
        """Take (or renew) the lease; None when this holder has it, else the lease that stands in the way."""
        held = self.current()
        if held is not None and held.get("holder") != self.holder and held.get("expires_at", 0) > time.time():
            return held
        self._write()
        time.sleep(LEASE_SETTLE_S)
        held = self.current()
        return None if held is not None and held.get("holder") == self.holder else held

    def renew(self) -> bool:
        """Extend the lease; False when another holder has taken it meanwhile (this one lapsed)."""
        held = self.current()
        if held is not None and held.get("holder") != self.holder:
            return False
        self._write()
        return True

    def release(self) -> None:
        held = self.current()
        if held is not None and held.get("holder") == self.holder:
            self.share.write_bytes(LEASE, orjson.dumps({"holder": self.holder, "expires_at": 0}))

    def _write(self) -> None:
        self.share.write_bytes(LEASE, orjson.dumps({"holder": self.holder, "expires_at": time.time() + self.ttl}))
