"""The durable checkpoint: an engine listener writing a journal, compacted into HDF5.

Rank 0 only. :func:`open_checkpoint` takes the lock, reads what a previous run left
(snapshot + journal replay), and returns a :class:`Checkpoint` whose ``restored`` arrays go
to ``Engine.restore``. The engine then calls ``record(event, transitions)`` after every
event; rows are queued in memory and a background thread writes them to the journal as one
CRC-checked block and ``fdatasync``\\ s it every ``window`` seconds (the durability window).
``tick`` compacts the journal into a new HDF5 snapshot when it has grown; ``close`` makes a
final snapshot and releases the lock. See docs/checkpoint.md.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from pilot import leftovers
from pilot.checkpoint_schema import (FINISHED, LOST, RESET, RESTART, STARTED, TRANSITION, UNCHANGED,
                                     Static, TaskTable, history_mask, read_snapshot, write_snapshot)
from pilot.errors import UserError
from pilot.events import NodeLost, State, TaskFinished, TaskStarted
from pilot.journal import (ROW, JournalWriter, Rows, encode_block, encode_logs, fsync_dir,
                           journal_generations, journal_path, read_journal)
from pilot.lock import CheckpointLock, acquire

WINDOW_S = 0.25                  # journal group commit: rows reach the disk within this (+ one fsync)
COMPACT_MIN_BYTES = 16 << 20     # compact when the journal passes this ...
COMPACT_RATIO = 0.5              # ... and this fraction of the snapshot's size (amortised O(1))
_ACTIVE = (State.LAUNCHED, State.RUNNING)


# ---- reading: snapshot + journal replay ---------------------------------------------


@dataclass
class View:
    """A consistent reading of a checkpoint: the snapshot with its journals replayed."""

    snapshot: object          # checkpoint_schema.Snapshot (its table has the journals applied)
    journal_rows: Rows
    generations: list         # journals that followed the snapshot, ascending

    @property
    def table(self) -> TaskTable:
        return self.snapshot.table


def load_checkpoint(path: str, attempts: int = 50) -> View:
    """Read a checkpoint without locking (works while a run writes it); UserError if it is
    missing, corrupt or not a checkpoint."""
    path = os.fspath(path)
    for attempt in range(attempts):
        before = _inode(path)
        snap = read_snapshot(path)
        view = _with_journals(path, snap, before, last=attempt == attempts - 1)
        if view is not None:
            snap.table.apply(view.journal_rows)
            return view
        time.sleep(min(0.001 * 2 ** attempt, 0.05))
    raise UserError(f"checkpoint {path} kept changing while being read; try again")


def _inode(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    return st.st_ino, st.st_mtime_ns


def _with_journals(path: str, snap, before, last: bool) -> View | None:
    """None when a compaction replaced the snapshot while we read (read again)."""
    gens = [g for g in journal_generations(path) if g >= snap.generation]
    fds = []
    try:
        for g in gens:
            fds.append(os.open(journal_path(path, g), os.O_RDONLY))
    except FileNotFoundError:
        _close_all(fds)
        return None
    try:
        # a compaction unlinks journals only after renaming a new snapshot in: if ours is
        # still in place, the journals we hold are all that follow it
        if not last and _inode(path) != before:
            return None
        rows = Rows.concat([read_journal(fd) for fd in fds])
    finally:
        _close_all(fds)
    return View(snap, rows, gens)


def _close_all(fds) -> None:
    for fd in fds:
        os.close(fd)


# ---- rows from engine events --------------------------------------------------------


def event_rows(event, transitions, engine=None) -> tuple[bytes, list]:
    """(rows packed as :data:`ROW` records, log paths) for one engine event: one row per
    task whose state changed. Packing each row as it comes costs far less than building a
    structured array from tuples later."""
    kind = type(event)
    own = event.task if kind is TaskStarted or kind is TaskFinished else -1
    when = event.end if kind is TaskFinished else event.time
    other = LOST if kind is NodeLost else TRANSITION
    parts, logs = [], []
    for task, _old, new in transitions:
        if task == own:
            parts.append(_attempt_row(event, new, when, engine))
            logs.append(event.log if kind is TaskFinished else "")
        elif engine is None:
            parts.append(_PACK(task, other, new, 0, 0, UNCHANGED, -1, 0, UNCHANGED, UNCHANGED, when,
                               _NAN, _NAN, 0.0, 0.0))
            logs.append("")
        else:
            parts.append(_PACK(task, other, new, 0, 0, engine.attempts.item(task), -1, 0,
                               engine.node_of.item(task), engine.memory_request.item(task), when,
                               _NAN, _NAN, 0.0, 0.0))
            logs.append("")
    return b"".join(parts), logs


_PACK = struct.Struct("<iBbbBiiiiqdddff").pack   # the layout of ROW
_NAN = float("nan")
assert struct.calcsize("<iBbbBiiiiqdddff") == ROW.itemsize


def _known(engine, task: int) -> tuple[int, int, int]:
    if engine is None:
        return UNCHANGED, UNCHANGED, UNCHANGED
    return (engine.attempts.item(task), engine.memory_request.item(task),
            engine.node_of.item(task))


def _attempt_row(event, new: int, when: float, engine) -> bytes:
    attempts, memory, node = _known(engine, event.task)
    if engine is None:
        attempts, node = event.attempt, event.node
    if type(event) is TaskStarted:
        return _PACK(event.task, STARTED, new, 0, 0, attempts, -1, 0, node, memory, when,
                     event.time, _NAN, 0.0, 0.0)
    code = -1 if event.exit_code is None else event.exit_code
    return _PACK(event.task, FINISHED, new, event.failure, 0, attempts, code, event.signal or 0,
                 node, memory, when, event.start, event.end, event.peak_rss_mb, event.cpu_s)


def restart_rows(table: TaskTable, memory_mb: np.ndarray, retry_failed: bool, now: float):
    """(restored arrays, ROW rows) for a restart: in-flight tasks back to pending with their
    interrupted attempt not counted; with ``retry_failed`` failed and dep_fail tasks too,
    with attempts and memory request reset."""
    state, attempts = table.state.copy(), table.attempts.copy()
    memory = table.memory_request.copy()
    active = np.flatnonzero(np.isin(state, _ACTIVE))
    attempts[active] = np.maximum(attempts[active] - 1, 0)
    state[active] = State.PENDING
    state[state == State.READY] = State.PENDING
    reset = np.zeros(0, np.int64)
    if retry_failed:
        reset = np.flatnonzero(np.isin(state, (State.FAILED, State.DEP_FAIL)))
        state[reset], attempts[reset], memory[reset] = State.PENDING, 0, memory_mb[reset]
    rows = np.zeros(1 + len(active) + len(reset), ROW)
    rows[0] = (-1, RESTART, 0, 0, 0, UNCHANGED, -1, 0, UNCHANGED, UNCHANGED, now, np.nan, np.nan, 0, 0)
    for sel, kind, at in ((active, RESTART, 1), (reset, RESET, 1 + len(active))):
        part = rows[at:at + len(sel)]
        part["task"], part["kind"], part["state"] = sel, kind, State.PENDING
        part["attempts"], part["memory_request"], part["time"] = attempts[sel], memory[sel], now
        part["node"], part["exit_code"], part["start"], part["end"] = -1, -1, np.nan, np.nan
    return (state, attempts, memory), rows


# ---- the listener -------------------------------------------------------------------


class Checkpoint:
    """The writer, made by :func:`open_checkpoint`; an engine listener."""

    def __init__(self, path: str, static: Static, table: TaskTable, journal: JournalWriter,
                 journal_gens: list, lock: CheckpointLock, *, created: float, restored,
                 unsnapshotted: list, window: float = WINDOW_S,
                 compact_min_bytes: int = COMPACT_MIN_BYTES, compact_ratio: float = COMPACT_RATIO,
                 hook=None):
        self.path, self.restored, self.window = path, restored, window
        self.lock = lock
        self.hook = hook or (lambda step: None)   # called at each durable step (fault injection)
        self._static, self._table, self._created = static, table, created
        self._journal, self._journal_gens = journal, list(journal_gens)
        self._unsnapshotted = list(unsnapshotted)
        self._since_bytes = sum(len(r.rows) for r in unsnapshotted) * ROW.itemsize
        self._compact_min, self._compact_ratio = compact_min_bytes, compact_ratio
        self._compact_at = max(compact_min_bytes, compact_ratio * os.path.getsize(path))
        self._pending, self._pending_logs = [], []   # packed rows per event, a log per row
        self._plock, self._iolock = threading.Lock(), threading.Lock()
        self._wake, self._stopping, self._closed = threading.Event(), False, False
        self._error: BaseException | None = None
        self._engine = None
        self._thread = threading.Thread(target=self._flusher, name="pilot-checkpoint", daemon=True)
        self._thread.start()

    @property
    def run_name(self) -> str:
        """The run's name in its tasks' ``PILOT_RUN`` tag: the same for every start of this
        checkpoint (see :mod:`pilot.leftovers`)."""
        return leftovers.run_name(self._static.graph_hash, self._created, self.path)

    def attach(self, engine) -> None:
        """Read attempts, memory requests and nodes from ``engine`` for every row (without
        it, rows carry only what the events say)."""
        self._engine = engine

    def record(self, event, transitions) -> None:
        """Engine listener: queue one row per state change; durable within ``window``."""
        if not transitions:
            return
        rows, logs = event_rows(event, transitions, self._engine)
        with self._plock:
            self._pending.append(rows)
            self._pending_logs += logs
            big = len(self._pending_logs) >= 65536
        if big:
            self._wake.set()

    def tick(self, now: float | None = None) -> None:
        """From the master loop: surface a writer error, refresh the lock, compact if due."""
        self._raise_error()
        self.lock.heartbeat()
        if self._since_bytes >= self._compact_at:
            self.compact()

    def flush(self) -> None:
        """Write and fdatasync whatever is queued (the flusher does this every window)."""
        with self._iolock:
            self._flush_locked()

    def compact(self) -> None:
        """Journal -> new HDF5 snapshot; every step leaves a readable checkpoint."""
        with self._iolock:
            self._flush_locked()
            old_gens, parts = self._rotate()
        rows = Rows.concat(parts)
        self._table.apply(rows)
        tmp = self.path + ".tmp"
        new_gen = self._journal_gens[0]
        write_snapshot(tmp, self._static, self._table, new_gen, self.path,
                       rows.rows[history_mask(rows.rows)], self._created)
        self.hook("snapshot-written")
        os.replace(tmp, self.path)
        self.hook("snapshot-replaced")
        fsync_dir(self.path)
        self.hook("dir-synced")
        for g in old_gens:
            os.unlink(journal_path(self.path, g))
        fsync_dir(self.path)
        self.hook("old-journals-removed")
        self._compact_at = max(self._compact_min, self._compact_ratio * os.path.getsize(self.path))

    def close(self) -> None:
        """Final flush and snapshot, then release the lock."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join()
        try:
            self._raise_error()
            self.compact()
        finally:
            self._journal.close()
            self.lock.release()

    # -- internals --

    def _flusher(self) -> None:
        while not self._stopping:
            self._wake.wait(self.window)
            self._wake.clear()
            try:
                self.flush()
            except BaseException as err:  # reported to the master loop by tick()
                self._error = err
                return

    def _flush_locked(self) -> None:
        self.hook("journal-swap")
        with self._plock:
            rows, logs = self._pending, self._pending_logs
            self._pending, self._pending_logs = [], []
        if not rows:
            return
        array = np.frombuffer(b"".join(rows), dtype=ROW)
        lengths, blob = encode_logs(logs)
        block = encode_block(array, lengths=lengths, blob=blob)
        self.hook("journal-write")
        self._journal.write(block)
        self.hook("journal-sync")
        self._journal.sync()
        self.hook("journal-synced")
        self._unsnapshotted.append(Rows.from_encoded(array, lengths, blob))
        self._since_bytes += len(block)

    def _rotate(self) -> tuple[list, list]:
        """Close the current journal and start the next one; (old generations, their rows)."""
        old_gens, parts = self._journal_gens, self._unsnapshotted
        new_gen = old_gens[-1] + 1
        self.hook("rotate")
        journal = JournalWriter(journal_path(self.path, new_gen))
        fsync_dir(self.path)
        self.hook("new-journal")
        self._journal.close()
        self._journal, self._journal_gens = journal, [new_gen]
        self._unsnapshotted, self._since_bytes = [], 0
        return old_gens, parts

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"checkpoint {self.path}: journal write failed: {self._error}") from self._error


