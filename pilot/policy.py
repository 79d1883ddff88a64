"""Packing policies: which ready task goes on which node, now.

A policy keeps its own queue of ready tasks and answers one question. The interface::

    policy.attach(graph, cluster)     # once (again after a restore): forget the queue
    policy.add(tasks, memory_request) # these tasks became ready; memory_request[t] is t's request
    policy.released(task, node)       # an active task left its node (finished, requeued, lost)
    policy.select(cluster, now)       # -> [(task, node), ...]; the chosen tasks leave the queue
    policy.select_successors(cluster, slots, now)   # -> [(task, slot task), ...]: queue-ahead
    policy.queued()                   # how many tasks the queue holds

``cluster`` is the engine's :class:`pilot.engine_cluster.Cluster` (read-only here). A
selection must never over-commit a node's memory or cores (counting the selection itself),
must respect per-label concurrency limits and must not pick a task expected to end after
``cluster.latest_end``. Ready tasks are grouped into request classes (memory, cpus, label),
each a heap, so one selection costs O(classes + placements x log classes), not O(ready).
See docs/scheduling.md.
"""

from __future__ import annotations

import heapq

import numpy as np


class _Classes:
    """Ready tasks in one heap per (memory, cpus, label) class. Heap items are the tasks'
    ranks (plain ints: position in the policy's total order), which keep heaps cheap."""

    def __init__(self):
        self.index: dict[tuple[int, int, int], int] = {}
        self.mem: list[int] = []
        self.cpus: list[int] = []
        self.label: list[int] = []
        self.heaps: list[list] = []
        self.size = 0

    def class_of(self, mem: int, cpus: int, label: int) -> int:
        key = (mem, cpus, label)
        c = self.index.get(key)
        if c is None:
            c = self.index[key] = len(self.heaps)
            self.mem.append(mem)
            self.cpus.append(cpus)
            self.label.append(label)
            self.heaps.append([])
        return c

    def add(self, c: int, ranks: list) -> None:
        heap = self.heaps[c]
        if len(ranks) > len(heap):
            heap.extend(ranks)
            heapq.heapify(heap)
        else:
            for r in ranks:
                heapq.heappush(heap, r)
        self.size += len(ranks)

    def heads(self) -> tuple[list, int, int]:
        """([(rank, class)] of every non-empty class, as a heap; the least memory and the
        fewest cpus among those classes)."""
        out = [(h[0], c) for c, h in enumerate(self.heaps) if h]
        if len(out) == 1:
            c = out[0][1]
            return out, self.mem[c], self.cpus[c]
        heapq.heapify(out)
        mem, cpus = self.mem, self.cpus
        return out, min([mem[c] for _, c in out]), min([cpus[c] for _, c in out])

    def pop(self, c: int):
        """Remove class ``c``'s head; return the new head entry or None."""
        heap = self.heaps[c]
        heapq.heappop(heap)
        self.size -= 1
        return (heap[0], c) if heap else None


