"""`pilot validate`: summaries, node checks, and a fuzz of the loader through the real CLI."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilot.cli import main
from tests.helpers import VENV_BIN

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent
PILOT = VENV_BIN / "pilot"
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, out: str, err: str) -> None:
    assert code == 2, (out, err)
    assert out == ""
    assert err.startswith("pilot: error: ") and err.endswith("\n")
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


class TestValidate:
    @pytest.mark.parametrize("name, summary", [
        ("diamond", "4 tasks, 4 edges, 2 labels, critical path 3 tasks"),
        ("memory_bound", "8 tasks, 7 edges, 2 labels, critical path 2 tasks"),
        ("retries", "5 tasks, 2 edges, 3 labels, critical path 2 tasks"),
        ("fan_in", "10 tasks, 9 edges, 1 labels, critical path 3 tasks"),
    ])
    def test_regression_files(self, name, summary):
        path = DATA / f"{name}.yaml"
        code, out, err = run_cli(path, "--nodes", "2", "--node-memory", "8000", "--node-cores", "8")
        assert (code, out, err) == (0, f"{path}: ok: {summary}\n", "")

    @pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
    def test_examples(self, path):
        code, out, _ = run_cli(path, "--nodes", "2", "--node-memory", "4096", "--node-cores", "2")
        assert code == 0 and out.startswith(f"{path}: ok: ")

    def test_task_bigger_than_any_node(self):
        path = DATA / "bad" / "too_big.yaml"
        code, out, err = run_cli(path, "--nodes", "3", "--node-memory", "96000", "--node-cores", "68")
        assert_one_line_error(code, out, err)
        assert err == (f"pilot: error: {path}: task huge requests 200000 MB and 4 cpus, more than "
                       "the largest node (node0: 96000 MB, 68 cores)\n")

    def test_node_flags_go_together(self):
        code, out, err = run_cli(DATA / "diamond.yaml", "--nodes", "2")
        assert_one_line_error(code, out, err)
        assert "give all three" in err

    @pytest.mark.parametrize("name", ["duplicate_id", "unknown_after", "cycle", "wrong_type",
                                      "negative", "unknown_key", "malformed", "section_type"])
    def test_bad_files(self, name):
        path = DATA / "bad" / f"{name}.yaml"
        code, out, err = run_cli(path)
        assert_one_line_error(code, out, err)
        assert err.startswith(f"pilot: error: {path}")

    def test_real_entry_point(self, tmp_path):
        garbage = tmp_path / "garbage.yaml"
        garbage.write_bytes(b"tasks:\n  - {id: \x00\xff\xfe\n\t: ]")
        for path, expected in ((DATA / "diamond.yaml", 0), (DATA / "bad" / "cycle.yaml", 2),
                               (garbage, 2), (tmp_path / "missing.yaml", 2)):
            done = subprocess.run([str(PILOT), "validate", str(path)], capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == expected, done.stderr
            if expected:
                assert_one_line_error(done.returncode, done.stdout, done.stderr)
            else:
                assert done.stdout.startswith(f"{path}: ok: ") and done.stderr == ""


# ---- fuzz -----------------------------------------------------------------------------------

SETTINGS = ["requestMemory", "requestCpus", "numberOfRetries", "retryUnlessExit",
            "memoryMultiplier", "requestMemoryMax", "timeout", "env", "command"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10**400, 10**400),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
# values no setting accepts: containers of junk, negative numbers, words for numbers
bad_values = st.one_of(st.dictionaries(st.text(max_size=5), st.lists(scalars, min_size=1),
                                       min_size=1, max_size=3),
                       st.lists(st.lists(scalars), min_size=1, max_size=3),
                       st.integers(max_value=-1), st.integers(min_value=2**64))


@st.composite
def valid_tasks(draw):
    n = draw(st.integers(1, 8))
    tasks = []
    for i in range(n):
        task = {"id": f"t{i}", "command": draw(st.sampled_from(["true", ["echo", "x"]]))}
        if i:
            task["after"] = [f"t{j}" for j in draw(st.lists(st.integers(0, i - 1), max_size=3))]
        tasks.append(task)
    return tasks


@st.composite
def broken_workflows(draw):
    """A valid workflow with one thing made wrong, so the loader must refuse it."""
    tasks = draw(valid_tasks())
    i = draw(st.integers(0, len(tasks) - 1))
    fault = draw(st.sampled_from(["type", "no_id", "unknown_key", "bad_after", "cycle",
                                  "duplicate", "not_mapping", "top"]))
    if fault == "type":
        tasks[i][draw(st.sampled_from(SETTINGS))] = draw(bad_values)
    elif fault == "no_id":
        del tasks[i]["id"]
    elif fault == "unknown_key":
        key = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in SETTINGS + ["id", "after", "label"]))
        tasks[i][key] = draw(anything)
    elif fault == "bad_after":
        tasks[i]["after"] = draw(st.one_of(st.just(["nosuch"]), bad_values, st.floats()))
    elif fault == "cycle":
        for k, task in enumerate(tasks):
            task["after"] = [f"t{(k - 1) % len(tasks)}"]
    elif fault == "duplicate":
        tasks.append(dict(tasks[i]))
    elif fault == "not_mapping":
        tasks[i] = draw(scalars)
    else:
        return draw(st.one_of(scalars, st.fixed_dictionaries({"tasks": anything.filter(
            lambda v: not isinstance(v, list) or not v)})))
    return draw(st.sampled_from([tasks, {"tasks": tasks}]))


def dump(data, as_json: bool) -> bytes:
    if as_json:
        return json.dumps(data).encode()
    return yaml.safe_dump(data, allow_unicode=True).encode()


class TestFuzz:
    @FUZZ
    @given(broken_workflows(), st.booleans())
    def test_broken_structures(self, tmp_path_factory, data, as_json):
        path = tmp_path_factory.mktemp("fuzz") / ("w.json" if as_json else "w.yaml")
        path.write_bytes(dump(data, as_json))
        assert_one_line_error(*run_cli(path))

    @FUZZ
    @given(st.text(max_size=200))
    def test_random_text(self, tmp_path_factory, text):
        path = tmp_path_factory.mktemp("fuzz") / "w.yaml"
        path.write_text(text)
        assert_one_line_error(*run_cli(path))

    @FUZZ
    @given(st.binary(max_size=200))
    def test_random_bytes(self, tmp_path_factory, blob):
        path = tmp_path_factory.mktemp("fuzz") / "w.yaml"
        path.write_bytes(blob)
        assert_one_line_error(*run_cli(path))

    @FUZZ
    @given(valid_tasks(), st.booleans(), st.data())
    def test_garbage_spliced_into_good_files(self, tmp_path_factory, tasks, as_json, data):
        text = dump(tasks, as_json)
        at = data.draw(st.integers(0, len(text)))
        blob = text[:at] + data.draw(st.binary(min_size=1, max_size=8)) + text[at:]
        path = tmp_path_factory.mktemp("fuzz") / "w.yaml"
        path.write_bytes(blob)
        code, out, err = run_cli(path)
        if code == 0:  # the splice can land somewhere harmless, such as inside a command
            assert len(out.splitlines()) == 1 and err == ""
        else:
            assert_one_line_error(code, out, err)
