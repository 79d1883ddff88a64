"""Null and short tasks through pilot, Parsl and a bare spawn loop, in the same run.

    scripts/setup-bench.sh                      # once: installs Parsl into .venv
    .venv/bin/python benchmarks/bench_peers.py [--tasks 1000] [--agents 2] [--cores 4] [--rounds 3]

Each round runs ``true`` and then ``sleep 0.1`` tasks, the same count and the same
concurrency (agents x cores) through:

- pilot: ``mpiexec -n agents+1 pilot run`` with one emulated node of ``cores`` cores per agent
  rank (every task's output goes to its own log file);
- Parsl: a ``HighThroughputExecutor`` on a ``LocalProvider`` (one block, agents x cores
  workers), one ``bash_app`` per task with its output to its own file, in a fresh Python;
- a bare loop: ``subprocess.Popen`` keeping the same number in flight (output discarded).

Two rates per executor: end to end (interpreter and runtime start-up and shutdown included)
and in-run (pilot: first task start to last task end, from its checkpoint; Parsl: first
submit to last result after a warm-up task per worker; the bare loop has no start-up). The
executors take turns in a rotating order; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_dispatch import mpi_env  # noqa: E402

KINDS = {"true": ["true"], "sleep 0.1": ["sleep", "0.1"]}
EXECUTORS = ("bare", "pilot", "parsl")


# ---- the three executors --------------------------------------------------------------


def bare_loop(argv: list[str], tasks: int, concurrency: int) -> dict:
    """Spawn ``argv`` ``tasks`` times keeping ``concurrency`` in flight."""
    began = time.perf_counter()
    running, started = {}, 0
    while started < tasks or running:
        while started < tasks and len(running) < concurrency:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            running[proc.pid] = proc
            started += 1
        pid, status = os.wait()
        running.pop(pid).returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    return {"end_to_end_s": wall, "in_run_s": wall}


def pilot_run(folder: Path, argv: list[str], tasks: int, agents: int, cores: int) -> dict:
    """``pilot run`` under mpiexec; the in-run window comes from the checkpoint's times."""
    from pilot.checkpoint import load_checkpoint
    from pilot.events import State

    wf = folder / "tasks.json"
    wf.write_text(json.dumps({"requestMemory": 1,
                              "tasks": [{"id": f"t{i}", "command": argv} for i in range(tasks)]}))
    ckpt = folder / "ckpt.h5"
    cmd = [str(VENV_BIN / "mpiexec"), "-launcher", "fork", "-n", str(agents + 1), sys.executable,
           "-m", "pilot.cli", "run", str(wf), "--checkpoint", str(ckpt), "--node-per-rank",
           "--node-memory", "1000", "--node-cores", str(cores)]
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"pilot run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    table = load_checkpoint(ckpt).table
    done = int((table.state == int(State.DONE)).sum())
    if done != tasks:
        sys.exit(f"pilot finished {done} of {tasks} tasks")
    return {"end_to_end_s": wall, "in_run_s": float(table.end.max() - table.start.min())}


def parsl_run(folder: Path, argv: list[str], tasks: int, workers: int) -> dict:
    """Parsl in a fresh interpreter (this script with --parsl-child)."""
    cmd = [sys.executable, __file__, "--parsl-child", json.dumps(argv), "--tasks", str(tasks),
           "--workers", str(workers), "--folder", str(folder)]
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")  # Parsl's own scripts
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"parsl run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"end_to_end_s": wall, "in_run_s": child["in_run_s"]}


