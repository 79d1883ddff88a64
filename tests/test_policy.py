"""Packing policies: a shared class every policy must pass, then each policy's own rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from pilot.engine import Engine
from pilot.events import Failure, Node, Schedule, State, TaskFinished
from pilot.graph import make_graph
from pilot.policy import POLICIES, DefaultPolicy, FifoPolicy, SlotsPolicy, make_policy
from pilot.simulate import simulate
from tests.test_engine_properties import SETTINGS, assert_outcome_consistent, run_checked, workloads

P, R, L, U, D, F, X = (int(s) for s in State)


def graph(n, parents=None, labels=None, **values):
    return make_graph([f"t{i}" for i in range(n)], labels or ["a"] * n, parents or [[]] * n, **values)


class RunningCounter:
    """Listener: the most tasks of each label launched or running at once."""

    def __init__(self, engine):
        self.engine = engine
        self.peak = np.zeros(len(engine.graph.labels), dtype=int)

    def record(self, event, transitions):
        e = self.engine
        active = np.isin(e.state, (L, U))
        now = np.bincount(e.graph.label[active], minlength=len(self.peak))
        self.peak = np.maximum(self.peak, now)


@pytest.mark.parametrize("name", sorted(POLICIES))
class TestAnyPolicy:
    """What every policy must do."""

    @SETTINGS
    @given(w=workloads())
    def test_random_runs_keep_every_invariant(self, name, w):
        result, _ = run_checked(w, make_policy(name))
        assert_outcome_consistent(result.engine)

    def test_first_selection_is_ready_tasks_once_within_capacity(self, name):
        rng = np.random.default_rng(7)
        n = 300
        parents = [[int(rng.integers(0, i))] if i and rng.random() < 0.3 else [] for i in range(n)]
        g = graph(n, parents, memory_mb=rng.choice([500, 1500, 3000, 7000], n), cpus=rng.integers(1, 4, n))
        nodes = [Node(f"n{j}", int(m), int(c)) for j, (m, c) in enumerate([(8000, 4), (16000, 8), (7000, 3)])]
        e = Engine(g, nodes, make_policy(name))
        ready = set(np.flatnonzero(e.state == R).tolist())
        launches = e.handle(Schedule(0.0))
        tasks = [a.task for a in launches]
        assert tasks and len(tasks) == len(set(tasks)) and set(tasks) <= ready
        for j, node in enumerate(nodes):
            mine = [a for a in launches if a.node == j]
            assert sum(a.memory_mb for a in mine) <= node.memory_mb
            assert sum(a.cpus for a in mine) <= node.cores
        e.validate()

    def test_concurrency_limit_is_respected(self, name):
        g = graph(12, labels=["x"] * 8 + ["y"] * 4, memory_mb=100, concurrency_limit={"x": 2})
        e = Engine(g, [Node("n", 100_000, 64)], make_policy(name))
        counter = RunningCounter(e)
        e.listeners.append(counter)
        pending, now = e.handle(Schedule(0.0)), 0.0
        while pending:
            a = pending.pop(0)
            now += 1.0
            pending += e.handle(TaskFinished(a.task, a.attempt, a.node, Failure.NONE, 0, None, now - 1, now))
            e.validate()
        assert counter.peak.tolist() == [2, 4]
        assert e.exit_code() == 0

    def test_a_task_too_big_for_free_space_waits(self, name):
        g = graph(2, memory_mb=[3000, 3000])
        e = Engine(g, [Node("n", 5000, 4)], make_policy(name))
        (a,) = e.handle(Schedule(0.0))
        assert e.handle(Schedule(0.5)) == []
        (b,) = e.handle(TaskFinished(a.task, a.attempt, a.node, Failure.NONE, 0, None, 0.0, 1.0))
        assert b.task == 1 - a.task


def test_default_places_longest_remaining_path_first():
    # t0 alone; t1 -> t2 -> t3 a chain: t1 has the longest remaining path
    g = graph(4, [[], [], [1], [2]], memory_mb=1000)
    e = Engine(g, [Node("n", 1000, 4)], DefaultPolicy())
    (a,) = e.handle(Schedule(0.0))
    assert a.task == 1


def test_default_ties_go_to_the_lower_task_number():
    g = graph(5, memory_mb=1000)
    e = Engine(g, [Node("n", 2000, 4)], DefaultPolicy())
    assert [a.task for a in e.handle(Schedule(0.0))] == [0, 1]


def test_default_is_best_fit_by_memory_then_cores():
    g = graph(3, memory_mb=[4000, 4000, 2500], cpus=[1, 1, 1])
    nodes = [Node("a", 8000, 8), Node("b", 3000, 8), Node("c", 3000, 2), Node("d", 6000, 8)]
    e = Engine(g, nodes, DefaultPolicy())
    placed = {a.task: a.node for a in e.handle(Schedule(0.0))}
    assert placed == {0: 3, 1: 0, 2: 2}   # tightest memory first; then fewest cores left


def test_fifo_is_first_fit_in_task_order():
    g = graph(3, [[], [], [1]], memory_mb=[2500, 1000, 1000])
    nodes = [Node("a", 3000, 8), Node("b", 3000, 8)]
    e = Engine(g, nodes, FifoPolicy())
    assert [(a.task, a.node) for a in e.handle(Schedule(0.0))] == [(0, 0), (1, 1)]


def test_slots_round_requests_up_to_whole_slots():
    # 4 slots of 1000 MB: each 1500 MB task takes 2 slots, so only two run at once
    g = graph(3, memory_mb=1500)
    e = Engine(g, [Node("n", 4000, 4)], SlotsPolicy())
    assert len(e.handle(Schedule(0.0))) == 2
    assert e.cluster.free_memory[0] == 1000 and e.policy.free_slots == [0]
    e2 = Engine(g, [Node("n", 4000, 4)], SlotsPolicy(slot_memory_mb=500))
    assert len(e2.handle(Schedule(0.0))) == 2 and e2.policy.free_slots == [2]


def test_earliest_fit_finds_the_node_that_frees_enough_soonest():
    from pilot.engine_cluster import Cluster

    memory = np.array([2000, 1000, 1500, 4000])
    cluster = Cluster([Node("a", 4000, 4), Node("b", 3000, 4)], memory, np.ones(4, dtype=np.int32),
                      np.array([0, 1, 0, 1]), 2)
    cluster.label_estimate[:] = [5.0, 10.0]
    cluster.place(0, 0, 2000, 1, 0, 0.0)   # a: ends at 5
    cluster.place(1, 0, 1000, 1, 1, 0.0)   # a: ends at 10; a has 1000 MB free
    cluster.place(2, 1, 1500, 1, 0, -2.0)  # b: ends at 3; b has 1500 MB free
    assert cluster.earliest_fit(2500, 1, 2.0) == (1, 3.0)
    assert cluster.earliest_fit(2500, 2, 2.0) == (1, 3.0)
    assert cluster.earliest_fit(3500, 1, 2.0) == (0, 10.0)
    assert cluster.earliest_fit(1200, 1, 2.0) == (1, 2.0)     # fits now
    assert cluster.earliest_fit(5000, 1, 2.0)[0] == -1        # fits no node
    assert cluster.earliest_fit(2500, 1, 8.0) == (0, 8.0)     # overdue tasks count as ending now
    assert cluster.release(0) == 0 and cluster.free_memory.tolist() == [3000, 1500]


def starvation_graph(n_small=40):
    """t0 (small) -> big -> c1 -> c2, and n_small independent small tasks."""
    n = 4 + n_small
    parents = [[], [0], [1], [2]] + [[]] * n_small
    labels = ["p", "big", "c", "c"] + ["s"] * n_small
    memory = [1000, 8000, 1000, 1000] + [1000] * n_small
    runtimes = np.array([1.0, 5.0, 10.0, 10.0] + [10.0] * n_small)
    return graph(n, parents, labels, memory_mb=memory), runtimes


def big_start(policy) -> float:
    g, runtimes = starvation_graph()
    result = simulate(g, [Node("n", 8000, 4)], policy, runtimes, check=lambda e, ev: e.validate())
    times = [tm for task, old, new, tm in zip(*result.engine._log.columns())
             if task == 1 and new == L]
    assert result.exit_code == 0
    return times[0]


def test_a_big_task_is_not_starved_by_a_stream_of_small_ones():
    # the big task is ready at t=1 while three 10 s tasks run: it gets the node when they end
    assert big_start(DefaultPolicy()) == pytest.approx(10.0)


def test_without_a_reservation_the_big_task_waits_for_the_whole_stream():
    assert big_start(FifoPolicy()) >= 100.0


def test_backfill_uses_the_reserved_node_only_for_work_that_ends_in_time():
    # like the starvation case, plus short 1 s tasks that fit before the reservation
    g, runtimes = starvation_graph(8)
    n = g.size
    g = graph(n + 6, [list(g.parents(t)) for t in range(n)] + [[]] * 6,
              [g.labels[x] for x in g.label] + ["quick"] * 6,
              memory_mb=np.r_[g.memory_mb, [1000] * 6])
    runtimes = np.r_[runtimes, [1.0] * 6]
    result = simulate(g, [Node("n", 8000, 4)], DefaultPolicy(), runtimes,
                      check=lambda e, ev: e.validate())
    log = list(zip(*result.engine._log.columns()))
    quick_starts = [tm for task, _, new, tm in log if task >= n and new == L]
    big = [tm for task, _, new, tm in log if task == 1 and new == L][0]
    assert big == pytest.approx(10.0)
    assert any(1.0 <= tm < big for tm in quick_starts)      # backfilled in the reserved window
    assert all(tm + 1.0 <= big or tm >= big for tm in quick_starts)