class Policy:
    """Shared machinery: the class queue, the selection loop; subclasses choose the key
    (queue order) and the node (fit)."""

    name = "base"

    def attach(self, graph, cluster) -> None:
        self.graph = graph
        self.q = _Classes()
        self._cpus = graph.cpus.astype(np.int64)
        self._label = graph.label.astype(np.int64)
        key = self.order_key(graph, cluster)
        if key is None:
            self.task_of = self.rank = np.arange(graph.size, dtype=np.int64)
        else:
            self.task_of = np.lexsort((np.arange(graph.size), key))
            self.rank = np.empty(graph.size, dtype=np.int64)
            self.rank[self.task_of] = np.arange(graph.size)
        self.view = _View()   # reused by every selection

    def order_key(self, graph, cluster):
        """Per-task sort key, smaller first (ties by task number); None for task order."""
        return None

    def queued(self) -> int:
        return self.q.size

    def released(self, task: int, node: int) -> None:
        """Hook for policies that keep their own per-node accounting."""

    def add(self, tasks, memory_request: np.ndarray) -> None:
        if len(tasks) == 1:
            t = int(tasks[0])
            self.q.add(self.q.class_of(memory_request.item(t), self._cpus.item(t),
                                       self._label.item(t)), [self.rank.item(t)])
            return
        tasks = np.asarray(tasks, dtype=np.int64)
        if tasks.size == 0:
            return
        mem, cpus, lab = memory_request[tasks], self._cpus[tasks], self._label[tasks]
        ranks = self.rank[tasks]
        if tasks.size < 32:
            for m, k, lb, r in zip(mem.tolist(), cpus.tolist(), lab.tolist(), ranks.tolist()):
                self.q.add(self.q.class_of(m, k, lb), [r])
            return
        triples = np.stack([mem, cpus, lab], axis=1)
        distinct, inverse = np.unique(triples, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        for i, (m, k, lb) in enumerate(distinct.tolist()):
            self.q.add(self.q.class_of(m, k, lb), ranks[inverse == i].tolist())

    def select(self, cluster, now: float) -> list[tuple[int, int]]:
        """Placements, best key first, until no queued class fits any node."""
        q = self.q
        if q.size == 0:
            return []
        heads, min_m, min_c = q.heads()
        view = self.view
        view.reset(cluster, now, min_m, min_c)
        running, limit, est, latest = view.running, view.limit, view.est, view.latest
        placed, first = [], True
        while heads and view.open:
            rank, c = heapq.heappop(heads)
            lab = q.label[c]
            if running[lab] >= limit[lab] or now + est[lab] > latest:
                continue
            t, m, k = self.task_of.item(rank), q.mem[c], q.cpus[c]
            if first:
                self.head(t)
            node = self.fit(t, m, k, lab, view)
            if node < 0:
                if first:
                    self.blocked_head(t, m, k, cluster, now)
                first = False
                continue
            first = False
            placed.append((t, node))
            view.take(node, m, k, lab)
            self.placed(t, node, m, k)
            nxt = q.pop(c)
            if nxt is not None:
                heapq.heappush(heads, nxt)
        return placed

    def fit(self, task: int, m: int, k: int, label: int, view) -> int:
        """The node for a task of ``m`` MB and ``k`` cpus, or -1."""
        raise NotImplementedError

    def select_successors(self, cluster, slots, now: float) -> list[tuple[int, int]]:
        """Tasks to queue behind launched ones: for each slot ``(task, node, memory, cpus,
        free_at)`` in turn (a launched task expected to free that much at ``free_at``), the
        best queued task needing no more than the slot holds; ``[(queued task, slot task)]``,
        the chosen tasks leaving the queue. Label limits count the picks, and nothing expected
        to end after ``cluster.latest_end`` is picked. See :mod:`pilot.engine_queue`."""
        q = self.q
        running, limit = cluster.running[:], cluster.label_limit.tolist()
        est, latest = cluster.label_estimate.tolist(), cluster.latest_end
        picks = []
        for x, node, m_slot, k_slot, free_at in slots:
            if not q.size:
                break
            best, best_c = -1, -1
            for c, heap in enumerate(q.heaps):
                if heap and q.mem[c] <= m_slot and q.cpus[c] <= k_slot and (best < 0 or heap[0] < best):
                    lab = q.label[c]
                    if running[lab] < limit[lab] and free_at + est[lab] <= latest:
                        best, best_c = heap[0], c
            if best < 0:
                continue
            t, lab = self.task_of.item(best), q.label[best_c]
            if not self.may_queue(t, node, free_at + est[lab]):
                continue
            picks.append((t, x))
            running[lab] += 1
            q.pop(best_c)
        return picks

    def may_queue(self, task: int, node: int, expected_end: float) -> bool:
        """Whether ``task`` may be queued on ``node`` to end at about ``expected_end``."""
        return True

    def head(self, task: int) -> None:
        """Called with the best eligible queued task of each selection, before its fit."""

    def blocked_head(self, task: int, m: int, k: int, cluster, now: float) -> None:
        """Called when the best eligible queued task fits no node now."""

    def placed(self, task: int, node: int, m: int, k: int) -> None:
        """Called for every placement made."""


class _View:
    """A selection's scratch copy of free resources and label counts. ``open`` lists
    (ascending) the nodes with room for at least the smallest queued request, so a
    selection on a busy machine looks at a few nodes, not all of them. One per policy,
    reset by each selection."""

    def reset(self, cluster, now: float, min_m: int, min_c: int) -> None:
        self.fm = fm = cluster.fm[:]
        self.fc = fc = cluster.fc[:]
        self.open = [j for j in range(len(fm)) if fm[j] >= min_m and fc[j] >= min_c]
        if cluster.lost:
            up = cluster.up
            self.open = [j for j in self.open if up[j]]
        self.min_m, self.min_c = min_m, min_c
        self.running = cluster.running[:]
        self.limit = cluster.label_limit.tolist()
        self.est = cluster.label_estimate.tolist()
        self.latest = cluster.latest_end
        self.now = now

    def take(self, node: int, m: int, k: int, label: int) -> None:
        self.fm[node] -= m
        self.fc[node] -= k
        self.running[label] += 1
        if self.fm[node] < self.min_m or self.fc[node] < self.min_c:
            self.open.remove(node)


class DefaultPolicy(Policy):
    """Highest priority first (longest remaining path weighted by label runtime
    estimates; ties by task number), best fit by memory then cores, with one reservation
    for a blocked head: the node that frees enough soonest is backfilled only with tasks
    expected to end before the reservation time."""

    name = "default"

    def attach(self, graph, cluster) -> None:
        from pilot.graph import priorities

        self.priority = priorities(graph, cluster.label_estimate)
        super().attach(graph, cluster)
        self.reservation = None   # (task, node, time) or None

    def order_key(self, graph, cluster):
        return -self.priority

    def _held_node(self, task: int, expected_end: float) -> int:
        """The node held for the blocked head when ``task`` (not the head) would end after the
        reservation's time: backfill keeps off it. -1 otherwise."""
        res = self.reservation
        if res is not None and res[0] != task and expected_end > res[2]:
            return res[1]
        return -1

    def fit(self, task: int, m: int, k: int, label: int, view) -> int:
        avoid = self._held_node(task, view.now + view.est[label])
        fm, fc = view.fm, view.fc
        best, best_m, best_c = -1, 0, 0
        for j in view.open:
            left_m, left_c = fm[j] - m, fc[j] - k
            if left_m < 0 or left_c < 0 or j == avoid:
                continue
            if best < 0 or left_m < best_m or (left_m == best_m and left_c < best_c):
                best, best_m, best_c = j, left_m, left_c
        return best

    def may_queue(self, task: int, node: int, expected_end: float) -> bool:
        return self._held_node(task, expected_end) != node   # the rule of backfill

    def head(self, task: int) -> None:
        if self.reservation is not None and self.reservation[0] != task:
            self.reservation = None   # the reservation always belongs to the current head

    def blocked_head(self, task: int, m: int, k: int, cluster, now: float) -> None:
        res = self.reservation
        if res is not None and cluster.up[res[1]]:
            return
        node, when = cluster.earliest_fit(m, k, now)
        self.reservation = (task, node, when) if node >= 0 else None

    def placed(self, task: int, node: int, m: int, k: int) -> None:
        if self.reservation is not None and self.reservation[0] == task:
            self.reservation = None


class FifoPolicy(Policy):
    """First-fit in task order (as Pegasus MPI Cluster): the lowest-numbered ready task
    that fits goes on the lowest-numbered node with room; tasks that fit nowhere are
    skipped for now. No priorities, no reservation."""

    name = "fifo"

    def fit(self, task: int, m: int, k: int, label: int, view) -> int:
        fm, fc = view.fm, view.fc
        for j in view.open:
            if fm[j] >= m and fc[j] >= k:
                return j
        return -1


class SlotsPolicy(FifoPolicy):
    """Uniform slots (as Parsl's HighThroughputExecutor): each node is cut into equal
    slots, by default one per core, each with memory / slots MB; a task takes
    max(ceil(memory / slot memory), ceil(cpus / slot cores)) whole slots on one node,
    whatever it really uses. Task order, first fit, no priorities, no reservation."""

    name = "slots"

    def __init__(self, slot_memory_mb: int | None = None):
        self.slot_memory_mb = slot_memory_mb

    def attach(self, graph, cluster) -> None:
        super().attach(graph, cluster)
        if self.slot_memory_mb:
            self.slots = np.maximum(cluster.memory // self.slot_memory_mb, 1)
        else:
            self.slots = np.maximum(cluster.cores, 1)
        self.slot_mem = cluster.memory / self.slots
        self.slot_cores = cluster.cores / self.slots
        self.free_slots = self.slots.tolist()
        self._need: dict = {}
        self.taken: dict[int, tuple[int, int]] = {}

    def need(self, m: int, k: int) -> list[int]:
        """Slots a task of ``m`` MB and ``k`` cpus takes on each node (cached per shape)."""
        got = self._need.get((m, k))
        if got is None:
            by_mem = np.ceil(m / self.slot_mem - 1e-9)
            by_cpu = np.ceil(k / self.slot_cores - 1e-9)
            got = self._need[(m, k)] = np.maximum(np.maximum(by_mem, by_cpu), 1).astype(int).tolist()
        return got

    def fit(self, task: int, m: int, k: int, label: int, view) -> int:
        need, free, fm, fc = self.need(m, k), self.free_slots, view.fm, view.fc
        for j in view.open:
            if free[j] >= need[j] and fm[j] >= m and fc[j] >= k:
                return j
        return -1

    def placed(self, task: int, node: int, m: int, k: int) -> None:
        slots = self.need(m, k)[node]
        self.free_slots[node] -= slots
        self.taken[task] = (node, slots)

    def released(self, task: int, node: int) -> None:
        node, slots = self.taken.pop(task)
        self.free_slots[node] += slots


POLICIES = {"default": DefaultPolicy, "fifo": FifoPolicy, "slots": SlotsPolicy}


def make_policy(name: str, **options) -> Policy:
    """A fresh policy by name: default, fifo or slots."""
    try:
        return POLICIES[name](**options)
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})") from None


__all__ = ["Policy", "DefaultPolicy", "FifoPolicy", "SlotsPolicy", "POLICIES", "make_policy"]
