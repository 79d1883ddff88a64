"""What a checkpoint holds, in memory (:class:`TaskTable`) and in HDF5 (snapshots).

A snapshot is a whole HDF5 file written once, to a temporary name, then renamed over the
checkpoint: nothing ever opens the checkpoint itself for writing, so readers never see a
half-written file. The layout is documented in docs/checkpoint.md; every name here is part
of it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import h5py
import numpy as np

from pilot.errors import UserError
from pilot.events import State
from pilot.journal import ROW, Rows

FORMAT = "pilot-checkpoint"
FORMAT_VERSION = 1

# Row kinds: what event wrote a row. For STARTED/FINISHED rows (the event's own task) the
# attempt fields (failure ... log) are meaningful; other rows only move state, attempts,
# memory request and node.
TRANSITION, STARTED, FINISHED, RESTART, RESET, LOST = 0, 1, 2, 3, 4, 5
KIND_NAMES = {TRANSITION: "transition", STARTED: "started", FINISHED: "finished",
              RESTART: "restart", RESET: "reset", LOST: "lost"}
UNCHANGED = -2  # attempts / memory_request / node value meaning "not known by this row"

STATIC_FIELDS = ("label", "memory_mb", "cpus", "retries", "memory_multiplier", "memory_max",
                 "timeout", "parent_ptr", "parent_idx")
ATTEMPT_FIELDS = ("failure", "exit_code", "signal", "start", "end", "peak_rss_mb", "cpu_s")
TASK_FIELDS = ("state", "attempts", "memory_request", "node") + ATTEMPT_FIELDS


@dataclass
class TaskTable:
    """The dynamic part: one entry per task (numpy columns; ``log`` an object array of str)."""

    state: np.ndarray
    attempts: np.ndarray
    memory_request: np.ndarray
    node: np.ndarray
    failure: np.ndarray
    exit_code: np.ndarray      # -1: none (not finished, or ended by a signal)
    signal: np.ndarray         # 0: none
    start: np.ndarray          # of the last attempt, seconds since the epoch (NaN: none)
    end: np.ndarray
    peak_rss_mb: np.ndarray
    cpu_s: np.ndarray
    log: np.ndarray

    @staticmethod
    def new(memory_mb: np.ndarray) -> "TaskTable":
        n = len(memory_mb)
        return TaskTable(
            state=np.zeros(n, np.int8), attempts=np.zeros(n, np.int32),
            memory_request=np.asarray(memory_mb, np.int64).copy(), node=np.full(n, -1, np.int32),
            failure=np.zeros(n, np.int8), exit_code=np.full(n, -1, np.int32),
            signal=np.zeros(n, np.int32), start=np.full(n, np.nan), end=np.full(n, np.nan),
            peak_rss_mb=np.zeros(n, np.float32), cpu_s=np.zeros(n, np.float32),
            log=np.full(n, "", dtype=object))

    @property
    def size(self) -> int:
        return len(self.state)

    def apply(self, rows: Rows) -> None:
        """Apply rows in order (the last row of a task wins, field by field)."""
        r = rows.rows
        r = r[(r["task"] >= 0) & (r["task"] < self.size)]
        if not len(r):
            return
        _assign_last(self.state, r["task"], r["state"])
        for name in ("attempts", "memory_request", "node"):
            known = r[name] != UNCHANGED
            _assign_last(getattr(self, name), r["task"][known], r[name][known])
        self._apply_attempts(rows)

    def _apply_attempts(self, rows: Rows) -> None:
        r = rows.rows
        sel = np.flatnonzero(((r["kind"] == STARTED) | (r["kind"] == FINISHED))
                             & (r["task"] >= 0) & (r["task"] < self.size))
        if not sel.size:
            return
        tasks, last = _last_of(r["task"][sel])
        winners = sel[last]
        for name in ATTEMPT_FIELDS:
            getattr(self, name)[tasks] = r[name][winners]
        self.log[tasks] = [rows.log(int(i)) for i in winners]


def _last_of(tasks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct tasks, index of each one's last occurrence)."""
    uniq, first_from_end = np.unique(tasks[::-1], return_index=True)
    return uniq, len(tasks) - 1 - first_from_end


def _assign_last(column: np.ndarray, tasks: np.ndarray, values: np.ndarray) -> None:
    if len(tasks):
        uniq, last = _last_of(tasks)
        column[uniq] = values[last]


def history_mask(rows: np.ndarray) -> np.ndarray:
    """Rows kept in the event history: attempts, restarts, resets and failures for good."""
    failed = np.isin(rows["state"], (State.FAILED, State.DEP_FAIL))
    return (rows["kind"] != TRANSITION) | failed


# ---- strings ------------------------------------------------------------------------


