"""The trainer on the real embedded model: real steps on tiny datasets, short sequences, a few steps each.

About 2-3 minutes on two cores. No mocks: the records carry real token ids from the model's own tokenizer.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from optimizers import data, grpo, precision, sft
from optimizers.errors import NoUsableDataError, TrainingError
from optimizers.grpo import GRPOOptions
from optimizers.model import LLAMA_TARGET_MODULES, LoraOptions, load_policy
from optimizers.precision import cpu_bf16_is_fast, resolve_precision
from optimizers.trainer import EXIT_INTERRUPTED, EXIT_NO_DATA, TrainConfig, train
from tests.training_fixtures import (
    add_behaviour_logprobs,
    greedy_answer,
    load_base,
    make_record,
    prompt_ids,
    write_records,
)

# The timeout guards against a hang, not a speed: a test runs up to ~12 real steps, 280-340 s on 2 busy cores.
pytestmark = [pytest.mark.training, pytest.mark.timeout(900)]

QUESTIONS = ("What is your name?", "Who are you?")
ANSWER = "My name is Lightwire, a learning sidecar."
ROOT = Path(__file__).resolve().parent.parent
#: One thread: two OpenMP threads on two cores that other tests (or vLLM) also use wait on each other and run
#: 10-20x slower; one thread degrades gracefully.
TEST_THREADS = 1


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


def settings(out: Path, model_dir: Path, **overrides: Any) -> TrainConfig:
    """Small, quick runs: two sequences a micro-batch, no bar, a checkpoint only at the end, one CPU thread."""
    values: dict[str, Any] = {"out": out, "base": model_dir, "batch_size": 2, "progress": False, "save_every": 0}
    values["threads"] = TEST_THREADS
    return TrainConfig(**(values | overrides))


def name_records(tokenizer: Any) -> list[dict[str, Any]]:
    """Two rewarded answers to learn, one unrewarded one the filter must drop."""
    good = [make_record(tokenizer, q, ANSWER, reward=1.0) for q in QUESTIONS]
    return [*good, make_record(tokenizer, QUESTIONS[0], "I am Bob.", reward=0.0)]


def snapshot(policy: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Copies of the (frozen) base weights and of the (trainable) LoRA weights."""
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    return base, lora


