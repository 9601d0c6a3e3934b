"""How the index build scales: client memory flat in N, recall, latency, bytes.

For each size N, N synthetic unit vectors (clustered, so neighbours mean
something) are written as shards into an index directory, as a build leaves
them; then ``imgindex reindex`` builds the auto-chosen index on a real
``dask scheduler`` + 2 ``dask worker`` processes (restarted per size, so
their peak memory is this size's). Beside it, the same shards go through the
previous design: a Flat index filled on the client, one shard at a time.

    python bench/index_scale.py --sizes 100000,300000,1000000 --work /tmp/scale

Each measurement runs in its own process and reports its own peak RSS
(``ru_maxrss``), so no number includes another's memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PER_SHARD = 10_000
CENTRES = 2_000


def write_collection(dest: Path, n: int, dim: int, seed: int = 0) -> None:
    """An index directory of ``n`` vectors in shards, with its manifest and meta."""
    from pipeline.discover import ImageRecord
    from pipeline.embed import ModelSpec
    from pipeline.index import build_index
    from pipeline.meta import IndexMeta
    from pipeline.shards import write_vectors
    from pipeline.store import write_index_dir

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
    spec = ModelSpec.from_config()
    staging = dest.parent / f".{dest.name}.made"
    shards, records = [], []
    for start in range(0, n, PER_SHARD):
        count = min(PER_SHARD, n - start)
        x = centres[rng.integers(0, CENTRES, count)]
        x += 0.6 * rng.standard_normal((count, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        chunk = [
            ImageRecord(f"v/{i:09d}.jpg", 1, 1) for i in range(start, start + count)
        ]
        shards.append(write_vectors(staging, spec, chunk, x, "bench"))
        records.extend(chunk)
    meta = IndexMeta(
        name=dest.name,
        source=str(dest.parent / "images"),
        model=spec.name,
        dim=dim,
        count=n,
        created="2026-11-22T00:00:00+00:00",
        imgindex_version="bench",
    )
    # A placeholder index: reindex builds the real one from the shards.
    empty = build_index(np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
    records.sort(key=lambda r: r.path)
    write_index_dir(dest, empty, records, meta, [], {}, shards)
    shutil.rmtree(staging)


def flat_on_client(dest: str) -> dict:
    """The previous design: the client reads every shard into one Flat index."""
    from pipeline.index import build_index, reserve
    from pipeline.index_build import _latency
    from pipeline.shards import iter_shards

    started = time.perf_counter()
    shards = list(iter_shards(Path(dest) / "shards"))
    n = sum(len(s.info["paths"]) for s in shards)
    dim = json.loads((Path(dest) / "meta.json").read_text())["dim"]
    index = build_index(np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
    reserve(index, n)
    for shard in shards:
        ids, vectors = shard.arrays()
        index.add_with_ids(vectors, ids)
    seconds = time.perf_counter() - started
    queries = shards[0].arrays()[1][:100]
    p50, p99 = _latency(index, queries, 10)
    return {
        "seconds": round(seconds, 1),
        "bytes": int(n * (dim * 4 + 16)),
        "p50_ms": p50,
        "p99_ms": p99,
        "client_peak_rss": _peak_rss(),
    }


def reindex_client(dest: str, scheduler: str) -> dict:
    """``imgindex reindex`` as a user runs it, in this (measured) process."""
    from distributed import Client

    from pipeline.assemble import IndexRequest
    from pipeline.reindex import reindex

    with Client(scheduler) as client:
        started = time.perf_counter()
        summary = reindex(dest, IndexRequest.from_config(), client)
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
        workers = client.run(_peak_rss)
    summary["client_peak_rss"] = _peak_rss()
    summary["worker_peak_rss"] = max(workers.values())
    return summary


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _in_subprocess(fn: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--call", fn, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{fn} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Cluster:
    """A real `dask scheduler` and 2 one-thread `dask worker` processes."""

    def __init__(self, folder: Path):
        self.file = folder / "scheduler.json"
        self.procs = []
        dask = str(Path(sys.executable).with_name("dask"))
        self.procs.append(
            subprocess.Popen(
                [dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                 "--dashboard-address", "127.0.0.1:0",
                 "--scheduler-file", str(self.file)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        while not self.file.exists():
            time.sleep(0.2)
        self.procs.append(
            subprocess.Popen(
                [dask, "worker", "--scheduler-file", str(self.file),
                 "--nworkers", "2", "--nthreads", "1", "--memory-limit", "0",
                 "--host", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        from distributed import Client

        with Client(scheduler_file=str(self.file)) as c:
            c.wait_for_workers(2, timeout=120)
            self.address = c.scheduler.address

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            p.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--call", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.call:
        fn, *rest = args.call
        print(
            json.dumps({"flat": flat_on_client, "reindex": reindex_client}[fn](*rest))
        )
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="index-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        dest = work / f"n{n}"
        if not dest.exists():
            t = time.perf_counter()
            write_collection(dest, n, args.dim)
            print(
                f"{n:,}: shards written in {time.perf_counter() - t:.0f} s", flush=True
            )
        cluster = Cluster(work)
        try:
            built = _in_subprocess("reindex", str(dest), cluster.address)
        finally:
            cluster.close()
        row = {"n": n, "built": built}
        if not args.no_reference:
            row["flat_on_client"] = _in_subprocess("flat", str(dest))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    mib = 2**20
    print(
        "\n| N | index (auto) | build s | client peak | worker peak | recall@10 "
        "(setting) | p50 / p99 ms | index bytes | Flat on client: s, client peak, "
        "p50 / p99 ms |"
    )
    print("|" + " --- |" * 9)
    for r in rows:
        b, q = r["built"], r["built"]["quality"]
        setting = (
            ", ".join(f"{k}={v}" for k, v in b["search_params"].items()) or "exact"
        )
        ref = r.get("flat_on_client")
        ref_text = (
            f"{ref['seconds']:.0f} s, {ref['client_peak_rss'] / mib:,.0f} MiB, "
            f"{ref['p50_ms']:.1f} / {ref['p99_ms']:.1f}"
            if ref else "-"
        )  # fmt: skip
        client, worker = b["client_peak_rss"] / mib, b["worker_peak_rss"] / mib
        print(
            f"| {r['n']:,} | `{b['index_key']}` | {b['wall_seconds']:.0f} | "
            f"{client:,.0f} MiB | {worker:,.0f} MiB | "
            f"{q['recall_at_k']:.3f} ({setting}) | "
            f"{q['p50_ms']:.2f} / {q['p99_ms']:.2f} | "
            f"{q['bytes'] / mib:,.0f} MiB | {ref_text} |"
        )


if __name__ == "__main__":
    main()
