"""The lines of a text file that start in a byte range.

A file of millions of lines (a ``.txt`` file list, an index's manifest) is
read by several tasks at once, each given a byte range: a task reads the
lines that *start* in its range, the last one to its end even past the
range, so that every line is read once whatever the cut.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO


def lines_in_span(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """The lines of ``f`` (seekable, binary) that start in [start, end),
    with their line ends."""
    at = start
    if start:
        f.seek(start - 1)
        if f.read(1) != b"\n":  # a line begun before: the span's before
            at += len(f.readline())
    while at < end:
        line = f.readline()
        if not line:
            break
        at += len(line)
        yield line


def spans(size: int, step: int) -> list[tuple[int, int]]:
    """[start, end) ranges of ``step`` bytes covering ``size`` bytes."""
    return [(start, min(size, start + step)) for start in range(0, size, step)]
