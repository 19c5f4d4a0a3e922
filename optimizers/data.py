"""Exported Lightwire records -> token examples -> padded micro-batches.

A record is one turn and one choice, as the store's export writes it: ``messages`` (the request's chat messages),
``completion`` (``[assistant message]``), ``reward`` (float or None, after credit assignment), ``prompt_token_ids``
(exactly what the model saw), ``completion_token_ids`` (exactly what it sampled), ``completion_logprobs`` (the
behaviour policy's logprob of each sampled token, raw: before temperature and top-p), ``session_id``, ``span_id``,
``turn_index``, ``split`` ("train" or "heldout"), ``adapter_version`` and ``model``.

Token ids. Training uses the logged ids as they are: no re-tokenization, so the loss is on exactly the tokens the
model produced and the behaviour logprobs stay aligned with them. Records without ids (calls that went to an
upstream provider) fall back to the base model's chat template: prompt = ``apply_chat_template(messages,
add_generation_prompt=True)``, completion = the tokens that ``messages + completion`` adds after that prompt, cut
after the end-of-turn token. Such records have no behaviour logprobs.

Length. A sequence longer than ``max_length`` keeps its whole prompt and loses the end of its completion: in a
causal model the logprobs of the first completion tokens do not depend on the later ones, so the truncated
example is exact (its logged logprobs stay valid), it just stops early. A prompt that leaves no room for even
one completion token is skipped.

Batching (CPU first). Each micro-batch is padded on the right to its longest sequence. Sequences are shuffled,
then sorted by length inside windows of a few micro-batches, so that a micro-batch holds sequences of similar
length (typically a few percent of padding), then the micro-batches are shuffled again. A micro-batch holds at
most ``batch_size`` sequences and ``max_tokens`` padded tokens. Packing several sequences into one row was left
out on purpose: it needs block-diagonal attention masks, which the CPU attention kernels compute at full
quadratic cost, and it saves no more than what length bucketing already saves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Micro-batches per sorting window: larger = less padding, less randomness in what is batched together.
BUCKET_WINDOW = 8


@dataclass(frozen=True)
class Example:
    """One training sequence: ``input_ids = prompt + completion``, the loss is on the completion only."""

    input_ids: tuple[int, ...]
    prompt_len: int
    #: Behaviour logprob of each completion token (``len(input_ids) - prompt_len`` values), or None.
    behaviour_logprobs: tuple[float, ...] | None
    reward: float | None
    #: Records with the same prompt (token ids, else messages): one GRPO group.
    group: str
    #: Records of the same task (``task_id``, else the conversation's opening messages): SFT's top fraction.
    task: str
    #: The record says it is a stronger model's answer (``"teacher": true``): distillation data for SFT.
    teacher: bool = False
    #: The algorithm's per-sequence number: GRPO advantage, KTO side (+1 desirable, -1 undesirable), 1.0 for SFT.
    label: float = 1.0
    #: Index of the record in the input, for messages and tests.
    source: int = 0

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len

    @property
    def completion_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.prompt_len :]

    def with_label(self, label: float) -> Example:
        return replace(self, label=label)


@dataclass
class Batch:
    """A padded micro-batch. ``completion_mask[b, t]`` is True where position ``t`` predicts a completion token,
    i.e. ``input_ids[b, t + 1]`` belongs to the completion; ``behaviour_logprobs`` is aligned the same way and
    holds NaN where a record came without logprobs."""

    input_ids: torch.Tensor  # [B, T] long, right-padded with pad_id
    attention_mask: torch.Tensor  # [B, T] long
    completion_mask: torch.Tensor  # [B, T - 1] bool
    behaviour_logprobs: torch.Tensor  # [B, T - 1] float32
    labels: torch.Tensor  # [B] float32
    examples: list[Example]
    pad_id: int

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens: prompt + completion."""
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_completion_tokens(self) -> int:
        return sum(e.completion_len for e in self.examples)

    @property
    def num_padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
            behaviour_logprobs=self.behaviour_logprobs.to(device),
            labels=self.labels.to(device),
        )


# Records -----------------------------------------------------------------------------------------------------


def load_records(path: Path) -> list[dict[str, Any]]:
    """Read exported records from JSON Lines (``.jsonl``, one record a line) or Parquet (``.parquet``)."""
    if path.suffix == ".parquet":
        import duckdb

        with duckdb.connect() as con:
            cursor = con.execute("SELECT * FROM read_parquet(?)", [str(path)])
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    else:
        with path.open() as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    for row in rows:  # Parquet exports may keep the chat JSON as text
        for key in ("messages", "completion"):
            if isinstance(row.get(key), str):
                row[key] = json.loads(row[key])
    return rows


def is_train(record: dict[str, Any]) -> bool:
    """Whether a record may be trained on: ``split`` is "train" or absent (held-out rows are for evaluation)."""
    return record.get("split") in (None, "train")


def group_key(record: dict[str, Any]) -> str:
    """Same prompt token ids, or when they were not logged, the same messages: one group of samples."""
    ids = record.get("prompt_token_ids")
    return _digest(("ids", list(ids)) if ids else ("messages", record.get("messages")))


