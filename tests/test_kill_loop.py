"""Kill -9 loops: a run is SIGKILLed at random moments and restarted until it is done.

The simulated variant runs a real Engine and the real checkpoint in a child process (this
file run as a script) with a fast simulated clock; the MPI variant runs ``mpiexec -n 3 pilot
run`` on real short tasks. Each task's own record (a line appended when it completes) is the
ground truth: no task done in the checkpoint at a kill may run again afterwards.
"""

from __future__ import annotations

import bisect
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


class ChildHook:
    """The checkpoint hook in the child: marks what is durable, and may SIGKILL the child.

    At ``journal-swap`` (queued rows taken for a block) it notes how many task records have
    their completion queued; at ``journal-synced`` it appends ``first last`` to
    ``records.synced``: this child's records first..last-1 are durable. ``kill_step``
    ("step:n") kills at the nth ``step``.
    """

    def __init__(self, records: str, kill_step: str):
        self.marks = os.open(records + ".synced", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.first = self.queued = self.swapped = len(read_records(records))  # numbered across runs
        self.step, _, nth = kill_step.partition(":")
        self.nth, self.seen, self.ckpt = int(nth or 0), 0, None

    def __call__(self, name: str) -> None:
        if name == "journal-swap":
            self.swapped = self.queued
        elif name == "journal-synced":
            os.write(self.marks, f"{self.first} {self.swapped}\n".encode())
        wanted = "journal-sync" if self.step == "torn-write" else self.step
        if name != wanted:
            return
        self.seen += 1
        if self.seen < self.nth:
            return
        if self.step == "torn-write":  # a block only partly on disk, as a kill mid-write leaves it
            journal = self.ckpt._journal
            os.ftruncate(journal.fd, max(0, os.fstat(journal.fd).st_size - 7))
        os.kill(os.getpid(), signal.SIGKILL)


def run_child(ckpt: str, records: str, n: int, kill_step: str, pace: float, compact_bytes: int) -> int:
    from pilot.checkpoint import open_checkpoint
    from pilot.engine import Engine
    from pilot.events import Failure, Node, Schedule, TaskFinished, TaskStarted

    graph = sim_graph(n)
    hook = ChildHook(records, kill_step)
    ck = hook.ckpt = open_checkpoint(ckpt, graph, window=WINDOW, compact_min_bytes=compact_bytes,
                                     compact_ratio=0.0, hook=hook)
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
        hook.queued += not failed    # this record's completion is now queued in the checkpoint
        ck.tick(clock)
    ck.close()
    return engine.exit_code()


# ---- helpers for the parent -------------------------------------------------------------


def start_child(ckpt, records, n, kill_step="", pace=0.002, compact_bytes=4096):
    args = [sys.executable, __file__, "child", str(ckpt), str(records), str(n), kill_step,
            str(pace), str(compact_bytes)]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_records(path) -> list[tuple[str, float]]:
    """(task id, time) per record line: ``id [attempt] time``."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(parts[0], float(parts[-1])) for parts in (line.split() for line in f) if len(parts) >= 2]


def synced_records(records) -> set[int]:
    """Numbers of the records that the children knew durable."""
    path, durable = f"{records}.synced", set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                first, last = map(int, line.split())
                durable.update(range(first, last))
    return durable


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
    """Each kill: (records at the kill, records durable at the kill, done set after it).

    Every record the child knew durable is done in the checkpoint; nothing done then ran
    again; so re-runs are only of records after the last durable flush (the window)."""
    lines = [tid for tid, _ in read_records(records)]
    reruns = 0
    for count, synced, done in kills:
        lost = {lines[i] for i in synced} - done
        assert not lost, f"durable before a kill, missing after it: {sorted(lost)[:5]}"
        redone = done.intersection(lines[count:])
        assert not redone, f"done before a kill, ran again: {sorted(redone)[:5]}"
        reruns += len(set(lines[count:]).intersection(lines[:count]))
    return {"lines": len(lines), "reruns": reruns}


def note_kill(ckpt, records) -> tuple[int, set, set]:
    """After a kill, before the restart: what the records and the checkpoint say."""
    return len(read_records(records)), synced_records(records), durable_done(ckpt)


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
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        code = child.wait(timeout=60)
        if code == 0:
            break
        assert code == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
        modes.append(mode)
        kills.append(note_kill(ckpt, records))
    assert len(kills) >= 30, f"the run finished after only {len(kills)} kills"
    final = start_child(ckpt, records, n)
    assert final.wait(timeout=120) == 0, final.stderr.read().decode()[-2000:]
    figures = check_records(records, kills)
    assert {tid for tid, _ in read_records(records)} == {f"task{i:04d}" for i in range(n)}
    assert len(durable_done(ckpt)) == n
    assert {"startup", "random", "hook"} <= set(modes)
    print(f"{len(kills)} kills, {figures['lines']} task records for {n} tasks, {figures['reruns']} re-runs")


# ---- the real variant: mpiexec -n 3 pilot run ------------------------------------------


def mpi_workflow(folder: Path, n: int) -> Path:
    """``n`` short shell tasks in chains of 8; each appends ``id time`` to records.txt."""
    records = folder / "records.txt"
    lines = ["requestMemory: 100", "numberOfRetries: 2", "tasks:"]
    for i in range(n):
        after = f", after: [m{i - 1:04d}]" if i % 8 else ""
        command = f"sleep 0.1; echo m{i:04d} $(date +%s.%N) >> {records}"
        lines.append(f'  - {{id: m{i:04d}, label: {("isr", "calibrate")[i % 2]}{after}, command: "{command}"}}')
    path = folder / "wf.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_mpi(workflow: Path, ckpt: Path) -> subprocess.Popen:
    args = [str(MPIEXEC), "-launcher", "fork", "-n", "3", str(MPIEXEC.parent / "pilot"), "run",
            str(workflow), "--checkpoint", str(ckpt), "--node-per-rank", "--node-memory", "1000",
            "--node-cores", "2", "--progress-interval", "600"]
    return subprocess.Popen(args, cwd=ROOT, env=mpi_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def freeze_tree(root_pid: int) -> list:
    """SIGSTOP the process ``root_pid`` and every descendant until no new one appears: a stopped
    process cannot start another, and MPI ranks and tasks live in process groups of their own,
    so freezing the job's group alone would let a rank launch a task that escapes the kill."""
    import psutil

    frozen: dict = {}
    while True:
        try:
            root = psutil.Process(root_pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        new = [p for p in procs if p.pid not in frozen]
        if not new:
            return list(frozen.values())
        for proc in new:
            try:
                os.kill(proc.pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            frozen[proc.pid] = proc


def kill_everything(job: subprocess.Popen) -> set[str]:
    """Freeze the job and every descendant (tasks run in their own sessions), then SIGKILL them
    all by pid; returns the /dev/shm files its ranks had mapped."""
    import psutil

    if job.poll() is not None:
        return set()
    procs = freeze_tree(job.pid)
    shm = set()
    for proc in procs:
        try:
            shm.update(m.path for m in proc.memory_maps() if m.path.startswith("/dev/shm/"))
        except psutil.Error:
            pass
    for proc in procs:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait(timeout=60)
    for proc in procs:
        if proc.pid != job.pid:
            wait_for(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, 30,
                     what="killed task")
    return shm


def _holder_since(lock: Path) -> float:
    from pilot.lock import read_holder

    return float(read_holder(str(lock)).get("since", 0.0))


@pytest.mark.mpi
@pytest.mark.slow
def test_mpi_kill_loop_never_redoes_recorded_work(tmp_path):
    n, ckpt = 240, tmp_path / "run.h5"
    workflow, records = mpi_workflow(tmp_path, n), tmp_path / "records.txt"
    rng = random.Random(11)
    kills, shm = [], set()
    try:
        for i in range(32):
            spawned = time.time()
            job = start_mpi(workflow, ckpt)
            if i % 2 == 0:   # start-up: before or while the checkpoint is opened
                delay = rng.uniform(0.05, 1.0)
            else:            # mid-run: a moment after this run took the lock
                wait_for(lambda: job.poll() is not None or _holder_since(Path(f"{ckpt}.lock")) > spawned,
                         60, what="the run to take the lock")
                delay = rng.uniform(0.05, 0.5)
            try:
                job.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
            if job.poll() == 0:
                break
            when = time.time()
            shm |= kill_everything(job)
            kills.append((len(read_records(records)), when, durable_done(ckpt)))
        final = start_mpi(workflow, ckpt)
        assert final.wait(timeout=120) == 0, final.stderr.read().decode()[-2000:]
    finally:
        for path in shm:
            if os.path.exists(path):
                os.unlink(path)
    _check_mpi_records(records, kills, n)
    assert len(kills) >= 30, f"the run finished after only {len(kills)} kills"
    print(f"{len(kills)} kills; {len(read_records(records))} records for {n} tasks; {len(shm)} shm files removed")


def _check_mpi_records(records, kills, n) -> None:
    lines = read_records(records)
    assert {tid for tid, _ in lines} == {f"m{i:04d}" for i in range(n)}
    for count, _when, done in kills:
        later = {tid for tid, _ in lines[count:]}
        assert not done & later, f"done before a kill, ran again: {sorted(done & later)[:5]}"
    # A task runs again only across a kill (its completion had not reached the checkpoint):
    # between two records of one task there is always a kill, never two runs within one job.
    counts = sorted(count for count, *_ in kills)
    seen: dict[str, int] = {}
    for index, (tid, _) in enumerate(lines):
        if tid in seen:
            kill = bisect.bisect_right(counts, seen[tid])
            assert kill < len(counts) and counts[kill] <= index, f"{tid} ran twice within one run"
        seen[tid] = index


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    _, _, ckpt_arg, records_arg, n_arg, step_arg, pace_arg, compact_arg = sys.argv
    sys.exit(run_child(ckpt_arg, records_arg, int(n_arg), step_arg, float(pace_arg), int(compact_arg)))