def parsl_child(argv: list[str], tasks: int, workers: int, folder: Path) -> None:
    """Run the tasks as Parsl bash_apps on a local HighThroughputExecutor; print JSON."""
    import parsl
    from parsl.app.app import bash_app
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    # cores_per_worker below 1 so that max_workers_per_node alone sets the worker count
    # (the pilot's emulated nodes also declare more cores than the machine has)
    htex = HighThroughputExecutor(label="htex", address="127.0.0.1", max_workers_per_node=workers,
                                  cores_per_worker=0.001,
                                  provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))
    parsl.load(Config(executors=[htex], run_dir=str(folder / "runinfo"), strategy="none"))
    command = " ".join(argv)

    @bash_app
    def task(stdout=None, stderr=None):
        return command

    logs = folder / "logs"
    logs.mkdir()
    for future in [task() for _ in range(workers)]:   # warm-up: every worker connected
        future.result()
    began = time.perf_counter()
    futures = [task(stdout=str(logs / f"t{i}.log"), stderr=str(logs / f"t{i}.log"))
               for i in range(tasks)]
    failed = sum(f.exception() is not None for f in futures)
    in_run = time.perf_counter() - began
    parsl.dfk().cleanup()
    if failed:
        sys.exit(f"{failed} Parsl tasks failed")
    print(json.dumps({"in_run_s": in_run}))


# ---- rounds and figures ---------------------------------------------------------------


def one_round(kind: str, args, order: list[str]) -> dict:
    """Every executor once on the same tasks; {executor: figures}."""
    argv, concurrency = KINDS[kind], args.agents * args.cores
    out = {}
    for name in order:
        with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
            if name == "bare":
                out[name] = bare_loop(argv, args.tasks, concurrency)
            elif name == "pilot":
                out[name] = pilot_run(Path(tmp), argv, args.tasks, args.agents, args.cores)
            else:
                out[name] = parsl_run(Path(tmp), argv, args.tasks, concurrency)
    return out


def medians(rounds: list[dict], tasks: int) -> dict:
    """{executor: (end-to-end tasks/s, in-run tasks/s)} as medians over rounds."""
    return {name: (statistics.median(tasks / r[name]["end_to_end_s"] for r in rounds),
                   statistics.median(tasks / r[name]["in_run_s"] for r in rounds))
            for name in EXECUTORS}


def show(kind: str, rounds: list[dict], args, loads: list[float]) -> None:
    """Print one kind's rates and ratios."""
    concurrency = args.agents * args.cores
    rate = medians(rounds, args.tasks)
    ideal = concurrency / 0.1 if kind.startswith("sleep") else None
    print(f"\n`{kind}`: {args.tasks} tasks, concurrency {concurrency} ({args.agents} agents x "
          f"{args.cores} cores; Parsl {concurrency} workers), median of {len(rounds)} rounds, "
          f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cpus")
    print(f"  {'executor':12} {'end-to-end/s':>13} {'in-run/s':>9}   in-run per round")
    names = {"bare": "bare loop", "pilot": "pilot", "parsl": "parsl htex"}
    for name in EXECUTORS:
        per_round = ", ".join(f"{args.tasks / r[name]['in_run_s']:.0f}" for r in rounds)
        print(f"  {names[name]:12} {rate[name][0]:13.1f} {rate[name][1]:9.1f}   ({per_round})")
    for a, b in (("pilot", "parsl"), ("pilot", "bare"), ("parsl", "bare")):
        print(f"  ratio {a}/{b}: end to end {rate[a][0] / rate[b][0]:.2f}, "
              f"in-run {rate[a][1] / rate[b][1]:.2f}")
    if ideal:
        print(f"  in-run / ideal ({ideal:.0f}/s = concurrency / 0.1 s): " + ", ".join(
            f"{names[n]} {rate[n][1] / ideal:.2f}" for n in EXECUTORS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per run (each kind)")
    parser.add_argument("--agents", type=int, default=2, help="pilot agent ranks (emulated nodes)")
    parser.add_argument("--cores", type=int, default=4, help="cores per emulated node")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median is reported)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--parsl-child", metavar="ARGV_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parsl_child:
        parsl_child(json.loads(args.parsl_child), args.tasks, args.workers, Path(args.folder))
        return 0
    try:
        import parsl  # noqa: F401
    except ImportError:
        sys.exit("Parsl is not installed: run scripts/setup-bench.sh")
    for kind in args.kinds:
        rounds, loads = [], []
        for i in range(args.rounds):
            order = list(EXECUTORS[i % 3:] + EXECUTORS[:i % 3])
            rounds.append(one_round(kind, args, order))
            loads.append(os.getloadavg()[0])
        show(kind, rounds, args, loads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
