"""FAISS indexes: which kind to build (policy), apart from the FAISS calls."""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

import numpy as np

# Above this many vectors an exact Flat index (5 KB a vector at 1280-d, and
# linear search time) gives way to HNSW, which searches in log time.
FLAT_MAX = 1_000_000


def choose_index_key(n_vectors: int, dim: int, flat_max: int = FLAT_MAX) -> str:
    """Return the FAISS factory key for an index of ``n_vectors`` of ``dim``.

    Cosine similarity on L2-normalised vectors is inner product, so every
    choice uses METRIC_INNER_PRODUCT. Both choices support reconstruct(),
    which incremental builds use to keep unchanged vectors.
    """
    if n_vectors <= flat_max:
        return "IDMap2,Flat"
    return "IDMap2,HNSW32,Flat"


def build_index(ids: np.ndarray, vectors: np.ndarray, key: str | None = None):
    """Build an inner-product FAISS index holding ``vectors`` under int64 ``ids``."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    dim = vectors.shape[1]
    key = key or choose_index_key(len(ids), dim)
    index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    if len(ids):
        index.add_with_ids(vectors, ids)
    return index


def reserve(index, n_vectors: int) -> None:
    """Make room for ``n_vectors`` in a Flat index before adding to it.

    FAISS grows a Flat index's storage like a std::vector, by doubling, so
    while it copies, the old and the new buffer are both alive: a build's peak
    was up to ~1.5x its vectors (bench/client_memory.py). Growing the storage
    to its final size once and shrinking it back keeps the capacity, so adds
    never reallocate. Other index types are left alone.
    """
    import faiss

    inner = faiss.downcast_index(getattr(index, "index", index))
    if not isinstance(inner, faiss.IndexFlat):
        return
    codes = inner.codes
    current = codes.size()
    wanted = n_vectors * inner.code_size
    if wanted > current:
        codes.resize(wanted)
        codes.resize(current)


def reconstruct(index, ids: np.ndarray) -> np.ndarray:
    """Return the stored vectors of ``ids`` (all must be present), float32 [n, d]."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros((0, index.d), np.float32)
    return index.reconstruct_batch(ids)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query row; ids are -1 where the index has fewer."""
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def write_index(index, path: str | os.PathLike) -> None:
    """Write through a Python file: FAISS's own open() rejects non-UTF-8 paths."""
    import faiss

    with open(path, "wb") as f:
        writer = faiss.PyCallbackIOWriter(f.write)
        faiss.write_index(index, writer)
        del writer  # flushes its buffer into f


def read_index(f: BinaryIO):
    """Read an index from an open binary file (any path, see :func:`write_index`)."""
    import faiss

    reader = faiss.PyCallbackIOReader(f.read)
    try:
        return faiss.read_index(reader)
    finally:
        del reader


def check_index_file(f: BinaryIO, count: int, dim: int) -> str | None:
    """Why the index file ``f`` cannot hold ``count`` vectors of ``dim``, or None.

    FAISS allocates whatever sizes a file's header claims before reading the
    data, so a crafted 1 KB file can make it allocate gigabytes: the headers
    are checked against meta.json and the file's size first. ``IDMap2,Flat``
    (the default) is checked field by field; other types by their outer
    header and a lower bound on size.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    head = f.read(_HEADER + 4 + _HEADER)
    f.seek(0)
    if len(head) < _HEADER:
        return f"{size} bytes, too short for a FAISS index"
    fourcc, d, ntotal = struct.unpack_from("<4siq", head, 0)
    if d != dim or ntotal != count:
        return f"it holds {ntotal} vectors of {d}-d, meta.json says {count} of {dim}-d"
    payload = count * dim * 4
    if fourcc == b"IxM2" and head[_HEADER : _HEADER + 4] in _FLAT:
        # header, inner header, codes (u64 length in floats + data), ids
        expected = 2 * _HEADER + 8 + payload + 8 + 8 * count
        if size != expected:
            return f"{size} bytes where {expected} were expected (truncated?)"
        (n_codes,) = struct.unpack_from("<Q", _read_at(f, 2 * _HEADER, 8))
        (n_ids,) = struct.unpack_from("<Q", _read_at(f, size - 8 * count - 8, 8))
        if n_codes != count * dim or n_ids != count:
            return "its vector and id tables disagree with its header"
    elif size < payload:
        return f"{size} bytes, too small for {count} vectors (truncated?)"
    return None


# fourcc, d (i32), ntotal (i64), 2 x i64, is_trained (u8), metric (i32)
_HEADER = 4 + 4 + 8 + 8 + 8 + 1 + 4
_FLAT = (b"IxFI", b"IxF2", b"IxFl")


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    f.seek(0)
    return data
