"""Thin command-line front end: each sub-command lives in ``pilot/commands/<name>.py``.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
User errors (:class:`pilot.errors.UserError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pilot.errors import EXIT_USAGE, UserError

COMMAND_MODULES = ("validate", "simulate", "run", "status", "report", "submit", "cancel")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.exit(EXIT_USAGE, f"pilot: error: {message}\n")


def _load_commands():
    for name in COMMAND_MODULES:
        try:
            yield importlib.import_module(f"pilot.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"pilot.commands.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pilot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in _load_commands():
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except UserError as err:
        print(f"pilot: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 3


if __name__ == "__main__":
    sys.exit(main())
