"""``pilot report``: real checkpoints (real engine + checkpoint, simulated time) to a page of PNGs."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from pilot.cli import main
from pilot.events import Failure, State
from pilot.report import build_report
from pilot.report_data import (Capacity, binned_use, capacity, label_percentiles, peak_in_use, right_sizing,
                               sizing_yaml, suggested_request, summary)
from pilot.report_read import Attempts, read_run
from tests.report_runs import CAL_PEAKS, ISR_PEAKS, T0, known_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def check_page(out) -> list[str]:
    """Every <img> of index.html names an existing, valid PNG of sane size; return the names."""
    from PIL import Image

    page = (out / "index.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert sorted(images) == sorted(p.name for p in out.glob("*.png"))
    for name in images:
        assert "/" not in name                       # relative, beside the page: readable offline
        width, height = png_size(out / name)
        assert 400 <= width <= 3000 and 100 <= height <= 3000, (name, width, height)
        assert (out / name).stat().st_size > 2000
        with Image.open(out / name) as image:
            image.verify()
    return images


# ---- the known run ------------------------------------------------------------------


def test_attempts_and_right_sizing_of_a_known_run(tmp_path):
    path, graph, _ = known_run(tmp_path)
    data = read_run(path)
    att = data.attempts
    cal3 = graph.ids.index("cal3")
    mine = np.flatnonzero(att.task == cal3)
    assert att.size == 11 and len(mine) == 2           # one attempt per finish, the OOM retry included
    assert att.request_mb[mine].tolist() == [2000, 4000]   # the retry ran with the scaled request
    assert att.failure[mine].tolist() == [Failure.OOM, Failure.NONE]
    assert (att.start[mine] - T0).tolist() == [10.0, 30.0] and (att.end[mine] - T0).tolist() == [30.0, 50.0]

    rows = {r.label: r for r in right_sizing(data)}
    isr, cal = rows["isr"], rows["calibrate"]
    assert (isr.request_min, isr.measured, isr.p50, isr.p95, isr.max) == (1000, 4, 400, 600, 600)
    assert isr.suggested == 768                         # ceil(600 * 1.2 / 128) * 128
    waste = sum(1000 - p for p in ISR_PEAKS) * 10.0     # MB x s
    assert isr.wasted_gbh == pytest.approx(waste / 1024 / 3600)
    assert isr.wasted_fraction == pytest.approx(waste / (4 * 1000 * 10))
    assert (cal.p50, cal.p95, cal.max, cal.ooms, cal.suggested) == (1200, 2500, 2500, 1, 3072)
    cal_waste = (sum(2000 - p for p in CAL_PEAKS[:3]) + (4000 - CAL_PEAKS[3])) * 20.0
    assert cal.wasted_fraction == pytest.approx(cal_waste / ((3 * 2000 + 4000) * 20))
    assert rows["extra"].suggested is None and rows["extra"].measured == 0
    assert "  isr:\n    requestMemory: 768\n" in sizing_yaml(list(rows.values()))


def test_summary_of_a_known_run(tmp_path):
    path, _, _ = known_run(tmp_path)
    data = read_run(path)
    s = summary(data, Capacity(2, 4096, 2, estimated=False))
    assert s["makespan_s"] == 80.0 and not s["in_progress"]
    assert (s["done"], s["failed"], s["attempts"]) == (9, 1, 11)
    # critical path isr 10 + calibrate 20 + coadd 30 beats memory-s / 8192 MB and core-s / 4 cores
    assert s["lower_bound_s"] == pytest.approx(60.0) and s["ratio"] == pytest.approx(80 / 60)
    requested_mb_s = 4 * 1000 * 10 + 3 * 2000 * 20 + 2000 * 20 + 4000 * 20 + 3000 * 30 + 500 * 5
    assert s["memory_utilisation"] == pytest.approx(requested_mb_s / (2 * 4096 * 80))
    assert s["core_utilisation"] == pytest.approx((4 * 10 + 5 * 20 + 30 + 5) / (2 * 2 * 80))
    assert s["tasks_per_s"] == pytest.approx(9 / 80) and s["node_hours"] == pytest.approx(2 * 80 / 3600)
    estimated = capacity(data)                         # not in the checkpoint: the most used at once
    assert (estimated.nodes, estimated.memory_mb, estimated.cores, estimated.estimated) == (2, 4000, 2, True)


def test_report_command_writes_a_page_of_valid_pngs(tmp_path, capsys):
    path, _, _ = known_run(tmp_path)
    out = tmp_path / "report"
    assert main(["report", str(path), "--out", str(out), "--nodes", "2", "--node-memory", "4096",
                 "--node-cores", "2", "--lines", "3"]) == 0
    assert "6 figures; run finished, makespan 80.0 s, 9/10 tasks done" in capsys.readouterr().out
    images = check_page(out)
    assert set(images) == {"gantt.png", "running.png", "node_use.png", "runtimes.png", "rss.png", "failures.png"}
    page = (out / "index.html").read_text()
    assert "pipetask:\n  isr:\n    requestMemory: 768\n  calibrate:\n    requestMemory: 3072" in page
    assert "extra0</b> [extra] attempts 1: EXIT, exit code 3" in page
    assert "line 14 of extra0 attempt 1" in page and "line 11 of extra0" not in page   # --lines 3
    assert "1.33" in page and "in progress" not in page


def test_report_of_a_live_run_shows_running_attempts(tmp_path):
    path, _, ck = known_run(tmp_path, stop_after=3)     # checkpoint still open and locked
    try:
        result = build_report(path, tmp_path / "live")
        data = read_run(path)
    finally:
        ck.close()
    assert result["in_progress"] and result["running"] > 0 and result["done"] == 3
    running = data.attempts.take(data.attempts.running)
    assert (data.table.state[running.task] == State.RUNNING).all()
    assert (running.end == data.as_of).all() and (running.start <= data.as_of).all()
    assert "Run in progress" in (tmp_path / "live" / "index.html").read_text()
    check_page(tmp_path / "live")


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.h5"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    assert main(["report", str(tmp_path / "bad.h5"), "--out", str(tmp_path / "o")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["report", "x.h5", "--out", "o", "--node-memory", "0"]) == 2
    assert not (tmp_path / "o").exists()


# ---- aggregation for big runs -------------------------------------------------------


def test_many_nodes_draw_heatmaps_and_a_gantt_sample(tmp_path, monkeypatch):
    from pilot import report_figures
    from pilot.engine import Engine
    from pilot.events import Node
    from pilot.checkpoint import open_checkpoint
    from pilot.graph import make_graph
    from tests.report_runs import drive

    n = 300
    graph = make_graph([f"t{i}" for i in range(n)], ["a", "b", "c"] * (n // 3),
                       [[i - 60] if i >= 60 else [] for i in range(n)], memory_mb=1000, command="true")
    ck = open_checkpoint(tmp_path / "big.h5", graph)
    engine = Engine(graph, [Node(f"n{i}", 4000, 4) for i in range(12)])
    ck.attach(engine)
    engine.listeners.append(ck)
    drive(engine, lambda t, a, m: (Failure.NONE, 0, 100.0 + t), lambda t: 5.0 + t % 7)
    ck.close()
    monkeypatch.setattr(report_figures, "GANTT_CAP", 40)
    result = build_report(tmp_path / "big.h5", tmp_path / "out", node_memory=4000, node_cores=4)
    assert result["done"] == n and "failures.png" not in result["figures"]
    page = (tmp_path / "out" / "index.html").read_text()
    assert re.search(r"sample: \d+ of 300 attempts", page) and "No task failed" in page
    check_page(tmp_path / "out")


def test_binned_use_and_peaks_match_brute_force():
    rng = np.random.default_rng(1)
    m, keys = 400, 3
    start = rng.uniform(0, 100, m)
    end = start + rng.uniform(0, 30, m)
    key, weight = rng.integers(0, keys, m), rng.uniform(1, 5, m)
    edges = np.linspace(0, 140, 15)
    fine = np.linspace(0, 140, 140 * 200 + 1)[:-1] + 140 / (140 * 200) / 2   # midpoints
    for k in range(keys):
        sel = key == k
        level = ((start[sel, None] <= fine) & (fine < end[sel, None])) * weight[sel, None]
        expect = level.sum(axis=0).reshape(14, -1).mean(axis=1)
        got = binned_use(key, start, end, weight, keys, edges)[k]
        assert np.allclose(got, expect, atol=0.05 * weight.max())
    att = Attempts(np.zeros(m, np.int64), key, start, end, weight, np.zeros(m), np.zeros(m, np.int8),
                   np.zeros(m, bool))
    points = np.sort(np.concatenate([start, end]))
    for k in range(keys):
        sel = key == k
        brute = max((((start[sel] <= p) & (p < end[sel])) * weight[sel]).sum() for p in points)
        assert peak_in_use(att, weight, keys)[k] == pytest.approx(brute)


def test_percentiles_are_nearest_rank_and_suggestion_rounds_up():
    counts, pct = label_percentiles(np.array([5.0, 1, 2, 3, 4, 10]), np.array([0, 0, 0, 0, 0, 2]), 3)
    assert counts.tolist() == [5, 0, 1]
    assert pct[0].tolist() == [3, 5, 5] and np.isnan(pct[1]).all() and pct[2].tolist() == [10, 10, 10]
    assert suggested_request(1000) == 1280 and suggested_request(1280 / 1.2) == 1280
    assert suggested_request(0) is None


def test_report_of_a_run_that_has_not_started(tmp_path):
    from pilot.checkpoint import open_checkpoint
    from tests.report_runs import known_graph

    ck = open_checkpoint(tmp_path / "new.h5", known_graph())
    try:
        result = build_report(tmp_path / "new.h5", tmp_path / "out")
    finally:
        ck.close()
    assert result["in_progress"] and result["attempts"] == 0 and result["makespan_s"] == 0
    assert "failures.png" not in result["figures"]
    assert "No peak RSS was recorded" in (tmp_path / "out" / "index.html").read_text()
    check_page(tmp_path / "out")
