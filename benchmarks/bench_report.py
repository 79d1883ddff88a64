"""``pilot report`` on a big checkpoint: wall time and peak RSS of the whole command, and of the
checkpoint reading alone.

    .venv/bin/python benchmarks/bench_report.py                   # 1M tasks (~1-2 min)
    .venv/bin/python benchmarks/bench_report.py --tasks 100000

The checkpoint is written with the checkpoint's own schema writer (snapshot + a journal), as a
live run leaves it: 1M tasks in chains of 10 on 100 nodes x 64 cores, 1% of attempts failing
with OOM and retried, 95% of the attempts in the snapshot's history, the rest in the journal,
the last 6,400 still running. Each measurement runs in a fresh process (its peak RSS is that
process's). The goal: a report in well under a minute and under 2 GB, the same figures at any size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pilot.checkpoint_schema import FINISHED, STARTED, Static, TaskTable, write_snapshot  # noqa: E402
from pilot.events import Failure, State  # noqa: E402
from pilot.graph import graph_hash  # noqa: E402
from pilot.journal import ROW, JournalWriter, Rows, encode_block, journal_path  # noqa: E402

NODES, CORES, NODE_MB = 100, 64, 256 * 1024
T0 = 1_780_000_000.0


def schedule(n: int, rng) -> dict:
    """Attempts packed slot by slot (NODES x CORES slots), lognormal runtimes around 60 s."""
    slots = NODES * CORES
    retry = rng.random(n) < 0.01
    task = np.concatenate([np.flatnonzero(retry), np.arange(n)])      # failed first attempts, then all
    failure = np.concatenate([np.full(retry.sum(), Failure.OOM), np.zeros(n)]).astype(np.int8)
    m = len(task)
    runtime = 60 * rng.lognormal(0, 0.5, m)
    grid = np.zeros(-(-m // slots) * slots)
    grid[:m] = runtime
    start = (np.cumsum(grid.reshape(-1, slots), axis=0) - grid.reshape(-1, slots)).ravel()[:m] + T0
    slot = np.arange(m) % slots
    return {"task": task, "node": slot // CORES, "start": start, "end": start + runtime,
            "failure": failure, "rss": 2048 * rng.uniform(0.3, 1.1, m)}


def rows_of(s: dict, label_mb: np.ndarray, running_from: int) -> np.ndarray:
    """STARTED and FINISHED rows per attempt in time order; attempts from ``running_from`` on
    (in start order) have only their STARTED row."""
    m = len(s["task"])
    order = np.argsort(s["start"], kind="stable")
    started = np.zeros(m, ROW)
    finished = np.zeros(m, ROW)
    for r, kind, when in ((started, STARTED, s["start"]), (finished, FINISHED, s["end"])):
        r["task"], r["kind"], r["node"], r["attempts"] = s["task"], kind, s["node"], 1
        r["memory_request"], r["time"], r["start"] = label_mb[s["task"]], when, s["start"]
        r["exit_code"], r["end"] = -1, np.nan
    started["state"] = State.RUNNING
    finished["state"] = np.where(s["failure"] > 0, State.READY, State.DONE)
    finished["failure"], finished["end"] = s["failure"], s["end"]
    finished["exit_code"] = np.where(s["failure"] > 0, -1, 0)
    finished["peak_rss_mb"], finished["cpu_s"] = s["rss"], s["end"] - s["start"]
    keep = np.ones(m, bool)
    keep[order[running_from:]] = False
    rows = np.concatenate([started, finished[keep]])
    return rows[np.argsort(rows["time"], kind="stable")]


def build(path: str, n: int) -> dict:
    """Write a live checkpoint of ``n`` tasks; return what it holds."""
    from bench_checkpoint import big_graph

    graph = big_graph(n)
    s = schedule(n, np.random.default_rng(0))
    rows = rows_of(s, graph.memory_mb, len(s["task"]) - NODES * CORES)
    cut = int(0.95 * len(rows))
    table = TaskTable.new(graph.memory_mb)
    table.apply(Rows(rows[:cut], np.zeros(cut + 1, np.int64), b""))
    write_snapshot(path, Static.from_graph(graph, graph_hash(graph)), table, 1, None, rows[:cut], T0)
    journal = JournalWriter(journal_path(path, 1))
    journal.write(encode_block(rows[cut:], [""] * (len(rows) - cut)))
    journal.close()
    return {"tasks": n, "attempts": len(s["task"]), "rows": len(rows), "journal_rows": len(rows) - cut,
            "bytes": os.path.getsize(path) + os.path.getsize(journal_path(path, 1))}


def measure(argv: list) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a fresh process running ``argv``."""
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - t0
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "big.h5")
        t0 = time.perf_counter()
        info = build(path, args.tasks)
        print(f"built {json.dumps(info)} in {time.perf_counter() - t0:.1f} s")
        py = sys.executable
        read = [py, "-c", f"from pilot.report_read import read_run; read_run({path!r})"]
        wall, rss = measure(read)
        print(f"read_run (snapshot + journal replay + history): {wall:6.2f} s, peak RSS {rss:7.0f} MB")
        out = os.path.join(folder, "report")
        cli = [py, "-m", "pilot.cli", "report", path, "--out", out, "--node-memory", str(NODE_MB),
               "--node-cores", str(CORES), "--nodes", str(NODES)]
        wall_all, rss_all = measure(cli)   # RUSAGE_CHILDREN's max covers both children
        pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
        sizes = {p: os.path.getsize(os.path.join(out, p)) // 1024 for p in pngs}
        print(f"pilot report (whole command):                    {wall_all:6.2f} s, peak RSS {rss_all:7.0f} MB "
              f"(max of both processes)")
        print(f"figures (KB): {sizes}")
        print(f"per task: {1e6 * wall_all / args.tasks:.1f} us, {rss_all * 2**20 / args.tasks:.0f} bytes of peak RSS; "
              f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
