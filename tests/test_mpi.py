"""`pilot run` under a real `mpiexec` (1, 2, 3 and 5 ranks, oversubscribed on this machine),
checked from the tasks' own records."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import MPIEXEC, ROOT, mpi_env, wait_for
from tests.test_master import (PACKING_EDGES, PACKING_IDS, assert_exactly_once, assert_oom_retried, assert_order,
                               peak_memory_by_node, read_records, workflow)
from tests.test_runner import ensure_payload, pid_gone
from tests.test_transport import cleanup_shm, shm_segments

pytestmark = pytest.mark.mpi
NODE = ["--node-per-rank", "--node-memory", "1000", "--node-cores", "4"]


def pilot_cmd(ranks: int, wf: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [str(MPIEXEC), "-launcher", "fork", "-n", str(ranks), sys.executable, "-m", "pilot.cli", "run",
            str(wf), "--checkpoint", str(tmp_path / "ckpt.h5"), "--memory-interval", "0.05", *extra]


def run_pilot(ranks: int, wf: Path, tmp_path: Path, *extra: str, wrapped: bool = False) -> subprocess.CompletedProcess:
    """The pilot under mpiexec; ``wrapped``: every rank under :func:`wrapped_cmd`'s rank wrapper."""
    before = shm_segments()
    cmd, env = (wrapped_cmd(ranks, wf, tmp_path, *extra), wrapped_env(tmp_path)) if wrapped else \
        (pilot_cmd(ranks, wf, tmp_path, *extra), mpi_env())
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    finally:
        cleanup_shm(before)


def wrapped_cmd(ranks: int, wf: Path, tmp_path: Path, *extra: str) -> list[str]:
    """:func:`pilot_cmd` with every rank under the rank wrapper of `pilot submit`'s jobs, which
    writes rank 0's own exit code to ``tmp_path/rank0.rc`` (see :func:`assert_exit`)."""
    from pilot.slurm_script import RANK_WRAPPER

    cmd = pilot_cmd(ranks, wf, tmp_path, *extra)
    at = cmd.index(sys.executable)
    return cmd[:at] + ["bash", "-c", RANK_WRAPPER, "pilot-rank"] + cmd[at:]


def wrapped_env(tmp_path: Path) -> dict:
    return {**mpi_env(), "PILOT_RANK0_RC": str(tmp_path / "rank0.rc"), "PILOT_RANK0_PID": str(tmp_path / "rank0.pid")}


