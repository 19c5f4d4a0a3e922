"""The trainer in two processes under torchrun (gloo on the CPU) against one process on the same data: the
adapters match."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from optimizers.checkpoints import adapter_dir
from optimizers.trainer import EXIT_NO_DATA
from tests.training_fixtures import make_record, write_records

pytestmark = pytest.mark.training

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ("What is your name?", "Who are you?", "What do you do?", "Where do you live?")
ANSWERS = ("I am Lightwire.", "A learning sidecar.", "I record calls and learn from rewards.", "Beside an agent.")
STEPS = 2
#: Stated tolerance: the two runs differ only in the order of float sums (gradients summed across processes
#: instead of accumulated in one), in fp32; after two AdamW steps at lr 1e-3 the weights agree to ~1e-7.
TOLERANCE = 1e-5


def trainer(data: Path, out: Path, model_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "optimizers.trainer", "--data", str(data), "--out", str(out)]
    command += ["--base", str(model_dir), "--batch-size", "2", "--max-steps", str(STEPS), "--learning-rate", "1e-3"]
    command += ["--precision", "fp32", "--threads", "1", "--save-every", "0", "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900, check=False)


def test_two_processes_train_the_adapter_one_process_trains(
    training_model_dir: Path, training_tokenizer: Any, tmp_path: Path
) -> None:
    records = [make_record(training_tokenizer, q, a) for q, a in zip(QUESTIONS * 2, ANSWERS * 2, strict=True)]
    data = write_records(tmp_path / "records.jsonl", records)
    # one process, two micro-batches a step; two processes, one micro-batch each a step: the same steps
    alone = trainer(data, tmp_path / "alone", training_model_dir, "--grad-accum", "2")
    assert alone.returncode == 0, alone.stderr[-3000:]
    pair = trainer(data, tmp_path / "pair", training_model_dir, "--grad-accum", "1", "--nproc", "2")
    assert pair.returncode == 0, pair.stderr[-3000:]

    summaries = [json.loads(run.stdout.strip().splitlines()[-1]) for run in (alone, pair)]
    assert [s["step"] for s in summaries] == [STEPS, STEPS]
    assert summaries[1]["losses"] == pytest.approx(summaries[0]["losses"], abs=TOLERANCE)
    assert summaries[1]["tokens"] == summaries[0]["tokens"]  # every process's tokens counted once
    weights = [load_file(str(Path(s["adapter_dir"]) / "adapter_model.safetensors")) for s in summaries]
    assert weights[0].keys() == weights[1].keys()
    worst = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    moved = max(float(w.abs().max()) for k, w in weights[0].items() if "lora_B" in k)
    assert moved > 100 * TOLERANCE  # the adapters did learn something (LoRA B starts at zero)
    assert worst <= TOLERANCE, worst
    # process 0 alone wrote the run: one adapter, one metrics line per step
    assert Path(summaries[1]["adapter_dir"]) == adapter_dir(tmp_path / "pair", STEPS)
    assert len((tmp_path / "pair" / "metrics.jsonl").read_text().splitlines()) == STEPS


def test_two_processes_with_nothing_to_train_on_say_so_as_one_does(
    training_model_dir: Path, training_tokenizer: Any, tmp_path: Path
) -> None:
    records = [make_record(training_tokenizer, q, a, reward=0.0) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    data = write_records(tmp_path / "records.jsonl", records)
    pair = trainer(data, tmp_path / "pair", training_model_dir, "--nproc", "2")
    assert pair.returncode == EXIT_NO_DATA, pair.stderr[-3000:]
    assert not (tmp_path / "pair").exists() or not any((tmp_path / "pair").iterdir())
