"""The ctrl_bps plugin: ``bps submit`` (the real CLI) runs a real graph as a pilot run; with a
failing quantum the final job still registers the rest; ``bps restart`` completes the graph, and
``bps report`` / ``bps status`` show each stage."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("lsst.ctrl.bps", reason="the Rubin middleware needs Python >= 3.12 "
                    "(scripts/setup-lsst.sh makes .venv-lsst)")

from lsst.ctrl.bps import WmsStates  # noqa: E402

from pilot.lsst import bps  # noqa: E402
from pilot.lsst.testing_tasks import FAIL_ENV  # noqa: E402
from tests.helpers import ROOT, VENV_BIN, mpi_env, wait_for  # noqa: E402
from tests.lsst.checks import check_outputs, read_outputs  # noqa: E402

CONFIG = ROOT / "examples" / "lsst" / "bps-pilot.yaml"
BPS = Path(VENV_BIN) / "bps"
OUTPUT = "pilot/bps"   # payload output of examples/lsst/bps-pilot.yaml
SERVICE = "pilot.lsst.bps.PilotService"


def run_bps(made, *args: str, **env) -> str:
    proc = subprocess.run([str(BPS), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=mpi_env(BPS_REPO=str(made.repo), BPS_WMS_SERVICE_CLASS=SERVICE, **env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def wait_done(run_id: str) -> dict:
    wait_for(lambda: bps.read_state(Path(run_id)).get("state") == "done", 300, what="the pilot run to end")
    return bps.read_state(Path(run_id))


def report_rows(text: str) -> dict:
    """``{label: [counts...]}`` of the per-label table printed by ``bps report``."""
    names = [s.name for s in WmsStates] + ["EXPECTED"]
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == len(names) + 1 and all(re.fullmatch(r"-?\d+", p) for p in parts[1:]):
            rows[parts[0]] = dict(zip(names, map(int, parts[1:])))
    return rows


def test_bps_submit_failed_quantum_final_job_then_bps_restart_completes_the_graph(small_repo):
    out = run_bps(small_repo, "submit", str(CONFIG), **{FAIL_ENV: "a:1"})
    run_id = re.search(r"Run Id: (\S+)", out).group(1)
    state = wait_done(run_id)
    assert state["run_rc"] == 1 and state["final_rc"] == 0
    found = read_outputs(small_repo.repo, OUTPUT)
    check_outputs(small_repo, found, [0], gather=False)   # registered by the final job
    assert ("add_dataset1", 1) not in found and ("gather_total", None) not in found
    rows = report_rows(run_bps(small_repo, "report", "--id", run_id))
    assert rows["a"]["FAILED"] == 1 and rows["b"]["PRUNED"] == 1 and rows["gather"]["PRUNED"] == 1
    assert bps.PilotService({}).get_status(run_id)[0] == WmsStates.FAILED

    run_bps(small_repo, "restart", "--id", run_id)
    state = wait_done(run_id)
    assert state["run_rc"] == 0 and state["final_rc"] == 0, (Path(run_id) / "pilot_driver.log").read_text()
    check_outputs(small_repo, read_outputs(small_repo.repo, OUTPUT), range(small_repo.detectors), gather=True)
    assert_report_succeeded(small_repo, run_id)


def assert_report_succeeded(made, run_id: str) -> None:
    rows = report_rows(run_bps(made, "report", "--id", run_id))
    d = made.detectors
    for label, n in (("pipetaskInit", 1), ("a", d), ("b", d), ("gather", 1), ("finalJob", 1), ("TOTAL", 2 * d + 3)):
        assert rows[label]["SUCCEEDED"] == n == rows[label]["EXPECTED"], rows
    assert "SUCCEEDED" in run_bps(made, "status", "--id", run_id)


def test_placeholders_are_resolved_recursively():
    cmdvals = {"qgraphFile": "<FILE:runQgraphFile>", "butlerConfig": "/repo", "n": 3}
    text = "run-qbb {butlerConfig} {qgraphFile} -j {n} --tmp <ENV:TMPDIR> {unknown}"
    got = bps.resolve(text, cmdvals, {"runQgraphFile": "/s/g.qg"}, {"TMPDIR": "/scratch"})
    assert got == "run-qbb /repo /s/g.qg -j 3 --tmp /scratch {unknown}"


def test_report_states_follow_the_status_counts_and_the_driver():
    counts = {"a": {"pending": 1, "running": 2, "exec_done": 3, "failed": 1, "dep_fail": 4, "total": 11},
              "__total__": {"total": 11}}
    summary = bps.job_summary(counts, {"state": "running", "pid": 1})
    assert summary["a"][WmsStates.UNREADY] == 1 and summary["a"][WmsStates.RUNNING] == 2
    assert summary["a"][WmsStates.SUCCEEDED] == 3 and summary["a"][WmsStates.PRUNED] == 4
    assert summary["finalJob"][WmsStates.UNREADY] == 1 and "__total__" not in summary
    done = {"state": "done", "run_rc": 3, "final_rc": 0, "cancelled": True}
    assert bps.job_summary({}, done)["finalJob"][WmsStates.SUCCEEDED] == 1
    assert bps.run_state(done) == WmsStates.DELETED
    assert bps.run_state({**done, "cancelled": False}) == WmsStates.FAILED
    assert bps.run_state({**done, "cancelled": False, "run_rc": 0}) == WmsStates.SUCCEEDED