class MemoryCheckpoint:
    """In-process fake with the Checkpoint interface: the same rows, applied to a table."""

    def __init__(self, graph, restored=None):
        self.graph, self.restored = graph, restored
        self.table = TaskTable.new(graph.memory_mb)
        self.rows: list[Rows] = []
        self.ticks, self.closed = 0, False
        self._engine = None

    def attach(self, engine) -> None:
        self._engine = engine

    def record(self, event, transitions) -> None:
        if self.closed:
            raise RuntimeError("record() after close()")
        rows, logs = event_rows(event, transitions, self._engine)
        if rows:
            part = Rows.with_logs(np.frombuffer(rows, dtype=ROW).copy(), logs)
            self.table.apply(part)
            self.rows.append(part)

    def tick(self, now: float | None = None) -> None:
        self.ticks += 1

    def close(self) -> None:
        self.closed = True


def open_checkpoint(path, graph, retry_failed: bool = False, *, window: float = WINDOW_S,
                    compact_min_bytes: int = COMPACT_MIN_BYTES, compact_ratio: float = COMPACT_RATIO,
                    hook=None) -> Checkpoint:
    """Lock ``path`` and open it for this run: a new checkpoint, or a restart from one.

    UserError (one line) when another run holds it, it was made from another workflow, or it
    is corrupt (it is then left untouched). ``hook(step)``, if given, is called at each
    durable step (tests use it to kill the process there).
    """
    from pilot.graph import graph_hash

    path = os.fspath(path)
    lock = acquire(path + ".lock", path)
    try:
        static = Static.from_graph(graph, graph_hash(graph))
        options = dict(window=window, compact_min_bytes=compact_min_bytes,
                       compact_ratio=compact_ratio, hook=hook)
        if os.path.exists(path):
            return _resume(path, graph, static, lock, retry_failed, options)
        return _create(path, graph, static, lock, options)
    except BaseException:
        lock.release()
        raise


