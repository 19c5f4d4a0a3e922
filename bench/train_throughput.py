"""Training throughput: Lightwire's trainer against TRL's ``SFTTrainer``, same LoRA, same data, one run, interleaved.

    .venv/bin/python -m bench.train_throughput [--quick] [--threads N] [--out FILE]

Both train the same LoRA (r=16, alpha=32, the seven Llama projections, no dropout) on the embedded
SmolLM2-135M-Instruct in the precision Lightwire's default ``precision="auto"`` picks on this CPU
(:func:`optimizers.precision.resolve_precision`), with LoRA weights and AdamW state in fp32: where the CPU does bf16
natively, bf16 weights (the checkpoint's dtype) and matmuls under bf16 autocast, and for TRL ``bf16=True``
(accelerate's autocast) on the same bf16 model; elsewhere fp32 for both (``--precision`` forces one). Same data
(agent-like records with logged token ids: a system prompt and a conversation of varying length, then a completion;
loss on the completion only), same micro-batch (4 sequences, max length 512, no gradient accumulation), same
optimizer (``torch.optim.AdamW``, lr 1e-4, no weight decay, constant rate, gradients clipped to norm 1). Both sort
sequences of similar length into the same micro-batch (Lightwire's bucketing, TRL's
``train_sampling_strategy="group_by_length"``) and pad on the right; padding is reported for both. TRL runs without
evaluation, checkpoints, gradient checkpointing (SFTConfig's default is on, Lightwire does not use it) or
reporting, and with ``logging_steps`` past the end of the run. TRL still computes its per-step entropy and
token-accuracy metrics: that is part of its ``compute_loss``, not a logging option.

Schedule: rounds of [Lightwire, TRL] (order swapped every round), each run ``WARMUP_STEPS`` steps then
``TIMED_STEPS`` timed ones, with a different data seed per round, identical for both. Each system trains its
own model, loaded once. Throughput = tokens / seconds over the timed steps, where tokens are the non-pad
prompt + completion tokens of the micro-batches trained (Lightwire: the sequences' lengths; TRL: the sum of
the attention mask, ``include_num_input_tokens_seen="non_padding"``), and a step's time runs from its start to
the end of the optimizer step (Lightwire's timer also covers collating its batch; TRL's collation happens
before ``on_step_begin`` and is not counted). ``machine`` reports how much CPU other processes took while it
ran: on a shared machine the absolute figures move, the ratio much less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from bench.machine import busy_seconds
from optimizers.model import LoraOptions, load_policy
from optimizers.precision import resolve_precision
from optimizers.trainer import TrainConfig, default_cache_dir, train

BATCH_SIZE = 4
MAX_LENGTH = 512
LEARNING_RATE = 1e-4
RECORDS = 64
WARMUP_STEPS = 2
TIMED_STEPS = 6
ROUNDS = 3
QUICK = {"rounds": 1, "warmup": 1, "timed": 3}
TARGET_RATIO = 1.0  # Lightwire tokens/s over TRL tokens/s

VOCABULARY = (
    "the agent calls a tool with the file path and reads the result then it plans the next step checks the "
    "test output compares the expected value writes a patch and asks the user whether the change is right "
    "search query database table column index error timeout retry request response token model adapter"
)


def make_records(tokenizer: Any, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Agent-like records with token ids: prompts of ~60-430 tokens, completions of ~15-130 tokens."""
    rng = random.Random(seed)
    words = VOCABULARY.split()

    def text(count: int) -> str:
        return " ".join(rng.choice(words) for _ in range(count)).capitalize() + "."

    records = []
    for _ in range(count):
        messages = [{"role": "system", "content": "You are a coding agent. " + text(30)}]
        for _turn in range(rng.randint(0, 3)):
            messages += [{"role": "user", "content": text(rng.randint(10, 60))}]
            messages += [{"role": "assistant", "content": text(rng.randint(10, 40))}]
        messages.append({"role": "user", "content": text(rng.randint(5, 60))})
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        answer = text(rng.randint(12, 120))
        completion = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
        budget = MAX_LENGTH - len(prompt)
        records.append(
            {
                "messages": messages,
                "completion": [{"role": "assistant", "content": answer}],
                "reward": 1.0,
                "prompt_token_ids": prompt,
                "completion_token_ids": completion[:budget],
                "split": "train",
            }
        )
    return records


