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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.processes import peak_rss  # noqa: E402 (after the path)

PER_SHARD = 10_000
WORKERS = 2  # one-thread `dask worker` processes, one per core here
WORKER_ARGS = ["--nworkers", str(WORKERS), "--nthreads", "1", "--memory-limit", "0"]
TOPICS = 200  # broad subjects ...
PER_TOPIC = 10  # ... each with sub-clusters of uneven size and spread


def write_collection(dest: Path, n: int, dim: int, seed: int = 0) -> None:
    """An index directory of ``n`` vectors in shards, with its manifest and meta."""
    from imgindex.pipeline.discover import ImageRecord
    from imgindex.pipeline.synthetic import write_vector_index

    rng = np.random.default_rng(seed)
    draw = mixture(rng, dim)

    def chunks():
        for start in range(0, n, PER_SHARD):
            count = min(PER_SHARD, n - start)
            x = draw(count)
            paths = (f"v/{i:09d}.jpg" for i in range(start, start + count))
            yield [ImageRecord(p, 1, 1) for p in paths], x

    write_vector_index(dest, chunks(), dim, version="bench")


def mixture(rng: np.random.Generator, dim: int):
    """A function drawing ``count`` unit vectors from a two-level mixture.

    Like image embeddings: topics that overlap, sub-clusters inside them,
    sizes following a power law (a few huge, many small) and spreads that
    differ, so that some neighbourhoods are tight and others diffuse. One
    flat level of equal, well-separated clusters would make IVF look better
    than it is on real collections.
    """
    topics = rng.standard_normal((TOPICS, dim), dtype=np.float32)
    offsets = rng.standard_normal((TOPICS, PER_TOPIC, dim), dtype=np.float32)
    centres = (topics[:, None, :] + 0.7 * offsets).reshape(-1, dim)
    spread = rng.uniform(0.45, 0.9, len(centres)).astype(np.float32)
    weight = 1.0 / np.arange(1, len(centres) + 1) ** 0.8
    rng.shuffle(weight)
    weight /= weight.sum()

    def draw(count: int) -> np.ndarray:
        which = rng.choice(len(centres), count, p=weight)
        x = rng.standard_normal((count, dim), dtype=np.float32)
        x *= spread[which, None]
        x += centres[which]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return draw


def forget_index(dest: Path) -> None:
    """Replace ``dest``'s index by a placeholder, so reindex trains from scratch.

    (Reindexing an IVF index of the same kind keeps its trained quantizer:
    a second run of this bench would measure a refill, not a build.)
    """
    from imgindex.pipeline.index import build_index
    from imgindex.pipeline.meta import IndexMeta
    from imgindex.pipeline.store import read_index_dir, write_index_dir

    stored = read_index_dir(dest)
    stored.close()
    meta = stored.meta
    fresh = IndexMeta(
        name=meta.name,
        source=meta.source,
        model=meta.model,
        dim=meta.dim,
        count=meta.count,
        created=meta.created,
        imgindex_version=meta.imgindex_version,
    )
    empty = build_index(np.zeros(0, np.int64), np.zeros((0, meta.dim), np.float32))
    shards = sorted((dest / "shards").glob("*.npz"))
    write_index_dir(dest, empty, stored.manifest, fresh, [], {}, shards)


def flat_on_client(dest: str) -> dict:
    """The previous design: the client reads every shard into one Flat index."""
    from imgindex.pipeline.copies import Copies
    from imgindex.pipeline.index import build_index, reserve
    from imgindex.pipeline.index_build import _latency
    from imgindex.pipeline.shards import iter_shards

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
    p50, p99, _ = _latency(index, Copies(), queries, 10)
    return {
        "seconds": round(seconds, 1),
        "bytes": int(n * (dim * 4 + 16)),
        "p50_ms": p50,
        "p99_ms": p99,
        "client_peak_rss": peak_rss(),
    }


def reindex_client(dest: str, scheduler: str) -> dict:
    """``imgindex reindex`` as a user runs it, in this (measured) process."""
    from distributed import Client

    from imgindex.pipeline.assemble import IndexRequest
    from imgindex.pipeline.reindex import reindex

    with Client(scheduler) as client:
        started = time.perf_counter()
        summary = reindex(dest, IndexRequest.from_config(), client)
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
        workers = client.run(peak_rss)
    summary["client_peak_rss"] = peak_rss()
    summary["worker_peak_rss"] = max(workers.values())
    # The merge's worker holds the whole index; the others only add groups.
    summary["worker_peaks"] = sorted(workers.values())
    return summary


