"""Per-quantum overhead of subprocess vs warm execution on one real QuantumGraph, and memory.

    scripts/setup-lsst.sh
    .venv-lsst/bin/python benchmarks/bench_lsst.py                 # 20 detectors, 20 quanta per mode
    .venv-lsst/bin/python benchmarks/bench_lsst.py --quanta 41 --detectors 20

Builds a Butler repository and graph (tests/lsst/make_repo.py), copies it once per mode, runs
the init job, then the first N quanta of the graph one at a time (graph order is topological):
``subprocess`` runs each quantum's ``pipetask run-qbb`` command as its own process; ``warm``
forks each from a warm server (pilot.lsst.warm). The quanta are trivial (AddTask), so the
time per quantum is the overhead. Memory is sampled every 20 ms from /proc: RSS (what a
memory watch sees) and USS (private pages: what the quantum really adds, since a forked
child shares the server's pages). Prints figures and the warm/subprocess ratios; the goal
is warm <= 1/15 of subprocess in CPU per quantum.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pilot.lsst.qgraph import load_qgraph  # noqa: E402
from pilot.lsst.warm import WarmServer  # noqa: E402
from tests.lsst.make_repo import build, copy_repo  # noqa: E402


class MemorySampler:
    """Peak RSS and USS (MB) of the one process being watched, sampled on a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.pid = 0
        self.peak_rss = self.peak_uss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.pid:
                rss, uss = smaps_mb(self.pid)
                self.peak_rss, self.peak_uss = max(self.peak_rss, rss), max(self.peak_uss, uss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def smaps_mb(pid: int) -> tuple[float, float]:
    """(RSS, USS) of ``pid`` in MB from /proc/PID/smaps_rollup (0, 0 once it is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return 0.0, 0.0
    private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Rss", 0) / 1024, private / 1024


def wait_child(pid: int) -> tuple[int, float]:
    """Exit code and CPU seconds of a child."""
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime


def run_subprocess(graph, tasks, logdir: Path, sampler: MemorySampler) -> list[tuple[float, float]]:
    times = []
    for t in tasks:
        start = time.perf_counter()
        with open(logdir / f"{t}.log", "wb") as log:
            proc = subprocess.Popen(graph.commands[t], stdout=log, stderr=subprocess.STDOUT)
        sampler.pid = proc.pid
        code, cpu = wait_child(proc.pid)
        proc.returncode = code
        sampler.pid = 0
        times.append((time.perf_counter() - start, cpu))
        check(code, logdir / f"{t}.log")
    return times


def run_warm(server: WarmServer, graph, tasks, logdir: Path, sampler: MemorySampler):
    times = []
    for t in tasks:
        start = time.perf_counter()
        pid = server.launch(graph.commands[t][4:], str(logdir / f"{t}.log"), dict(os.environ))
        sampler.pid = pid
        code, cpu = wait_child(pid)
        sampler.pid = 0
        times.append((time.perf_counter() - start, cpu))
        check(code, logdir / f"{t}.log")
    return times


def check(code: int, log: Path) -> None:
    if code != 0:
        sys.exit(f"a quantum failed ({code}): see {log}")


def prepare(made, workdir: Path, name: str, mode: str):
    copy = copy_repo(made, workdir / name)
    graph = load_qgraph(copy.graph_qg, copy.repo, mode=mode)
    logdir = workdir / f"{name}.logs"
    logdir.mkdir()
    with open(logdir / "init.log", "wb") as log:
        subprocess.run(graph.commands[0], stdout=log, stderr=subprocess.STDOUT, check=True)
    return graph, logdir


def summary(name: str, times, sampler: MemorySampler) -> dict:
    walls, cpus = [w for w, _ in times], [c for _, c in times]
    row = {"wall": statistics.median(walls), "cpu": statistics.median(cpus),
           "rss": sampler.peak_rss, "uss": sampler.peak_uss}
    print(f"{name:<10} {len(times):>6} {row['wall'] * 1000:>10.0f} {row['cpu'] * 1000:>10.0f} "
          f"{sum(walls):>9.1f} {row['rss']:>9.0f} {row['uss']:>9.0f}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", type=int, default=20, help="graph size: 2N+1 quanta")
    parser.add_argument("--quanta", type=int, default=20, help="quanta run in each mode")
    parser.add_argument("--workdir", type=Path, help="keep the repositories and logs here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_lsst."))
    made = build(workdir / "pristine", args.detectors)
    sub_graph, sub_logs = prepare(made, workdir, "subprocess", "subprocess")
    warm_graph, warm_logs = prepare(made, workdir, "warm", "warm")
    tasks = list(range(1, min(sub_graph.size, args.quanta + 1)))

    print(f"{len(tasks)} trivial quanta per mode, one at a time; Python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<10} {'quanta':>6} {'wall ms':>10} {'cpu ms':>10} {'total s':>9} "
          f"{'peak RSS':>9} {'peak USS':>9}   (medians per quantum; memory in MB)")
    sampler = MemorySampler()
    sub = summary("subprocess", run_subprocess(sub_graph, tasks, sub_logs, sampler), sampler)
    start = time.perf_counter()
    server = WarmServer(warm_graph.commands[1][0], str(warm_graph.extra["lsst"].graph_file),
                        warm_graph.extra["lsst"].repo)
    warm_start = time.perf_counter() - start
    server_rss, _ = smaps_mb(server.proc.pid)
    sampler.peak_rss = sampler.peak_uss = 0.0
    try:
        warm = summary("warm", run_warm(server, warm_graph, tasks, warm_logs, sampler), sampler)
    finally:
        server.close()
        sampler.stop()
    print(f"warm server: start {warm_start:.1f} s (once per agent), RSS {server_rss:.0f} MB")
    print(f"ratio warm/subprocess: cpu {warm['cpu'] / sub['cpu']:.3f} (1/{sub['cpu'] / warm['cpu']:.0f}), "
          f"wall {warm['wall'] / sub['wall']:.3f} (1/{sub['wall'] / warm['wall']:.0f}); goal <= 1/15 = 0.067")
    print(f"private memory per quantum: subprocess {sub['uss']:.0f} MB, warm {warm['uss']:.0f} MB")
    print(f"work kept in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
