"""`imgindex duplicates` at a million images: time, memory, planted groups found.

N synthetic unit vectors (the two-level mixture of bench/index_scale.py, so
neighbourhoods are uneven like real embeddings) with planted duplicate
groups of 2-5 near-copies (cosine 0.97-0.995 to their first member) are
written as shards; ``imgindex reindex`` builds the auto-chosen index on a
LocalCluster; then ``find_duplicates`` runs on a LocalCluster of 2 one-thread
worker processes with ``--criterion cosine`` (there are no image files for
the geometric check to read). Reported: wall time and stages, peak RSS of
the client process and of the largest worker, and how many planted groups
came out exactly (all members, nothing else), beside the pairs' precision
and recall.

    python bench/duplicates_scale.py --n 1000000 --work /tmp/dups

Each step runs in its own process, so a peak RSS is that step's only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex
sys.path.insert(0, str(ROOT / "bench"))

from bench.processes import peak_rss  # noqa: E402 (after the path)

PER_SHARD = 10_000
# Between the planted copies (0.97+) and the background's nearest neighbours;
# the pair precision shows whether any background pair crossed it.
THRESHOLD = 0.95


def write_collection(dest: Path, n: int, dim: int, groups: int, seed: int) -> None:
    """Shards of ``n`` vectors, ``groups`` planted groups among them; the
    planted groups' paths go to ``<dest>.planted.json`` beside it."""
    from index_scale import mixture

    from imgindex.pipeline.discover import ImageRecord
    from imgindex.pipeline.synthetic import write_vector_index

    rng = np.random.default_rng(seed)
    draw = mixture(rng, dim)
    sizes = rng.integers(2, 6, groups)
    # Groups start at random rows; a group's copies follow its first member.
    starts = np.sort(rng.choice(n - 6 * groups, groups, replace=False))
    starts += 6 * np.arange(groups)
    planted = [list(range(s, s + k)) for s, k in zip(starts, sizes, strict=True)]
    copy_of = np.full(n, -1, np.int64)
    for members in planted:
        copy_of[members[1:]] = members[0]

    def chunks():
        previous = None
        for start in range(0, n, PER_SHARD):
            count = min(PER_SHARD, n - start)
            x = draw(count)
            rows = np.arange(start, start + count)
            for r in np.flatnonzero(copy_of[rows] >= 0):
                first = copy_of[rows[r]]
                base = x[first - start] if first >= start else previous[first]
                noise = rng.standard_normal(dim).astype(np.float32)
                # |noise| 0.1-0.25 against a unit vector: cosine 0.97-0.995.
                noise *= rng.uniform(0.1, 0.25) / np.linalg.norm(noise)
                x[r] = base + noise
                x[r] /= np.linalg.norm(x[r])
            previous = {int(i): x[i - start] for i in rows[-6:]}
            paths = (f"v/{i:09d}.jpg" for i in rows)
            yield [ImageRecord(p, 1, 1) for p in paths], x

    write_vector_index(dest, chunks(), dim, version="bench")
    (dest.parent / f"{dest.name}.planted.json").write_text(
        json.dumps([[f"v/{i:09d}.jpg" for i in g] for g in planted])
    )


def build_index(dest: str) -> dict:
    """``reindex``: the auto-chosen index, built and tuned on a LocalCluster."""
    from distributed import Client, LocalCluster

    from imgindex.pipeline.assemble import IndexRequest
    from imgindex.pipeline.reindex import reindex

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as c,
        Client(c) as client,
    ):
        started = time.perf_counter()
        summary = reindex(dest, IndexRequest.from_config(), client)
    return {
        "index_key": summary.get("index_key"),
        "search_params": summary.get("search_params"),
        "quality": summary.get("quality"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_duplicates(dest: str) -> dict:
    """``find_duplicates`` as the CLI runs it, in this (measured) process."""
    from distributed import Client, LocalCluster

    from imgindex.pipeline.duplicates import DuplicateSettings, find_duplicates

    settings = DuplicateSettings(threshold=THRESHOLD, criterion="cosine")
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit=0,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        started = time.perf_counter()
        report = find_duplicates(dest, settings, client)
        seconds = time.perf_counter() - started
        workers = client.run(peak_rss)
    groups = [sorted(m.path for m in g.members) for g in report.groups]
    nearest = [o.nearest for o in report.outliers]
    return {
        "seconds": round(seconds, 1),
        "stage_seconds": report.stage_seconds,
        "candidates": report.candidates,
        "groups": groups,
        "client_peak_rss": peak_rss(),
        "worker_peak_rss": max(workers.values()),
        "loneliest_nearest": nearest[:1],
    }


def score(planted: list[list[str]], groups: list[list[str]]) -> dict:
    found_sets = {tuple(g) for g in groups}
    exact = sum(tuple(sorted(g)) in found_sets for g in planted)

    def pairs(gs):
        return {p for g in gs for p in itertools.combinations(sorted(g), 2)}

    truth, found = pairs(planted), pairs(groups)
    return {
        "planted_groups": len(planted),
        "recovered_exactly": exact,
        "found_groups": len(groups),
        "pair_precision": round(len(truth & found) / max(1, len(found)), 4),
        "pair_recall": round(len(truth & found) / len(truth), 4),
    }


def _in_subprocess(fn: str, *args: str) -> dict:
    from bench.processes import run_step

    return run_step(__file__, fn, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path("bench-data/duplicates"))
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    parser.add_argument("--call", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.call:
        fn, *rest = args.call
        if fn == "write":
            write_collection(Path(rest[0]), *map(int, rest[1:]))
            result: dict = {}
        else:
            result = {"index": build_index, "duplicates": run_duplicates}[fn](rest[0])
        print(json.dumps(result))
        return

    dest = args.work / f"v{args.n}"
    if not (dest / "meta.json").exists():
        started = time.perf_counter()
        _in_subprocess(
            "write", str(dest), str(args.n), str(args.dim), str(args.groups), "0"
        )
        print(f"wrote {args.n:,} vectors in {time.perf_counter() - started:.0f} s")
        index = _in_subprocess("index", str(dest))
        print(f"index: {json.dumps(index)}")
    found = _in_subprocess("duplicates", str(dest))
    planted = json.loads((args.work / f"{dest.name}.planted.json").read_text())
    row = {
        "n": args.n,
        "dim": args.dim,
        "threshold": THRESHOLD,
        **{k: v for k, v in found.items() if k != "groups"},
        **score(planted, found["groups"]),
    }
    print(json.dumps(row, indent=2))
    print(
        f"| {args.n:,} | {row['seconds']:.0f} s "
        f"(search {row['stage_seconds']['neighbours']:.0f} s) | "
        f"{row['client_peak_rss'] / 2**20:.0f} MiB | "
        f"{row['worker_peak_rss'] / 2**20:.0f} MiB | "
        f"{row['recovered_exactly']:,} of {row['planted_groups']:,} | "
        f"{row['pair_precision']:.3f} / {row['pair_recall']:.3f} |"
    )
    if args.out:
        args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
