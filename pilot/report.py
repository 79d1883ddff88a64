"""``pilot report``: a run's page (DIR/index.html with PNG figures) from its checkpoint.

Reads through :mod:`pilot.report_read` (no lock: works while the run writes), computes with
:mod:`pilot.report_data`, draws with :mod:`pilot.report_figures` and writes the page with
:mod:`pilot.report_html`. See docs/report.md.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pilot.errors import UserError
from pilot.events import Failure, State

FAILED_LISTED = 50     # failed tasks listed with their log tails (the count covers all)
TAIL_LINES = 10


def build_report(checkpoint, out_dir, *, nodes=None, node_memory=None, node_cores=None,
                 tail_lines: int = TAIL_LINES) -> dict:
    """Write ``out_dir/index.html`` and its PNGs; return the summary figures (plus
    ``figures``: the PNG names, and ``index``: the page's path)."""
    from pilot.report_data import HEADROOM, ROUND_MB, capacity, failure_matrix, right_sizing, sizing_yaml, summary
    from pilot.report_read import read_run
    from pilot.status import label_counts
    from pilot import report_html as page

    data = read_run(checkpoint)
    _make_dir(out_dir)
    cap = capacity(data, nodes, node_memory, node_cores)
    figures_summary = summary(data, cap)
    drawn = _figures(data, cap, figures_summary, out_dir, failure_matrix(data))
    rows = right_sizing(data)
    sections = [page.summary_section(figures_summary, cap),
                page.counts_section(label_counts(data.labels, data.label, data.table.state))]
    sections += [page.figure_section(f) for f in drawn]
    sections.append(page.sizing_section(rows, sizing_yaml(rows), HEADROOM, ROUND_MB))
    sections.append(page.failures_section(*failed_entries(data, tail_lines)))
    index = os.path.join(out_dir, "index.html")
    _write(index, page.page(f"pilot run report: {os.path.basename(str(checkpoint))}",
                            _banner(figures_summary), sections))
    return {**figures_summary, "figures": [f.file for f in drawn], "index": index}


def _figures(data, cap, s: dict, out_dir: str, matrix) -> list:
    from pilot import report_figures as figs

    t0, t1 = s["start"], s["end"]
    drawn = [figs.draw_gantt(data, t0, out_dir), figs.draw_running(data, t0, t1, out_dir),
             figs.draw_node_use(data, cap, t0, t1, out_dir), figs.draw_runtimes(data, out_dir),
             figs.draw_rss(data, out_dir), figs.draw_failures(data, matrix, out_dir)]
    return [f for f in drawn if f is not None]


def _banner(s: dict) -> str:
    as_of = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(s["as_of"]))
    if s["in_progress"]:
        return (f"Run in progress (or interrupted): figures as of {as_of}; running attempts are drawn "
                f"up to that time.")
    return ""


def failed_entries(data, lines: int) -> tuple[list, int]:
    """(entries for the first FAILED_LISTED failed tasks, number of failed tasks)."""
    from pilot.status import describe_end, tail

    table = data.table
    failed = np.flatnonzero(table.state == State.FAILED)
    shown = failed[:FAILED_LISTED]
    ids = data.task_ids(shown)
    entries = []
    for t, task_id in zip(shown.tolist(), ids):
        f = int(table.failure[t])
        entries.append({"id": task_id, "label": data.labels[int(data.label[t])],
                        "attempts": int(table.attempts[t]),
                        "failure": Failure(f).name if f in Failure._value2member_map_ else str(f),
                        "end": describe_end(f, int(table.exit_code[t]), int(table.signal[t])),
                        "log": str(table.log[t]), "tail": tail(str(table.log[t]), lines)})
    return entries, int(failed.size)


def _make_dir(path) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"{path}: cannot create the report folder: {err.strerror}") from None


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
