"""Cost of launching one task attempt: `true` through Runner.start/poll, against bare loops.

    .venv/bin/python benchmarks/bench_launch.py [--launches 3000] [--concurrency 2] [--rounds 3]
        [--env-size 100] [--dir FOLDER]

Three loops run in this one process, in alternating rounds, each keeping ``concurrency``
launches of `true` in flight and writing each launch's output to a new log file laid out as the
pilot's task logs:

- ``popen``: a bare ``subprocess.Popen`` loop (own session, stdin from /dev/null, log appended);
- ``posix_spawn``: a bare ``os.posix_spawnp`` loop doing the same (the child opens the log);
- ``fork_exec``: a bare loop of CPython's fork_exec (what subprocess uses, called directly; the
  log opened by the parent; see bare_launch.py);
- ``native``: a bare loop of the launch the runner uses (``pilot._launch``: the log opened, vfork
  and exec in one C call);
- ``runner``: :class:`pilot.runner.Runner` (what an agent does per attempt: environment, log,
  launch, pidfd, reaping, group kill of leftovers, result), woken by the pidfds as the agent is;
- ``agent``: :class:`pilot.agent.Agent` given every attempt at once, queued ahead in
  ``concurrency`` chains as rank 0 queues them (each starts as the one before it ends), its
  results encoded for the wire as the transport does (``to_wire``, pickled 8 a batch), waiting
  in the lane as an agent rank does (``hold`` of ``REPORT_HOLD_S``): the runner plus the
  agent's bookkeeping, without MPI or rank 0.

Printed per loop (median over rounds): launches/s, the parent's own CPU in microseconds per
launch (the launcher's overhead: Python, syscalls; the child's exec is not in it) and the
children's CPU per launch (Popen's parent opens the log, the spawned children open their own).
The ratios runner/native and agent/native are what each adds to the floor.

Last, the CPU of queueing a launch in the lane (``Lane.queue``, then ``drop``; nothing is
launched) with this environment: its entries given whole, converted at every call, against the
agent's way, a base ``Environ`` converted once and the task's own two entries.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bare_launch  # noqa: E402  (beside this script)
from pilot.agent import Agent  # noqa: E402
from pilot.agent_loop import REPORT_HOLD_S  # noqa: E402
from pilot.protocol import RunTask, to_wire  # noqa: E402
from pilot.runner import Runner, WatchConfig, log_path  # noqa: E402

LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND


def usage() -> tuple[float, float]:
    """(own CPU s, waited-for children's CPU s) of this process."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def bare_loop(launch, n: int, concurrency: int) -> None:
    """Keep ``concurrency`` children of ``launch(i) -> (pid, Popen or None)`` running until ``n`` ended."""
    running: dict[int, subprocess.Popen | None] = {}
    started = 0
    while started < n or running:
        while started < n and len(running) < concurrency:
            pid, proc = launch(started)
            running[pid] = proc
            started += 1
        pid, status = os.waitpid(-1, 0)
        proc = running.pop(pid)
        if proc is not None:
            proc.returncode = os.waitstatus_to_exitcode(status)   # or Popen would reap it again


def popen_launcher(logdir: Path):
    def launch(i: int) -> tuple[int, subprocess.Popen]:
        with open(log_path(logdir, i, f"t{i}", 1), "ab") as log:
            proc = subprocess.Popen(["true"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return proc.pid, proc
    return launch


def spawn_launcher(logdir: Path):
    env = dict(os.environ)   # os.environ itself would be converted key by key in Python

    def launch(i: int) -> tuple[int, None]:
        return os.posix_spawnp("true", ["true"], env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, log_path(logdir, i, f"t{i}", 1), LOG_FLAGS, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2)]), None
    return launch


def null_run(i: int, logdir: Path, after: int = -1) -> RunTask:
    """Attempt 1 of task ``i``, `true`, its log laid out as the pilot's."""
    return RunTask(i, 1, 0, f"t{i}", "null", "n0", ["true"], None, log_path(logdir, i, f"t{i}", 1),
                   0.0, 1, 1, after)


def runner_loop(n: int, concurrency: int, logdir: Path) -> None:
    """The agent's pattern: start runners, wait on their pidfds, poll the readable ones."""
    watch = WatchConfig()
    running: dict[int, Runner] = {}
    started = 0
    while started < n or running:
        while started < n and len(running) < concurrency:
            runner = Runner(null_run(started, logdir), watch)
            runner.start()
            running[runner.pidfd] = runner
            started += 1
        readable, _, _ = select.select(list(running), [], [], 5.0)
        for fd in readable:
            running.pop(fd).poll(exited=True)   # a readable pidfd: it has ended


def agent_loop(n: int, concurrency: int, logdir: Path) -> None:
    """The agent's pattern without MPI: every attempt handed over at once, in ``concurrency``
    queue-ahead chains; results encoded as the transport would send them."""
    batch: list[tuple] = []

    def send(message) -> None:
        batch.append(to_wire(message))
        if len(batch) == 8:
            pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)
            batch.clear()

    agent = Agent(send)
    for i in range(n):
        agent.handle(null_run(i, logdir, i - concurrency if i >= concurrency else -1))
    while agent.busy or agent.waiting:
        if not agent.step():
            agent.wait(5.0, hold=REPORT_HOLD_S)   # as an agent rank waits (in the lane, gathering)