def join_strings(items) -> np.ndarray:
    """NUL-joined UTF-8 as a uint8 array (task ids and paths never contain NUL)."""
    return np.frombuffer("\0".join(items).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def split_strings(blob: np.ndarray, n: int) -> list[str]:
    if n == 0:
        return []
    items = blob.tobytes().decode("utf-8", "surrogateescape").split("\0")
    if len(items) != n:
        raise ValueError(f"{len(items)} strings where {n} were expected")
    return items


# ---- writing a snapshot -------------------------------------------------------------


class Static:
    """The static part, encoded once per run (task ids only when a snapshot is written:
    a restart does not need them)."""

    def __init__(self, graph, graph_hash: str):
        self.graph_hash, self.labels = graph_hash, list(graph.labels)
        self.columns = {name: np.asarray(getattr(graph, name)) for name in STATIC_FIELDS}
        self._ids, self._blob = graph.ids, None

    @staticmethod
    def from_graph(graph, graph_hash: str) -> "Static":
        return Static(graph, graph_hash)

    @property
    def ids_blob(self) -> np.ndarray:
        if self._blob is None:
            blob = join_strings(self._ids)
            if len(self._ids) and np.count_nonzero(blob == 0) != len(self._ids) - 1:
                raise UserError("a task id contains a NUL character, which the checkpoint cannot store")
            self._blob = blob
        return self._blob


def write_snapshot(path: str, static: Static, table: TaskTable, generation: int,
                   old_file: str | None, new_history: np.ndarray, created: float) -> None:
    """Write a whole checkpoint to ``path`` and fsync it (the caller renames it into place)."""
    with h5py.File(path, "w", locking=False) as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, graph_hash=static.graph_hash,
                       n_tasks=table.size, generation=generation, created=created,
                       updated=time.time())
        _write_static(f.create_group("static"), static)
        _write_tasks(f.create_group("tasks"), table)
        _write_history(f, old_file, new_history)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_static(group, static: Static) -> None:
    group.create_dataset("ids", data=static.ids_blob)
    group.create_dataset("labels", data=np.array(static.labels, dtype=h5py.string_dtype()))
    for name, column in static.columns.items():
        group.create_dataset(name, data=column)


def _write_tasks(group, table: TaskTable) -> None:
    for name in TASK_FIELDS:
        group.create_dataset(name, data=getattr(table, name))
    group.create_dataset("log", data=join_strings(table.log.tolist()))


def _write_history(f, old_file: str | None, new_rows: np.ndarray) -> None:
    old_len = 0
    if old_file is not None:
        with h5py.File(old_file, "r", locking=False) as old:
            old.copy(old["history"], f, "history")
        old_len = f["history"].shape[0]
    else:
        f.create_dataset("history", shape=(0,), maxshape=(None,), dtype=ROW, chunks=(8192,))
    if len(new_rows):
        history = f["history"]
        history.resize((old_len + len(new_rows),))
        history[old_len:] = new_rows


# ---- reading a snapshot -------------------------------------------------------------


@dataclass
class Snapshot:
    """A checkpoint file read back: attributes, static columns used by readers, task table."""

    path: str
    graph_hash: str
    generation: int
    created: float
    labels: list[str]
    label: np.ndarray
    table: TaskTable
    history_rows: int

    def ids(self) -> list[str]:
        with h5py.File(self.path, "r", locking=False) as f:
            return split_strings(f["static/ids"][()], self.table.size)


def read_snapshot(path: str) -> Snapshot:
    """Read a checkpoint file; UserError (one line) if it is not a readable checkpoint."""
    if os.path.isdir(path):   # a run directory, most likely: name the checkpoint in it
        from pilot.slurm_script import CHECKPOINT_NAME

        inside = os.path.join(path, CHECKPOINT_NAME)
        hint = f"; its run's checkpoint is {inside}" if os.path.isfile(inside) else ""
        raise UserError(f"{path} is a directory, not a checkpoint file{hint}")
    try:
        return _read(path)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except (OSError, KeyError, ValueError, TypeError, IndexError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"checkpoint {path} is corrupt, truncated or not HDF5 ({reason}); "
                        "it was left as it is") from None


def _read(path: str) -> Snapshot:
    with h5py.File(path, "r", locking=False) as f:
        attrs = dict(f.attrs)
        if attrs.get("format") != FORMAT:
            raise UserError(f"{path} is an HDF5 file but not a pilot checkpoint")
        if int(attrs.get("format_version", -1)) > FORMAT_VERSION:
            raise UserError(f"checkpoint {path} has format version {attrs['format_version']}, "
                            f"newer than this pilot reads ({FORMAT_VERSION})")
        n = int(attrs["n_tasks"])
        tasks = f["tasks"]
        columns = {name: tasks[name][()] for name in TASK_FIELDS}
        log = np.array(split_strings(tasks["log"][()], n) if n else [], dtype=object)
        table = TaskTable(log=log, **columns)
        if any(len(c) != n for c in columns.values()):
            raise ValueError("task columns of different lengths")
        labels = [s.decode() if isinstance(s, bytes) else s for s in f["static/labels"][()]]
        return Snapshot(path, str(attrs["graph_hash"]), int(attrs["generation"]),
                        float(attrs["created"]), labels, f["static/label"][()], table,
                        int(f["history"].shape[0]))
