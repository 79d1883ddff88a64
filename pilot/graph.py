"""The workflow as arrays: one row per task, CSR adjacency, priorities.

Nothing on the hot path holds one Python object per task except ``ids`` and the
command/env lists that agents need; everything the engine and policy touch is numpy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from pilot.errors import UserError


@dataclass
class Graph:
    ids: list[str]                  # task ids; task number = index
    labels: list[str]               # distinct labels; label number = index
    label: np.ndarray               # int32[n] label number of each task
    memory_mb: np.ndarray           # int64[n] requestMemory (MB) of the first attempt
    cpus: np.ndarray                # int32[n] requestCpus
    retries: np.ndarray             # int32[n] numberOfRetries (extra attempts after the first)
    memory_multiplier: np.ndarray   # float64[n] memoryMultiplier (1.0 = no scaling)
    memory_max: np.ndarray          # int64[n] requestMemoryMax (0 = no cap but the largest node)
    timeout: np.ndarray             # float64[n] seconds (0 = none)
    parent_ptr: np.ndarray          # int64[n+1] CSR: parents of t are parent_idx[parent_ptr[t]:parent_ptr[t+1]]
    parent_idx: np.ndarray          # int32[e]
    child_ptr: np.ndarray           # int64[n+1] CSR: children of t
    child_idx: np.ndarray           # int32[e]
    commands: list                  # per task: str (run by /bin/sh -c) or list[str] (argv)
    env: list                       # per task: dict[str, str] or None (shared objects are fine)
    retry_unless_exit: list         # per task: tuple[int, ...] of exit codes never retried
    concurrency_limit: dict = field(default_factory=dict)  # label name -> max running at once
    extra: dict = field(default_factory=dict)               # loader-specific (e.g. LSST UUIDs, data ids)
    levels: list | None = field(default=None, repr=False, compare=False)  # cache of topological_levels

    @property
    def size(self) -> int:
        return len(self.ids)

    def parents(self, task: int) -> np.ndarray:
        return self.parent_idx[self.parent_ptr[task]:self.parent_ptr[task + 1]]

    def children(self, task: int) -> np.ndarray:
        return self.child_idx[self.child_ptr[task]:self.child_ptr[task + 1]]


# ---- building ------------------------------------------------------------------------

_DEFAULTS = {
    "memory_mb": 2048,
    "cpus": 1,
    "retries": 0,
    "multiplier": 1.0,
    "memory_max": 0,
    "timeout": 0.0,
    "command": "",
    "env": None,
    "retry_unless_exit": (),
}
_NUMERIC = {
    "memory_mb": ("memory_mb", np.int64),
    "cpus": ("cpus", np.int32),
    "retries": ("retries", np.int32),
    "multiplier": ("memory_multiplier", np.float64),
    "memory_max": ("memory_max", np.int64),
    "timeout": ("timeout", np.float64),
}
_OBJECTS = {"command": "commands", "env": "env", "retry_unless_exit": "retry_unless_exit"}


def make_graph(ids, labels_per_task, parents, **per_task_values) -> Graph:
    """Build a :class:`Graph` from per-task lists.

    ``parents[t]`` lists the task numbers ``t`` depends on. Each keyword of
    ``memory_mb, cpus, retries, multiplier, memory_max, timeout, command, env,
    retry_unless_exit`` is either one value for every task or a sequence with one value
    per task; ``concurrency_limit`` and ``extra`` are passed through as dicts.
    """
    n = len(ids)
    counts = np.fromiter((len(p) for p in parents), dtype=np.int64, count=n)
    parent_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=parent_ptr[1:])
    flat = np.fromiter((q for p in parents for q in p), dtype=np.int64, count=int(parent_ptr[-1]))
    labels, label = _number_labels(labels_per_task)
    return graph_from_arrays(ids, labels, label, parent_ptr, flat, **per_task_values)


def _number_labels(labels_per_task) -> tuple[list[str], np.ndarray]:
    numbers: dict[str, int] = {}
    label = np.fromiter((numbers.setdefault(x, len(numbers)) for x in labels_per_task),
                        dtype=np.int32, count=len(labels_per_task))
    return list(numbers), label


def graph_from_arrays(ids, labels, label, parent_ptr, parent_idx, **per_task_values) -> Graph:
    """Build a :class:`Graph` from a label table and a parents CSR (any order, duplicates allowed).

    ``label`` holds each task's label number into ``labels``; the per-task keywords are
    those of :func:`make_graph`. Parent lists come out sorted and without duplicates.
    """
    n = len(ids)
    concurrency = dict(per_task_values.pop("concurrency_limit", None) or {})
    extra = dict(per_task_values.pop("extra", None) or {})
    unknown = set(per_task_values) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown per-task values: {sorted(unknown)}")
    parent_ptr, parent_idx, child_ptr, child_idx = _csr_both_ways(n, parent_ptr, parent_idx)
    values = {**_DEFAULTS, **per_task_values}
    fields = {name: _column(values[key], n, dtype) for key, (name, dtype) in _NUMERIC.items()}
    fields.update({name: _objects(values[key], n) for key, name in _OBJECTS.items()})
    return Graph(ids=list(ids), labels=list(labels), label=np.asarray(label, dtype=np.int32),
                 parent_ptr=parent_ptr, parent_idx=parent_idx, child_ptr=child_ptr,
                 child_idx=child_idx, concurrency_limit=concurrency, extra=extra, **fields)


def graph_from_edges(ids, labels, label, parent, child, **per_task_values) -> Graph:
    """Build a :class:`Graph` from edge arrays ``parent[k] -> child[k]`` (task numbers)."""
    n = len(ids)
    child = np.asarray(child, dtype=np.int64)
    order = np.argsort(child, kind="stable")
    parent_ptr = _ptr_from_sorted(child[order], n)
    return graph_from_arrays(ids, labels, label, parent_ptr, np.asarray(parent)[order],
                             **per_task_values)


def _column(value, n: int, dtype) -> np.ndarray:
    if np.isscalar(value):
        return np.full(n, value, dtype=dtype)
    column = np.asarray(value, dtype=dtype)
    if column.shape != (n,):
        raise ValueError(f"expected {n} per-task values, got shape {column.shape}")
    return column


def _objects(value, n: int) -> list:
    if value is None or isinstance(value, (str, dict, tuple)):
        return [value] * n
    column = list(value)
    if len(column) != n:
        raise ValueError(f"expected {n} per-task values, got {len(column)}")
    return column


def _csr_both_ways(n: int, parent_ptr, parent_idx):
    """Sorted, de-duplicated parents CSR and the matching children CSR."""
    parent_ptr = np.asarray(parent_ptr, dtype=np.int64)
    parent = np.asarray(parent_idx, dtype=np.int64)
    child = np.repeat(np.arange(n, dtype=np.int64), np.diff(parent_ptr))
    if parent.size and (parent.min() < 0 or parent.max() >= n):
        raise ValueError("parent task number out of range")
    key = _sorted_unique(child * n + parent)
    child, parent = np.divmod(key, n) if n else (key, key)
    new_parent_ptr = _ptr_from_sorted(child, n)
    # the keys are unique, so a plain sort of parent * n + child orders the children CSR
    # (several times faster than a stable argsort by parent)
    children = np.sort(parent * n + child) % n if n else key
    return (new_parent_ptr, parent.astype(np.int32), _ptr_from_sorted(parent, n),
            children.astype(np.int32))


def _sorted_unique(values: np.ndarray, counts: bool = False):
    """np.unique by sort and compare: several times faster than np.unique in numpy 2.4."""
    ordered = np.sort(values)
    first = np.ones(ordered.size, dtype=bool)
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    if not counts:
        return ordered[first]
    starts = np.flatnonzero(first)
    return ordered[starts], np.diff(np.append(starts, ordered.size))


def _ptr_from_sorted(rows: np.ndarray, n: int) -> np.ndarray:
    ptr = np.zeros(n + 1, dtype=np.int64)
    if n:
        np.cumsum(np.bincount(rows, minlength=n), out=ptr[1:])
    return ptr


# ---- order and priorities -----------------------------------------------------------


def _gather(ptr: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Concatenation of the CSR rows ``rows`` (vectorised)."""
    starts = ptr[rows]
    counts = ptr[rows + 1] - starts
    total = int(counts.sum())
    if total == 0:
        return idx[:0]
    shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return idx[np.arange(total, dtype=np.int64) + shift]


