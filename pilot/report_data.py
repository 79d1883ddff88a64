"""The numbers of a run report, computed from :class:`pilot.report_read.RunData` in numpy.

Pure: no I/O, no plotting. Everything is vectorised over tasks and attempts; Python loops
run over labels, nodes or failure classes only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pilot.events import Failure, Node, State
from pilot.simulate import lower_bound

HEADROOM = 1.2          # suggested requestMemory = max peak RSS x HEADROOM ...
ROUND_MB = 128          # ... rounded up to a multiple of this


# ---- nodes --------------------------------------------------------------------------


@dataclass
class Capacity:
    """What the run's nodes offered; ``estimated`` when the checkpoint did not say."""

    nodes: int
    memory_mb: float
    cores: float
    estimated: bool

    def node_list(self) -> list[Node]:
        return [Node(f"node{i}", int(self.memory_mb), int(self.cores)) for i in range(self.nodes)]


def capacity(data, nodes=None, memory_mb=None, cores=None) -> Capacity:
    """Given capacities, or (the checkpoint does not record nodes) estimates: as many nodes
    as were used, each as large as the most any node had in use at once."""
    att = data.attempts
    used = int(att.node.max()) + 1 if att.size and att.node.max() >= 0 else 1
    n = int(nodes) if nodes else used
    estimated = memory_mb is None or cores is None
    if memory_mb is None:
        memory_mb = max(float(peak_in_use(att, att.request_mb, n).max(initial=0)), 1.0)
    if cores is None:
        cpus = data.cpus[att.task].astype(np.float64)
        cores = max(float(peak_in_use(att, cpus, n).max(initial=0)), 1.0)
    return Capacity(max(n, used), float(memory_mb), float(cores), estimated)


def peak_in_use(att, weight: np.ndarray, n_nodes: int) -> np.ndarray:
    """Exact highest sum of ``weight`` over attempts running at once, per node."""
    ok = att.node >= 0
    node, w = att.node[ok], weight[ok]
    times = np.concatenate([att.start[ok], att.end[ok]])
    keys = np.concatenate([node, node])
    deltas = np.concatenate([w, -w])
    # ends sort before starts at the same instant: a slot freed and reused is not an overlap
    order = np.lexsort((deltas, times, keys))
    keys, deltas = keys[order], deltas[order]
    level = np.cumsum(deltas)
    base = np.zeros(n_nodes)
    if not len(keys):
        return base
    first = np.r_[True, keys[1:] != keys[:-1]]
    offset = np.repeat((level - deltas)[first], np.diff(np.r_[np.flatnonzero(first), len(keys)]))
    np.maximum.at(base, keys, level - offset)
    return base


# ---- time-binned use ----------------------------------------------------------------


def time_edges(t0: float, t1: float, bins: int) -> np.ndarray:
    return np.linspace(t0, max(t1, t0 + 1.0), bins + 1)   # at least 1 s: epoch floats lose tiny steps


def binned_use(keys: np.ndarray, start: np.ndarray, end: np.ndarray, weight: np.ndarray,
               n_keys: int, edges: np.ndarray) -> np.ndarray:
    """Time-averaged sum of ``weight`` over running intervals, per key and time bin.

    The running total's integral at an edge E is sum over interval ends tau < E of
    w(E - tau), with w = +weight at a start and -weight at an end: two prefix sums of
    per-(key, bin) histograms, so the cost is O(intervals + keys x bins)."""
    bins = len(edges) - 1
    times = np.concatenate([start, end])
    w = np.concatenate([weight, -weight]).astype(np.float64)
    k = np.concatenate([keys, keys]).astype(np.int64)
    slot = np.clip(np.searchsorted(edges, times, side="right"), 0, bins + 1)
    flat = k * (bins + 2) + slot
    size = n_keys * (bins + 2)
    a = np.bincount(flat, weights=w, minlength=size).reshape(n_keys, bins + 2).cumsum(axis=1)
    b = np.bincount(flat, weights=w * times, minlength=size).reshape(n_keys, bins + 2).cumsum(axis=1)
    # column j of the cumsum covers events with time < edges[j] (slot <= j)
    integral = edges[None, :] * a[:, :bins + 1] - b[:, :bins + 1]
    return np.diff(integral, axis=1) / np.diff(edges)[None, :]


