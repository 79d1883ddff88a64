"""Null and short tasks through pilot, Parsl and a bare spawn loop, in the same run.

    scripts/setup-bench.sh                      # once: installs Parsl into .venv
    .venv/bin/python benchmarks/bench_peers.py [--tasks 500] [--agents 2] [--cores 4] [--rounds 3]

Each round runs ``true`` tasks and ``sleep 0.1`` tasks, the same count and the same
concurrency (agents x cores), through:

- pilot: ``mpiexec -n agents+1 pilot run`` with one emulated node of ``cores`` cores per agent
  rank, one run per kind (every task's output goes to its own log file);
- Parsl: a ``HighThroughputExecutor`` on a ``LocalProvider`` (one block, agents x cores
  workers), one ``bash_app`` per task with its output to its own file; one session (a fresh
  Python) per round runs both kinds after a warm-up task per worker;
- a bare loop: ``subprocess.Popen`` keeping the same number in flight (output discarded).

Two rates per executor and kind. In-run: pilot from its first task start to its last task end
(checkpoint times); Parsl from the first submit to the last result; the bare loop has no
start-up. End to end: pilot's whole ``mpiexec``; Parsl's session cost (interpreter, start-up,
warm-up, shutdown) plus the kind's in-run time. The executors take turns in a rotating order;
figures are medians over rounds, with the load average.
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


def parsl_run(folder: Path, kinds: list[str], tasks: int, workers: int) -> dict:
    """One Parsl session (a fresh interpreter: this script with --parsl-child) runs every
    kind in turn; a kind's end-to-end time is the session's fixed cost (interpreter, start-up,
    warm-up, shutdown) plus its own in-run time."""
    cmd = [sys.executable, __file__, "--parsl-child", "--kinds", *kinds, "--tasks", str(tasks),
           "--workers", str(workers), "--folder", str(folder)]
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")  # Parsl's own scripts
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"parsl run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    in_run = json.loads(proc.stdout.strip().splitlines()[-1])
    fixed = wall - sum(in_run.values())
    return {kind: {"end_to_end_s": fixed + s, "in_run_s": s} for kind, s in in_run.items()}


def parsl_child(kinds: list[str], tasks: int, workers: int, folder: Path) -> None:
    """Run each kind's tasks as Parsl bash_apps on a local HighThroughputExecutor; print
    {kind: in-run seconds} as JSON."""
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    # cores_per_worker below 1 so that max_workers_per_node alone sets the worker count
    # (the pilot's emulated nodes also declare more cores than the machine has)
    htex = HighThroughputExecutor(label="htex", address="127.0.0.1", max_workers_per_node=workers,
                                  cores_per_worker=0.001,
                                  provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))
    parsl.load(Config(executors=[htex], run_dir=str(folder / "runinfo"), strategy="none"))
    _parsl_batch("true", workers, None)   # warm-up: every worker started and connected
    out = {kind: _parsl_batch(" ".join(KINDS[kind]), tasks, folder / "logs" / str(i))
           for i, kind in enumerate(kinds)}
    parsl.dfk().cleanup()
    print(json.dumps(out))


def _parsl_batch(command: str, tasks: int, logs: Path | None) -> float:
    """Submit ``tasks`` bash_apps of ``command``, wait for all; seconds taken."""
    from parsl.app.app import bash_app

    @bash_app
    def task(stdout=None, stderr=None):
        return command

    if logs is not None:
        logs.mkdir(parents=True)
    began = time.perf_counter()
    futures = [task(stdout=str(logs / f"t{i}.log") if logs else None,
                    stderr=str(logs / f"t{i}.log") if logs else None) for i in range(tasks)]
    failed = sum(f.exception() is not None for f in futures)
    if failed:
        sys.exit(f"{failed} of {tasks} Parsl tasks of {command!r} failed")
    return time.perf_counter() - began


# ---- rounds and figures ---------------------------------------------------------------


def one_round(args, order: list[str]) -> dict:
    """Every executor once on every kind; {kind: {executor: figures}}."""
    concurrency = args.agents * args.cores
    out = {kind: {} for kind in args.kinds}
    for name in order:
        with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
            if name == "parsl":
                for kind, figures in parsl_run(Path(tmp), args.kinds, args.tasks, concurrency).items():
                    out[kind][name] = figures
                continue
            for i, kind in enumerate(args.kinds):
                if name == "bare":
                    out[kind][name] = bare_loop(KINDS[kind], args.tasks, concurrency)
                else:
                    folder = Path(tmp) / str(i)
                    folder.mkdir()
                    out[kind][name] = pilot_run(folder, KINDS[kind], args.tasks, args.agents,
                                                args.cores)
    return out


def medians(rounds: list[dict], tasks: int) -> dict:
    """{executor: (end-to-end tasks/s, in-run tasks/s)} as medians over rounds."""
    return {name: (statistics.median(tasks / r[name]["end_to_end_s"] for r in rounds),
                   statistics.median(tasks / r[name]["in_run_s"] for r in rounds))
            for name in EXECUTORS}


def paired(rounds: list[dict], a: str, b: str, key: str) -> float:
    """Median over rounds of a's rate / b's rate (both ran in the same round)."""
    return statistics.median(r[b][key] / r[a][key] for r in rounds)


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
        print(f"  ratio {a}/{b} (median of per-round ratios): end to end "
              f"{paired(rounds, a, b, 'end_to_end_s'):.2f}, in-run {paired(rounds, a, b, 'in_run_s'):.2f}")
    if ideal:
        print(f"  in-run / ideal ({ideal:.0f}/s = concurrency / 0.1 s): " + ", ".join(
            f"{names[n]} {rate[n][1] / ideal:.2f}" for n in EXECUTORS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500, help="tasks per run (each kind)")
    parser.add_argument("--agents", type=int, default=2, help="pilot agent ranks (emulated nodes)")
    parser.add_argument("--cores", type=int, default=4, help="cores per emulated node")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median is reported)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--parsl-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parsl_child:
        parsl_child(args.kinds, args.tasks, args.workers, Path(args.folder))
        return 0
    try:
        import parsl  # noqa: F401
    except ImportError:
        sys.exit("Parsl is not installed: run scripts/setup-bench.sh")
    rounds, loads = [], []
    for i in range(args.rounds):
        rounds.append(one_round(args, list(EXECUTORS[i % 3:] + EXECUTORS[:i % 3])))
        loads.append(os.getloadavg()[0])
    for kind in args.kinds:
        show(kind, [r[kind] for r in rounds], args, loads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
