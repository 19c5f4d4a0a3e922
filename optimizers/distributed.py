"""Training on several processes (``--nproc N`` / ``train_processes``): data parallel under ``torchrun``.

``python -m optimizers.trainer --nproc 2 ...`` checks that the records leave something to train on, then starts
``torchrun --standalone --nproc-per-node 2 -m optimizers.trainer ...`` (gloo on the CPU, NCCL on GPUs: one GPU per
process). Every process reads the same records, builds the same plan of micro-batches (a pure function of the data
and the seed) and the same LoRA initialization (the same seed). An optimizer step then covers ``grad_accum x N``
micro-batches: process ``r`` runs those at positions ``r, r + N, ...``, each loss normalized over the whole
step's units, and the gradients are summed across processes before clipping and AdamW (an all-reduce, as
DistributedDataParallel does; the wrapper itself is not used because the losses call the model's backbone and
head directly, not the wrapped ``forward`` that its hooks watch). Every process takes the same step, so the
weights stay identical; process 0 alone writes checkpoints, metrics and the summary.

The result is the one-process run with ``grad_accum x N`` micro-batches per step, up to the order in which float
sums are taken (``tests/test_distributed.py`` compares the two).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This process's share of one step's micro-batches."""
        return list(items[self.rank :: self.size])

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self.size == 1:
            return
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)

    def sum(self, *values: float) -> list[float]:
        if self.size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return [float(v) for v in total]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


ALONE = World()  # one process: nothing to share


def launched() -> bool:
    """Whether this process was started by torchrun as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str) -> World:
    """Join the process group torchrun set up (a no-op for a single process)."""
    if not launched():
        return ALONE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_of(world: World, device: str) -> str:
    """On GPUs, one per process (torchrun's LOCAL_RANK)."""
    if world.size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def torchrun(nproc: int, module: str, argv: Sequence[str]) -> list[str]:
    """The command that runs ``python -m module argv`` in ``nproc`` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        module,
        *argv,
    ]
