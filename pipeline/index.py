"""FAISS indexes: which kind to build (policy), apart from the FAISS calls."""

from __future__ import annotations

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


def write_index(index, path: str) -> None:
    import faiss

    faiss.write_index(index, path)


def read_index(path: str):
    import faiss

    return faiss.read_index(path)
