"""Generic workflow files to a :class:`pilot.graph.Graph`, with one-line errors.

The format (see docs/workflow.md): a mapping with ``tasks:`` (a list of tasks), top-level
defaults and ``pipetask: {LABEL: {...}}`` sections using the same keys, or a bare list of
tasks. JSON input (a YAML subset) is parsed by the json module, which keeps a
million-task file fast; a JSON file with a problem is parsed again as YAML to find the
line to report.
"""

from __future__ import annotations

import gc
import re
from itertools import chain, repeat

import numpy as np

from pilot.errors import UserError
from pilot.graph import Graph, graph_from_arrays, topological_levels
from pilot.workflow_keys import (SECTION_KEYS, TASK_KEYS, TOP_KEYS, Problem, check_keys,
                                 merge, read_settings, show)
from pilot.workflow_ids import IdIndex
from pilot.workflow_parse import LineList, parse_json, parse_yaml, read_text
from pilot.workflow_values import apply_overrides, check_commands, label_values

DEFAULT_LABEL = "default"
RELOCATE_LIMIT = 64 * 2**20     # larger JSON files report problems without a line number
_NAME_OK = re.compile(r"[^\s/\x00-\x1f\x7f]+").fullmatch
NAME_RULE = "a name without spaces, '/' or control characters (and not . or ..)"


def load_workflow(stream, name: str = "<workflow>") -> Graph:
    """Read a workflow (YAML or JSON) from a text or binary stream; ``name`` goes in errors.

    Raises :class:`UserError` (one line: file, line, task id, key) on any problem,
    including a dependency cycle.
    """
    return load_workflow_text(read_text(stream, name), name)


def load_workflow_file(path) -> Graph:
    """:func:`load_workflow` on a file path."""
    name = str(path)
    try:
        with open(path, "rb") as stream:
            return load_workflow(stream, name)
    except OSError as err:
        raise UserError(f"{name}: cannot read: {err.strerror or err}") from None


def load_workflow_text(text: str, name: str) -> Graph:
    """:func:`load_workflow` on text already read."""
    # millions of new containers and no cycles among them: the cyclic GC would only
    # rescan them again and again (2-3x the parse time)
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _load_text(text, name)
    finally:
        if collecting:
            gc.enable()


def _load_text(text: str, name: str) -> Graph:
    data = parse_json(text, name)
    located = data is None
    if located:
        data = parse_yaml(text, name)
    try:
        graph = build_graph(data)
    except Problem as problem:
        raise UserError(_relocated(problem, text, name, located)) from None
    try:
        topological_levels(graph)
    except UserError as err:
        raise UserError(f"{name}: {err}") from None
    return graph


def _relocated(problem: Problem, text: str, name: str, located: bool) -> str:
    """The problem's message, with a line number found by a YAML parse if it had none."""
    if located or len(text) > RELOCATE_LIMIT:
        return problem.render(name)
    try:
        build_graph(parse_yaml(text, name))
    except Problem as again:
        if again.text == problem.text:
            return again.render(name)
    except UserError:
        pass
    return problem.render(name)


# ---- data to graph --------------------------------------------------------------------


def build_graph(data) -> Graph:
    """Checked workflow data (from JSON or YAML) to a Graph; raises :class:`Problem`."""
    top, tasks = _split_top(data)
    defaults = read_settings(top, "top level")
    sections, limits = _read_sections(top, defaults)
    scan = _TaskScan(tasks)
    parent_ptr, parent_idx = _resolve_after(scan, tasks)
    values = label_values(scan, sections, defaults, top)
    apply_overrides(scan, tasks, sections, defaults, values)
    check_commands(scan, tasks, values)
    return graph_from_arrays(scan.ids, scan.labels, np.asarray(scan.label_of, dtype=np.int32),
                             parent_ptr, parent_idx, concurrency_limit=limits, **values)


def _split_top(data) -> tuple[dict, list]:
    if isinstance(data, list):
        top, tasks = {}, data
    elif isinstance(data, dict):
        check_keys(data, TOP_KEYS, "top level")
        if "tasks" not in data:
            raise Problem(data, None, "top level", "no tasks: key (a list of tasks)")
        top, tasks = data, data["tasks"]
    else:
        raise Problem(data, None, "top level",
                      f"expected a mapping with tasks: or a list of tasks, got {show(data)}")
    if not isinstance(tasks, list):
        raise Problem(top, "tasks", "top level", f"tasks must be a list of tasks, got {show(tasks)}")
    if not tasks:
        raise Problem(top or tasks, "tasks", "top level", "the workflow has no tasks")
    return top, tasks


