"""The report page in a real headless Chromium: every figure loads from file://.

Chromium comes from Debian (scripts/setup-browser.sh installs it); without it this test
skips, saying so."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from pilot.report import build_report
from tests.report_runs import known_run
from tests.test_report import png_size

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run scripts/setup-browser.sh "
                                                          "as root (apt-get install chromium)")


def chromium(tmp_path, *args) -> str:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def loaded_images(tmp_path, page) -> tuple[int, int]:
    """(loaded, total) images as the page's own script counted them after the load event."""
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    body = re.search(r"<body[^>]*>", dom).group(0)
    total = re.search(r'data-images-total="(\d+)"', body)
    loaded = re.search(r'data-images-loaded="(\d+)"', body)
    assert total and loaded, body
    return int(loaded.group(1)), int(total.group(1))


def test_every_figure_loads_in_chromium(tmp_path):
    path, _, _ = known_run(tmp_path)
    out = tmp_path / "report"
    result = build_report(path, out, nodes=2, node_memory=4096, node_cores=2)
    assert loaded_images(tmp_path, out / "index.html") == (len(result["figures"]), 6)

    # the same check sees a missing figure: copy the page without one PNG
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "rss.png").unlink()
    assert loaded_images(tmp_path, broken / "index.html") == (5, 6)

    shot = tmp_path / "page.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", (out / "index.html").as_uri())
    assert png_size(shot) == (1200, 2400) and shot.stat().st_size > 50_000
