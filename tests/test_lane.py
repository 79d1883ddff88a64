"""The agent's lane (``pilot._launch.Lane``, native/lane.c): attempts launched, reaped and queued
behind one another in C, with real processes."""

from __future__ import annotations

import errno
import gc
import os
import select
import shutil
import signal
import time

import pytest

from pilot import spawn
from pilot.agent import Agent
from pilot.events import Failure, TaskFinished
from pilot.protocol import ALL_TASKS, Kill, RunTask
from pilot.runner import WatchConfig, lane_args, task_env
from tests.helpers import wait_for
from tests.test_runner import open_fds

pytestmark = pytest.mark.skipif(not spawn.native_usable(), reason="the lane needs the native launch")

TRUE, SH, SLEEP, ENV = "/bin/true", "/bin/sh", "/bin/sleep", "/usr/bin/env"


def pidfds() -> int:
    """How many pidfds this process holds (what a lane that leaked would leave)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        except OSError:
            pass   # the listing's own descriptor, closed by now
    return count


@pytest.fixture
def lane():
    return spawn.new_lane()


def _reaped(lane, count: int, timeout: float = 10.0) -> list[tuple]:
    """What ``lane.reap()`` gives until ``count`` attempts have ended."""
    got: list[tuple] = []

    def more():
        select.select([lane], [], [], 0.05)
        got.extend(lane.reap())
        return len(got) >= count
    wait_for(more, timeout, 0.0, f"{count} ends")
    return got


def test_an_attempt_is_launched_and_reaped_with_its_status_cpu_and_times(lane, tmp_path):
    log = str(tmp_path / "one.log")
    before = time.time()
    pid, start = lane.start(7, 2, SH, ["sh", "-c", "echo out; echo err >&2; exit 3"], [], log)
    assert len(lane) == 1 and [(t, a) for t, a, _ in lane.running()] == [(7, 2)]
    [(task, attempt, reaped_pid, status, cpu, start2, end, launched)] = _reaped(lane, 1)
    assert (task, attempt, reaped_pid, start2) == (7, 2, pid, start)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert before <= start <= end <= time.time() and cpu >= 0.0 and launched == ()
    assert open(log).read() == "out\nerr\n" and len(lane) == 0


def test_what_is_queued_behind_an_attempt_starts_when_it_exits_0_in_queue_order(lane, tmp_path):
    lane.start(1, 1, TRUE, ["true"], [], str(tmp_path / "1.log"))
    for task in (2, 3):
        lane.queue(1, task, 1, SH, ["sh", "-c", f"echo {task} >> {tmp_path / 'order'}"], [], str(tmp_path / f"{task}.log"))
    first = _reaped(lane, 1)[0]
    assert first[0] == 1 and first[3] == 0
    assert [(t, a) for t, a, pid, _, error in first[7] if pid > 0 and error == 0] == [(2, 1), (3, 1)]
    later = _reaped(lane, 2)
    assert sorted(r[0] for r in later) == [2, 3] and all(r[3] == 0 for r in later)


def test_nothing_queued_behind_a_failed_attempt_starts(lane, tmp_path):
    marker = tmp_path / "ran"
    lane.start(1, 1, SH, ["sh", "-c", "exit 1"], [], str(tmp_path / "1.log"))
    lane.queue(1, 2, 1, "/usr/bin/touch", ["touch", str(marker)], [], str(tmp_path / "2.log"))
    [ended] = _reaped(lane, 1)
    assert ended[7] == () and len(lane) == 0
    assert not lane.drop(2), "dropped with the failed attempt, not left to start later"
    assert not marker.exists()


def test_nothing_queued_starts_once_the_lane_stops(lane, tmp_path):
    lane.start(1, 1, TRUE, ["true"], [], str(tmp_path / "1.log"))
    lane.queue(1, 2, 1, TRUE, ["true"], [], str(tmp_path / "2.log"))
    lane.stop()
    assert _reaped(lane, 1)[0][7] == () and len(lane) == 0


def test_a_dropped_task_does_not_start(lane, tmp_path):
    lane.start(1, 1, TRUE, ["true"], [], str(tmp_path / "1.log"))
    lane.queue(1, 2, 1, TRUE, ["true"], [], str(tmp_path / "2.log"))
    lane.queue(1, 3, 1, TRUE, ["true"], [], str(tmp_path / "3.log"))
    assert lane.drop(2) and not lane.drop(2)
    assert [item[0] for item in _reaped(lane, 1)[0][7]] == [3]
    _reaped(lane, 1)


def test_a_queued_launch_that_fails_comes_back_with_its_errno(lane, tmp_path):
    lane.start(1, 1, TRUE, ["true"], [], str(tmp_path / "1.log"))
    lane.queue(1, 2, 1, str(tmp_path / "nowhere"), ["nowhere"], [], str(tmp_path / "2.log"))
    [(task, attempt, pid, _, error)] = _reaped(lane, 1)[0][7]
    assert (task, attempt, pid, error) == (2, 1, 0, errno.ENOENT) and len(lane) == 0


def test_a_launch_that_fails_at_once_raises_and_leaves_nothing_open(lane, tmp_path):
    fds, held = open_fds(), pidfds()
    with pytest.raises(FileNotFoundError) as raised:
        lane.start(1, 1, str(tmp_path / "nowhere"), ["nowhere"], [], str(tmp_path / "1.log"))
    assert raised.value.filename == str(tmp_path / "nowhere")
    with pytest.raises(OSError) as raised:
        lane.start(1, 1, TRUE, ["true"], [], str(tmp_path / "no" / "1.log"))
    assert raised.value.filename == str(tmp_path / "no" / "1.log")
    with pytest.raises(ValueError):
        lane.queue(0, 1, 1, TRUE, [], [], str(tmp_path / "1.log"))
    assert len(lane) == 0 and open_fds() <= fds and pidfds() == held   # none added (one may close: an earlier test's objects collected)


def test_a_base_environ_comes_before_a_launch_s_own_entries_and_lives_as_long_as_its_launches(lane, tmp_path):
    base = spawn._launch.Environ([b"A=1", "B=caf\u00e9"])
    assert len(base) == 2
    lane.start(1, 1, ENV, ["env"], [b"C=3"], str(tmp_path / "1.log"), base)
    lane.queue(1, 2, 1, ENV, ["env"], [], str(tmp_path / "2.log"), base)
    del base   # the queued launch holds what it needs
    gc.collect()
    [first] = _reaped(lane, 1)
    assert first[3] == 0 and [item[0] for item in first[7]] == [2]
    assert _reaped(lane, 1)[0][3] == 0
    assert (tmp_path / "1.log").read_text() == "A=1\nB=caf\u00e9\nC=3\n"
    assert (tmp_path / "2.log").read_text() == "A=1\nB=caf\u00e9\n"


def test_a_bad_environ_or_base_is_refused_and_launches_nothing(lane, tmp_path):
    with pytest.raises(TypeError):
        spawn._launch.Environ(5)
    with pytest.raises(ValueError):
        spawn._launch.Environ([b"A=\0x"])
    with pytest.raises(TypeError):
        lane.start(1, 1, TRUE, ["true"], [], str(tmp_path / "1.log"), [b"A=1"])
    with pytest.raises(TypeError):
        lane.queue(0, 1, 1, TRUE, ["true"], [], str(tmp_path / "1.log"), "A=1")
    assert len(lane) == 0 and not lane.drop(1) and not (tmp_path / "1.log").exists()


def test_the_lane_s_launch_environment_is_the_task_environment(tmp_path):
    """What the agent gives the lane (a base Environ shared by a label on a node, or a task's own
    env) makes the environment :func:`task_env` describes, each variable once."""
    from tests.test_runner import make_run

    for env in (None, {"EXTRA": "x y", "PATH": "/opt/x:/bin"}):
        run = make_run(tmp_path, ["env"], env=env, attempt=3)
        program, argv, entries, log, base = lane_args(run)
        assert (base is None) == bool(env)
        lane = spawn.new_lane()
        lane.start(run.task, run.attempt, ENV, argv, entries, log, base)
        assert _reaped(lane, 1)[0][3] == 0
        lines = open(log).read().splitlines()
        open(log, "w").close()
        assert len(lines) == len(task_env(run)) and dict(line.split("=", 1) for line in lines) == task_env(run)


def test_a_taken_attempt_leaves_with_its_pidfd_and_what_was_queued_behind_it_is_dropped(lane, tmp_path):
    pid, start = lane.start(1, 1, SLEEP, ["sleep", "30"], [], str(tmp_path / "1.log"))
    lane.queue(1, 2, 1, TRUE, ["true"], [], str(tmp_path / "2.log"))
    assert lane.take(1, 2) is None   # another attempt
    taken_pid, pidfd, taken_start, started_mono = lane.take(1, 1)
    assert (taken_pid, taken_start) == (pid, start) and started_mono <= time.monotonic()
    assert len(lane) == 0 and not lane.drop(2)
    os.killpg(pid, signal.SIGKILL)
    assert select.select([pidfd], [], [], 10)[0] == [pidfd]   # the pidfd is the caller's now
    assert lane.reap() == []
    os.waitpid(pid, 0)
    os.close(pidfd)


def test_ended_attempts_leave_no_descriptor_behind(lane, tmp_path):
    fds, held = open_fds(), pidfds()
    lane.start(0, 1, TRUE, ["true"], [], str(tmp_path / "0.log"))
    for task in range(1, 50):
        lane.queue(task - 1, task, 1, TRUE, ["true"], [], str(tmp_path / f"{task}.log"))
    assert sorted(r[0] for r in _reaped(lane, 50)) == list(range(50))
    assert open_fds() <= fds and pidfds() == held   # none added (one may close: an earlier test's objects collected)


# ---- the agent's use of it ----------------------------------------------------------


def _chain(lane, tmp_path, length: int, last=("true",)) -> None:
    """Task 1 started, tasks 2..length queued each behind the one before; the last runs ``last``."""
    lane.start(1, 1, TRUE, ["true"], [], str(tmp_path / "1.log"))
    for task in range(2, length + 1):
        argv = list(last) if task == length else ["true"]
        lane.queue(task - 1, task, 1, shutil.which(argv[0]), argv, [], str(tmp_path / f"{task}.log"))


def test_a_waiting_reap_gathers_a_chain_of_successes_until_its_hold(lane, tmp_path):
    _chain(lane, tmp_path, 6, last=("sleep", "30"))
    began = time.monotonic()
    got = lane.reap(10.0, -1, 1.0)
    waited = time.monotonic() - began
    try:
        assert [r[0] for r in got] == [1, 2, 3, 4, 5], "every plain success, in order, in one call"
        assert all(r[3] == 0 and [item[0] for item in r[7]] == [r[0] + 1] for r in got)
        assert 1.0 <= waited < 5.0, "it returned a hold after the first end, not at the timeout"
        assert [t for t, _, _ in lane.running()] == [6]
    finally:
        _kill_taken(lane, 6)


def test_a_waiting_reap_returns_at_once_for_an_end_the_caller_must_see(lane, tmp_path):
    """A failure, a success with nothing queued behind it (its slot goes idle), or one whose
    queued launch fails ends the wait as it is reaped, while another attempt still runs: the
    chain's ends before it come with it."""
    lane.start(10, 1, SLEEP, ["sleep", "30"], [], str(tmp_path / "10.log"))
    try:
        for last, status in ((("false",), 1 << 8), (("true",), 0)):
            _chain(lane, tmp_path, 3, last=last)
            began = time.monotonic()
            got = lane.reap(30.0, -1, 30.0)
            assert time.monotonic() - began < 10.0
            assert [(r[0], r[3]) for r in got] == [(1, 0), (2, 0), (3, status)] and got[2][7] == ()
            assert [t for t, _, _ in lane.running()] == [10]
        # a launch behind an end that fails ends the wait too
        lane.start(1, 1, TRUE, ["true"], [], str(tmp_path / "1.log"))
        lane.queue(1, 2, 1, str(tmp_path / "nowhere"), ["nowhere"], [], str(tmp_path / "2.log"))
        began = time.monotonic()
        [(task, _, _, status, _, _, _, launched)] = lane.reap(30.0, -1, 30.0)
        assert time.monotonic() - began < 10.0
        assert (task, status) == (1, 0) and [(t, pid, error) for t, _, pid, _, error in launched] == [(2, 0, errno.ENOENT)]
        assert [t for t, _, _ in lane.running()] == [10]
    finally:
        _kill_taken(lane, 10)


