"""``pilot report`` on a big checkpoint: wall time and peak RSS of the whole command, and of the
checkpoint reading alone.

    .venv/bin/python benchmarks/bench_report.py                   # 1M tasks (~1-2 min)
    .venv/bin/python benchmarks/bench_report.py --tasks 100000
    .venv/bin/python benchmarks/bench_report.py --keep /tmp/big.h5    # keep (and then reuse) the checkpoint

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

import h5py
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


def measure(code: str) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MB) of a fresh Python process running ``code``."""
    probe = code + "\nimport resource, sys; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, int(done.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--keep", metavar="CKPT", help="build the checkpoint here and keep it; reuse it if it exists")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = args.keep or os.path.join(folder, "big.h5")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            info = build(path, args.tasks)
            print(f"built {json.dumps(info)} in {time.perf_counter() - t0:.1f} s")
        with h5py.File(path, "r") as f:
            tasks = int(f.attrs["n_tasks"])
        wall, cpu, rss = measure(f"from pilot.report_read import read_run; read_run({path!r})")
        print(f"read_run (snapshot + journal replay + history): {wall:6.2f} s wall, {cpu:6.2f} s CPU, "
              f"peak RSS {rss:6.0f} MB")
        out = os.path.join(folder, "report")
        argv = ["report", path, "--out", out, "--node-memory", str(NODE_MB), "--node-cores", str(CORES),
                "--nodes", str(NODES)]
        wall, cpu, rss = measure(f"from pilot.cli import main; main({argv!r})")
        pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
        sizes = {p: os.path.getsize(os.path.join(out, p)) // 1024 for p in pngs}
        print(f"pilot report (whole command):                   {wall:6.2f} s wall, {cpu:6.2f} s CPU, "
              f"peak RSS {rss:6.0f} MB")
        print(f"{tasks} tasks: {1e6 * cpu / tasks:.1f} us CPU and {rss * 2**20 / tasks:.0f} bytes of peak RSS "
              f"per task; figures (KB): {sizes}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
