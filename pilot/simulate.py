"""Discrete-event simulation of a run: the real :class:`pilot.engine.Engine` and policy,
with each attempt taking a given runtime instead of running a process.

Runtimes come from a per-task array, a ``{task id or label: seconds}`` table, or 1 s.
The engine is told the per-label mean runtimes (as a previous run's report would tell it)
unless ``estimates=False``, in which case it learns them as tasks finish. Failures can be
injected (``peak_mb``: an attempt whose request is below the task's peak fails with OOM;
``outcome``: any other rule). With ``queue_ahead_s`` a launch queued behind another task
starts when that task ends, as an agent does. Every start is checked against the node's real
capacity (what the started attempts request), independently of the engine's accounting.
See docs/scheduling.md.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np

from pilot.engine import Engine
from pilot.errors import UserError
from pilot.events import Drain, Failure, NodeLost, Schedule, TaskFinished, TaskStarted

_FINISH, _DRAIN, _LOSE = 0, 1, 2


@dataclass
class SimResult:
    """Figures of one simulated run (times in simulated seconds)."""

    makespan_s: float
    lower_bound_s: float
    node_hours: float
    memory_utilisation: float
    core_utilisation: float
    launches: int
    engine_seconds: float          # wall time spent inside Engine.handle
    exit_code: int
    engine: Engine = field(repr=False)

    @property
    def ratio(self) -> float:
        """makespan / lower bound (1.0 is optimal)."""
        return self.makespan_s / self.lower_bound_s if self.lower_bound_s > 0 else 1.0

    @property
    def decisions_per_s(self) -> float:
        return self.launches / self.engine_seconds if self.engine_seconds > 0 else 0.0

    def summary(self) -> dict:
        """The figures printed by ``pilot simulate --json``."""
        return {"makespan_s": self.makespan_s, "lower_bound_s": self.lower_bound_s,
                "ratio": self.ratio, "node_hours": self.node_hours,
                "memory_utilisation": self.memory_utilisation,
                "core_utilisation": self.core_utilisation}


# ---- runtimes and bounds ----------------------------------------------------------------


def task_runtimes(graph, table: dict | None = None, default: float = 1.0) -> np.ndarray:
    """Seconds per task from ``{task id or label: seconds}`` (a task id wins over its
    label); tasks named by neither get ``default``. UserError for an unknown name or a
    negative or non-numeric value."""
    runtimes = np.full(graph.size, float(default))
    if not table:
        return runtimes
    labels = {name: i for i, name in enumerate(graph.labels)}
    per_label = np.full(len(graph.labels), np.nan)
    by_task = {}
    for key, value in table.items():
        seconds = _seconds(key, value)
        if key in labels:
            per_label[labels[key]] = seconds
        else:
            by_task[key] = seconds
    set_label = ~np.isnan(per_label[graph.label])
    runtimes[set_label] = per_label[graph.label][set_label]
    if by_task:
        _apply_task_runtimes(graph, by_task, runtimes)
    return runtimes


def _seconds(key, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise UserError(f"runtime of {key!r} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _apply_task_runtimes(graph, by_task: dict, runtimes: np.ndarray) -> None:
    index = {tid: i for i, tid in enumerate(graph.ids)}
    for key, seconds in by_task.items():
        t = index.get(key)
        if t is None:
            raise UserError(f"{key!r} is neither a task id nor a label of the workflow")
        runtimes[t] = seconds


def label_means(graph, runtimes: np.ndarray) -> np.ndarray:
    """Mean runtime per label (NaN for a label with no task)."""
    k = len(graph.labels)
    total = np.bincount(graph.label, weights=runtimes, minlength=k)
    count = np.bincount(graph.label, minlength=k)
    return np.divide(total, count, out=np.full(k, np.nan), where=count > 0)


def critical_path(graph, runtimes: np.ndarray) -> float:
    """Longest chain of runtimes from a root to a sink (level by level, in numpy)."""
    from pilot.graph import topological_levels

    end = np.zeros(graph.size)
    ready_at = np.zeros(graph.size)
    ptr, idx = graph.child_ptr, graph.child_idx
    for level in topological_levels(graph):
        end[level] = ready_at[level] + runtimes[level]
        counts = ptr[level + 1] - ptr[level]
        if counts.sum():
            np.maximum.at(ready_at, _gather(ptr, idx, level), np.repeat(end[level], counts))
    return float(end.max()) if graph.size else 0.0


def _gather(ptr, idx, rows):
    starts = ptr[rows]
    counts = ptr[rows + 1] - starts
    shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return idx[np.arange(int(counts.sum()), dtype=np.int64) + shift]


def lower_bound(graph, nodes, runtimes: np.ndarray) -> float:
    """max(critical path, memory-seconds / total memory, core-seconds / total cores)."""
    total_mem = sum(n.memory_mb for n in nodes)
    total_cores = sum(n.cores for n in nodes)
    mem_s = float(np.dot(graph.memory_mb.astype(np.float64), runtimes))
    core_s = float(np.dot(graph.cpus.astype(np.float64), runtimes))
    return max(critical_path(graph, runtimes), mem_s / total_mem, core_s / total_cores)


# ---- the simulation ---------------------------------------------------------------------


class _Sim:
    def __init__(self, engine, runtimes, peak_mb, outcome, started, check, batch=1):
        self.engine, self.check, self.batch = engine, check, batch
        self.queued: dict[tuple[int, int], list] = {}   # (task, node) -> launches waiting for it to end
        self.behind: list = []                # queued launches whose predecessor just ended
        self.live: dict[tuple[int, int, int], tuple[int, int]] = {}   # started (task, attempt, node): (MB, cpus)
        self.used_mb = [0] * len(engine.nodes)
        self.used_cpus = [0] * len(engine.nodes)
        self.runtimes = runtimes.tolist()
        self.peak = peak_mb.tolist() if peak_mb is not None else None
        self.outcome, self.started = outcome, started
        self.heap: list = []
        self.seq = 0
        self.mem_s = self.core_s = self.engine_s = 0.0
        self.launches = 0
        self.now = self.last_end = 0.0

    def push(self, when: float, kind: int, payload) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, kind, payload))

    def handle(self, event):
        t0 = time.perf_counter()
        actions = self.engine.handle(event)
        self.engine_s += time.perf_counter() - t0
        if self.check is not None:
            self.check(self.engine, event)
        return actions

    def handle_many(self, events):
        t0 = time.perf_counter()
        actions = self.engine.handle_many(events)
        self.engine_s += time.perf_counter() - t0
        if self.check is not None:
            self.check(self.engine, events[-1])
        return actions

    def launch(self, actions, now: float) -> None:
        for a in actions:
            self.launches += 1
            if a.after >= 0:
                self.queued.setdefault((a.after, a.node), []).append(a)
                continue
            self.start(a, now)

    def start(self, a, now: float) -> None:
        """Start one attempt now (its end goes on the heap), on a node with room for it."""
        node, nodes = a.node, self.engine.nodes
        self.used_mb[node] += a.memory_mb
        self.used_cpus[node] += a.cpus
        if self.used_mb[node] > nodes[node].memory_mb or self.used_cpus[node] > nodes[node].cores:
            raise AssertionError(f"node {node} over-committed at t={now} by task {a.task}")
        self.live[(a.task, a.attempt, node)] = (a.memory_mb, a.cpus)
        seconds = self.runtimes[a.task]
        failure, code = self._outcome(a)
        self.mem_s += a.memory_mb * seconds
        self.core_s += a.cpus * seconds
        self.push(now + seconds, _FINISH, (a.task, a.attempt, a.node, failure, code, now))
        if self.started:
            self.handle(TaskStarted(a.task, a.attempt, a.node, now))

    def _outcome(self, a) -> tuple[Failure, int | None]:
        if self.peak is not None and a.memory_mb < self.peak[a.task]:
            return Failure.OOM, None
        if self.outcome is not None:
            result = self.outcome(a.task, a.attempt, a.memory_mb)
            if result is not None:
                return result
        return Failure.NONE, 0

    def run(self) -> None:
        self.launch(self.handle(Schedule(0.0)), 0.0)
        while self.heap:
            if self.batch > 1:
                events = [self.next_event() for _ in range(min(self.batch, len(self.heap)))]
                self.launch(self.handle_many(events), self.now)
            else:
                self.launch(self.handle(self.next_event()), self.now)
            self.start_behind()

    def start_behind(self) -> None:
        """Start what was queued behind the attempts that just ended (after the engine saw the ends)."""
        behind, self.behind = self.behind, []
        for a in behind:
            self.start(a, self.now)

    def next_event(self):
        when, _, kind, payload = heapq.heappop(self.heap)
        self.now = when
        if kind == _FINISH:
            t, attempt, node, failure, code, start = payload
            self.last_end = when
            mb, cpus = self.live.pop((t, attempt, node))
            self.used_mb[node] -= mb
            self.used_cpus[node] -= cpus
            self.behind.extend(self.queued.pop((t, node), ()))
            return TaskFinished(t, attempt, node, failure, code, None, start, when)
        if kind == _DRAIN:
            return Drain(when, "simulated")
        for key in [k for k in self.queued if k[1] == payload]:   # a lost node's agent starts nothing more
            del self.queued[key]
        return NodeLost(payload, when)


def simulate(graph, nodes, policy=None, runtimes=None, *, estimates=True, peak_mb=None,
             outcome=None, started=False, check=None, max_failures=None, deadline=None,
             margin_s=0.0, drain_at=None, lose=(), setup=None, batch=1, queue_ahead_s=0.0) -> SimResult:
    """Run ``graph`` on ``nodes`` in simulated time and return the figures.

    ``runtimes``: seconds per task (default 1 s each). ``estimates``: give the engine the
    per-label mean runtimes (True), a ``{label: seconds}`` dict, or nothing (False).
    ``peak_mb``: per-task true peak memory; an attempt requesting less fails with OOM.
    ``outcome(task, attempt, memory_mb)`` may return ``(Failure, exit_code)`` to fail an
    attempt. ``started``: also send TaskStarted. ``check(engine, event)`` runs after every
    event. ``deadline``/``margin_s``: engine.set_deadline. ``drain_at``: time of a Drain.
    ``lose``: [(time, node)] node losses. ``setup(engine)`` runs once before the first
    event (e.g. to add listeners). ``batch`` > 1: hand up to that many of the earliest
    waiting events to one ``Engine.handle_many`` (``check`` then runs after each batch).
    ``queue_ahead_s``: the engine's queue-ahead horizon (0: off).
    """
    runtimes = np.ones(graph.size) if runtimes is None else np.asarray(runtimes, dtype=np.float64)
    if estimates is True:
        estimates = label_means(graph, runtimes)
    engine = Engine(graph, nodes, policy, max_failures=max_failures,
                    runtime_estimates=estimates if estimates is not False else None,
                    queue_ahead_s=queue_ahead_s)
    if deadline is not None:
        engine.set_deadline(deadline, margin_s)
    if setup is not None:
        setup(engine)
    sim = _Sim(engine, runtimes, peak_mb, outcome, started, check, batch)
    if drain_at is not None:
        sim.push(float(drain_at), _DRAIN, None)
    for when, node in lose:
        sim.push(float(when), _LOSE, int(node))
    sim.run()
    return _result(sim, graph, nodes, runtimes)


def _result(sim: _Sim, graph, nodes, runtimes) -> SimResult:
    span = sim.last_end
    total_mem = sum(n.memory_mb for n in nodes)
    total_cores = sum(n.cores for n in nodes)
    return SimResult(
        makespan_s=span, lower_bound_s=lower_bound(graph, nodes, runtimes),
        node_hours=len(nodes) * span / 3600.0,
        memory_utilisation=sim.mem_s / (total_mem * span) if span > 0 else 0.0,
        core_utilisation=sim.core_s / (total_cores * span) if span > 0 else 0.0,
        launches=sim.launches, engine_seconds=sim.engine_s,
        exit_code=sim.engine.exit_code(), engine=sim.engine)
