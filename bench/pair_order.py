"""`imgindex duplicates`' geometric check of candidate pairs: images read, time, memory.

    python bench/pair_order.py INDEX_DIR     # an index `imgindex build` wrote

The candidate pairs are each image's 16 nearest neighbours at cosine 0.5 or
more (the defaults), from the index's own vectors. They are checked as
`duplicates` checks them (pipeline.duplicates.verify_pairs) in one process,
three ways:

- by path: pairs sorted by path, tasks of 500 pairs keeping the last 256
  images read whole (the reference: how it was first done);
- local: in pipeline.pair_order.local_order, tasks of 500 keeping 256 whole;
- now: local order, tasks as `duplicates` makes them for a cluster of
  --threads threads (pipeline.duplicates.verify_task_size), keeping the
  features of the last 1,024 images and the grey pixels of the last 64.

Chunk by chunk of the largest task, each way checks the chunk's pairs in
turn, so that all see the same machine. Printed: images read (and read again
for their pixels), seconds (one thread), the largest memory a task held
(tracemalloc, in a separate pass over each way's first task: it slows
Python), and how many pairs' verdicts differ between the ways (none should).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

NEIGHBOURS, THRESHOLD, BEFORE = 16, 0.5, (500, 256, 256)


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
    parser.add_argument("--threads", type=int, default=2)
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
    local = local_order(pairs[:, 0], pairs[:, 1]).tolist()
    size = duplicates.verify_task_size(
        len(pairs), args.threads, duplicates.DuplicateSettings().pairs_per_task
    )
    kept = (duplicates._KEPT_FEATURES, duplicates._KEPT_PIXELS)
    ways = {  # order, pairs a task, images' features kept, of them whole
        "by path": (by_path, *BEFORE),
        "local": (local, *BEFORE),
        "now": (local, size, *kept),
    }
    chunk = max(way[1] for way in ways.values())
    reads = dict.fromkeys(ways, 0)
    again = dict.fromkeys(ways, 0)
    seconds = dict.fromkeys(ways, 0.0)
    peak = dict.fromkeys(ways, 0)
    verdicts = {name: [None] * len(pairs) for name in ways}
    seen, grey_again = duplicates.seen, duplicates._grey_again

    def check(name: str, start: int, span: int) -> None:
        order, per_task, features, whole = ways[name]
        duplicates._KEPT_FEATURES, duplicates._KEPT_PIXELS = features, whole

        def counted(*args):
            reads[name] += 1
            return seen(*args)

        def counted_again(*args):
            again[name] += 1
            return grey_again(*args)

        duplicates.seen, duplicates._grey_again = counted, counted_again
        end = min(start + span, len(pairs))
        for task in range(start, end, per_task):
            rows = order[task : min(task + per_task, end)]
            found = duplicates.verify_pairs(
                source, [(paths[pairs[i, 0]], paths[pairs[i, 1]]) for i in rows]
            )
            for i, checked in zip(rows, found, strict=True):
                verdicts[name][i] = None if checked is None else checked.kind

    for start in range(0, len(pairs), chunk):
        for name in ways:
            began = time.perf_counter()
            check(name, start, chunk)
            seconds[name] += time.perf_counter() - began
    counts = dict(reads), dict(again)
    for name, (_, per_task, *_) in ways.items():
        tracemalloc.start()
        check(name, 0, per_task)  # its first task alone
        peak[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    reads, again = counts
    duplicates.seen, duplicates._grey_again = seen, grey_again
    duplicates._KEPT_FEATURES, duplicates._KEPT_PIXELS = kept
    print(
        f"{len(pairs):,} candidate pairs of {len(paths):,} images; "
        f"tasks of {size} for {args.threads} threads:"
    )
    print(
        "| way | pairs a task | features kept / of them whole | images read "
        "(again for pixels) | seconds (one thread) | a task's peak memory |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (_, per_task, features, whole) in ways.items():
        print(
            f"| {name} | {per_task:,} | {features:,} / {whole:,} | "
            f"{reads[name]:,} ({again[name]:,}) | {seconds[name]:.1f} | "
            f"{peak[name] / 2**20:.0f} MiB |"
        )
    differ = sum(len({v[i] for v in verdicts.values()}) > 1 for i in range(len(pairs)))
    called = {k: verdicts["now"].count(k) for k in ("copy", "shot", None)}
    print(f"pairs whose verdict differs between the ways: {differ} (now: {called})")
    for name in ("local", "now"):
        print(
            f"{name} / by path: reads {reads[name] / reads['by path']:.2f}, "
            f"time {seconds[name] / seconds['by path']:.2f}"
        )


if __name__ == "__main__":
    main()
