"""Preparing the embedded model from an empty cache is crash-safe and converts once between processes: a
conversion killed half-way leaves no model behind, and a second process waiting on the lock redoes it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from optimizers.embedded import DEFAULT_MODEL_NAME, MARKER_FILENAME, is_prepared, model_dir

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]

PREPARE = (
    "import logging, sys; from pathlib import Path; from optimizers.embedded import prepare_default_model\n"
    "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
    "print(prepare_default_model(Path(sys.argv[1])), flush=True)\n"
)


async def prepare(cache: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", PREPARE, str(cache), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def test_a_conversion_killed_half_way_is_redone_by_the_process_waiting_for_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = await prepare(cache)
    async with asyncio.timeout(300):  # until the first process has written weights into its staging folder
        while not list((cache / "models").glob(f".tmp-{DEFAULT_MODEL_NAME}-*/*.safetensors")):
            assert first.returncode is None, (await first.communicate())[1].decode()
            await asyncio.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # half-way, held there: weights written, not checked, not renamed into place
    second = await prepare(cache)  # blocks on the lock while the first one holds it
    await asyncio.sleep(1.0)
    assert second.returncode is None
    os.kill(first.pid, signal.SIGKILL)
    await first.wait()
    target = model_dir(cache)
    assert not is_prepared(target) and not target.exists()

    out, err = await asyncio.wait_for(second.communicate(), 300)
    assert second.returncode == 0, err.decode()
    assert Path(out.decode().strip()) == target and is_prepared(target)
    assert "left by an interrupted conversion" in err.decode()  # the killed one's staging folder was removed
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".tmp-")] == []
    marker = json.loads((target / MARKER_FILENAME).read_text())
    assert "Paris" in marker["check"]["greedy_reply"]

    third = await prepare(cache)  # a later start reuses the folder: no conversion
    out, err = await asyncio.wait_for(third.communicate(), 120)
    assert third.returncode == 0 and "Converting" not in err.decode()
