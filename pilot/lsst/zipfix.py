"""Detection of, and a targeted fix for, CPython's zipfile bug gh-127847.

In CPython 3.12.0-3.12.8 and 3.13.0-3.13.1, seeking forward in a stored (uncompressed) zip
member while another member of the same archive is being read moves the wrong file position
(``_SharedFile.seek`` with ``SEEK_CUR`` is relative to the shared file's position, which the
other reader moved). New-format QuantumGraph files (``.qg``) are such archives, and
``pipetask run-qbb --qgraph-node-id`` then fails with ``EOFError`` or reads garbage on all but
small graphs. Old-format ``.qgraph`` files are not zip archives and are not affected.

The bug is detected by behaviour (the reproducer from the CPython issue), not by version
number, so a patched or backported interpreter is left alone. The fix makes
``_SharedFile.seek`` start from the member's own position, as CPython 3.12.9 / 3.13.2 do.
"""

from __future__ import annotations

import io
import zipfile

_applied = False


def zipfile_bug_present() -> bool:
    """True when this interpreter has gh-127847 (checked on a two-member in-memory archive)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("a", b"123")
        archive.writestr("b", b"456")
    with zipfile.ZipFile(buf) as archive, archive.open("a") as first, archive.open("b") as second:
        first.read(1)
        second.seek(1)
        return second.read(1) != b"5"


def _seek_from_own_position(self, offset, whence=0):
    with self._lock:
        if self._writing():
            raise ValueError("Can't reposition in the ZIP file while there is an open writing "
                             "handle on it. Close the writing handle before trying to read.")
        self._file.seek(self._pos)  # another member's reader may have moved the shared file
        self._file.seek(offset, whence)
        self._pos = self._file.tell()
        return self._pos


def apply_fix() -> bool:
    """Patch ``zipfile._SharedFile.seek`` in this process if the bug is present.

    Returns True when the fix is (now) in place, False when the interpreter does not need it.
    """
    global _applied
    if _applied:
        return True
    if not zipfile_bug_present():
        return False
    zipfile._SharedFile.seek = _seek_from_own_position
    _applied = True
    if zipfile_bug_present():
        raise RuntimeError("the zipfile gh-127847 fix did not take effect on this Python")
    return True