def test_a_waiting_reap_returns_when_its_wake_fd_is_readable_or_at_its_timeout(lane, tmp_path):
    lane.start(1, 1, SLEEP, ["sleep", "30"], [], str(tmp_path / "1.log"))
    read, write = os.pipe()
    try:
        began = time.monotonic()
        assert lane.reap(0.2, read, 1.0) == [] and 0.2 <= time.monotonic() - began < 5.0
        os.write(write, b"x")
        began = time.monotonic()
        assert lane.reap(30.0, read, 1.0) == [] and time.monotonic() - began < 5.0
    finally:
        os.close(read)
        os.close(write)
        _kill_taken(lane, 1)


def _kill_taken(lane, task: int) -> None:
    """Take attempt 1 of ``task`` out of the lane, kill it and wait for it."""
    pid, pidfd, _, _ = lane.take(task, 1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(pidfd)


def _run(tmp_path, task, command, after=-1, timeout=0.0) -> RunTask:
    return RunTask(task, 1, 0, f"t{task}", "lbl", "n0", command, None, str(tmp_path / f"t{task}.log"),
                   timeout, 100, 1, after)


def _results(agent, sent, count):
    def step():
        if not agent.step():
            agent.wait(0.05)
        done = [m for m in sent if isinstance(m, TaskFinished)]
        return done if len(done) >= count else None
    return wait_for(step, 20, 0.0, f"{count} results")


def test_an_agent_runs_in_a_runner_only_attempts_with_a_timeout_too_short_for_the_lane(tmp_path):
    """With memory samples every 0.5 s, a timeout of 2 s or less is a Runner's to watch from the
    start; a plain attempt and one with a longer timeout run in the lane."""
    sent = []
    agent = Agent(sent.append, WatchConfig(sample_interval=0.5))
    agent.handle(_run(tmp_path, 1, ["sleep", "30"]))
    agent.handle(_run(tmp_path, 2, ["sleep", "30"], timeout=2.0))
    agent.handle(_run(tmp_path, 3, ["true"], after=1))
    agent.handle(_run(tmp_path, 4, ["sleep", "30"], timeout=2.5))
    try:
        assert set(agent.fast) == {1, 4} and list(agent.runners) == [(2, 1)] and agent.lane_queued == {3}
        assert agent.running == 3
    finally:
        agent.kill(ALL_TASKS, 0, Failure.INTERRUPTED, hard=True)
        agent.stop_seen = True
    results = _results(agent, sent, 4)
    assert sorted((r.task, r.failure) for r in results) == [(1, Failure.INTERRUPTED), (2, Failure.INTERRUPTED),
                                                             (3, Failure.INTERRUPTED), (4, Failure.INTERRUPTED)]
    assert not agent.busy and not agent.lane_queued and len(agent.lane) == 0


def test_a_chain_queued_in_the_lane_runs_in_order_and_a_failure_stops_the_lane_starting_the_rest(tmp_path):
    sent, order = [], tmp_path / "order"
    agent = Agent(sent.append, WatchConfig())
    agent.handle(_run(tmp_path, 1, ["sh", "-c", f"echo 1 >> {order}"]))
    agent.handle(_run(tmp_path, 2, ["sh", "-c", f"echo 2 >> {order}; exit 4"], after=1))
    agent.handle(_run(tmp_path, 3, ["sh", "-c", f"echo 3 >> {order}"], after=2))
    results = _results(agent, sent, 3)
    assert [(r.task, r.failure, r.exit_code) for r in results] == [(1, Failure.NONE, 0), (2, Failure.EXIT, 4),
                                                                    (3, Failure.NONE, 0)]
    assert order.read_text().split() == ["1", "2", "3"]   # 3 started from Python, after 2's report
    assert all(r.start <= r.end for r in results) and results[1].end <= results[2].start
    assert not agent.busy and not agent.unreported and not agent.lane_queued


def test_an_agent_waiting_in_the_lane_reports_the_chain_it_gathered_with_oom_counts_read_before(tmp_path, monkeypatch):
    """``wait(hold=...)`` lets the lane run a chain of short attempts with no Python turn between
    them; the next step reports them in order, and what the lane launched meanwhile counts
    kernel OOM kills from the count read before the wait (never from one read after its launch)."""
    import pilot.agent

    reads = iter(range(100, 200))
    monkeypatch.setattr(pilot.agent.nodes, "recent_oom_kill_count", lambda max_age=0.01: next(reads))
    monkeypatch.setattr(pilot.agent, "OOM_READ_MAX_AGE", 30.0)   # the wait may last its hold
    sent = []
    agent = Agent(sent.append, WatchConfig(sample_interval=30.0), started_delay=30.0)
    agent.handle(_run(tmp_path, 1, ["sleep", "0.2"]))   # still running at the first step
    agent.handle(_run(tmp_path, 2, ["true"], after=1))
    agent.handle(_run(tmp_path, 3, ["sleep", "30"], after=2))
    try:
        agent.step()   # as the agent's loop does before it waits: the first memory sample is set
        assert not sent and next(reads) == 101   # one read, at task 1's launch
        began = time.monotonic()
        assert agent.wait(10.0, hold=0.5)
        assert 0.5 <= time.monotonic() - began < 5.0
        # reported as the wait returns: the agent's attempts are the lane's again
        assert [(m.task, m.failure) for m in sent] == [(1, Failure.NONE), (2, Failure.NONE)]
        assert set(agent.fast) == {3} and [t for t, _, _ in agent.lane.running()] == [3]
        assert agent.fast[3][1] == 102, "the count read before the wait, not one after the launch"
        assert not agent.unreported - {3} and not agent.waiting
    finally:
        agent.kill(ALL_TASKS, 0, Failure.INTERRUPTED, hard=True)
        agent.stop_seen = True
    assert [(r.task, r.failure) for r in _results(agent, sent, 3)][2:] == [(3, Failure.INTERRUPTED)]


def test_a_long_attempt_leaves_the_lane_to_be_sampled_and_is_killed_over_its_memory(tmp_path):
    sent = []
    agent = Agent(sent.append, WatchConfig(sample_interval=0.1))
    hog = ["python3", "-c", "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"]
    agent.handle(_run(tmp_path, 1, hog))
    assert set(agent.fast) == {1}
    [result] = _results(agent, sent, 1)
    assert result.failure == Failure.OOM and result.peak_rss_mb > 100
    assert not agent.fast and len(agent.lane) == 0


def test_a_timeout_is_kept_after_the_attempt_leaves_the_lane_counted_from_its_start(tmp_path):
    sent = []
    agent = Agent(sent.append, WatchConfig(sample_interval=0.05, kill_grace=0.5))
    agent.handle(_run(tmp_path, 1, ["sleep", "30"], timeout=0.6))
    assert set(agent.fast) == {1}
    wait_for(lambda: agent.step() or agent.runners, 5, 0.01, "the attempt's first sample")
    assert not agent.fast and list(agent.runners) == [(1, 1)]
    [result] = _results(agent, sent, 1)
    assert result.failure == Failure.TIMEOUT
    assert 0.6 <= result.end - result.start < 0.6 + 0.5 + 2.0   # the timeout, the grace, the loop's slack
    assert not agent.busy and len(agent.lane) == 0


def test_a_kill_takes_the_attempt_out_of_the_lane(tmp_path):
    sent = []
    agent = Agent(sent.append, WatchConfig(kill_grace=0.5))
    agent.handle(_run(tmp_path, 1, ["sleep", "30"]))
    agent.handle(_run(tmp_path, 2, ["true"], after=1))
    agent.handle(Kill(1, 1, Failure.TIMEOUT))
    assert not agent.fast and list(agent.runners) == [(1, 1)] and not agent.lane_queued
    results = _results(agent, sent, 2)
    assert [(r.task, r.failure) for r in results] == [(1, Failure.TIMEOUT), (2, Failure.NONE)]


def test_without_the_lane_every_attempt_runs_in_a_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("PILOT_LANE", "0")
    sent = []
    agent = Agent(sent.append, WatchConfig())
    assert agent.lane is None
    agent.handle(_run(tmp_path, 1, ["true"]))
    agent.handle(_run(tmp_path, 2, ["true"], after=1))
    assert list(agent.runners) == [(1, 1)] and not agent.fast
    assert [(r.task, r.failure) for r in _results(agent, sent, 2)] == [(1, Failure.NONE), (2, Failure.NONE)]
