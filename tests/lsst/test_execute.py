"""Quanta of a real graph executed in subprocess and warm mode, outputs read back from the
repository after the final job (values checked)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("lsst.ctrl.mpexec", reason="the Rubin middleware needs Python >= 3.12 "
                    "(scripts/setup-lsst.sh makes .venv-lsst)")

from pilot.lsst.qgraph import finish_run, load_qgraph  # noqa: E402
from pilot.lsst.testing_tasks import FAIL_ENV, SLEEP_ENV  # noqa: E402
from pilot.events import Failure, TaskStarted  # noqa: E402
from pilot.lsst.warm import FORK_SAFE_ENV, WarmServer, close_servers, spawn  # noqa: E402
from pilot.protocol import RunTask  # noqa: E402
from pilot.runner import ProcessTable, Runner, WatchConfig, set_run_tag, task_env  # noqa: E402
from pilot import leftovers  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.lsst.checks import (OF_A, check_outputs, quantum_tasks, read_outputs,  # noqa: E402
                               run_command)

pytestmark = pytest.mark.lsst


def test_subprocess_mode_runs_quanta_and_final_job_registers_them(test_repo, tmp_path):
    graph = load_qgraph(test_repo.graph_qgraph, test_repo.repo, mode="subprocess")
    assert run_command(graph, 0, tmp_path / "init.log") == 0
    for t in quantum_tasks(graph, "a", {0}) + quantum_tasks(graph, "b", {0}):
        assert run_command(graph, t, tmp_path / f"{t}.log") == 0, (tmp_path / f"{t}.log").read_text()
    assert finish_run(graph, 3, tmp_path) == 3          # drained: work left, outputs registered
    found = read_outputs(test_repo.repo)
    check_outputs(test_repo, found, [0], gather=False)
    assert ("add_dataset1", 1) not in found


def warm_run(server, graph, task, logdir, env=None) -> tuple[int, str]:
    """Launch one quantum on the warm server and wait for it (it is our child)."""
    log = str(logdir / f"{graph.ids[task]}.log")
    pid = server.launch(graph.commands[task][4:], log, {**os.environ, **(env or {})})
    _, status, _ = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), log


def warm_cache_dirs() -> set:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "butler-cache-dir-*")))


def test_warm_mode_runs_every_quantum(test_repo, tmp_path):
    graph = load_qgraph(test_repo.graph_qg, test_repo.repo, mode="warm")   # init job done
    server = WarmServer(graph.commands[1][0], str(test_repo.graph_qg), str(test_repo.repo))
    caches_before = warm_cache_dirs()
    try:
        for t in quantum_tasks(graph):
            code, log = warm_run(server, graph, t, tmp_path)
            text = open(log).read()
            assert code == 0, text[-2000:]
            assert f"forked from warm server {server.proc.pid}" in text
    finally:
        server.close()
    assert warm_cache_dirs() <= caches_before       # each child removed its butler cache directory
    assert finish_run(graph, 0, tmp_path) == 0
    check_outputs(test_repo, read_outputs(test_repo.repo), range(test_repo.detectors), gather=True)


def test_warm_child_failure_and_kill_leave_the_server_serving(test_repo, tmp_path):
    graph = load_qgraph(test_repo.graph_qg, test_repo.repo, mode="warm")   # init job done
    a3, a4 = quantum_tasks(graph, "a", {3}) + quantum_tasks(graph, "a", {4})
    server = WarmServer(graph.commands[1][0], str(test_repo.graph_qg), str(test_repo.repo))
    try:
        code, log = warm_run(server, graph, a3, tmp_path, {FAIL_ENV: "a:3"})
        assert code == 1 and "failing as asked" in open(log).read()
        pid = server.launch(graph.commands[a4][4:], str(tmp_path / "slow.log"),
                            {**os.environ, SLEEP_ENV: "60"})
        rss = wait_for(lambda: ProcessTable.scan().rss_mb(pid, pid) > 50, 60, what="child memory")
        assert rss and os.getpgid(pid) == pid        # watchable and killable as a group
        os.killpg(pid, signal.SIGKILL)
        _, status, _ = os.wait4(pid, 0)
        assert os.WTERMSIG(status) == signal.SIGKILL
        assert server.alive
        for t in (a3, a4):
            assert warm_run(server, graph, t, tmp_path)[0] == 0
    finally:
        server.close()
    assert finish_run(graph, 1, tmp_path) == 1
    found = read_outputs(test_repo.repo)
    check_outputs(test_repo, found, [3, 4], gather=False, types=OF_A)
    assert ("add_dataset2", 3) not in found and ("add_dataset1", 5) not in found


def test_a_warm_quantum_carries_the_run_tag_and_a_later_start_kills_it(test_repo, tmp_path):
    """The warm server starts with the run's PILOT_RUN, so a quantum it forks (no exec) shows the
    tag in /proc whatever environment it is given: a later start of the run finds and kills it,
    as when the agent that launched it died (pilot.leftovers)."""
    graph = load_qgraph(test_repo.graph_qg, test_repo.repo, mode="warm")
    a4 = quantum_tasks(graph, "a", {4})[0]
    run = leftovers.run_name("graph", 1.0, str(tmp_path / "ckpt.h5"))
    tag = leftovers.new_tag(run)
    set_run_tag(tag)
    try:
        server = WarmServer(graph.commands[1][0], str(test_repo.graph_qg), str(test_repo.repo))
    finally:
        set_run_tag(None)
    pid = 0
    try:
        untagged = {k: v for k, v in os.environ.items() if k != leftovers.ENV}
        pid = server.launch(graph.commands[a4][4:], str(tmp_path / "slow.log"), {**untagged, SLEEP_ENV: "60"})
        assert {pid, server.proc.pid} <= set(leftovers.tagged(tag, others=False))
        assert pid in leftovers.kill_tagged(leftovers.new_tag(run), others=True)
        _, status, _ = os.wait4(pid, 0)
        assert os.WTERMSIG(status) == signal.SIGKILL
    finally:
        server.close()
        if pid:   # killed with SIGKILL, the child could not remove its butler cache directory
            shutil.rmtree(os.path.join(tempfile.gettempdir(), f"butler-cache-dir-{pid}-warm"), ignore_errors=True)


def test_server_refuses_to_fork_while_multi_threaded():
    env = {k: v for k, v in os.environ.items() if k not in FORK_SAFE_ENV}
    proc = subprocess.run([sys.executable, "-m", "pilot.lsst.warm", "serve"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    reply = json.loads(proc.stdout.splitlines()[0])
    assert proc.returncode == 1 and "multi-threaded" in reply["error"], proc.stderr[-2000:]
    assert "jemalloc_bg_thd" in reply["error"]


class WarmRunner(Runner):
    """The runner with its warm-mode launch (what ``Runner._spawn`` does for PILOT_LSST_MODE=warm)."""

    def _spawn(self):
        return spawn(self.run.command, self.run.log, task_env(self.run))


def watch_until_done(runner: Runner):
    def step():
        runner.observe(ProcessTable.scan().rss_mb(runner.pid, runner.pid))
        return runner.poll()
    return wait_for(step, 300, interval=0.05, what="the warm quantum to end")


def test_runner_watches_a_warm_child_like_any_task(test_repo, tmp_path):
    graph = load_qgraph(test_repo.graph_qg, test_repo.repo, mode="warm")   # init job done
    a0, a1 = quantum_tasks(graph, "a", {0}) + quantum_tasks(graph, "a", {1})

    def task(t, memory_mb, env=None):
        return RunTask(t, 1, 0, graph.ids[t], "a", "n0", graph.commands[t], {**graph.env[t], **(env or {})},
                       str(tmp_path / f"{t}.log"), 0.0, memory_mb, 1)
    try:
        ok = WarmRunner(task(a0, 2000), WatchConfig(sample_interval=0.05))
        assert isinstance(ok.start(), TaskStarted)
        done = watch_until_done(ok)
        assert done.failure == Failure.NONE and done.exit_code == 0 and done.cpu_s > 0
        assert done.peak_rss_mb > 20
        hog = WarmRunner(task(a1, 20, {SLEEP_ENV: "60"}), WatchConfig(sample_interval=0.05))
        hog.start()
        assert watch_until_done(hog).failure == Failure.OOM   # over 20 MB: killed by the watch
    finally:
        close_servers()
