"""The agent's reports: starts held back briefly, and tasks that die of the job's own stop signal
(scancel signals every process)."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

from pilot.agent import STARTED_DELAY_S, Agent
from pilot.agent_loop import RING_WINDOW_S, Prober, ReportHold
from pilot.events import Failure, TaskFinished, TaskStarted
from pilot.protocol import ALL_TASKS, Alive, Kill, Recall, RunTask
from pilot.runner import WatchConfig
from pilot.transport import LocalHub
from tests.helpers import wait_for


def _run(tmp_path, task=1) -> RunTask:
    return RunTask(task, 1, 0, f"t{task}", "lbl", "n0", ["sleep", "30"], None,
                   str(tmp_path / f"t{task}.log"), 0.0, 100, 1)


def _started_agent(tmp_path, sent):
    agent = Agent(sent.append, WatchConfig())
    agent.handle(_run(tmp_path))
    started = wait_for(lambda: agent.step() or next((m for m in sent if isinstance(m, TaskStarted)), None),
                       10, 0.01, what="start")
    return agent, started


def _finished(agent, sent):
    def step():
        agent.step()
        return next((m for m in sent if isinstance(m, TaskFinished)), None)
    return wait_for(step, 10, 0.01, "result")


def test_sigterm_from_outside_is_a_failure_when_the_run_goes_on(tmp_path):
    sent = []
    agent, started = _started_agent(tmp_path, sent)
    os.killpg(started.pid, signal.SIGTERM)
    result = _finished(agent, sent)
    assert result.failure == Failure.SIGNAL and result.signal == signal.SIGTERM


def test_sigterm_just_before_the_drain_is_an_interruption(tmp_path):
    sent = []
    agent, started = _started_agent(tmp_path, sent)
    os.killpg(started.pid, signal.SIGTERM)
    wait_for(lambda: agent.step() or agent.held, 10, 0.01, "held result")
    assert not any(isinstance(m, TaskFinished) for m in sent)   # held back, not yet reported
    agent.handle(Kill(ALL_TASKS, 0, Failure.INTERRUPTED))        # the drain arrives
    result = _finished(agent, sent)
    assert result.failure == Failure.INTERRUPTED and not agent.busy


def test_wait_ends_when_the_transports_wake_fd_becomes_readable(tmp_path):
    sent = []
    agent = Agent(sent.append, WatchConfig(sample_interval=3600.0))
    agent.handle(_run(tmp_path))   # a 30 s task, no sample due soon: only the wake fd can end the wait
    agent.step()
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"!")
        began = time.monotonic()
        agent.wait(60.0, read_end)
        assert time.monotonic() - began < 30.0, "the wait ignored its wake fd"
    finally:
        os.close(read_end)
        os.close(write_end)
        agent.kill(ALL_TASKS, 0, Failure.INTERRUPTED, hard=True)
        _finished(agent, sent)


def test_a_short_task_is_reported_by_its_result_alone_and_other_starts_stay_held(tmp_path):
    sent = []
    agent = Agent(sent.append, WatchConfig(), started_delay=3600.0)   # no start falls due on a slow machine
    agent.handle(_run(tmp_path, task=2))   # 30 s: its start is held
    agent.handle(RunTask(1, 1, 0, "t1", "lbl", "n0", ["true"], None, str(tmp_path / "t1.log"), 0.0, 100, 1))
    assert sent == []   # starts wait
    try:
        result = _finished(agent, sent)
        assert [(type(m), m.task) for m in sent] == [(TaskFinished, 1)]
        assert list(agent.starts) == [(2, 1)]
        assert result.start <= result.end   # the result carries the start time
    finally:
        agent.kill(ALL_TASKS, 0, Failure.INTERRUPTED, hard=True)
        wait_for(lambda: agent.step() or not agent.busy, 10, 0.01, "the long task's end")


def test_a_long_tasks_start_is_reported_once_its_delay_has_passed(tmp_path):
    sent = []
    handed = time.monotonic()
    agent, started = _started_agent(tmp_path, sent)
    try:
        assert time.monotonic() - handed >= STARTED_DELAY_S
        assert sent == [started] and agent.busy
    finally:
        agent.kill(ALL_TASKS, 0, Failure.INTERRUPTED, hard=True)
        _finished(agent, sent)


def test_hundreds_of_short_attempts_are_each_reported_once(tmp_path):
    """Pidfd numbers come back with each new attempt: every end must be seen once, by its own attempt."""
    sent, count, slots = [], 400, 8
    agent = Agent(sent.append, WatchConfig())
    started = 0

    def step():
        nonlocal started
        while started < count and agent.running < slots:
            agent.handle(RunTask(started, 1, 0, f"t{started}", "lbl", "n0", ["true"], None,
                                 str(tmp_path / f"t{started}.log"), 0.0, 100, 1))
            started += 1
        if not agent.step():
            agent.wait(0.05)
        return sum(isinstance(m, TaskFinished) for m in sent) >= count

    wait_for(step, 120, 0.0, "every result")
    results = [m for m in sent if isinstance(m, TaskFinished)]
    assert sorted(m.task for m in results) == list(range(count))
    assert all(m.failure == Failure.NONE for m in results) and not agent.busy


def _queued(tmp_path, task, after, command) -> RunTask:
    """A task that writes its start time and waits behind ``after`` (queue-ahead)."""
    return RunTask(task, 1, 0, f"t{task}", "lbl", "n0", command, None, str(tmp_path / f"t{task}.log"),
                   0.0, 100, 1, after)


def _results(agent, sent, count):
    def step():
        agent.step()
        done = [m for m in sent if isinstance(m, TaskFinished)]
        return done if len(done) >= count else None
    return wait_for(step, 10, 0.01, f"{count} results")


def test_a_queued_task_starts_when_its_predecessor_ends_and_is_reported_after_it(tmp_path):
    stamp = "import sys, time; open(sys.argv[1], 'w').write(repr(time.time()))"
    sent = []
    agent = Agent(sent.append, WatchConfig())
    first = tmp_path / "first.end"
    agent.handle(_queued(tmp_path, 1, -1, ["sh", "-c", f"sleep 0.3; python3 -c \"{stamp}\" {first}"]))
    agent.handle(_queued(tmp_path, 2, 1, ["python3", "-c", stamp, str(tmp_path / "second.start")]))
    agent.handle(_queued(tmp_path, 3, 2, ["true"]))
    assert set(agent.waiting) == {1, 2} and agent.running == 1   # one runs, two wait
    results = _results(agent, sent, 3)
    assert [r.task for r in results] == [1, 2, 3]
    assert all(r.failure == Failure.NONE for r in results)
    assert float(first.read_text()) <= float((tmp_path / "second.start").read_text())
    assert results[0].end <= results[1].start and results[1].end <= results[2].start
    assert not agent.busy and not agent.unreported


def test_a_task_queued_behind_one_already_reported_starts_at_once(tmp_path):
    sent = []
    agent = Agent(sent.append, WatchConfig())
    agent.handle(_queued(tmp_path, 1, -1, ["true"]))
    _results(agent, sent, 1)
    agent.handle(_queued(tmp_path, 2, 1, ["true"]))
    assert agent.running == 1 and not agent.waiting
    assert [r.task for r in _results(agent, sent, 2)] == [1, 2]


def test_queued_tasks_are_reported_interrupted_unstarted_when_the_run_stops(tmp_path):
    sent = []
    agent = Agent(sent.append, WatchConfig())
    agent.handle(_queued(tmp_path, 1, -1, ["sleep", "30"]))
    agent.handle(_queued(tmp_path, 2, 1, ["touch", str(tmp_path / "ran")]))
    agent.handle(Kill(ALL_TASKS, 0, Failure.INTERRUPTED))
    results = _results(agent, sent, 2)
    assert [(r.task, r.failure) for r in results] == [(1, Failure.INTERRUPTED), (2, Failure.INTERRUPTED)]
    assert not (tmp_path / "ran").exists() and not agent.busy


def test_a_recalled_task_is_reported_unstarted_and_the_one_behind_it_moves_up(tmp_path):
    sent = []
    agent = Agent(sent.append, WatchConfig())
    agent.handle(_queued(tmp_path, 1, -1, ["sleep", "30"]))
    agent.handle(_queued(tmp_path, 2, 1, ["touch", str(tmp_path / "two")]))
    agent.handle(_queued(tmp_path, 3, 2, ["touch", str(tmp_path / "three")]))
    agent.handle(Recall(2, 1))
    assert [(m.task, m.failure) for m in sent if isinstance(m, TaskFinished)] == [(2, Failure.INTERRUPTED)]
    assert [r.task for r in agent.waiting[1]] == [3] and 2 not in agent.waiting
    agent.handle(Recall(1, 1))   # running: not queued here, left alone
    assert agent.running == 1
    agent.handle(Kill(ALL_TASKS, 0, Failure.INTERRUPTED))
    results = _results(agent, sent, 3)
    assert [(r.task, r.failure) for r in results] == [(2, Failure.INTERRUPTED), (1, Failure.INTERRUPTED),
                                                      (3, Failure.INTERRUPTED)]
    assert not (tmp_path / "two").exists() and not (tmp_path / "three").exists()


def test_a_report_is_urgent_only_when_no_queued_task_takes_its_slot(tmp_path):
    sent = []
    agent = Agent(sent.append, WatchConfig())
    agent.handle(_queued(tmp_path, 1, -1, ["true"]))
    agent.handle(_queued(tmp_path, 2, 1, ["true"]))
    _results(agent, sent, 1)
    assert [m.task for m in sent] == [1] and not agent.urgent   # task 2 took the slot at once
    _results(agent, sent, 2)
    assert agent.urgent   # nothing followed task 2: rank 0 has a slot to fill


def test_held_reports_leave_together_when_the_hold_ends_or_one_is_urgent():
    hub = LocalHub(2)
    master, agent_end = hub.endpoint(0), hub.endpoint(1)
    agent = Agent(lambda message: None, WatchConfig())
    hold = ReportHold(agent_end, lambda: agent, hold=3600.0)
    hold.send(Alive(1))
    hold.send(Alive(1))
    assert 0 < hold.due() <= 3600.0
    hold.flush_if_due()
    assert master.poll(0.0) is None   # held
    agent.urgent = True
    assert hold.due() == 0.0
    hold.flush_if_due()
    assert [master.poll(0.0)[1], master.poll(0.0)[1]] == [Alive(1), Alive(1)]
    assert hold.due() is None and not agent.urgent

    short = ReportHold(agent_end, lambda: agent, hold=0.01)
    short.send(Alive(1))
    wait_for(lambda: short.due() == 0.0, 10, 0.005, "the end of the hold")
    short.flush_if_due()
    assert master.poll(0.0)[1] == Alive(1)

    # what the lane gathered has waited its hold there: it leaves with the next flush, then the
    # hold counts again
    hold.aged = True
    assert hold.due() is None   # nothing held yet
    hold.send(Alive(1))
    assert hold.due() == 0.0
    hold.flush_if_due()
    assert master.poll(0.0)[1] == Alive(1) and not hold.aged
    hold.send(Alive(1))
    assert hold.due() > 0.0


def test_a_busy_agent_probes_after_a_ring_until_a_message_comes_else_at_its_interval():
    prober = Prober(SimpleNamespace(wake_fd=5, backoff=SimpleNamespace(max_sleep=0.02)))
    assert prober.due(False, 0.0)   # first look
    prober.probed(False, 0.0)
    assert not prober.due(False, 0.001)   # no ring: no probe
    assert prober.due(True, 0.001)         # a ring
    prober.probed(False, 0.001)            # its message is not visible yet...
    assert prober.due(False, 0.002)        # ...so the next turn probes again
    prober.probed(True, 0.002)             # found
    assert not prober.due(False, 0.003)
    assert prober.due(False, 0.0221)       # the interval: a lost ring costs no more than this


def test_a_ring_whose_message_never_shows_stops_the_eager_probes_after_a_window():
    prober = Prober(SimpleNamespace(wake_fd=5, backoff=SimpleNamespace(max_sleep=1.0)))
    assert prober.due(True, 0.0)
    prober.probed(False, 0.0)
    assert prober.due(False, RING_WINDOW_S / 2)
    prober.probed(False, RING_WINDOW_S / 2)
    assert not prober.due(False, RING_WINDOW_S * 1.01)


def test_without_a_doorbell_a_busy_agent_probes_on_every_turn():
    prober = Prober(SimpleNamespace(wake_fd=None, backoff=SimpleNamespace(max_sleep=0.02)))
    prober.probed(False, 0.0)
    assert prober.due(False, 0.0001)
