"""Filtered behaviour cloning (rejection-sampling fine-tuning) and distillation from a teacher's answers.

What it optimizes: the negative log-likelihood of the completion tokens of the selected turns,

    L(theta) = - 1/N * sum over selected turns i, completion tokens t of log pi_theta(y_i,t | x_i, y_i,<t)

with N the number of completion tokens in the optimizer step (every token weighs the same, as in TRL's SFT).
Learning only from the turns that went well is the simplest way to turn sparse feedback into a policy
improvement: it is supervised learning on the policy's own best samples.

Which turns are selected:

* Teacher data: records flagged ``"teacher": true`` (or every record, with ``teacher=True``) are always kept, no
  reward needed. This is distillation: a stronger upstream model answered through the proxy and the small model
  learns its answers. Provider records carry no token ids; :mod:`optimizers.data` tokenizes them with the base
  model's chat template.
* Other turns need a reward: at least ``min_reward`` (default 0.5: the 1s of 0/1 feedback, the better half of a
  0..1 score; ``-inf`` keeps every rewarded turn), and with ``top_fraction`` also a reward among the top
  fraction of its task's turns (ties at the cut-off included). A task is ``task_id`` when the export has one,
  else the conversation's opening messages (:func:`optimizers.data.task_key`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from optimizers.data import Batch, Example
from optimizers.model import completion_logprobs

#: The loss is a sum over completion tokens; the trainer divides by the step's completion tokens.
UNIT = "token"
DEFAULT_MIN_REWARD = 0.5


@dataclass(frozen=True, kw_only=True)
class SFTOptions:
    min_reward: float = DEFAULT_MIN_REWARD
    top_fraction: float | None = None
    teacher: bool = False


def prepare(examples: list[Example], options: SFTOptions) -> tuple[list[Example], str]:
    """Keep the teacher turns and the turns whose reward clears the filter; say how many of each."""
    teachers = [e for e in examples if options.teacher or e.teacher]
    rewarded = [e for e in examples if not (options.teacher or e.teacher) and e.reward is not None]
    cleared = [e for e in rewarded if e.reward is not None and e.reward >= options.min_reward]
    if options.top_fraction is not None:
        cleared = _top_fraction(rewarded, options.top_fraction, keep=cleared)
    unrewarded = len(examples) - len(teachers) - len(rewarded)
    rule = f"reward >= {options.min_reward:g}"
    if options.top_fraction is not None:
        rule += f" and in the top {options.top_fraction:.0%} of its task"
    note = (
        f"{len(teachers)} teacher turns, {len(cleared)} of {len(rewarded)} rewarded turns with {rule}, "
        f"{unrewarded} turns without reward"
    )
    return [e.with_label(1.0) for e in teachers + cleared], note


def _top_fraction(rewarded: list[Example], fraction: float, *, keep: list[Example]) -> list[Example]:
    """The turns of ``keep`` whose reward is among the top ``fraction`` of their task in ``rewarded``."""
    cutoffs: dict[str, float] = {}
    by_task: dict[str, list[float]] = {}
    for e in rewarded:
        by_task.setdefault(e.task, []).append(float(e.reward or 0.0))
    for task, rewards in by_task.items():
        rewards.sort(reverse=True)
        cutoffs[task] = rewards[max(1, math.ceil(fraction * len(rewards))) - 1]
    return [e for e in keep if e.reward is not None and e.reward >= cutoffs[e.task]]


def loss(model: Any, batch: Batch, options: SFTOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed negative log-likelihood of the batch's completion tokens."""
    logprobs = completion_logprobs(model, batch)
    total = -logprobs.sum()
    return total, {"nll": float(total.detach()) / max(1, logprobs.numel())}