def _read_sections(top: dict, defaults: dict) -> tuple[dict, dict]:
    """Per-label settings merged over the top level, and per-label concurrency limits."""
    raw = top.get("pipetask")
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise Problem(top, "pipetask", "top level",
                      f"pipetask must be a mapping of label to settings, got {show(raw)}")
    sections, limits = {}, {}
    for label, section in raw.items():
        context = f"pipetask section {show(label, 60) if not _good_name(label) else label}"
        if not _good_name(label):
            raise Problem(raw, label, context, f"a label must be {NAME_RULE}")
        if not isinstance(section, dict):
            raise Problem(raw, label, context, f"must be a mapping of settings, got {show(section)}")
        check_keys(section, SECTION_KEYS, context)
        settings = read_settings(section, context)
        if "concurrencyLimit" in settings:
            limits[label] = settings.pop("concurrencyLimit")
        sections[label] = (merge(defaults, settings), section, context)
    return sections, limits


def _good_name(name) -> bool:
    return isinstance(name, str) and _NAME_OK(name) is not None and name not in (".", "..")


class _TaskScan:
    """The tasks' ids, labels, dependencies and own commands, and which tasks set more.

    Large files take the per-column pass; the per-task pass is the reference, used for
    anything unusual, and raises the first problem in file order.
    """

    def __init__(self, tasks: list):
        if not self._scan_by_column(tasks):
            self._scan(tasks)
        self.index = IdIndex(self.ids)
        twice = self.index.first_duplicate()
        if twice is not None:
            first, second = twice
            raise Problem(tasks[second], "id", f"task {self.ids[second]}", "duplicate task id",
                          first=(tasks[first], "id", f"tasks[{first}]"))

    def _scan_by_column(self, tasks: list) -> bool:
        """The same result as :meth:`_scan` for well-formed tasks, with a few C-level passes
        per key instead of Python code per task; False (nothing decided) otherwise."""
        try:
            ids, labels, deps, commands = (list(map(dict.get, tasks, repeat(key)))
                                           for key in ("id", "label", "after", "command"))
        except TypeError:  # a task that is not a mapping
            return False
        if not (_plain_names(ids) and _label_numbers(self, labels) and _flat_after(self, deps)):
            return False
        checked = _plain_commands(commands)
        if checked is None:
            return False
        self.ids, (self.commands, self.all_commands) = ids, checked
        maybe_none = {"label": self.labels_missing, "after": self.after_missing,
                      "command": not self.all_commands}
        self.overrides = _with_more_keys(tasks, {"id": ids, "label": labels, "after": deps,
                                                 "command": commands}, maybe_none)
        if self.overrides is None:
            return False  # an explicit null: the per-task scan words the error
        own = [tasks[i] for i in self.overrides]
        self.override_keys = set().union(*map(dict.keys, own))
        if not self.override_keys <= TASK_KEYS:
            for i in self.overrides:
                check_keys(tasks[i], TASK_KEYS, f"task {ids[i]}")
        return True

    def _scan(self, tasks: list) -> None:
        """Task by task, raising the first problem found."""
        self.ids, self.labels, self.label_of, self.after = [], [], [], []
        self.after_count, self.commands, self.overrides = [], [], []
        self.override_keys = TASK_KEYS
        self.all_commands = False
        numbers: dict = {}
        ids, label_of, after, counts, commands = (
            self.ids, self.label_of, self.after, self.after_count, self.commands)
        for i, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise Problem(tasks, i, f"tasks[{i}]", f"a task must be a mapping, got {show(task)}")
            if not task.keys() <= TASK_KEYS:
                check_keys(task, TASK_KEYS, _context(task, i))
            tid = task.get("id")
            if type(tid) is not str or not _good_name(tid):
                tid = _task_id(task, i)
            ids.append(tid)
            label = task.get("label", DEFAULT_LABEL)
            number = numbers.get(label) if type(label) is str else None
            if number is None:
                number = self._new_label(numbers, task, tid)
            label_of.append(number)
            deps = task.get("after")
            if type(deps) is str or (type(deps) is int and not isinstance(deps, bool)):
                after.append(deps)
                counts.append(1)
            elif isinstance(deps, list):
                after.extend(deps)
                counts.append(len(deps))
            elif deps is None and "after" not in task:
                counts.append(0)
            else:
                raise Problem(task, "after", f"task {tid}",
                              f"after must be a task id or a list of task ids, got {show(deps)}")
            command = task.get("command")
            if type(command) is not str or not command.strip():
                command = _task_command(task, tid)
            commands.append(command)
            if len(task) > 1 + (deps is not None) + ("label" in task) + (command is not None):
                self.overrides.append(i)

    def _new_label(self, numbers: dict, task: dict, tid: str) -> int:
        label = task.get("label", DEFAULT_LABEL)
        if not _good_name(label):
            raise Problem(task, "label", f"task {tid}",
                          f"label must be {NAME_RULE}, got {show(label)}")
        numbers[label] = len(self.labels)
        self.labels.append(label)
        return numbers[label]


def _plain_names(ids: list) -> bool:
    """All ids are names as _NAME_OK wants them, checked in bulk on the ids joined by spaces
    (isprintable() is False for every whitespace but the space, and for controls)."""
    try:
        joined = " ".join(ids)
    except TypeError:  # not all strings
        return False
    padded = f" {joined} "
    return (joined.isprintable() and joined.count(" ") == len(ids) - 1 and "/" not in joined
            and "  " not in padded and " . " not in padded and " .. " not in padded)


