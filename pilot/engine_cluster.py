"""What the policy sees of the machine: per-node capacity and free resources, the
tasks running on each node with their expected ends, per-label counts and estimates.

The engine owns and updates a :class:`Cluster`; policies only read it. Active tasks
live in compact columns (swap-remove), so "what frees when" is one vectorised pass.
Per-node free resources and per-label running counts, touched on every event, are Python
lists (``fm``, ``fc``, ``up``, ``running``); the numpy properties are copies for
vectorised readers.
"""

from __future__ import annotations

import math

import numpy as np

NO_LIMIT = np.iinfo(np.int64).max


class Cluster:
    """Nodes and the tasks placed on them. Read-only to policies."""

    def __init__(self, nodes, memory_request: np.ndarray, cpus: np.ndarray, label: np.ndarray,
                 n_labels: int):
        """``memory_request``, ``cpus`` and ``label`` are the engine's per-task arrays
        (shared, not copied): an active task's request is read from them."""
        self.names = [n.name for n in nodes]
        self.memory = np.array([n.memory_mb for n in nodes], dtype=np.int64)
        self.cores = np.array([n.cores for n in nodes], dtype=np.int64)
        # per-node and per-label counters are Python lists: the engine and the policies
        # touch them once or twice per event, where numpy's per-element cost dominates
        self.fm = self.memory.tolist()          # free memory (MB) per node
        self.fc = self.cores.tolist()           # free cores per node
        self.up = [True] * len(nodes)           # alive per node
        self.running = [0] * n_labels           # launched (queued included) or running tasks per label
        self.lost = 0   # how many nodes were lost
        self.label_limit = np.full(n_labels, NO_LIMIT, dtype=np.int64)
        self.label_estimate = np.ones(n_labels, dtype=np.float64)  # seconds, never NaN
        self.latest_end = math.inf   # launch nothing expected to end after this
        self.task_memory, self.task_cpus, self.task_label = memory_request, cpus, label
        self._pos = np.full(len(label), -1, dtype=np.int64)
        self.n_active = 0
        self.act_task = np.empty(64, dtype=np.int64)
        self.act_node = np.empty(64, dtype=np.int64)
        self.act_start = np.empty(64, dtype=np.float64)

    @property
    def free_memory(self) -> np.ndarray:
        """Free memory (MB) per node (a copy)."""
        return np.array(self.fm, dtype=np.int64)

    @property
    def free_cores(self) -> np.ndarray:
        """Free cores per node (a copy)."""
        return np.array(self.fc, dtype=np.int64)

    @property
    def alive(self) -> np.ndarray:
        """True per node not lost (a copy)."""
        return np.array(self.up, dtype=bool)

    @property
    def label_running(self) -> np.ndarray:
        """Launched or running tasks per label (a copy)."""
        return np.array(self.running, dtype=np.int64)

    @property
    def size(self) -> int:
        return len(self.memory)

    def _grow(self) -> None:
        for name in ("act_task", "act_node", "act_start"):
            old = getattr(self, name)
            new = np.empty(2 * len(old), dtype=old.dtype)
            new[:self.n_active] = old[:self.n_active]
            setattr(self, name, new)

    def place(self, task: int, node: int, memory: int, cpus: int, label: int, start: float,
              counted: bool = False) -> None:
        """Account for ``task`` running on ``node`` from ``start`` (``counted``: its label's
        count already holds it, as for a task queued behind another)."""
        i = self.n_active
        if i == len(self.act_task):
            self._grow()
        self.act_task[i] = task
        self.act_node[i] = node
        self.act_start[i] = start
        self._pos[task] = i
        self.n_active = i + 1
        self.fm[node] -= memory
        self.fc[node] -= cpus
        if not counted:
            self.running[label] += 1

    def set_start(self, task: int, start: float) -> None:
        self.act_start[self._pos.item(task)] = start

    def start_of(self, task: int) -> float:
        """When placed ``task`` took its resources."""
        return self.act_start.item(self._pos.item(task))

    def release(self, task: int) -> int:
        """Give back ``task``'s resources; returns its node (-1 if it was not placed)."""
        i = self._pos.item(task)
        if i < 0:
            return -1
        node = self.act_node.item(i)
        self.fm[node] += self.task_memory.item(task)
        self.fc[node] += self.task_cpus.item(task)
        self.running[self.task_label.item(task)] -= 1
        last = self.n_active - 1
        if i != last:
            moved = self.act_task.item(last)
            self.act_task[i] = moved
            self.act_node[i] = self.act_node.item(last)
            self.act_start[i] = self.act_start.item(last)
            self._pos[moved] = i
        self._pos[task] = -1
        self.n_active = last
        return node

    def is_active(self, task: int) -> bool:
        return self._pos.item(task) >= 0

    def active_tasks(self, node: int | None = None) -> np.ndarray:
        """Task numbers placed (launched or running), on ``node`` if given."""
        tasks = self.act_task[:self.n_active]
        if node is None:
            return tasks.copy()
        return tasks[self.act_node[:self.n_active] == node]

    def expected_ends(self, now: float) -> np.ndarray:
        """Per active slot: start + label estimate, but not before ``now``."""
        n = self.n_active
        ends = self.act_start[:n] + self.label_estimate[self.task_label[self.act_task[:n]]]
        return np.maximum(ends, now)

    def lose(self, node: int) -> np.ndarray:
        """Mark ``node`` dead (no capacity from now on); returns the tasks that were on it."""
        tasks = self.active_tasks(node)
        for t in tasks:
            self.release(int(t))
        self.up[node] = False
        self.lost += 1
        self.fm[node] = 0
        self.fc[node] = 0
        return tasks

    def used_by_active(self) -> tuple[np.ndarray, np.ndarray]:
        """(memory, cores) per node summed over the active tasks, for validation."""
        n, k = self.n_active, self.size
        node, tasks = self.act_node[:n], self.act_task[:n]
        mem = np.bincount(node, weights=self.task_memory[tasks], minlength=k).astype(np.int64)
        cpu = np.bincount(node, weights=self.task_cpus[tasks], minlength=k).astype(np.int64)
        return mem, cpu

    def earliest_fit(self, memory: int, cpus: int, now: float) -> tuple[int, float]:
        """The alive node on which ``memory`` and ``cpus`` will be free soonest, given the
        running tasks' expected ends, and that time; (-1, inf) if no node is big enough."""
        big = self.alive & (self.memory >= memory) & (self.cores >= cpus)
        if not big.any():
            return -1, math.inf
        free_m, free_c = self.free_memory, self.free_cores
        now_ok = big & (free_m >= memory) & (free_c >= cpus)
        if now_ok.any():
            return int(np.argmax(now_ok)), now
        n = self.n_active
        node, ends = self.act_node[:n], self.expected_ends(now)
        order = np.lexsort((ends, node))
        node_s, ends_s = node[order], ends[order]
        tasks_s = self.act_task[:n][order]
        freed_m = _grouped_cumsum(self.task_memory[tasks_s], node_s)
        freed_c = _grouped_cumsum(self.task_cpus[tasks_s].astype(np.int64), node_s)
        ok = ((free_m[node_s] + freed_m >= memory)
              & (free_c[node_s] + freed_c >= cpus) & big[node_s])
        if not ok.any():
            return int(np.argmax(big)), math.inf
        best = np.flatnonzero(ok)[np.argmin(ends_s[ok])]
        return int(node_s[best]), float(ends_s[best])


def _grouped_cumsum(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Running sum of ``values`` restarting at each new value of sorted ``groups``."""
    total = np.cumsum(values)
    if len(values) == 0:
        return total
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    before = np.repeat(total[starts] - values[starts], np.diff(np.r_[starts, len(values)]))
    return total - before
