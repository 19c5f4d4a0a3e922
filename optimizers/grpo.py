"""GRPO-style group-relative policy gradient on logged samples (Shao et al., 2024), with PPO's clipped ratio.

A group is every logged completion of the same prompt (the same prompt token ids, else the same messages): the
sidecar asked the backend for several samples, or the same task came back several times. Within a group of
rewards r_1..r_G:

    A_i = (r_i - mean(r)) / (std(r) + eps)        std with Bessel's correction, as TRL; eps = 1e-4

Groups whose rewards are all equal carry no signal (every A_i = 0) and are skipped, as are groups of one sample.
Each completion token t of sample i then contributes, with rho = pi_theta(y_t | ...) / pi_behaviour(y_t | ...):

    loss_t = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)
    (dual clip, Ye et al. 2020: for A_i < 0 the objective is bounded below by dual_clip * A_i)
    [+ kl_beta * (exp(d) - d - 1), d = log pi_ref - log pi_theta: the k3 KL estimate to the base model, off by default]

and the loss is the mean over all completion tokens of the optimizer step (token-level, as DAPO / TRL's
``loss_type="dapo"``): long completions count by their tokens, not as one sample.

The behaviour policy is the one that sampled: its logprobs were logged by vLLM with each token. vLLM logs *raw*
logprobs, from the model's logits before temperature and top-p, and the sampling temperature is not part of the
logged data, so the ratio is taken between raw distributions: rho = pi_theta(raw) / pi_behaviour(raw). At
theta = behaviour the ratio is exactly 1, which is what the clipping needs; the temperature changes which tokens
were sampled (that is in the data), not how far the model has moved. Dividing by the temperature would need the
whole raw distribution to renormalise, which is not logged. Records without logprobs (provider calls) use the
current policy's own, detached: rho = 1 on their first use, plain on-policy policy gradient. The log ratio is
clamped to +-20 before the exponential; tokens that far off are clipped anyway and would only turn into inf.

The samples should come from the adapter being trained (``--init-adapter`` with the version that served them):
tokens sampled by another policy give ratios far from 1 and are clipped away.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from optimizers.data import Batch, Example, groups
from optimizers.model import completion_logprobs, reference, token_rows

#: The loss is a sum over completion tokens; the trainer divides by the step's completion tokens.
UNIT = "token"
LOG_RATIO_LIMIT = 20.0


@dataclass(frozen=True, kw_only=True)
class GRPOOptions:
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 3.0
    kl_beta: float = 0.0
    std_eps: float = 1e-4
    min_group_size: int = 2


def prepare(examples: list[Example], options: GRPOOptions) -> tuple[list[Example], str]:
    """Group the rewarded samples by prompt, skip the groups without signal, attach each sample's advantage."""
    rewarded = [e for e in examples if e.reward is not None]
    kept: list[Example] = []
    small = equal = used = 0
    for members in groups(rewarded).values():
        rewards = [float(e.reward or 0.0) for e in members]
        if len(members) < options.min_group_size:
            small += 1
        elif len(set(rewards)) == 1:
            equal += 1
        else:
            used += 1
            mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
            kept += [e.with_label((r - mean) / (std + options.std_eps)) for e, r in zip(members, rewards, strict=True)]
    note = (
        f"{used} groups used ({len(kept)} samples); skipped: {equal} groups whose rewards are all equal, "
        f"{small} groups with fewer than {options.min_group_size} samples, "
        f"{len(examples) - len(rewarded)} samples without reward"
    )
    return kept, note


def loss(model: Any, batch: Batch, options: GRPOOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed clipped policy-gradient loss over the batch's completion tokens."""
    logprobs = completion_logprobs(model, batch)
    advantages = batch.labels[token_rows(batch)]
    behaviour = batch.behaviour_logprobs[batch.completion_mask]
    logged = ~torch.isnan(behaviour)
    behaviour = torch.where(logged, behaviour, logprobs.detach())

    log_ratio = (logprobs - behaviour).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - options.clip_low, 1 + options.clip_high)
    objective = torch.min(ratio * advantages, clipped * advantages)
    if options.dual_clip:
        objective = torch.where(advantages < 0, torch.max(objective, options.dual_clip * advantages), objective)
    per_token = -objective

    if options.kl_beta:
        with reference(model):
            ref = completion_logprobs(model, batch)
        delta = ref - logprobs
        per_token = per_token + options.kl_beta * (torch.exp(delta) - delta - 1)

    with torch.no_grad():
        off = (ratio < 1 - options.clip_low) | (ratio > 1 + options.clip_high)
        gap = (logprobs - behaviour).abs()[logged]
        metrics = {
            "clip_fraction": float(off.float().mean()),
            "behaviour_gap": float(gap.mean()) if gap.numel() else 0.0,
        }
    return per_token.sum(), metrics
