"""``mpiexec -n 3 pilot run GRAPH --butler REPO --checkpoint C`` on a real graph and repository:
each execution mode, a kill -9 and resume, a failing quantum."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("lsst.ctrl.mpexec", reason="the Rubin middleware needs Python >= 3.12 "
                    "(scripts/setup-lsst.sh makes .venv-lsst)")

from pilot.commands import run as run_command  # noqa: E402
from pilot.lsst.testing_tasks import FAIL_ENV  # noqa: E402
from tests.helpers import MPIEXEC, ROOT, mpi_env, wait_for  # noqa: E402
from tests.lsst.checks import check_outputs, read_outputs  # noqa: E402
from tests.test_runner import pid_gone  # noqa: E402

pytestmark = [pytest.mark.lsst, pytest.mark.mpi]


def run_dispatches_graphs() -> bool:
    parser = argparse.ArgumentParser()
    run_command.add_arguments(parser)
    return "--butler" in parser.format_help()


if not run_dispatches_graphs():
    pytest.skip("pilot run has no --butler option yet (QuantumGraph dispatch)", allow_module_level=True)

BPS = "requestMemory: 500\nnumberOfRetries: 1\n"
NODE = ["--node-per-rank", "--node-memory", "1500", "--node-cores", "2", "--memory-interval", "0.2"]


def pilot_argv(made, tmp_path: Path, mode: str) -> list[str]:
    bps = tmp_path / "bps.yaml"
    bps.write_text(BPS)
    return [str(MPIEXEC), "-launcher", "fork", "-n", "3", sys.executable, "-m", "pilot.cli", "run",
            str(made.graph_qg), "--butler", str(made.repo), "--bps-config", str(bps),
            "--lsst-mode", mode, "--checkpoint", str(tmp_path / "ckpt.h5"), *NODE]


def run_pilot(made, tmp_path: Path, mode: str, **env) -> subprocess.CompletedProcess:
    """The pilot on ``made``'s graph (tests/lsst/conftest.py removes what MPI leaves in /dev/shm)."""
    return subprocess.run(pilot_argv(made, tmp_path, mode), cwd=ROOT, env=mpi_env(**env),
                          capture_output=True, text=True, timeout=600)


def status(tmp_path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "pilot.cli", "status", str(tmp_path / "ckpt.h5"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def quantum_logs(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "ckpt.h5.logs").rglob("*.log") if p.name[0].isdigit()]


@pytest.mark.parametrize("mode", ["warm", "subprocess"])
def test_every_output_registered_in_each_mode(request, tmp_path, mode):
    # A process per quantum costs seconds of CPU each: subprocess mode runs the 9-quantum graph.
    made = request.getfixturevalue("test_repo" if mode == "warm" else "small_repo")
    proc = run_pilot(made, tmp_path, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_outputs(made, read_outputs(made.repo), range(made.detectors), gather=True)
    warm_logs = [p for p in quantum_logs(tmp_path) if "forked from warm server" in p.read_text()]
    assert len(warm_logs) == (2 * made.detectors + 1 if mode == "warm" else 0)
    assert len(quantum_logs(tmp_path)) == 2 * made.detectors + 1
    counts = status(tmp_path)
    assert counts["a"]["exec_done"] == made.detectors and counts["gather"]["exec_done"] == 1


def processes_using(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


def kill_leftovers(made, earlier: list[int] = ()) -> None:
    """Quanta and warm servers of a killed run (they use the repository path): end them, and
    remove the butler cache directories of those and of the ``earlier`` pids."""
    pids = processes_using(str(made.repo))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not processes_using(str(made.repo)), 30, what="leftover processes to end")
    for pid in {*pids, *earlier}:   # a warm child killed with SIGKILL cannot remove its butler cache directory
        shutil.rmtree(os.path.join(tempfile.gettempdir(), f"butler-cache-dir-{pid}-warm"), ignore_errors=True)


def quanta_done(tmp_path: Path) -> int:
    return sum("Executed 1 quanta successfully" in p.read_text() for p in quantum_logs(tmp_path))


def test_kill_minus_9_then_resume_registers_everything_once(test_repo, tmp_path):
    proc = subprocess.Popen(pilot_argv(test_repo, tmp_path, "warm"), cwd=ROOT, env=mpi_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: quanta_done(tmp_path) >= 10 or proc.poll() is not None, 300, what="10 quanta done")
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # What outlived the killed run (quanta running then: a warm quantum does not die with its
    # agent); the restart must end it before it runs anything (pilot.leftovers).
    left = processes_using(str(test_repo.repo))
    try:
        again = run_pilot(test_repo, tmp_path, "warm")
        still = [pid for pid in left if not pid_gone(pid)]
    finally:
        kill_leftovers(test_repo, left)
    assert again.returncode == 0, again.stderr[-3000:]
    assert still == [], f"processes of the killed run outlived the restart: {still}"
    check_outputs(test_repo, read_outputs(test_repo.repo), range(test_repo.detectors), gather=True)


def test_failed_quantum_descendants_dep_fail_and_the_rest_is_registered(test_repo, tmp_path):
    proc = run_pilot(test_repo, tmp_path, "warm", **{FAIL_ENV: "a:3"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    counts = status(tmp_path)
    assert counts["a"]["failed"] == 1 and counts["a"]["exec_done"] == test_repo.detectors - 1
    assert counts["b"]["dep_fail"] == 1 and counts["gather"]["dep_fail"] == 1
    found = read_outputs(test_repo.repo)
    others = [d for d in range(test_repo.detectors) if d != 3]
    check_outputs(test_repo, found, others, gather=False)
    assert ("add_dataset1", 3) not in found and ("add_dataset2", 3) not in found
    assert ("gather_total", None) not in found
