"""FAISS mechanics: make, fill, read, write, tune and check indexes.

Which index to build is decided in :mod:`pipeline.index_policy`; this module
only carries it out. Cosine similarity on L2-normalised vectors is inner
product, so every index uses METRIC_INNER_PRODUCT.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np

# FAISS's default of 40 builds a graph that strands images lying apart from the
# rest: on 100,000 embeddings, cropped copies of such photos found 70 % of
# their exact top-10 at efSearch 64; 98 % with 100, for 1.4x the build time
# (bench/serve_latency.py's index; 200 gave 99 % for 3.5x).
HNSW_EF_CONSTRUCTION = 100


def new_index(key: str, dim: int):
    """An empty inner-product index from the factory string ``key``.

    Raises
    ------
    ValueError
        If FAISS does not understand ``key`` (one line, naming it).
    """
    import faiss

    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(
            f"FAISS cannot build {key!r} for {dim}-d vectors ({faiss_reason(e)})"
        ) from None
    # Polysemous training orders PQ codes for Hamming pre-filtering, which
    # search never uses; it was 95% of an IVF-PQ's training time (40 of 42 s
    # for 2,000 vectors).
    ivf = ivf_of(index)
    inner = faiss.downcast_index(ivf if ivf is not None else index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False
    graph = faiss.downcast_index(getattr(index, "index", index))
    if isinstance(graph, faiss.IndexHNSW):
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def faiss_reason(e: Exception) -> str:
    """The useful last words of a FAISS RuntimeError, which may span lines and
    begins with the C++ function and source line that threw it, then the
    assertion that failed: "could not parse index string IVF" of
    "Error in std::unique_ptr<faiss::Index> faiss::...(int, ...) at
    /project/faiss/index_factory.cpp:1228: could not parse index string IVF"."""
    last = str(e).strip().splitlines()[-1]
    last = re.sub(r"^Error in .*? at \S+:\d+: ", "", last)
    last = re.sub(r"^Error: '.*?' failed: ", "", last)
    return last[:160]


def build_index(ids: np.ndarray, vectors: np.ndarray, key: str = "IDMap2,Flat"):
    """Build an inner-product FAISS index holding ``vectors`` under int64 ``ids``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    index = new_index(key, vectors.shape[1])
    if len(ids):
        index.add_with_ids(vectors, ids)
    return index


def empty_copy(index):
    """A trained index like ``index`` holding no vectors (quantizers kept).

    Works for in-memory and on-disk IVF indexes alike: the inverted lists are
    replaced, never cleared in place (clearing on-disk lists would write).
    """
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        raise ValueError("only IVF indexes can be emptied and refilled") from None
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    ivf.ntotal = 0
    index.ntotal = 0
    return index


def ivf_of(index):
    """The IndexIVF inside ``index`` (under OPQ/PCA transforms), or None."""
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def index_ids(index) -> np.ndarray | None:
    """Every id ``index`` holds (unsorted); None where they cannot be listed cheaply.

    On-disk inverted lists are not read (that would touch the whole file).
    """
    import faiss

    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map)
    ivf = ivf_of(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(lists, faiss.OnDiskInvertedLists):
        return None
    chunks = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(lists.nlist)
        if lists.list_size(i)
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)


def stored_vectors(
    index, chunk: int = 16_384
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (ids, vectors) an in-memory index with an id map holds, in chunks."""
    ids = index_ids(index)
    assert ids is not None, "stored_vectors needs an in-memory index"
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        yield part, reconstruct(index, part)


def merge_in_memory(parts: Iterable) -> object:
    """Merge IVF indexes sharing one trained quantizer into the first; ids kept.

    ``parts`` may be a generator that reads each part as it is needed: a
    merged part's lists are emptied, so the peak is the result plus one part.
    """
    parts = iter(parts)
    base = next(parts)
    base_ivf = ivf_of(base)
    for other in parts:
        base_ivf.merge_from(ivf_of(other), 0)
        del other
    base.ntotal = base_ivf.ntotal
    return base


def remove_ids(index, ids: np.ndarray) -> int:
    """Remove ``ids`` from an in-memory index; returns how many were held.

    Not for on-disk inverted lists: in faiss-cpu 1.15.1 ``remove_ids`` on
    OnDiskInvertedLists leaves garbage ids behind (see :func:`copy_lists`).
    """
    import faiss

    if not len(ids):
        return 0
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    return int(index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))


def to_disk_lists(index, path: str | os.PathLike) -> None:
    """Give an empty IVF ``index`` on-disk inverted lists stored in ``path``."""
    import faiss

    ivf = ivf_of(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, os.fspath(path))
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now


