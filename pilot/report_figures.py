"""The report's figures: PNG files drawn with matplotlib's Agg backend (no display needed).

Each ``draw_*`` function takes a :class:`pilot.report_read.RunData` (and what it needs from
:mod:`pilot.report_data`), writes one PNG into a folder and returns a :class:`Figure` entry
for the page. Large runs are drawn from aggregates (time bins, histograms, a bounded Gantt
sample), so drawing costs the same for 1k and 1M tasks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure as MplFigure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from pilot.events import Failure  # noqa: E402
from pilot.report_data import (binned_use, gantt_sample, label_histograms, lanes,  # noqa: E402
                               suggested_request, time_edges)

GANTT_CAP = 3000        # attempts drawn as bars at most
TIME_BINS = 400
HIST_BINS = 40
SMALL_NODES = 8         # up to this many nodes: one panel per node; more: heatmaps
DPI = 100


@dataclass
class Figure:
    """One figure on the page."""

    file: str        # PNG name, relative to the page
    title: str
    caption: str


def label_colours(k: int) -> np.ndarray:
    """One RGBA colour per label (tab20, then repeated)."""
    cmap = matplotlib.colormaps["tab20"]
    return cmap(np.arange(k) % 20)


def _time_unit(span: float) -> tuple[float, str]:
    if span > 3 * 3600:
        return 3600.0, "hours"
    if span > 3 * 60:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _save(fig: MplFigure, folder: str, name: str) -> str:
    fig.savefig(os.path.join(folder, name), dpi=DPI)
    return name


def _legend(ax, labels, colours, used=None) -> None:
    from matplotlib.patches import Patch

    show = range(len(labels)) if used is None else used
    handles = [Patch(color=colours[i], label=labels[i]) for i in show]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


# ---- time lines ---------------------------------------------------------------------


def draw_gantt(data, t0: float, folder: str) -> Figure:
    """Attempts as bars, one row per node and lane, coloured by label; failures hatched."""
    att = data.attempts
    pick, what = gantt_sample(att, GANTT_CAP)
    sub = att.take(pick)
    lane = lanes(sub.node, sub.start, sub.end)
    nodes = np.unique(sub.node)
    height = np.zeros(int(nodes.max()) + 1 if nodes.size else 1, np.int64)
    np.maximum.at(height, sub.node, lane + 1)
    base = np.concatenate([[0], np.cumsum(height)])
    scale, unit = _time_unit(float(sub.end.max() - t0) if sub.size else 0.0)
    fig = MplFigure(figsize=(11, min(2 + 0.12 * base[-1], 12)))
    ax = fig.add_subplot()
    colours = label_colours(len(data.labels))
    lab = data.label[sub.task]
    left, right = (sub.start - t0) / scale, (sub.end - t0) / scale
    thin = 0.6 if base[-1] < 100 else 0.25    # many rows: thinner outlines keep the colours visible
    ax.add_collection(_bars(base[sub.node] + lane, left, right, colours[lab], sub.failure > 0, thin))
    ax.set_xlim(0, max(float(right.max()) if right.size else 1.0, 1e-9) * 1.02)
    ax.hlines(base[nodes[1:]] - 0.5, 0, 1, transform=ax.get_yaxis_transform(), color="0.6", linewidth=0.6)
    ax.set_yticks([base[n] + height[n] / 2 - 0.5 for n in nodes], [f"node {n}" for n in nodes], fontsize=7)
    ax.set_ylim(-0.5, max(base[-1] - 0.5, 0.5))
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} since the first start")
    _legend(ax, data.labels, colours, np.unique(lab).tolist())
    fig.tight_layout()
    return Figure(_save(fig, folder, "gantt.png"), "Tasks per node",
                  f"Each bar is one attempt, one row per concurrent slot of a node, coloured by label; "
                  f"failed attempts have a red outline, others a white one. Drawn: {what}.")


def _bars(y, left, right, colours, failed, width: float):
    """All bars as one PolyCollection (one artist: fast to draw at thousands of bars)."""
    from matplotlib.collections import PolyCollection

    lo, hi = y - 0.4, y + 0.4
    verts = np.stack([np.stack([left, lo], 1), np.stack([right, lo], 1),
                      np.stack([right, hi], 1), np.stack([left, hi], 1)], axis=1)
    edges = np.where(failed[:, None], [[0.85, 0, 0, 1]], [[1, 1, 1, 1]])
    return PolyCollection(verts, facecolors=colours, edgecolors=edges, linewidths=width)


def draw_running(data, t0: float, t1: float, folder: str) -> Figure:
    """Tasks running at once, by label, stacked (time-averaged per bin): the whole run."""
    att, k = data.attempts, len(data.labels)
    edges = time_edges(t0, t1, TIME_BINS)
    use = binned_use(data.label[att.task], att.start, att.end, np.ones(att.size), k, edges)
    scale, unit = _time_unit(t1 - t0)
    fig = MplFigure(figsize=(11, 3.8))
    ax = fig.add_subplot()
    colours = label_colours(k)
    used = [i for i in range(k) if use[i].any()]
    if used:
        ax.stackplot((edges[:-1] - t0) / scale, use[used], colors=colours[used], step="post")
    ax.set_xlabel(f"{unit} since the first start")
    ax.set_ylabel("tasks running")
    _legend(ax, data.labels, colours, used)
    fig.tight_layout()
    return Figure(_save(fig, folder, "running.png"), "Tasks running by label",
                  f"All {att.size} attempts on all nodes, averaged over {TIME_BINS} time bins.")


def draw_node_use(data, cap, t0: float, t1: float, folder: str) -> Figure:
    """Memory and cores in use per node over time against the node's capacity."""
    att = data.attempts
    ok = att.node >= 0
    edges = time_edges(t0, t1, TIME_BINS)
    x = (edges[:-1] - t0)
    cpus = data.cpus[att.task].astype(np.float64)
    grids = [binned_use(att.node[ok], att.start[ok], att.end[ok], w[ok], cap.nodes, edges)
             for w in (att.request_mb / 1024, cpus, att.peak_rss_mb / 1024)]
    scale, unit = _time_unit(t1 - t0)
    if cap.nodes <= SMALL_NODES:
        fig = _node_panels(grids, cap, x / scale, unit)
    else:
        fig = _node_heatmaps(grids, cap, (t1 - t0) / scale, unit)
    note = " (capacity estimated: the most any node had in use)" if cap.estimated else ""
    return Figure(_save(fig, folder, "node_use.png"), "Memory and cores in use per node",
                  f"Requested memory and cores of running attempts per node, averaged over {TIME_BINS} "
                  f"time bins, against each node's {cap.memory_mb / 1024:.1f} GB and {cap.cores:g} cores"
                  f"{note}; the dotted line is the attempts' peak RSS (each held for its whole run).")


