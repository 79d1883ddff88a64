"""The journal format: blocks round-trip; a torn or corrupt tail is detected and dropped."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pilot.journal import HEADER, ROW, JournalWriter, Rows, decode_blocks, encode_block, read_journal


def _rows(tasks, state=4):
    rows = np.zeros(len(tasks), ROW)
    rows["task"], rows["state"], rows["time"] = tasks, state, np.arange(len(tasks), dtype=float)
    return rows


def test_blocks_round_trip_with_log_paths():
    a = encode_block(_rows([1, 2, 3]), ["", "/logs/00000/b.1.log", "é/ü.log"])
    b = encode_block(_rows([7]), ["x"])
    got, end = decode_blocks(a + b)
    assert end == len(a) + len(b)
    assert got.rows["task"].tolist() == [1, 2, 3, 7]
    assert [got.log(i) for i in range(4)] == ["", "/logs/00000/b.1.log", "é/ü.log", "x"]


def test_every_torn_tail_is_dropped_and_earlier_blocks_kept():
    first = encode_block(_rows([1, 2]), ["a", "b"])
    second = encode_block(_rows([3, 4, 5]), ["c", "", "dd"])
    data = first + second
    for cut in range(len(first), len(data)):
        got, end = decode_blocks(data[:cut])
        assert got.rows["task"].tolist() == [1, 2], cut
        assert end == len(first)
    assert decode_blocks(data)[0].rows["task"].tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("where", ["header", "rows", "logs"])
def test_a_flipped_bit_stops_reading_at_that_block(where):
    first = encode_block(_rows([1]), ["a"])
    second = bytearray(encode_block(_rows([2, 3]), ["bb", "c"]))
    third = encode_block(_rows([4]), [""])
    offset = {"header": 5, "rows": HEADER.size + 10, "logs": len(second) - 1}[where]
    second[offset] ^= 0x10
    got, end = decode_blocks(first + bytes(second) + third)
    assert got.rows["task"].tolist() == [1]
    assert end == len(first)


def test_garbage_after_blocks_is_ignored():
    block = encode_block(_rows([9]), [""])
    got, _ = decode_blocks(block + os.urandom(100))
    assert got.rows["task"].tolist() == [9]


def test_writer_appends_and_reader_sees_synced_blocks(tmp_path):
    path = str(tmp_path / "j")
    w = JournalWriter(path)
    for k in range(5):
        w.write(encode_block(_rows([k, k + 100]), ["", f"log{k}"]))
        w.sync()
    w.close()
    got = read_journal(path)
    assert got.rows["task"].tolist() == [0, 100, 1, 101, 2, 102, 3, 103, 4, 104]
    assert got.log(9) == "log4"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert len(read_journal(fd).rows) == 10
    finally:
        os.close(fd)
    with open(path, "ab") as f:   # a torn write at the end, as a kill mid-write leaves it
        f.write(encode_block(_rows([55]), ["z"])[:-3])
    assert len(read_journal(path).rows) == 10


def test_concat_keeps_log_offsets():
    parts = [decode_blocks(encode_block(_rows([i]), [f"p{i}"]))[0] for i in range(3)]
    got = Rows.concat(parts)
    assert [got.log(i) for i in range(3)] == ["p0", "p1", "p2"]
    assert Rows.concat([]).rows.size == 0