def topological_levels(graph: Graph) -> list[np.ndarray]:
    """Kahn's algorithm one level at a time: level k holds the tasks whose longest
    chain of ancestors has k tasks, each level sorted. Raises UserError on a cycle.

    Wide levels are handled with whole-array numpy operations, narrow ones (long chains)
    task by task, where numpy's per-call cost would dominate. The result is cached in
    ``graph.levels`` (a Graph is not changed after it is built).
    """
    if graph.levels is not None:
        return graph.levels
    indeg = np.diff(graph.parent_ptr)
    views = (memoryview(graph.child_ptr), memoryview(graph.child_idx), memoryview(indeg))
    frontier = np.flatnonzero(indeg == 0)
    levels, placed = [], 0
    while frontier.size:
        levels.append(frontier)
        placed += frontier.size
        if frontier.size > _NARROW:
            frontier = _next_level_wide(graph, indeg, frontier)
        else:
            frontier = _next_level_narrow(frontier, *views)
    if placed < graph.size:
        raise UserError("cycle: " + " -> ".join(_show(graph.ids[t]) for t in _find_cycle(graph, indeg)))
    graph.levels = levels
    return levels


_NARROW = 32  # levels up to this many tasks are walked in Python


def _next_level_wide(graph: Graph, indeg: np.ndarray, frontier: np.ndarray) -> np.ndarray:
    kids, counts = _sorted_unique(_gather(graph.child_ptr, graph.child_idx, frontier),
                                  counts=True)
    indeg[kids] -= counts
    return kids[indeg[kids] == 0].astype(np.int64)


