"""DuckDB's row group size against the store's checkpoints: what the slowest insert takes, and RSS's jumps.

    .venv/bin/python -m bench.row_groups [--spans 600000] [--size 122880 --size 2048 ...] [--out FILE]

For each size a fresh process opens a new store with ``store.database.connect`` at that size, creates the real
schema (``store.migrations``), and inserts ``--spans`` spans of ~1.2 KB (a 120-word request, a 40-word answer)
``BATCH`` at a time through ``store.rows.write``, as the sidecar's writer does, DuckDB checkpointing on its own
every 16 MiB of log. A thread samples RSS every 5 ms. Per size: all the inserts' time, the slowest and how many
took over 200 ms (a checkpoint), the largest RSS rise during one insert, the file's size, and three scans
(a count of the whole table, the newest rows, the calls per session).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import report as report_cli
from bench.machine import rss_mb
from store import database
from store import rows as store_rows
from store.migrations import migrate
from store.spans import Span
from store.writer import columns_of

SIZES = (122_880, 16_384, 4_096, 2_048)  # DuckDB's default, then smaller
BATCH = 3_000
SLOW_S = 0.2
SCANS = {
    "count_all": "SELECT count(*), sum(length(request)) FROM spans",
    "newest_5000": "SELECT * FROM spans ORDER BY start_time DESC LIMIT 5000",
    "sessions": "SELECT session_id, count(*) FROM spans GROUP BY ALL",
}


def grow(db: Path, spans: int, size: int) -> dict[str, Any]:
    """One size's figures (run in a process of its own, so that RSS is its alone)."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(2_000)]

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    requests = [json.dumps({"model": "m", "messages": [{"role": "user", "content": text(120)}]}) for _ in range(200)]
    answers = [json.dumps({"choices": [{"message": {"content": text(40)}}]}) for _ in range(200)]
    con = database.connect(db, {"memory_limit": "2048MiB", "threads": 1}, row_group_size=size)
    migrate(con)
    table = store_rows.Table.read(con, "spans", columns_of(Span), replace=False)
    store_rows.write(con, {"spans": table}, {"spans": []})  # DuckDB's first Arrow scan, as the writer pays it
    peak, sampling = [0.0], [True]

    def sample() -> None:
        while sampling[0]:
            peak[0] = max(peak[0], rss_mb(os.getpid()))
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    epoch = datetime.now(UTC)
    inserts: list[float] = []
    rises: list[float] = []
    for first in range(0, spans, BATCH):
        batch = [
            Span(
                f"{rng.getrandbits(64):016x}", f"{rng.getrandbits(128):032x}", None, f"s{i // 4}", "chat", "openai",
                "m", "m", None, False, 64, None, None, ["stop"], 20, 10, rng.choice(requests), rng.choice(answers),
                None, None, None, epoch + timedelta(milliseconds=i), 1.0, None, 200, None, None, i % 4, "header",
            ).to_row()
            for i in range(first, min(first + BATCH, spans))
        ]  # fmt: skip
        peak[0] = before = rss_mb(os.getpid())
        started = time.perf_counter()
        assert not store_rows.write(con, {"spans": table}, {"spans": batch})
        inserts.append(time.perf_counter() - started)
        rises.append(peak[0] - before)
    sampling[0] = False
    con.execute("CHECKPOINT")
    scans = {}
    for name, query in SCANS.items():
        started = time.perf_counter()
        con.execute(query).fetchall()
        scans[name] = round((time.perf_counter() - started) * 1000, 1)
    groups = con.execute("SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('spans')").fetchone()
    con.close()
    return {
        "row_group_size": size,
        "inserts_s": round(sum(inserts), 2),
        "slowest_insert_ms": round(max(inserts) * 1000, 1),
        "inserts_over_200ms": sum(t > SLOW_S for t in inserts),
        "largest_rss_rise_mb": round(max(rises), 1),
        "file_mb": round(db.stat().st_size / 2**20, 1),
        "row_groups": groups[0] if groups else 0,
        "scan_ms": scans,
    }


def main() -> None:
    parser = report_cli.parser(__doc__ or "")
    parser.add_argument("--spans", type=int, default=600_000, help="spans to insert per size (default 600k)")
    parser.add_argument("--size", type=int, action="append", help="a row group size (repeatable; default: SIZES)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # the DuckDB file of one size's run
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(grow(args.worker, args.spans, args.size[0])))
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="lightwire-row-groups-") as tmp:
        for size in args.size or SIZES:
            command = [sys.executable, "-m", "bench.row_groups", "--worker", f"{tmp}/{size}.duckdb"]
            command += ["--spans", str(args.spans), "--size", str(size)]
            out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            runs.append(json.loads(out))
    line = "; ".join(
        f"{r['row_group_size']} rows: inserts {r['inserts_s']} s, slowest {r['slowest_insert_ms']} ms, "
        f"RSS +{r['largest_rss_rise_mb']} MB at most"
        for r in runs
    )
    report_cli.emit({"settings": {"spans": args.spans, "batch": BATCH}, "runs": runs}, args.out, line)


if __name__ == "__main__":
    main()
