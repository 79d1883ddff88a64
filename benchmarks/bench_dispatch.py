"""Dispatch throughput: null tasks (`true`) through `pilot run` under mpiexec with K agents,
against a bare loop that spawns the same tasks with the same concurrency, in the same run.

    .venv/bin/python benchmarks/bench_dispatch.py [--tasks 3000] [--agents 2] [--cores 2]

Concurrency is agents x cores (every agent rank is an emulated node of `cores` cores). The
pilot's rate is taken over its dispatch window (first to last task log created: no start-up)
and end to end (mpiexec start to exit); the goal is a window ratio >= 0.9. CPU per task (all
processes, tasks included) is printed too: on a busy machine it is steadier than rates. A
second bare loop writes each task's output to a new log file, as the pilot does: creating
thousands of files is a large part of the pilot's cost on some file systems (ext4 searching
for a free inode), so the pilot is also compared with that loop.

    .venv/bin/python benchmarks/bench_dispatch.py --slot-gap [--tasks 400] [--agents 2] [--cores 4]

runs ``sleep 0.1`` tasks instead and prints the slot gap: on each node, how long a freed core
waits before the next task starts on it (from the checkpoint's start and end times; the k-th
start after the node fills up takes the slot of the k-th end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update(HYDRA_LAUNCHER="fork", MPIR_CVAR_CH4_PROGRESS_THROTTLE="1",
               MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT="1",
               PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    return env


def cpu_now() -> float:
    """CPU seconds (user + system) of this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bare_loop(tasks: int, concurrency: int, logdir: Path | None = None) -> tuple[float, float]:
    """Spawn `true` `tasks` times keeping `concurrency` in flight; (tasks/s, CPU ms per task).

    With ``logdir`` each task's output goes to a new file laid out as the pilot's task logs.
    """
    cpu0 = cpu_now()
    began = time.perf_counter()
    running, started = {}, 0
    while started < tasks or running:
        while started < tasks and len(running) < concurrency:
            running_one = spawn_true(started, logdir)
            running[running_one.pid] = running_one
            started += 1
        pid, status = os.wait()
        running.pop(pid).returncode = os.waitstatus_to_exitcode(status)
    return tasks / (time.perf_counter() - began), 1e3 * (cpu_now() - cpu0) / tasks


def spawn_true(i: int, logdir: Path | None) -> subprocess.Popen:
    if logdir is None:
        return subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
    folder = logdir / f"{i // 1000:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"t{i}.1.log", "ab") as log:
        return subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def write_workflow(folder: Path, tasks: int) -> Path:
    path = folder / "null.json"   # JSON is a YAML subset the loader reads on a fast path
    body = {"requestMemory": 1, "tasks": [{"id": f"t{i}", "command": ["true"]} for i in range(tasks)]}
    path.write_text(json.dumps(body))
    return path


def pilot_run(folder: Path, wf: Path, tasks: int, agents: int, cores: int) -> tuple[float, float, float]:
    """Run the pilot; (window tasks/s, end-to-end tasks/s, CPU ms per task of everything)."""
    cmd = [str(VENV_BIN / "mpiexec"), "-launcher", "fork", "-n", str(agents + 1), sys.executable, "-m",
           "pilot.cli", "run", str(wf), "--checkpoint", str(folder / "ckpt.h5"), "--node-per-rank",
           "--node-memory", "1000", "--node-cores", str(cores)]
    cpu0 = cpu_now()
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True)
    total = time.perf_counter() - began
    cpu = 1e3 * (cpu_now() - cpu0) / tasks
    if proc.returncode != 0:
        sys.exit(f"pilot run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    times = sorted(p.stat().st_mtime for p in (folder / "ckpt.h5.logs").rglob("*.log"))
    assert len(times) == tasks, f"{len(times)} task logs for {tasks} tasks"
    window = times[-1] - times[0]
    return (tasks - 1) / window, tasks / total, cpu


def slot_gaps(table, cores: int) -> list[float]:
    """Seconds between a task's end and the start that took its slot, over every node."""
    import numpy as np

    gaps: list[float] = []
    for node in np.unique(table.node):
        mine = table.node == node
        starts, ends = np.sort(table.start[mine]), np.sort(table.end[mine])
        gaps.extend((starts[cores:] - ends[:len(ends) - cores]).tolist())
    return gaps


def slot_gap_run(tasks: int, agents: int, cores: int) -> None:
    """``sleep 0.1`` tasks through the pilot; prints the slot gap's median and 90th percentile."""
    sys.path.insert(0, str(ROOT))
    from pilot.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_gap_") as tmp:
        folder = Path(tmp)
        wf = folder / "sleep.json"
        wf.write_text(json.dumps({"requestMemory": 1, "tasks": [
            {"id": f"t{i}", "command": ["sleep", "0.1"]} for i in range(tasks)]}))
        window, _, cpu = pilot_run(folder, wf, tasks, agents, cores)
        gaps = sorted(slot_gaps(load_checkpoint(folder / "ckpt.h5").table, cores))
    ms = [1e3 * g for g in gaps]
    print(f"sleep 0.1 x {tasks}, agents {agents}, cores {cores}: slot gap median {statistics.median(ms):.1f} ms, "
          f"p90 {ms[int(0.9 * len(ms))]:.1f} ms; {window:.0f} tasks/s (ideal {agents * cores / 0.1:.0f}); "
          f"load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/pilot rounds (median)")
    parser.add_argument("--slot-gap", action="store_true", help="sleep 0.1 tasks: time a freed slot waits")
    args = parser.parse_args()
    if args.slot_gap:
        return slot_gap_run(args.tasks, args.agents, args.cores)
    concurrency = args.agents * args.cores
    bares, logged, windows, ends, bare_cpu, pilot_cpu = [], [], [], [], [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench_dispatch_") as tmp:
            folder = Path(tmp)
            wf = write_workflow(folder, args.tasks)
            rate, cpu = bare_loop(args.tasks, concurrency)
            bares.append(rate)
            bare_cpu.append(cpu)
            logged.append(bare_loop(args.tasks, concurrency, folder / "bare.logs")[0])
            window, end_to_end, cpu = pilot_run(folder, wf, args.tasks, args.agents, args.cores)
            windows.append(window)
            ends.append(end_to_end)
            pilot_cpu.append(cpu)
    bare, bare_logs, window, end_to_end = (statistics.median(v) for v in (bares, logged, windows, ends))
    print(f"tasks {args.tasks}, agents {args.agents}, concurrency {concurrency}, cpus {os.cpu_count()}, "
          f"median of {args.rounds} alternating rounds")
    print(f"bare loop          {bare:8.0f} tasks/s   (rounds: {', '.join(f'{b:.0f}' for b in bares)})")
    print(f"bare loop + logs   {bare_logs:8.0f} tasks/s   (rounds: {', '.join(f'{b:.0f}' for b in logged)}; "
          f"a new log file per task, as the pilot writes)")
    print(f"pilot (window)     {window:8.0f} tasks/s   ratio {window / bare:.2f}  (goal >= 0.9); "
          f"{window / bare_logs:.2f} of the bare loop with logs  (rounds: {', '.join(f'{w:.0f}' for w in windows)})")
    print(f"pilot (end to end) {end_to_end:8.0f} tasks/s   ratio {end_to_end / bare:.2f}  (includes start-up)")
    print(f"CPU per task: bare {statistics.median(bare_cpu):.2f} ms, pilot {statistics.median(pilot_cpu):.2f} ms "
          f"(all ranks + tasks + start-up); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