def _next_level_narrow(frontier: np.ndarray, ptr, idx, indeg) -> np.ndarray:
    ready = []
    for t in frontier.tolist():
        for kid in idx[ptr[t]:ptr[t + 1]]:
            indeg[kid] -= 1
            if indeg[kid] == 0:
                ready.append(kid)
    ready.sort()
    return np.array(ready, dtype=np.int64)


def topological_order(graph: Graph) -> np.ndarray:
    """Task numbers with every parent before its children; UserError naming one cycle."""
    levels = topological_levels(graph)
    return np.concatenate(levels) if levels else np.zeros(0, dtype=np.int64)


def _find_cycle(graph: Graph, indeg: np.ndarray) -> list[int]:
    """One cycle among the tasks Kahn could not place, in dependency order, closed."""
    stuck = indeg > 0
    seen: dict[int, int] = {}
    walk = [int(np.flatnonzero(stuck)[0])]
    # every stuck task has a stuck parent, so walking up parents must repeat a task
    while walk[-1] not in seen:
        seen[walk[-1]] = len(walk) - 1
        walk.append(next(int(p) for p in graph.parents(walk[-1]) if stuck[p]))
    cycle = walk[seen[walk[-1]]:]
    return cycle[::-1]


def _show(text: str) -> str:
    return text if text.isprintable() and text and " " not in text else repr(text)


def task_weights(graph: Graph, label_runtime=None) -> np.ndarray:
    """Per-task weight: the label's runtime estimate when known, else 1.

    ``label_runtime`` maps label name to seconds, or is a sequence indexed by label
    number. Labels missing from a non-empty mapping get the median of the known ones,
    so that known and unknown labels stay in the same unit.
    """
    if label_runtime is None or len(label_runtime) == 0:
        return np.ones(graph.size)
    if isinstance(label_runtime, dict):
        known = [float(v) for v in label_runtime.values()]
        fill = float(np.median(known))
        per_label = np.array([float(label_runtime.get(x, fill)) for x in graph.labels])
    else:
        per_label = np.asarray(label_runtime, dtype=np.float64)
    return per_label[graph.label] if graph.size else np.zeros(0)


def priorities(graph: Graph, label_runtime=None) -> np.ndarray:
    """Longest remaining path from each task to a sink, counting the task itself.

    Weighted by :func:`task_weights`; computed level by level over the topological
    order, from the last level back: ``p[t] = w[t] + max(p[children])``.
    """
    p = task_weights(graph, label_runtime).astype(np.float64, copy=True)
    views = (memoryview(graph.child_ptr), memoryview(graph.child_idx), memoryview(p))
    for level in reversed(topological_levels(graph)):
        if level.size > _NARROW:
            _add_longest_child_wide(graph, p, level)
        else:
            _add_longest_child_narrow(level, *views)
    return p


def _add_longest_child_wide(graph: Graph, p: np.ndarray, level: np.ndarray) -> None:
    ptr, idx = graph.child_ptr, graph.child_idx
    counts = ptr[level + 1] - ptr[level]
    has = counts > 0
    if has.any():
        values = p[_gather(ptr, idx, level[has])]
        offsets = np.cumsum(counts[has]) - counts[has]
        p[level[has]] += np.maximum.reduceat(values, offsets)


def _add_longest_child_narrow(level: np.ndarray, ptr, idx, p) -> None:
    for t in level.tolist():
        start, end = ptr[t], ptr[t + 1]
        if end > start:
            p[t] += max(p[kid] for kid in idx[start:end])


# ---- identity and fit ---------------------------------------------------------------


def graph_hash(graph: Graph) -> str:
    """sha256 of the work itself: task ids, edges and commands (not the requests)."""
    digest = hashlib.sha256()
    digest.update(b"pilot-graph-1\0")
    digest.update(str(graph.size).encode() + b"\0")
    digest.update("\0".join(graph.ids).encode("utf-8", "surrogatepass"))
    digest.update(np.ascontiguousarray(graph.parent_ptr, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(graph.parent_idx, dtype="<i4").tobytes())
    digest.update(json.dumps(graph.commands, ensure_ascii=True).encode())
    return digest.hexdigest()


def check_fits(graph: Graph, nodes) -> None:
    """UserError naming the first task whose request fits on no node (memory and cores)."""
    if not nodes or graph.size == 0:
        return
    fits = np.zeros(graph.size, dtype=bool)
    for node in {(n.memory_mb, n.cores) for n in nodes}:
        fits |= (graph.memory_mb <= node[0]) & (graph.cpus <= node[1])
    if fits.all():
        return
    t = int(np.flatnonzero(~fits)[0])
    big = max(nodes, key=lambda n: (n.memory_mb, n.cores))
    raise UserError(
        f"task {_show(graph.ids[t])} requests {int(graph.memory_mb[t])} MB and "
        f"{int(graph.cpus[t])} cpus, more than the largest node "
        f"({_show(big.name)}: {big.memory_mb} MB, {big.cores} cores)")
