"""Invariants of an :class:`pilot.engine.Engine`, checked after every event in tests."""

from __future__ import annotations

import numpy as np

from pilot.events import State

P, R, L, U, D, F, X = (int(s) for s in State)


def validate_engine(engine) -> None:
    """Raise AssertionError naming the first broken invariant."""
    _check_nodes(engine)
    _check_active(engine)
    _check_parents(engine)
    _check_counts(engine)


def _check_nodes(engine) -> None:
    c = engine.cluster
    mem, cpu = c.used_by_active()
    live = c.alive
    assert np.array_equal(mem[live], (c.memory - c.free_memory)[live]), "node memory in use != sum of its tasks"
    assert np.array_equal(cpu[live], (c.cores - c.free_cores)[live]), "node cores in use != sum of its tasks"
    assert (c.free_memory >= 0).all() and (c.free_cores >= 0).all(), "a node is over-committed"
    assert not (mem[~live].any() or cpu[~live].any()), "a lost node still holds tasks"


def _check_active(engine) -> None:
    c, n = engine.cluster, engine.cluster.n_active
    active = np.flatnonzero(np.isin(engine.state, (L, U)))
    tasks = np.sort(c.act_task[:n])
    assert np.array_equal(active, tasks), "launched/running tasks != tasks placed on nodes"
    order = np.argsort(c.act_task[:n])
    assert np.array_equal(engine.node_of[tasks], c.act_node[:n][order]), "node_of disagrees with placement"
    labels = np.bincount(engine.graph.label[tasks], minlength=len(c.label_running))
    assert np.array_equal(labels, c.label_running), "per-label running counts are wrong"
    assert (c.label_running <= c.label_limit).all(), "a concurrency limit is exceeded"


def _check_parents(engine) -> None:
    from pilot.engine import parents_not_done

    waiting = parents_not_done(engine.graph, engine.state)
    started = np.isin(engine.state, (R, L, U, D))
    assert not waiting[started].any(), "a ready/launched/running/done task has a parent not done"
    assert np.array_equal(waiting[engine.state == P], np.array(engine._waiting)[engine.state == P]), \
        "waiting-parent counters are wrong"
    assert not ((engine.state == P) & (waiting == 0)).any(), "a pending task has all parents done"


def _check_counts(engine) -> None:
    counts = np.bincount(engine.state, minlength=len(State)).tolist()
    assert counts == list(engine._count), "state counters disagree with the state array"
    queued = getattr(engine.policy, "queued", None)
    if queued is not None:
        assert queued() == counts[R], "the policy's queue does not hold exactly the ready tasks"
    assert (engine.attempts >= 0).all(), "negative attempt count"
