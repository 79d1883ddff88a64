"""The workflow as arrays: one row per task, CSR adjacency, priorities.

Nothing on the hot path holds one Python object per task except ``ids`` and the
command/env lists that agents need; everything the engine and policy touch is numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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

    @property
    def size(self) -> int:
        return len(self.ids)

    def parents(self, task: int) -> np.ndarray:
        return self.parent_idx[self.parent_ptr[task]:self.parent_ptr[task + 1]]

    def children(self, task: int) -> np.ndarray:
        return self.child_idx[self.child_ptr[task]:self.child_ptr[task + 1]]