def _in_subprocess(fn: str, *args: str) -> dict:
    from bench.processes import run_step

    return run_step(__file__, fn, *args)


# The cluster docs/performance.md projects onto: one common HPC allocation. Change these
# (or pass --nodes/--cores/--search-memory) to project onto yours.
NODES, CORES, SEARCH_MEMORY = 16, 32, 64 << 30
FS_BYTES_PER_S = 10e9  # aggregate parallel file system read, an assumption
MERGE_BYTES_PER_S = 1e9  # one node's file system write or read, an assumption
KMEANS_ITERATIONS = 25  # FAISS's default for IVF training


def project(rows: list[dict], n: int, nodes: int, cores: int, memory: int) -> None:
    """Print ``n`` vectors' build on ``nodes`` x ``cores``, from measured rates.

    Per-core rates come from this run's largest trained index: k-means
    multiply-adds a second (train) and assignment multiply-adds a second
    (add), on these cores. The projected index is what ``auto`` chooses for
    ``n`` under ``memory``; its costs are counted in the same units.
    """
    from imgindex.pipeline.index_policy import choose_index

    ivf = [r for r in rows if r["built"]["index_key"].startswith("IVF")]
    if not ivf:
        print("no trained index among the sizes: nothing to project from")
        return
    r = max(ivf, key=lambda r: r["n"])
    b, dim = r["built"], r["dim"]
    nlist = int(b["index_key"][3:].split(",")[0])
    threads = r["threads"]
    t = b["stage_seconds"]
    train_rate = b["trained_on"] * nlist * dim * KMEANS_ITERATIONS / t["train"]
    train_rate /= threads
    add_rate = r["n"] * nlist * dim / t["add+merge"] / threads

    c = choose_index(n, dim, max_memory=memory)
    m = int(c.key.split(",")[-1][2:]) if c.kind == "ivf-pq" else 0
    d_ivf = int(c.key.split("_")[1].split(",")[0]) if m else dim
    big_nlist = int(c.key.split("IVF")[1].split(",")[0])
    train_macs = c.train_size * big_nlist * d_ivf * KMEANS_ITERATIONS
    add_macs_each = (dim * d_ivf if m else 0) + big_nlist * d_ivf + 256 * d_ivf
    add_macs = n * add_macs_each
    total_cores = nodes * cores
    train_s = train_macs / (train_rate * cores)
    add_s = add_macs / (add_rate * total_cores)
    raw = n * dim * 4
    read_s = raw / FS_BYTES_PER_S
    exact_s = 500 * n * dim / (add_rate * total_cores)
    group_rows = (256 << 20) // (4 * dim)
    worker = (256 << 20) + big_nlist * d_ivf * 4 + dim * d_ivf * 4
    worker += group_rows * (m + 8 if m else 4 * dim + 8)
    gib = 2**30

    merge_s = 2 * c.bytes_estimate / MERGE_BYTES_PER_S
    small, large = min(rows, key=lambda r: r["n"]), max(rows, key=lambda r: r["n"])
    per_image = (
        large["built"]["client_peak_rss"] - small["built"]["client_peak_rss"]
    ) / (large["n"] - small["n"])
    total = train_s + max(add_s, read_s) + merge_s + exact_s + read_s

    print(
        f"\nProjection of {n:,} x {dim}-d onto {nodes} nodes x {cores} cores "
        f"(search memory budget {memory / gib:.0f} GiB), from rates measured above"
    )
    print("\n| | arithmetic | result |\n| --- | --- | --- |")
    rows_out = [
        (
            "k-means rate (measured)",
            f"{b['trained_on']:,} x {nlist:,} lists x {dim} x {KMEANS_ITERATIONS} "
            f"in {t['train']:.0f} s on {threads} cores",
            f"{train_rate / 1e9:.1f} G multiply-adds/s a core",
        ),
        (
            "assignment rate (measured)",
            f"{r['n']:,} x {nlist:,} x {dim} in {t['add+merge']:.0f} s on "
            f"{threads} cores (add and merge)",
            f"{add_rate / 1e9:.1f} G multiply-adds/s a core",
        ),
        ("index (`auto`)", c.reason, f"`{c.key}`"),
        (
            "index bytes",
            f"{n:,} x {m + 8 if m else 4 * dim + 8} B + quantizer",
            f"{c.bytes_estimate / gib:,.1f} GiB",
        ),
        ("shards", f"{n:,} x {dim} x 4 B", f"{raw / gib:,.0f} GiB"),
        (
            "train (one node)",
            f"{c.train_size:,} x {big_nlist:,} x {d_ivf} x {KMEANS_ITERATIONS} = "
            f"{train_macs:.2e} / ({cores} cores x rate)",
            f"{train_s / 60:,.0f} min",
        ),
        (
            "add (all nodes)",
            f"{n:,} x ({dim}x{d_ivf} OPQ + {big_nlist:,}x{d_ivf} lists + "
            f"256x{d_ivf} codes) = {add_macs:.2e} / ({total_cores} cores x rate)"
            if m
            else f"{n:,} x {big_nlist:,} x {dim} = {add_macs:.2e} / "
            f"({total_cores} cores x rate)",
            f"{add_s / 60:,.0f} min",
        ),
        (
            "read the shards",
            f"{raw / 1e9:,.0f} GB at {FS_BYTES_PER_S / 1e9:.0f} GB/s (assumed "
            "parallel file system), overlapping the add",
            f"{read_s / 60:.1f} min",
        ),
        (
            "merge (one node)",
            f"write and read {c.bytes_estimate / gib:,.1f} GiB at "
            f"{MERGE_BYTES_PER_S / 1e9:.0f} GB/s",
            f"{merge_s / 60:.1f} min",
        ),
        (
            "recall (all nodes)",
            f"500 queries x {n:,} x {dim} = {500 * n * dim:.2e} / ({total_cores} "
            "cores x rate), plus a second read of the shards",
            f"{(exact_s + read_s) / 60:.1f} min",
        ),
        ("**build time**", "the sum", f"**{total / 60:,.0f} min**"),
        (
            "memory of an add worker",
            f"256 MiB of vectors + quantizer "
            f"{(big_nlist * d_ivf + dim * d_ivf) * 4 / 2**20:,.0f} MiB + codes, "
            "above its own ~0.3 GiB",
            f"{worker / 2**30 + 0.3:.1f} GiB",
        ),
        (
            "memory of the merge worker, and of `search`",
            "the index, plus one part",
            f"{c.bytes_estimate / gib:,.1f} GiB",
        ),
        (
            "client",
            f"file records: {per_image:.0f} B an image (measured between "
            f"{small['n']:,} and {large['n']:,})",
            f"{per_image * n / gib:,.1f} GiB",
        ),
    ]
    for row in rows_out:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    from bench.processes import DaskProcesses

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--project", type=int, default=100_000_000)
    parser.add_argument("--nodes", type=int, default=NODES)
    parser.add_argument("--cores", type=int, default=CORES)
    parser.add_argument("--search-memory", type=int, default=SEARCH_MEMORY)
    parser.add_argument(
        "--table-only", action="store_true", help="print from WORK/results.json"
    )
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
    results = work / "results.json"
    if args.table_only:
        rows = json.loads(results.read_text())
        print_table(rows)
        project(rows, args.project, args.nodes, args.cores, args.search_memory)
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        dest = work / f"n{n}"
        if not dest.exists():
            t = time.perf_counter()
            write_collection(dest, n, args.dim)
            print(
                f"{n:,}: shards written in {time.perf_counter() - t:.0f} s", flush=True
            )
        else:
            forget_index(dest)
        cluster = DaskProcesses(work, WORKER_ARGS, WORKERS)
        try:
            built = _in_subprocess("reindex", str(dest), cluster.address)
        finally:
            cluster.close()
        row = {"n": n, "dim": args.dim, "threads": WORKERS, "built": built}
        if not args.no_reference:
            row["flat_on_client"] = _in_subprocess("flat", str(dest))
        rows.append(row)
        results.write_text(json.dumps(rows, indent=1))
        print(json.dumps(row), flush=True)
    print_table(rows)
    project(rows, args.project, args.nodes, args.cores, args.search_memory)


def print_table(rows: list[dict]) -> None:
    mib = 2**20
    print(
        "\n| N | index (auto) | build s | client peak | worker peaks | recall@10 "
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
        client = b["client_peak_rss"] / mib
        peaks = b.get("worker_peaks", [b["worker_peak_rss"]])
        worker = " / ".join(f"{p / mib:,.0f}" for p in reversed(peaks))
        print(
            f"| {r['n']:,} | `{b['index_key']}` | {b['wall_seconds']:.0f} | "
            f"{client:,.0f} MiB | {worker} MiB | "
            f"{q['recall_at_k']:.3f} ({setting}) | "
            f"{q['p50_ms']:.2f} / {q['p99_ms']:.2f} | "
            f"{q['bytes'] / mib:,.0f} MiB | {ref_text} |"
        )


if __name__ == "__main__":
    main()