# ---- per-label statistics -----------------------------------------------------------


def label_percentiles(values: np.ndarray, label: np.ndarray, k: int, qs=(50, 95, 100)) -> tuple:
    """(counts[k], percentiles[k, len(qs)]) of ``values`` grouped by ``label`` (NaN when empty)."""
    order = np.lexsort((values, label))
    values, label = values[order], label[order]
    counts = np.bincount(label, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full((k, len(qs)), np.nan)
    for j, q in enumerate(qs):
        pos = starts + np.ceil(q / 100 * counts).astype(np.int64) - 1   # nearest rank
        has = counts > 0
        out[has, j] = values[np.maximum(pos[has], starts[has])]
    return counts, out


def label_histograms(values: np.ndarray, label: np.ndarray, k: int, edges: np.ndarray) -> np.ndarray:
    """counts[k, bins] of ``values`` per label over shared ``edges`` (clipped into range)."""
    bins = len(edges) - 1
    slot = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    return np.bincount(label * bins + slot, minlength=k * bins).reshape(k, bins)


def suggested_request(max_peak_mb: float) -> int | None:
    """requestMemory to paste: max peak RSS x HEADROOM, rounded up to ROUND_MB (None if unmeasured)."""
    if not max_peak_mb > 0:
        return None
    return int(math.ceil(max_peak_mb * HEADROOM / ROUND_MB) * ROUND_MB)


@dataclass
class SizingRow:
    label: str
    request_min: int
    request_max: int
    measured: int              # successful attempts with a peak RSS
    p50: float
    p95: float
    max: float
    wasted_gbh: float          # sum over those attempts of (request - peak) x runtime, GB-hours
    wasted_fraction: float     # of their requested memory-time
    ooms: int                  # attempts ended by OOM
    suggested: int | None


def right_sizing(data) -> list[SizingRow]:
    """One row per label: requested memory against the peak RSS of its successful attempts."""
    att, k = data.attempts, len(data.labels)
    ok = (att.failure == Failure.NONE) & ~att.running & (att.peak_rss_mb > 0)
    lab = data.label[att.task].astype(np.int64)
    counts, pct = label_percentiles(att.peak_rss_mb[ok], lab[ok], k)
    dur = att.duration[ok]
    waste = np.bincount(lab[ok], np.maximum(att.request_mb[ok] - att.peak_rss_mb[ok], 0) * dur, k)
    asked = np.bincount(lab[ok], att.request_mb[ok] * dur, k)
    ooms = np.bincount(lab[att.failure == Failure.OOM], minlength=k)
    req_min, req_max = _label_range(data.memory_mb, data.label, k)
    return [SizingRow(name, int(req_min[i]), int(req_max[i]), int(counts[i]), *pct[i],
                      waste[i] / 1024 / 3600, waste[i] / asked[i] if asked[i] > 0 else 0.0,
                      int(ooms[i]), suggested_request(pct[i, 2])) for i, name in enumerate(data.labels)]


def _label_range(values: np.ndarray, label: np.ndarray, k: int) -> tuple:
    lo = np.full(k, np.iinfo(np.int64).max)
    hi = np.full(k, -1)
    np.minimum.at(lo, label, values)
    np.maximum.at(hi, label, values)
    return np.where(hi < 0, 0, lo), np.maximum(hi, 0)


def sizing_yaml(rows: list[SizingRow]) -> str:
    """The suggestions as a BPS YAML block: ``pipetask: <label>: requestMemory: N``."""
    lines = ["pipetask:"]
    for row in rows:
        if row.suggested is not None:
            lines += [f"  {row.label}:", f"    requestMemory: {row.suggested}"]
    return "\n".join(lines) + "\n" if len(lines) > 1 else ""


def failure_matrix(data) -> np.ndarray:
    """counts[label, Failure] of ended attempts."""
    att, k, c = data.attempts, len(data.labels), len(Failure)
    ended = ~att.running
    lab = data.label[att.task[ended]].astype(np.int64)
    return np.bincount(lab * c + att.failure[ended], minlength=k * c).reshape(k, c)


# ---- the planner's summary ----------------------------------------------------------


class _Shape:
    """The arrays of a Graph that :func:`pilot.simulate.lower_bound` reads."""

    def __init__(self, data):
        n = data.size
        self.size, self.levels = n, None
        self.memory_mb, self.cpus = data.memory_mb, data.cpus
        self.parent_ptr, self.parent_idx = data.parent_ptr, data.parent_idx
        child = np.repeat(np.arange(n, dtype=np.int64), np.diff(data.parent_ptr))
        order = np.argsort(data.parent_idx, kind="stable")
        self.child_idx = child[order].astype(np.int32)
        self.child_ptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(data.parent_idx, minlength=n), out=self.child_ptr[1:])


