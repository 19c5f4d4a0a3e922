"""Fixtures for the ``vllm`` tier: the embedded model and one real vLLM-CPU server shared by a test session.

Its fixtures are registered for every test module by ``tests/conftest.py``; mark the tests that use them
``@pytest.mark.asyncio(loop_scope="session")``: the server lives in the session's event loop. Converting the
model takes ~30 s once per cache directory (``LIGHTWIRE_CACHE_DIR``, default ``~/.cache/lightwire``); starting
vLLM takes 40-90 s on two cores.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from optimizers.embedded import DEFAULT_MODEL_NAME, prepare_default_model
from proxy.vllm_server import VllmOptions, VllmServer, free_loopback_port

#: Generous enough for a first run on a busy two-core machine: model conversion plus vLLM start.
VLLM_SETUP_TIMEOUT_S = 600


def cache_dir() -> Path:
    """The directory where the embedded model is converted once and kept."""
    configured = os.environ.get("LIGHTWIRE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "lightwire"


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded model as a Hugging Face folder, converted on first use."""
    return prepare_default_model(cache_dir())


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_server(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmServer]:
    """A supervised vLLM server on the embedded model, served as ``DEFAULT_MODEL_NAME``, ready when yielded.

    Its port is kept across restarts, so that a sidecar attached to it with ``--vllm`` sees the same server come back.
    """
    options = VllmOptions(
        model_dir=embedded_model_dir,
        served_model_name=DEFAULT_MODEL_NAME,
        log_path=tmp_path_factory.mktemp("vllm") / "vllm.log",
        port=free_loopback_port(),
    )
    async with VllmServer(options).running(wait_ready=True) as server:
        yield server


def make_adapter(model_dir: Path, out: Path, *, rank: int = 8, seed: int = 0) -> Path:
    """A real peft LoRA adapter for the model with random, non-zero weights: it changes the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = LoraConfig(
        r=rank, lora_alpha=4 * rank, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


def overflowing_adapter(adapter: Path, out: Path) -> Path:
    """A copy of ``adapter`` whose weights are finite but so large that merged into the base they overflow bf16."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = out / "adapter_model.safetensors"
    save_file({name: tensor.sign() * 1e30 for name, tensor in load_file(weights).items()}, weights)
    return out


@pytest.fixture(scope="session")
def random_adapter(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(embedded_model_dir, tmp_path_factory.mktemp("adapters") / "random")
