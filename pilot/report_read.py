"""Reading what a run report needs from a checkpoint, as numpy arrays.

On top of :func:`pilot.checkpoint.load_checkpoint` (snapshot + journal replay, no lock, works
while a run writes), this reads the parts that reader leaves on disk: the static columns
(requests, cpus, parents) and the attempt history (``/history`` plus the journal rows).
Every attempt becomes one entry of :class:`Attempts`; nothing holds one Python object per
task or attempt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from pilot.checkpoint import load_checkpoint
from pilot.checkpoint_schema import FINISHED, LOST, RESTART, STARTED
from pilot.errors import UserError
from pilot.events import Failure, State

#: History/journal fields the report uses.
HISTORY_FIELDS = ("task", "kind", "state", "failure", "node", "memory_request", "time",
                  "start", "end", "peak_rss_mb", "cpu_s")
STATIC_COLUMNS = ("memory_mb", "cpus", "parent_ptr", "parent_idx")


@dataclass
class Attempts:
    """One entry per attempt (finished, lost, or still running at ``RunData.as_of``)."""

    task: np.ndarray          # int64
    node: np.ndarray          # int64, -1 when unknown
    start: np.ndarray         # float64, epoch seconds
    end: np.ndarray           # float64 (as_of for a running attempt)
    request_mb: np.ndarray    # float64: the memory request this attempt ran with
    peak_rss_mb: np.ndarray   # float64 (0: not measured)
    failure: np.ndarray       # int8 (pilot.events.Failure)
    running: np.ndarray       # bool

    @property
    def size(self) -> int:
        return len(self.task)

    @property
    def duration(self) -> np.ndarray:
        return np.maximum(self.end - self.start, 0.0)

    def take(self, index) -> "Attempts":
        return Attempts(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


@dataclass
class RunData:
    """A checkpoint read for a report: the workflow's columns, the task table, the attempts."""

    path: str
    labels: list
    label: np.ndarray          # int32[n]
    memory_mb: np.ndarray      # int64[n] requestMemory of the first attempt
    cpus: np.ndarray           # int32[n]
    parent_ptr: np.ndarray
    parent_idx: np.ndarray
    table: object              # checkpoint_schema.TaskTable (journals applied)
    attempts: Attempts
    as_of: float               # time of the last recorded row (the run's "now")
    restarts: int              # how many times the run was resumed

    @property
    def size(self) -> int:
        return len(self.label)

    def task_ids(self, tasks) -> list[str]:
        """Ids of the given task numbers only (never decodes all ids)."""
        return task_ids(self.path, tasks)


def read_run(path, attempts: int = 20) -> RunData:
    """Read a checkpoint for a report; UserError when it is missing or not a checkpoint.

    The snapshot file is opened once and checked to be the one ``load_checkpoint`` read (a
    compaction may replace it meanwhile; then it reads again)."""
    path = os.fspath(path)
    for _ in range(attempts):
        view = load_checkpoint(path)
        data = _read_extra(path, view)
        if data is not None:
            return data
    raise UserError(f"checkpoint {path} kept changing while being read; try again")


def _read_extra(path: str, view) -> RunData | None:
    try:
        with h5py.File(path, "r", locking=False) as f:
            if int(f.attrs["generation"]) != view.snapshot.generation:
                return None
            static = {name: f["static"][name][()] for name in STATIC_COLUMNS}
            history = f["history"].fields(list(HISTORY_FIELDS))[()]
    except (OSError, KeyError) as err:
        raise UserError(f"checkpoint {path}: cannot read its history ({err})") from None
    rows = np.concatenate([history, _journal_fields(view.journal_rows.rows)])
    return assemble(path, view.snapshot, static, rows)


def _journal_fields(rows: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows), dtype=[(name, rows.dtype[name]) for name in HISTORY_FIELDS])
    for name in HISTORY_FIELDS:
        out[name] = rows[name]
    return out


def assemble(path: str, snap, static: dict, rows: np.ndarray) -> RunData:
    """RunData from a snapshot (journals applied), static columns and all history rows."""
    table = snap.table
    as_of = _as_of(rows, snap.created)
    attempts = attempts_from_rows(rows, static["memory_mb"], table, as_of)
    restarts = int(np.count_nonzero((rows["task"] < 0) & (rows["kind"] == RESTART)))
    return RunData(path, list(snap.labels), np.asarray(snap.label, np.int32), static["memory_mb"],
                   static["cpus"], static["parent_ptr"], static["parent_idx"], table, attempts,
                   as_of, restarts)


