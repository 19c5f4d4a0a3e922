"""Merging an adapter into its base weights: the tensor-by-tensor merge gives what peft's ``merge_and_unload``
gives, and an adapter it cannot merge exactly still goes through peft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm_fixtures import make_adapter, overflowing_adapter

pytestmark = pytest.mark.training


def weights(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def run_merge(base: Path, adapter: Path, out: Path, *, ok: bool = True) -> str:
    command = [sys.executable, "-m", "optimizers.merge", "--base", str(base), "--adapter", str(adapter)]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stderr
    return done.stderr


@pytest.mark.parametrize("rslora", [False, True])
def test_the_tensor_merge_matches_peft(embedded_model_dir: Path, tmp_path: Path, rslora: bool) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(embedded_model_dir, tmp_path / "adapter", rank=16, seed=3)
    if rslora:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    assert "tensor by tensor" in run_merge(embedded_model_dir, adapter, tmp_path / "merged")

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    merged, base = weights(tmp_path / "merged"), weights(embedded_model_dir)
    assert merged.keys() == base.keys()
    changed = [name for name in base if not torch.equal(merged[name], base[name])]
    assert len(changed) == 30 * 3  # q, v and o of every layer; nothing else moved
    for name, tensor in merged.items():
        assert tensor.dtype == base[name].dtype
        # peft merged in fp32 here; the file holds that rounded once to bf16 (at most one bf16 step apart)
        torch.testing.assert_close(tensor.float(), reference[name].to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "merged" / name).read_bytes() == (embedded_model_dir / name).read_bytes()


def test_an_adapter_with_a_rank_pattern_goes_through_peft(embedded_model_dir: Path, tmp_path: Path) -> None:
    import torch

    adapter = make_adapter(embedded_model_dir, tmp_path / "adapter", rank=8, seed=4)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"q_proj": 8}}))
    assert "with peft" in run_merge(embedded_model_dir, adapter, tmp_path / "merged")
    merged, base = weights(tmp_path / "merged"), weights(embedded_model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], base[name])


@pytest.mark.parametrize("path", ["tensors", "peft"])
def test_a_merge_that_overflows_bf16_fails_and_leaves_no_model_folder(
    embedded_model_dir: Path, random_adapter: Path, tmp_path: Path, path: str
) -> None:
    adapter = overflowing_adapter(random_adapter, tmp_path / "huge")  # its own weights are finite
    if path == "peft":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"q_proj": 8}}))
    error = run_merge(embedded_model_dir, adapter, tmp_path / "merged", ok=False)
    assert "is not finite in torch.bfloat16" in error
    assert not (tmp_path / "merged").exists()
