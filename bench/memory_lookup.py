"""Memory lookup cost: microseconds for one call's worked examples (BM25 lookup and the messages sent upstream),
alone, at banks of 1,000 and 10,000 trajectories.

    .venv/bin/python -m bench.memory_lookup [--sizes 1000 10000] [--calls 2000] [--out FILE]

The trajectories are text-to-SQL-like conversations (a question over a vocabulary of ~2,000 words, an answer);
the calls are new questions of the same kind, as an agent's first turn (system prompt, two fixed examples, the
question) and as a third turn (with two failed answers and errors). Each is timed with ``perf_counter_ns`` over
``--calls`` lookups after a warm-up; the report gives p50 and p99 per size and shape, and the index's build time.
What the proxy adds on top (copying the body with the new messages and serializing it) is in
``bench/proxy_overhead.py --memory N``. :func:`seed` writes such a bank, active, into a new store for it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import duckdb

from proxy.memory import Bank
from store.memory import Trajectory, new_bank, write_bank
from store.migrations import migrate

MODEL = "bench"
SYSTEM = {"role": "system", "content": "You write SQLite queries. Tables: orders(id, city, total), customers(id, name)"}
FIXED = [
    {"role": "user", "content": "Which products cost less than 20?"},
    {"role": "assistant", "content": "SELECT name FROM products WHERE price < 20;"},
]
TARGET_P50_US = 300.0  # the budget for memory's added p50 (0.3 ms), here for the lookup alone


def vocabulary(rng: random.Random, size: int = 2000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=rng.randint(4, 9))) for _ in range(size)]


def question(rng: random.Random, words: list[str]) -> str:
    return "How many " + " ".join(rng.choices(words, k=rng.randint(6, 14))) + "?"


def trajectories(n: int, *, seed: int = 0, model: str = MODEL, mention: str = "") -> list[Trajectory]:
    """``n`` rewarded conversations; one in ten also has ``mention`` in its question."""
    rng = random.Random(seed)
    words = vocabulary(random.Random(1))
    out = []
    for i in range(n):
        asked = question(rng, words) + (f" {mention}" if mention and i % 10 == 0 else "")
        answer = f"SELECT COUNT(*) FROM orders WHERE city = '{rng.choice(words)}';"
        messages = (*FIXED, {"role": "user", "content": asked}, {"role": "assistant", "content": answer})
        out.append(Trajectory(f"t{i}", model, 1.0, messages))
    return out


def calls(n: int, *, seed: int = 2) -> dict[str, list[list[dict[str, Any]]]]:
    rng = random.Random(seed)
    words = vocabulary(random.Random(1))
    first, third = [], []
    for _ in range(n):
        opening = [SYSTEM, *FIXED, {"role": "user", "content": question(rng, words)}]
        first.append(opening)
        retries = []
        for _ in range(2):
            retries += [
                {"role": "assistant", "content": f"SELECT {rng.choice(words)} FROM {rng.choice(words)};"},
                {"role": "user", "content": f"Error: no such table: {rng.choice(words)}\nWrite a corrected SQL query."},
            ]
        third.append([*opening, *retries])
    return {"first_turn": first, "third_turn": third}


def seed(db: Path, folder: Path, n: int, *, mention: str = "") -> None:
    """A store holding one active bank of ``n`` trajectories for model ``bench`` (for a sidecar to start with)."""
    path = folder / "m1.jsonl"
    write_bank(path, trajectories(n, mention=mention))
    bank = new_bank("m1", str(path), parent=None, data={"trajectories": {MODEL: n}}).with_status("active")
    with duckdb.connect(str(db)) as con:
        migrate(con)
        con.execute("INSERT INTO memory_banks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", list(bank.to_row()))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(size: int, n_calls: int, k: int) -> dict[str, Any]:
    started = time.perf_counter()
    bank = Bank("m1", trajectories(size))
    built = time.perf_counter() - started
    out: dict[str, Any] = {"trajectories": size, "index_build_s": round(built, 3)}
    for shape, messages in calls(n_calls).items():
        for conversation in messages[:100]:  # warm-up
            bank.examples(MODEL, conversation, k)
        times, found = [], 0
        for conversation in messages:
            t0 = time.perf_counter_ns()
            injected = bank.examples(MODEL, conversation, k)
            times.append((time.perf_counter_ns() - t0) / 1000)
            found += len(injected.ids)
        out[shape] = {
            "p50_us": round(percentile(times, 0.5), 1),
            "p99_us": round(percentile(times, 0.99), 1),
            "mean_examples": round(found / len(messages), 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="trajectories per bank")
    parser.add_argument("--calls", type=int, default=2000, help="lookups timed per size and shape")
    parser.add_argument("--examples", type=int, default=2, help="examples per call (memory_examples)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args()
    results = [measure(size, args.calls, args.examples) for size in args.sizes]
    worst = max(r[shape]["p50_us"] for r in results for shape in ("first_turn", "third_turn"))
    met = worst <= TARGET_P50_US
    report = {
        "results": results,
        "goal": {"worst_p50_us": worst, "limit_us": TARGET_P50_US, "met": met},
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    sizes = ", ".join(
        f"{r['trajectories']}: {r['first_turn']['p50_us']:.0f}/{r['third_turn']['p50_us']:.0f} us" for r in results
    )
    print(
        f"memory lookup p50 (first/third turn) at {sizes}; worst {worst:.0f} us "
        f"(<= {TARGET_P50_US:.0f} us: {'met' if met else 'NOT MET'}); "
        f"load average {report['load_average_1m']} on {report['cpus']} CPUs"
    )


if __name__ == "__main__":
    main()