def task_key(record: dict[str, Any]) -> str:
    """The task a turn belongs to: ``task_id`` when the export has one, else the conversation's opening (the
    messages before the first assistant turn), which every turn of an agent's episode shares."""
    if record.get("task_id") is not None:
        return _digest(("task", record["task_id"]))
    opening = []
    for message in record.get("messages") or []:
        if message.get("role") == "assistant":
            break
        opening.append(message)
    return _digest(("opening", opening))


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_examples(
    records: Sequence[dict[str, Any]], *, tokenizer: Any, max_length: int
) -> tuple[list[Example], Counter[str]]:
    """Convert the training records that can be used; count why the others were not (``Counter`` of reasons)."""
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    for index, record in enumerate(records):
        if not is_train(record):
            skipped["held out"] += 1
            continue
        prompt, completion, logprobs = _token_ids(record, tokenizer)
        if not prompt or not completion:
            skipped["no prompt or no completion tokens"] += 1
            continue
        if logprobs is not None and (len(logprobs) != len(completion) or not all(map(_is_finite, logprobs))):
            skipped["logprobs missing or not aligned with the completion ids (kept without them)"] += 1
            logprobs = None
        room = max_length - len(prompt)
        if room < 1:
            skipped[f"prompt longer than max_length={max_length}"] += 1
            continue
        if len(completion) > room:
            skipped[f"completion truncated to max_length={max_length} (kept)"] += 1
            completion, logprobs = completion[:room], None if logprobs is None else logprobs[:room]
        reward = record.get("reward")
        examples.append(
            Example(
                input_ids=tuple(prompt + completion),
                prompt_len=len(prompt),
                behaviour_logprobs=None if logprobs is None else tuple(float(x) for x in logprobs),
                reward=None if reward is None else float(reward),
                group=group_key(record),
                task=task_key(record),
                teacher=record.get("teacher") is True,
                source=index,
            )
        )
    return examples, skipped


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _token_ids(record: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int], list[float] | None]:
    """``(prompt ids, completion ids, behaviour logprobs or None)``: the logged ids, else the chat template's."""
    prompt, completion = record.get("prompt_token_ids"), record.get("completion_token_ids")
    if prompt and completion:
        logprobs = record.get("completion_logprobs")
        return [int(t) for t in prompt], [int(t) for t in completion], None if logprobs is None else list(logprobs)
    messages, answer = record.get("messages"), record.get("completion")
    if not messages or not answer:
        return [], [], None
    prompt = _template(tokenizer, messages, add_generation_prompt=True)
    full = _template(tokenizer, [*messages, *answer], add_generation_prompt=False)
    if full[: len(prompt)] != prompt:  # a template that rewrites earlier turns: no clean split, skip
        return [], [], None
    completion = full[len(prompt) :]
    eos = tokenizer.eos_token_id
    if eos in completion:  # vLLM's sampled ids end at the end-of-turn token; so do these
        completion = completion[: completion.index(eos) + 1]
    return prompt, completion, None


def _template(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return [int(t) for t in ids]


def groups(examples: Iterable[Example]) -> dict[str, list[Example]]:
    """Examples by :attr:`Example.group` (the same prompt), in first-seen order."""
    out: dict[str, list[Example]] = {}
    for example in examples:
        out.setdefault(example.group, []).append(example)
    return out


def fingerprint(examples: Sequence[Example]) -> str:
    """A digest of the prepared examples, to refuse resuming a run on different data."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.prompt_len, round(e.label, 6)]).encode())
    return digest.hexdigest()[:32]


# Batching ----------------------------------------------------------------------------------------------------


def plan_epoch(lengths: Sequence[int], *, batch_size: int, max_tokens: int, seed: int) -> list[list[int]]:
    """Micro-batches (lists of example indices) for one pass over the data, deterministic for a given seed.

    Shuffle, sort by length inside windows of :data:`BUCKET_WINDOW` micro-batches, cut into micro-batches of at
    most ``batch_size`` sequences and ``max_tokens`` padded tokens (a sequence longer than that goes alone),
    then shuffle the micro-batches.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * BUCKET_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        current: list[int] = []
        for index in sorted(order[start : start + window], key=lambda i: lengths[i]):
            longest = max([lengths[i] for i in current] + [lengths[index]])
            if current and (len(current) == batch_size or longest * (len(current) + 1) > max_tokens):
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


def plan(
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_tokens: int,
    seed: int,
    epochs: int,
    min_batches: int = 0,
) -> list[list[int]]:
    """Micro-batches for ``epochs`` passes, or as many passes as it takes to reach ``min_batches``.

    Epoch ``k`` is shuffled with seed ``seed + k``: the plan is the same on every call, so a resumed run
    picks up at the micro-batch where the interrupted one stopped.
    """
    lengths = [len(e.input_ids) for e in examples]
    batches: list[list[int]] = []
    epoch = 0
    while epoch < epochs or len(batches) < min_batches:
        batches += plan_epoch(lengths, batch_size=batch_size, max_tokens=max_tokens, seed=seed + epoch)
        epoch += 1
    return batches


def collate(examples: Sequence[Example], *, pad_id: int) -> Batch:
    """Pad on the right into one :class:`Batch`."""
    width = max(len(e.input_ids) for e in examples)
    size = len(examples)
    input_ids = torch.full((size, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((size, width), dtype=torch.long)
    completion_mask = torch.zeros((size, width - 1), dtype=torch.bool)
    behaviour = torch.full((size, width - 1), math.nan, dtype=torch.float32)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        # position t predicts token t + 1: the completion tokens prompt_len .. n-1 are predicted at prompt_len-1 .. n-2
        completion_mask[row, e.prompt_len - 1 : n - 1] = True
        if e.behaviour_logprobs is not None:
            behaviour[row, e.prompt_len - 1 : n - 1] = torch.tensor(e.behaviour_logprobs)
    labels = torch.tensor([e.label for e in examples], dtype=torch.float32)
    return Batch(input_ids, attention_mask, completion_mask, behaviour, labels, list(examples), pad_id)


def padding_fraction(examples: Sequence[Example], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions in a plan (0 = none)."""
    real = padded = 0
    for batch in batches:
        lengths = [len(examples[i].input_ids) for i in batch]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 0.0 if padded == 0 else 1 - real / padded


def steps_for(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)
