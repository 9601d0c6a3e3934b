"""An incremental build of an HNSW index: grow the graph, or build it again.

N synthetic unit vectors (bench/index_scale.py's mixture) make the previous
version's graph; M more arrive. The reference builds a graph of all N + M
from the shards, as every incremental build of a graph did before; the
grown build reads the previous graph, learns its vectors' digests (to keep
storing byte copies once) and adds the M. Both are timed in this run, with
the same code that `imgindex build` runs (in this process, no cluster), and
each measures its recall and tunes efSearch as a build does.

    python bench/graph_growth.py --n 100000 --m 1000 --work /tmp/growth
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.index_scale import mixture  # noqa: E402 (after the path)

PER_SHARD = 10_000


def write_shards(folder: Path, vectors: np.ndarray, first: int) -> tuple[list, list]:
    """Shards of ``vectors`` (images ``first``...), and their records."""
    from imgindex.pipeline.discover import ImageRecord
    from imgindex.pipeline.embed import ModelSpec
    from imgindex.pipeline.shards import read_shard, write_vectors

    spec = ModelSpec.from_config()
    shards, records = [], []
    for start in range(0, len(vectors), PER_SHARD):
        chunk = [
            ImageRecord(f"v/{i:09d}.jpg", 1, 1)
            for i in range(first + start, first + min(start + PER_SHARD, len(vectors)))
        ]
        rows = vectors[start : start + len(chunk)]
        shards.append(read_shard(write_vectors(folder, spec, chunk, rows, "bench")))
        records.extend(chunk)
    return shards, records


def timed_build(folder: Path, selection, dim: int, choice, append=None) -> dict:
    from imgindex.pipeline.index_build import Runner, build_from_shards

    started = time.perf_counter()
    built = build_from_shards(
        Runner(None), selection, dim, choice, folder, append=append
    )
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "count": built.count,
        "recall": built.quality["recall_at_k"],
        "params": built.search_params,
        "p50_ms": built.quality["p50_ms"],
        "stages": built.task_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="previous graph")
    parser.add_argument("--m", type=int, default=1_000, help="images added")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    from imgindex.pipeline.assemble import select_rows
    from imgindex.pipeline.index_build import Append
    from imgindex.pipeline.index_policy import choose_index
    from imgindex.pipeline.store import INDEX_FILE

    work = args.work or Path(tempfile.mkdtemp(prefix="graph-growth-"))
    work.mkdir(parents=True, exist_ok=True)
    draw = mixture(np.random.default_rng(0), args.dim)
    old_shards, old_records = write_shards(work / "shards", draw(args.n), 0)
    new_shards, new_records = write_shards(work / "shards", draw(args.m), args.n)
    everything, _, _ = select_rows(old_shards + new_shards, old_records + new_records)
    before, _, _ = select_rows(old_shards, old_records)
    added, _, _ = select_rows(new_shards, new_records)
    choice = choose_index(args.n + args.m, args.dim, "hnsw")
    print(f"{choice.key}, {args.n:,} + {args.m:,} vectors of {args.dim}-d", flush=True)

    previous = timed_build(work / "previous", before, args.dim, choice)
    print(f"previous graph of {args.n:,}: {previous}", flush=True)
    rebuilt = timed_build(work / "rebuilt", everything, args.dim, choice)
    print(f"built again from the shards: {rebuilt}", flush=True)
    grow = Append(
        work / "previous" / INDEX_FILE,
        added,
        np.zeros(0, np.int64),
        np.zeros((0, 2), np.int64),
    )
    grown = timed_build(work / "grown", everything, args.dim, choice, grow)
    print(f"grown by {args.m:,}: {grown}", flush=True)
    assert grown["count"] == rebuilt["count"] == args.n + args.m
    print(
        f"grown in {grown['seconds'] / rebuilt['seconds']:.2f} x the time of a "
        f"rebuild; recall@10 {grown['recall']} ({grown['params']}) against "
        f"{rebuilt['recall']} ({rebuilt['params']})"
    )


if __name__ == "__main__":
    main()