def bare_launcher(how):
    """A launcher of `true` through ``how`` (a function of bare_launch.py)."""
    def make(logdir: Path):
        env, true = bare_launch.env_entries(), shutil.which("true")

        def launch(i: int) -> tuple[int, None]:
            return how(true, env, log_path(logdir, i, f"t{i}", 1)), None
        return launch
    return make


def make_dirs(logdir: Path, n: int) -> None:
    for shard in range(n // 1000 + 1):
        (logdir / f"{shard:05d}").mkdir(parents=True, exist_ok=True)


def measure(name: str, n: int, concurrency: int, logdir: Path) -> tuple[float, float, float]:
    """One round of one loop: (launches/s, own CPU us per launch, children's CPU us per launch)."""
    make_dirs(logdir, n)
    self0, kids0 = usage()
    began = time.perf_counter()
    if name == "runner":
        runner_loop(n, concurrency, logdir)
    elif name == "agent":
        agent_loop(n, concurrency, logdir)
    else:
        launcher = {"popen": popen_launcher, "posix_spawn": spawn_launcher, "fork_exec": bare_launcher(bare_launch.fork_exec),
                    "native": bare_launcher(bare_launch.native)}[name](logdir)
        bare_loop(launcher, n, concurrency)
    wall = time.perf_counter() - began
    self1, kids1 = usage()
    return n / wall, 1e6 * (self1 - self0) / n, 1e6 * (kids1 - kids0) / n


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the logs go (default /dev/shm: creating files on a disk is slow and "
                             "noisy, and the same for every loop)")
    parser.add_argument("--env-size", type=int, default=100,
                        help="pad the environment to this many variables (an agent under mpiexec has ~100)")
    return parser.parse_args()


def run_rounds(args, names) -> dict[str, list[float]]:
    """Every loop once per round, alternating; the median (rate, own us, children us) per loop."""
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench_launch_", dir=args.dir) as tmp:
        for round_no in range(args.rounds):
            for name in names:
                logdir = Path(tmp) / f"{name}{round_no}"
                results[name].append(measure(name, args.launches, args.concurrency, logdir))
    return {name: [statistics.median(r[k] for r in results[name]) for k in range(3)] for name in names}


def main() -> None:
    args = parse_args()
    for k in range(len(os.environ), args.env_size):
        os.environ[f"BENCH_PAD_{k}"] = f"/some/typical/value/{k}"
    names = ("popen", "posix_spawn", "fork_exec", "native", "runner", "agent")
    med = run_rounds(args, names)
    print(f"`true` x {args.launches}, concurrency {args.concurrency}, median of {args.rounds} rounds, "
          f"{len(os.environ)} environment variables, logs in {args.dir or tempfile.gettempdir()}, "
          f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")
    for name in names:
        rate, own, kids = med[name]
        print(f"{name:12s} {rate:7.0f} launches/s   own CPU {own:6.1f} us/launch   "
              f"children {kids:6.1f} us/launch")
    runner, agent, floor, popen = med["runner"], med["agent"], med["native"], med["popen"]
    print(f"runner / native: rate {runner[0] / floor[0]:.2f}, own CPU {runner[1] / floor[1]:.2f}; "
          f"agent / native: rate {agent[0] / floor[0]:.2f}, own CPU {agent[1] / floor[1]:.2f}; "
          f"runner / popen: rate {runner[0] / popen[0]:.2f}, own CPU {runner[1] / popen[1]:.2f}")
    costs = queue_costs()
    if costs is not None:
        whole, base = costs
        print(f"lane queue + drop, {len(os.environ)} variables: converted each time {whole:.1f} us, "
              f"with a base Environ {base:.1f} us (ratio {base / whole:.2f})")


def queue_costs(count: int = 5000, rounds: int = 3) -> tuple[float, float] | None:
    """CPU us per ``Lane.queue`` + ``drop`` of this process's environment: (entries given whole,
    a base Environ); the least of ``rounds`` alternating runs. None without the native lane."""
    from pilot import spawn

    if not spawn.native_usable():
        return None
    lane, entries = spawn.new_lane(), bare_launch.env_entries()
    own = [b"PILOT_TASK_ID=t1", b"PILOT_ATTEMPT=1"]
    base = spawn._launch.Environ(entries)
    cases = {"whole": lambda t: lane.queue(0, t, 1, "/bin/true", ["true"], entries + own, os.devnull),
             "base": lambda t: lane.queue(0, t, 1, "/bin/true", ["true"], own, os.devnull, base)}
    best = {name: float("inf") for name in cases}
    for _ in range(rounds):
        for name, queue in cases.items():
            start = time.process_time()
            for t in range(1, count + 1):
                queue(t)
                lane.drop(t)
            best[name] = min(best[name], (time.process_time() - start) / count * 1e6)
    return best["whole"], best["base"]


if __name__ == "__main__":
    main()
