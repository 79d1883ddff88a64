"""The loop of an agent rank around its :class:`~pilot.agent.Agent`.

While attempts run, the loop waits on their pidfds and the lane (a finished task wakes it at
once) and on the transport's ``wake_fd`` (a message from the master wakes it at once), and
probes the transport between waits with the transport's back-off; when idle it only polls the
transport. When every attempt runs in the lane it waits in the lane, which reaps the attempts
that exit 0 and starts what is queued behind them by itself for up to ``REPORT_HOLD_S`` (see
:meth:`pilot.agent.Agent.wait`): their reports leave together after that wait.

Messages to the master are few. Each loop iteration's messages leave as one batch, and reports
of attempts whose slot went straight to a task queued behind them may wait up to
``REPORT_HOLD_S`` to leave with later ones (:class:`ReportHold`): rank 0 takes its messages
every ``PACE_S`` anyway, so one message for several ends spares both sides a send and a receive
per task. A busy agent probes MPI only when its doorbell rang, or now and then
(:class:`Prober`). Besides, every quarter of ``pilot run --agent-timeout`` an agent sends
``Alive``: rank 0 takes an agent rank it hears nothing from for that long for hung (see
:meth:`pilot.master.Master._check_liveness`).
"""

from __future__ import annotations

import gc
import logging
import os
import time

from pilot.agent import Agent, Signals
from pilot.errors import EXIT_USAGE
from pilot.events import Failure
from pilot.nodes import NodeInfo
from pilot.protocol import ALL_TASKS, Alive, Hello, Interrupted
from pilot.runner import WatchConfig
from pilot.transport import Transport

log = logging.getLogger("pilot.agent")
IDLE_POLL_S = 0.25   # how often an idle loop looks at signals (the transport sleeps in between)
ALIVE_INTERVAL_S = 30.0  # an agent says it is alive this often (`pilot run --agent-timeout` / 4)
REPORT_HOLD_S = 0.005   # reports that free no slot wait at most this long (half rank 0's PACE_S)
RING_WINDOW_S = 0.005   # after a ring, a busy agent probes on every turn this long (see Prober)


class Prober:
    """When a busy agent probes the transport for messages: after its doorbell rang (and then on
    every turn for ``RING_WINDOW_S`` until a message comes: one may be a moment behind its
    ring), else every ``interval`` seconds, for a lost ring or a peer without a doorbell. A turn
    that follows a task's end thus costs no probe, which in MPI also runs the progress engine."""

    def __init__(self, transport: Transport):
        self.always = transport.wake_fd is None   # nothing rings: probe on every turn
        self.interval = transport.backoff.max_sleep
        self.next = 0.0
        self.eager_until = 0.0

    def due(self, rung: bool, now: float) -> bool:
        if rung:
            self.eager_until = now + RING_WINDOW_S
        return self.always or now < self.eager_until or now >= self.next

    def probed(self, found: bool, now: float) -> None:
        self.next = now + self.interval
        if found:
            self.eager_until = 0.0


class ReportHold:
    """Messages to rank 0 leave together: at once when the agent must report now
    (:attr:`Agent.report_now`), else ``hold`` seconds after the first of them at the latest."""

    def __init__(self, transport: Transport, agent_of, hold: float = REPORT_HOLD_S):
        self.transport = transport
        self.agent_of = agent_of   # the Agent whose urgency counts (set after it is made)
        self.hold = hold
        self.since: float | None = None   # when the oldest unsent message was queued
        self.aged = False   # what is queued next has waited its hold already (in the lane)

    def send(self, message) -> None:
        self.transport.send(0, message)
        if self.since is None:
            self.since = time.monotonic()

    def send_wire(self, wire: tuple) -> None:
        """:meth:`send` of a message in wire form."""
        self.transport.send_wire(0, wire)
        if self.since is None:
            self.since = time.monotonic()

    def due(self) -> float | None:
        """Seconds until the held messages must leave (0: now), or None if none are held."""
        if self.since is None:
            return None
        if self.aged or self.agent_of().report_now:
            return 0.0
        return max(0.0, self.since + self.hold - time.monotonic())

    def flush_if_due(self) -> None:
        if self.due() == 0.0:
            self.flush()

    def flush(self) -> None:
        """Send what is held; rank 0's doorbell rings only for urgent messages: it finds the
        others at its next paced turn, and a ring would cut its pace short."""
        agent = self.agent_of()
        self.transport.flush(ring=agent.report_now)
        self.since = None
        self.aged = False
        agent.urgent = False


