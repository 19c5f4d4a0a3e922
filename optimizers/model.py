"""The policy being trained: a frozen base model with a LoRA adapter, its logprobs, and its saved form.

Precision (``--precision``). LoRA weights, their gradients and AdamW's state are fp32 in every mode; the loss's
log-softmax is fp32. What differs is the frozen base and the matmuls:

* ``auto`` (default): ``bf16`` where the device multiplies bf16 matrices natively, else ``fp32``
  (:func:`optimizers.precision.resolve_precision`).
* ``bf16``: base weights held in bf16 (the embedded model's weights are bf16 on disk, so fp32 copies add no
  information), matmuls under ``torch.autocast(dtype=bfloat16)``.
* ``fp32-autocast``: fp32 base weights under the same autocast (re-cast to bf16 on every forward).
* ``fp32``: no autocast; the reference.

Measured here (SmolLM2-135M, r=16 on all seven projections, 4 sequences of ~250-310 tokens, one thread, the
three interleaved, tokens per CPU-second because the machine was shared): bf16 149, fp32-autocast 150, fp32 108.
Against fp32, the LoRA gradient's relative error was 3.9 % (bf16) and 2.4 % (fp32-autocast), the completion
logprobs differed by 0.050 and 0.040 nats on average. Same speed and both stable (fp32 master weights and
optimizer state either way), so ``bf16`` is what ``auto`` picks where it is fast: half the memory for the frozen
weights (0.27 instead of 0.54 GB here, and it scales with the model), and the numerics of the bf16 weights vLLM
serves and logs behaviour logprobs with. A CPU without bf16 instructions (AVX-512 BF16, AMX, Arm's BF16), such as
an AVX2-only Xeon or most laptops' x86 chips, has torch emulate them: there a bf16 matmul ran ~70x slower than
fp32 (1.1 against 77 GFLOP/s, one thread) and a training step 16x slower (5.4 against 85 tokens a second), so
``auto`` measures the CPU once and trains in ``fp32`` there.

The logprobs are computed on the completion positions only: the backbone runs over the whole sequence, but the
output projection (49k x 576 for SmolLM2, about a fifth of the model's compute per token) and the softmax run
only where a completion token is predicted. The log-softmax is taken in fp32.

Saved adapters are standard peft folders (``adapter_config.json`` + ``adapter_model.safetensors``) that vLLM's
``load_lora_adapter`` and ``PeftModel.from_pretrained`` accept. The default targets are the Llama projections
vLLM supports for LoRA; ``base_model_name_or_path`` is the absolute path of the local base folder, so that
nothing ever reaches for a model hub.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optimizers.data import Batch
from optimizers.errors import TrainingError
from optimizers.precision import resolve_precision

logger = logging.getLogger(__name__)

#: The Llama linear layers vLLM can serve LoRA weights for (all of them but the output head).
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True, kw_only=True)
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_TARGET_MODULES


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def load_policy(
    base: Path,
    *,
    lora: LoraOptions,
    precision: str,
    device: torch.device,
    init_adapter: Path | None = None,
) -> Any:
    """The base model with a trainable LoRA adapter (``peft.PeftModel``), on ``device``, in training mode.

    With ``init_adapter`` the adapter starts from that peft folder (and takes its rank and targets) instead of
    peft's initialisation (A random, B zero: the adapter starts as the identity).
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model.to(device)
    model.config.use_cache = False
    if init_adapter is not None:
        # autocast_adapter_dtype (peft's default) keeps the adapter in fp32 over a bf16 base.
        policy = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    else:
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        policy = get_peft_model(model, config)
    policy.train()
    return policy


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def completion_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """Logprob of every completion token of the batch under ``model``, flattened in row-major order ``[N]``.

    Works for the peft model (with the adapter, or the base inside ``model.disable_adapter()``) and for a
    plain causal LM. Llama-style heads only: no logit soft-capping or scaling.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    selected = hidden.last_hidden_state[:, :-1][batch.completion_mask]
    targets = batch.input_ids[:, 1:][batch.completion_mask]
    logits = causal_lm.get_output_embeddings()(selected).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def per_sequence(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum flattened per-token ``values`` (as from :func:`completion_logprobs`) into one value per sequence."""
    size = batch.input_ids.shape[0]
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, token_rows(batch), values)


def token_rows(batch: Batch) -> torch.Tensor:
    """The sequence index of each flattened completion token ``[N]``."""
    return batch.completion_mask.nonzero()[:, 0]


def save_adapter(model: Any, folder: Path, *, base: Path) -> None:
    """Write the adapter as a peft folder that vLLM and peft load, pointing at the local base folder."""
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card template: nothing to read in it
    config_path = folder / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    folder.chmod(0o755)  # the weights are written 0600; a server running as another user must read them
    for path in folder.iterdir():
        path.chmod(0o644)


def load_adapter_weights(model: Any, folder: Path) -> None:
    """Load saved adapter weights into ``model``'s adapter of the same shape (resuming a run)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(folder / ADAPTER_WEIGHTS, device=str(model.device)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise TrainingError(f"{folder} does not match the adapter being trained (unexpected: {unexpected[:3]})")


@contextlib.contextmanager
def reference(model: Any) -> Iterator[None]:
    """The reference policy: the base model, i.e. the same weights with the adapter switched off, no gradients."""
    with model.disable_adapter(), torch.no_grad():
        yield
