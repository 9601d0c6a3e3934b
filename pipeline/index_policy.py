"""Which FAISS index to build for a set of vectors: the policy, apart from FAISS.

``choose_index`` turns (vectors, dimension, memory budget, requested type) into
a factory string and the facts the build needs about it (does it train, on how
many vectors, is it merged on disk), with one line saying why. Nothing here
imports FAISS, so the choice is testable and explainable on its own; the
mechanics live in :mod:`pipeline.index` and :mod:`pipeline.index_build`.

Bytes per vector (d = dimension, float32):

============  ==============================  ================================
kind          factory string                  bytes per vector (estimate)
============  ==============================  ================================
flat          ``IDMap2,Flat``                 4d + 16 (vector, id, reverse map)
hnsw          ``IDMap2,HNSW32,Flat``          4d + 16 + 2*32*4*1.1 (links)
ivf-flat      ``IVF{nlist},Flat``             4d + 8 (code, id)
ivf-pq        ``OPQ{m}_{4m},IVF{nlist},PQ{m}``  m + 8
============  ==============================  ================================

The estimates were checked against FAISS's serialized sizes in
tests/test_index.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imgindex.pipeline.words import counted

KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")

# The FAISS wiki's guidance: train k-means on 30*nlist to 256*nlist vectors;
# fewer than 39*nlist makes FAISS warn that clustering is poor.
TRAIN_PER_LIST = 64
MIN_TRAIN_PER_LIST = 39
# Beyond this, training time grows without better lists, except that the
# sample never drops under MIN_TRAIN_PER_LIST*nlist (32,768 lists: 1.3 M).
MAX_TRAIN = 500_000
PQ_TRAIN = 65_536  # a PQ codebook (256 centroids per sub-quantizer) needs ~256*256
PQ_CHOICES = (128, 96, 64, 48, 32, 16, 8)  # sub-quantizers, most accurate first


@dataclass(frozen=True)
class Thresholds:
    """Where ``auto`` switches kind (dask config ``imgindex.index.*``)."""

    flat_max: int = 200_000  # exact search scans every vector per query
    hnsw_max: int = 500_000  # HNSW builds on one machine and cannot be merged


@dataclass(frozen=True)
class IndexChoice:
    """A decided index: what FAISS builds, and how."""

    key: str  # FAISS factory string (inner-product metric)
    kind: str  # flat | hnsw | ivf-flat | ivf-pq | custom
    reason: str  # one line, shown to the user
    bytes_estimate: int  # the index in memory, all vectors added
    train_size: int  # vectors to train on; 0 = needs no training
    on_disk: bool  # inverted lists merged into index.ivfdata, not held in RAM

    @property
    def trains(self) -> bool:
        return self.train_size > 0

    @property
    def is_ivf(self) -> bool:
        return self.kind in ("ivf-flat", "ivf-pq") or (
            self.kind == "custom" and _is_ivf_key(self.key)
        )

    @property
    def is_graph(self) -> bool:
        """An HNSW graph (not an IVF's coarse quantizer): grown, never merged."""
        return not self.is_ivf and any(
            part.startswith("HNSW") for part in self.key.split(",")
        )


def choose_index(
    n_vectors: int,
    dim: int,
    index_type: str = "auto",
    max_memory: int | None = None,
    *,
    thresholds: Thresholds = Thresholds(),  # noqa: B008 - frozen, shared safely
    on_disk: bool | None = None,
) -> IndexChoice:
    """Decide the index for ``n_vectors`` of ``dim`` under ``max_memory`` bytes.

    ``index_type`` is one of :data:`KINDS` or any FAISS factory string (used
    as given, IDMap2-wrapped when it cannot hold ids itself). ``on_disk``:
    None = on disk exactly when an IVF index would not fit ``max_memory``.

    Raises
    ------
    ValueError
        If ``index_type`` is a kind that cannot be built for these vectors.
    """
    budget = max_memory if max_memory and max_memory > 0 else None
    kind = index_type.strip().lower()
    if kind not in KINDS:
        return _custom(index_type.strip(), n_vectors, dim, budget, on_disk)
    flat = _flat_bytes(n_vectors, dim)
    if kind == "auto":
        kind, why = _auto_kind(n_vectors, dim, budget, thresholds)
    else:
        why = "asked for"
    if kind == "flat":
        return IndexChoice(
            "IDMap2,Flat", "flat", f"Flat (exact search): {why}", flat, 0, False
        )
    if kind == "hnsw":
        return IndexChoice(
            "IDMap2,HNSW32,Flat",
            "hnsw",
            f"HNSW32 (graph, log-time search): {why}",
            _hnsw_bytes(n_vectors, dim),
            0,
            False,
        )
    nlist = ivf_lists(n_vectors)
    if kind == "ivf-flat":
        size = n_vectors * (4 * dim + 8) + nlist * dim * 4
        train = _train_size(n_vectors, nlist)
        return IndexChoice(
            f"IVF{nlist},Flat",
            "ivf-flat",
            f"IVF{nlist},Flat: {why}",
            size,
            train,
            _on_disk(on_disk, size, budget),
        )
    m = pq_size(n_vectors, dim, budget, nlist)
    d_out = min(dim, 4 * m)
    size = n_vectors * (m + 8) + nlist * d_out * 4 + d_out * dim * 4
    train = min(n_vectors, max(_train_size(n_vectors, nlist), PQ_TRAIN))
    return IndexChoice(
        f"OPQ{m}_{d_out},IVF{nlist},PQ{m}",
        "ivf-pq",
        f"OPQ{m}_{d_out},IVF{nlist},PQ{m} ({m + 8} B a vector): {why}",
        size,
        train,
        _on_disk(on_disk, size, budget),
    )


def ivf_lists(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors``: ~4*sqrt(n), a power of two, trainable."""
    if n_vectors <= 0:
        return 1
    wanted = 4 * math.sqrt(n_vectors)
    nlist = 2 ** max(0, round(math.log2(wanted)))
    while nlist > 1 and nlist * MIN_TRAIN_PER_LIST > n_vectors:
        nlist //= 2
    return nlist


def pq_size(n_vectors: int, dim: int, budget: int | None, nlist: int) -> int:
    """Sub-quantizers: the most that fit ``budget``; 64 when there is none."""
    fitting = [m for m in PQ_CHOICES if 4 * m <= max(dim, 8)]
    if budget is None:
        return next(m for m in fitting if m <= 64)
    for m in fitting:
        d_out = min(dim, 4 * m)
        if n_vectors * (m + 8) + nlist * d_out * 4 + d_out * dim * 4 <= budget:
            return m
    return fitting[-1]


def _auto_kind(n: int, dim: int, budget: int | None, t: Thresholds) -> tuple[str, str]:
    flat = _flat_bytes(n, dim)
    fits = _fits(budget)
    if n <= t.flat_max and fits(flat):
        return "flat", (
            f"{counted(n, 'vector')} <= imgindex.index.flat-max ({t.flat_max:,}), "
            f"{_size(flat)} fits the memory budget{_of(budget)}"
        )
    hnsw = _hnsw_bytes(n, dim)
    if n <= t.hnsw_max and fits(hnsw):
        return "hnsw", (
            f"{counted(n, 'vector')} <= imgindex.index.hnsw-max ({t.hnsw_max:,}), "
            f"{_size(hnsw)} fits the memory budget{_of(budget)}"
        )
    ivf_flat = n * (4 * dim + 8)
    if fits(ivf_flat):
        return "ivf-flat", (
            f"{n:,} vectors: built and merged on the workers, {_size(ivf_flat)} "
            f"fits the memory budget{_of(budget)}"
        )
    return "ivf-pq", (
        f"{n:,} vectors as full vectors would need {_size(ivf_flat)}, over the "
        f"memory budget{_of(budget)}: compressed"
    )


def _custom(
    key: str, n: int, dim: int, budget: int | None, on_disk: bool | None
) -> IndexChoice:
    if not key:
        raise ValueError("the index type is empty")
    ivf = _is_ivf_key(key)
    if not ivf and not key.startswith("IDMap"):
        key = f"IDMap2,{key}"  # FAISS graph and flat indexes keep no ids themselves
    size = _flat_bytes(n, dim)  # no model of arbitrary strings: assume full vectors
    train = _train_size(n, _nlist_of(key)) if ivf else 0
    return IndexChoice(
        key,
        "custom",
        f"{key}: the factory string asked for",
        size,
        train,
        ivf and _on_disk(on_disk, size, budget),
    )


def _is_ivf_key(key: str) -> bool:
    return any(part.startswith("IVF") for part in key.split(","))


def _nlist_of(key: str) -> int:
    for part in key.split(","):
        if part.startswith("IVF"):
            digits = "".join(c for c in part[3:] if c.isdigit())
            return int(digits) if digits else 1
    return 1


def _train_size(n: int, nlist: int) -> int:
    wanted = max(MIN_TRAIN_PER_LIST * nlist, min(TRAIN_PER_LIST * nlist, MAX_TRAIN))
    return max(1, min(n, wanted))


def _on_disk(asked: bool | None, size: int, budget: int | None) -> bool:
    if asked is not None:
        return asked
    return budget is not None and size > budget


def _flat_bytes(n: int, dim: int) -> int:
    return n * (4 * dim + 16)


def _hnsw_bytes(n: int, dim: int) -> int:
    return int(n * (4 * dim + 16 + 2 * 32 * 4 * 1.1))


def _fits(budget: int | None):
    return lambda size: budget is None or size <= budget


def _of(budget: int | None) -> str:
    return f" ({_size(budget)})" if budget else ""


def _size(n: int | None) -> str:
    n = n or 0
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