def copy_lists(index, source, drop: np.ndarray | None = None) -> int:
    """Append ``source``'s encoded entries to ``index``'s lists, except ids in ``drop``.

    Both share one trained quantizer; the codes are copied as they are, list
    by list, so nothing is encoded again and ``source`` may be a mapped
    on-disk index far larger than memory. Returns the entries copied.
    """
    import faiss

    dst, src = ivf_of(index), ivf_of(source)
    width = dst.code_size
    drop = np.asarray(drop if drop is not None else (), np.int64)
    copied = 0
    for ls in range(src.nlist):
        n = src.invlists.list_size(ls)
        if not n:
            continue
        ids = faiss.rev_swig_ptr(src.invlists.get_ids(ls), n)
        codes = faiss.rev_swig_ptr(src.invlists.get_codes(ls), n * width)
        if len(drop):
            keep = ~np.isin(ids, drop)
            ids = ids[keep]
            codes = codes.reshape(n, width)[keep]
        ids, codes = np.ascontiguousarray(ids), np.ascontiguousarray(codes)
        if len(ids):
            dst.invlists.add_entries(
                ls, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes)
            )
            copied += len(ids)
    dst.ntotal += copied
    index.ntotal = dst.ntotal
    return copied


def set_search_params(index, params: dict[str, int | float]) -> None:
    """Apply search-time parameters (``nprobe``, ``efSearch``) through any wrapper."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def is_graph(index) -> bool:
    """True for an HNSW index (under an id map): one that stores exact copies
    once (:mod:`pipeline.copies`)."""
    import faiss

    inner = faiss.downcast_index(getattr(index, "index", index))
    return isinstance(inner, faiss.IndexHNSW)


def scores_exactly(index) -> bool:
    """True where a search's scores are exact inner products: the index keeps
    whole float32 vectors and transforms none (Flat, HNSW-Flat, IVF-Flat)."""
    import faiss

    outer = faiss.downcast_index(index)
    inner = outer
    if isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(outer.index)
    return isinstance(inner, faiss.IndexFlat | faiss.IndexHNSWFlat | faiss.IndexIVFFlat)


def search_param_name(index) -> str | None:
    """The parameter trading speed for recall in ``index``, or None (exact)."""
    if ivf_of(index) is not None:
        return "nprobe"
    return "efSearch" if is_graph(index) else None


def serialize(index) -> np.ndarray:
    """The index as a uint8 array (Dask ships it as one buffer)."""
    import faiss

    return faiss.serialize_index(index)


def deserialize(data: np.ndarray):
    import faiss

    return faiss.deserialize_index(np.asarray(data, np.uint8))


def read_index_at(path: str | os.PathLike, on_disk: bool):
    """Read the index file at ``path``; on-disk inverted lists are mapped, not read.

    An on-disk index names its ``.ivfdata`` file; IO_FLAG_ONDISK_SAME_DIR
    looks for it beside ``path`` (so an index directory can be moved) and
    READ_ONLY maps it read-only (FAISS opens it for writing otherwise, which
    fails on a read-only share). IO_FLAG_MMAP is not used: searching such an
    index segfaults in faiss-cpu 1.15.1 (../shared/DASK-NOTES.md).
    """
    import faiss

    if not on_disk:
        with open(path, "rb") as f:
            return read_index(f)
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    with stdout_silenced():  # FAISS printf()s the file name it maps
        return faiss.read_index(os.fspath(path), flags)


@contextlib.contextmanager
def stdout_silenced() -> Iterator[None]:
    """Send C-level stdout to /dev/null: `search --json` output must stay JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


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


def check_index_file(
    f: BinaryIO, count: int, dim: int, kind: str = "flat", extra_bytes: int = 0
) -> str | None:
    """Why the index file ``f`` cannot hold ``count`` vectors of ``dim``, or None.

    FAISS allocates whatever sizes a file's header claims before reading the
    data, so a crafted 1 KB file can make it allocate gigabytes: the headers
    are checked against meta.json and the file's size first. ``IDMap2,Flat``
    is checked field by field; other kinds by their outer header and a lower
    bound on their size (``extra_bytes``: an on-disk index's .ivfdata).
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
        return None
    # Every kind keeps an 8-byte id per vector; these also keep whole vectors.
    least = count * 8 + (payload if kind in ("flat", "hnsw", "ivf-flat") else 0)
    if size + extra_bytes < least:
        return f"{size + extra_bytes} bytes, too small for {count} vectors (truncated?)"
    return None


# fourcc, d (i32), ntotal (i64), 2 x i64, is_trained (u8), metric (i32)
_HEADER = 4 + 4 + 8 + 8 + 8 + 1 + 4
_FLAT = (b"IxFI", b"IxF2", b"IxFl")


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    f.seek(0)
    return data
