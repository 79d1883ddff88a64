"""Small PipelineTasks for tests, examples and benchmarks (need the Rubin middleware).

``FailableAddTask`` is ``lsst.pipe.base.tests.simpleQGraph.AddTask`` that can be told to fail
for chosen quanta through the environment, so a test can make one quantum fail without
building a different graph. ``GatherTask`` is a fan-in: one quantum per instrument that sums
the per-detector inputs.

Set ``PILOT_LSST_TEST_FAIL`` to a comma-separated list of ``label:detector`` (for example
``a:3``) to make those quanta raise, and ``PILOT_LSST_TEST_SLEEP`` to a number of seconds that
every ``FailableAddTask`` quantum sleeps first (to watch or kill a running quantum).
"""

from __future__ import annotations

import os
import time

import numpy as np

from lsst.pipe.base import PipelineTask, PipelineTaskConfig, PipelineTaskConnections, Struct
from lsst.pipe.base import connectionTypes as cT
from lsst.pipe.base.tests.simpleQGraph import AddTask

FAIL_ENV = "PILOT_LSST_TEST_FAIL"
SLEEP_ENV = "PILOT_LSST_TEST_SLEEP"


def should_fail(label: str, detector: int, spec: str | None) -> bool:
    """True when ``label:detector`` is listed in ``spec`` (the ``PILOT_LSST_TEST_FAIL`` value)."""
    wanted = {item.strip() for item in (spec or "").split(",") if item.strip()}
    return f"{label}:{detector}" in wanted


class FailableAddTask(AddTask):
    """AddTask that raises for the quanta named in ``PILOT_LSST_TEST_FAIL``."""

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        time.sleep(float(os.environ.get(SLEEP_ENV) or 0))
        detector = butlerQC.quantum.dataId["detector"]
        if should_fail(self.getName(), detector, os.environ.get(FAIL_ENV)):
            raise RuntimeError(f"{self.getName()} detector {detector}: failing as asked by {FAIL_ENV}")
        super().runQuantum(butlerQC, inputRefs, outputRefs)


class GatherConnections(
    PipelineTaskConnections,
    dimensions=("instrument",),
    defaultTemplates={"in_tmpl": "_in"},
):
    parts = cT.Input(
        name="add_dataset{in_tmpl}",
        dimensions=["instrument", "detector"],
        storageClass="NumpyArray",
        multiple=True,
        doc="Per-detector arrays to sum",
    )
    total = cT.Output(
        name="gather_total",
        dimensions=["instrument"],
        storageClass="NumpyArray",
        doc="Element-wise sum of every input array",
    )


class GatherConfig(PipelineTaskConfig, pipelineConnections=GatherConnections):
    pass


class GatherTask(PipelineTask):
    """Fan-in: sums the arrays of every detector into one array per instrument."""

    ConfigClass = GatherConfig
    _DefaultName = "gather"

    def run(self, parts) -> Struct:
        return Struct(total=np.sum(np.stack([np.asarray(x) for x in parts]), axis=0))
