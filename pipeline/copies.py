"""Images whose vector is another's, bit for bit: a graph index stores it once.

Photo archives hold byte-identical files by the dozen (and a placeholder
image by the thousand); on CPU workers each copy embeds to the same bits. An
HNSW graph fills every copy's neighbour list with its zero-distance twins,
so a group of copies becomes an island that searches cannot leave. On 3,000
clustered vectors (bench/graph_copies.py), 60 vectors 50 times each needed
efSearch 1024 to reach recall@10 0.95-0.96 with every copy a node, and
reached 1.000 at 16 stored once. So a graph holds each distinct vector
once, under the id of its first image; ``copies.npy`` lists each other
image's id beside that representative's, and a search hands out a
representative's copies with its score (they score exactly the same).
Vectors that differ in any bit (copies embedded by different model
runtimes, or in different GPU batches) are indexed as before.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy

from imgindex.pipeline.lookup import rows_in_sorted

COPIES_FILE = "copies.npy"  # int64 [n, 2]: an image's id, its representative's id


class DistinctAdder:
    """Adds vectors to a FAISS index once per distinct value, noting the copies.

    A vector is known by a 128-bit BLAKE2 digest of its bytes: 110 bytes of
    memory per distinct vector (the graph holds 5.3 KiB of a 1,280-d one)
    and 12-15 microseconds a row (adding it to the graph takes 1.6 ms).
    """

    def __init__(self, index, copies: np.ndarray | None = None):
        self.index = index
        self._first: dict[bytes, int] = {}  # digest -> representative id
        self._copies: list[tuple[int, int]] = []
        if copies is not None:  # a graph grown again: its table so far
            self._copies.extend(map(tuple, copies.tolist()))

    def know(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Take rows the index already holds as their values' representatives."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        for row, image_id in enumerate(ids.tolist()):
            self._first.setdefault(_digest(vectors[row]), image_id)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, np.float32)
        keep = np.ones(len(ids), bool)
        for row, image_id in enumerate(ids.tolist()):
            first = self._first.setdefault(_digest(vectors[row]), image_id)
            if first != image_id:
                self._copies.append((image_id, first))
                keep[row] = False
        if keep.any():
            self.index.add_with_ids(vectors[keep], ids[keep])

    def table(self) -> np.ndarray:
        """The copies as an int64 [n, 2] table (id, representative), by id."""
        table = np.array(self._copies, np.int64).reshape(-1, 2)
        return table[np.argsort(table[:, 0], kind="stable")]


def _digest(vector: np.ndarray) -> bytes:
    return hashlib.blake2b(vector.data, digest_size=16).digest()


class Copies:
    """An index directory's copies table, for searches to hand copies out."""

    def __init__(self, table: np.ndarray | None = None):
        table = np.zeros((0, 2), np.int64) if table is None else table
        self.ids = np.ascontiguousarray(table[:, 0])
        self.of = np.ascontiguousarray(table[:, 1])
        order = np.argsort(self.of, kind="stable")
        self._reps = self.of[order]  # sorted, one entry per copy
        self._members = self.ids[order]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def read(cls, f: BinaryIO, expected: int | None, where: str) -> Copies:
        """Read a copies table from ``f`` (``expected`` rows, if given);
        ValueError names what is wrong.

        The header is checked against the file's size before the data are
        read: numpy allocates what a header claims, and a crafted one could
        claim terabytes.
        """
        try:
            version = npy.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy.read_array_header_1_0(f)
            else:
                shape, _, dtype = npy.read_array_header_2_0(f)
            data_at = f.tell()
            size = f.seek(0, os.SEEK_END)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{where} is unreadable ({e})") from None
        if dtype != np.int64 or len(shape) != 2 or shape[1] != 2:
            raise ValueError(f"{where} is not a table of id pairs")
        if expected is not None and shape[0] != expected:
            raise ValueError(f"{where} lists {shape[0]} copies, meta.json {expected}")
        if size - data_at != shape[0] * 16:
            raise ValueError(
                f"{where} has {size} bytes, not the size of {shape[0]} copies"
            )
        try:
            f.seek(0)
            return cls(np.load(f, allow_pickle=False))
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{where} is unreadable ({e})") from None

    def check(self, held: np.ndarray, listed: np.ndarray) -> str | None:
        """Why these copies do not fit an index holding ``held`` (sorted) and a
        manifest listing ``listed`` (sorted), or None."""
        if not len(self):
            return None
        if np.isin(self.ids, held).any():
            return "an image is both stored and listed as a copy"
        if not np.isin(self.of, held).all():
            return "a copy's original is not in the index"
        if not np.isin(self.ids, listed).all():
            return "a copy is not in the manifest"
        return None

    def stored_ids(self, ids: np.ndarray) -> np.ndarray:
        """The id whose vector the index holds for each of ``ids``."""
        ids = np.asarray(ids, np.int64)
        if not len(self):
            return ids
        rows = rows_in_sorted(self.ids, ids)
        return np.where(rows >= 0, self.of[rows], ids)

    def search(self, index, queries: np.ndarray, k: int):
        """Top-``k`` (scores, ids) per query over ``index`` and these copies."""
        from imgindex.pipeline.index import search

        return self.expand(*search(index, queries, k), k)

    def expand(
        self, scores: np.ndarray, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each found id followed by its copies (same score), ``k`` per query
        (ids -1 past the last image).

        The top ``k`` of distinct vectors, so expanded, is the top ``k`` of
        all images: a copy scores exactly what its representative does.
        """
        if not len(self):
            return scores, ids
        lo = np.searchsorted(self._reps, ids, side="left").tolist()
        hi = np.searchsorted(self._reps, ids, side="right").tolist()
        out_s = np.full((len(ids), k), -np.inf, np.float32)
        out_i = np.full((len(ids), k), -1, np.int64)
        rows = zip(scores.tolist(), ids.tolist(), lo, hi, strict=True)
        for q, (row_s, row_i, row_lo, row_hi) in enumerate(rows):
            n = 0
            for s, i, a, b in zip(row_s, row_i, row_lo, row_hi, strict=True):
                if i < 0 or n >= k:
                    break
                group = [i, *self._members[a:b][: k - n - 1].tolist()]
                out_s[q, n : n + len(group)] = s
                out_i[q, n : n + len(group)] = group
                n += len(group)
        return out_s, out_i


def folder_copies(folder: str | os.PathLike) -> Copies:
    """The copies table in an index folder (empty where there is none).

    Raises
    ------
    ValueError
        If the file is there and is not a copies table.
    """
    path = Path(folder) / COPIES_FILE
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return Copies()
    with f:
        return Copies.read(f, None, str(path))
