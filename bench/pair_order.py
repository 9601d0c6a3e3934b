"""The order of `imgindex duplicates`' candidate pairs: images read, and time.

    python bench/pair_order.py INDEX_DIR     # an index `imgindex build` wrote

The candidate pairs are each image's 16 nearest neighbours at cosine 0.5 or
more (the defaults), from the index's own vectors. They are checked as
`duplicates` checks them (pipeline.duplicates.verify_pairs, tasks of 500
pairs) in one process, in two orders: sorted by path (the reference, as
before) and pipeline.pair_order.local_order, a task of each in turn so that
both see the same machine. Printed: images read and seconds of each, and
their ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

NEIGHBOURS, THRESHOLD, PER_TASK = 16, 0.5, 500


def candidate_pairs(index_dir: Path) -> tuple[list[str], np.ndarray]:
    """The index's paths, and its candidate pairs as rows of (a, b), a < b."""
    import faiss

    import imgindex

    index = imgindex.open(index_dir)
    paths = index.manifest()["path"].tolist()
    vectors = np.ascontiguousarray(index.vectors().compute(), np.float32)
    faiss.normalize_L2(vectors)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    scores, found = flat.search(vectors, NEIGHBOURS + 1)
    rows = np.repeat(np.arange(len(vectors)), NEIGHBOURS + 1)
    keep = (
        (scores.ravel() >= THRESHOLD) & (found.ravel() != rows) & (found.ravel() >= 0)
    )
    a, b = rows[keep], found.ravel()[keep]
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0)
    return paths, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("index_dir", type=Path)
    args = parser.parse_args()

    from imgindex.pipeline import duplicates
    from imgindex.pipeline.pair_order import local_order
    from imgindex.pipeline.sources import source_of
    from imgindex.pipeline.store import read_index_dir

    source = source_of(read_index_dir(args.index_dir).meta)
    paths, pairs = candidate_pairs(args.index_dir)
    by_path = sorted(
        range(len(pairs)), key=lambda i: (paths[pairs[i, 0]], paths[pairs[i, 1]])
    )
    orders = {
        "by path": by_path,
        "local": local_order(pairs[:, 0], pairs[:, 1]).tolist(),
    }
    reads = dict.fromkeys(orders, 0)
    seconds = dict.fromkeys(orders, 0.0)
    seen = duplicates.seen
    for start in range(0, len(pairs), PER_TASK):
        for name, order in orders.items():
            task = [
                (paths[pairs[i, 0]], paths[pairs[i, 1]])
                for i in order[start : start + PER_TASK]
            ]

            def counted(*args, name=name):
                reads[name] += 1
                return seen(*args)

            duplicates.seen = counted
            began = time.perf_counter()
            duplicates.verify_pairs(source, task)
            seconds[name] += time.perf_counter() - began
    duplicates.seen = seen
    print(
        f"{len(pairs):,} candidate pairs of {len(paths):,} images, tasks of {PER_TASK}:"
    )
    print("| order | images read | seconds (one thread) |")
    print("| --- | ---: | ---: |")
    for name in orders:
        print(f"| {name} | {reads[name]:,} | {seconds[name]:.1f} |")
    print(
        f"local / by path: reads {reads['local'] / reads['by path']:.2f}, "
        f"time {seconds['local'] / seconds['by path']:.2f}"
    )


if __name__ == "__main__":
    main()
