"""Fixtures every test gets."""

from __future__ import annotations

import os

import pytest

from tests.helpers import hydra_topology_files, open_anywhere


@pytest.fixture(autouse=True)
def _remove_topology_files_of_killed_mpich_jobs():
    """A test that SIGKILLs an MPICH job (a kill -9 test) leaves the topology file its
    hydra_pmi_proxy kept in /tmp. Those that appeared during the test and that no process
    holds open any more are removed after it."""
    before = hydra_topology_files()
    yield
    new = hydra_topology_files() - before
    if not new:
        return
    for path in new - open_anywhere(new):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
