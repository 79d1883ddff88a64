"""Build a real Butler repository and QuantumGraph for the LSST tests and the benchmark.

Run under ``.venv-lsst``::

    .venv-lsst/bin/python tests/lsst/make_repo.py WORKDIR [--detectors 20]

makes ``WORKDIR/repo`` (``butler create``, an instrument, N detectors, one ``add_dataset0``
NumpyArray per detector in the ``inputs`` run) and ``WORKDIR/g.qg`` plus ``WORKDIR/g.qgraph``
(``pipetask qgraph`` over ``examples/lsst/pipeline.yaml``): 2N+1 quanta over the labels
``a``, ``b`` (one per detector) and ``gather`` (one, the fan-in).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "examples" / "lsst" / "pipeline.yaml"
BIN = Path(sys.executable).parent
INSTRUMENT = "PILOTCAM"
INPUT_RUN = "inputs"
OUTPUT = "pilot/out"
OUTPUT_RUN = "pilot/out/run"
ADDEND = 3  # AddTask's default config


@dataclass(frozen=True)
class TestRepo:
    root: Path
    repo: Path
    graph_qg: Path
    graph_qgraph: Path
    detectors: int

    def expected(self, detector: int) -> dict[str, np.ndarray]:
        """Output values the pipeline must produce for one detector."""
        x = input_array(detector)
        return {
            "add_dataset1": x + ADDEND,
            "add2_dataset1": x + 2 * ADDEND,
            "add_dataset2": x + 2 * ADDEND,
            "add2_dataset2": x + 3 * ADDEND,
        }

    def expected_total(self, detectors=None) -> np.ndarray:
        """Value of ``gather_total`` (sum of every detector's ``add_dataset2``)."""
        dets = range(self.detectors) if detectors is None else detectors
        return sum(input_array(d) + 2 * ADDEND for d in dets)


def input_array(detector: int) -> np.ndarray:
    """The input array stored for one detector."""
    return np.array([detector, detector + 0.5, 10.0 * detector], dtype=np.float64)


def tool_env() -> dict:
    """Environment for middleware command-line tools (no implicit threads, quiet)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def _run(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(argv, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def populate(repo: Path, detectors: int) -> None:
    """Insert dimension records, the input dataset type and one input array per detector."""
    from lsst.daf.butler import Butler, DatasetType

    butler = Butler.from_config(str(repo), writeable=True, run=INPUT_RUN)
    try:
        butler.registry.insertDimensionData("instrument", {"name": INSTRUMENT, "detector_max": 1000})
        butler.registry.insertDimensionData(
            "detector",
            *[{"instrument": INSTRUMENT, "id": d, "full_name": f"det{d:03d}"} for d in range(detectors)],
        )
        dstype = DatasetType("add_dataset0", ("instrument", "detector"), "NumpyArray",
                             universe=butler.dimensions)
        butler.registry.registerDatasetType(dstype)
        for d in range(detectors):
            butler.put(input_array(d), "add_dataset0", instrument=INSTRUMENT, detector=d)
    finally:
        butler.close()


def make_graph(repo: Path, out: Path) -> None:
    """``pipetask qgraph`` over the example pipeline, saved to ``out`` (format by suffix)."""
    _run([str(BIN / "pipetask"), "qgraph", "-b", str(repo), "-i", INPUT_RUN, "-o", OUTPUT,
          "--output-run", OUTPUT_RUN, "-p", str(PIPELINE), "--save-qgraph", str(out)], cwd=repo.parent)


def run_init(repo: Path, graph: Path) -> None:
    """The init job (``pipetask pre-exec-init-qbb``): init-outputs, configs, package versions."""
    _run([str(BIN / "pipetask"), "pre-exec-init-qbb", str(repo), str(graph)], cwd=repo.parent)


def build(workdir: Path, detectors: int = 20) -> TestRepo:
    """Make the repository and both graph files under ``workdir`` (replacing earlier ones)."""
    workdir = Path(workdir)
    repo = workdir / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    workdir.mkdir(parents=True, exist_ok=True)
    _run([str(BIN / "butler"), "create", str(repo)], cwd=workdir)
    populate(repo, detectors)
    made = TestRepo(workdir, repo, workdir / "g.qg", workdir / "g.qgraph", detectors)
    make_graph(repo, made.graph_qg)
    make_graph(repo, made.graph_qgraph)
    return made


def copy_repo(made: TestRepo, dest: Path) -> TestRepo:
    """A fresh copy of a built repository and its graphs (cheaper than building again)."""
    dest = Path(dest)
    shutil.copytree(made.root, dest)
    return TestRepo(dest, dest / "repo", dest / made.graph_qg.name, dest / made.graph_qgraph.name,
                    made.detectors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--detectors", type=int, default=20)
    args = parser.parse_args(argv)
    made = build(args.workdir, args.detectors)
    print(f"repo {made.repo}\ngraphs {made.graph_qg} {made.graph_qgraph}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