def _node_panels(grids, cap, x, unit) -> MplFigure:
    mem, cores, rss = grids
    fig = MplFigure(figsize=(11, 1.2 + 1.5 * cap.nodes))
    axes = fig.subplots(cap.nodes, 2, squeeze=False, sharex=True)
    for n in range(cap.nodes):
        for ax, values, limit, name in ((axes[n, 0], mem[n], cap.memory_mb / 1024, "GB"),
                                        (axes[n, 1], cores[n], cap.cores, "cores")):
            ax.step(x, values, where="post", color="tab:blue", linewidth=1)
            ax.axhline(limit, color="tab:red", linestyle="--", linewidth=1)
            ax.set_ylim(0, limit * 1.15)
            ax.set_ylabel(f"node {n}\n{name}", fontsize=8)
        axes[n, 0].step(x, rss[n], where="post", color="tab:green", linestyle=":", linewidth=1)
    axes[0, 0].set_title("memory requested (GB); red: capacity, green: peak RSS", fontsize=9)
    axes[0, 1].set_title("cores requested; red: capacity", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel(f"{unit} since the first start")
    fig.tight_layout()
    return fig


def _node_heatmaps(grids, cap, span, unit) -> MplFigure:
    mem, cores, _ = grids
    fig = MplFigure(figsize=(11, 7))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, values, limit, name in ((axes[0], mem, cap.memory_mb / 1024, "memory"),
                                    (axes[1], cores, cap.cores, "cores")):
        image = ax.imshow(values / limit, aspect="auto", interpolation="nearest", vmin=0, vmax=1,
                          extent=(0, span, cap.nodes - 0.5, -0.5), cmap="viridis")
        ax.set_ylabel("node")
        ax.set_title(f"{name} requested / capacity", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03)
    axes[1].set_xlabel(f"{unit} since the first start")
    fig.tight_layout()
    return fig


# ---- distributions ------------------------------------------------------------------


def _grid(k: int) -> tuple[MplFigure, np.ndarray]:
    cols = min(4, max(k, 1))
    rows = max(1, -(-k // cols))
    fig = MplFigure(figsize=(11, 0.6 + 2.0 * rows))
    return fig, fig.subplots(rows, cols, squeeze=False).ravel()


def draw_runtimes(data, folder: str) -> Figure:
    """Per-label histograms of successful attempts' runtimes (log-spaced bins)."""
    att, k = data.attempts, len(data.labels)
    ok = (att.failure == Failure.NONE) & ~att.running
    seconds = np.maximum(att.duration[ok], 1e-3)
    lo, hi = (seconds.min(), seconds.max()) if seconds.size else (1e-3, 1.0)
    log = hi > 20 * lo     # a narrow range reads better (and draws faster) on a linear axis
    edges = (np.geomspace(lo, hi, HIST_BINS + 1) if log
             else np.linspace(0, max(hi, 1e-3) * 1.05, HIST_BINS + 1))
    counts = label_histograms(seconds, data.label[att.task[ok]].astype(np.int64), k, edges)
    fig, axes = _grid(k)
    colours = label_colours(k)
    for i, ax in enumerate(axes):
        ax.set_visible(i < k)
        if i < k:
            ax.stairs(counts[i], edges, fill=True, color=colours[i])
            if log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{data.labels[i]} ({counts[i].sum()})", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.supxlabel(f"runtime of successful attempts (s{', log scale' if log else ''})", fontsize=9)
    fig.tight_layout()
    return Figure(_save(fig, folder, "runtimes.png"), "Runtime per label",
                  f"Histograms over {HIST_BINS} {'log-spaced ' if log else ''}bins; the count of attempts is "
                  "in each title.")


def draw_rss(data, folder: str) -> Figure:
    """Per-label histograms of peak RSS, with the request (red) and the suggestion (green)."""
    att, k = data.attempts, len(data.labels)
    ok = (att.failure == Failure.NONE) & ~att.running & (att.peak_rss_mb > 0)
    gb = att.peak_rss_mb[ok] / 1024
    lab = data.label[att.task[ok]].astype(np.int64)
    fig, axes = _grid(k)
    for i, ax in enumerate(axes):
        ax.set_visible(i < k)
        if i < k:
            _rss_panel(ax, gb[lab == i], data.memory_mb[data.label == i], data.labels[i])
    fig.supxlabel("peak RSS of successful attempts (GB)", fontsize=9)
    fig.tight_layout()
    return Figure(_save(fig, folder, "rss.png"), "Peak memory per label",
                  "Histograms of peak RSS; red: requestMemory, green: the suggested requestMemory "
                  "(see the right-sizing table).")


def _rss_panel(ax, gb: np.ndarray, requests: np.ndarray, name: str) -> None:
    request = float(np.max(requests)) / 1024 if requests.size else 0.0
    top = max(float(gb.max()) if gb.size else 0.0, request, 1e-3)
    edges = np.linspace(0, top * 1.05, HIST_BINS + 1)
    counts = label_histograms(gb, np.zeros(gb.size, np.int64), 1, edges)[0]
    ax.stairs(counts, edges, fill=True, color="tab:blue")
    ax.axvline(request, color="tab:red", linewidth=1.2)
    suggestion = suggested_request(float(gb.max()) * 1024) if gb.size else None
    if suggestion is not None:
        ax.axvline(suggestion / 1024, color="tab:green", linewidth=1.2, linestyle="--")
    ax.set_title(f"{name} ({gb.size})", fontsize=8)
    ax.tick_params(labelsize=7)


def draw_failures(data, matrix: np.ndarray, folder: str) -> Figure | None:
    """Failed attempts per label, stacked by failure class; None when nothing failed."""
    classes = [c for c in Failure if c != Failure.NONE and matrix[:, c].any()]
    rows = np.flatnonzero(matrix[:, 1:].sum(axis=1))
    if not classes:
        return None
    fig = MplFigure(figsize=(11, 1.5 + 0.35 * len(rows)))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Set1"]
    left = np.zeros(len(rows))
    for j, c in enumerate(classes):
        ax.barh(np.arange(len(rows)), matrix[rows, c], left=left, color=cmap(j % 9), label=c.name)
        left += matrix[rows, c]
    ax.set_yticks(np.arange(len(rows)), [data.labels[i] for i in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("failed attempts")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return Figure(_save(fig, folder, "failures.png"), "Failures by class",
                  "Attempts that did not succeed, per label and failure class (retried ones included).")