def assert_only_lora_changed(policy: Any, before: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
    base, lora = before
    now = dict(policy.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in base.items()), "a base weight changed"
    changed = [n for n, p in lora.items() if not torch.equal(now[n], p)]
    assert any("lora_B" in n for n in changed), "no LoRA weight changed"


def test_sft_learns_the_rewarded_answer_and_saves_a_servable_adapter(
    tmp_path: Path, training_model_dir: Path, training_tokenizer: Any
) -> None:
    policy = load_policy(training_model_dir, lora=LoraOptions(), precision="auto", device=torch.device("cpu"))
    before = snapshot(policy)
    config = settings(tmp_path / "run", training_model_dir, max_steps=8, learning_rate=3e-3)

    result = train(name_records(training_tokenizer), config, model=policy)

    assert result.examples == 2  # the reward-0 answer was filtered out
    assert result.stopped == "completed" and result.step == 8
    assert result.precision == ("bf16" if cpu_bf16_is_fast() else "fp32") == result.summary()["precision"]
    assert result.losses[-1] < result.losses[0] / 10
    assert_only_lora_changed(policy, before)

    adapter = result.adapter_dir
    assert adapter is not None and adapter.parent.parent.parent == tmp_path / "run"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(LLAMA_TARGET_MODULES)
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32
    assert Path(adapter_config["base_model_name_or_path"]) == training_model_dir.resolve()
    assert all("lora_" in key for key in load_file(adapter / "adapter_model.safetensors"))
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (adapter / "adapter_model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by a server user

    from peft import PeftModel

    base = load_base(training_model_dir)
    before_answer = greedy_answer(base, training_tokenizer, QUESTIONS[0])
    tuned = PeftModel.from_pretrained(base, adapter)
    assert "Lightwire" not in before_answer
    assert greedy_answer(tuned, training_tokenizer, QUESTIONS[0]).startswith("My name is Lightwire")


def test_auto_precision_is_bf16_only_where_the_cpu_does_bf16_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for native, chosen in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda native=native: native)
        assert resolve_precision("auto", cpu) == chosen
        assert resolve_precision("fp32-autocast", cpu) == "fp32-autocast"  # an explicit mode is kept
    with pytest.raises(TrainingError, match="precision must be one of auto, bf16"):
        resolve_precision("fp16", cpu)


def test_the_cpu_measurement_matches_a_larger_bf16_matmul() -> None:
    """Where bf16 is emulated it is an order of magnitude slower than fp32; where native, about as fast: the
    quick measurement and a product of the model's size agree on which."""
    a, b = torch.randn(256, 576), torch.randn(576, 1536)

    def seconds(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y
        began = time.perf_counter()
        for _ in range(3):
            x @ y
        return time.perf_counter() - began

    ratio = seconds(a.bfloat16(), b.bfloat16()) / seconds(a, b)
    assert (ratio <= precision.BF16_SLOWDOWN_TOLERATED) == cpu_bf16_is_fast(), ratio


def test_resume_continues_from_the_saved_step(
    tmp_path: Path, training_model_dir: Path, training_tokenizer: Any
) -> None:
    records = name_records(training_tokenizer)
    straight = train(records, settings(tmp_path / "straight", training_model_dir, max_steps=4))

    out = tmp_path / "resumed"
    first = train(records, settings(out, training_model_dir, max_steps=2))
    assert (first.step, first.stopped) == (2, "completed")
    with pytest.raises(TrainingError, match="already holds a run"):
        train(records, settings(out, training_model_dir, max_steps=4))
    second = train(records, settings(out, training_model_dir, max_steps=4, resume=True))

    assert (second.start_step, second.step, len(second.losses)) == (2, 4, 2)
    # The same micro-batches, weights and optimizer state as the run that was never stopped.
    assert second.losses == pytest.approx(straight.losses[2:], rel=2e-2)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (out / "latest").read_text().strip() == "step-000004"

    other_data = [*records, make_record(training_tokenizer, "Hi", ANSWER)]
    with pytest.raises(TrainingError, match="differ"):
        train(other_data, settings(out, training_model_dir, max_steps=6, resume=True))


def test_no_usable_data_says_why_and_writes_nothing(
    tmp_path: Path, training_model_dir: Path, training_tokenizer: Any
) -> None:
    bad = [make_record(training_tokenizer, q, "No idea.", reward=0.0) for q in QUESTIONS]
    with pytest.raises(NoUsableDataError, match=r"0 of 2 rewarded turns with reward >= 0\.5"):
        train(bad, settings(tmp_path / "sft", training_model_dir))

    unrated = [make_record(training_tokenizer, q, ANSWER, reward=None) for q in QUESTIONS]
    with pytest.raises(NoUsableDataError, match="2 without reward"):
        train(unrated, settings(tmp_path / "kto", training_model_dir, algorithm="kto"))

    # Two samples of one prompt with the same reward: a group without signal.
    equal = [make_record(training_tokenizer, QUESTIONS[0], a, reward=1.0) for a in (ANSWER, "I am Bob.")]
    with pytest.raises(NoUsableDataError, match="1 groups whose rewards are all equal"):
        train(equal, settings(tmp_path / "grpo", training_model_dir, algorithm="grpo"))

    assert list(tmp_path.iterdir()) == []


def test_command_line_no_data_exit_status(tmp_path: Path, training_model_dir: Path, training_tokenizer: Any) -> None:
    equal = [make_record(training_tokenizer, QUESTIONS[0], a, reward=1.0) for a in (ANSWER, "I am Bob.")]
    records = write_records(tmp_path / "records.jsonl", equal)
    command = [*_trainer_command(records, tmp_path / "out", training_model_dir), "--algorithm", "grpo"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == EXIT_NO_DATA
    assert "No usable data for grpo" in done.stderr and "all equal" in done.stderr
    assert not (tmp_path / "out").exists()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(
    tmp_path: Path, training_model_dir: Path, training_tokenizer: Any
) -> None:
    records = write_records(tmp_path / "records.jsonl", name_records(training_tokenizer))
    out = tmp_path / "out"
    command = [*_trainer_command(records, out, training_model_dir), "--max-steps", "1000", "--batch-size", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not _metric_lines(out) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert _metric_lines(out), "no step finished"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == EXIT_INTERRUPTED, stderr
    result = json.loads(stdout)
    assert result["stopped"] == "interrupted" and 1 <= result["step"] < 1000
    assert (out / "latest").read_text().strip() == f"step-{result['step']:06d}"
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").exists()
    assert len(_metric_lines(out)) == result["step"]


def _trainer_command(records: Path, out: Path, model_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "optimizers.trainer", "--data", str(records), "--out", str(out)]
    return [*command, "--base", str(model_dir), "--quiet", "--save-every", "0", "--threads", str(TEST_THREADS)]


def _metric_lines(out: Path) -> list[str]:
    try:
        return (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []


def test_one_kto_step(tmp_path: Path, training_model_dir: Path, training_tokenizer: Any) -> None:
    good = [make_record(training_tokenizer, q, ANSWER, reward=1.0) for q in QUESTIONS]
    bad = [make_record(training_tokenizer, q, "I don't know.", reward=0.0) for q in QUESTIONS]
    policy = load_policy(training_model_dir, lora=LoraOptions(), precision="auto", device=torch.device("cpu"))
    before = snapshot(policy)

    result = train(good + bad, settings(tmp_path, training_model_dir, algorithm="kto", batch_size=4), model=policy)

    (step,) = result.history
    # At step 0 the policy is the reference: every log ratio is 0 and every turn's loss is 1 - sigmoid(0).
    assert step["loss"] == pytest.approx(0.5, abs=1e-3)
    assert step["kl"] == pytest.approx(0.0, abs=1e-3)
    assert 0 < step["grad_norm"] < float("inf")
    assert_only_lora_changed(policy, before)


def test_one_grpo_step_skips_equal_reward_groups(
    tmp_path: Path, training_model_dir: Path, training_tokenizer: Any
) -> None:
    q0, q1 = QUESTIONS
    answers = [(q0, ANSWER, 1.0), (q0, "I am Bob.", 0.0), (q0, "I don't know.", 0.0)]
    answers += [(q1, ANSWER, 1.0), (q1, "I am Bob.", 1.0)]  # no signal: skipped
    records = [make_record(training_tokenizer, q, a, reward=r) for q, a, r in answers]
    add_behaviour_logprobs(load_base(training_model_dir), records)
    policy = load_policy(training_model_dir, lora=LoraOptions(), precision="auto", device=torch.device("cpu"))
    before = snapshot(policy)

    result = train(records, settings(tmp_path, training_model_dir, algorithm="grpo", batch_size=4), model=policy)

    assert result.examples == 3
    assert "1 groups used" in result.note and "1 groups whose rewards are all equal" in result.note
    (step,) = result.history
    assert torch.isfinite(torch.tensor(step["loss"]))
    assert 0 < step["grad_norm"] < float("inf")
    # The logged logprobs line up with the tokens: the policy (= base at step 0) gives back nearly the same values.
    assert step["behaviour_gap"] < 0.1
    assert_only_lora_changed(policy, before)


def test_group_advantages() -> None:
    examples = [
        data.Example(input_ids=(1, 2, 3), prompt_len=2, behaviour_logprobs=None, reward=r, group=g, task=g)
        for g, r in [("a", 1.0), ("a", 0.0), ("a", 0.0), ("b", 1.0), ("b", 1.0), ("c", 1.0), ("a", None)]
    ]
    kept, note = grpo.prepare(examples, GRPOOptions())
    assert [round(e.label, 3) for e in kept] == [1.155, -0.577, -0.577]
    assert "1 groups whose rewards are all equal, 1 groups with fewer than 2 samples, 1 samples" in note


def test_sft_top_fraction_and_teacher_data() -> None:
    def example(task: str, reward: float | None, teacher: bool = False) -> data.Example:
        return data.Example((1, 2), 1, None, reward, group=task, task=task, teacher=teacher)

    examples = [example("a", 0.9), example("a", 0.6), example("a", 0.2), example("b", 0.7), example(".", None, True)]
    kept, _ = sft.prepare(examples, sft.SFTOptions(min_reward=float("-inf"), top_fraction=0.3))
    assert sorted((e.task, e.reward) for e in kept) == [(".", None), ("a", 0.9), ("b", 0.7)]


def test_records_without_token_ids_use_the_chat_template(training_tokenizer: Any) -> None:
    provider = make_record(training_tokenizer, QUESTIONS[0], ANSWER, with_ids=False, teacher=True)
    logged = make_record(training_tokenizer, QUESTIONS[0], ANSWER)
    heldout = make_record(training_tokenizer, QUESTIONS[0], ANSWER, split="heldout")

    (from_template, from_ids), skipped = data.to_examples(
        [provider, logged, heldout], tokenizer=training_tokenizer, max_length=256
    )

    assert from_template.input_ids == from_ids.input_ids and from_template.prompt_len == from_ids.prompt_len
    assert from_template.teacher and from_template.behaviour_logprobs is None
    assert training_tokenizer.decode(from_template.completion_ids) == ANSWER + "<|im_end|>"
    assert skipped == {"held out": 1}


def test_long_records_keep_the_prompt_and_cut_the_completion(training_tokenizer: Any) -> None:
    record = make_record(training_tokenizer, QUESTIONS[0], ANSWER, completion_logprobs=None)
    prompt = prompt_ids(training_tokenizer, record["messages"])
    record["completion_logprobs"] = [-0.5] * len(record["completion_token_ids"])

    (example,), _ = data.to_examples([record], tokenizer=training_tokenizer, max_length=len(prompt) + 3)
    assert example.input_ids[: example.prompt_len] == tuple(prompt) and example.completion_len == 3
    assert example.behaviour_logprobs == (-0.5, -0.5, -0.5)
    none, skipped = data.to_examples([record], tokenizer=training_tokenizer, max_length=len(prompt))
    assert none == [] and list(skipped) == [f"prompt longer than max_length={len(prompt)}"]


def test_batches_pad_little_and_mask_only_the_completion() -> None:
    lengths = [5, 40, 6, 41, 7, 39, 5, 42]
    examples = [data.Example(tuple(range(1, n + 1)), n - 2, None, 1.0, "g", "t") for n in lengths]
    plan = data.plan(examples, batch_size=2, max_tokens=1000, seed=0, epochs=1)
    assert sorted(i for b in plan for i in b) == list(range(8))
    assert data.padding_fraction(examples, plan) < 0.1

    batch = data.collate([examples[0], examples[1]], pad_id=0)
    assert batch.num_tokens == 45 and batch.num_completion_tokens == 4
    assert batch.input_ids[:, 1:][batch.completion_mask].tolist() == [4, 5, 39, 40]
