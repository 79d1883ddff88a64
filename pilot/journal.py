"""The append-only journal beside a checkpoint: CRC-checked blocks of fixed-size rows.

A block is one group commit: a 16-byte header (magic, row count, log bytes, CRC32 of the
header's first 12 bytes and the payload), then ``n`` rows of :data:`ROW`, ``n`` uint32 log
lengths and the UTF-8 log paths. A block is written with one ``write`` and made durable with
``fdatasync``; a kill can leave only the last block torn, which the CRC (or a short read)
detects, and readers stop there. Row semantics (what each field means for each kind) are in
:mod:`pilot.checkpoint_schema`.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"PJ01"
HEADER = struct.Struct("<4sIII")

#: One row: the state of one task after one event (see checkpoint_schema for the kinds).
ROW = np.dtype([
    ("task", "<i4"), ("kind", "u1"), ("state", "i1"), ("failure", "i1"), ("_pad", "u1"),
    ("attempts", "<i4"), ("exit_code", "<i4"), ("signal", "<i4"), ("node", "<i4"),
    ("memory_request", "<i8"), ("time", "<f8"), ("start", "<f8"), ("end", "<f8"),
    ("peak_rss_mb", "<f4"), ("cpu_s", "<f4"),
])
assert ROW.itemsize == 64


def encode_logs(logs: list[str]) -> tuple[np.ndarray, bytes]:
    """(uint32 byte length of each log path, the paths' UTF-8 joined)."""
    if not any(logs):
        return np.zeros(len(logs), "<u4"), b""
    encoded = [s.encode("utf-8", "surrogateescape") for s in logs]
    return np.fromiter(map(len, encoded), dtype="<u4", count=len(encoded)), b"".join(encoded)


def encode_block(rows: np.ndarray, logs: list[str] | None = None, *, lengths=None, blob=b"") -> bytes:
    """One block holding ``rows`` (a ROW array) and one log path per row ("" for none),
    given as ``logs`` or already encoded (``lengths``, ``blob``) by :func:`encode_logs`."""
    if lengths is None:
        lengths, blob = encode_logs(logs)
    payload = rows.astype(ROW, copy=False).tobytes() + lengths.tobytes() + blob
    head = struct.pack("<4sII", MAGIC, len(rows), len(blob))
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


@dataclass
class Rows:
    """Rows read back, with their log paths as offsets into one blob."""

    rows: np.ndarray        # ROW[n]
    log_ptr: np.ndarray     # int64[n+1]: row i's log is blob[log_ptr[i]:log_ptr[i+1]]
    blob: bytes

    def log(self, i: int) -> str:
        return self.blob[self.log_ptr[i]:self.log_ptr[i + 1]].decode("utf-8", "surrogateescape")

    @staticmethod
    def with_logs(rows: np.ndarray, logs: list[str]) -> "Rows":
        """Rows in memory with one log path per row."""
        return Rows.from_encoded(rows, *encode_logs(logs))

    @staticmethod
    def from_encoded(rows: np.ndarray, lengths: np.ndarray, blob: bytes) -> "Rows":
        """Rows in memory with their log paths as :func:`encode_logs` gives them."""
        return Rows(rows, _ptr(lengths), blob)

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        parts = [p for p in parts if len(p.rows)]
        if not parts:
            return Rows(np.zeros(0, ROW), np.zeros(1, np.int64), b"")
        if len(parts) == 1:
            return parts[0]
        rows = np.concatenate([p.rows for p in parts])
        lengths = np.concatenate([np.diff(p.log_ptr) for p in parts])
        return Rows(rows, _ptr(lengths), b"".join(p.blob for p in parts))


def _ptr(lengths: np.ndarray) -> np.ndarray:
    ptr = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=ptr[1:])
    return ptr


def decode_blocks(data: bytes) -> tuple[Rows, int]:
    """(rows of every whole, valid block in order, bytes they span); stops at the first
    torn or corrupt block."""
    blocks, pos = _valid_blocks(data)
    total = sum(n for _, n, _ in blocks)
    rows, lengths, blobs, at = np.empty(total, ROW), np.empty(total, "<u4"), [], 0
    for start, n, nlog in blocks:   # one copy into arrays sized once: journals can be large
        rows[at:at + n] = np.frombuffer(data, ROW, n, start)
        lengths[at:at + n] = np.frombuffer(data, "<u4", n, start + n * ROW.itemsize)
        blobs.append(data[start + n * (ROW.itemsize + 4):start + n * (ROW.itemsize + 4) + nlog])
        at += n
    return Rows(rows, _ptr(lengths), b"".join(blobs)), pos


def _valid_blocks(data: bytes) -> tuple[list, int]:
    """[(payload offset, rows, log bytes)] of the leading valid blocks, and where they end."""
    view, blocks, pos = memoryview(data), [], 0
    while pos + HEADER.size <= len(data):
        magic, n, nlog, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + n * (ROW.itemsize + 4) + nlog
        if magic != MAGIC or end > len(data):
            break
        if zlib.crc32(view[pos + HEADER.size:end], zlib.crc32(view[pos:pos + 12])) != crc:
            break
        blocks.append((pos + HEADER.size, n, nlog))
        pos = end
    return blocks, pos


def read_journal(fd_or_path) -> Rows:
    """The valid rows of one journal file (an open descriptor or a path)."""
    if isinstance(fd_or_path, int):
        size = os.fstat(fd_or_path).st_size
        data = os.pread(fd_or_path, size, 0) if size else b""
    else:
        with open(fd_or_path, "rb") as f:
            data = f.read()
    return decode_blocks(data)[0]


# ---- file names ---------------------------------------------------------------------


def journal_path(checkpoint: str, generation: int) -> str:
    """The journal that follows the snapshot of ``generation``."""
    return f"{checkpoint}.journal.{generation:08d}"


def journal_generations(checkpoint: str) -> list[int]:
    """Generations of the journals that exist beside ``checkpoint``, ascending."""
    folder, base = os.path.split(os.path.abspath(checkpoint))
    pattern = re.compile(re.escape(base) + r"\.journal\.(\d{8})$")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)


def fsync_dir(path: str) -> None:
    """Make a create, rename or unlink in ``path``'s folder durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JournalWriter:
    """Appends blocks to one journal file; ``sync`` makes what was written durable."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.bytes = os.fstat(self.fd).st_size

    def write(self, block: bytes) -> None:
        view = memoryview(block)
        while view:
            view = view[os.write(self.fd, view):]
        self.bytes += len(block)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
