"""DRP-shaped workflows, built directly in arrays, and written as JSON workflow files.

Shape (as Rubin's Data Release Production): per visit x detector
isr -> characterizeImage -> calibrate; per visit a consolidateVisitSummary of all its
calibrates; per patch makeWarp (a fan-in of many calibrates) -> assembleCoadd -> detection
-> mergeDetections -> deblend -> measure -> forcedPhot. Memory requests follow DC2
practice; runtimes are lognormal per label from a seeded generator.

    .venv/bin/python benchmarks/drp_workflow.py --tasks 10000 --out drp_10k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pilot.graph import Graph, graph_from_edges  # noqa: E402

# label: (requestMemory MB, median runtime s)
LABELS = {
    "isr": (3000, 60.0),
    "characterizeImage": (2000, 90.0),
    "calibrate": (2000, 120.0),
    "consolidateVisitSummary": (1000, 30.0),
    "makeWarp": (3500, 180.0),
    "assembleCoadd": (2000, 300.0),
    "detection": (1500, 60.0),
    "mergeDetections": (1000, 30.0),
    "deblend": (7000, 600.0),
    "measure": (2000, 300.0),
    "forcedPhot": (1500, 120.0),
}
PATCH_CHAIN = ("makeWarp", "assembleCoadd", "detection", "mergeDetections", "deblend",
               "measure", "forcedPhot")
RUNTIME_SIGMA = 0.5
DETECTORS = 189
WARP_FAN_IN = 150


@dataclass(frozen=True)
class Shape:
    visits: int
    detectors: int
    patches: int
    fan_in: int

    @property
    def tasks(self) -> int:
        return 3 * self.visits * self.detectors + self.visits + len(PATCH_CHAIN) * self.patches


def shape_for(tasks: int) -> Shape:
    """About ``tasks`` tasks and three edges per task: 90% single-frame, 10% coadd."""
    detectors = min(DETECTORS, max(1, tasks // 30))
    visits = max(1, round(0.3 * tasks / detectors))
    patches = max(1, round(0.1 * tasks / len(PATCH_CHAIN)))
    return Shape(visits, detectors, patches, min(WARP_FAN_IN, visits * detectors))


def drp_graph(tasks: int = 10_000, seed: int = 0) -> tuple[Graph, np.ndarray]:
    """A DRP-shaped Graph of about ``tasks`` tasks and per-task runtimes (seconds)."""
    shape = shape_for(tasks)
    rng = np.random.default_rng(seed)
    ids, label, parent, child = _layout(shape, rng)
    labels = list(LABELS)
    memory = np.array([LABELS[x][0] for x in labels], dtype=np.int64)[label]
    graph = graph_from_edges(ids, labels, label, parent, child, memory_mb=memory, command="true")
    return graph, runtimes(graph, rng)


def runtimes(graph: Graph, rng: np.random.Generator) -> np.ndarray:
    """Lognormal runtimes around each label's median."""
    median = np.array([LABELS[x][1] for x in graph.labels])[graph.label]
    return median * rng.lognormal(0.0, RUNTIME_SIGMA, graph.size)


def _layout(shape: Shape, rng: np.random.Generator):
    """Task ids, label numbers and edges, numbered block by block."""
    frames = shape.visits * shape.detectors
    isr, char, calib = 0, frames, 2 * frames
    visit0 = 3 * frames
    patch0 = visit0 + shape.visits
    frame = np.arange(frames)
    chain_p, chain_c = np.concatenate([isr + frame, char + frame]), np.concatenate([char + frame, calib + frame])
    visit_p, visit_c = calib + frame, visit0 + frame // shape.detectors
    patch = np.arange(shape.patches)
    warp = patch0 + patch * len(PATCH_CHAIN)
    fan_p = calib + rng.integers(0, frames, size=(shape.patches, shape.fan_in)).ravel()
    fan_c = np.repeat(warp, shape.fan_in)
    step = np.arange(len(PATCH_CHAIN) - 1)
    coadd_p = (warp[:, None] + step).ravel()
    parent = np.concatenate([chain_p, visit_p, fan_p, coadd_p])
    child = np.concatenate([chain_c, visit_c, fan_c, coadd_p + 1])
    return _ids(shape), _labels(shape), parent, child


def _labels(shape: Shape) -> np.ndarray:
    frames = shape.visits * shape.detectors
    single = np.repeat(np.arange(3, dtype=np.int32), frames)
    visit = np.full(shape.visits, 3, dtype=np.int32)
    coadd = np.tile(np.arange(4, 4 + len(PATCH_CHAIN), dtype=np.int32), shape.patches)
    return np.concatenate([single, visit, coadd])


def _ids(shape: Shape) -> list[str]:
    frames = [f"{v}_{d}" for v in range(shape.visits) for d in range(shape.detectors)]
    ids = [f"{name}_{f}" for name in ("isr", "characterizeImage", "calibrate") for f in frames]
    ids += [f"consolidateVisitSummary_{v}" for v in range(shape.visits)]
    ids += [f"{name}_{p}" for p in range(shape.patches) for name in PATCH_CHAIN]
    return ids


def write_json(graph: Graph, path) -> None:
    """Write ``graph`` as a compact JSON workflow, one task a line: label sections carry
    the requests; tasks carry id, label, after and command."""
    sections = {x: {"requestMemory": LABELS[x][0], "requestCpus": 1} for x in graph.labels}
    ids, labels = graph.ids, graph.labels
    with open(path, "w") as out:
        out.write('{"pipetask":%s,\n"tasks":[\n' % json.dumps(sections, separators=(",", ":")))
        for t in range(graph.size):
            after = ",".join(f'"{ids[p]}"' for p in graph.parents(t).tolist())
            sep = ",\n" if t + 1 < graph.size else "\n"
            out.write(f'{{"id":"{ids[t]}","label":"{labels[graph.label[t]]}",'
                      f'"after":[{after}],"command":"true"}}{sep}')
        out.write("]}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="about this many tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON workflow file to write")
    args = parser.parse_args(argv)
    graph, _ = drp_graph(args.tasks, args.seed)
    write_json(graph, args.out)
    print(f"{args.out}: {graph.size} tasks, {graph.parent_idx.size} edges")
    return 0


if __name__ == "__main__":
    sys.exit(main())