def _plain_commands(commands: list) -> tuple[list, bool] | None:
    """The commands, each distinct one checked once and shared (None where a task has none);
    None if any is not a non-empty string. Also whether every task has one."""
    try:
        distinct = dict.fromkeys(commands)
    except TypeError:  # argv lists
        return None
    for command in distinct:
        if command is not None and (type(command) is not str or not command.strip()):
            return None
        distinct[command] = command
    return list(map(distinct.__getitem__, commands)), None not in distinct


def _with_more_keys(tasks: list, columns: dict, maybe_none: dict) -> list[int] | None:
    """Tasks with keys beyond id, label, after and command (overrides or unknown keys);
    None if some task gives one of those four an explicit null."""
    known = 0
    for key, column in columns.items():
        present = len(column)
        if maybe_none.get(key):  # count(None) compares every item: only where needed
            present = sum(map(dict.__contains__, tasks, repeat(key)))
            if present != len(column) - column.count(None):
                return None
        known += present
    if sum(map(len, tasks)) == known:
        return []
    present = sum(np.fromiter(map(dict.__contains__, tasks, repeat(key)), dtype=np.int64,
                              count=len(tasks)) for key in columns)
    return np.flatnonzero(np.fromiter(map(len, tasks), dtype=np.int64, count=len(tasks))
                          - present).tolist()


def _label_numbers(scan: "_TaskScan", labels: list) -> bool:
    """Label table and per-task label numbers; a missing label (None) is DEFAULT_LABEL."""
    try:
        distinct = dict.fromkeys(labels)
    except TypeError:
        return False
    numbers: dict = {}
    for label in distinct:
        name = DEFAULT_LABEL if label is None else label
        if not _good_name(name):
            return False
        distinct[label] = numbers.setdefault(name, len(numbers))
    scan.labels = list(numbers)
    scan.labels_missing = None in distinct
    scan.label_of = np.fromiter(map(distinct.__getitem__, labels), dtype=np.int32,
                                count=len(labels))
    return True


def _flat_after(scan: "_TaskScan", deps: list) -> bool:
    """Dependency names in one flat list and a count per task."""
    kinds = set(map(type, deps))
    scan.after_missing = type(None) in kinds
    if kinds <= {list, LineList}:
        scan.after_count = np.fromiter(map(len, deps), dtype=np.int64, count=len(deps))
    elif kinds <= {list, LineList, str, type(None)}:
        scan.after_count = [1 if type(d) is str else 0 if d is None else len(d) for d in deps]
        deps = [[d] if type(d) is str else d or () for d in deps]
    else:
        return False
    scan.after = list(chain.from_iterable(deps))
    return True


def _task_command(task: dict, tid: str):
    if "command" not in task:
        return None
    return read_settings(task, f"task {tid}")["command"]


def _context(task: dict, i: int) -> str:
    tid = task.get("id")
    return f"task {tid}" if _good_name(tid) else f"tasks[{i}]"


def _task_id(task: dict, i: int) -> str:
    """The id of a task whose id is not a plain string: an integer is accepted."""
    if "id" not in task:
        raise Problem(task, None, f"tasks[{i}]", "a task needs an id")
    tid = task["id"]
    if isinstance(tid, int) and not isinstance(tid, bool):
        return str(tid)
    if isinstance(tid, str) and tid.strip():
        raise Problem(task, "id", f"tasks[{i}]",
                      f"id must be {NAME_RULE}, got {show(tid)}")
    raise Problem(task, "id", f"tasks[{i}]", f"id must be a non-empty string, got {show(tid)}")


# ---- dependencies ---------------------------------------------------------------------


def _resolve_after(scan: _TaskScan, tasks: list) -> tuple[np.ndarray, np.ndarray]:
    """Parents CSR from the ``after`` ids; a slow exact pass finds the first bad one."""
    ptr = np.zeros(len(scan.ids) + 1, dtype=np.int64)
    np.cumsum(np.asarray(scan.after_count, dtype=np.int64), out=ptr[1:])
    parents = scan.index.lookup(scan.after)
    if parents is None:
        parents = _resolve_after_slowly(scan, tasks)
    return ptr, parents


def _resolve_after_slowly(scan: _TaskScan, tasks: list) -> np.ndarray:
    """Like the fast path, but accepts integer ids and names the first unknown one."""
    parents = []
    for i, task in enumerate(tasks):
        deps = task.get("after")
        for dep in deps if isinstance(deps, list) else () if deps is None else [deps]:
            parents.append(_parent_number(scan, task, i, dep))
    return np.asarray(parents, dtype=np.int64)


def _parent_number(scan: _TaskScan, task: dict, i: int, dep) -> int:
    tid = scan.ids[i]
    if isinstance(dep, int) and not isinstance(dep, bool):
        dep = str(dep)
    if not isinstance(dep, str):
        raise Problem(task, "after", f"task {tid}", f"after must list task ids, got {show(dep)}")
    number = scan.index.get(dep)
    if number is None:
        raise Problem(task, "after", f"task {tid}", f"after names unknown task {show(dep, 80)}")
    return number
