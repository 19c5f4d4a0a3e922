"""Fixtures for the ``training`` tier: the embedded model, its tokenizer, and records built with them.

Its fixtures are registered for every test module by ``tests/conftest.py``.
The records look like the store's export: the prompt ids are what the chat template gives (what vLLM rendered),
the completion ids are a fixed answer's tokens followed by ``<|im_end|>`` (what the model sampled, stop token
included), and, where a test needs them, the behaviour logprobs are the base model's own, as vLLM would have
logged them for a sample of the base model.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from optimizers.embedded import prepare_default_model
from optimizers.precision import cpu_bf16_is_fast


def cache_dir() -> Path:
    """The directory where the embedded model is converted once and kept (as in the vLLM tier)."""
    configured = os.environ.get("LIGHTWIRE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "lightwire"


@pytest.fixture(scope="session")
def training_model_dir() -> Path:
    """The embedded model as a Hugging Face folder (converted on first use, ~30 s)."""
    return prepare_default_model(cache_dir())


@pytest.fixture(scope="session")
def training_tokenizer(training_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(training_model_dir)


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"])


def make_record(
    tokenizer: Any,
    question: str,
    answer: str,
    *,
    reward: float | None = 1.0,
    with_ids: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """One exported record: a user question, the assistant's answer, its reward and (by default) token ids."""
    messages = [{"role": "user", "content": question}]
    record: dict[str, Any] = {
        "messages": messages,
        "completion": [{"role": "assistant", "content": answer}],
        "reward": reward,
        "prompt_token_ids": None,
        "completion_token_ids": None,
        "completion_logprobs": None,
        "session_id": uuid.uuid4().hex,
        "span_id": uuid.uuid4().hex,
        "turn_index": 0,
        "split": "train",
        "adapter_version": None,
        "model": "SmolLM2-135M-Instruct",
    }
    if with_ids:
        record["prompt_token_ids"] = prompt_ids(tokenizer, messages)
        record["completion_token_ids"] = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    record.update(extra)
    return record


def load_base(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    # bf16, as vLLM serves it, where this CPU computes in bf16 natively; else fp32, as the trainer then trains.
    dtype = torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model


def add_behaviour_logprobs(model: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``completion_logprobs`` with ``model``'s raw logprob of each completion token (as vLLM logs them)."""
    for record in records:
        prompt, completion = record["prompt_token_ids"], record["completion_token_ids"]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        record["completion_logprobs"] = logprobs.tolist()
    return records


def greedy_answer(model: Any, tokenizer: Any, question: str, *, max_new_tokens: int = 12) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": question}])])
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))


def write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
