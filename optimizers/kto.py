"""KTO: Kahneman-Tversky optimization from unpaired good / bad feedback (Ethayarajh et al., 2024).

Production feedback rarely comes in pairs: a turn gets a thumbs up or a thumbs down, one completion per prompt.
KTO learns from such unpaired labels. For a turn (x, y), with the reference policy pi_ref and beta > 0:

    r(x, y)  = log pi_theta(y | x) - log pi_ref(y | x)          (summed over the completion tokens)
    z0       = max(0, mean over mismatched pairs (x_i, y_j), i != j, of r(x_i, y_j))
    loss     = lambda_D * (1 - sigmoid(beta * (r - z0)))   for a desirable turn
               lambda_U * (1 - sigmoid(beta * (z0 - r)))   for an undesirable turn

averaged over the turns of the optimizer step. ``z0`` is a batch estimate of KL(pi_theta || pi_ref), held
constant (no gradient flows through it), exactly as in the paper and TRL's ``KTOTrainer``: each prompt of the
micro-batch is paired with the next turn's completion (``x_i`` with ``y_(i+1) mod B``) and both policies score
the pair. That costs two more forward passes without gradient; ``kl="batch"`` instead uses the detached
micro-batch mean of ``r`` itself (clamped at 0), which is cheaper but biased (it is the matched pairs' log
ratio, not a KL estimate). A micro-batch of one turn has no mismatched pair and falls back to ``batch``.

The reference policy is the base model: the same weights with the LoRA adapter switched off (peft's
``disable_adapter()``), so no second copy of the model is held in memory. A turn is desirable when its reward is
at least ``threshold`` (default 0.5) and undesirable otherwise; turns without a reward are not used.

The paper advises weights such that ``lambda_D * n_D / (lambda_U * n_U)`` lies in [1, 4/3]; the run's note
reports the ratio of the selected data and :func:`prepare` logs a warning when it falls outside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from optimizers.data import Batch, Example, collate
from optimizers.model import completion_logprobs, per_sequence, reference

logger = logging.getLogger(__name__)

#: The loss is a sum over turns; the trainer divides by the step's number of turns.
UNIT = "sequence"
KL_MODES = ("mismatched", "batch")


@dataclass(frozen=True, kw_only=True)
class KTOOptions:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    threshold: float = 0.5
    kl: str = "mismatched"


def prepare(examples: list[Example], options: KTOOptions) -> tuple[list[Example], str]:
    """Label each rewarded turn +1 (desirable) or -1 (undesirable)."""
    rewarded = [e for e in examples if e.reward is not None]
    labelled = [e.with_label(1.0 if (e.reward or 0.0) >= options.threshold else -1.0) for e in rewarded]
    good = sum(1 for e in labelled if e.label > 0)
    bad = len(labelled) - good
    note = f"{good} desirable and {bad} undesirable turns (threshold {options.threshold:g}), "
    note += f"{len(examples) - len(rewarded)} without reward"
    if good and bad:
        ratio = options.desirable_weight * good / (options.undesirable_weight * bad)
        note += f"; lambda_D*n_D/(lambda_U*n_U) = {ratio:.2f}"
        if not 1.0 <= ratio <= 4 / 3:
            logger.warning("KTO: lambda_D*n_D/(lambda_U*n_U) = %.2f, outside the advised [1, 4/3]", ratio)
    return labelled, note


def loss(model: Any, batch: Batch, options: KTOOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed KTO loss of the batch's turns."""
    policy = per_sequence(completion_logprobs(model, batch), batch)
    with reference(model):
        ref = per_sequence(completion_logprobs(model, batch), batch)
    log_ratio = policy - ref

    if options.kl == "mismatched" and len(batch.examples) > 1:
        pairs = mismatched(batch)
        with torch.no_grad():
            policy_kl = per_sequence(completion_logprobs(model, pairs), pairs)
        with reference(model):
            ref_kl = per_sequence(completion_logprobs(model, pairs), pairs)
        z0 = (policy_kl - ref_kl).mean().clamp(min=0)
    else:
        z0 = log_ratio.detach().mean().clamp(min=0)

    desirable = batch.labels > 0
    losses = torch.where(
        desirable,
        options.desirable_weight * (1 - torch.sigmoid(options.beta * (log_ratio - z0))),
        options.undesirable_weight * (1 - torch.sigmoid(options.beta * (z0 - log_ratio))),
    )
    metrics = {"kl": float(z0), "log_ratio": float(log_ratio.detach().mean())}
    return losses.sum(), metrics


def mismatched(batch: Batch) -> Batch:
    """The KL pairs: prompt ``i`` followed by the completion of turn ``(i + 1) mod B``, no longer than the batch."""
    width = batch.input_ids.shape[1]
    turns = batch.examples
    pairs = []
    for i, turn in enumerate(turns):
        other = turns[(i + 1) % len(turns)]
        room = width - turn.prompt_len  # >= 1: every turn has a completion token within the batch width
        pairs.append(
            Example(
                input_ids=turn.input_ids[: turn.prompt_len] + other.completion_ids[:room],
                prompt_len=turn.prompt_len,
                behaviour_logprobs=None,
                reward=None,
                group=turn.group,
                task=turn.task,
            )
        )
    return collate(pairs, pad_id=batch.pad_id).to(batch.input_ids.device)
