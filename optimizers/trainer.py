"""Train a LoRA adapter from exported records: the whole loop, top to bottom, in one function.

    python -m optimizers.trainer --data records.jsonl --out runs/sft-1 --algorithm sft
    python -m optimizers.trainer --data records.jsonl --out runs/sft-1 --algorithm sft --resume   # after Ctrl-C

:func:`train` reads like the run it performs: records -> token examples (:mod:`optimizers.data`) -> the
algorithm's selection (:mod:`optimizers.sft`, :mod:`optimizers.kto`, :mod:`optimizers.grpo`) -> a fixed plan of
micro-batches -> base model + LoRA (:mod:`optimizers.model`) -> AdamW steps with gradient accumulation -> saved
adapter. Training runs in its own process, never in the serving one: the sidecar starts this module as a
command and reads the JSON summary it prints on stdout.

The output folder (:mod:`optimizers.checkpoints`) holds ``checkpoints/step-NNNNNN/{adapter/, optimizer.pt,
trainer_state.json}``, a ``latest`` pointer and ``metrics.jsonl`` (one line per step). Checkpoints are written
every ``save_every`` steps, at the end, and when SIGINT or SIGTERM arrives: the current micro-batch finishes, the
unfinished step is dropped, the last finished step is saved and the run returns (exit status
:data:`EXIT_INTERRUPTED`). A second signal stops at once. ``resume=True`` reloads the adapter and optimizer
state and continues with the micro-batch after the saved step: the plan of micro-batches is a pure function of
the data and the seed, and a resumed run refuses data or batching settings that differ from the saved ones.
``resume=True`` on a folder without a checkpoint starts a fresh run in it.

CPU threads. Two OpenMP threads on two cores that vLLM or anything else also keeps busy wait on each other at
every operation: measured here with the machine's load at 7-10, a step ran 10-20x slower with torch's default
two threads than with ``--threads 1``. ``OMP_WAIT_POLICY=PASSIVE`` (set by whoever starts this process: it must
be in the environment before torch is imported) brought two threads to about half the one-thread speed. On a
CPU shared with serving, start the trainer with ``--threads 1``; on an idle machine the default uses every core.

A run whose records leave nothing to train on (no reward clears the filter, every GRPO group has equal rewards,
...) raises :class:`~optimizers.errors.NoUsableDataError` before anything is written (exit status
:data:`EXIT_NO_DATA`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from optimizers import checkpoints, data, distributed, grpo, kto, sft
from optimizers.embedded import prepare_default_model
from optimizers.errors import NoUsableDataError, TrainingError
from optimizers.grpo import GRPOOptions
from optimizers.kto import KL_MODES, KTOOptions
from optimizers.model import (
    LLAMA_TARGET_MODULES,
    LoraOptions,
    load_policy,
    pick_device,
    trainable_parameters,
)
from optimizers.precision import PRECISIONS, autocast, resolve_precision
from optimizers.sft import SFTOptions

logger = logging.getLogger(__name__)

ALGORITHMS: dict[str, ModuleType] = {"sft": sft, "kto": kto, "grpo": grpo}
EXIT_NO_DATA = 3
NO_DATA_KEY = "no_usable_data"  # what process 0 of several prints instead of a summary when there is no data
EXIT_INTERRUPTED = 130


def default_cache_dir() -> Path:
    """Where the embedded model lives: ``LIGHTWIRE_CACHE_DIR``, else ``~/.cache/lightwire`` (as the proxy)."""
    configured = os.environ.get("LIGHTWIRE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "lightwire"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    out: Path
    algorithm: str = "sft"
    base: Path | None = None  # None: the embedded SmolLM2-135M-Instruct in cache_dir
    cache_dir: Path = field(default_factory=default_cache_dir)
    init_adapter: Path | None = None
    resume: bool = False
    lora: LoraOptions = field(default_factory=LoraOptions)
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4
    max_tokens: int = 2048
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    max_length: int = 1024
    seed: int = 0
    save_every: int = 50
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    sft: SFTOptions = field(default_factory=SFTOptions)
    kto: KTOOptions = field(default_factory=KTOOptions)
    grpo: GRPOOptions = field(default_factory=GRPOOptions)


@dataclass(frozen=True)
class TrainResult:
    algorithm: str
    #: "completed" (all planned steps, or max_steps, are done) or "interrupted" (a signal; resume to go on).
    stopped: str
    #: The newest saved adapter (a peft folder), None only when interrupted before the first step.
    adapter_dir: Path | None
    start_step: int
    step: int
    total_steps: int
    #: Loss of each optimizer step run by this call.
    losses: list[float]
    #: Non-pad prompt + completion tokens trained on by this call, seconds spent in its steps, their ratio.
    tokens: int
    seconds: float
    tokens_per_second: float
    examples: int
    padding: float
    note: str
    #: The precision mode trained in (``auto`` resolved: :func:`optimizers.precision.resolve_precision`).
    precision: str
    history: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adapter_dir"] = None if self.adapter_dir is None else str(self.adapter_dir)
        del out["history"]
        return out


def train(
    records: Sequence[dict[str, Any]],
    config: TrainConfig,
    *,
    model: Any = None,
    world: distributed.World = distributed.ALONE,
) -> TrainResult:
    """Train on ``records`` as ``config`` says; see the module docstring.

    ``model``: an already loaded policy (from :func:`optimizers.model.load_policy`) to train in place instead
    of loading ``config.base``; it must match ``config.lora`` and ``config.precision``. ``world``: this
    process's place among several (:mod:`optimizers.distributed`); process 0 alone writes.
    """
    if config.algorithm not in ALGORITHMS:
        raise TrainingError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {config.algorithm!r}")
    algorithm, options = ALGORITHMS[config.algorithm], getattr(config, config.algorithm)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(distributed.device_of(world, config.device))
    base = _base_dir(config)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any id will do

    # 1. Data: records -> token examples -> the algorithm's selection -> a fixed plan of micro-batches.
    examples, skipped = data.to_examples(records, tokenizer=tokenizer, max_length=config.max_length)
    examples, note = algorithm.prepare(examples, options)
    if skipped:
        note += "; " + ", ".join(f"{count} records: {reason}" for reason, count in skipped.items())
    if not examples:
        raise NoUsableDataError(
            f"No usable data for {config.algorithm} in {len(records)} records ({note}): nothing was trained "
            f"and nothing was written to {config.out}."
        )
    batches = data.plan(
        examples,
        batch_size=config.batch_size,
        max_tokens=config.max_tokens,
        seed=config.seed,
        epochs=config.epochs,
        min_batches=(config.max_steps or 0) * config.grad_accum * world.size,
    )
    per_step = config.grad_accum * world.size  # micro-batches in one optimizer step, over every process
    total_steps = data.steps_for(len(batches), per_step)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    run = {
        "algorithm": config.algorithm,
        "fingerprint": data.fingerprint(examples),
        "seed": config.seed,
        "batch_size": config.batch_size,
        "max_tokens": config.max_tokens,
        "grad_accum": config.grad_accum,
    }
    padding = data.padding_fraction(examples, batches)

    # 2. Where to start: step 0 of a fresh folder, or the latest checkpoint of the same run.
    checkpoint = checkpoints.latest(config.out)
    if checkpoint is not None and not config.resume:
        raise TrainingError(f"{config.out} already holds a run ({checkpoint.name}): resume it or choose another out.")
    start_step = 0
    if checkpoint is not None:
        saved = checkpoints.state(checkpoint)
        mismatch = {k: (saved["run"].get(k), v) for k, v in run.items() if saved["run"].get(k) != v}
        if mismatch:
            raise TrainingError(f"cannot resume {checkpoint}: the data or settings differ (saved, now): {mismatch}")
        start_step = int(saved["step"])
    logger.info(
        "%s: %d examples, %d micro-batches (%.0f%% padding), steps %d..%d, %s",
        config.algorithm,
        len(examples),
        len(batches),
        100 * padding,
        start_step,
        total_steps,
        note,
    )

    # 3. The policy: frozen base + LoRA, and AdamW over the LoRA weights only.
    torch.manual_seed(config.seed)
    policy = model
    if policy is None:
        policy = load_policy(
            base, lora=config.lora, precision=config.precision, device=device, init_adapter=config.init_adapter
        )
    device = policy.device
    precision = resolve_precision(config.precision, device)
    parameters = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    if checkpoint is not None:
        checkpoints.restore(checkpoint, policy, optimizer)
        checkpoints.keep_metrics_until(config.out, start_step)
        logger.info("Resuming %s at step %d of %d", checkpoint, start_step, total_steps)

    # 4. The loop: one optimizer step = grad_accum micro-batches, the loss normalised over the whole step.
    from tqdm.auto import tqdm

    history: list[dict[str, Any]] = []
    step = start_step
    stopped = "completed"
    quiet = not (config.progress and world.main)
    bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=True if quiet else None)
    with _stop_requested() as stop:
        while step < total_steps:
            every_batch = [[examples[i] for i in b] for b in batches[step * per_step :][:per_step]]
            units = sum(_units(algorithm.UNIT, b) for b in every_batch)
            step_batches = world.mine(every_batch)
            started = time.perf_counter()
            loss_value, tokens, padded, metrics = 0.0, 0, 0, dict[str, float]()
            for step_examples in step_batches:
                batch = data.collate(step_examples, pad_id=pad_id).to(device)
                with autocast(precision, device):
                    loss_sum, batch_metrics = algorithm.loss(policy, batch, options)
                loss = loss_sum / units
                loss.backward()
                loss_value += float(loss.detach())
                tokens += batch.num_tokens
                padded += batch.num_padded_tokens
                metrics = {k: metrics.get(k, 0.0) + v / len(step_batches) for k, v in batch_metrics.items()}
                if stop.is_set():
                    break
            if world.sum(float(stop.is_set()))[0]:  # the unfinished step is dropped (by every process alike);
                optimizer.zero_grad(set_to_none=True)  # the checkpoint below holds the last full one
                stopped = "interrupted"
                break
            world.sum_gradients(parameters)
            loss_value, summed_tokens, summed_padded = world.sum(loss_value, tokens, padded)
            tokens, padded = int(summed_tokens), int(summed_padded)
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            seconds = time.perf_counter() - started
            record = {"step": step, "loss": loss_value, "grad_norm": float(grad_norm), "tokens": tokens}
            record["padding"] = round(1 - tokens / padded, 4)
            record |= {"seconds": round(seconds, 4), "tokens_per_second": round(tokens / seconds, 1), **metrics}
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens / seconds:.0f}")
            if world.main:
                checkpoints.append_metrics(config.out, record)
                if config.save_every and step % config.save_every == 0 and step < total_steps:
                    checkpoints.save(config.out, step, policy, optimizer, run, base=base, total_steps=total_steps)
    bar.close()

    # 5. Save where the run stopped (unless nothing was done since the last checkpoint), and report.
    adapter_dir = None
    if step > 0:
        if world.main and not checkpoints.exists(config.out, step):
            checkpoints.save(config.out, step, policy, optimizer, run, base=base, total_steps=total_steps)
        world.barrier()
        adapter_dir = checkpoints.adapter_dir(config.out, step)
    tokens = sum(r["tokens"] for r in history)
    seconds = sum(r["seconds"] for r in history)
    result = TrainResult(
        algorithm=config.algorithm,
        stopped=stopped,
        adapter_dir=adapter_dir,
        start_step=start_step,
        step=step,
        total_steps=total_steps,
        losses=[r["loss"] for r in history],
        tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_second=round(tokens / seconds, 1) if seconds else 0.0,
        examples=len(examples),
        padding=round(padding, 4),
        note=note,
        precision=precision,
        history=history,
    )
    logger.info("%s %s at step %d/%d: %s", config.algorithm, stopped, step, total_steps, adapter_dir)
    return result


def _base_dir(config: TrainConfig) -> Path:
    if config.base is not None:
        return config.base
    return prepare_default_model(config.cache_dir)


def _units(unit: str, examples: Sequence[data.Example]) -> int:
    """What the step's loss is averaged over: completion tokens, or sequences."""
    return sum(e.completion_len for e in examples) if unit == "token" else len(examples)


