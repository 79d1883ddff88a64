"""``pilot status``: the table, JSON and failed listing from a real checkpoint, live and after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from pilot.checkpoint import load_checkpoint, open_checkpoint
from pilot.cli import main
from pilot.engine import Engine
from pilot.events import Failure, Node, Schedule, State, TaskFinished, TaskStarted
from pilot.graph import make_graph
from pilot.status import COLUMNS, TOTAL_KEY, format_table, label_counts
from tests.helpers import ROOT, wait_for
from tests.test_kill_loop import start_child

PILOT = [sys.executable, "-m", "pilot.cli"]


def run_to_end(tmp_path):
    """isr x4 -> calibrate x4 (one fails with exit 3, one by signal 9) -> coadd x1."""
    ids = [f"isr{i}" for i in range(4)] + [f"cal{i}" for i in range(4)] + ["coadd"]
    labels = ["isr"] * 4 + ["calibrate"] * 4 + ["coadd"]
    parents = [[]] * 4 + [[i] for i in range(4)] + [list(range(4, 8))]
    graph = make_graph(ids, labels, parents, memory_mb=100, retries=0)
    path = tmp_path / "run.h5"
    ck = open_checkpoint(path, graph)
    engine = Engine(graph, [Node("n", 1000, 8)])
    ck.attach(engine)
    engine.listeners.append(ck)
    pending = list(engine.handle(Schedule(0.0)))
    while pending:
        a = pending.pop(0)
        log = tmp_path / f"{graph.ids[a.task]}.log"
        log.write_text("".join(f"line {k} of {graph.ids[a.task]}\n" for k in range(20)))
        engine.handle(TaskStarted(a.task, a.attempt, a.node, 1.0))
        failure, code, sig = Failure.NONE, 0, None
        if graph.ids[a.task] == "cal1":
            failure, code = Failure.EXIT, 3
        elif graph.ids[a.task] == "cal2":
            failure, code, sig = Failure.OOM, None, 9
        pending += engine.handle(TaskFinished(a.task, a.attempt, a.node, failure, code, sig, 1.0, 2.0,
                                              log=str(log)))
    ck.close()
    return path, graph


def test_table_json_and_failed(tmp_path, capsys):
    path, _ = run_to_end(tmp_path)
    assert main(["status", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task_type", *COLUMNS]
    rows = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in lines[1:]}
    assert rows["isr"] == [0, 0, 0, 4, 0, 0, 4]
    assert rows["calibrate"] == [0, 0, 0, 2, 2, 0, 4]
    assert rows["coadd"] == [0, 0, 0, 0, 0, 1, 1]
    assert rows["total"] == [0, 0, 0, 6, 2, 1, 9]

    assert main(["status", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["calibrate"] == dict(zip(COLUMNS, [0, 0, 0, 2, 2, 0, 4]))
    assert data[TOTAL_KEY]["total"] == 9

    assert main(["status", str(path), "--failed", "--lines", "3"]) == 0
    out = capsys.readouterr().out
    assert "cal1 [calibrate] attempts 1: EXIT, exit code 3" in out
    assert "cal2 [calibrate] attempts 1: OOM, signal 9 (SIGKILL)" in out
    assert "| line 19 of cal1" in out and "| line 16 of cal1" not in out


def test_a_run_directory_shows_its_chain_then_its_checkpoint(tmp_path, capsys, monkeypatch):
    """A requeued first job (two starts), its successor still running; Slurm is not reachable
    here (no squeue on PATH), so states are '-'; the checkpoint is the one job.sh names."""
    path, _ = run_to_end(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.sh").write_text(f"#!/bin/bash\nRUN_DIR={run_dir}\nCHECKPOINT={path}\nMAX_JOBS=3  # jobs\n")
    records = [{"event": "submit", "job": "7", "index": 1}, {"event": "start", "job": "7", "index": 1, "restart": 0},
               {"event": "end", "job": "7", "index": 1, "exit": 3, "signals": "TERM", "next": ""},
               {"event": "start", "job": "7", "index": 1, "restart": 1},
               {"event": "end", "job": "7", "index": 1, "exit": 3, "signals": "USR1", "next": "8"},
               {"event": "start", "job": "8", "index": 2, "restart": 0}]
    (run_dir / "chain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    assert main(["status", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[:3]] == [
        ["job", "index", "starts", "state", "exit", "signals", "next"],
        ["7", "1", "2", "-", "3", "USR1", "8"],
        ["8", "2", "1", "-", "-", "-", "-"]]
    assert lines[3] == "" and lines[4].split() == ["task_type", *COLUMNS] and lines[-1].split()[-1] == "9"


def test_failed_json(tmp_path, capsys):
    path, _ = run_to_end(tmp_path)
    assert main(["status", str(path), "--json", "--failed", "--lines", "1"]) == 0
    failed = json.loads(capsys.readouterr().out)["__failed__"]
    assert [(f["id"], f["exit_code"], f["signal"]) for f in failed] == [("cal1", 3, None), ("cal2", None, 9)]
    assert failed[0]["tail"] == ["line 19 of cal1"]


def test_ready_counts_as_pending_and_labels_stay_in_order():
    import numpy as np

    counts = label_counts(["b", "a"], np.array([0, 0, 1, 1, 1]),
                          np.array([State.READY, State.PENDING, State.RUNNING, State.LAUNCHED, State.DONE]))
    assert counts["b"]["pending"] == 2 and counts["a"]["running"] == 1 and counts["a"]["launched"] == 1
    assert list(counts) == ["b", "a", TOTAL_KEY]
    assert format_table(counts).splitlines()[-1].split() == ["total", "2", "1", "1", "1", "0", "0", "5"]


def test_corrupt_checkpoint_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    done = subprocess.run(PILOT + ["status", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert bad.read_bytes() == b"\x89HDF\r\n\x1a\n" + b"\0" * 100


def test_status_reads_a_live_run(tmp_path):
    ckpt, records = tmp_path / "live.h5", tmp_path / "rec.txt"
    child = start_child(ckpt, records, 200, pace=0.01, compact_bytes=4096)
    try:
        wait_for(lambda: os.path.exists(ckpt), timeout=60, what="the checkpoint")
        seen = []
        while child.poll() is None and len(seen) < 8:
            done = subprocess.run(PILOT + ["status", str(ckpt), "--json"], capture_output=True,
                                  text=True, cwd=ROOT)
            assert done.returncode == 0, done.stderr
            total = json.loads(done.stdout)[TOTAL_KEY]
            assert total["total"] == 200
            seen.append(total["exec_done"])
            assert load_checkpoint(ckpt).table.size == 200
        assert seen == sorted(seen) and len(seen) >= 2
        assert any(0 < s < 200 for s in seen), seen
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
