"""Workflow files to Graph: format, defaults, precedence, JSON fast path, one-line errors."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pilot import workflow, workflow_values
from pilot.errors import UserError
from pilot.workflow_ids import IdIndex
from pilot.workflow import load_workflow, load_workflow_file, load_workflow_text

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"
ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("ids", "labels", "label", "memory_mb", "cpus", "retries", "memory_multiplier",
          "memory_max", "timeout", "parent_ptr", "parent_idx", "child_ptr", "child_idx",
          "commands", "env", "retry_unless_exit", "concurrency_limit")


def load(text: str, name: str = "w.yaml"):
    return load_workflow(io.StringIO(text), name)


def error(text: str, name: str = "w.yaml") -> str:
    with pytest.raises(UserError) as err:
        load(text, name)
    message = str(err.value)
    assert "\n" not in message and "\r" not in message
    return message


def same_graph(a, b) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.tolist() == y.tolist(), name
        else:
            assert x == y, name


class TestFormat:
    def test_diamond(self):
        g = load_workflow_file(DATA / "diamond.yaml")
        assert g.ids == ["a", "b", "c", "d"] and g.labels == ["default", "heavy"]
        assert g.memory_mb.tolist() == [1000, 3000, 1000, 1000]
        assert g.cpus.tolist() == [1, 2, 1, 1]
        assert g.commands == ["echo a", "echo b", ["echo", "c"], "echo d"]
        assert g.parents(3).tolist() == [1, 2]

    def test_retries_rules(self):
        g = load_workflow_file(DATA / "retries.yaml")
        by_id = dict(zip(g.ids, range(g.size)))
        assert g.retries[by_id["flaky1"]] == 2
        assert g.retries[by_id["hopeless"]] == 3
        assert g.retry_unless_exit[by_id["hopeless"]] == (1,)
        assert g.retries[by_id["grow"]] == 5          # memoryMultiplier > 1, retries unset
        assert g.memory_multiplier[by_id["grow"]] == 2.0 and g.memory_max[by_id["grow"]] == 8000
        assert g.retries[by_id["capped"]] == 1
        assert g.commands[by_id["flaky1"]] == 'test "$PILOT_ATTEMPT" -ge 3'
        assert g.parents(by_id["after_flaky"]).tolist() == [by_id["flaky1"]]

    @pytest.mark.parametrize("name", ["diamond", "memory_bound", "retries", "fan_in"])
    def test_regression_files_load(self, name):
        g = load_workflow_file(DATA / f"{name}.yaml")
        assert g.size > 0 and g.levels is not None

    def test_defaults_when_nothing_is_given(self):
        g = load("- {id: a, command: run}")
        assert g.labels == ["default"]
        assert (g.memory_mb[0], g.cpus[0], g.retries[0], g.memory_multiplier[0],
                g.memory_max[0], g.timeout[0]) == (2048, 1, 0, 1.0, 0, 0.0)
        assert g.env == [None] and g.retry_unless_exit == [()]

    def test_precedence_task_over_label_over_top(self):
        g = load("""
requestMemory: 100
requestCpus: 2
timeout: 5
env: {A: top, B: top}
pipetask:
  lab: {requestMemory: 200, timeout: 7, env: {B: lab, C: lab}, concurrencyLimit: 3}
tasks:
  - {id: t, command: x}
  - {id: l, command: x, label: lab}
  - {id: o, command: x, label: lab, requestMemory: 300, env: {C: task}}
""")
        assert g.memory_mb.tolist() == [100, 200, 300]
        assert g.cpus.tolist() == [2, 2, 2] and g.timeout.tolist() == [5, 7, 7]
        assert g.env[0] == {"A": "top", "B": "top"}
        assert g.env[1] == {"A": "top", "B": "lab", "C": "lab"}
        assert g.env[2] == {"A": "top", "B": "lab", "C": "task"}
        assert g.concurrency_limit == {"lab": 3}

    def test_label_command_and_task_command(self):
        g = load("""
pipetask: {lab: {command: [prog, --flag]}}
tasks:
  - {id: a, label: lab}
  - {id: b, label: lab, command: other}
