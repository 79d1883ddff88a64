"""Fixtures of the LSST tests: one real Butler repository and QuantumGraph per session, and a
fresh copy of it per test that writes to it."""

from __future__ import annotations

import pytest

from tests.lsst.make_repo import build, copy_repo, run_init
from tests.test_transport import cleanup_shm, shm_segments

DETECTORS = 20   # 2 * 20 + 1 = 41 quanta over the labels a, b, gather


@pytest.fixture(autouse=True)
def no_leaked_shared_memory():
    """MPI jobs a test started (directly, or through `bps submit`) leave no shared-memory
    segment behind: MPICH's ranks killed by mpiexec after rank 0 exits non-zero cannot remove
    theirs."""
    before = shm_segments()
    yield
    cleanup_shm(before)


@pytest.fixture(scope="session")
def built_repo(tmp_path_factory):
    """The session's pristine repository and graphs (never written to by tests)."""
    pytest.importorskip("lsst.ctrl.mpexec", reason="the Rubin middleware needs Python >= 3.12 "
                        "(scripts/setup-lsst.sh makes .venv-lsst)")
    made = build(tmp_path_factory.mktemp("lsst") / "pristine", DETECTORS)
    run_init(made.repo, made.graph_qg)    # tests of g.qg start after the init job
    return made


@pytest.fixture
def test_repo(built_repo, tmp_path):
    """A private copy of the repository and graphs for one test."""
    return copy_repo(built_repo, tmp_path / "work")


@pytest.fixture(scope="session")
def small_built_repo(tmp_path_factory):
    """A 5-quantum graph (2 detectors) for runs where each quantum is a whole pipetask process."""
    pytest.importorskip("lsst.ctrl.mpexec", reason="the Rubin middleware needs Python >= 3.12")
    return build(tmp_path_factory.mktemp("lsst") / "small", 2)


@pytest.fixture
def small_repo(small_built_repo, tmp_path):
    return copy_repo(small_built_repo, tmp_path / "work")
