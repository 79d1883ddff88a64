"""What happens after a failed attempt: retry (maybe with more memory) or fail for good.

The rules follow ctrl_bps: ``numberOfRetries`` extra attempts; exit codes listed in
``retryUnlessExit`` are never retried; after an out-of-memory failure with
``memoryMultiplier`` > 1 the next request is
``min(ceil(requestMemory * memoryMultiplier**n), cap)`` where ``n`` counts the task's OOM
attempts and ``cap`` is ``requestMemoryMax`` (when > 0) and the memory of the largest node
with enough cores for the task; an OOM at the cap fails for good. Interrupted and lost attempts do not count.
"""

from __future__ import annotations

import math

from pilot.events import Failure

RETRY, UNCOUNTED, FAIL = "retry", "uncounted", "fail"


def memory_cap(graph, task: int, largest_node_mb: int) -> int:
    """The most memory any attempt of ``task`` may request."""
    cap = int(graph.memory_max[task])
    return min(cap, largest_node_mb) if cap > 0 else largest_node_mb


def scaled_memory(graph, task: int, n_ooms: int, largest_node_mb: int) -> int:
    """The request after ``n_ooms`` out-of-memory attempts."""
    base = int(graph.memory_mb[task])
    grown = math.ceil(base * float(graph.memory_multiplier[task]) ** n_ooms)
    return max(base, min(grown, memory_cap(graph, task, largest_node_mb)))


def largest_node_for(nodes, cpus: int) -> int:
    """Memory of the largest node with at least ``cpus`` cores (0 if none)."""
    return max((n.memory_mb for n in nodes if n.cores >= cpus), default=0)


def next_attempt(engine, task: int, event) -> tuple[str, int | None]:
    """(verdict, new memory request or None) for a failed attempt of ``task``.

    ``engine.attempts[task]`` already counts the attempt that just ended.
    """
    g, failure = engine.graph, event.failure
    if failure in (Failure.INTERRUPTED, Failure.LOST):
        return UNCOUNTED, None
    if failure == Failure.EXIT and event.exit_code in g.retry_unless_exit[task]:
        return FAIL, None
    if engine.attempts[task] > g.retries[task]:
        return FAIL, None
    if failure == Failure.OOM and g.memory_multiplier[task] > 1:
        largest = largest_node_for(engine.nodes, int(g.cpus[task]))
        if engine.memory_request[task] >= memory_cap(g, task, largest):
            return FAIL, None
        return RETRY, scaled_memory(g, task, int(engine.ooms[task]) + 1, largest)
    return RETRY, None
