"""BPS-style YAML: requests per label with ctrl_bps defaults, the final job, one-line errors.

Pure parsing: runs without the Rubin middleware too."""

from __future__ import annotations

import io

import pytest

from pilot.errors import UserError
from pilot.lsst.bps_config import (INIT_LABEL, Requests, default_config, load_bps_config,
                                   load_bps_config_file)


def parse(text: str):
    return load_bps_config(io.StringIO(text), "bps.yaml")


def test_ctrl_bps_defaults():
    assert default_config().requests("isr") == Requests(2048, 1, 5, 2.0, 0, (1, 2))
    final = default_config().final
    assert (final.tool, final.cpus, final.update_output_chain) == ("aggregate", 0, True)


def test_label_section_overrides_top_level_which_overrides_defaults():
    config = parse("""
requestMemory: 4096
retryUnlessExit: 3
memoryLimit: 100000
pipetask:
  calibrate:
    requestMemory: "8 GB"
    numberOfRetries: 0
    requestMemoryMax: 20000
""")
    assert config.requests("isr") == Requests(4096, 1, 5, 2.0, 100000, (3,))
    assert config.requests("calibrate") == Requests(8192, 1, 0, 2.0, 20000, (3,))
    assert config.requests(INIT_LABEL).memory_mb == 4096


def test_final_job_choice_and_options():
    config = parse("""
extraAggregateOptions: "--worker-log-level DEBUG"
finalJob:
  command1: "butler transfer-from-graph {qgraphFile} {butlerConfig}"
  requestCpus: 4
  updateOutputChain: ""
""")
    assert config.final.tool == "transfer"
    assert (config.final.cpus, config.final.update_output_chain) == (4, False)
    assert config.final.extra_options == ("--worker-log-level", "DEBUG")
    assert parse("finalJob:\n  command1: butler aggregate-graph x y\n").final.tool == "aggregate"


@pytest.mark.parametrize("text, words", [
    ("requestMemory: lots\n", ["bps.yaml", "requestMemory", "lots"]),
    ("pipetask:\n  isr:\n    requestCpus: 0\n", ["pipetask: isr", "requestCpus"]),
    ("numberOfRetries: -1\n", ["numberOfRetries"]),
    ("memoryMultiplier: 0.5\n", ["memoryMultiplier"]),
    ("retryUnlessExit: [1, x]\n", ["retryUnlessExit"]),
    ("pipetask: [1, 2]\n", ["pipetask"]),
    ("- a list\n", ["mapping"]),
    ("key: [unclosed\n", ["bps.yaml:", "not valid YAML"]),
])
def test_bad_values_are_one_line_errors(text, words):
    with pytest.raises(UserError) as err:
        parse(text)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read BPS config"):
        load_bps_config_file(tmp_path / "nope.yaml")
