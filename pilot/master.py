"""Rank 0's loop: events in from agents, launches out to them, until the engine is finished.

Nodes: every agent rank says :class:`~pilot.protocol.Hello` with its node's name, memory and
cores; ranks with the same node name form one engine node and share its budget (the engine
never places more than the node holds; the master hands each launch to the rank of that node
with the fewest running attempts). With one rank the master runs tasks itself through an
in-process :class:`~pilot.agent.Agent`.

Batches: each turn of the loop takes every message that has arrived (up to ``BATCH_MAX``),
gives their events to the engine at once (``Engine.handle_many``: one scheduling pass for the
lot) and sends the launches, one transport batch per agent rank.

Stopping: a stop signal (on rank 0, or reported by an agent) or the wall-time margin sends
``Drain`` to the engine and ``Kill`` to every agent; the killed attempts come back as
``Failure.INTERRUPTED`` and the run ends with the engine's exit code (3 with work left).
"""

from __future__ import annotations

import collections
import gc
import logging
import time
from dataclasses import dataclass

import numpy as np

from pilot import leftovers
from pilot.agent import Agent, Signals
from pilot.errors import EXIT_INTERRUPTED, EXIT_USAGE
from pilot.events import Drain, Failure, Node, Schedule, State, TaskFinished, TaskStarted
from pilot.graph import Graph
from pilot.protocol import (ALL_TASKS, RUN_TASK_CODE, Alive, Begin, Hello, Interrupted, Kill, Recall, RunTask,
                            Shutdown, new_run_task)
from pilot.runner import WatchConfig, log_folder, log_path_in
from pilot.transport import Backoff, Transport, flush_output

log = logging.getLogger("pilot.master")
IDLE_POLL_S = 0.25     # the loop looks at signals, deadline, progress and checkpoint this often
DRAIN_TIMEOUT_S = 8.0  # after a drain, give agents this long to report their killed attempts
HELLO_TIMEOUT_S = 120.0
BATCH_MAX = 1024       # messages taken in one turn of the loop before the engine schedules
# While tasks are queued ahead on the agents, rank 0 takes its messages at most this often: the
# agents start queued tasks without it, and one turn over many results costs rank 0 far less
# than a turn per result (each wake-up and each engine pass has a fixed price). An urgent
# message (a slot left idle) rings and ends the pace early. 2 ms gave 8 tasks a turn on null
# tasks at 2 x 2; 10 ms, with the agents' held reports, rank 0 about 15 us less per task.
PACE_S = 0.010
AGENT_TIMEOUT_S = 120.0   # an agent rank silent this long is taken for hung (`--agent-timeout`)


@dataclass(frozen=True)
class MasterOptions:
    """How the master runs: log folder, progress interval (s), wall-time deadline (epoch s)."""

    logdir: str
    progress_interval: float = 30.0
    deadline: float | None = None
    margin_s: float = 60.0
    pace_s: float = PACE_S
    agent_timeout: float = AGENT_TIMEOUT_S


def gather_hellos(transport: Transport, count: int, timeout: float = HELLO_TIMEOUT_S) -> list[Hello]:
    """Wait for a Hello from each of ``count`` agent ranks, in rank order."""
    hellos: dict[int, Hello] = {}
    deadline = time.monotonic() + timeout
    while len(hellos) < count:
        item = transport.poll(max(0.0, deadline - time.monotonic()))
        if item is None:
            missing = sorted(set(range(1, count + 1)) - set(hellos))
            raise RuntimeError(f"no Hello from ranks {missing} after {timeout:.0f} s")
        if isinstance(item[1], Hello):
            hellos[item[0]] = item[1]
    return [hellos[r] for r in sorted(hellos)]


def group_nodes(hellos: list[Hello]) -> tuple[list[Node], list[list[int]]]:
    """Engine nodes from agents' Hellos (one node per distinct name) and each node's ranks."""
    index: dict[str, int] = {}
    nodes: list[Node] = []
    ranks: list[list[int]] = []
    for hello in sorted(hellos, key=lambda h: h.rank):
        if hello.node not in index:
            index[hello.node] = len(nodes)
            nodes.append(Node(hello.node, hello.memory_mb, hello.cores))
            ranks.append([])
        ranks[index[hello.node]].append(hello.rank)
    return nodes, ranks


