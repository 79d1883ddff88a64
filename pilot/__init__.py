"""pilot: an MPI pilot-job executor for task DAGs (generic workflows and LSST QuantumGraphs)."""

__version__ = "0.1.0"