@contextlib.contextmanager
def _stop_requested() -> Iterator[threading.Event]:
    """An event set by the first SIGINT / SIGTERM (the loop then saves and returns); a second one interrupts."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield requested
        return

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        logger.warning("%s: finishing this micro-batch, saving, then stopping", signal.Signals(signum).name)
        requested.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# Command line ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[Path, TrainConfig, str, int]:
    """``(records file, config, log level, processes)`` from the command line."""
    d, s, k, g = TrainConfig(out=Path()), SFTOptions(), KTOOptions(), GRPOOptions()
    parser = argparse.ArgumentParser(prog="python -m optimizers.trainer", description=__doc__.splitlines()[0])

    io = parser.add_argument_group("data and output")
    io.add_argument("--data", type=Path, required=True, help="Exported records: .jsonl (one a line) or .parquet.")
    io.add_argument("--out", type=Path, required=True, help="Run folder: checkpoints, adapters, metrics.jsonl.")
    io.add_argument("--resume", action="store_true", help="Continue the run saved in --out at its latest checkpoint.")
    io.add_argument("--save-every", type=int, default=d.save_every, help="Checkpoint every N steps (0: at the end).")
    io.add_argument("--max-length", type=int, default=d.max_length, help="Longest sequence, prompt + completion.")

    run = parser.add_argument_group("algorithm and optimization")
    run.add_argument("--algorithm", choices=sorted(ALGORITHMS), default=d.algorithm, help="What to optimize.")
    run.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW learning rate (constant).")
    run.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay.")
    run.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="Clip the gradient norm to this.")
    run.add_argument("--batch-size", type=int, default=d.batch_size, help="Most sequences in one micro-batch.")
    run.add_argument("--max-tokens", type=int, default=d.max_tokens, help="Most padded tokens in one micro-batch.")
    run.add_argument("--grad-accum", type=int, default=d.grad_accum, help="Micro-batches per optimizer step.")
    run.add_argument("--epochs", type=int, default=d.epochs, help="Passes over the data (unless --max-steps).")
    run.add_argument("--max-steps", type=int, help="Stop after this many optimizer steps, repeating the data.")
    run.add_argument("--seed", type=int, default=d.seed, help="Seed of the data order and the LoRA init.")

    model = parser.add_argument_group("model and LoRA")
    model.add_argument("--base", type=Path, help="Base model folder (default: the embedded SmolLM2-135M-Instruct).")
    model.add_argument("--cache-dir", type=Path, default=d.cache_dir, help="Where the embedded model is kept.")
    model.add_argument("--init-adapter", type=Path, help="Start from this peft adapter (e.g. the served version).")
    model.add_argument("--lora-r", type=int, default=d.lora.r, help="LoRA rank (vLLM: at most --max-lora-rank).")
    model.add_argument("--lora-alpha", type=int, default=d.lora.alpha, help="LoRA alpha (scale = alpha / r).")
    model.add_argument("--lora-dropout", type=float, default=d.lora.dropout, help="Dropout on the LoRA input.")
    model.add_argument(
        "--lora-targets", default=",".join(LLAMA_TARGET_MODULES), help="Comma-separated module names to adapt."
    )
    model.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="See optimizers.model.")
    model.add_argument("--device", default=d.device, help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N.")
    model.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice), per process.")
    model.add_argument(
        "--nproc", type=int, default=1, help="Processes to train in, data parallel under torchrun (one per GPU)."
    )

    sft_group = parser.add_argument_group("sft: filtered behaviour cloning and distillation")
    sft_group.add_argument("--min-reward", type=float, default=s.min_reward, help="Keep turns with reward >= this.")
    sft_group.add_argument("--top-fraction", type=float, help="Also keep only the top fraction of each task's turns.")
    sft_group.add_argument("--teacher", action="store_true", help="Every record is teacher data: no reward filter.")

    kto_group = parser.add_argument_group("kto: unpaired good / bad feedback")
    kto_group.add_argument("--kto-beta", type=float, default=k.beta, help="KTO beta (strength of the KL anchor).")
    kto_group.add_argument("--kto-threshold", type=float, default=k.threshold, help="Reward >= this: desirable.")
    kto_group.add_argument("--kto-desirable-weight", type=float, default=k.desirable_weight, help="lambda_D.")
    kto_group.add_argument("--kto-undesirable-weight", type=float, default=k.undesirable_weight, help="lambda_U.")
    kto_group.add_argument("--kto-kl", choices=KL_MODES, default=k.kl, help="How z0 (the KL term) is estimated.")

    grpo_group = parser.add_argument_group("grpo: group-relative policy gradient")
    grpo_group.add_argument("--clip-low", type=float, default=g.clip_low, help="PPO clip below: ratio >= 1 - this.")
    grpo_group.add_argument("--clip-high", type=float, default=g.clip_high, help="PPO clip above: ratio <= 1 + this.")
    grpo_group.add_argument("--dual-clip", type=float, default=g.dual_clip, help="Dual-clip bound (0: off).")
    grpo_group.add_argument("--kl-beta", type=float, default=g.kl_beta, help="Weight of the KL to the base model.")
    grpo_group.add_argument("--min-group-size", type=int, default=g.min_group_size, help="Smaller groups: skipped.")

    output = parser.add_argument_group("progress")
    output.add_argument("--quiet", action="store_true", help="No progress bar.")
    output.add_argument("--log-level", default="INFO", help="Logging level (DEBUG, INFO, WARNING).")

    a = parser.parse_args(argv)
    config = TrainConfig(
        out=a.out,
        algorithm=a.algorithm,
        base=a.base,
        cache_dir=a.cache_dir,
        init_adapter=a.init_adapter,
        resume=a.resume,
        lora=LoraOptions(
            r=a.lora_r,
            alpha=a.lora_alpha,
            dropout=a.lora_dropout,
            target_modules=tuple(t.strip() for t in a.lora_targets.split(",") if t.strip()),
        ),
        learning_rate=a.learning_rate,
        weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm,
        batch_size=a.batch_size,
        max_tokens=a.max_tokens,
        grad_accum=a.grad_accum,
        epochs=a.epochs,
        max_steps=a.max_steps,
        max_length=a.max_length,
        seed=a.seed,
        save_every=a.save_every,
        precision=a.precision,
        device=a.device,
        threads=a.threads,
        progress=not a.quiet,
        sft=SFTOptions(min_reward=a.min_reward, top_fraction=a.top_fraction, teacher=a.teacher),
        kto=KTOOptions(
            beta=a.kto_beta,
            threshold=a.kto_threshold,
            desirable_weight=a.kto_desirable_weight,
            undesirable_weight=a.kto_undesirable_weight,
            kl=a.kto_kl,
        ),
        grpo=GRPOOptions(
            clip_low=a.clip_low,
            clip_high=a.clip_high,
            dual_clip=a.dual_clip,
            kl_beta=a.kl_beta,
            min_group_size=a.min_group_size,
        ),
    )
    return a.data, config, a.log_level, a.nproc


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    path, config, level, nproc = parse_args(argv)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if nproc > 1 and not distributed.launched():
        return _launch(nproc, argv)
    world = distributed.join(config.device)
    try:
        result = train(data.load_records(path), config, world=world)
    except NoUsableDataError as error:
        print(f"lightwire trainer: {error}", file=sys.stderr)
        if world.size > 1 and world.main:  # torchrun reports any failing process as 1: say it on stdout
            print(json.dumps({NO_DATA_KEY: str(error)}))
        return 0 if world.size > 1 else EXIT_NO_DATA
    except TrainingError as error:
        print(f"lightwire trainer: {error}", file=sys.stderr)
        return 1
    finally:
        distributed.leave()
    if world.main:
        print(json.dumps(result.summary()))
    return EXIT_INTERRUPTED if result.stopped == "interrupted" else 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The arguments less ``--nproc N``: torchrun would read it as an abbreviation of its ``--nproc-per-node``."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        out.append(arg)
    return out


def _launch(nproc: int, argv: Sequence[str]) -> int:
    """Run this trainer in ``nproc`` processes under torchrun; its exit status and summary as one process's."""
    command = distributed.torchrun(nproc, "optimizers.trainer", _without_nproc(argv))
    logger.info("training in %d processes: %s", nproc, " ".join(command))
    done = subprocess.run(command, stdout=subprocess.PIPE, check=False)
    lines = done.stdout.decode().strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if NO_DATA_KEY in summary:
        return EXIT_NO_DATA
    if summary:
        print(lines[-1])
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
