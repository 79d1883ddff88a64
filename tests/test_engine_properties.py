"""Property-based tests: random DAGs, node sets, runtimes and failures, run through the
simulator with the real engine, checking the invariants after every event and the retry
and memory-scaling rules against an independent reading of them."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilot.engine import Engine
from pilot.events import Drain, Failure, Node, Schedule, State, TaskFinished
from pilot.graph import make_graph
from pilot.policy import DefaultPolicy
from pilot.simulate import simulate

P, R, L, U, D, F, X = (int(s) for s in State)
UNCOUNTED = (Failure.INTERRUPTED, Failure.LOST)
QUEUE_AHEAD = st.sampled_from([0.0, 2.0, 100.0])   # off, short tasks only, every task
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Workload:
    """A random graph, nodes, runtimes and failure rules, all from one seed."""

    def __init__(self, seed: int, n: int, n_nodes: int):
        rng = np.random.default_rng(seed)
        self.nodes = [Node(f"n{j}", int(rng.choice([2000, 4000, 8000])), int(rng.integers(1, 5)))
                      for j in range(n_nodes)]
        big = max(self.nodes, key=lambda nd: (nd.memory_mb, nd.cores))
        parents = [sorted(set(rng.choice(i, size=min(i, int(rng.integers(0, 3))), replace=False).tolist()))
                   if i else [] for i in range(n)]
        memory = np.minimum(rng.choice([500, 1000, 2000, 3000, 6000], n), big.memory_mb)
        self.graph = make_graph(
            [f"t{i}" for i in range(n)], rng.choice(["a", "b", "c"], n).tolist(), parents,
            memory_mb=memory, cpus=np.minimum(rng.integers(1, 4, n), big.cores),
            retries=rng.integers(0, 3, n), multiplier=rng.choice([1.0, 1.5, 2.0], n),
            memory_max=np.where(rng.random(n) < 0.3, memory * 2, 0),
            retry_unless_exit=[(2,) if x else () for x in rng.random(n) < 0.5],
            concurrency_limit={"b": 1} if rng.random() < 0.3 else {})
        self.runtimes = rng.uniform(0.1, 5.0, n)
        self.peak = (memory * rng.choice([0.5, 1.3, 2.5, 100.0], n, p=[0.6, 0.2, 0.1, 0.1])).astype(int)
        self.fail_p = float(rng.choice([0.0, 0.2, 0.4]))
        self.seed, self.n, self.n_nodes = seed, n, n_nodes
        self.calls: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"Workload({self.seed}, {self.n}, {self.n_nodes})"

    def outcome(self, task: int, attempt: int, memory: int):
        call = self.calls[task] = self.calls.get(task, 0) + 1
        rng = np.random.default_rng([self.seed, task, call])
        if call == 1 and rng.random() < 0.1:
            return (Failure.INTERRUPTED, None)
        if rng.random() < self.fail_p:
            return (Failure.EXIT, int(rng.choice([1, 2])))
        return None


@st.composite
def workloads(draw, max_tasks: int = 25):
    return Workload(draw(st.integers(0, 2**32 - 1)), draw(st.integers(1, max_tasks)),
                    draw(st.integers(1, 4)))


class Checker:
    """Listener + per-event check: validate(), and the retry and memory rules read
    independently from the graph."""

    def __init__(self, graph, nodes):
        self.g = graph
        self.nodes = nodes
        self.ooms = np.zeros(graph.size, dtype=int)
        self.counted = np.zeros(graph.size, dtype=int)
        self.done_at = np.full(graph.size, np.nan)
        self.launches = np.zeros(graph.size, dtype=int)
        self.attempt_mem = np.zeros(graph.size, dtype=int)
        self.expected_ends: list[float] = []
        self.engine = None

    def bind(self, engine) -> None:
        self.engine = engine
        engine.listeners.append(self)

    def cap(self, t: int) -> float:
        mx = int(self.g.memory_max[t])
        largest = max(nd.memory_mb for nd in self.nodes if nd.cores >= self.g.cpus[t])
        return min(mx, largest) if mx > 0 else largest

    def expected_memory(self, t: int) -> int:
        base, mult = int(self.g.memory_mb[t]), float(self.g.memory_multiplier[t])
        if mult <= 1 or self.ooms[t] == 0:
            return base
        return max(base, min(math.ceil(base * mult ** self.ooms[t]), self.cap(t)))

    def record(self, event, transitions) -> None:
        for t, old, new in transitions:
            if new == State.LAUNCHED:
                self.on_launch(t, event)
            elif new == State.DONE:
                self.done_at[t] = event.end
            elif type(event) is TaskFinished and old in (State.LAUNCHED, State.RUNNING):
                self.on_failed_attempt(t, new, event)

    def on_launch(self, t: int, event) -> None:
        e = self.engine
        now = event.end if type(event) is TaskFinished else event.time
        parents = self.g.parents(t)
        assert not np.isnan(self.done_at[parents]).any() and (self.done_at[parents] <= now).all()
        assert e.memory_request[t] == self.expected_memory(t)
        self.launches[t] += 1
        self.attempt_mem[t] = e.memory_request[t]
        self.expected_ends.append(now + e.cluster.label_estimate[self.g.label[t]])

    def on_failed_attempt(self, t: int, new, event) -> None:
        if event.failure in UNCOUNTED:
            assert new == State.READY
            return
        self.counted[t] += 1
        g = self.g
        never = event.failure == Failure.EXIT and event.exit_code in g.retry_unless_exit[t]
        out_of_tries = self.counted[t] > g.retries[t]
        at_cap = (event.failure == Failure.OOM and g.memory_multiplier[t] > 1
                  and self.attempt_mem[t] >= self.cap(t))
        if event.failure == Failure.OOM:
            self.ooms[t] += 1
        assert (new == State.FAILED) == (never or out_of_tries or at_cap), (t, new, event)

    def __call__(self, engine, event) -> None:
        engine.validate()


def run_checked(w: Workload, policy, **options):
    checker = Checker(w.graph, w.nodes)
    result = simulate(w.graph, w.nodes, policy, w.runtimes, peak_mb=w.peak, outcome=w.outcome,
                      check=checker, setup=checker.bind, **options)
    return result, checker


def assert_outcome_consistent(engine) -> None:
    """Every task done, failed or dep_fail; dep_fail only below a failure; exit code."""
    g, state = engine.graph, engine.state
    assert np.isin(state, (D, F, X)).all()
    for t in np.flatnonzero(state == X):
        assert any(state[p] in (F, X) for p in g.parents(t))
    for t in np.flatnonzero(state == D):
        assert (state[g.parents(t)] == D).all()
    assert engine.finished
    assert engine.exit_code() == (0 if (state == D).all() else 1)


@SETTINGS
@given(workloads(), st.booleans(), QUEUE_AHEAD)
def test_random_runs_keep_every_invariant(w, started, queue_ahead):
    result, checker = run_checked(w, DefaultPolicy(), started=started, queue_ahead_s=queue_ahead)
    assert_outcome_consistent(result.engine)
    assert (checker.launches[result.engine.state == X] == 0).all()
    assert not result.engine.queue.after_of and not result.engine.queue.tails


@SETTINGS
@given(workloads(), st.floats(0.0, 6.0), QUEUE_AHEAD)
def test_queued_tasks_of_a_lost_node_go_back_to_ready(w, when, queue_ahead):
    """A node lost mid-run takes its queued tasks with it: they run elsewhere, uncounted."""
    nodes = w.nodes + [Node("spare", max(n.memory_mb for n in w.nodes), max(n.cores for n in w.nodes))]
    checker = Checker(w.graph, nodes)
    result = simulate(w.graph, nodes, DefaultPolicy(), w.runtimes, peak_mb=w.peak, outcome=w.outcome,
                      check=checker, setup=checker.bind, lose=[(when, 0)], queue_ahead_s=queue_ahead)
    assert_outcome_consistent(result.engine)
    assert not result.engine.queue.after_of


@SETTINGS
@given(workloads(), st.floats(0.0, 8.0), QUEUE_AHEAD)
def test_drain_stops_launching_and_leaves_exit_3(w, when, queue_ahead):
    result, checker = run_checked(w, DefaultPolicy(), drain_at=when, queue_ahead_s=queue_ahead)
    e = result.engine
    assert e.finished
    launched_after = [t for t, tm, new in _launch_times(e) if tm > when]
    assert launched_after == []
    left = np.isin(e.state, (P, R)).any()
    assert e.exit_code() == (3 if left else (0 if (e.state == D).all() else 1))


@SETTINGS
@given(workloads(), st.floats(0.5, 10.0), st.floats(0.0, 2.0), QUEUE_AHEAD)
def test_deadline_launches_only_work_expected_to_end_in_time(w, deadline, margin, queue_ahead):
    result, checker = run_checked(w, DefaultPolicy(), deadline=deadline, margin_s=margin,
                                  queue_ahead_s=queue_ahead)
    e = result.engine
    assert all(end <= deadline - margin for end in checker.expected_ends)
    left = np.isin(e.state, (P, R)).any()
    assert e.finished and (e.exit_code() == 3) == bool(left)


@SETTINGS
@given(workloads(), st.floats(0.5, 6.0))
def test_restore_never_redoes_done_work(w, when):
    first, _ = run_checked(w, DefaultPolicy(), drain_at=when)
    e1 = first.engine
    done_before = e1.state == D
    e2 = Engine(w.graph, w.nodes)
    e2.restore(e1.state, e1.attempts, e1.memory_request)
    e2.validate()
    assert (e2.state[done_before] == D).all()
    assert not np.isin(e2.state, (L, U)).any()
    launched = set()
    pending = e2.handle(Schedule(0.0))
    now = 0.0
    while pending:
        a = pending.pop(0)
        launched.add(a.task)
        now += 1.0
        pending += e2.handle(TaskFinished(a.task, a.attempt, a.node, Failure.NONE, 0, None, now - 1, now))
        e2.validate()
    assert not (launched & set(np.flatnonzero(done_before).tolist()))
    assert e2.finished and e2.handle(Drain(now)) == []


def _launch_times(engine):
    tasks, old, new, times = engine._log.columns()
    pick = new == L
    return list(zip(tasks[pick].tolist(), times[pick].tolist(), new[pick].tolist()))


def run_recorded(w: Workload, batch: int):
    """A checked run (validate() after every handle or handle_many) with a MemoryCheckpoint."""
    from pilot.checkpoint import MemoryCheckpoint

    w.calls = {}   # the same outcome for each task's n-th attempt in every run
    checker, ckpt = Checker(w.graph, w.nodes), MemoryCheckpoint(w.graph)

    def setup(engine):
        ckpt.attach(engine)
        engine.listeners.append(ckpt)
        checker.bind(engine)

    result = simulate(w.graph, w.nodes, DefaultPolicy(), w.runtimes, peak_mb=w.peak,
                      outcome=w.outcome, check=checker, setup=setup, batch=batch)
    return result.engine, ckpt.table


@SETTINGS
@given(workloads(), st.integers(2, 6))
def test_batches_end_as_one_event_at_a_time(w, batch):
    """handle_many over the earliest waiting events (dispatching once per batch) ends with
    the same states, attempts, memory requests and checkpoint content as one handle per
    event: each task's fate depends only on its own attempts."""
    one, table_one = run_recorded(w, 1)
    many, table_many = run_recorded(w, batch)
    assert_outcome_consistent(many)
    for name in ("state", "attempts", "memory_request"):
        assert np.array_equal(getattr(one, name), getattr(many, name)), name
    for name in ("state", "attempts", "memory_request", "failure", "exit_code", "signal"):
        assert np.array_equal(getattr(table_one, name), getattr(table_many, name)), name
    assert np.array_equal(table_many.state, many.state)