def progress_line(engine, nodes: list[Node]) -> str:
    """``done/total running queued failed``, nodes busy and memory in use, on one line
    (tasks queued ahead hold no memory yet: they count as queued, not running)."""
    state = engine.state
    running = (state == State.LAUNCHED) | (state == State.RUNNING)
    queued = np.fromiter(engine.queue.after_of, dtype=np.int64, count=len(engine.queue.after_of))
    running[queued] = False
    busy = len(np.unique(engine.node_of[running])) if running.any() else 0
    used = int(engine.memory_request[running].sum())
    total = sum(n.memory_mb for n in nodes)
    counts = np.bincount(state, minlength=len(State))
    return (f"progress: done {counts[State.DONE]}/{len(state)} running {int(running.sum())} "
            f"queued {len(queued)} ready {counts[State.READY]} failed {counts[State.FAILED]} "
            f"dep_fail {counts[State.DEP_FAIL]} | nodes busy {busy}/{len(nodes)} "
            f"| memory {used}/{total} MB")


class Master:
    """Drives one engine with the agents behind ``transport`` (and an optional local agent)."""

    def __init__(self, transport: Transport, graph: Graph, engine, nodes: list[Node],
                 node_ranks: list[list[int]], options: MasterOptions, *, local_watch: WatchConfig | None = None,
                 checkpoint=None, signals: Signals | None = None, clock=time.time):
        self.transport, self.graph, self.engine = transport, graph, engine
        self.nodes, self.node_ranks, self.options = nodes, node_ranks, options
        self._log_folder = log_folder(options.logdir)
        self.checkpoint = checkpoint
        self.signals = signals
        self.clock = clock
        self.inbox: collections.deque = collections.deque()   # messages from the local agent
        self.local = Agent(self.inbox.append, local_watch) if local_watch is not None else None
        self.load = collections.Counter()                     # rank -> running attempts
        self.rank_of: dict[tuple[int, int], int] = {}         # (task, attempt) -> rank
        self.drained_at: float | None = None
        self.launches = self.queued_ahead = self.turns = 0
        self.unresponsive: list[int] = []   # agent ranks that did not report after a drain
        self._recalled: set[tuple[int, int]] = set()   # (task, attempt) taken back, not yet reported
        self._next_recall = 0.0
        self.backoff = Backoff()
        self._next_progress = time.monotonic() + options.progress_interval
        self._last_turn = 0.0
        # Agent rank -> when something last came from it: one silent for agent_timeout is hung
        self.heard = dict.fromkeys((r for ranks in node_ranks for r in ranks if r != transport.rank),
                                   time.monotonic())
        self.hung: list[int] = []
        self._next_liveness = 0.0

    # -- the loop --

    def run(self) -> int:
        """Run until the engine is finished (or a drain times out); the engine's exit code."""
        self._dispatch(self.engine.handle(Schedule(self.clock())))
        while not self.engine.finished:
            self._pace()
            item = self._next_message()
            if item is not None:
                self._take_messages(item)
                self._last_turn = time.monotonic()
                self.turns += 1
            elif self.heard and time.monotonic() >= self._next_liveness:
                # only on a turn that found nothing waiting: every message that came is read, so
                # a busy rank 0 (a long snapshot, a backlog) cannot take a live agent for hung
                self._check_liveness()
                self._next_liveness = time.monotonic() + 1.0
            self._housekeeping()
            if self._drain_expired():
                self.unresponsive = sorted(r for r, n in self.load.items() if n > 0)
                log.error("agent ranks %s did not report their killed tasks within %.0f s",
                          self.unresponsive, DRAIN_TIMEOUT_S)
                break
        # A hung agent never takes its Shutdown: rank 0 leaves without it even when it held no task
        self.unresponsive = sorted(set(self.unresponsive) | set(self.hung))
        log.info("%s", progress_line(self.engine, self.nodes))
        log.info("launches: %d, of which %d queued ahead; messages taken in %d turns; %.2f s of CPU",
                 self.launches, self.queued_ahead, self.turns, time.process_time())
        return self.engine.exit_code()

    def _pace(self) -> None:
        """Let messages gather until ``pace_s`` after the last turn, while the agents have tasks
        queued ahead (their cores stay busy meanwhile) and no local agent needs this loop."""
        if self.local is None and self.engine.queue.queued_at and self.drained_at is None:
            left = self._last_turn + self.options.pace_s - time.monotonic()
            if left > 0:
                self.transport.nap(left)   # an urgent message (a slot left idle) rings

    def _next_message(self):
        if self.inbox:
            return 0, self.inbox.popleft()
        if self.local is None or not self.local.busy:
            return self.transport.poll(IDLE_POLL_S)
        if self.local.step():
            self.backoff.activity()
            return (0, self.inbox.popleft()) if self.inbox else None
        item = self.transport.poll(0.0)
        if item is None:
            self.local.wait(self.backoff.next_delay())
        return item

    def _housekeeping(self) -> None:
        now = self.clock()
        if self.signals is not None and self.signals.signum and self.drained_at is None:
            self.drain(f"signal {self.signals.signum}")
        deadline = self.options.deadline
        if deadline is not None and self.drained_at is None and now >= deadline - self.options.margin_s:
            self.drain("wall time")
        if self.engine.queue.queued_at and time.monotonic() >= self._next_recall:
            self._recall_stale(now)
            self._next_recall = time.monotonic() + IDLE_POLL_S
        if time.monotonic() >= self._next_progress:
            log.info("%s", progress_line(self.engine, self.nodes))
            self._next_progress = time.monotonic() + self.options.progress_interval
        if self.checkpoint is not None:
            self.checkpoint.tick(now)

    def _check_liveness(self) -> None:
        """Drain once an agent rank has been silent for ``agent_timeout`` (it says it is alive
        every quarter of that): a hung rank (stopped, stuck in the kernel on a dead file
        system, deadlocked) would otherwise hold the allocation until the wall time. The run
        then leaves without it (exit 3; a restart runs its tasks again)."""
        limit = time.monotonic() - self.options.agent_timeout
        for rank, heard in self.heard.items():
            if heard < limit and rank not in self.hung:
                self.hung.append(rank)
                log.error("agent rank %d sent nothing for %.0f s: taken for hung", rank,
                          time.monotonic() - heard)
                self.drain(f"agent rank {rank} hung")

    def _recall_stale(self, now: float) -> None:
        """Take back tasks queued ahead that have waited long (the task ahead runs longer than its
        label's estimate) when another node has room for them now: they come back interrupted,
        unstarted, and are placed again."""
        if self.drained_at is not None:
            return   # the drain's kill reports every queued task anyway
        engine, c = self.engine, self.engine.cluster
        for q in engine.queue.stale(now - engine.queue.recall_after):
            key = (q, engine.attempts.item(q))
            if key in self._recalled:
                continue
            node, memory, cpus = engine.node_of.item(q), engine.memory_request.item(q), int(self.graph.cpus[q])
            if any(j != node and c.up[j] and c.fm[j] >= memory and c.fc[j] >= cpus for j in range(c.size)):
                log.info("taking back task %s, queued %.1f s ago behind a task that runs longer than "
                         "expected: another node has room", self.graph.ids[q], now - engine.queue.queued_at[q])
                self._recalled.add(key)
                self._send(self.rank_of[key], Recall(*key))

    def _drain_expired(self) -> bool:
        return self.drained_at is not None and time.monotonic() - self.drained_at > DRAIN_TIMEOUT_S

    # -- messages --

    def _take_messages(self, item) -> None:
        """Act on ``item`` and every message already waiting; the engine sees their events at once."""
        events: list = []
        heard, now = self.heard, time.monotonic()
        for _ in range(BATCH_MAX):
            source, message = item
            if source:   # not the local agent
                heard[source] = now
            kind = type(message)
            if kind is TaskStarted:
                events.append(message)
            elif kind is TaskFinished:
                self._finished(message)
                events.append(message)
            elif kind is Interrupted:
                self._apply(events)   # what came before the signal happened before the drain
                events = []
                self.drain(f"signal {message.signal} on rank {message.rank}")
            elif kind is not Hello and kind is not Alive:
                log.warning("master ignores %r from rank %d", message, source)
            item = self._waiting_message()
            if item is None:
                break
        self._apply(events)

    def _apply(self, events: list) -> None:
        if events:
            self._dispatch(self.engine.handle_many(events))

    def _waiting_message(self):
        """A message that has already arrived, without waiting (the local agent's first)."""
        if self.inbox:
            return 0, self.inbox.popleft()
        return self.transport.poll(0.0) if self.transport.size > 1 else None

    def _finished(self, message: TaskFinished) -> None:
        if self._recalled:
            self._recalled.discard((message.task, message.attempt))
        rank = self.rank_of.pop((message.task, message.attempt), None)
        if rank is not None:
            self.load[rank] -= 1
        if message.failure not in (Failure.NONE, Failure.INTERRUPTED):
            log.warning("task %s attempt %d failed: %s (exit %s, signal %s, peak %.0f MB), log %s",
                        self.graph.ids[message.task], message.attempt, message.failure.name,
                        message.exit_code, message.signal, message.peak_rss_mb, message.log)

    def drain(self, reason: str) -> None:
        """Stop launching and kill every running attempt (they come back INTERRUPTED)."""
        if self.drained_at is not None:
            return
        log.warning("draining: %s", reason)
        self.drained_at = time.monotonic()
        self._dispatch(self.engine.handle(Drain(self.clock(), reason)))
        for rank in sorted({r for ranks in self.node_ranks for r in ranks}):
            self._send(rank, Kill(ALL_TASKS, 0, Failure.INTERRUPTED))

    # -- launches --

    def _dispatch(self, launches) -> None:
        self.launches += len(launches)
        for launch in launches:
            if launch.after >= 0:   # queued: to the rank whose task it follows
                self.queued_ahead += 1
                rank = self.rank_of[(launch.after, self.engine.attempts.item(launch.after))]
            else:
                rank = min(self.node_ranks[launch.node], key=lambda r: self.load[r])
            self.load[rank] += 1
            self.rank_of[(launch.task, launch.attempt)] = rank
            if self._is_local(rank):
                self.local.handle(self.run_task(launch))
            else:
                self.transport.send_wire(rank, self._run_wire(launch))

    def run_task(self, launch) -> RunTask:
        """The agent's order for one Launch action."""
        return new_run_task(*self._run_wire(launch)[1:])

    def _run_wire(self, launch) -> tuple:
        """The RunTask for ``launch`` in wire form, ``(RUN_TASK_CODE, *fields)``: one tuple per
        launch on rank 0's hot path."""
        g, t, attempt = self.graph, launch.task, launch.attempt
        return (RUN_TASK_CODE, t, attempt, launch.node, g.ids[t], g.labels[g.label[t]], self.nodes[launch.node].name,
                g.commands[t], g.env[t], log_path_in(self._log_folder, t, g.ids[t], attempt),
                float(g.timeout[t]), int(launch.memory_mb), int(launch.cpus), launch.after)

    def _send(self, rank: int, message) -> None:
        if self._is_local(rank):
            self.local.handle(message)
        else:
            self.transport.send(rank, message)

    def _is_local(self, rank: int) -> bool:
        """Whether ``rank`` is rank 0's own agent (a run of one rank), reached without the transport."""
        return rank == self.transport.rank and self.local is not None



