"""Loading a real saved QuantumGraph (new ``.qg`` and old ``.qgraph``) into a pilot Graph."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("lsst.ctrl.mpexec", reason="the Rubin middleware needs Python >= 3.12 "
                    "(scripts/setup-lsst.sh makes .venv-lsst)")

from pilot.errors import UserError  # noqa: E402
from pilot.graph import topological_order  # noqa: E402
from pilot.lsst.bps_config import INIT_LABEL, load_bps_config  # noqa: E402
from pilot.lsst.qgraph import MODE_ENV, final_command, load_qgraph  # noqa: E402

pytestmark = pytest.mark.lsst


def middleware_edges(path):
    """(parent uuid, child uuid) pairs and uuid -> (label, detector), read with the middleware."""
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    graph = PredictedQuantumGraph.read_execution_quanta(path)
    x = graph.quantum_only_xgraph
    nodes = {str(n): (x.nodes[n]["task_label"], x.nodes[n]["data_id"].get("detector")) for n in x}
    return {(str(a), str(b)) for a, b in x.edges}, nodes


def pilot_edges(graph):
    return {(graph.ids[p], graph.ids[t]) for t in range(graph.size) for p in graph.parents(t)}


@pytest.mark.parametrize("suffix", ["qg", "qgraph"])
def test_quanta_labels_and_edges_match_the_graph(built_repo, suffix):
    path = built_repo.graph_qg if suffix == "qg" else built_repo.graph_qgraph
    graph = load_qgraph(path, built_repo.repo)
    edges, nodes = middleware_edges(path)
    n = built_repo.detectors
    assert graph.size == 2 * n + 2                       # init job + 41 quanta
    assert set(graph.ids[1:]) == set(nodes)
    assert pilot_edges(graph) - {e for e in pilot_edges(graph) if e[0] == INIT_LABEL} == edges
    sources = {b for a, b in pilot_edges(graph) if a == INIT_LABEL}
    assert sources == {u for u, (label, _) in nodes.items() if label == "a"}
    for t in range(1, graph.size):
        label, detector = nodes[graph.ids[t]]
        assert graph.labels[graph.label[t]] == label
        assert graph.extra["lsst_data_id"][t].get("detector") == detector
        assert graph.extra["lsst_uuid"][t] == graph.ids[t]
    counts = {lab: int((graph.label == i).sum()) for i, lab in enumerate(graph.labels)}
    assert counts == {INIT_LABEL: 1, "a": n, "b": n, "gather": 1}
    assert list(topological_order(graph))[0] == 0


def test_commands_init_and_final_job(built_repo):
    graph = load_qgraph(built_repo.graph_qg, built_repo.repo, mode="subprocess")
    repo, path = str(built_repo.repo.resolve()), str(built_repo.graph_qg.resolve())
    assert graph.commands[0][-3:] == ["pre-exec-init-qbb", repo, path]
    assert graph.commands[1][-5:] == ["run-qbb", repo, path, "--qgraph-node-id", graph.ids[1]]
    assert graph.commands[1][1:4] == ["-m", "pilot.lsst.tool", "pipetask"]
    assert graph.env[0] is None and graph.env[1] == {MODE_ENV: "subprocess"}
    run = graph.extra["lsst"]
    assert run.output_run == "pilot/out/run"
    final = final_command(run, complete=False)
    assert final[4:9] == ["aggregate-graph", path, repo, "-j", "1"] and "--incomplete" in final
    assert run.quanta == 41
    assert "--incomplete" not in final_command(run, complete=True)


def test_requests_from_a_bps_config(built_repo):
    text = """
requestMemory: 3000
numberOfRetries: 2
pipetask:
  b:
    requestMemory: 5GB
    requestCpus: 2
    memoryMultiplier: 1.5
    requestMemoryMax: 12000
  pipetaskInit:
    requestMemory: 500
finalJob:
  command1: "butler transfer-from-graph {qgraphFile} {butlerConfig} --register-dataset-types"
"""
    config = load_bps_config(io.StringIO(text), "bps.yaml")
    graph = load_qgraph(built_repo.graph_qg, built_repo.repo, config)
    by_label = {graph.labels[graph.label[t]]: t for t in range(graph.size)}
    a, b, init, gather = (by_label[x] for x in ("a", "b", INIT_LABEL, "gather"))
    assert (graph.memory_mb[a], graph.cpus[a], graph.retries[a]) == (3000, 1, 2)
    assert (graph.memory_mb[b], graph.cpus[b], graph.memory_multiplier[b], graph.memory_max[b]) == \
        (5120, 2, 1.5, 12000)
    assert graph.memory_mb[init] == 500 and graph.memory_mb[gather] == 3000
    assert graph.memory_multiplier[a] == 2.0 and graph.retry_unless_exit[a] == (1, 2)
    assert final_command(graph.extra["lsst"], True)[4] == "transfer-from-graph"


def test_bad_inputs_are_one_line_user_errors(built_repo, tmp_path):
    with pytest.raises(UserError, match="no such QuantumGraph"):
        load_qgraph(tmp_path / "missing.qg", built_repo.repo)
    with pytest.raises(UserError, match="not a Butler repository"):
        load_qgraph(built_repo.graph_qg, tmp_path)
    junk = tmp_path / "junk.qg"
    junk.write_bytes(b"not a graph")
    with pytest.raises(UserError, match="not a readable QuantumGraph") as err:
        load_qgraph(junk, built_repo.repo)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="execution mode"):
        load_qgraph(built_repo.graph_qg, built_repo.repo, mode="hot")