""")
        assert g.commands == [["prog", "--flag"], "other"]

    def test_explicit_retries_win_over_multiplier_default(self):
        g = load("memoryMultiplier: 1.5\ntasks:\n- {id: a, command: x, numberOfRetries: 0}\n"
                 "- {id: b, command: x}")
        assert g.retries.tolist() == [0, 5]

    def test_multiplier_at_most_one_means_no_scaling(self):
        g = load("- {id: a, command: x, memoryMultiplier: 0.5}")
        assert g.memory_multiplier.tolist() == [1.0] and g.retries.tolist() == [0]

    def test_values_normalised(self):
        g = load("- {id: 7, command: [echo, 1], requestMemory: 1000.5, retryUnlessExit: 3, "
                 "env: {N: 1, F: true}}\n- {id: b, command: x, after: 7}")
        assert g.ids == ["7", "b"] and g.commands[0] == ["echo", "1"]
        assert g.memory_mb[0] == 1001 and g.retry_unless_exit[0] == (3,)
        assert g.env[0] == {"N": "1", "F": "true"} and g.parents(1).tolist() == [0]

    def test_streams_of_bytes_and_text(self):
        text = (DATA / "diamond.yaml").read_text()
        same_graph(load_workflow(io.BytesIO(text.encode()), "x"), load(text))

    def test_yaml_anchors_and_merge_keys(self):
        g = load("""
pipetask:
  lab: &common {command: run, requestMemory: 10}
tasks:
  - {id: a, label: lab}
  - {<<: *common, id: b, requestMemory: 20}
