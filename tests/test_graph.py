"""The Graph in arrays: building, topological order, priorities, identity, fit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pilot import graph as graph_module
from pilot.errors import UserError
from pilot.events import Node
from pilot.graph import (check_fits, graph_from_edges, graph_hash, make_graph, priorities,
                         task_weights, topological_order)


def diamond(**values):
    return make_graph(["a", "b", "c", "d"], ["x", "y", "y", "z"], [[], [0], [0], [1, 2]], **values)


@st.composite
def dags(draw, max_tasks=40):
    """Random DAGs: each task's parents are drawn from lower numbers, then tasks are
    renumbered by a random permutation so that numbering says nothing about order."""
    n = draw(st.integers(1, max_tasks))
    parents = [draw(st.lists(st.integers(0, i - 1), max_size=4)) if i else [] for i in range(n)]
    perm = draw(st.permutations(range(n)))
    renamed = [[] for _ in range(n)]
    for i, ps in enumerate(parents):
        renamed[perm[i]] = [perm[p] for p in ps]
    labels = [draw(st.sampled_from("abc")) for _ in range(n)]
    return make_graph([f"t{i}" for i in range(n)], labels, renamed)


class TestMakeGraph:
    def test_csr_both_ways(self):
        g = diamond()
        assert g.parents(3).tolist() == [1, 2]
        assert g.children(0).tolist() == [1, 2]
        assert g.children(3).tolist() == []
        assert g.labels == ["x", "y", "z"] and g.label.tolist() == [0, 1, 1, 2]

    def test_defaults(self):
        g = diamond()
        assert g.memory_mb.tolist() == [2048] * 4 and g.memory_mb.dtype == np.int64
        assert g.cpus.tolist() == [1] * 4 and g.retries.tolist() == [0] * 4
        assert g.memory_multiplier.tolist() == [1.0] * 4 and g.memory_max.tolist() == [0] * 4
        assert g.timeout.tolist() == [0.0] * 4
        assert g.commands == [""] * 4 and g.env == [None] * 4 and g.retry_unless_exit == [()] * 4

    def test_per_task_and_shared_values(self):
        g = diamond(memory_mb=[1, 2, 3, 4], cpus=2, command=["a", ["b", "1"], "c", "d"],
                    env={"X": "1"}, retry_unless_exit=(3, 4), concurrency_limit={"y": 1})
        assert g.memory_mb.tolist() == [1, 2, 3, 4] and g.cpus.tolist() == [2] * 4
        assert g.commands[1] == ["b", "1"] and g.env[2] == {"X": "1"}
        assert g.retry_unless_exit[3] == (3, 4) and g.concurrency_limit == {"y": 1}

    def test_duplicate_parents_are_merged(self):
        g = make_graph(["a", "b"], ["x", "x"], [[], [0, 0, 0]])
        assert g.parents(1).tolist() == [0] and g.child_idx.tolist() == [1]

    def test_wrong_lengths_and_keywords(self):
        with pytest.raises(ValueError):
            diamond(memory_mb=[1, 2])
        with pytest.raises(TypeError):
            diamond(memory=1)
        with pytest.raises(ValueError):
            make_graph(["a"], ["x"], [[5]])

    def test_from_edges_matches_make_graph(self):
        g = graph_from_edges(["a", "b", "c", "d"], ["x", "y", "z"], [0, 1, 1, 2],
                             parent=[2, 0, 1, 0], child=[3, 1, 3, 2])
        h = diamond()
        for name in ("parent_ptr", "parent_idx", "child_ptr", "child_idx", "label"):
            assert getattr(g, name).tolist() == getattr(h, name).tolist()


class TestOrder:
    def test_cycle_names_the_cycle_in_order(self):
        g = make_graph(["s", "a", "b", "c"], ["x"] * 4, [[], [0, 3], [1], [2]])
        with pytest.raises(UserError, match=r"^cycle: a -> b -> c -> a$"):
            topological_order(g)

    def test_self_loop(self):
        with pytest.raises(UserError, match=r"^cycle: a -> a$"):
            topological_order(make_graph(["a"], ["x"], [[0]]))

    def test_odd_ids_stay_on_one_line(self):
        g = make_graph(["a\nb", "c"], ["x", "x"], [[1], [0]])
        with pytest.raises(UserError) as err:
            topological_order(g)
        assert "\n" not in str(err.value) and "'a\\nb'" in str(err.value)

    @settings(max_examples=40, deadline=None)
    @given(dags())
    def test_order_respects_every_edge(self, g):
        order = topological_order(g)
        assert sorted(order.tolist()) == list(range(g.size))
        position = np.empty(g.size, dtype=np.int64)
        position[order] = np.arange(g.size)
        for t in range(g.size):
            assert all(position[p] < position[t] for p in g.parents(t))

    @settings(max_examples=40, deadline=None)
    @given(dags(max_tasks=15), st.data())
    def test_closing_any_path_reports_a_real_cycle(self, g, data):
        start = data.draw(st.integers(0, g.size - 1))
        assume(g.children(start).size)
        end = start
        while g.children(end).size and (end == start or data.draw(st.booleans())):
            end = int(data.draw(st.sampled_from(g.children(end).tolist())))
        parents = [g.parents(t).tolist() for t in range(g.size)]
        parents[start].append(end)
        cyclic = make_graph(g.ids, [g.labels[k] for k in g.label], parents)
        with pytest.raises(UserError) as err:
            topological_order(cyclic)
        names = str(err.value).removeprefix("cycle: ").split(" -> ")
        assert names[0] == names[-1] and len(set(names)) == len(names) - 1
        number = {tid: k for k, tid in enumerate(g.ids)}
        for a, b in zip(names, names[1:]):
            assert number[a] in parents[number[b]]


class TestPriorities:
    def test_diamond_counts_tasks(self):
        assert priorities(diamond()).tolist() == [3.0, 2.0, 2.0, 1.0]

    def test_weighted_by_label_runtime(self):
        p = priorities(diamond(), {"x": 10.0, "y": 5.0, "z": 1.0})
        assert p.tolist() == [16.0, 6.0, 6.0, 1.0]

    def test_missing_label_gets_median_of_known(self):
        w = task_weights(diamond(), {"x": 10.0, "y": 2.0})
        assert w.tolist() == [10.0, 2.0, 2.0, 6.0]

    def test_label_runtime_as_array(self):
        p = priorities(diamond(), np.array([1.0, 2.0, 3.0]))
        assert p.tolist() == [6.0, 5.0, 5.0, 3.0]

    @settings(max_examples=40, deadline=None)
    @given(dags(), st.dictionaries(st.sampled_from("abc"), st.floats(0.1, 100.0)))
    def test_parent_at_least_child_plus_own_weight(self, g, runtime):
        p = priorities(g, runtime)
        w = task_weights(g, runtime)
        for t in range(g.size):
            kids = g.children(t)
            best = max((p[c] for c in kids), default=0.0)
            assert p[t] == pytest.approx(w[t] + best)


class TestWideAndNarrowLevels:
    """Wide levels use numpy, narrow ones a Python walk: both must give the same answers."""

    @pytest.mark.parametrize("seed", [0, 1])
    def test_same_levels_and_priorities(self, monkeypatch, seed):
        rng = np.random.default_rng(seed)
        n = 3000
        parents = [rng.choice(i, size=min(i, int(rng.integers(0, 4))), replace=False).tolist()
                   if i else [] for i in range(n)]
        parents += [[n - 1 + k] for k in range(200)]  # a long tail: many one-task levels
        ids = [f"t{i}" for i in range(len(parents))]
        results = []
        for narrow in (-1, 10**9):
            monkeypatch.setattr(graph_module, "_NARROW", narrow)
            g = make_graph(ids, ["a"] * len(ids), parents)
            levels = graph_module.topological_levels(g)
            results.append(([lv.tolist() for lv in levels], priorities(g, {"a": 2.5}).tolist()))
        assert results[0] == results[1]
        assert len(results[0][0]) > 200 and max(results[0][1]) >= 2.5 * 201


class TestIdentityAndFit:
    def test_hash_ignores_requests_but_not_work(self):
        base = graph_hash(diamond())
        assert graph_hash(diamond(memory_mb=9999, retries=3)) == base
        assert graph_hash(diamond(command="other")) != base
        other_edges = make_graph(["a", "b", "c", "d"], ["x", "y", "y", "z"], [[], [0], [0], [1]])
        assert graph_hash(other_edges) != base
        renamed = make_graph(["a", "b", "c", "e"], ["x", "y", "y", "z"], [[], [0], [0], [1, 2]])
        assert graph_hash(renamed) != base

    def test_fits(self):
        g = diamond(memory_mb=[100, 4000, 100, 100], cpus=[1, 1, 8, 1])
        check_fits(g, [Node("small", 1000, 16), Node("big", 8000, 4)])
        check_fits(g, [])

    def test_does_not_fit_names_task_request_and_largest_node(self):
        g = diamond(memory_mb=[100, 4000, 100, 100], cpus=[1, 1, 8, 1])
        with pytest.raises(UserError) as err:
            check_fits(g, [Node("n1", 2000, 16), Node("n2", 3000, 4)])
        assert str(err.value) == ("task b requests 4000 MB and 1 cpus, more than the largest "
                                  "node (n2: 3000 MB, 4 cores)")

    def test_memory_and_cores_must_fit_on_the_same_node(self):
        g = diamond(memory_mb=[100, 4000, 100, 100], cpus=[1, 8, 1, 1])
        with pytest.raises(UserError, match="task b requests 4000 MB and 8 cpus"):
            check_fits(g, [Node("n1", 8000, 4), Node("n2", 1000, 16)])
