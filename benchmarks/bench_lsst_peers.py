"""pilot on a real QuantumGraph against its peers: ``pipetask run -j N`` and pilot's subprocess mode.

    scripts/setup-lsst.sh
    .venv-lsst/bin/python benchmarks/bench_lsst_peers.py                # 20 detectors: 41 quanta, N=2
    .venv-lsst/bin/python benchmarks/bench_lsst_peers.py --detectors 50 --processes 2

Builds one Butler repository and graph (tests/lsst/make_repo.py: 2D+1 trivial quanta), copies
it once per contender (outputs never clash) and runs the whole graph, init job included:

- ``pipetask -j N``: ``pipetask run -b REPO -g GRAPH -j N --register-dataset-types``
  (ctrl_mpexec's own multiprocess executor), through ``python -m pilot.lsst.tool`` so the same
  zipfile fix applies on affected interpreters;
- ``pilot warm``: ``mpiexec -n N+1 pilot run GRAPH --butler REPO --lsst-mode warm
  --node-per-rank --node-cores 1``: N agent ranks, each a node with one core (N slots), plus
  the final job (``butler aggregate-graph``) that registers the outputs;
- ``pilot subprocess``: the same with ``--lsst-mode subprocess`` (one ``pipetask run-qbb``
  process per quantum, as BPS plugins do).

After each run every output is read back through the Butler API and must be there exactly once
with its value. Prints wall time, quanta/s, CPU seconds (user+sys of the whole process tree,
from ``wait4``) and the ratios pilot-warm / pipetask -j and pilot-warm / pilot-subprocess.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import MPIEXEC, ROOT, mpi_env  # noqa: E402
from tests.lsst.checks import check_outputs, read_outputs  # noqa: E402
from tests.lsst.make_repo import OUTPUT_RUN, TestRepo, build, copy_repo, tool_env  # noqa: E402

BPS = "requestMemory: 500\nnumberOfRetries: 1\n"


def pipetask_argv(made, processes: int) -> list[str]:
    """ctrl_mpexec's multiprocess executor over the whole graph."""
    return [sys.executable, "-m", "pilot.lsst.tool", "pipetask", "run", "-b", str(made.repo),
            "-g", str(made.graph_qg), "-j", str(processes), "--register-dataset-types"]


def pilot_argv(made, processes: int, mode: str) -> list[str]:
    """``pilot run`` with one rank per agent slot: N nodes of one core each."""
    bps = made.root / "bps.yaml"
    bps.write_text(BPS)
    return [str(MPIEXEC), "-launcher", "fork", "-n", str(processes + 1), sys.executable, "-m",
            "pilot.cli", "run", str(made.graph_qg), "--butler", str(made.repo), "--bps-config", str(bps),
            "--lsst-mode", mode, "--checkpoint", str(made.root / "ckpt.h5"),
            "--node-per-rank", "--node-cores", "1", "--node-memory", "2000"]


def timed(argv: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run ``argv`` to completion: (wall s, CPU s of it and every descendant it waited for)."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv[:8])} ... failed ({proc.returncode}): see {log}")
    return wall, usage.ru_utime + usage.ru_stime


def verified(made) -> int:
    """Number of outputs in the repository; exits unless every one is there once, right."""
    found = read_outputs(made.repo, OUTPUT_RUN)   # pipetask -g makes the run, not the chain
    check_outputs(made, found, range(made.detectors), gather=True)
    count = sum(n for _, n in found.values())
    want = 4 * made.detectors + 1
    if count != want:
        sys.exit(f"{made.repo}: {count} outputs, expected {want}")
    return count


def contenders(processes: int) -> list[tuple[str, object, dict]]:
    """(name, argv builder, environment) of each contender."""
    return [
        (f"pipetask -j{processes}", lambda m: pipetask_argv(m, processes), tool_env()),
        ("pilot warm", lambda m: pilot_argv(m, processes, "warm"), mpi_env()),
        ("pilot subprocess", lambda m: pilot_argv(m, processes, "subprocess"), mpi_env()),
    ]


def run_all(pristine, workdir: Path, processes: int) -> dict[str, tuple[float, float]]:
    """Each contender on its own copy of the repository; returns {name: (wall, cpu)}."""
    quanta = 2 * pristine.detectors + 1
    rows = {}
    for i, (name, argv, env) in enumerate(contenders(processes)):
        if (workdir / f"run{i}").exists():
            shutil.rmtree(workdir / f"run{i}")
        made = copy_repo(pristine, workdir / f"run{i}")
        wall, cpu = timed(argv(made), env, made.root / "run.log")
        outputs = verified(made)
        rows[name] = (wall, cpu)
        print(f"{name:<18} {quanta:>6} {outputs:>7} {wall:>8.1f} {quanta / wall:>9.2f} {cpu:>8.1f} "
              f"{cpu / quanta:>11.2f}   load {os.getloadavg()[0]:.1f}", flush=True)
    return rows


def pristine_repo(root: Path, detectors: int) -> TestRepo:
    """The repository and graphs under ``root``: built, or reused from an earlier --workdir run."""
    if (root / "g.qg").exists() and (root / "detectors").read_text() == str(detectors):
        return TestRepo(root, root / "repo", root / "g.qg", root / "g.qgraph", detectors)
    made = build(root, detectors)
    (root / "detectors").write_text(str(detectors))
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", type=int, default=20, help="graph size: 2D+1 quanta")
    parser.add_argument("--processes", "-j", type=int, default=2, help="N: concurrent quanta")
    parser.add_argument("--workdir", type=Path, help="keep the repositories and logs here (a "
                        "repository built there before for the same --detectors is reused)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_lsst_peers."))
    pristine = pristine_repo(workdir / "pristine", args.detectors)
    print(f"{2 * args.detectors + 1} trivial quanta, N={args.processes} at a time, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'contender':<18} {'quanta':>6} {'outputs':>7} {'wall s':>8} {'quanta/s':>9} {'cpu s':>8} "
          f"{'cpu s/quant':>11}")
    rows = run_all(pristine, workdir, args.processes)
    warm, pipetask, sub = rows["pilot warm"], rows[f"pipetask -j{args.processes}"], rows["pilot subprocess"]
    print(f"ratio pilot-warm / pipetask -j{args.processes}: wall {warm[0] / pipetask[0]:.2f}, "
          f"cpu {warm[1] / pipetask[1]:.2f}")
    print(f"ratio pilot-warm / pilot-subprocess: wall {warm[0] / sub[0]:.2f}, cpu {warm[1] / sub[1]:.2f}")
    print(f"work kept in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
