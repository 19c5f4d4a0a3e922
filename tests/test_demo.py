"""The README's first command, as a newcomer runs it: ``lightwire demo`` starts the sidecar on the embedded model,
measures, lets the agent work and the optimizer learn, and leaves a consistent record behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_rows
from tests.vllm_fixtures import VLLM_SETUP_TIMEOUT_S, cache_dir

pytestmark = [pytest.mark.vllm, pytest.mark.training, pytest.mark.timeout(VLLM_SETUP_TIMEOUT_S + 600)]


def test_one_round_of_the_demo_measures_learns_and_records_everything(embedded_model_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    env = {**os.environ, "LIGHTWIRE_CACHE_DIR": str(cache_dir())}
    command = [sys.executable, "-m", "proxy", "demo", "--dir", str(work), "--rounds", "1"]
    command += ["--heldout", "7", "--questions", "7", "--samples", "3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=VLLM_SETUP_TIMEOUT_S + 540)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["round", "version", "held-out"])
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == ["0", "1"]

    report = json.loads((work / "rounds.json").read_text())
    base, first = report["rounds"]
    assert base["version"] == "base" and base["heldout_solved"]["all"][1] == 7
    assert first["heldout_solved"]["all"][1] == 7 and first["train_attempts"] == 21
    run = first["run"]
    assert run["status"] in {"published", "rejected", "no_data"}, run
    assert first["version"] == (run["candidate"] if run["status"] == "published" else "base")
    assert (work / "learning_curve.png").read_bytes().startswith(b"\x89PNG")

    # The sidecar is gone (the store is free to open) and holds what the rounds reported.
    store = work / "lightwire.duckdb"
    [recorded] = read_rows(store, "SELECT run_id, status FROM runs")
    assert (recorded["run_id"], recorded["status"]) == (run["run_id"], run["status"])
    rewards = read_rows(store, "SELECT value FROM feedback WHERE name = 'reward'")
    assert len(rewards) == 21  # one per training attempt; held-out measurements post none
    assert sum(r["value"] for r in rewards) / 21 == pytest.approx(first["train_reward"])
    served = read_rows(store, "SELECT DISTINCT coalesce(adapter_version, 'base') AS v FROM spans")
    assert {r["v"] for r in served} == {"base", first["version"]}
    with socket.socket() as probe:  # and nothing listens on its port any more
        port = int(next(line for line in lines if "starting the sidecar" in line).split(":")[2].split()[0])
        assert probe.connect_ex(("127.0.0.1", port)) != 0