def run_agent(transport: Transport, info: NodeInfo, watch: WatchConfig = WatchConfig(),
              signals: Signals | None = None, alive_interval: float = ALIVE_INTERVAL_S) -> int:
    """The loop of an agent rank: say Hello, then run what the master sends until Shutdown.

    Returns 0: rank 0 alone carries the run's exit code. A launcher that ends the whole step
    when a rank exits non-zero (``srun --kill-on-bad-exit``, which the site files use so that a
    dead rank cannot stall a job) would otherwise kill rank 0 while it closes the checkpoint."""
    hold = ReportHold(transport, lambda: agent)
    agent = Agent(hold.send, watch, send_wire=hold.send_wire)
    transport.send(0, Hello(transport.rank, info.name, info.memory_mb, info.cores, os.getpid()))
    backoff = transport.backoff   # shared: a doorbell ring seen by poll makes the loop probe eagerly
    gc.freeze()   # what start-up imported is never garbage: keep collections short
    next_alive = time.monotonic() + alive_interval
    agent.watch_wake_fd(transport.wake_fd)
    prober = Prober(transport)
    rings = transport.wake_fd is not None
    while not agent.stopped:
        busy = agent.busy
        if not busy:
            hold.flush()   # nothing runs here: whatever is held leaves before the idle wait
            agent.rung = False   # the idle poll empties the doorbell itself
            item = transport.poll(IDLE_POLL_S, flush=False)
        else:
            hold.flush_if_due()
            now = time.monotonic()
            if prober.due(_take_ring(agent, transport), now):
                item = transport.poll(0.0, flush=False)
                prober.probed(item is not None, now)
            else:
                item = None
        got = item is not None
        while item is not None:   # a whole batch from the master before looking at the tasks
            agent.handle(item[1])
            item = None if agent.stopped else transport.next_buffered()
        if got:
            backoff.activity()
        _forward_signal(agent, transport, signals)
        if time.monotonic() >= next_alive:   # rank 0 takes a silent agent for a hung one
            hold.send(Alive(transport.rank))
            hold.flush()
            next_alive = time.monotonic() + alive_interval
        if agent.step():
            if not rings:   # with a doorbell, rank 0's answer to a report rings: no early probe
                backoff.activity()
        elif not got and agent.busy and not agent.rung:
            hold.flush_if_due()
            delay, due = backoff.next_delay(), hold.due()
            if rings and delay >= backoff.min_sleep:
                delay = backoff.max_sleep   # a ring ends the wait: a lost one waits for the prober
            # ends the lane gathers wait there up to a hold, then leave with the next flush
            if agent.wait(delay if due is None else min(delay, due), hold=hold.hold):
                hold.aged = True
    _finish(agent)
    if agent.exit_code != EXIT_USAGE:   # a refused run says one line, rank 0's error
        log.info("attempts started: %d; %.2f s of CPU", agent.started, time.process_time())
    transport.close()
    return 0


def _take_ring(agent: Agent, transport: Transport) -> bool:
    """Whether the doorbell rang since the last look; empties it (so the next wait sleeps)."""
    if not agent.rung:
        return False
    agent.rung = False
    transport.woken()
    return True


def _forward_signal(agent: Agent, transport: Transport, signals: Signals | None) -> None:
    if signals is not None and signals.signum:
        log.warning("rank %d caught signal %d: interrupting its tasks", transport.rank, signals.signum)
        agent.stop_seen = True
        agent.kill(ALL_TASKS, 0, Failure.INTERRUPTED)
        agent.send(Interrupted(transport.rank, signals.signum))
        signals.signum = 0


def _finish(agent: Agent, grace: float = 5.0) -> None:
    """Reap attempts still running at shutdown (they were killed with SIGKILL)."""
    agent.send = lambda message: None   # the master is gone: nobody to report to
    deadline = time.monotonic() + grace
    while agent.busy and time.monotonic() < deadline:
        if not agent.step():
            agent.wait(0.01)
    agent.end()
