"""The simulator's figures, its runtimes table, `pilot simulate`, and the regression
workflows of tests/data run through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pilot.cli import main
from pilot.errors import UserError
from pilot.events import Failure, Node, State
from pilot.graph import make_graph
from pilot.policy import DefaultPolicy, make_policy
from pilot.simulate import critical_path, lower_bound, simulate, task_runtimes
from pilot.workflow import load_workflow_file
from tests.test_policy import RunningCounter

DATA = Path(__file__).resolve().parent / "data"
KEYS = ["makespan_s", "lower_bound_s", "ratio", "node_hours", "memory_utilisation", "core_utilisation"]


def diamond():
    return load_workflow_file(DATA / "diamond.yaml")


def test_critical_path_and_bound_of_a_diamond():
    g = diamond()   # a -> (b heavy 3000 MB 2 cpus, c) -> d
    runtimes = task_runtimes(g, {"a": 1, "heavy": 5, "c": 2, "d": 1})
    assert list(runtimes) == [1, 5, 2, 1]
    assert critical_path(g, runtimes) == 7
    nodes = [Node("n", 1000, 1)]
    mem_s = 1000 * 1 + 3000 * 5 + 1000 * 2 + 1000 * 1
    assert lower_bound(g, nodes, runtimes) == max(7, mem_s / 1000, (1 + 10 + 2 + 1) / 1)


def test_runtimes_table_task_id_wins_over_label_and_errors_are_one_line():
    g = diamond()
    assert list(task_runtimes(g, {"heavy": 4, "default": 3, "b": 9}, default=2)) == [3, 9, 3, 3]
    with pytest.raises(UserError, match="'nope' is neither a task id nor a label"):
        task_runtimes(g, {"nope": 1})
    with pytest.raises(UserError, match="'a'.*seconds >= 0"):
        task_runtimes(g, {"a": -1})
    with pytest.raises(UserError):
        task_runtimes(g, {"a": "fast"})


def test_diamond_runs_b_and_c_together_only_when_they_fit():
    g = diamond()
    wide = simulate(g, [Node("n", 8000, 4)], DefaultPolicy())
    assert wide.makespan_s == 3 and wide.ratio == 1 and wide.exit_code == 0
    narrow = simulate(g, [Node("n", 3000, 2)], DefaultPolicy())
    assert narrow.makespan_s == 4


def test_memory_bound_workflow_runs_one_big_task_at_a_time():
    g = load_workflow_file(DATA / "memory_bound.yaml")
    runtimes = task_runtimes(g, {"big": 2, "small": 1})
    counters = []

    def setup(engine):
        counters.append(RunningCounter(engine))
        engine.listeners.append(counters[0])

    result = simulate(g, [Node("n", 8000, 8)], DefaultPolicy(), runtimes, setup=setup,
                      check=lambda e, ev: e.validate())
    assert counters[0].peak[g.labels.index("big")] == 1
    assert result.makespan_s == 7                       # three bigs in a row, then gather
    mem_s = 3 * 6000 * 2 + 5 * 500 * 1
    assert result.lower_bound_s == pytest.approx(mem_s / 8000)
    assert result.memory_utilisation == pytest.approx(mem_s / (8000 * 7))


def test_retries_workflow_follows_the_retry_rules():
    g = load_workflow_file(DATA / "retries.yaml")
    ids = {tid: i for i, tid in enumerate(g.ids)}
    peak = np.zeros(g.size, dtype=int)
    peak[ids["grow"]], peak[ids["capped"]] = 3000, 9000

    def outcome(task, attempt, memory):
        if task == ids["hopeless"] or (task == ids["flaky1"] and attempt < 3):
            return Failure.EXIT, 1
        return None

    result = simulate(g, [Node("n", 16000, 4)], DefaultPolicy(), peak_mb=peak, outcome=outcome,
                      check=lambda e, ev: e.validate())
    e = result.engine
    state = {tid: State(e.state[i]).name for tid, i in ids.items()}
    assert state == {"flaky1": "DONE", "hopeless": "FAILED", "grow": "DONE", "capped": "FAILED",
                     "after_flaky": "DONE"}
    attempts = {tid: int(e.attempts[i]) for tid, i in ids.items()}
    assert attempts == {"flaky1": 3, "hopeless": 1, "grow": 3, "capped": 2, "after_flaky": 1}
    assert e.memory_request[ids["grow"]] == 4000 and e.memory_request[ids["capped"]] == 2000
    assert result.exit_code == 1


@pytest.mark.parametrize("policy", ["default", "fifo", "slots"])
def test_fan_in_workflow_under_every_policy(policy):
    g = load_workflow_file(DATA / "fan_in.yaml")
    result = simulate(g, [Node("a", 1000, 4), Node("b", 2000, 2)], make_policy(policy),
                      check=lambda e, ev: e.validate())
    assert result.exit_code == 0 and result.makespan_s >= result.lower_bound_s


def test_a_uniform_workload_packs_perfectly():
    g = make_graph([f"t{i}" for i in range(8)], ["x"] * 8, [[]] * 8, memory_mb=1000)
    result = simulate(g, [Node("n", 2000, 8)], DefaultPolicy())
    assert result.makespan_s == 4 and result.ratio == 1
    assert result.memory_utilisation == 1 and result.core_utilisation == pytest.approx(2 / 8)
    assert result.node_hours == pytest.approx(4 / 3600)


def test_cli_json_has_exactly_the_documented_keys(tmp_path, capsys):
    runtimes = tmp_path / "RUNTIMES.yaml"
    runtimes.write_text("heavy: 5\na: 1\n")
    code = main(["simulate", str(DATA / "diamond.yaml"), "--nodes", "1", "--node-memory", "4000",
                 "--node-cores", "4", "--runtimes", str(runtimes), "--json"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out)
    assert list(figures) == KEYS
    assert figures["makespan_s"] == 7 and figures["lower_bound_s"] == pytest.approx(7)


def test_cli_text_report_and_policies(capsys):
    for policy in ("default", "fifo", "slots"):
        assert main(["simulate", str(DATA / "fan_in.yaml"), "--nodes", "2", "--node-memory", "2000",
                     "--node-cores", "2", "--policy", policy]) == 0
        out = capsys.readouterr().out
        assert "makespan" in out and "lower bound" in out and "exit code       0" in out


@pytest.mark.parametrize("extra, message", [
    (["--node-memory", "100"], "more than the largest node"),
    (["--runtimes", "MISSING.yaml"], "MISSING.yaml: cannot read"),
    (["--runtimes", "BAD"], "neither a task id nor a label"),
])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys, extra, message):
    bad = tmp_path / "BAD"
    bad.write_text("nope: 3\n")
    args = ["simulate", str(DATA / "diamond.yaml"), "--nodes", "1", "--node-memory", "8000",
            "--node-cores", "4"] + extra
    args = [str(bad) if a == "BAD" else (str(tmp_path / a) if a == "MISSING.yaml" else a) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
