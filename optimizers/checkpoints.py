"""The trainer's run folder: checkpoints to resume from, the adapters they hold, and the per-step metrics.

::

    OUT/checkpoints/step-000040/adapter/            adapter_config.json + adapter_model.safetensors (what vLLM loads)
    OUT/checkpoints/step-000040/optimizer.pt        AdamW state
    OUT/checkpoints/step-000040/trainer_state.json  step, total steps, the run's identity (data fingerprint, seed,
                                                    batching), the base model folder
    OUT/latest                                      name of the newest complete checkpoint
    OUT/metrics.jsonl                               one line per optimizer step (loss, tokens, seconds, grad norm...)

A checkpoint is written into a temporary folder and renamed into place, then ``latest`` is replaced (both
atomic renames), so a crash never leaves a half-written checkpoint behind and ``latest`` always names a complete
one. The newest :data:`KEEP_CHECKPOINTS` are kept. Each version's adapter has its own folder, so a new version
never overwrites a path vLLM may still be reading (vLLM re-reads an adapter path reused under the same name).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from optimizers.errors import TrainingError
from optimizers.model import load_adapter_weights, save_adapter

logger = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def adapter_dir(out: Path, step: int) -> Path:
    return checkpoint_dir(out, step) / ADAPTER_DIR


def exists(out: Path, step: int) -> bool:
    return (checkpoint_dir(out, step) / STATE_FILE).exists()


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint folder, or None for a folder without a run."""
    try:
        name = (out / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    folder = out / CHECKPOINTS / name
    if not (folder / STATE_FILE).exists():
        raise TrainingError(f"{out / LATEST} names {name}, which is missing or incomplete")
    return folder


def state(folder: Path) -> dict[str, Any]:
    """The saved ``trainer_state.json`` of a checkpoint."""
    saved: dict[str, Any] = json.loads((folder / STATE_FILE).read_text())
    return saved


def save(
    out: Path, step: int, policy: Any, optimizer: Any, run: dict[str, Any], *, base: Path, total_steps: int
) -> Path:
    """Write the checkpoint of ``step`` (adapter, optimizer, state), point ``latest`` at it, prune old ones."""
    folder = checkpoint_dir(out, step)
    staging = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(policy, staging / ADAPTER_DIR, base=base)
    torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
    saved = {"step": step, "total_steps": total_steps, "run": run, "base": str(base.resolve())}
    (staging / STATE_FILE).write_text(json.dumps(saved, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    _write_atomic(out / LATEST, folder.name + "\n")
    for old in sorted((out / CHECKPOINTS).glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("Saved %s", folder)
    return folder


def restore(folder: Path, policy: Any, optimizer: Any) -> None:
    """Load a checkpoint's adapter weights into ``policy`` and its AdamW state into ``optimizer``."""
    load_adapter_weights(policy, folder / ADAPTER_DIR)
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location=policy.device))


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / METRICS_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def keep_metrics_until(out: Path, step: int) -> None:
    """Drop the metric lines of steps after the checkpoint: the resumed run does them again."""
    path = out / METRICS_FILE
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)