def _create(path: str, graph, static: Static, lock, options) -> Checkpoint:
    _remove_leftovers(path, keep_from=None)
    journal = JournalWriter(journal_path(path, 1))
    fsync_dir(path)
    table, created = TaskTable.new(graph.memory_mb), time.time()
    write_snapshot(path + ".tmp", static, table, 1, None, np.zeros(0, ROW), created)
    os.replace(path + ".tmp", path)
    fsync_dir(path)
    return Checkpoint(path, static, table, journal, [1], lock, created=created, restored=None,
                      unsnapshotted=[], **options)


def _resume(path: str, graph, static: Static, lock, retry_failed: bool, options) -> Checkpoint:
    view = load_checkpoint(path)
    snap = view.snapshot
    if snap.graph_hash != static.graph_hash or snap.table.size != graph.size:
        raise UserError(f"checkpoint {path} was made from another workflow (its hash differs); "
                        "use another --checkpoint file or remove this one")
    _remove_leftovers(path, keep_from=snap.generation)
    restored, rows = restart_rows(snap.table, graph.memory_mb, retry_failed, time.time())
    new_gen = view.generations[-1] + 1 if view.generations else snap.generation
    journal = JournalWriter(journal_path(path, new_gen))
    fsync_dir(path)
    restart = Rows.with_logs(rows, [""] * len(rows))
    journal.write(encode_block(rows, [""] * len(rows)))
    journal.sync()
    kept = view.generations + ([new_gen] if new_gen not in view.generations else [])
    return Checkpoint(path, static, snap.table, journal, kept, lock, created=snap.created,
                      restored=restored, unsnapshotted=[view.journal_rows, restart], **options)


def _remove_leftovers(path: str, keep_from: int | None) -> None:
    """Remove a half-written snapshot and journals no snapshot needs (all when none exists)."""
    if os.path.exists(path + ".tmp"):
        os.unlink(path + ".tmp")
    for g in journal_generations(path):
        if keep_from is None or g < keep_from:
            os.unlink(journal_path(path, g))
    fsync_dir(path)
