"""Slurm site files and the options of one submission.

A site file (YAML) describes a machine: where jobs go (account, qos, partition, constraint),
what a node has (cores, memory), how the MPI program is launched, and the shell lines that set
up the software before it. :func:`load_site` reads one from a stream with one-line errors;
:func:`resolve_site` finds a site by path or by name among the sites shipped in ``slurm/sites``.
The batch script itself is made by :mod:`pilot.slurm_script`; sbatch, squeue, scancel and the
chain record are in :mod:`pilot.slurm_jobs`.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pilot.errors import UserError

SITES_DIR = Path(__file__).resolve().parent.parent / "slurm" / "sites"
LAUNCH_FIELDS = ("nodes", "ranks", "cores_per_node", "memory_per_node_mb")
DEFAULT_DRAIN_MARGIN = 300


@dataclass(frozen=True)
class Site:
    """A machine to submit to. ``launch`` may use the fields ``{nodes}``, ``{ranks}``,
    ``{cores_per_node}`` and ``{memory_per_node_mb}``; the pilot command is appended to it."""

    name: str
    cores_per_node: int
    memory_per_node_mb: int
    launch: str
    account: str | None = None
    qos: str | None = None
    partition: str | None = None
    constraint: str | None = None
    exclusive: bool = True
    setup: tuple[str, ...] = ()
    sbatch_options: tuple[str, ...] = ()
    pilot_command: str = "pilot"
    drain_margin: int = DEFAULT_DRAIN_MARGIN
    agents_per_node: int = 1


_REQUIRED = {"cores_per_node": int, "memory_per_node_mb": int, "launch": str}
_OPTIONAL = {
    "name": str, "account": str, "qos": str, "partition": str, "constraint": str,
    "exclusive": bool, "setup": list, "sbatch_options": list, "pilot_command": str, "drain_margin": int,
    "agents_per_node": int,
}


def load_site(stream, name: str = "<site>") -> Site:
    """Read a site file from a text stream; :class:`UserError` (one line) when it is wrong."""
    try:
        data = yaml.safe_load(stream)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{name}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{name}: a site file is a mapping of keys "
                        "(cores_per_node, memory_per_node_mb, launch, ...)")
    return _site_from_mapping(data, name)


def _site_from_mapping(data: dict, name: str) -> Site:
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL), key=str)
    if unknown:
        known = ", ".join(sorted({**_REQUIRED, **_OPTIONAL}))
        raise UserError(f"{name}: unknown key {unknown[0]!r} (known: {known})")
    for key in _REQUIRED:
        if data.get(key) is None:
            raise UserError(f"{name}: missing required key {key!r}")
    values = {key: _typed(data, key, kind, name) for key, kind in {**_REQUIRED, **_OPTIONAL}.items()
              if data.get(key) is not None}
    for key in ("cores_per_node", "memory_per_node_mb"):
        if values[key] <= 0:
            raise UserError(f"{name}: {key} must be positive, got {values[key]}")
    if values.get("drain_margin", DEFAULT_DRAIN_MARGIN) < 0:
        raise UserError(f"{name}: drain_margin must not be negative")
    agents = values.get("agents_per_node", 1)
    if not 1 <= agents <= values["cores_per_node"]:
        raise UserError(f"{name}: agents_per_node must be between 1 and cores_per_node "
                        f"({values['cores_per_node']}), got {agents}")
    for key in ("setup", "sbatch_options"):
        values[key] = _strings(values.get(key, []), key, name)
    _check_launch(values["launch"], name)
    values.setdefault("name", Path(name).stem)
    return Site(**values)


def _typed(data: dict, key: str, kind: type, name: str):
    value = data[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)   # an account or qos written as a bare number
    if not ok:
        raise UserError(f"{name}: {key} must be {_KIND_WORDS[kind]}, got {value!r}")
    return value


_KIND_WORDS = {int: "an integer", str: "a string", bool: "true or false", list: "a list of strings"}


def _strings(items: list, key: str, name: str) -> tuple[str, ...]:
    for item in items:
        if not isinstance(item, str) or "\n" in item:
            raise UserError(f"{name}: every entry of {key} must be a one-line string, got {item!r}")
    return tuple(items)


def _check_launch(launch: str, name: str) -> None:
    if "\n" in launch.strip():
        raise UserError(f"{name}: launch must be one line")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(launch) if f is not None]
    except ValueError as err:
        raise UserError(f"{name}: launch: {err}") from None
    for field_name in fields:
        if field_name not in LAUNCH_FIELDS:
            raise UserError(f"{name}: launch uses {{{field_name}}}; known fields: "
                            + ", ".join(f"{{{f}}}" for f in LAUNCH_FIELDS))


def load_site_file(path) -> Site:
    """Read a site file from a path (errors name the file)."""
    try:
        with open(path, encoding="utf-8") as stream:
            return load_site(stream, str(path))
    except OSError as err:
        raise UserError(f"{path}: cannot read site file ({err.strerror})") from None


def resolve_site(spec: str) -> Site:
    """A site from a path, or from a name of a file in ``slurm/sites`` (``cori-knl``, ``local``, ...)."""
    path = Path(spec)
    if path.exists() or "/" in spec or spec.endswith((".yaml", ".yml")):
        return load_site_file(path)
    shipped = SITES_DIR / f"{spec}.yaml"
    if shipped.exists():
        return load_site_file(shipped)
    known = ", ".join(sorted(p.stem for p in SITES_DIR.glob("*.yaml"))) or "none"
    raise UserError(f"site {spec!r}: no such file, and not a shipped site (shipped: {known})")


_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?$")


def parse_walltime(text: str) -> int:
    """Seconds in a Slurm-style time ``[D-]HH:MM:SS`` or ``[D-]HH:MM``; UserError otherwise."""
    match = _WALLTIME.match(text.strip())
    if not match:
        raise UserError(f"--walltime {text!r}: expected HH:MM:SS (or D-HH:MM:SS)")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    if minutes >= 60 or seconds >= 60:
        raise UserError(f"--walltime {text!r}: minutes and seconds must be below 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UserError(f"--walltime {text!r}: must be positive")
    return total


def format_walltime(seconds: int) -> str:
    """``D-HH:MM:SS`` for sbatch ``--time`` (Slurm rounds up to whole minutes)."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