class CpuMeter:
    """CPU time of this process and of the whole machine between ``start`` and ``stop`` (Linux /proc)."""

    def start(self) -> None:
        self.wall, self.own, self.total = time.monotonic(), time.process_time(), busy_seconds()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall
        own = time.process_time() - self.own
        total = busy_seconds() - self.total
        return {
            "wall_s": round(wall, 1),
            "this_process_cpu_s": round(own, 1),
            "other_processes_cpu_s": round(max(0.0, total - own), 1),
            "cores": os.cpu_count() or 0,
        }


# Lightwire ---------------------------------------------------------------------------------------------------


def lightwire_runner(
    model_dir: Path, records: list[dict[str, Any]], workdir: Path, threads: int | None, precision: str
) -> Any:
    policy = load_policy(model_dir, lora=LoraOptions(), precision=precision, device=torch.device("cpu"))

    def run(round_index: int, warmup: int, timed: int) -> list[dict[str, float]]:
        config = TrainConfig(
            out=workdir / f"lightwire-{round_index}",
            base=model_dir,
            algorithm="sft",
            max_steps=warmup + timed,
            batch_size=BATCH_SIZE,
            max_tokens=BATCH_SIZE * MAX_LENGTH,  # the batch size is the only limit, as for TRL
            max_length=MAX_LENGTH,
            learning_rate=LEARNING_RATE,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=round_index,
            precision=precision,
            threads=threads,
            progress=False,
            save_every=0,
        )
        result = train(records, config, model=policy)
        return [{k: s[k] for k in ("tokens", "seconds", "padding")} for s in result.history[warmup:]]

    return run


# TRL ---------------------------------------------------------------------------------------------------------


def trl_runner(model_dir: Path, records: list[dict[str, Any]], workdir: Path, precision: str) -> Any:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from optimizers.model import LLAMA_TARGET_MODULES

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for r in records:
        prompt, completion = r["prompt_token_ids"], r["completion_token_ids"]
        rows.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    dataset = Dataset.from_list(rows)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LLAMA_TARGET_MODULES), bias="none")
    torch.manual_seed(0)
    model = get_peft_model(base, lora)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.padded: list[tuple[int, int]] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seconds = time.perf_counter() - self.started
            self.steps.append({"tokens": state.num_input_tokens_seen - self.tokens, "seconds": seconds})

    def run(round_index: int, warmup: int, timed: int) -> list[dict[str, float]]:
        args = SFTConfig(
            output_dir=str(workdir / f"trl-{round_index}"),
            max_steps=warmup + timed,
            per_device_train_batch_size=BATCH_SIZE,
            gradient_accumulation_steps=1,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            bf16=precision == "bf16",
            use_cpu=True,
            gradient_checkpointing=False,
            completion_only_loss=True,
            max_length=MAX_LENGTH,
            packing=False,
            padding_free=False,
            train_sampling_strategy="group_by_length",
            include_num_input_tokens_seen="non_padding",
            logging_steps=10**6,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=round_index,
            data_seed=round_index,
        )
        timer = StepTimer()
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.add_callback(timer)
        collate = trainer.data_collator

        def counting_collator(features: list[dict[str, Any]]) -> Any:
            batch = collate(features)
            timer.padded.append((int(batch["attention_mask"].sum()), int(batch["attention_mask"].numel())))
            return batch

        trainer.data_collator = counting_collator
        with contextlib.redirect_stdout(sys.stderr):  # its end-of-train summary would mix with the JSON report
            trainer.train()
        # One micro-batch per step (no accumulation, no workers): batch i belongs to step i. Accelerate's loader
        # collates one batch ahead, so there is one more batch than steps.
        for step, (real, padded) in zip(timer.steps, timer.padded, strict=False):
            step["padding"] = round(1 - real / padded, 4)
        return timer.steps[warmup:]

    lora_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    return run, ",".join(lora_dtypes)