""")
        assert g.commands == ["run", "run"] and g.memory_mb.tolist() == [10, 20]


class TestJsonFastPath:
    def test_same_graph_as_yaml(self):
        data = yaml.safe_load((DATA / "retries.yaml").read_text())
        same_graph(load(json.dumps(data)), load_workflow_file(DATA / "retries.yaml"))

    def test_json_errors_get_their_line_from_a_yaml_parse(self):
        text = json.dumps({"tasks": [{"id": "a", "command": "x"},
                                     {"id": "b", "command": "x", "requestCpus": -1}]}, indent=1)
        assert error(text, "w.json") == "w.json:10: task b: requestCpus must not be negative, got -1"

    def test_json_unknown_after(self):
        text = '{"tasks": [\n{"id": "a", "command": "x"},\n{"id": "b", "command": "x", "after": ["a", "z"]}]}'
        assert error(text, "w.json") == "w.json:3: task b: after names unknown task 'z'"

    def test_yaml_flow_mapping_that_is_not_json(self):
        assert load("{tasks: [{id: a, command: x}]}").ids == ["a"]

    def test_drp_workflow_round_trip(self, tmp_path):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from drp_workflow import LABELS, drp_graph, write_json

        graph, runtimes = drp_graph(3000, seed=1)
        write_json(graph, tmp_path / "drp.json")
        loaded = load_workflow_file(tmp_path / "drp.json")
        for name in ("ids", "parent_ptr", "parent_idx", "child_ptr", "child_idx", "memory_mb"):
            assert np.array_equal(np.asarray(getattr(loaded, name)), np.asarray(getattr(graph, name)))
        assert [loaded.labels[k] for k in loaded.label] == [graph.labels[k] for k in graph.label]
        assert set(loaded.labels) <= set(LABELS) and runtimes.shape == (graph.size,)
        assert (runtimes > 0).all() and loaded.commands[0] == "true"


class TestScanPathsAgree:
    """The per-column scan and the per-task scan must build the same graph."""

    @settings(max_examples=40, deadline=None)
    @given(st.data())
    def test_random_valid_workflows(self, data):
        n = data.draw(st.integers(1, 12))
        tasks = []
        for i in range(n):
            task = {"id": f"t{i}", "command": data.draw(st.sampled_from(["a", "b c", ["x", "1"]]))}
            if data.draw(st.booleans()):
                task["label"] = data.draw(st.sampled_from(["p", "q", "default"]))
            if i and data.draw(st.booleans()):
                deps = data.draw(st.lists(st.integers(0, i - 1), max_size=3))
                task["after"] = [f"t{d}" for d in deps] if data.draw(st.booleans()) or not deps \
                    else f"t{deps[0]}"
            if data.draw(st.booleans()):
                task["requestMemory"] = data.draw(st.integers(0, 5000))
            if data.draw(st.booleans()):
                del task["command"]
            tasks.append(task)
        doc = json.dumps({"command": "fallback", "pipetask": {"q": {"requestCpus": 2}},
                          "tasks": tasks})
        by_column = load(doc)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(workflow._TaskScan, "_scan_by_column", lambda self, tasks: False)
            by_task = load(doc)
        same_graph(by_column, by_task)


    @settings(max_examples=80, deadline=None)
    @given(st.lists(st.dictionaries(
        st.sampled_from(["id", "label", "after", "command", "requestCpus", "bogus"]),
        st.one_of(st.none(), st.integers(-2, 3), st.sampled_from(["t0", "t1", "t2", "a b", "", "x"]),
                  st.lists(st.sampled_from(["t0", "t1", "t9", 1]), max_size=3)),
        min_size=0, max_size=5), min_size=1, max_size=5))
    def test_random_tasks_same_graph_or_same_error(self, tasks):
        doc = json.dumps({"command": "fallback", "tasks": tasks})
        outcomes = []
        for by_column in (True, False):
            with pytest.MonkeyPatch.context() as patch:
                if not by_column:
                    patch.setattr(workflow._TaskScan, "_scan_by_column", lambda self, tasks: False)
                try:
                    outcomes.append(load(doc))
                except UserError as err:
                    outcomes.append(str(err))
        if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
            assert outcomes[0] == outcomes[1]
        else:
            same_graph(*outcomes)


    @settings(max_examples=80, deadline=None)
    @given(st.lists(st.dictionaries(
        st.sampled_from(["requestMemory", "requestCpus", "numberOfRetries", "memoryMultiplier",
                         "requestMemoryMax", "timeout", "env", "retryUnlessExit", "label"]),
        st.one_of(st.integers(-1, 9000), st.floats(0, 3000), st.booleans(),
                  st.sampled_from(["p", "q", "x y"]), st.just({"V": "1"}), st.just([1, 2])),
        max_size=4), min_size=1, max_size=6))
    def test_task_settings_by_column_or_by_task(self, settings_per_task):
        tasks = [{"id": f"t{i}", "command": "c", **extra} for i, extra in enumerate(settings_per_task)]
        doc = json.dumps({"env": {"T": "top"}, "pipetask": {
            "p": {"numberOfRetries": 2, "memoryMultiplier": 3, "env": {"P": "p"}},
            "q": {"memoryMultiplier": 2, "requestMemory": 100}}, "tasks": tasks})
        outcomes = []
        for by_column in (True, False):
            with pytest.MonkeyPatch.context() as patch:
                if not by_column:
                    patch.setattr(workflow_values, "_overrides_by_column", lambda *args: False)
                try:
                    outcomes.append(load(doc))
                except UserError as err:
                    outcomes.append(str(err))
        if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
            assert outcomes[0] == outcomes[1]
        else:
            same_graph(*outcomes)


class TestIdIndex:
    def test_colliding_hashes_fall_back_to_exact_lookups(self, monkeypatch):
        import pilot.workflow_ids as ids_module

        monkeypatch.setattr(ids_module, "hash", len, raising=False)  # "ab" and "cd" collide
        g = load("- {id: ab, command: x}\n- {id: cd, command: x, after: [ab]}\n"
                 "- {id: e, command: x, after: [cd]}")
        assert g.parents(1).tolist() == [0] and g.parents(2).tolist() == [1]
        assert error("- {id: ab, command: x}\n- {id: cd, command: x, after: [zz]}") == \
            "w.yaml:2: task cd: after names unknown task 'zz'"


    def test_one_id_repeated_many_times(self):
        text = json.dumps([{"id": "same", "command": "x"}] * 2000)
        assert error(text, "w.json") == "w.json:1: task same: duplicate task id (first at line 1)"
        # one table entry per distinct hash: no probe chain as long as the file
        assert IdIndex(["same"] * 200_000).first_duplicate() == (0, 1)


class TestErrors:
    """One line each: file, line, task id and key."""

    @pytest.mark.parametrize("name, expected", [
        ("duplicate_id", ":6: task a: duplicate task id (first at line 2)"),
        ("unknown_after", ":5: task b: after names unknown task 'nosuch'"),
        ("cycle", ": cycle: a -> b -> c -> a"),
        ("wrong_type", ":4: task a: requestMemory must be a number, got 'lots'"),
        ("negative", ":7: task b: numberOfRetries must not be negative, got -2"),
        ("unknown_key", ":4: task a: unknown key 'requestMemroy' (did you mean requestMemory?)"),
        ("malformed", ":5: while scanning a quoted scalar (at line 3): found unexpected end of stream"),
        ("section_type", ":3: pipetask section isr: requestCpus must be an integer, got 1.5"),
    ])
    def test_bad_files(self, name, expected):
        path = BAD / f"{name}.yaml"
        with pytest.raises(UserError) as err:
            load_workflow_file(path)
        assert str(err.value) == f"{path}{expected}"

    @pytest.mark.parametrize("text, expected", [
        ("tasks: 3", "w.yaml:1: top level: tasks must be a list of tasks, got 3"),
        ("tasks: []", "w.yaml:1: top level: the workflow has no tasks"),
        ("foo: 1", "w.yaml:1: top level: unknown key 'foo' (known keys: command, env, memoryMultiplier, "
                   "numberOfRetries, pipetask, requestCpus, requestMemory, requestMemoryMax, "
                   "retryUnlessExit, tasks, timeout)"),
        ("requestMemory: 1\n", "w.yaml:1: top level: no tasks: key (a list of tasks)"),
        ("42", "w.yaml: top level: expected a mapping with tasks: or a list of tasks, got 42"),
        ("", "w.yaml: top level: expected a mapping with tasks: or a list of tasks, got None"),
        ("- 5", "w.yaml:1: tasks[0]: a task must be a mapping, got 5"),
        ("- {command: x}", "w.yaml:1: tasks[0]: a task needs an id"),
        ("- {id: 'a b', command: x}", "w.yaml:1: tasks[0]: id must be a name without spaces, '/' or control characters (and not . or ..), got 'a b'"),
        ("- {id: [a], command: x}", "w.yaml:1: tasks[0]: id must be a non-empty string, got ['a']"),
        ("- {id: a}", "w.yaml:1: task a: no command (give command: in the task, its pipetask section or at top level)"),
        ("- {id: a, command: ''}", "w.yaml:1: task a: command must be a non-empty string (run by the shell) "
                                   "or a non-empty list of strings (argv), got ''"),
        ("- {id: a, command: x, after: {b: 1}}", "w.yaml:1: task a: after must be a task id or a list of task ids, got {'b': 1}"),
        ("- {id: a, command: x, after: [[b]]}", "w.yaml:1: task a: after must list task ids, got ['b']"),
        ("- {id: ., command: x}", "w.yaml:1: tasks[0]: id must be a name without spaces, '/' or control characters (and not . or ..), got '.'"),
        ("- {id: a, command: x, label: 'x/y'}", "w.yaml:1: task a: label must be a name without spaces, '/' or control characters (and not . or ..), got 'x/y'"),
        ("- {id: a, command: x, concurrencyLimit: 2}", "w.yaml:1: task a: key concurrencyLimit is only allowed in a pipetask section"),
        ("pipetask: {l: {id: 3}}\ntasks: [{id: a, command: x}]", "w.yaml:1: pipetask section l: key id is only allowed in a task"),
        ("pipetask: [1]\ntasks: [{id: a, command: x}]", "w.yaml:1: top level: pipetask must be a mapping of label to settings, got [1]"),
        ("pipetask: {l: 1}\ntasks: [{id: a, command: x}]", "w.yaml:1: pipetask section l: must be a mapping of settings, got 1"),
        ("- {id: a, command: x, requestMemory: .nan}", "w.yaml:1: task a: requestMemory must be a finite number, got nan"),
        ("- {id: a, command: x, requestCpus: 0}", "w.yaml:1: task a: requestCpus must be at least 1, got 0"),
        ("- {id: a, command: x, requestCpus: true}", "w.yaml:1: task a: requestCpus must be an integer, got True"),
        ("- {id: a, command: x, requestCpus: 99999999999}", "w.yaml:1: task a: requestCpus is too large, got 99999999999 (at most 2.14748e+09)"),
        ("- {id: a, command: x, memoryMultiplier: 0}", "w.yaml:1: task a: memoryMultiplier must be greater than 0, got 0"),
        ("- {id: a, command: x, retryUnlessExit: [1, x]}", "w.yaml:1: task a: retryUnlessExit must be an exit code (0-255) or a list of them, got [1, 'x']"),
        ("- {id: a, command: x, env: [1]}", "w.yaml:1: task a: env must be a mapping of variable names to values, got [1]"),
        ("- {id: a, command: x, env: {'A=B': 1}}", "w.yaml:1: task a: env has a bad variable name 'A=B'"),
        ("- {id: a, command: x, env: {A: [1]}}", "w.yaml:1: task a: env A must be a string or number, got [1]"),
        ("- {id: a, command: x, requestMemory: 5000, requestMemoryMax: 4000}",
         "w.yaml:1: task a: requestMemoryMax 4000 is below requestMemory 5000"),
        ("requestMemoryMax: 10\ntasks: [{id: a, command: x}]", "w.yaml:1: top level: requestMemoryMax 10 is below requestMemory 2048"),
        ("- {id: a, command: x, Command: y}", "w.yaml:1: task a: unknown key 'Command' (did you mean command?)"),
        ("- {id: a, command: x, 3: y}", "w.yaml:1: task a: unknown key 3: keys are names such as requestMemory"),
        ("- {id: a, command: x}\n- {id: a, command: y}", "w.yaml:2: task a: duplicate task id (first at line 1)"),
        ("a: 1\na: 2", "w.yaml:2: duplicate key 'a' (also at line 1)"),
        ("- {id: a, command: x, after: a}", "w.yaml: cycle: a -> a"),
        ("- {id: a, command: x, after: null}", "w.yaml:1: task a: after must be a task id or a list of task ids, got None"),
        ("- {id: a, command: x, label: null}", "w.yaml:1: task a: label must be a name without spaces, '/' or control characters (and not . or ..), got None"),
        ("- {id: a, command: x}\n- {id: b, command: x, after: [a, 5]}", "w.yaml:2: task b: after names unknown task '5'"),
        ("x: !!binary 'QQ'\n", "w.yaml:1: failed to decode base64 data: Incorrect padding"),
        ("[" * 3000 + "]" * 3000, "w.yaml: nesting too deep"),
        ("- {id: a, command: x, requestMemory: 1" + "0" * 400 + "}",
         "w.yaml:1: task a: requestMemory is too large, got 1000000000000000000000000000000000000... (at most 1.09951e+12)"),
        ("- {id: a, command: x, timeout: 1" + "0" * 5000 + "}",
         "w.yaml:1: bad value: Exceeds the limit (4300 digits) for integer string conversion: value has 5001 digits"),
    ])
    def test_messages(self, text, expected):
        assert error(text) == expected

    def test_duplicate_in_json_without_lines(self, monkeypatch):
        monkeypatch.setattr(workflow, "RELOCATE_LIMIT", 0)
        text = json.dumps([{"id": "a", "command": "x"}, {"id": "a", "command": "x"}])
        assert error(text, "w.json") == "w.json: task a: duplicate task id (first at tasks[0])"

    def test_not_utf8(self):
        with pytest.raises(UserError, match=r"^w.yaml:2: not UTF-8 text"):
            load_workflow(io.BytesIO(b"tasks:\n  - {id: \xff}"), "w.yaml")

    def test_missing_file(self, tmp_path):
        with pytest.raises(UserError, match=r"nosuch.yaml: cannot read: No such file or directory"):
            load_workflow_file(tmp_path / "nosuch.yaml")

    def test_directory(self, tmp_path):
        with pytest.raises(UserError, match=r": cannot read: Is a directory"):
            load_workflow_file(tmp_path)

    def test_text_entry_point(self):
        assert load_workflow_text("- {id: a, command: x}", "t").ids == ["a"]