@dataclass(frozen=True)
class JobOptions:
    """One submission: what to run, where its files go, and the chain settings."""

    workflow: str          # absolute path of the workflow file
    run_dir: str           # absolute path of the run directory
    checkpoint: str        # absolute path of the checkpoint
    nodes: int
    walltime_s: int
    max_jobs: int = 1      # jobs in a chain at most (1: no resubmission)
    drain_margin: int = DEFAULT_DRAIN_MARGIN
    job_name: str = "pilot"
    run_args: tuple[str, ...] = field(default=())   # extra `pilot run` options

    def check(self) -> None:
        """UserError when the numbers cannot work together."""
        if self.nodes < 1:
            raise UserError(f"--nodes must be at least 1, got {self.nodes}")
        if self.max_jobs < 1:
            raise UserError(f"--resubmit must be at least 1 (jobs in the chain), got {self.max_jobs}")
        if not 0 <= self.drain_margin < self.walltime_s:
            raise UserError(f"--drain-margin {self.drain_margin}s must be below the wall time "
                            f"({self.walltime_s}s)")


def ranks_for(nodes: int, agents_per_node: int = 1) -> int:
    """MPI ranks for a job on ``nodes`` nodes: ``agents_per_node`` agents per node (they share
    the node's cores and memory) plus the master on the first."""
    return nodes * agents_per_node + 1


def launch_line(site: Site, nodes: int) -> str:
    """The site's launch command with its fields filled in."""
    ranks = ranks_for(nodes, site.agents_per_node)
    return site.launch.strip().format(nodes=nodes, ranks=ranks, cores_per_node=site.cores_per_node,
                                      memory_per_node_mb=site.memory_per_node_mb)
