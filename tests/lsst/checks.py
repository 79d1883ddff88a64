"""Helpers of the LSST tests: read outputs back from the repository, run quanta one by one."""

from __future__ import annotations

import os
import subprocess

import numpy as np

from tests.lsst.make_repo import INSTRUMENT, OUTPUT

PER_DETECTOR = ("add_dataset1", "add2_dataset1", "add_dataset2", "add2_dataset2")
OF_A = PER_DETECTOR[:2]


def read_outputs(repo, collection: str = OUTPUT) -> dict:
    """``{(dataset type, detector or None): (array, count)}`` of the outputs registered in ``repo``."""
    from lsst.daf.butler import Butler

    butler = Butler.from_config(str(repo), collections=[collection])
    found: dict = {}
    try:
        for dstype in (*PER_DETECTOR, "gather_total"):
            if dstype not in {t.name for t in butler.registry.queryDatasetTypes(dstype)}:
                continue
            for ref in butler.query_datasets(dstype, collections=collection, explain=False,
                                             find_first=False):
                key = (dstype, ref.dataId.get("detector"))
                value, count = found.get(key, (None, 0))
                found[key] = (butler.get(ref), count + 1)
    finally:
        butler.close()
    return found


def check_outputs(made, found: dict, detectors, gather: bool, types=PER_DETECTOR) -> None:
    """Every expected output of ``detectors`` (and of gather) is there once, with its value."""
    for d in detectors:
        for dstype, want in made.expected(d).items():
            if dstype not in types:
                continue
            assert (dstype, d) in found, f"{dstype} detector {d} missing"
            value, count = found[(dstype, d)]
            assert count == 1, f"{dstype} detector {d} registered {count} times"
            np.testing.assert_allclose(value, want)
    if gather:
        value, count = found[("gather_total", None)]
        assert count == 1
        np.testing.assert_allclose(value, made.expected_total())


def quantum_tasks(graph, label=None, detectors=None) -> list[int]:
    """Task numbers of the quanta (not the init job) in graph order, optionally filtered."""
    data_ids = graph.extra["lsst_data_id"]
    picked = []
    for t in range(1, graph.size):
        if label is not None and graph.labels[graph.label[t]] != label:
            continue
        if detectors is not None and data_ids[t].get("detector") not in detectors:
            continue
        picked.append(t)
    return picked


def run_command(graph, task: int, log, env=None) -> int:
    """Run one task's command as a subprocess (subprocess mode), its output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.run(graph.commands[task], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}).returncode


def detectors_of(graph, tasks) -> set:
    return {graph.extra["lsst_data_id"][t].get("detector") for t in tasks}


__all__ = ["INSTRUMENT", "check_outputs", "quantum_tasks", "read_outputs", "run_command"]
