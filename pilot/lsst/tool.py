"""Run ``pipetask`` or ``butler`` with the zipfile gh-127847 fix applied when needed.

``python -m pilot.lsst.tool pipetask run-qbb REPO GRAPH --qgraph-node-id UUID`` behaves as
``pipetask run-qbb ...``; on an interpreter with the zipfile bug (see :mod:`pilot.lsst.zipfix`)
it first patches ``zipfile`` in this process so new-format ``.qg`` graphs read correctly.
"""

from __future__ import annotations

import sys

from pilot.lsst.zipfix import apply_fix


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("pipetask", "butler"):
        print("usage: python -m pilot.lsst.tool {pipetask|butler} ARGS...", file=sys.stderr)
        return 2
    apply_fix()
    tool, rest = argv[0], argv[1:]
    if tool == "pipetask":
        from lsst.ctrl.mpexec.cli.pipetask import main as tool_main
    else:
        from lsst.daf.butler.cli.butler import main as tool_main
    sys.argv = [tool, *rest]
    return tool_main()


if __name__ == "__main__":
    sys.exit(main())
