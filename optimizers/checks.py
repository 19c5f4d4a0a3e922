"""Checks an adapter folder before it goes anywhere near vLLM: a bad folder is refused with a clear message.

A folder passes when it holds a peft LoRA config and safetensors weights, its rank fits the server's
``--max-lora-rank``, every target module is a linear layer of the base model, every tensor has the shape its
name and rank imply, and every weight is finite. The weights are read without torch (the proxy process stays
light): a safetensors file is an 8-byte header length, a JSON header, then raw little-endian tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from store.errors import LightwireError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class AdapterRejected(LightwireError, ValueError):
    """The folder is not an adapter this server can load."""


def check_adapter(folder: Path, *, max_rank: int, base_modules: set[str] | None = None) -> dict[str, Any]:
    """Validate ``folder``; return its peft config, or raise :class:`AdapterRejected` saying what is wrong."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterRejected(f"{folder} has no {CONFIG_FILE}: not a peft adapter folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterRejected(f"{config_path}: peft_type must be LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or not 0 < rank <= max_rank:
        raise AdapterRejected(f"{config_path}: rank r={rank!r} is outside 1..{max_rank} (the server's max-lora-rank)")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise AdapterRejected(f"{config_path}: target_modules must list module names")
    if base_modules is not None and (unknown := set(targets) - base_modules):
        raise AdapterRejected(
            f"{config_path}: target modules {sorted(unknown)} are not linear layers of the base model"
        )
    if not weights_path.is_file():
        raise AdapterRejected(f"{folder} has no {WEIGHTS_FILE}")
    tensors = read_safetensors(weights_path)
    if not tensors:
        raise AdapterRejected(f"{weights_path} holds no tensors")
    for name, array in tensors.items():
        _check_tensor(name, array, rank, weights_path)
    return config


def base_linear_modules(model_dir: Path) -> set[str]:
    """Short names of the base model's linear layers (``q_proj``...), from its safetensors headers."""
    names = set()
    for path in model_dir.glob("*.safetensors"):
        for name, (_, shape) in _header(path).items():
            if name.endswith(".weight") and len(shape) == 2 and "embed" not in name and "lm_head" not in name:
                names.add(name.removesuffix(".weight").rsplit(".", 1)[-1])
    return names


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy arrays."""
    with path.open("rb") as fh:
        header = _read_header(fh)
        data = fh.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise AdapterRejected(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        raw = np.frombuffer(data[start:end], dtype=dtype)
        if meta["dtype"] == "BF16":  # bfloat16 is the upper half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.astype(np.float32).reshape(meta["shape"])
    return out


def _header(path: Path) -> dict[str, tuple[str, list[int]]]:
    with path.open("rb") as fh:
        header = _read_header(fh)
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _read_header(fh: BinaryIO) -> dict[str, Any]:
    (length,) = struct.unpack("<Q", fh.read(8))
    header: dict[str, Any] = json.loads(fh.read(length))
    return header


def _check_tensor(name: str, array: np.ndarray, rank: int, path: Path) -> None:
    if not np.isfinite(array).all():
        raise AdapterRejected(f"{path}: tensor {name} has non-finite values")
    if "lora_A" in name and (array.ndim != 2 or array.shape[0] != rank):
        raise AdapterRejected(f"{path}: {name} has shape {list(array.shape)}, expected [{rank}, in_features]")
    if "lora_B" in name and (array.ndim != 2 or array.shape[1] != rank):
        raise AdapterRejected(f"{path}: {name} has shape {list(array.shape)}, expected [out_features, {rank}]")
