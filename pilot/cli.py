"""Thin command-line front end: each sub-command lives in ``pilot/commands/<name>.py``.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
User errors (:class:`pilot.errors.UserError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pilot.errors import EXIT_USAGE, UserError

DESCRIPTION = ("pilot: run task DAGs (generic workflows, LSST QuantumGraphs) inside one Slurm allocation "
               "under MPI, packing tasks onto nodes by memory and cores, with an HDF5 checkpoint.")
COMMAND_MODULES = ("validate", "simulate", "run", "status", "report", "submit", "cancel")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.exit(EXIT_USAGE, f"pilot: error: {message}\n")


def _load_commands(names=COMMAND_MODULES):
    for name in names:
        try:
            yield importlib.import_module(f"pilot.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"pilot.commands.{name}":
                raise


def build_parser(names=COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = _Parser(prog="pilot", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in _load_commands(names):
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _chosen(argv: list[str]) -> tuple[str, ...]:
    # Import only the chosen command: every MPI rank runs this, and the others' imports cost time.
    first = next((a for a in argv if not a.startswith("-")), None)
    return (first,) if first in COMMAND_MODULES else COMMAND_MODULES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_chosen(argv)).parse_args(argv)
    try:
        return int(args._run(args))
    except UserError as err:
        print(f"pilot: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 3


if __name__ == "__main__":
    sys.exit(main())
