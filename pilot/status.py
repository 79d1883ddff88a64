"""Status of a run from its checkpoint: per-label counts, JSON, and failed tasks with logs.

Reads through :func:`pilot.checkpoint.load_checkpoint`, so it takes no lock and works while a
run is writing the checkpoint (it sees the run as of its last journal flush).
"""

from __future__ import annotations

import os
import signal as signals

import numpy as np

from pilot.events import Failure, State

COLUMNS = ("pending", "launched", "running", "exec_done", "failed", "dep_fail", "total")
TOTAL_KEY = "__total__"   # the total row's key in the JSON output

# State number -> column (READY is still waiting, so it counts as pending).
_COLUMN_OF_STATE = np.array([0, 0, 1, 2, 3, 4, 5])


def label_counts(labels: list[str], label: np.ndarray, state: np.ndarray) -> dict[str, dict[str, int]]:
    """{label: {column: count}} in label order, plus the total row under TOTAL_KEY."""
    k = len(labels)
    col = _COLUMN_OF_STATE[state.astype(np.int64)]
    grid = np.bincount(label.astype(np.int64) * 6 + col, minlength=k * 6).reshape(k, 6)
    result = {name: _row(grid[i]) for i, name in enumerate(labels)}
    result[TOTAL_KEY] = _row(grid.sum(axis=0))
    return result


def _row(values: np.ndarray) -> dict[str, int]:
    row = {name: int(v) for name, v in zip(COLUMNS[:-1], values)}
    row["total"] = int(values.sum())
    return row


def format_table(counts: dict[str, dict[str, int]]) -> str:
    """The table: ``task_type`` then COLUMNS, one row per label, then the total row."""
    header = ("task_type",) + COLUMNS
    rows = [(("total" if name == TOTAL_KEY else name),) + tuple(str(c[k]) for k in COLUMNS)
            for name, c in counts.items()]
    return aligned([header] + rows)


def aligned(rows: list[tuple[str, ...]], left: int = 1) -> str:
    """``rows`` as columns two spaces apart, the first ``left`` left-justified and the others
    right-justified, with no trailing spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def describe_end(failure: int, exit_code: int, signal: int) -> str:
    """``OOM, signal 9 (SIGKILL)`` / ``EXIT, exit code 3``."""
    name = Failure(int(failure)).name if int(failure) in Failure._value2member_map_ else str(failure)
    if signal:
        try:
            return f"{name}, signal {signal} ({signals.Signals(signal).name})"
        except ValueError:
            return f"{name}, signal {signal}"
    if exit_code >= 0:
        return f"{name}, exit code {exit_code}"
    return name


def tail(path: str, lines: int) -> list[str]:
    """The last ``lines`` lines of a text file (reads at most its last 64 KiB)."""
    if not path or lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            data = f.read()
    except OSError as err:
        return [f"(log not readable: {err.strerror})"]
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def failed_tasks(view, lines: int = 10) -> list[dict]:
    """Failed tasks: id, label, attempts, failure class, exit code / signal, log, last lines."""
    table, snap = view.table, view.snapshot
    failed = np.flatnonzero(table.state == State.FAILED)
    ids = snap.ids() if failed.size else []
    return [_failed_entry(int(t), ids[t], snap.labels[int(snap.label[t])], table, lines) for t in failed]


def _failed_entry(t: int, task_id: str, label: str, table, lines: int) -> dict:
    log = str(table.log[t])
    return {
        "id": task_id, "label": label, "attempts": int(table.attempts[t]),
        "failure": Failure(int(table.failure[t])).name if int(table.failure[t]) in Failure._value2member_map_
        else str(int(table.failure[t])),
        "exit_code": None if table.exit_code[t] < 0 else int(table.exit_code[t]),
        "signal": int(table.signal[t]) or None,
        "end": describe_end(table.failure[t], int(table.exit_code[t]), int(table.signal[t])),
        "log": log, "tail": tail(log, lines),
    }


def format_failed(entries: list[dict]) -> str:
    if not entries:
        return "no failed tasks"
    out = []
    for e in entries:
        out.append(f"{e['id']} [{e['label']}] attempts {e['attempts']}: {e['end']}")
        out.append(f"  log: {e['log'] or '(none)'}")
        out.extend(f"  | {line}" for line in e["tail"])
    return "\n".join(out)
