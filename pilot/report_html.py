"""The report's page: one self-contained HTML file that shows the PNGs beside it.

Images are referenced by relative names so the folder can be copied and read offline. A
small script marks ``<body>`` with ``data-images-loaded`` / ``data-images-total`` once the
page has loaded (the browser test reads them).
"""

from __future__ import annotations

import html
import time

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.5em; font-size: 0.85em; overflow-x: auto; }
.banner { background: #fff4d6; border: 1px solid #e0c060; padding: 0.5em; }
.caption { font-size: 0.85em; color: #555; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-loaded", String(loaded.length));
});
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def table(header: list, rows: list) -> str:
    """An HTML table; cells are escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def summary_section(s: dict, cap) -> str:
    """The planner's figures."""
    note = " (estimated from use: pass --node-memory/--node-cores)" if cap.estimated else ""
    rows = [
        ("makespan", f"{s['makespan_s']:.1f} s ({_when(s['start'])} to {_when(s['end'])})"),
        ("nodes", f"{cap.nodes} x {cap.memory_mb / 1024:.1f} GB, {cap.cores:g} cores{note}"),
        ("node-hours", f"{s['node_hours']:.2f}"),
        ("memory utilisation (requested)", f"{100 * s['memory_utilisation']:.1f} %"),
        ("memory utilisation (peak RSS)", f"{100 * s['rss_utilisation']:.1f} %"),
        ("core utilisation (requested)", f"{100 * s['core_utilisation']:.1f} %"),
        ("tasks done per second", f"{s['tasks_per_s']:.3f}"),
        ("simulator's lower bound", f"{s['lower_bound_s']:.1f} s"),
        ("makespan / lower bound", f"{s['ratio']:.2f}" if s["lower_bound_s"] > 0 else "n/a"),
        ("tasks", f"{s['tasks']} ({s['done']} done, {s['failed']} failed, {s['dep_fail']} dep_fail, "
                  f"{s['running']} running)"),
        ("attempts", str(s["attempts"])),
        ("restarts", str(s["restarts"])),
    ]
    return "<h2>Summary</h2>" + table(["figure", "value"], rows) + (
        "<p class='caption'>Utilisation: the time integral of what attempts requested (or their "
        "peak RSS) over nodes x capacity x makespan. Lower bound: max(critical path, memory-seconds "
        "/ total memory, core-seconds / total cores) over the done tasks' measured runtimes, as "
        "<code>pilot simulate</code> computes it.</p>")


def counts_section(counts: dict) -> str:
    from pilot.status import COLUMNS, TOTAL_KEY

    rows = [[("total" if name == TOTAL_KEY else name)] + [c[k] for k in COLUMNS]
            for name, c in counts.items()]
    return "<h2>Tasks by state</h2>" + table(["task_type", *COLUMNS], rows)


def figure_section(fig) -> str:
    return (f"<h2>{esc(fig.title)}</h2><img src='{esc(fig.file)}' alt='{esc(fig.title)}'>"
            f"<p class='caption'>{esc(fig.caption)}</p>")


def sizing_section(rows: list, yaml_text: str, headroom: float, round_mb: int) -> str:
    """The right-sizing table and the YAML block to paste."""
    def mb(v):
        return "-" if v != v else f"{v:.0f}"

    body = [[r.label, f"{r.request_min}" if r.request_min == r.request_max else f"{r.request_min}-{r.request_max}",
             r.measured, mb(r.p50), mb(r.p95), mb(r.max), f"{r.wasted_gbh:.3f}",
             f"{100 * r.wasted_fraction:.0f} %", r.ooms, "-" if r.suggested is None else r.suggested]
            for r in rows]
    header = ["label", "requestMemory (MB)", "measured", "p50 RSS", "p95 RSS", "max RSS",
              "wasted (GB-h)", "wasted", "OOM attempts", "suggested (MB)"]
    paste = f"<pre>{esc(yaml_text)}</pre>" if yaml_text else "<p>No peak RSS was recorded: no suggestion.</p>"
    return ("<h2>Right-sizing</h2>" + table(header, body) +
            f"<p class='caption'>Over successful attempts with a measured peak RSS (MB). Wasted: the sum of "
            f"(request - peak RSS) x runtime, and its share of the requested memory-time. Suggested "
            f"requestMemory = max peak RSS x {headroom:g}, rounded up to a multiple of {round_mb} MB. "
            f"Ready to paste into a BPS YAML:</p>" + paste)


def failures_section(entries: list, total: int) -> str:
    """Failed tasks (failed for good) with their last log lines."""
    if not total:
        return "<h2>Failed tasks</h2><p>No task failed.</p>"
    parts = [f"<h2>Failed tasks</h2><p>{total} failed task(s)"
             + (f"; the first {len(entries)} are listed" if len(entries) < total else "") + ".</p>"]
    for e in entries:
        parts.append(f"<p><b>{esc(e['id'])}</b> [{esc(e['label'])}] attempts {e['attempts']}: "
                     f"{esc(e['end'])}<br><span class='caption'>log: {esc(e['log'] or '(none)')}</span></p>")
        if e["tail"]:
            parts.append(f"<pre>{esc(chr(10).join(e['tail']))}</pre>")
    return "".join(parts)


def page(title: str, banner: str, sections: list[str]) -> str:
    """The whole document."""
    head = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>")
    top = f"<h1>{esc(title)}</h1>" + (f"<p class='banner'>{esc(banner)}</p>" if banner else "")
    return head + top + "\n".join(sections) + "</body></html>\n"
