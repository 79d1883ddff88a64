"""Dispatch throughput: null tasks (`true`) through `pilot run` under mpiexec with K agents,
against a bare loop that spawns the same tasks with the same concurrency, in the same run.

    .venv/bin/python benchmarks/bench_dispatch.py [--tasks 3000] [--agents 2] [--cores 2]

Concurrency is agents x cores (every agent rank is an emulated node of `cores` cores). The
pilot's rate is taken over its dispatch window (first to last task log created: no start-up)
and end to end (mpiexec start to exit); the goal is a window ratio >= 0.9. CPU per task (all
processes, tasks included) is printed too: on a busy machine it is steadier than rates.
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


def bare_loop(tasks: int, concurrency: int) -> tuple[float, float]:
    """Spawn `true` `tasks` times keeping `concurrency` in flight; (tasks/s, CPU ms per task)."""
    cpu0 = cpu_now()
    began = time.perf_counter()
    running, started = {}, 0
    while started < tasks or running:
        while started < tasks and len(running) < concurrency:
            proc = subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            running[proc.pid] = proc
            started += 1
        pid, status = os.wait()
        running.pop(pid).returncode = os.waitstatus_to_exitcode(status)
    return tasks / (time.perf_counter() - began), 1e3 * (cpu_now() - cpu0) / tasks


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/pilot rounds (median)")
    args = parser.parse_args()
    concurrency = args.agents * args.cores
    bares, windows, ends, bare_cpu, pilot_cpu = [], [], [], [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench_dispatch_") as tmp:
            folder = Path(tmp)
            wf = write_workflow(folder, args.tasks)
            rate, cpu = bare_loop(args.tasks, concurrency)
            bares.append(rate)
            bare_cpu.append(cpu)
            window, end_to_end, cpu = pilot_run(folder, wf, args.tasks, args.agents, args.cores)
            windows.append(window)
            ends.append(end_to_end)
            pilot_cpu.append(cpu)
    bare, window, end_to_end = (statistics.median(v) for v in (bares, windows, ends))
    print(f"tasks {args.tasks}, agents {args.agents}, concurrency {concurrency}, cpus {os.cpu_count()}, "
          f"median of {args.rounds} alternating rounds")
    print(f"bare loop          {bare:8.0f} tasks/s   (rounds: {', '.join(f'{b:.0f}' for b in bares)})")
    print(f"pilot (window)     {window:8.0f} tasks/s   ratio {window / bare:.2f}  (goal >= 0.9)")
    print(f"pilot (end to end) {end_to_end:8.0f} tasks/s   ratio {end_to_end / bare:.2f}  (includes start-up)")
    print(f"CPU per task: bare {statistics.median(bare_cpu):.2f} ms, pilot {statistics.median(pilot_cpu):.2f} ms "
          f"(all ranks + tasks + start-up); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
