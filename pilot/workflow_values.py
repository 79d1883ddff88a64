"""Per-task values of a workflow: each label's settings spread over its tasks, then the
settings tasks give themselves.

Task-level settings are read a key at a time over all such tasks (numpy checks), so a
million tasks that each carry their own ``requestMemory`` stay fast; anything unusual
goes through the task-by-task path, which words the error.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np

from pilot.workflow_keys import (CHECKS, MAX_COUNT, MAX_MB, RETRIES_WITH_MULTIPLIER,
                                 BadValue, Problem, finalize, merge, read_settings)

NUMERIC = ("memory_mb", "cpus", "retries", "multiplier", "memory_max", "timeout")
_DTYPES = (np.int64, np.int32, np.int32, np.float64, np.int64, np.float64)
# key: (values column, integers only, lowest, highest, lowest excluded)
_COLUMNS = {
    "requestMemory": ("memory_mb", False, 0, MAX_MB, False),
    "requestCpus": ("cpus", True, 1, MAX_COUNT, False),
    "numberOfRetries": ("retries", True, 0, MAX_COUNT, False),
    "memoryMultiplier": ("multiplier", False, 0, 1e6, True),
    "requestMemoryMax": ("memory_max", False, 0, MAX_MB, False),
    "timeout": ("timeout", False, 0, 1e9, False),
}


def label_values(scan, sections: dict, defaults: dict, top: dict) -> dict:
    """Per-task values as if no task set anything itself: each label's settings, spread."""
    finals = [_label_final(label, sections, defaults, top) for label in scan.labels]
    label_of = np.asarray(scan.label_of, dtype=np.int32)
    values = {name: np.asarray([f[k] for f in finals], dtype=dtype)[label_of]
              for k, (name, dtype) in enumerate(zip(NUMERIC, _DTYPES))}
    for k, name in ((6, "command"), (7, "env"), (8, "retry_unless_exit")):
        column = np.empty(len(finals), dtype=object)
        column[:] = [f[k] for f in finals]
        values[name] = column[label_of].tolist()
    return values


def _label_final(label: str, sections: dict, defaults: dict, top: dict) -> tuple:
    if label in sections:
        settings, section, context = sections[label]
        return finalize(settings, section, context)
    return finalize(defaults, top, "top level")


def _label_settings(label: str, sections: dict, defaults: dict) -> dict:
    return sections[label][0] if label in sections else defaults


def apply_overrides(scan, tasks: list, sections: dict, defaults: dict, values: dict) -> None:
    """Settings given on tasks themselves win over their label's (``scan.overrides``)."""
    if scan.overrides and not _overrides_by_column(scan, tasks, sections, defaults, values):
        _overrides_by_task(scan, tasks, sections, defaults, values)


def _overrides_by_task(scan, tasks: list, sections: dict, defaults: dict, values: dict) -> None:
    """Task by task, raising the first problem; rewrites every value of those tasks."""
    for i in scan.overrides:
        task, label = tasks[i], scan.labels[scan.label_of[i]]
        context = f"task {scan.ids[i]}"
        base = _label_settings(label, sections, defaults)
        final = finalize(merge(base, read_settings(task, context)), task, context)
        for k, name in enumerate(NUMERIC):
            values[name][i] = final[k]
        values["command"][i], values["env"][i], values["retry_unless_exit"][i] = final[6:]


def _overrides_by_column(scan, tasks: list, sections: dict, defaults: dict,
                         values: dict) -> bool:
    """The same values as :func:`_overrides_by_task` for valid settings; False (leaving
    only values of the override tasks changed) at the first doubt."""
    rows = np.asarray(scan.overrides, dtype=np.int64)
    own = [tasks[i] for i in scan.overrides]
    label_retries = values["retries"][rows]
    explicit_retries = None
    for key, (name, integer, low, high, open_low) in _COLUMNS.items():
        if key not in scan.override_keys:
            continue
        has = np.fromiter(map(dict.__contains__, own, repeat(key)), dtype=bool, count=len(own))
        if not has.any():
            continue
        column = _checked_numbers([own[k][key] for k in np.flatnonzero(has).tolist()],
                                  integer, low, high, open_low)
        if column is None:
            return False
        values[name][rows[has]] = _stored(key, column)
        if key == "numberOfRetries":
            explicit_retries = has
    _derive_retries(scan, sections, defaults, values, rows, label_retries, explicit_retries)
    memory_max, memory = values["memory_max"][rows], values["memory_mb"][rows]
    if ((memory_max > 0) & (memory_max < memory)).any():
        return False
    if scan.override_keys.isdisjoint(("env", "retryUnlessExit")):
        return True
    return _objects_by_task(own, scan.overrides, values)


def _checked_numbers(items: list, integer: bool, low, high, open_low: bool):
    """The items as a numpy array if all are in range, else None."""
    kinds = set(map(type, items))
    if not (kinds == {int} if integer else kinds <= {int, float}):
        return None
    try:
        column = np.array(items, dtype=np.int64 if integer else np.float64)
    except OverflowError:
        return None
    if not np.isfinite(column).all() or (column > high).any():
        return None
    if ((column <= low) if open_low else (column < low)).any():
        return None
    return column


def _stored(key: str, column: np.ndarray) -> np.ndarray:
    """As the value checks store them: whole MB rounded up, multipliers <= 1 as 1."""
    if key in ("requestMemory", "requestMemoryMax"):
        return np.ceil(column)
    if key == "memoryMultiplier":
        return np.maximum(column, 1.0)
    return column


def _derive_retries(scan, sections, defaults, values, rows, label_retries, explicit) -> None:
    """numberOfRetries: the task's, else its label's if set there, else 5 when the
    task's memoryMultiplier > 1, else 0."""
    label_sets = np.array(["numberOfRetries" in _label_settings(label, sections, defaults)
                           for label in scan.labels], dtype=bool)
    from_label = label_sets[np.asarray(scan.label_of, dtype=np.int64)[rows]]
    scaled = values["multiplier"][rows] > 1
    derived = np.where(from_label, label_retries,
                       np.where(scaled, RETRIES_WITH_MULTIPLIER, 0))
    if explicit is not None:
        derived = np.where(explicit, values["retries"][rows], derived)
    values["retries"][rows] = derived


def _objects_by_task(own: list, rows: list, values: dict) -> bool:
    """env (merged over the label's) and retryUnlessExit of tasks that give them."""
    for task, i in zip(own, rows):
        try:
            if "env" in task:
                merged = {**(values["env"][i] or {}), **CHECKS["env"](task["env"])}
                values["env"][i] = merged or None
            if "retryUnlessExit" in task:
                values["retry_unless_exit"][i] = CHECKS["retryUnlessExit"](task["retryUnlessExit"])
        except BadValue:
            return False
    return True


def check_commands(scan, tasks: list, values: dict) -> None:
    """Each task's own command over its label's; a task with neither is a problem."""
    if scan.all_commands:
        values["command"] = scan.commands
        return
    commands = values["command"] = [mine if mine is not None else theirs
                                    for mine, theirs in zip(scan.commands, values["command"])]
    if None in commands:
        i = commands.index(None)
        raise Problem(tasks[i], None, f"task {scan.ids[i]}",
                      "no command (give command: in the task, its pipetask section or at top level)")
