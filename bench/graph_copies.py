"""HNSW recall with byte-identical copies: every copy a node, or each vector once.

Builds ``--index-type hnsw`` over 3,000 clustered 32-d vectors in three
collections (5 copies of each of 600 vectors, 50 of each of 60, and one
vector copied 1,000 times among 2,001 others) through imgindex's own reindex
(in this process: no cluster), once as imgindex builds it (each distinct
vector once, pipeline/copies.py) and once with every copy added as a node,
and prints the recall@10 the build's tuning reached and at which efSearch.
The table "Identical images in a graph" (docs/guide/index-types.md) comes
from this script.

    python bench/graph_copies.py
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import dask.config
import numpy as np

import imgindex.pipeline.index_build as index_build
from imgindex.pipeline import index as fx
from imgindex.pipeline.assemble import IndexRequest
from imgindex.pipeline.copies import DistinctAdder
from imgindex.pipeline.discover import ImageRecord
from imgindex.pipeline.reindex import reindex
from imgindex.pipeline.synthetic import write_vector_index

DIM = 32


class EveryRow:
    """The add before pipeline/copies.py: every copy becomes a node."""

    def __init__(self, index, copies: np.ndarray | None = None):
        self.index = index

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)

    def table(self) -> np.ndarray:
        return np.zeros((0, 2), np.int64)


def clustered(n: int, seed: int = 0, centres: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, DIM))
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def collections() -> dict[str, np.ndarray]:
    one = clustered(3_000)
    one[:1_000] = one[0]
    return {
        "600 vectors, 5 copies each": np.repeat(clustered(600), 5, axis=0),
        "60 vectors, 50 copies each": np.repeat(clustered(60), 50, axis=0),
        "3,000, one of them copied 1,000 times": one,
    }


def index_dir(dest: Path, vectors: np.ndarray) -> Path:
    n = len(vectors)
    records = [ImageRecord(f"img/{i:06d}.jpg", 1000 + i, 7) for i in range(n)]
    ids = np.array([r.id for r in records], np.int64)
    chunks = ((records[s : s + 250], vectors[s : s + 250]) for s in range(0, n, 250))
    return write_vector_index(dest, chunks, DIM, fx.build_index(ids, vectors), "bench")


def measured(vectors: np.ndarray, adder: type) -> str:
    index_build.DistinctAdder = adder
    with tempfile.TemporaryDirectory() as tmp:
        dest = index_dir(Path(tmp) / "vectors", vectors)
        with dask.config.set({"imgindex.index.type": "hnsw"}):
            summary = reindex(dest, IndexRequest.from_config(), None)
    q = summary["quality"]
    setting = summary["search_params"]["efSearch"]
    missed = "" if q["reached"] else f", under the {q['target']} target"
    return f"{q['recall_at_k']:.3f} at `efSearch` {setting}{missed}"


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    print("| collection | every copy a node | each distinct vector once |")
    print("| --- | --- | --- |")
    for name, vectors in collections().items():
        every = measured(vectors, EveryRow)
        once = measured(vectors, DistinctAdder)
        print(f"| {name} | {every} | {once} |", flush=True)


if __name__ == "__main__":
    main()