# The run -----------------------------------------------------------------------------------------------------


def summarize(steps: list[dict[str, float]]) -> dict[str, Any]:
    tokens = sum(int(s["tokens"]) for s in steps)
    seconds = sum(s["seconds"] for s in steps)
    per_step = sorted(s["tokens"] / s["seconds"] for s in steps)
    return {
        "tokens_per_second": round(tokens / seconds, 1),
        "median_step_tokens_per_second": round(statistics.median(per_step), 1),
        "timed_steps": len(steps),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "padding": round(statistics.fmean(s["padding"] for s in steps), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One round of a few steps (a smoke run).")
    parser.add_argument("--threads", type=int, help="torch CPU threads for both (default: torch's choice).")
    parser.add_argument("--out", type=Path, help="Also write the JSON report to this file.")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="For both (see above).")
    args = parser.parse_args(argv)
    try:
        import trl
    except ImportError:
        print("bench.train_throughput needs TRL: .venv/bin/pip install trl", file=sys.stderr)
        return 2
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("optimizers").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, warmup, timed = (
        (QUICK["rounds"], QUICK["warmup"], QUICK["timed"])
        if args.quick
        else (
            ROUNDS,
            WARMUP_STEPS,
            TIMED_STEPS,
        )
    )

    from optimizers.embedded import prepare_default_model

    precision = resolve_precision(args.precision, torch.device("cpu"))

    model_dir = prepare_default_model(default_cache_dir())
    from transformers import AutoTokenizer

    records = make_records(AutoTokenizer.from_pretrained(model_dir), RECORDS)
    lengths = [len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) for r in records]
    with tempfile.TemporaryDirectory(prefix="lightwire-train-bench-") as tmp:
        workdir = Path(tmp)
        systems = {"lightwire": lightwire_runner(model_dir, records, workdir, args.threads, precision)}
        systems["trl"], trl_lora_dtype = trl_runner(model_dir, records, workdir, precision)
        steps: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
        per_round: dict[str, list[float]] = {name: [] for name in systems}
        meter = CpuMeter()
        meter.start()
        for round_index in range(rounds):
            order = list(systems) if round_index % 2 == 0 else list(reversed(systems))
            for name in order:
                measured = systems[name](round_index, warmup, timed)
                steps[name] += measured
                per_round[name].append(summarize(measured)["tokens_per_second"])
                print(f"round {round_index + 1}/{rounds} {name}: {per_round[name][-1]} tokens/s", file=sys.stderr)
        machine = meter.stop()

    results = {name: summarize(s) | {"per_round_tokens_per_second": per_round[name]} for name, s in steps.items()}
    ratio = results["lightwire"]["tokens_per_second"] / results["trl"]["tokens_per_second"]
    report = {
        "bench": "train_throughput",
        "setup": {
            "model": model_dir.name,
            "lora": {"r": 16, "alpha": 32, "targets": "q,k,v,o,gate,up,down", "dropout": 0.0},
            "precision": {
                "bf16": "bf16 weights, fp32 LoRA + AdamW, bf16 autocast",
                "fp32": "fp32 weights, LoRA and AdamW",
            }[precision],
            "trl_lora_dtype": trl_lora_dtype,
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "batch_size": BATCH_SIZE,
            "max_length": MAX_LENGTH,
            "learning_rate": LEARNING_RATE,
            "records": len(records),
            "sequence_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
            "rounds": rounds,
            "warmup_steps": warmup,
            "timed_steps_per_round": timed,
        },
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "peft", "trl")}
        | {"trl": trl.__version__},
        "results": results,
        "ratio_vs_trl": round(ratio, 3),
        "target_ratio_vs_trl": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "machine": machine,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    lw, tr = results["lightwire"]["tokens_per_second"], results["trl"]["tokens_per_second"]
    print(
        f"train throughput (LoRA r=16 all-linear, {precision}, cpu x{torch.get_num_threads()} threads): "
        f"lightwire {lw:.0f} tok/s, TRL SFTTrainer {tr:.0f} tok/s: {ratio:.2f}x TRL "
        f"(target >= {TARGET_RATIO:.1f}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
