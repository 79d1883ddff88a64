"""The allowed task-state transitions and a compact log of the ones made.

Every state change the engine makes is checked against :data:`ALLOWED`; anything else
raises :class:`IllegalTransition`, which carries that task's history read back from the
:class:`TransitionLog` (growing numpy columns, not one Python list per task).
"""

from __future__ import annotations

from array import array

import numpy as np

from pilot.events import State

P, R, L, U, D, F, X = (State.PENDING, State.READY, State.LAUNCHED, State.RUNNING,
                       State.DONE, State.FAILED, State.DEP_FAIL)

#: (from, to) pairs the engine may make, with why.
TRANSITIONS = {
    (P, R): "all parents done",
    (P, X): "an ancestor failed for good",
    (R, L): "placed on a node by the policy",
    (L, U): "the agent started it",
    (L, R): "attempt interrupted, lost or retried before it was seen running",
    (L, D): "succeeded (start message not seen)",
    (L, F): "failed for good (start message not seen)",
    (U, D): "exited 0",
    (U, F): "failed for good",
    (U, R): "attempt failed with retries left, or was interrupted or lost",
    (F, P): "reset_failed (--retry-failed)",
    (X, P): "reset_failed (--retry-failed)",
}
ALLOWED = frozenset((int(a), int(b)) for a, b in TRANSITIONS)
#: ALLOWED_TABLE[old][new] is True when (old, new) is allowed (indexed by state number).
ALLOWED_TABLE = tuple(tuple((a, b) in ALLOWED for b in range(len(State))) for a in range(len(State)))


class IllegalTransition(RuntimeError):
    """A forbidden state change; ``history`` is the task's [(time, old, new), ...]."""

    def __init__(self, task: int, task_id: str, old: int, new: int, history: list, why: str = ""):
        self.task, self.task_id = task, task_id
        self.old, self.new = State(old), State(new)
        self.history = history
        steps = ", ".join(f"{t:g}s {State(a).name}->{State(b).name}" for t, a, b in history) or "none"
        reason = f" ({why})" if why else ""
        super().__init__(f"task {task_id!r} (#{task}): {self.old.name} -> {self.new.name} is not "
                         f"allowed{reason}; history: {steps}")


class TransitionLog:
    """Append-only columns (task, old and new state in one byte, time) in compact typed
    arrays: three appends per transition on the engine's hot path."""

    def __init__(self):
        self._task = array("i")
        self._step = array("B")   # old * 16 + new
        self._time = array("d")

    @property
    def size(self) -> int:
        return len(self._task)

    def append(self, task: int, old: int, new: int, time: float) -> None:
        self._task.append(task)
        self._step.append(old * 16 + new)
        self._time.append(time)

    def extend(self, tasks: np.ndarray, old, new, time: float) -> None:
        """Log many transitions at once; ``old`` and ``new`` are scalars or arrays."""
        k = len(tasks)
        step = np.asarray(old, dtype=np.uint8) * 16 + np.asarray(new, dtype=np.uint8)
        self._task.frombytes(np.asarray(tasks, dtype=np.int32).tobytes())
        self._step.frombytes(np.broadcast_to(step.astype(np.uint8), (k,)).tobytes())
        self._time.frombytes(np.full(k, time, dtype=np.float64).tobytes())

    def history(self, task: int) -> list[tuple[float, int, int]]:
        """The task's transitions in order, as (time, old, new)."""
        tasks, old, new, times = self.columns()
        rows = np.flatnonzero(tasks == task)
        return [(float(times[i]), int(old[i]), int(new[i])) for i in rows]

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of (task, old, new, time) for every logged transition."""
        step = np.array(self._step, dtype=np.uint8)
        return (np.array(self._task, dtype=np.int32), (step >> 4).astype(np.int8),
                (step & 15).astype(np.int8), np.array(self._time, dtype=np.float64))
