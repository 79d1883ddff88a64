"""Kill -9 loops: a run is SIGKILLed at random moments and restarted until it is done.

The simulated variant runs a real Engine and the real checkpoint in a child process (this
file run as a script) with a fast simulated clock; the MPI variant runs ``mpiexec -n 3 pilot
run`` on real short tasks. Each task's own record (a line appended when it completes) is the
ground truth: no task done in the checkpoint at a kill may run again afterwards.
"""

from __future__ import annotations

import heapq
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import MPIEXEC, mpi_env, wait_for  # noqa: E402

WINDOW = 0.05
PACE = 0.03   # real seconds per simulated completion, so that kills land mid-run
HOOK_STEPS = ("journal-write", "journal-sync", "torn-write", "rotate", "new-journal",
              "snapshot-written", "snapshot-replaced", "dir-synced", "old-journals-removed")


# ---- the child: a simulated run --------------------------------------------------------


def sim_graph(n: int):
    """The same graph on every restart: chains and fan-ins, a few tasks failing once."""
    from pilot.graph import make_graph

    rng = np.random.default_rng(1234)
    parents = [[] if i < 8 else sorted({int(rng.integers(0, i)) for _ in range(int(rng.integers(1, 3)))})
               for i in range(n)]
    labels = [("isr", "calibrate", "coadd")[i % 3] for i in range(n)]
    return make_graph([f"task{i:04d}" for i in range(n)], labels, parents, memory_mb=500,
                      retries=1, command=[f"run {i}" for i in range(n)])


def _kill_hook(step_spec: str, ckpt_ref: list):
    """hook(step) that SIGKILLs this process at the nth time ``step`` is reached."""
    if not step_spec:
        return None
    step, nth = step_spec.split(":")
    seen = {"n": 0}

    def hook(name: str) -> None:
        wanted = "journal-sync" if step == "torn-write" else step
        if name != wanted:
            return
        seen["n"] += 1
        if seen["n"] < int(nth):
            return
        if step == "torn-write":  # a block only partly on disk, as a kill mid-write leaves it
            journal = ckpt_ref[0]._journal
            os.ftruncate(journal.fd, max(0, os.fstat(journal.fd).st_size - 7))
        os.kill(os.getpid(), signal.SIGKILL)
    return hook


def run_child(ckpt: str, records: str, n: int, kill_step: str, pace: float, compact_bytes: int) -> int:
    from pilot.checkpoint import open_checkpoint
    from pilot.engine import Engine
    from pilot.events import Failure, Node, Schedule, TaskFinished, TaskStarted

    graph = sim_graph(n)
    ref: list = []
    ck = open_checkpoint(ckpt, graph, window=WINDOW, compact_min_bytes=compact_bytes,
                         compact_ratio=0.0, hook=_kill_hook(kill_step, ref))
    ref.append(ck)
    engine = Engine(graph, [Node("n0", 2000, 4), Node("n1", 2000, 4)])
    if ck.restored is not None:
        engine.restore(*ck.restored)
    ck.attach(engine)
    engine.listeners.append(ck)
    out = os.open(records, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    clock, heap = 0.0, []

    def launch(actions):
        for a in actions:
            engine.handle(TaskStarted(a.task, a.attempt, a.node, clock))
            heapq.heappush(heap, (clock + 1.0 + (a.task % 5) * 0.3, a.task, a.attempt, a.node))

    launch(engine.handle(Schedule(clock)))
    while heap:
        clock, t, attempt, node = heapq.heappop(heap)
        failed = t % 29 == 0 and attempt == 1
        if not failed:
            os.write(out, f"{graph.ids[t]} {attempt} {time.time():.6f}\n".encode())
        time.sleep(pace)
        launch(engine.handle(TaskFinished(
            t, attempt, node, Failure.EXIT if failed else Failure.NONE, 1 if failed else 0, None,
            clock - 1.0, clock, log=f"/logs/{graph.ids[t]}.{attempt}.log")))
        ck.tick(clock)
    ck.close()
    return engine.exit_code()


# ---- helpers for the parent -------------------------------------------------------------


def start_child(ckpt, records, n, kill_step="", pace=0.002, compact_bytes=4096):
    args = [sys.executable, __file__, "child", str(ckpt), str(records), str(n), kill_step,
            str(pace), str(compact_bytes)]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_records(path) -> list[tuple[str, float]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(parts[0], float(parts[2])) for parts in (line.split() for line in f) if len(parts) == 3]


def durable_done(ckpt) -> set[str]:
    """Tasks done in the checkpoint as a reader sees it; asserts the status command reads it."""
    from pilot.checkpoint import load_checkpoint
    from pilot.cli import main

    if not os.path.exists(ckpt):
        return set()
    view = load_checkpoint(ckpt)
    assert main(["status", str(ckpt)]) == 0
    ids = view.snapshot.ids()
    return {ids[t] for t in np.flatnonzero(view.table.state == 4)}


def check_records(records, kills) -> dict:
    """Each kill: (records line count at the kill, done set after it, kill time)."""
    lines = read_records(records)
    reruns = 0
    for count, done, when in kills:
        later = [tid for tid, _ in lines[count:]]
        redone = done.intersection(later)
        assert not redone, f"done before a kill, ran again: {sorted(redone)[:5]}"
        before = {tid: t for tid, t in lines[:count]}
        for tid in set(later) & set(before):
            reruns += 1
            # only in flight or inside the durability window (plus scheduling slack) at the kill
            assert when - before[tid] < WINDOW + 1.5, (tid, when - before[tid])
    return {"lines": len(lines), "reruns": reruns}


# ---- the simulated kill loop ------------------------------------------------------------


@pytest.mark.slow
def test_sim_kill_loop_never_redoes_recorded_work(tmp_path):
    n, ckpt, records = 300, tmp_path / "run.h5", tmp_path / "records.txt"
    rng = random.Random(7)
    kills, modes = [], []
    for i in range(34):
        mode = ("startup", "random", "hook")[i % 3]
        step = f"{HOOK_STEPS[i // 3 % len(HOOK_STEPS)]}:{rng.randint(1, 4)}" if mode == "hook" else ""
        child = start_child(ckpt, records, n, step, pace=PACE)
        if mode == "hook":
            child.wait(timeout=60)
        else:
            delay = rng.uniform(0.02, 0.4) if mode == "startup" else rng.uniform(0.4, 1.2)
            try:
                child.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
        when = time.time()
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        code = child.wait(timeout=60)
        if code == 0:
            break
        assert code == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
        modes.append(mode)
        kills.append((len(read_records(records)), durable_done(ckpt), when))
    assert len(kills) >= 30, f"the run finished after only {len(kills)} kills"
    final = start_child(ckpt, records, n)
    assert final.wait(timeout=120) == 0, final.stderr.read().decode()[-2000:]
    figures = check_records(records, kills)
    assert {tid for tid, _ in read_records(records)} == {f"task{i:04d}" for i in range(n)}
    assert len(durable_done(ckpt)) == n
    assert {"startup", "random", "hook"} <= set(modes)
    print(f"{len(kills)} kills, {figures['lines']} task records for {n} tasks, {figures['reruns']} re-runs")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    _, _, ckpt_arg, records_arg, n_arg, step_arg, pace_arg, compact_arg = sys.argv
    sys.exit(run_child(ckpt_arg, records_arg, int(n_arg), step_arg, float(pace_arg), int(compact_arg)))
