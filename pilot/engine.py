"""The pure state machine: task states, readiness, retries, memory scaling, failure
propagation. No MPI, no HDF5.

:meth:`Engine.handle` (one event) and :meth:`Engine.handle_many` (several, then one
dispatch) are the only way state changes during a run: they apply events
(:mod:`pilot.events`), ask the policy for placements and return the ``Launch`` actions;
every listener's ``record(event, transitions)`` is called after each event. States,
attempts, memory requests and nodes are numpy arrays (read-only to others); hot paths
read them with ``.item()`` and keep small counters in Python lists, since numpy's
per-element cost dominates work done once per event.
See docs/scheduling.md.
"""

from __future__ import annotations

import numpy as np

from pilot.engine_cluster import Cluster
from pilot.engine_queue import DEPTH, QueueAhead, queue_ahead
from pilot.engine_retry import next_attempt
from pilot.engine_states import ALLOWED_TABLE, IllegalTransition, TransitionLog
from pilot.events import (Drain, Failure, Launch, NodeLost, Schedule, State, TaskFinished,
                          TaskStarted, new_launch)
from pilot.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK

P, R, L, U, D, F, X = (int(s) for s in State)
_ACTIVE = (L, U)
_STATE = tuple(State)   # State by number, without the enum call's cost
_NONE = int(Failure.NONE)


