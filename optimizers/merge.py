"""Merge a LoRA adapter into its base weights and write a new model folder that vLLM can reload.

Runs as its own process (``python -m optimizers.merge --base DIR --adapter DIR --out DIR``) so that torch
never loads into the proxy. The folder is written beside its final name and renamed into place when complete,
so a half-written folder is never served.

A plain LoRA (linear layers, no DoRA, no per-module rank or alpha, nothing else trained) is merged tensor by
tensor, ``W + (alpha / r) * B @ A`` (``alpha / sqrt(r)`` with rsLoRA) computed in fp32 and rounded once to the
weight's dtype, shard by shard, with safetensors and torch alone: a second or two, most of it torch's import.
Anything else goes through peft's ``merge_and_unload`` on the transformers model (ten seconds and more).

Every merged weight must be finite in the dtype it is served in: an adapter whose own weights are finite can
still overflow bf16 or fp16 once added to the base (checked before the folder gets its final name; the merge
fails instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def merge(base: Path, adapter: Path, out: Path) -> Path:
    started = time.perf_counter()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    plain = _plain(config) and (adapter / ADAPTER_WEIGHTS).is_file()
    (_merge_tensors if plain else _merge_with_peft)(base, adapter, partial, config)
    for item in base.iterdir():  # the tokenizer, chat template, config and shard index
        if item.is_file() and not item.name.endswith(".safetensors") and not (partial / item.name).exists():
            shutil.copy2(item, partial / item.name)
    partial.rename(out)
    how = "tensor by tensor" if plain else "with peft"
    log.info("merged %s into %s %s in %.1f s", adapter, out, how, time.perf_counter() - started)
    return out


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _plain(config: dict[str, Any]) -> bool:
    """Whether the adapter is a LoRA of linear layers that :func:`_merge_tensors` merges exactly as peft would."""
    return (
        config.get("peft_type") == "LORA"
        and not config.get("use_dora")
        and not config.get("fan_in_fan_out")
        and not config.get("rank_pattern")
        and not config.get("alpha_pattern")
        and not config.get("modules_to_save")
        and config.get("bias", "none") == "none"
    )


def _merge_tensors(base: Path, adapter: Path, out: Path, config: dict[str, Any]) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    lora = load_file(adapter / ADAPTER_WEIGHTS)
    deltas: dict[str, torch.Tensor] = {}  # base weight name -> (alpha / r) * B @ A
    for key, a in lora.items():
        module, sep, suffix = key.partition(".lora_A.")
        if not sep:
            continue
        b = lora[f"{module}.lora_B.{suffix}"]
        deltas[module.removeprefix("base_model.model.") + ".weight"] = scale * (b.float() @ a.float())
    if len(deltas) * 2 != len(lora):
        raise ValueError(f"{adapter}: weights other than lora_A/lora_B pairs; cannot merge them tensor by tensor")
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(shard)
        for name in deltas.keys() & tensors.keys():
            weight = tensors[name]
            tensors[name] = _finite(name, (weight.float() + deltas.pop(name)).to(weight.dtype))
        save_file(tensors, out / shard.name, metadata=metadata)
    if deltas:
        raise ValueError(f"{adapter}: no base weight for {sorted(deltas)[:3]}...")


def _merge_with_peft(base: Path, adapter: Path, out: Path, config: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    for name, tensor in merged.state_dict().items():
        _finite(name, tensor)
    merged.save_pretrained(out, safe_serialization=True)


def _finite(name: str, tensor: Any) -> Any:
    """``tensor`` itself, if every value is finite in its own dtype."""
    import torch

    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"merged weight {name} is not finite in {tensor.dtype}: the adapter overflows the base weights"
        )
    return tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="model folder the adapter was trained on")
    parser.add_argument("--adapter", type=Path, required=True, help="peft LoRA adapter folder")
    parser.add_argument("--out", type=Path, required=True, help="new model folder to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    merge(args.base, args.adapter, args.out)
    # The folder is complete; skip the interpreter's teardown of torch and transformers (seconds on a busy CPU).
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
