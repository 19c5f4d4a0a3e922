"""How Lightwire starts vLLM-CPU, decided before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.vllm_server import serving_dtype


@pytest.mark.parametrize(
    ("cpuinfo", "dtype"),
    [
        ("flags\t\t: fpu sse avx avx2 fma\n", "float32"),  # AVX2 only: bf16 would be emulated
        ("flags\t\t: fpu avx2 avx512f avx512_bf16\n", "bfloat16"),
        ("flags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n", "bfloat16"),
        ("Features\t: fp asimd sve bf16 i8mm\n", "bfloat16"),  # Arm
        ("Features\t: fp asimd\n", "float32"),
    ],
)
def test_the_dtype_follows_the_cpus_bf16_instructions(tmp_path: Path, cpuinfo: str, dtype: str) -> None:
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n" + cpuinfo)
    assert serving_dtype(tmp_path / "cpuinfo") == dtype
    assert serving_dtype(tmp_path / "absent") == "bfloat16"  # not Linux: vLLM's own choice