class Engine:
    """Task states for one graph on a set of nodes; see the module docstring."""

    def __init__(self, graph, nodes, policy=None, *, max_failures=None, runtime_estimates=None,
                 queue_ahead_s: float = 0.0, queue_ahead_depth: int = DEPTH):
        """``queue_ahead_s`` > 0: queue ready tasks behind launched ones expected to end within
        that many seconds, up to ``queue_ahead_depth`` behind one (see :mod:`pilot.engine_queue`);
        the ``Launch`` has ``after`` set."""
        from pilot.policy import DefaultPolicy

        n = self._n = graph.size
        self.graph, self.nodes = graph, list(nodes)
        self.state = np.full(n, P, dtype=np.int8)
        self.attempts = np.zeros(n, dtype=np.int32)
        self.memory_request = graph.memory_mb.astype(np.int64, copy=True)
        self.node_of = np.full(n, -1, dtype=np.int32)
        self.start_time = np.full(n, np.nan)
        self.ooms = np.zeros(n, dtype=np.int16)
        self.listeners: list = []
        self.max_failures = max_failures
        self.cluster = Cluster(self.nodes, self.memory_request, graph.cpus, graph.label,
                               len(graph.labels))
        self._waiting = np.diff(graph.parent_ptr).tolist()   # parents not done, per task
        self._child_ptr = graph.child_ptr.tolist()
        self._labels = graph.label.tolist()
        self._cpus = graph.cpus.tolist()
        self._count = [0] * len(State)
        self._count[P] = n
        self._log = TransitionLog()
        self._trans: list = []
        self._events = 0
        self._drained = self._stalled = False
        self.queue = QueueAhead(queue_ahead_s, queue_ahead_depth)
        self._init_labels(runtime_estimates)
        self.policy = policy if policy is not None else DefaultPolicy()
        self.policy.attach(graph, self.cluster)
        self._promote(np.flatnonzero(np.diff(graph.parent_ptr) == 0), 0.0)
        self._trans.clear()

    # ---- set-up -------------------------------------------------------------------

    def _init_labels(self, runtime_estimates) -> None:
        g, k = self.graph, len(self.graph.labels)
        for name, limit in g.concurrency_limit.items():
            if name in g.labels:
                self.cluster.label_limit[g.labels.index(name)] = int(limit)
        self._est_sum = [0.0] * k
        self._est_count = [0] * k
        self._est_prior = np.full(k, np.nan)
        if isinstance(runtime_estimates, dict):
            for name, seconds in runtime_estimates.items():
                if name in g.labels:
                    self._est_prior[g.labels.index(name)] = float(seconds)
        elif runtime_estimates is not None:
            self._est_prior[:] = np.asarray(runtime_estimates, dtype=np.float64)
        self._est_prior_l = self._est_prior.tolist()
        self._refresh_estimates()

    def _refresh_estimates(self) -> None:
        est = [total / count if count else prior
               for total, count, prior in zip(self._est_sum, self._est_count, self._est_prior_l)]
        known = [e for e in est if e == e]   # not NaN
        self._fill_needed = len(known) < len(est)
        fill = numpy_mean(known) if known else 1.0
        self.cluster.label_estimate[:] = [e if e == e else fill for e in est]

    def label_estimates(self) -> dict[str, float]:
        """Current per-label runtime estimate in seconds (learned, else given, else a fill)."""
        return dict(zip(self.graph.labels, self.cluster.label_estimate.tolist()))

    def restore(self, state, attempts, memory_request) -> list:
        """Start from a checkpoint, before the first event: done stays done, failed and
        dep_fail stay, everything else becomes pending or ready from its parents."""
        if self._events:
            raise RuntimeError("restore() must come before the first event")
        old = np.asarray(state, dtype=np.int8)
        was_active = np.isin(old, _ACTIVE)
        self.attempts[:] = np.asarray(attempts, dtype=np.int32) - was_active  # interrupted: not counted
        self.memory_request[:] = np.asarray(memory_request, dtype=np.int64)
        self.ooms[:] = self._ooms_from_request()
        keep = np.isin(old, (D, F, X))
        self.state[:] = np.where(keep, old, P)
        return self._rebuild()

    def reset_failed(self) -> list:
        """--retry-failed: failed and dep_fail tasks back to pending with fresh attempts."""
        if self.cluster.n_active:
            raise RuntimeError("reset_failed() needs nothing launched or running")
        tasks = np.flatnonzero(np.isin(self.state, (F, X)))
        old = self.state[tasks].copy()
        self._log.extend(tasks, old, P, 0.0)
        self.state[tasks] = P
        self.attempts[tasks] = 0
        self.ooms[tasks] = 0
        self.memory_request[tasks] = self.graph.memory_mb[tasks]
        reset = [(int(t), State(a), State.PENDING) for t, a in zip(tasks.tolist(), old.tolist())]
        return reset + self._rebuild()

    def _ooms_from_request(self) -> np.ndarray:
        g = self.graph
        ratio = np.maximum(self.memory_request, 1) / np.maximum(g.memory_mb, 1)
        mult = np.where(g.memory_multiplier > 1, g.memory_multiplier, 2.0)
        n = np.where(ratio > 1, np.ceil(np.log(ratio) / np.log(mult) - 1e-9), 0)
        return np.where(g.memory_multiplier > 1, n, 0).astype(np.int16)

    def _rebuild(self) -> list:
        waiting = parents_not_done(self.graph, self.state)
        self._waiting = waiting.tolist()
        self.state[(self.state == R)] = P
        self._count = np.bincount(self.state, minlength=len(State)).tolist()
        self.policy.attach(self.graph, self.cluster)
        self._trans = []
        self._promote(np.flatnonzero((waiting == 0) & (self.state == P)), 0.0)
        made, self._trans = self._trans, []
        return made

    def set_deadline(self, deadline: float, margin_s: float = 0.0) -> None:
        """Launch nothing whose expected end (now + label estimate) passes deadline - margin."""
        self.cluster.latest_end = float(deadline) - float(margin_s)

    # ---- the one entry point ------------------------------------------------------

    def handle(self, event) -> list[Launch]:
        """Apply ``event``; return the launches the policy chose; notify listeners.
        The same as ``handle_many([event])``."""
        return self._close(event, self._apply(event))

    def handle_many(self, events) -> list[Launch]:
        """Apply ``events`` (a sequence) in order, then ask the policy once; return its launches.

        Listeners get one ``record(event, transitions)`` per event, right after that event
        is applied (so they read the engine as it was then); the launches' transitions go
        with the last event's call, as ``handle`` does for one event. The policy is asked
        when some event is a Schedule, TaskFinished or NodeLost (never once a Drain came),
        at the time of the last event.
        """
        if not events:
            return []
        wants = False
        for event in events[:-1]:
            wants = self._apply(event) or wants
            if self.listeners:
                self._notify(event)
        last = events[-1]
        return self._close(last, self._apply(last) or wants)

    def _close(self, event, dispatch: bool) -> list[Launch]:
        """Dispatch if asked, then notify listeners of ``event`` (the last one applied)."""
        launches = self._dispatch(event_time(event)) if dispatch else []
        if self.listeners:
            self._notify(event)
        return launches

    def _apply(self, event) -> bool:
        """Apply one event (its transitions in ``_trans``); True if it calls for a dispatch."""
        self._events += 1
        self._trans = []
        kind = type(event)
        if kind is TaskFinished:
            self._finished(event)
            return True
        if kind is TaskStarted:
            self._started(event)
            return False
        if kind is NodeLost:
            self._node_lost(event)
            return True
        if kind is Drain:
            self._drained = True
            return False
        if kind is Schedule:
            return True
        raise TypeError(f"not an engine event: {event!r}")

    def _notify(self, event) -> None:
        made = self._trans
        for listener in self.listeners:
            listener.record(event, made)

    # ---- events -------------------------------------------------------------------

    def _current(self, event) -> bool:
        """False for a message about an earlier attempt or another node (ignored). A
        current message about a task in the wrong state reaches ``_move`` and raises."""
        t = event.task
        return (0 <= t < self._n and event.attempt == self.attempts.item(t)
                and event.node == self.node_of.item(t) >= 0)

    def _started(self, event: TaskStarted) -> None:
        if not self._current(event):
            return
        self._move(event.task, U, event.time)
        self.start_time[event.task] = event.time
        self.cluster.set_start(event.task, event.time)

    def _finished(self, event: TaskFinished) -> None:
        if not self._current(event):
            return
        t = event.task
        if self.cluster.release(t) >= 0:
            self.policy.released(t, event.node)
        elif t in self.queue.after_of:
            self._unqueue_early(t)
        if self.queue.next_of or self.queue.tails:
            self._hand_off(t, event.end)
        if event.failure == _NONE:
            self._succeeded(t, event)
            return
        verdict, memory = next_attempt(self, t, event)
        if verdict == "uncounted":
            self.attempts[t] -= 1
        if verdict == "fail":
            self._fail(t, event.end)
            return
        if memory is not None:
            self.ooms[t] += 1
            self.memory_request[t] = memory
        self._move(t, R, event.end)
        self.node_of[t] = -1
        self.policy.add((t,), self.memory_request)

    def _succeeded(self, t: int, event: TaskFinished) -> None:
        self._move(t, D, event.end)
        label = self._labels[t]
        self._est_sum[label] += max(event.end - event.start, 0.0)
        self._est_count[label] += 1
        if self._fill_needed:
            self._refresh_estimates()  # unknown labels take the mean of the known ones
        else:
            self.cluster.label_estimate[label] = self._est_sum[label] / self._est_count[label]
        a, b = self._child_ptr[t], self._child_ptr[t + 1]
        if b > a:
            waiting, free = self._waiting, []
            for k in self.graph.child_idx[a:b].tolist():
                waiting[k] -= 1
                if not waiting[k]:
                    free.append(k)
            if free:
                self._promote(free, event.end)

    def _fail(self, t: int, now: float) -> None:
        """``t`` failed for good: it and, level by level over the CSR, every descendant
        not already dep_fail (all pending, since ``t`` never finished) become dep_fail."""
        self._move(t, F, now)
        frontier = np.array([t], dtype=np.int64)
        while frontier.size:
            kids = _children_of(self.graph, frontier)
            kids = kids[self.state[kids] != X]
            bad = kids[self.state[kids] != P]
            if bad.size:
                self._move(int(bad[0]), X, now)  # raises, with that task's history
            self.state[kids] = X
            self._count[P] -= kids.size
            self._count[X] += kids.size
            self._log.extend(kids, P, X, now)
            if self.listeners:
                self._trans.extend((k, _STATE[P], _STATE[X]) for k in kids.tolist())
            frontier = kids

    def _node_lost(self, event: NodeLost) -> None:
        if not (0 <= event.node < self.cluster.size) or not self.cluster.up[event.node]:
            return
        for t in self.cluster.lose(event.node).tolist():
            self.policy.released(t, event.node)
            queued = self.queue.drop_chain(t)
            for q in queued:   # they held no resources, but counted for their label
                self.cluster.running[self._labels[q]] -= 1
            for q in [t, *queued]:
                self.attempts[q] -= 1  # a lost attempt does not count
                self._move(q, R, event.time)
                self.node_of[q] = -1
                self.policy.add((q,), self.memory_request)

    # ---- queue-ahead --------------------------------------------------------------

    def _hand_off(self, t: int, now: float) -> None:
        """``t``'s attempt ended: the task queued behind it takes its resources."""
        q = self.queue.ended(t)
        if q < 0:
            return
        node, memory, cpus = self.node_of.item(q), self.memory_request.item(q), self._cpus[q]
        self.cluster.place(q, node, memory, cpus, self._labels[q], now, counted=True)
        self.policy.placed(q, node, memory, cpus)
        tail = self.queue.tail(q)   # the chain moved up: its end may take one more
        self.queue.offer(tail, self.cluster.label_estimate.item(self._labels[tail]))

    def _unqueue_early(self, t: int) -> None:
        """A queued ``t`` ended before its predecessor (an agent never reports that; kept
        consistent all the same): it leaves the chain, the task behind it moves up."""
        self.queue.unlink(t)
        self.cluster.running[self._labels[t]] -= 1

    # ---- launching ----------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """True once nothing new will be launched (drained or too many failures)."""
        return self._drained or (self.max_failures is not None and self._count[F] >= self.max_failures)

    def _dispatch(self, now: float) -> list[Launch]:
        if self.stopped:
            return []
        launches = [self._launch(t, node, now) for t, node in self.policy.select(self.cluster, now)]
        if self.queue.tails:
            launches += queue_ahead(self, now)
        idle = self.cluster.n_active == 0 and self._count[R] > 0
        self._stalled = idle and not launches
        return launches

    def _launch(self, t: int, node: int, now: float) -> Launch:
        c = self.cluster
        memory, cpus = self.memory_request.item(t), self._cpus[t]
        if memory > c.fm[node] or cpus > c.fc[node] or not c.up[node]:
            raise RuntimeError(f"policy over-committed node {node} with task {t}")
        self._move(t, L, now)
        attempt = self.attempts.item(t) + 1
        self.attempts[t] = attempt
        self.node_of[t] = node
        self.start_time[t] = now
        c.place(t, node, memory, cpus, self._labels[t], now)
        if self.queue.horizon > 0:
            self.queue.offer(t, c.label_estimate.item(self._labels[t]))
        return new_launch(t, attempt, node, memory, cpus, -1)

    def _promote(self, tasks: np.ndarray, now: float) -> None:
        """PENDING -> READY for ``tasks`` (all parents done) and hand them to the policy."""
        if len(tasks) == 1:
            t = int(tasks[0])
            if self.state.item(t) == P:
                self._move(t, R, now)
                self.policy.add((t,), self.memory_request)
            return
        tasks = np.asarray(tasks, dtype=np.int64)
        tasks = tasks[self.state[tasks] == P]
        if not tasks.size:
            return
        self.state[tasks] = R
        self._count[P] -= tasks.size
        self._count[R] += tasks.size
        self._log.extend(tasks, P, R, now)
        if self.listeners:
            self._trans.extend((t, _STATE[P], _STATE[R]) for t in tasks.tolist())
        self.policy.add(tasks, self.memory_request)

    def _move(self, t: int, new: int, now: float) -> None:
        old = self.state.item(t)
        if not ALLOWED_TABLE[old][new]:
            raise IllegalTransition(t, self.graph.ids[t], old, new, self._log.history(t))
        self.state[t] = new
        self._count[old] -= 1
        self._count[new] += 1
        self._log.append(t, old, new, now)
        self._trans.append((t, _STATE[old], _STATE[new]))

    # ---- outcome ------------------------------------------------------------------

    def history(self, task: int) -> list[tuple[float, State, State]]:
        """(time, old, new) for every transition ``task`` made."""
        return [(tm, State(a), State(b)) for tm, a, b in self._log.history(task)]

    def counts(self) -> dict[State, int]:
        return {s: self._count[s] for s in State}

    @property
    def finished(self) -> bool:
        """Nothing running and nothing more will be launched."""
        if self.cluster.n_active:
            return False
        return self.stopped or self._count[R] == 0 or self._stalled

    def exit_code(self) -> int:
        """0 all done; 3 work left after a drain, the deadline or with no node able to run
        it (resubmit); 1 some task failed or was skipped, or max_failures stopped the run."""
        c = self._count
        left = c[P] + c[R] + c[L] + c[U]
        if left and (self._drained or self._stalled):
            return EXIT_INTERRUPTED
        if left or c[F] or c[X]:
            return EXIT_FAILED
        return EXIT_OK

    def validate(self) -> None:
        """Check the invariants; raises AssertionError naming the first one broken."""
        from pilot.engine_check import validate_engine

        validate_engine(self)


