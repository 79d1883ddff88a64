"""The zipfile gh-127847 probe and fix (pure stdlib: runs on every Python)."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

from pilot.lsst import zipfix


def interleaved_read_is_right() -> bool:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("first", b"0123456789" * 100)
        archive.writestr("second", b"abcdefghij" * 100)
    with zipfile.ZipFile(buf) as archive, archive.open("first") as one, archive.open("second") as two:
        one.read(7)
        two.seek(500)
        return two.read(5) == b"abcde" and one.read(3) == b"789"


def test_probe_matches_interpreter_and_fix_repairs_reads():
    # Run in a fresh interpreter so this test process's zipfile stays as it was.
    code = ("import sys; from pilot.lsst import zipfix; import tests.lsst.test_zipfix as t;"
            "before = zipfix.zipfile_bug_present(); ok_before = t.interleaved_read_is_right();"
            "applied = zipfix.apply_fix();"
            "print(before, ok_before, applied, zipfix.zipfile_bug_present(), t.interleaved_read_is_right())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, ok_before, applied, after, ok_after = (w == "True" for w in out.split())
    assert before == (not ok_before)          # the probe sees exactly the real misbehaviour
    assert applied == before                   # the fix is applied only where needed
    assert not after and ok_after              # and afterwards reads are right


def test_affected_versions_are_the_documented_ones():
    v = sys.version_info[:3]
    affected = (3, 12, 0) <= v < (3, 12, 9) or (3, 13, 0) <= v < (3, 13, 2)
    code = "from pilot.lsst import zipfix; print(zipfix.zipfile_bug_present())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert (out.strip() == "True") == affected
