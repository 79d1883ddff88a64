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
    queued = np.array(sorted(engine.queue.after_of), dtype=np.int64)
    assert np.array_equal(active, np.union1d(tasks, queued)) and not np.intersect1d(tasks, queued).size, \
        "launched/running tasks != tasks placed on nodes + tasks queued behind them"
    order = np.argsort(c.act_task[:n])
    assert np.array_equal(engine.node_of[tasks], c.act_node[:n][order]), "node_of disagrees with placement"
    _check_queued(engine)
    labels = np.bincount(engine.graph.label[active], minlength=len(c.label_running))
    assert np.array_equal(labels, c.label_running), "per-label running counts are wrong"
    assert (c.label_running <= c.label_limit).all(), "a concurrency limit is exceeded"


def _check_queued(engine) -> None:
    """A queued task waits, on its predecessor's node, for no more than its predecessor holds,
    behind a chain that starts at a placed task."""
    qa, c = engine.queue, engine.cluster
    assert all(qa.next_of[x] == q for q, x in qa.after_of.items()) and len(qa.next_of) == len(qa.after_of), \
        "queue-ahead links disagree"
    assert qa.queued_at.keys() == qa.after_of.keys(), "a queued task has no queueing time, or a placed one has"
    for q, x in qa.after_of.items():
        assert engine.state[q] == L, "a queued task is not LAUNCHED"
        assert engine.node_of[q] == engine.node_of[x], "a queued task is on another node than its predecessor"
        assert engine.memory_request[q] <= engine.memory_request[x] and engine._cpus[q] <= engine._cpus[x], \
            "a queued task needs more than its predecessor holds"
        assert c.is_active(qa.root(q)), "a queue-ahead chain does not start at a placed task"
    assert all(engine.state[t] in (L, U) for t in qa.tails), "a finished task may still get a task queued behind"
    assert qa.after_of.keys() <= qa.chain_of.keys(), "a queued task is in no chain's record"
    for t, chain in qa.chain_of.items():
        head = qa.root(t)
        members = [head, *qa.chain(head)]
        assert qa.chain_of.get(head) is chain and chain == members, \
            "a chain's record (its tasks in order) disagrees with its links"


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
