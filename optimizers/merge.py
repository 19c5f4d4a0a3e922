"""Merge a LoRA adapter into its base weights and write a new model folder that vLLM can reload.

Runs as its own process (``python -m optimizers.merge --base DIR --adapter DIR --out DIR``) so that torch
never loads into the proxy. The folder is written beside its final name and renamed into place when complete,
so a half-written folder is never served.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)


def merge(base: Path, adapter: Path, out: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial, safe_serialization=True)
    for item in base.iterdir():  # the tokenizer and chat template; weights and config come from the merge
        weights = item.name.endswith((".safetensors", ".safetensors.index.json"))
        if item.is_file() and not weights and not (partial / item.name).exists():
            shutil.copy2(item, partial / item.name)
    partial.rename(out)
    log.info("merged %s into %s in %.1f s", adapter, out, time.perf_counter() - started)
    return out


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