def done_runtimes(data) -> np.ndarray:
    """Seconds of each done task's successful attempt (0 for the others)."""
    table = data.table
    done = table.state == State.DONE
    return np.where(done, np.nan_to_num(table.end - table.start), 0.0).clip(min=0)


def summary(data, cap: Capacity) -> dict:
    """Makespan, node-hours, utilisations, tasks/s and the distance to the lower bound."""
    att = data.attempts
    t0 = float(att.start.min()) if att.size else data.as_of
    t1 = float(att.end.max()) if att.size else data.as_of
    span = max(t1 - t0, 0.0)
    total_mem, total_cores = cap.nodes * cap.memory_mb, cap.nodes * cap.cores
    dur = att.duration
    cpus = data.cpus[att.task].astype(np.float64)
    state = data.table.state
    done = int(np.count_nonzero(state == State.DONE))
    bound = lower_bound(_Shape(data), cap.node_list(), done_runtimes(data)) if data.size else 0.0
    return {
        "start": t0, "end": t1, "makespan_s": span, "as_of": data.as_of,
        "in_progress": bool(np.isin(state, (State.PENDING, State.READY, State.LAUNCHED, State.RUNNING)).any()),
        "tasks": data.size, "done": done, "attempts": att.size, "running": int(att.running.sum()),
        "failed": int(np.count_nonzero(state == State.FAILED)),
        "dep_fail": int(np.count_nonzero(state == State.DEP_FAIL)),
        "restarts": data.restarts,
        "node_hours": cap.nodes * span / 3600.0,
        "memory_utilisation": _ratio(float(np.dot(att.request_mb, dur)), total_mem * span),
        "rss_utilisation": _ratio(float(np.dot(att.peak_rss_mb, dur)), total_mem * span),
        "core_utilisation": _ratio(float(np.dot(cpus, dur)), total_cores * span),
        "tasks_per_s": _ratio(done, span),
        "lower_bound_s": bound, "ratio": _ratio(span, bound),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


# ---- Gantt sample -------------------------------------------------------------------


def gantt_sample(att, cap: int) -> tuple[np.ndarray, str]:
    """(indices of attempts to draw, description): all when at most ``cap``; else the
    attempts on the lowest-numbered nodes (up to 8) that start in an early time window
    holding at most ``cap`` of them."""
    on_node = np.flatnonzero(att.node >= 0)
    if on_node.size <= cap:
        return on_node, f"all {on_node.size} attempts"
    nodes = np.unique(att.node[on_node])[:8]
    pick = on_node[np.isin(att.node[on_node], nodes)]
    pick = pick[np.argsort(att.start[pick], kind="stable")]
    if pick.size > cap:
        limit = att.start[pick[cap]]
        pick = pick[att.start[pick] < limit]
    t0 = float(att.start.min())
    window = float(att.start[pick].max() - t0) if pick.size else 0.0
    return pick, (f"sample: {pick.size} of {att.size} attempts, those on nodes "
                  f"{int(nodes[0])}-{int(nodes[-1])} starting in the first {window:.0f} s")


def lanes(node: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """A lane per interval so intervals on one node and lane never overlap (greedy; for the
    bounded Gantt sample only). Each node's heap holds one (free from, lane) per lane."""
    import heapq

    lane = np.zeros(len(node), np.int64)
    heaps: dict = {}
    for i in np.lexsort((start, node)).tolist():
        heap = heaps.setdefault(int(node[i]), [])
        number = heapq.heappop(heap)[1] if heap and heap[0][0] <= start[i] else len(heap)
        lane[i] = number
        heapq.heappush(heap, (float(end[i]), number))
    return lane