# ---- rank 0's whole run -------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """Everything ``pilot run`` needs on rank 0."""

    workflow: str
    checkpoint: str
    logdir: str
    max_failures: int | None = None
    retry_failed: bool = False          # handled by the checkpoint's restored arrays
    deadline: float | None = None       # epoch seconds (``--walltime`` or the Slurm job end)
    progress_interval: float = 30.0
    watch: WatchConfig = WatchConfig()
    butler: str | None = None           # QuantumGraph runs: the repository
    bps_config: str | None = None       # QuantumGraph runs: BPS YAML with the requests
    lsst_mode: str = "warm"             # QuantumGraph runs: warm or subprocess
    queue_ahead_s: float = 0.0          # see pilot.engine_queue (0: off)
    agent_timeout: float = AGENT_TIMEOUT_S   # an agent rank silent this long is taken for hung


def wall_margin(deadline: float, start: float) -> float:
    """Seconds before the deadline at which the run drains: 60 s, at most 10% of the time left."""
    return max(0.5, min(60.0, 0.1 * (deadline - start)))


def master_main(transport: Transport, config: RunConfig, info, signals: Signals | None = None) -> int:
    """Rank 0: load, meet the agents, check fits, then run the engine; the run's exit code."""
    try:
        graph, nodes, node_ranks = _prepare(transport, config, info)
        checkpoint = _open_checkpoint(config, graph)
    except BaseException:
        _shutdown_all(transport, EXIT_USAGE)
        raise
    code = EXIT_INTERRUPTED
    margin = wall_margin(config.deadline, time.time()) if config.deadline else 60.0
    options = MasterOptions(config.logdir, config.progress_interval, config.deadline, margin,
                            agent_timeout=config.agent_timeout)
    master = None
    try:
        engine = _make_engine(config, graph, nodes, checkpoint, margin)
        master = Master(transport, graph, engine, nodes, node_ranks, options,
                        local_watch=config.watch if transport.size == 1 else None,
                        checkpoint=checkpoint, signals=signals)
        _begin(transport, master, leftovers.new_tag(checkpoint.run_name))
        gc.freeze()   # the loaded graph (millions of objects) stays out of every collection
        code = master.run()
    finally:
        if master is not None and master.local is not None:
            master.local.end()
        if master is not None and master.unresponsive:
            checkpoint.close()
            _leave_without_agents(transport, code)
        _shutdown_all(transport, code)
        checkpoint.close()
    from pilot.lsst.qgraph import finish_run

    return finish_run(graph, code, config.logdir)