def _as_of(rows: np.ndarray, created: float) -> float:
    times = [rows["time"], rows["end"]] if len(rows) else []
    finite = [t[np.isfinite(t)] for t in times]
    values = [float(t.max()) for t in finite if t.size]
    return max(values) if values else float(created)


# ---- attempts from rows -------------------------------------------------------------


def attempts_from_rows(rows: np.ndarray, memory_mb: np.ndarray, table, as_of: float) -> Attempts:
    """Every attempt of the rows (finished or lost), plus the attempts running now.

    An attempt's request is the memory request of the last earlier row of its task that
    knows it (the engine scales the request when it handles the end of an attempt, so the
    end row itself may carry the next attempt's request); its node and start come from its
    started row when the end row lacks them."""
    r = rows[rows["task"] >= 0]
    r = r[np.argsort(r["task"], kind="stable")]
    ends = _attempt_ends(r)
    task = r["task"][ends].astype(np.int64)
    request = _previous(r, ends, r["memory_request"] >= 0, "memory_request").astype(np.float64)
    request = np.where(request >= 0, request, memory_mb[task])
    started = r["kind"] == STARTED
    node = np.where(r["node"][ends] >= 0, r["node"][ends], _previous(r, ends, started, "node"))
    start = r["start"][ends]
    start = np.where(np.isfinite(start), start, _previous(r, ends, started, "start", np.nan))
    end = np.where(np.isfinite(r["end"][ends]), r["end"][ends], r["time"][ends])
    failure = np.where(r["kind"][ends] == LOST, Failure.LOST, r["failure"][ends]).astype(np.int8)
    done = Attempts(task, node.astype(np.int64), start, end, request,
                    r["peak_rss_mb"][ends].astype(np.float64), failure, np.zeros(len(ends), bool))
    done = done.take(np.isfinite(done.start))
    return _concat(done, running_attempts(table, as_of))


def _attempt_ends(r: np.ndarray) -> np.ndarray:
    """Rows that end an attempt. One finish event writes a row per state change of its task
    (e.g. running -> ready -> launched again): keep the first of such a run of rows."""
    ends = np.flatnonzero((r["kind"] == FINISHED) | (r["kind"] == LOST))
    if not ends.size:
        return ends
    prev = np.maximum(ends - 1, 0)
    repeat = ((ends > 0) & (r["kind"][prev] == r["kind"][ends]) & (r["task"][prev] == r["task"][ends])
              & (r["time"][prev] == r["time"][ends]) & _same(r["start"][prev], r["start"][ends]))
    return ends[~repeat]


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _previous(r: np.ndarray, at: np.ndarray, valid: np.ndarray, field: str, missing=-1):
    """``r[field]`` of the last row before each of ``at`` of the same task where ``valid``;
    ``missing`` when there is none (rows are sorted by task, in order within a task)."""
    pos = np.where(valid, np.arange(len(r)), -1)
    last = np.maximum.accumulate(pos) if len(pos) else pos
    before = np.concatenate([[-1], last[:-1]])[at] if len(at) else at
    ok = (before >= 0) & (r["task"][np.maximum(before, 0)] == r["task"][at])
    return np.where(ok, r[field][np.maximum(before, 0)], missing)


def running_attempts(table, as_of: float) -> Attempts:
    """Attempts of tasks running now (started, not finished), ending at ``as_of``."""
    t = np.flatnonzero((table.state == State.RUNNING) & np.isfinite(table.start))
    n = len(t)
    return Attempts(t.astype(np.int64), table.node[t].astype(np.int64), table.start[t],
                    np.maximum(np.full(n, as_of), table.start[t]),
                    table.memory_request[t].astype(np.float64), np.zeros(n), np.zeros(n, np.int8),
                    np.ones(n, bool))


def _concat(a: Attempts, b: Attempts) -> Attempts:
    return Attempts(**{name: np.concatenate([getattr(a, name), getattr(b, name)])
                       for name in a.__dataclass_fields__})


# ---- ids of a few tasks -------------------------------------------------------------


def task_ids(path: str, tasks) -> list[str]:
    """Ids of ``tasks`` from ``/static/ids`` (NUL-separated), decoding only those."""
    tasks = np.asarray(tasks, dtype=np.int64)
    if not tasks.size:
        return []
    with h5py.File(path, "r", locking=False) as f:
        blob = f["static/ids"][()]
    bounds = np.concatenate([[-1], np.flatnonzero(blob == 0), [len(blob)]])
    raw = blob.tobytes()
    return [raw[bounds[t] + 1:bounds[t + 1]].decode("utf-8", "surrogateescape") for t in tasks.tolist()]
