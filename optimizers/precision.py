"""Which precision training runs in, and whether this CPU computes in bf16 natively (see :mod:`optimizers.model`
for what each mode holds in which dtype, and what was measured).

Apart from the model so that the embedded model's preparation (:mod:`optimizers.embedded`, which the Docker
image's model stage runs with nothing else of Lightwire) can check the converted weights in the fast dtype too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

import torch

from optimizers.errors import TrainingError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32-autocast", "fp32")
#: ``auto`` takes bf16 on a CPU whose bf16 matmul is at most this many times slower than its fp32 one (native bf16
#: is as fast or faster; emulated, ~70x slower).
BF16_SLOWDOWN_TOLERATED = 2.0


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision mode to train in: ``precision`` itself, or for ``auto`` ``bf16`` where ``device`` does bf16
    matmuls natively (a CUDA device that supports it; a CPU measured by :func:`cpu_bf16_is_fast`), else ``fp32``."""
    if precision not in PRECISIONS:
        raise TrainingError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_bf16_is_fast()
    return "bf16" if native else "fp32"


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices about as fast as fp32 ones (within ``BF16_SLOWDOWN_TOLERATED``),
    timed on a 64x512 by 512x512 product with torch's current threads: ~0.1 s where bf16 is emulated."""
    a, b = torch.randn(64, 512), torch.randn(512, 512)

    def fastest(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # the first call may build the kernel
        times = []
        for _ in range(3):
            began = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - began)
        return min(times)

    fp32, bf16 = fastest(a, b), fastest(a.bfloat16(), b.bfloat16())
    fast = bf16 <= BF16_SLOWDOWN_TOLERATED * fp32
    logger.info(
        "bf16 matmuls on this CPU: %.2f ms against %.2f ms in fp32 (%s)",
        bf16 * 1e3,
        fp32 * 1e3,
        "native" if fast else "emulated: training in fp32",
    )
    return fast


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of a precision mode (a no-op for ``fp32``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, device) != "fp32")