def _begin(transport: Transport, master: Master, tag: str) -> None:
    """Before any task starts: every agent, and rank 0, kill what an earlier start of the run
    left on their host; attempts carry ``tag`` from now on (see :mod:`pilot.leftovers`). Only
    now, with the checkpoint's lock held, is no other start of the run alive."""
    for rank in range(1, transport.size):
        transport.send(rank, Begin(tag))
    if master.local is not None:
        master.local.begin(tag)
    else:
        leftovers.sweep(tag, others=True)


def _prepare(transport: Transport, config: RunConfig, info):
    from pilot.graph import check_fits
    from pilot.workflow import load_workflow_file

    from pilot.lsst.qgraph import is_quantum_graph, load_for_run

    if is_quantum_graph(config.workflow):
        graph = load_for_run(config.workflow, config.butler, config.bps_config, config.lsst_mode)
    else:
        graph = load_workflow_file(config.workflow)
    if transport.size == 1:
        nodes, node_ranks = [Node(info.name, info.memory_mb, info.cores)], [[0]]
    else:
        nodes, node_ranks = group_nodes(gather_hellos(transport, transport.size - 1))
    check_fits(graph, nodes)
    log.info("%d tasks on %d nodes: %s", graph.size, len(nodes),
             ", ".join(f"{n.name} ({n.memory_mb} MB, {n.cores} cores)" for n in nodes))
    return graph, nodes, node_ranks


