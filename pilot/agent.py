"""A node's agent: runs the attempts the master sends, watches them, reports back.

:class:`Agent` is the non-blocking core (used in-process by a one-rank master too);
:func:`pilot.agent_loop.run_agent` is the loop of an agent rank around it.

A ``RunTask`` with ``after`` set (queue-ahead, see :mod:`pilot.engine_queue`) waits here until
the attempt of task ``after`` ends, and starts as that end is reported, in its cores and memory;
if the run is stopping by then it is not started and is reported interrupted. Either way its
fate follows the report of the task it waited for, in the same order the master reads them.

A ``TaskStarted`` is sent ``STARTED_DELAY_S`` after the start, and never made if the attempt
ends first (its ``TaskFinished`` carries the start time; the engine takes a launched task
straight to its end), so a short task costs one message and one engine event.

The lane: where tasks start natively, an attempt (not LSST warm mode, and without a timeout or
with one over ``LANE_TIMEOUT_SAMPLES`` memory intervals) runs in ``pilot._launch.Lane``
(native/lane.c), which launches it, watches its pidfd and reaps it in C, and launches a
``RunTask`` queued behind it in the same call when it exits 0: a short task then costs the
agent's Python its result and little else; when every attempt is in the lane, the agent waits in
it (:meth:`Agent.wait` with a ``hold``), and a chain of such ends costs one Python turn per hold
rather than one per task. Whatever needs more than that takes the attempt out
of the lane into a :class:`~pilot.runner.Runner` first (a kill, a memory sample, which is due
only once it has run ``sample_interval``); an attempt that did not exit 0 is classified by a
Runner too, and what waited behind it starts as the report of its end says, from Python.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import sys
import time

from pilot import leftovers, nodes
from pilot.events import Failure, TaskFinished, new_task_finished, new_task_started
from pilot.protocol import ALL_TASKS, Begin, Kill, Recall, RunTask, Shutdown, succeeded_wire
from pilot.runner import OOM_READ_MAX_AGE, ProcessTable, Runner, WatchConfig, argv_of, lane_args, set_run_tag
from pilot.spawn import new_lane

log = logging.getLogger("pilot.agent")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOP_HOLD_S = 1.0    # how long a result killed by SIGTERM/SIGINT/SIGUSR1 waits for our own signal
STARTED_DELAY_S = 0.05   # a start is reported at the latest this long after it happened
# An attempt with a timeout runs in the lane only when the timeout is over this many memory
# intervals: it leaves the lane for a Runner, which watches its time, at its first sample,
# within two intervals of its start (samples come every interval) plus the loop's delay.
LANE_TIMEOUT_SAMPLES = 4


class Signals:
    """Remembers the first stop signal (SIGTERM, SIGINT, SIGUSR1) caught by this process."""

    def __init__(self):
        self.signum = 0

    def install(self) -> "Signals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._catch)
        return self

    def _catch(self, signum, _frame) -> None:
        if not self.signum:
            self.signum = signum


class Agent:
    """Runs attempts on one node; results go out through ``send(message)`` (and, with
    ``send_wire``, the lane's successes through ``send_wire(wire)``, in the wire form)."""

    def __init__(self, send, watch: WatchConfig = WatchConfig(), started_delay: float = STARTED_DELAY_S,
                 send_wire=None):
        self.send = send
        self.send_wire = send_wire
        self.watch = watch
        self.started_delay = started_delay
        self.runners: dict[tuple[int, int], Runner] = {}
        self.stopped = False
        self.stop_seen = False      # a stop signal reached this rank, or the master drains
        self.started = 0            # attempts launched (for the last log line)
        self.exit_code = 0          # the run's, as the master's Shutdown gives it
        self.tag: str | None = None   # what the attempts carry as PILOT_RUN (the master's Begin)
        self.held: list[tuple[float, TaskFinished]] = []
        # (task, attempt): start sent when due or not at all; a Runner, or for an attempt in the
        # lane the fields of its TaskStarted
        self.starts: dict[tuple[int, int], Runner | tuple] = {}
        self.waiting: dict[int, list[RunTask]] = {}   # task -> RunTasks queued to start when it ends
        self.unreported: set[int] = set()   # tasks running, queued or ended but not yet reported
        # A report left a slot idle (no task queued behind it here): rank 0 should see it at once
        # (see pilot.agent_loop.ReportHold and report_now).
        self.urgent = False
        self._starts_due = 0.0
        self._next_sample = 0.0
        self._lane_timeout_floor = LANE_TIMEOUT_SAMPLES * watch.sample_interval
        # Per loop turn the cost follows what happened, not how many attempts run (a node may
        # run hundreds): ended attempts come from one epoll of their pidfds, and only attempts
        # with a timeout or a kill in progress are looked at for time.
        self._epoll = select.epoll()
        self._key_of_fd: dict[int, tuple[int, int]] = {}
        self._timed: set[tuple[int, int]] = set()
        self._wake_fds: set[int] = set()
        self.rung = False   # a wake fd was readable when the attempts' epoll was last polled
        self.lane = new_lane()   # None where tasks do not start natively
        self.fast: dict[int, tuple[RunTask, int | None]] = {}   # task -> its attempt in the lane, OOM count before
        self.lane_queued: set[int] = set()   # tasks the lane launches when what they wait for exits 0
        self._lane_ready = False   # its descriptor was readable: something there ended
        self._lane_fd = -1 if self.lane is None else self.lane.fileno()
        if self.lane is not None:
            self._epoll.register(self._lane_fd, select.EPOLLIN)

    @property
    def report_now(self) -> bool:
        """Whether what this agent has sent must reach rank 0 at once, rung: a report left a
        slot idle, or the run is stopping."""
        return self.urgent or self.stop_seen or self.stopped

    @property
    def busy(self) -> bool:
        """Attempts running, or results or starts held back for a moment."""
        return bool(self.runners or self.fast or self.held or self.starts)

    @property
    def running(self) -> int:
        """Attempts running here."""
        return len(self.runners) + len(self.fast)

    def handle(self, message) -> None:
        """Act on a message from the master."""
        if isinstance(message, RunTask):
            if message.after >= 0 and message.after in self.unreported:
                self.waiting.setdefault(message.after, []).append(message)
                self.unreported.add(message.task)
                if message.after in self.fast or message.after in self.lane_queued:
                    self._lane_queue(message)
            else:   # not queued, or what it waited for has already been reported
                self._begin(message)
        elif isinstance(message, Kill):
            if message.task == ALL_TASKS and message.failure == Failure.INTERRUPTED:
                self.stop_seen = True
            self.kill(message.task, message.attempt, message.failure)
        elif isinstance(message, Recall):
            self._recall(message.task, message.attempt)
        elif isinstance(message, Shutdown):
            self.kill(ALL_TASKS, 0, Failure.INTERRUPTED, hard=True)
            self.stopped = True
            self.exit_code = message.code
        elif isinstance(message, Begin):
            self.begin(message.tag)
        else:
            log.warning("agent ignores %r", message)

    def begin(self, tag: str) -> None:
        """Kill what an earlier start of the run left on this host, then tag every attempt."""
        leftovers.sweep(tag, others=True)
        set_run_tag(tag)
        self.tag = tag

    def end(self) -> None:
        """At the end of the run: kill what this start's tasks left in sessions of their own on
        this host (this agent's LSST warm servers end first)."""
        if self.tag is not None:
            warm = sys.modules.get("pilot.lsst.warm")
            if warm is not None:
                warm.close_servers()
            leftovers.sweep(self.tag, others=False)

    def _recall(self, task: int, attempt: int) -> None:
        """Give a queued task back unstarted (the master runs it elsewhere); what waited behind
        it moves up behind what it waited for. A task already started is left alone: its own
        report follows."""
        for before, runs in self.waiting.items():
            run = next((r for r in runs if r.task == task and r.attempt == attempt), None)
            if run is not None:
                break
        else:
            return
        runs.remove(run)
        moved = self.waiting.pop(task, ())
        for unqueued in (run, *moved):   # the lane would launch these behind the wrong task
            self._lane_drop(unqueued.task)
        runs.extend(moved)
        if not runs:
            del self.waiting[before]
        self._send_result(_not_started(run))

    def _begin(self, run: RunTask) -> None:
        """Start ``run``, or report it interrupted if the run is stopping."""
        self._lane_drop(run.task)   # started or given back from here: the lane must not launch it
        if self.stop_seen or self.stopped:
            self._send_result(_not_started(run))
        else:
            self._start(run)

    def _start(self, run: RunTask) -> None:
        self.unreported.add(run.task)
        if self.lane is not None and run.task not in self.fast and self._lane_start(run):
            return
        runner = Runner(run, self.watch)
        failed = runner.launch()
        if failed is not None:
            self._send_result(failed)
            return
        key = (run.task, run.attempt)
        self.started += 1
        self.runners[key] = runner
        self._epoll.register(runner.pidfd, select.EPOLLIN)
        self._key_of_fd[runner.pidfd] = key
        if run.timeout:
            self._timed.add(key)
        if not self.starts:
            self._starts_due = time.monotonic() + self.started_delay
        self.starts[key] = runner

    def _send_starts(self) -> None:
        if self.starts:
            starts, self.starts = self.starts, {}
            for start in starts.values():
                self.send(start.started() if isinstance(start, Runner) else new_task_started(*start))

    # -- the lane (see the module docstring) --

    def _lane_start(self, run: RunTask) -> bool:
        """Launch ``run`` in the lane; False if the lane does not take it (a Runner launches it,
        and reports a launch error)."""
        try:
            args = lane_args(run, self._lane_timeout_floor)
            if args is None:
                return False
            oom_before = nodes.recent_oom_kill_count(OOM_READ_MAX_AGE)   # read before the launch
            pid, start = self.lane.start(run.task, run.attempt, *args)
        except (OSError, ValueError):
            return False
        self._in_lane(run, pid, start, oom_before)
        return True

    def _in_lane(self, run: RunTask, pid: int, start: float, oom_before: int | None) -> None:
        self.started += 1
        self.fast[run.task] = (run, oom_before)
        if not self.starts:
            self._starts_due = time.monotonic() + self.started_delay
        self.starts[(run.task, run.attempt)] = (run.task, run.attempt, run.node, start, pid)

    def _lane_queue(self, run: RunTask) -> None:
        """Have the lane launch ``run`` as soon as the attempt it waits for exits 0."""
        try:
            args = lane_args(run, self._lane_timeout_floor)
        except (OSError, ValueError):
            return   # the Runner that starts it reports why it cannot
        if args is not None and run.task not in self.fast:
            self.lane.queue(run.after, run.task, run.attempt, *args)
            self.lane_queued.add(run.task)

    def _lane_drop(self, task: int) -> None:
        if task in self.lane_queued:
            self.lane_queued.discard(task)
            self.lane.drop(task)

    def _lane_reap(self, now: float, gathered: list | None = None, oom_at_wait: int | None = None) -> bool:
        """Report what ended in the lane (``gathered`` by a wait in it, whose launches count OOM
        kills from ``oom_at_wait``, and what ended since), and note what it launched behind them."""
        if self.stop_seen or self.stopped:
            self.lane.stop()   # nothing queued starts once the run stops
        # The OOM-kill count before those launches: read before this reap launches any, or before
        # the wait that gathered some (an older count can only take another task's kill for this
        # one's, never miss this one's)
        if gathered:
            oom_launched = oom_at_wait
            ended = gathered + self.lane.reap()
        else:
            oom_launched = nodes.recent_oom_kill_count(OOM_READ_MAX_AGE)
            ended = self.lane.reap()
        for task, attempt, pid, status, cpu_s, start, end, launched in ended:
            run, oom_before = self.fast.pop(task)
            self.starts.pop((task, attempt), None)
            if status:
                runner = Runner.adopted(run, self.watch, pid, -1, start, 0.0, oom_before)
                self._report(runner.classify(status, cpu_s), now)   # what waits behind it starts from here
                continue
            lane_end = (launched, oom_launched)
            if self.send_wire is not None:
                self.send_wire(succeeded_wire(task, attempt, run.node, start, end, cpu_s, run.log))
                self._reported(task, lane_end)
            else:
                self._send_result(new_task_finished(task, attempt, run.node, Failure.NONE, 0, None, start, end,
                                                    0.0, cpu_s, run.log), lane_end)
        return bool(ended)

    def _after_lane_end(self, run: RunTask, lane_end: tuple) -> None:
        """``run`` waited for an attempt the lane reaped (``lane_end``: what the lane launched
        behind it, and the OOM-kill count read before those launches): it was launched then, or
        failed to, or it starts now (it was not queued in the lane)."""
        self.lane_queued.discard(run.task)   # the lane has forgotten it either way
        launched, oom_before = lane_end
        for task, attempt, pid, start, error in launched:
            if task == run.task and attempt == run.attempt:
                if pid:
                    self._in_lane(run, pid, start, oom_before)
                else:
                    runner = Runner(run, self.watch)
                    runner.start_time = start
                    self._send_result(runner.launch_failed(OSError(error, os.strerror(error), argv_of(run.command)[0])))
                return
        self._begin(run)

    def _take_from_lane(self, task: int) -> None:
        """Move the attempt of ``task`` from the lane to a Runner (to kill or sample it)."""
        run, oom_before = self.fast.pop(task)
        pid, pidfd, start, started_mono = self.lane.take(task, run.attempt)
        for queued in self.waiting.get(task, ()):
            self.lane_queued.discard(queued.task)   # the lane dropped them: they start from Python
        key = (task, run.attempt)
        runner = Runner.adopted(run, self.watch, pid, pidfd, start, started_mono, oom_before)
        self.runners[key] = runner
        self._epoll.register(pidfd, select.EPOLLIN)
        self._key_of_fd[pidfd] = key
        if run.timeout:
            self._timed.add(key)   # its deadline counts from its start in the lane
        if key in self.starts:
            self.starts[key] = runner

    def kill(self, task: int, attempt: int, failure: Failure, hard: bool = False) -> None:
        """Kill one attempt, or every running attempt when ``task == ALL_TASKS``."""
        for t in [t for t, (run, _) in self.fast.items()
                  if task == ALL_TASKS or (t == task and attempt in (0, run.attempt))]:
            self._take_from_lane(t)
        for (t, a), runner in self.runners.items():
            if task == ALL_TASKS or (t == task and (attempt == 0 or a == attempt)):
                runner.kill(failure, hard=hard)
                self._timed.add((t, a))   # a SIGTERM is followed by SIGKILL after the grace period

    def step(self) -> bool:
        """Watch memory and time, report finished attempts; True if any attempt ended."""
        now = time.monotonic()
        if (self.runners or self.fast) and now >= self._next_sample:
            self._sample()
            self._next_sample = now + self.watch.sample_interval
        for key in self._timed:
            self.runners[key].check_time(now)
        ended = self._release_held(now)
        if self.starts and now >= self._starts_due:
            self._send_starts()
        for key in self._exited():
            self._report(self._reap(key), now)
            ended = True
        if self._lane_ready:
            self._lane_ready = False
            ended = self._lane_reap(now) or ended
        return ended

    def _reap(self, key: tuple[int, int]) -> TaskFinished:
        """The result of an attempt whose pidfd is readable (it has ended); it is forgotten."""
        runner = self.runners.pop(key)
        # Out of the epoll before the runner closes the pidfd. Closing alone would not do: a task
        # being spawned may still hold a copy of the descriptor (a vfork child lets its parent go
        # on before exec closes it), and the stale entry would then report a new pidfd given the
        # same number as ended.
        self._epoll.unregister(runner.pidfd)
        del self._key_of_fd[runner.pidfd]
        self._timed.discard(key)
        return runner.poll(exited=True)

    def _report(self, result: TaskFinished, now: float) -> None:
        """Send a result (its start, if still held, goes unsaid); one killed by a stop signal
        waits briefly to learn whether the run stops.

        ``scancel`` and srun signal every process at once, so a task may die of the job's SIGTERM
        a moment before this rank handles the same signal: that attempt was interrupted, not failed.
        """
        self.starts.pop((result.task, result.attempt), None)
        if result.failure == Failure.SIGNAL and result.signal in STOP_SIGNALS:
            if self.stop_seen:
                result = dataclasses.replace(result, failure=Failure.INTERRUPTED)
            else:
                self.held.append((now + STOP_HOLD_S, result))
                return
        self._send_result(result)

    def _send_result(self, result: TaskFinished, lane_end: tuple | None = None) -> None:
        """Report an ended attempt, then begin what was queued behind it (``lane_end``: for an
        attempt the lane reaped, what it launched behind it then and the OOM-kill count those
        launches count from; see :meth:`_after_lane_end`)."""
        self.send(result)
        self._reported(result.task, lane_end)

    def _reported(self, task: int, lane_end: tuple | None) -> None:
        """``task``'s end is reported: begin what was queued behind it (see :meth:`_send_result`)."""
        self.unreported.discard(task)
        behind = self.waiting.pop(task, ())
        if not behind:
            self.urgent = True   # its slot is free for rank 0 to fill
        for run in behind:
            if lane_end is None:
                self._begin(run)
            else:
                self._after_lane_end(run, lane_end)

    def _release_held(self, now: float) -> bool:
        if not self.held:
            return False
        keep = []
        for deadline, result in self.held:
            if self.stop_seen:
                self._send_result(dataclasses.replace(result, failure=Failure.INTERRUPTED))
            elif now >= deadline:
                self._send_result(result)
            else:
                keep.append((deadline, result))
        released = len(keep) < len(self.held)
        self.held = keep
        return released

    def _exited(self) -> list[tuple[int, int]]:
        """Attempts whose main process has ended (their pidfd is readable), from one syscall that
        also tells whether the transport's doorbell rang (:attr:`rung`)."""
        if not self.runners and not self.fast and not self._wake_fds:
            return []
        keys, ended = self._key_of_fd, []
        for fd, _ in self._epoll.poll(0):
            key = keys.get(fd)
            if key is not None:
                ended.append(key)
            elif fd == self._lane_fd:
                self._lane_ready = True
            elif fd in self._wake_fds:
                self.rung = True
        return ended   # one pidfd per attempt, and epoll reports a ready fd once a call

    def _sample(self) -> None:
        # An attempt is first sampled one interval after it starts: short tasks cost no scan.
        now = time.monotonic()
        if self.fast:   # sampled from a Runner: attempts that ran long enough leave the lane
            for task, _, started_mono in self.lane.running():
                if now - started_mono >= self.watch.sample_interval:
                    self._take_from_lane(task)
        due = [r for r in self.runners.values() if now - r.started_mono >= self.watch.sample_interval]
        if due:
            table = ProcessTable.of_trees(r.pid for r in due)
            for runner in due:
                runner.observe(table.rss_mb(runner.pid, runner.pid))

    def watch_wake_fd(self, wake_fd: int | None) -> None:
        """Let ``wake_fd`` (the transport's doorbell) end :meth:`wait` and set :attr:`rung`."""
        if wake_fd is not None and wake_fd not in self._wake_fds:
            self._epoll.register(wake_fd, select.EPOLLIN)
            self._wake_fds.add(wake_fd)

    def wait(self, timeout: float, wake_fd: int | None = None, hold: float = 0.0) -> bool:
        """Sleep up to ``timeout`` s, waking as soon as an attempt ends, a check is due or
        ``wake_fd`` (the transport's) becomes readable; True if something did (maybe ``wake_fd``:
        the next :meth:`step` tells, through :attr:`rung`).

        ``hold`` > 0: when every attempt here runs in the lane, the lane itself waits, and for
        up to ``hold`` s after the first end it gathers the attempts that exit 0 with the next one
        launched behind them (see native/lane.c, reap_waiting); anything else ends the wait at
        once. What it gathered is reported before this returns (True then), so that this agent's
        attempts are the lane's again before anything acts on them (a kill, a queued task)."""
        self.watch_wake_fd(wake_fd)
        if self.runners or self.fast or self.starts:
            due = [self._next_sample] + [d for k in self._timed if (d := self.runners[k].next_deadline)]
            if self.starts:
                due.append(self._starts_due)
            timeout = min(timeout, min(due) - time.monotonic())
        if timeout <= 0:
            return False
        if hold > 0 and self.fast and not self.runners and not self.held and len(self._wake_fds) <= 1:
            # What it launches counts OOM kills from this read: shared by launches OOM_READ_MAX_AGE
            # apart at most, as elsewhere, and the wait is no longer than that either
            oom_before = nodes.recent_oom_kill_count(OOM_READ_MAX_AGE)
            wake = next(iter(self._wake_fds), -1)
            gathered = self.lane.reap(min(timeout, OOM_READ_MAX_AGE), wake, hold)
            if gathered:
                self._lane_reap(time.monotonic(), gathered, oom_before)
            return bool(gathered)
        # select, not epoll.poll: epoll rounds its timeout up to a millisecond, and the
        # transport's back-off after a ring asks for 50 us
        readable, _, _ = select.select([self._epoll], [], [], timeout)
        return bool(readable)


def _not_started(run: RunTask) -> TaskFinished:
    """The report of an attempt given back without being started (it does not count)."""
    now = time.time()
    return TaskFinished(run.task, run.attempt, run.node, Failure.INTERRUPTED, None, None, now, now)