def assert_exit(mpiexec_code: int, tmp_path: Path, expected: int, err: str) -> None:
    """Rank 0 exited ``expected`` (its own code, from the rank wrapper), and mpiexec returned it,
    or what Hydra's clean-up may put in its place when rank 0 exits non-zero: the code of a rank
    it killed (9), or 0 (docs/runtime.md, "Signals"; pmodels/mpich#7057)."""
    rank0 = int((tmp_path / "rank0.rc").read_text())
    assert rank0 == expected, f"rank 0 exited {rank0}, mpiexec {mpiexec_code}:\n{err[-3000:]}"
    assert mpiexec_code in ({expected, 9, 0} if expected else {0}), f"mpiexec returned {mpiexec_code}:\n{err[-3000:]}"


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_packing_exactly_once_in_order(tmp_path, ranks):
    wf, record = workflow("packing", tmp_path)
    proc = run_pilot(ranks, wf, tmp_path, *NODE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(record)
    assert_exactly_once(records, PACKING_IDS)
    assert_order(records, PACKING_EDGES)
    peaks = peak_memory_by_node(records)
    agents = range(1, ranks) if ranks > 1 else [0]
    assert set(peaks) <= {f"{os.uname().nodename}/rank{r}" for r in agents}
    assert max(peaks.values()) <= 1000
    if ranks >= 3:
        assert len(peaks) >= 2, "work was not spread over the emulated nodes"
    queued = int(re.search(r"launches: 14, of which (\d+) queued ahead", proc.stderr).group(1))
    assert queued > 0, "the 0.15 s workers were not queued behind one another"
    # The last lines: every rank's CPU, and each agent rank's count of the attempts it started
    cpu = re.findall(r" rank (\d+) INFO .*; ([\d.]+) s of CPU$", proc.stderr, re.M)
    assert sorted(int(r) for r, _ in cpu) == list(range(ranks)) and all(float(s) > 0 for _, s in cpu)
    if ranks > 1:
        started = re.findall(r" rank \d+ INFO attempts started: (\d+);", proc.stderr)
        assert len(started) == ranks - 1 and sum(map(int, started)) == 14


def test_queue_ahead_off_sends_every_task_when_its_node_has_room(tmp_path):
    wf, record = workflow("packing", tmp_path)
    proc = run_pilot(3, wf, tmp_path, *NODE, "--queue-ahead", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launches: 14, of which 0 queued ahead" in proc.stderr
    assert max(peak_memory_by_node(read_records(record)).values()) <= 1000


def test_failures_classified_while_others_go_on(tmp_path):
    wf, record = workflow("failures", tmp_path)
    proc = run_pilot(3, wf, tmp_path, *NODE, wrapped=True)
    assert_exit(proc.returncode, tmp_path, 1, proc.stderr)
    assert_exactly_once(read_records(record), ["ok1", "ok2", "ok3", "ok4"])
    for task, kind in (("segv", "SIGNAL"), ("exit3", "EXIT"), ("slow", "TIMEOUT"), ("nocmd", "LAUNCH")):
        assert f"task {task} attempt 1 failed: {kind}" in proc.stderr


def test_oom_retried_with_scaled_request(tmp_path):
    wf, record = workflow("oom_retry", tmp_path)
    proc = run_pilot(2, wf, tmp_path, *NODE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_oom_retried(read_records(record), proc.stderr)


def test_bad_fit_exits_2_with_one_line(tmp_path):
    wf, _ = workflow("too_big", tmp_path)
    proc = run_pilot(2, wf, tmp_path, *NODE)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pilot: error: task huge requests 5000 MB")
    assert not (tmp_path / "fine.marker").exists()


def test_malformed_workflow_exits_2_with_one_line(tmp_path):
    wf = tmp_path / "bad.yaml"
    wf.write_text("tasks:\n  - id: a\n    command: [unclosed\n")
    proc = run_pilot(2, wf, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pilot: error:")


def _task_pids(folder: Path) -> list[int]:
    return [int(n) for p in folder.glob("*.marker") for n in p.read_text().split() if int(n) > 0]


def _signal_when(ranks: int, wf: Path, tmp_path: Path, node: list[str], ready, timeout: float, what: str,
                  signum: int = signal.SIGTERM, cmd: list[str] | None = None, env: dict | None = None):
    """Run the pilot (``cmd`` under ``env``, else :func:`wrapped_cmd` under MPICH) and send it
    ``signum`` once ``ready()`` returns something; (exit code, stderr, seconds from the signal
    to the exit, what ``ready()`` returned)."""
    before = shm_segments()
    proc = subprocess.Popen(cmd or wrapped_cmd(ranks, wf, tmp_path, *node), cwd=ROOT, env=env or wrapped_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        got = wait_for(ready, timeout, what=what)
        proc.send_signal(signum)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
        return proc.returncode, err, time.monotonic() - sent, got
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup_shm(before)


@pytest.mark.parametrize("ranks", [1, 3])
def test_sigterm_mid_run_exits_3_and_leaves_no_task(tmp_path, ranks):
    wf, _ = workflow("long", tmp_path)
    node = ["--node-per-rank", "--node-memory", "1000", "--node-cores", "8"]   # 6 tasks fit one node
    code, err, took, pids = _signal_when(
        ranks, wf, tmp_path, node, lambda: len(list(tmp_path.glob("*.marker"))) >= 6 and _task_pids(tmp_path),
        30, "six tasks running")
    assert_exit(code, tmp_path, 3, err)
    assert took < 10, f"took {took:.1f} s"
    assert len(pids) >= 7 and all(pid_gone(p) for p in pids)
    assert "draining: signal 15" in err


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_killed_agent_takes_the_processes_it_launched_with_it(tmp_path):
    """kill -9 of the agent rank: every process it launched dies with it (a parent-death signal
    set by the native launch), the shell of a string command included. What those processes
    started themselves (l3's child, the payload l4's shell runs) is not covered: a restart of the
    run kills it (test_a_restart_kills_what_tasks_of_a_killed_run_left_running); here the test
    kills it, by pid."""
    from pilot.runner import _children

    wf, _ = workflow("long", tmp_path)
    node = ["--node-per-rank", "--node-memory", "1000", "--node-cores", "8"]   # 6 tasks fit one node
    before = shm_segments()
    proc = subprocess.Popen(pilot_cmd(2, wf, tmp_path, *node), cwd=ROOT, env=mpi_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[int] = []
    try:
        wait_for(lambda: len(list(tmp_path.glob("*.marker"))) >= 6 and all(
            len(p.read_text().split()) == 3 for p in tmp_path.glob("*.marker")), 30, what="six tasks running")
        agent = _parent(int((tmp_path / "l1.marker").read_text().split()[0]))   # l1 is an argv task
        launched = _children("/proc", agent)
        started = launched + [int(n) for p in tmp_path.glob("*.marker") for n in p.read_text().split()]
        assert len(launched) == 6, launched
        os.kill(agent, signal.SIGKILL)
        for pid in launched:
            wait_for(lambda: pid_gone(pid), 10, what=f"launched process {pid} gone")
    finally:
        for pid in {p for p in started if p > 0}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()
        cleanup_shm(before)


def test_a_stopped_agent_is_taken_for_hung_and_the_run_exits_3(tmp_path):
    """SIGSTOP of an agent rank: rank 0 hears nothing from it for --agent-timeout, drains and
    leaves without it (exit 3) within seconds, instead of waiting for the wall time."""
    wf, _ = workflow("long", tmp_path)
    before = shm_segments()
    proc = subprocess.Popen(pilot_cmd(3, wf, tmp_path, *NODE, "--agent-timeout", "2"), cwd=ROOT, env=mpi_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped, pids = 0, []
    try:
        wait_for(lambda: len(list(tmp_path.glob("*.marker"))) >= 6 and all(
            len(p.read_text().split()) == 3 for p in tmp_path.glob("*.marker")), 30, what="six tasks running")
        pids = [int(n) for p in tmp_path.glob("*.marker") for n in p.read_text().split() if int(n) > 0]
        stopped = _parent(int((tmp_path / "l1.marker").read_text().split()[0]))   # l1's agent
        os.kill(stopped, signal.SIGSTOP)
        _, err = proc.communicate(timeout=60)
        assert re.search(r"agent rank \d sent nothing for \d+ s: taken for hung", err), err[-3000:]
        # rank 0's own exit; mpiexec reports it, or the SIGKILL it then sends the stopped rank
        assert "leaving without the unresponsive agents (exit 3)" in err
        assert proc.returncode in (3, 9), err[-3000:]
    finally:
        for pid in [stopped, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        cleanup_shm(before)


def test_idle_agents_say_they_are_alive(tmp_path):
    """Two 2.5 s tasks on four agent ranks with --agent-timeout 1: the agents without a task
    (and those with one) send nothing else for longer than that, yet none is taken for hung."""
    payload = ensure_payload()
    wf = tmp_path / "two.yaml"
    wf.write_text("requestMemory: 100\ntasks:\n" + "".join(
        f"  - {{id: s{i}, command: [{payload}, --sleep, '2.5']}}\n" for i in range(2)))
    proc = run_pilot(5, wf, tmp_path, *NODE, "--agent-timeout", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hung" not in proc.stderr


def short_workflow(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """300 independent tasks of 0.02 s that record themselves: (workflow, record file, ids)."""
    record = tmp_path / "records.txt"
    ids = [f"s{i:03d}" for i in range(300)]
    wf = tmp_path / "short.yaml"
    wf.write_text("requestMemory: 100\ntasks:\n" + "".join(
        f'  - {{id: {i}, command: ["{ensure_payload()}", "--sleep", "0.02", "--record", "{record}"]}}\n'
        for i in ids))
    return wf, record, ids


def test_sigterm_with_tasks_queued_ahead_exits_3_and_a_rerun_redoes_nothing_done(tmp_path):
    """Short tasks keep tasks queued behind running ones; a SIGTERM drops those unstarted and
    interrupts the running ones; the rerun finishes the rest and runs no task done before."""
    from pilot.checkpoint import load_checkpoint
    from pilot.events import State

    wf, record, ids = short_workflow(tmp_path)
    node = ["--node-per-rank", "--node-memory", "1000", "--node-cores", "2"]
    code, err, took, _ = _signal_when(3, wf, tmp_path, node, lambda: len(read_records(record)) >= 60,
                                       60, "60 tasks done")
    assert_exit(code, tmp_path, 3, err)
    assert took < 10, f"took {took:.1f} s"
    queued = int(re.search(r"launches: \d+, of which (\d+) queued ahead", err).group(1))
    assert queued > 0
    table = load_checkpoint(tmp_path / "ckpt.h5").table
    done_first = {ids[t] for t in range((len(ids))) if table.state[t] == State.DONE}
    assert 0 < len(done_first) < len(ids)
    assert not ((table.state == State.LAUNCHED) | (table.state == State.RUNNING)).any()
    first = len(read_records(record))

    again = run_pilot(3, wf, tmp_path, *node)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = {r.task for r in read_records(record)[first:]}
    assert not rerun & done_first, "a task done before the signal ran again"
    assert {r.task for r in read_records(record)} == set(ids)


def _logs_made(folder: Path) -> int:
    return sum(len(os.listdir(shard)) for shard in folder.glob("0*"))


def test_sigterm_while_agents_wait_in_their_lane_exits_3_with_no_attempt_lost(tmp_path):
    """Null tasks run in the agents' lanes, where the agents wait, the lane gathering ends and
    starting what is queued behind them. A SIGTERM (or the drain's Kill) ends such a wait: the
    agent reports what its lane gathered before it acts on its attempts, so the kill finds in
    the lane exactly what runs there, and the run drains and exits 3."""
    from pilot.checkpoint import load_checkpoint
    from pilot.events import State

    n = 4000
    wf = tmp_path / "null.yaml"
    wf.write_text("requestMemory: 10\ntasks:\n" + "".join(f'  - {{id: n{i:04d}, command: ["true"]}}\n'
                                                         for i in range(n)))
    node = ["--node-per-rank", "--node-memory", "1000", "--node-cores", "2"]
    code, err, took, _ = _signal_when(3, wf, tmp_path, node, lambda: _logs_made(tmp_path / "ckpt.h5.logs") >= 1000,
                                      60, "1000 attempts started")
    assert "Traceback" not in err, err[-3000:]
    assert_exit(code, tmp_path, 3, err)
    assert took < 10, f"took {took:.1f} s"
    table = load_checkpoint(tmp_path / "ckpt.h5").table
    assert 1000 <= (table.state == State.DONE).sum() < n
    assert not ((table.state == State.LAUNCHED) | (table.state == State.RUNNING)).any()


def test_walltime_drains_and_exits_3(tmp_path):
    wf, _ = workflow("long", tmp_path)
    began = time.monotonic()
    proc = run_pilot(3, wf, tmp_path, *NODE, "--walltime", "4", wrapped=True)
    assert_exit(proc.returncode, tmp_path, 3, proc.stderr)
    assert time.monotonic() - began < 30
    assert "draining: wall time" in proc.stderr
    pids = _task_pids(tmp_path)
    assert pids and all(pid_gone(p) for p in pids)


@pytest.mark.parametrize("args", [["missing.yaml"], ["packing", "--node-memory", "-5"]])
def test_usage_errors_print_one_line_from_all_ranks(tmp_path, args):
    wf = workflow(args[0], tmp_path)[0] if args[0] == "packing" else tmp_path / args[0]
    proc = run_pilot(3, wf, tmp_path, *args[1:])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pilot: error:"), proc.stderr
    assert not (tmp_path / "ckpt.h5").exists()


def _orphan_workflow(tmp_path: Path) -> Path:
    """One task: on its first run, a shell that starts ``sleep 600`` in the background (its pid
    in ``orphan``) and waits; once ``started`` exists, it exits 0 at once."""
    wf = tmp_path / "orphan.yaml"
    script = (f"[ -e {tmp_path}/started ] && exit 0; sleep 600 & echo $! > {tmp_path}/orphan.tmp; "
              f"mv {tmp_path}/orphan.tmp {tmp_path}/orphan; touch {tmp_path}/started; wait")
    wf.write_text(f"requestMemory: 100\ntasks:\n  - id: spawner\n    command: '{script}'\n")
    return wf


def _mpiexec_proxy_and_ranks(mpiexec: int) -> list[int]:
    """mpiexec, its hydra proxies (its children) and their children, the ranks."""
    from pilot.runner import _children

    proxies = _children("/proc", mpiexec)
    return [mpiexec, *proxies, *(rank for proxy in proxies for rank in _children("/proc", proxy))]


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_restart_kills_what_tasks_of_a_killed_run_left_running(tmp_path, ranks):
    """kill -9 of every pilot process (mpiexec and the ranks): the task's shell dies with its agent
    (parent-death signal), its background ``sleep`` outlives it (nothing ends it outside a Slurm
    step). The restart finds it by its PILOT_RUN tag and kills it before starting the task again."""
    wf = _orphan_workflow(tmp_path)
    orphan = 0
    before = shm_segments()
    proc = subprocess.Popen(pilot_cmd(ranks, wf, tmp_path, *NODE), cwd=ROOT, env=mpi_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        orphan = int(wait_for(lambda: (tmp_path / "orphan").exists() and (tmp_path / "orphan").read_text(),
                              30, what="the task's background sleep"))
        with open(f"/proc/{orphan}/environ", "rb") as f:
            assert b"\0PILOT_RUN=" in b"\0" + f.read()
        shell = _parent(orphan)
        for pid in _mpiexec_proxy_and_ranks(proc.pid):   # hydra puts each in a session of its own
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: pid_gone(shell), 10, what="the task's shell gone")
        assert not pid_gone(orphan), "the background sleep should outlive the killed run"

        again = run_pilot(ranks, wf, tmp_path, *NODE)
        assert again.returncode == 0, again.stderr[-3000:]
        assert pid_gone(orphan)
        assert f"killed 1 processes an earlier start of this run left on {socket.gethostname()} (pids {orphan})" \
            in again.stderr, again.stderr[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if orphan and not pid_gone(orphan):
            os.kill(orphan, signal.SIGKILL)
        cleanup_shm(before)


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_end_of_a_run_kills_what_left_its_tasks_process_groups(tmp_path, ranks):
    """A task that starts a daemon in a session of its own (out of reach of the end of its
    process group) and exits 0: the run ends with the daemon killed."""
    wf = tmp_path / "daemon.yaml"
    daemon_file = tmp_path / "daemon"   # written by the daemon, once in its own session
    inner = f'echo \\$\\$ > {daemon_file}.tmp; mv {daemon_file}.tmp {daemon_file}; exec sleep 600'
    script = f'setsid sh -c "{inner}" & while [ ! -e {daemon_file} ]; do sleep 0.01; done'
    wf.write_text(f"requestMemory: 100\ntasks:\n  - id: daemonizer\n    command: '{script}'\n")
    proc = run_pilot(ranks, wf, tmp_path, *NODE)
    daemon = int((tmp_path / "daemon").read_text())
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert pid_gone(daemon)
        assert f"killed 1 processes this run's tasks left on {socket.gethostname()} (pids {daemon})" in proc.stderr
    finally:
        if not pid_gone(daemon):
            os.kill(daemon, signal.SIGKILL)