def _open_checkpoint(config: RunConfig, graph):
    from pilot.checkpoint import open_checkpoint

    return open_checkpoint(config.checkpoint, graph, retry_failed=config.retry_failed)


def _make_engine(config: RunConfig, graph, nodes, checkpoint, margin_s: float):
    from pilot.engine import Engine

    engine = Engine(graph, nodes, max_failures=config.max_failures, queue_ahead_s=config.queue_ahead_s)
    if checkpoint.restored is not None:
        engine.restore(*checkpoint.restored)
    # attach: the scaled memory request, attempt and node of a launch are the engine's decisions,
    # which the checkpoint must persist (events alone do not carry them).
    checkpoint.attach(engine)
    engine.listeners.append(checkpoint)
    if config.deadline is not None:
        engine.set_deadline(config.deadline, margin_s)
    return engine


def _leave_without_agents(transport: Transport, code: int) -> None:
    """End rank 0 now, the checkpoint closed: an agent that is dead or hung (its rank killed, its
    node gone) never takes its Shutdown, and waiting for that send, or in MPI_Finalize, would hold
    the job until Slurm kills it. Under srun (with --kill-on-bad-exit) or mpiexec the launcher
    then ends the other ranks; the exit code says whether work is left (3: run again)."""
    log.error("leaving without the unresponsive agents (exit %d)", code)
    flush_output()
    transport.leave(code)


def _shutdown_all(transport: Transport, code: int) -> None:
    for rank in range(1, transport.size):
        transport.send(rank, Shutdown(code))
    transport.close()
