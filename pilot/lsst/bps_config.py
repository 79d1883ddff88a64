"""Resource requests and final-job settings from a BPS-style YAML (no middleware needed).

The keys and defaults are those of ctrl_bps (``bps_defaults.yaml``): ``requestMemory`` (MB,
2048), ``requestCpus`` (1), ``numberOfRetries`` (5), ``memoryMultiplier`` (2),
``requestMemoryMax`` (none: the largest node), ``retryUnlessExit`` ([1, 2]). A value is looked
up in the label's ``pipetask: <label>:`` section first, then at the top level, then in the
defaults. The init job's label is ``pipetaskInit``. ``finalJob:`` may hold ``command1`` (a
command using ``transfer-from-graph`` selects that tool; anything else means
``aggregate-graph``), ``requestCpus`` (processes of aggregate-graph; when not given, one per
5000 quanta, at most 16: worker start-up outweighs the gain on small graphs) and
``updateOutputChain``; ``extraAggregateOptions`` is read at the top level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pilot.errors import UserError

INIT_LABEL = "pipetaskInit"
DEFAULTS = {
    "requestMemory": 2048,
    "requestCpus": 1,
    "numberOfRetries": 5,
    "memoryMultiplier": 2.0,
    "requestMemoryMax": 0,
    "retryUnlessExit": (1, 2),
}
FINAL_DEFAULTS = {"requestCpus": 0, "updateOutputChain": "--update-output-chain"}   # 0: automatic
_UNITS_MB = {"": 1, "MB": 1, "MIB": 1, "M": 1, "GB": 1024, "GIB": 1024, "G": 1024, "TB": 1024 ** 2,
             "TIB": 1024 ** 2}


@dataclass(frozen=True)
class Requests:
    """The requests of one task label, in the units of :class:`pilot.graph.Graph`."""

    memory_mb: int
    cpus: int
    retries: int
    memory_multiplier: float
    memory_max: int
    retry_unless_exit: tuple[int, ...]


@dataclass(frozen=True)
class FinalJob:
    """How the final job registers outputs: ``aggregate`` (aggregate-graph) or ``transfer``."""

    tool: str = "aggregate"
    cpus: int = 0        # processes for aggregate-graph; 0 = automatic
    update_output_chain: bool = True
    extra_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class BpsConfig:
    """A parsed BPS YAML: top-level values, per-label sections and the final job."""

    top: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    final: FinalJob = FinalJob()
    name: str = "<defaults>"

    def requests(self, label: str) -> Requests:
        """Requests for ``label``: its ``pipetask:`` section, the top level, then the defaults."""
        section = self.labels.get(label, {})
        value = {key: section.get(key, self.top.get(key, default)) for key, default in DEFAULTS.items()}
        if "requestMemoryMax" not in section and "requestMemoryMax" not in self.top:
            value["requestMemoryMax"] = self.top.get("memoryLimit", 0)
        where = f"{self.name}: pipetask: {label}" if label in self.labels else self.name
        return Requests(
            memory_mb=_memory(value["requestMemory"], where, "requestMemory"),
            cpus=_positive_int(value["requestCpus"], where, "requestCpus"),
            retries=_count(value["numberOfRetries"], where, "numberOfRetries"),
            memory_multiplier=_multiplier(value["memoryMultiplier"], where),
            memory_max=_memory(value["requestMemoryMax"], where, "requestMemoryMax", zero_ok=True),
            retry_unless_exit=_exit_codes(value["retryUnlessExit"], where),
        )


def load_bps_config(stream, name: str = "<bps config>") -> BpsConfig:
    """Parse a BPS YAML from a text stream; a bad value is a one-line :class:`UserError`."""
    try:
        data = yaml.safe_load(stream)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise UserError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return bps_config_from_mapping(data if data is not None else {}, name)


def load_bps_config_file(path) -> BpsConfig:
    """Parse the BPS YAML at ``path`` (UserError when it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as stream:
            return load_bps_config(stream, str(path))
    except OSError as err:
        raise UserError(f"{path}: cannot read BPS config ({err.strerror})") from None


def bps_config_from_mapping(data, name: str = "<bps config>") -> BpsConfig:
    """Build a :class:`BpsConfig` from already-parsed YAML."""
    if not isinstance(data, dict):
        raise UserError(f"{name}: a BPS config must be a mapping, got {type(data).__name__}")
    labels = data.get("pipetask") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, dict) for v in labels.values()):
        raise UserError(f"{name}: 'pipetask' must map task labels to sections of keys")
    config = BpsConfig(top=data, labels=labels, final=_final_job(data, name), name=name)
    for label in (*labels, ""):   # "" is no section: the top level alone
        config.requests(label)    # a bad value fails now, naming its section
    return config


def _final_job(data: dict, name: str) -> FinalJob:
    final = data.get("finalJob") or {}
    if not isinstance(final, dict):
        raise UserError(f"{name}: 'finalJob' must be a mapping")
    command = str(final.get("command1", ""))
    chain = final.get("updateOutputChain", FINAL_DEFAULTS["updateOutputChain"])
    extra = str(data.get("extraAggregateOptions", "") or "").split()
    return FinalJob(
        tool="transfer" if "transfer-from-graph" in command else "aggregate",
        cpus=_positive_int(final["requestCpus"], f"{name}: finalJob", "requestCpus")
        if "requestCpus" in final else FINAL_DEFAULTS["requestCpus"],
        update_output_chain=bool(chain) and str(chain).strip() != "",
        extra_options=tuple(extra),
    )


# ---- value checks ---------------------------------------------------------------------


def _memory(value, where: str, key: str, zero_ok: bool = False) -> int:
    """MB from an int or a string with a unit (``4GB``, ``3000MB``, ``3000``)."""
    if isinstance(value, bool):
        raise UserError(f"{where}: {key} must be a memory size in MB, got {value!r}")
    if isinstance(value, (int, float)):
        mb = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS_MB:
            raise UserError(f"{where}: {key} must be a memory size in MB (or with GB/MB), got {value!r}")
        mb = int(float(match.group(1)) * _UNITS_MB[unit])
    if mb < 0 or (mb == 0 and not zero_ok):
        raise UserError(f"{where}: {key} must be positive, got {value!r}")
    return mb


def _positive_int(value, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _count(value, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    return value


def _multiplier(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise UserError(f"{where}: memoryMultiplier must be a number >= 1, got {value!r}")
    return float(value)


def _exit_codes(value, where: str) -> tuple[int, ...]:
    codes = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if value is None:
        return ()
    if not isinstance(codes, (list, tuple)) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise UserError(f"{where}: retryUnlessExit must be an exit code or a list of them, got {value!r}")
    return tuple(codes)


def default_config() -> BpsConfig:
    """The ctrl_bps defaults alone (no BPS YAML given)."""
    return BpsConfig()


def config_or_default(path) -> BpsConfig:
    """:func:`load_bps_config_file` when ``path`` is given, else the defaults."""
    return load_bps_config_file(Path(path)) if path else default_config()