def numpy_mean(values: list) -> float:
    """``float(np.mean(values))`` to the last bit, without numpy for short lists: numpy
    sums float64 pairwise, sequentially below 8 values and with 8 accumulators up to 128."""
    n = len(values)
    if n > 128:
        return float(np.mean(np.array(values, dtype=np.float64)))
    if n < 8:
        total = 0.0
        for v in values:
            total += v
        return total / n
    acc, i, end = list(values[:8]), 8, n - n % 8
    while i < end:
        for j in range(8):
            acc[j] += values[i + j]
        i += 8
    total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for v in values[end:]:
        total += v
    return total / n


def event_time(event) -> float:
    """The time an event happened (its end for a finished attempt)."""
    return event.end if type(event) is TaskFinished else event.time


def _children_of(graph, tasks: np.ndarray) -> np.ndarray:
    """Sorted distinct children of ``tasks`` (CSR rows gathered in numpy)."""
    starts, ends = graph.child_ptr[tasks], graph.child_ptr[tasks + 1]
    counts = ends - starts
    if not counts.sum():
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return np.unique(graph.child_idx[np.arange(int(counts.sum())) + offsets])


def parents_not_done(graph, state: np.ndarray) -> np.ndarray:
    """Per task, how many of its parents are not DONE."""
    n = graph.size
    child_of_edge = np.repeat(np.arange(n), np.diff(graph.parent_ptr))
    not_done = (state[graph.parent_idx] != D).astype(np.int64)
    return np.bincount(child_of_edge, weights=not_done, minlength=n).astype(np.int32)
