"""Search an index directory with query images, embedded exactly as at build time."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import index as faiss_index
from pipeline.embed import Embedder, ModelSpec
from pipeline.errors import DecodeError, ImgindexError
from pipeline.store import StoredIndex, read_index_dir


@dataclass(frozen=True)
class Hit:
    rank: int
    path: str  # absolute path of the indexed image
    score: float  # cosine similarity, higher = more similar

    def to_json(self) -> dict:
        return {"rank": self.rank, "path": self.path, "score": round(self.score, 6)}


class Searcher:
    """An index directory opened for repeated queries (model loaded once)."""

    def __init__(self, index_dir: str | os.PathLike, device: str = "cpu"):
        self.stored: StoredIndex = read_index_dir(index_dir)
        # Read now, from the handles opened with the manifest: a build may swap
        # in a newer version while the model loads. An on-disk index is mapped,
        # not read: only the lists a query probes are paged in.
        self.index = self.stored.index
        meta = self.stored.meta
        # Tuned at build time to reach the recall target (meta.quality).
        faiss_index.set_search_params(self.index, meta.search_params)
        self.embedder = Embedder(ModelSpec.from_config(meta.model, device))
        if self.embedder.dim != meta.dim:
            raise ImgindexError(
                f"model {meta.model!r} gives {self.embedder.dim}-d vectors but the "
                f"index holds {meta.dim}-d ones; rebuild it with "
                "`imgindex build --rebuild`"
            )
        self.root = Path(meta.source)
        self.paths = self.stored.paths_by_id()

    def search_images(
        self, images: Sequence[str | os.PathLike], k: int = 10, batch: int = 64
    ) -> list[list[Hit]]:
        """Top-``k`` hits for each query image file, in order.

        Queries are decoded, embedded and searched ``batch`` at a time, so
        thousands of them need the memory of one batch (plus the results).

        Raises
        ------
        DecodeError
            Naming the query file that could not be read.
        """
        hits: list[list[Hit]] = []
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            pixels = [self.embedder.decode(os.fspath(p)) for p in chunk]
            hits.extend(self.search_vectors(self.embedder.embed_pixels(pixels), k))
        return hits

    def search_vectors(self, queries, k: int = 10) -> list[list[Hit]]:
        scores, ids = faiss_index.search(self.index, queries, k)
        return [
            [
                Hit(rank, str(self.root / self.paths[int(i)]), float(s))
                for rank, (s, i) in enumerate(zip(row_s, row_i, strict=True), start=1)
                if i >= 0
            ]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]


def search_images(
    index_dir: str | os.PathLike, images: list[str | os.PathLike], k: int = 10
) -> list[list[Hit]]:
    """Open ``index_dir`` and return the top-``k`` hits for each query image."""
    return Searcher(index_dir).search_images(images, k)


__all__ = ["DecodeError", "Hit", "Searcher", "search_images"]
