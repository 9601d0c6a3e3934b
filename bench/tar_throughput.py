"""Embedding from tar shards against the same images as loose files.

    python bench/tar_throughput.py           # 1,000 photos, 3 rounds (~8 min, 2 cores)
    python bench/tar_throughput.py --quick   # 300 photos, 2 rounds

The photos are bench/throughput.py's (generated once into bench-data/),
packed into WebDataset-style shards of ``--per-shard`` images. Both builds
run on one default LocalCluster (the one `imgindex build` would start),
alternating, with the model loaded once: the ratio compares the embed stage
(steady state) and the whole build, tar over loose. The target is ≥ 0.95:
a shard is read in one sequential pass by the task that embeds it, so
reading from a tar must cost nothing measurable beside decoding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.throughput import ensure_photos  # noqa: E402 (after the path)


def pack(photos: list[Path], folder: Path, per_shard: int) -> str:
    """``photos`` as shards ``folder/00000.tar``...; returns their brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for n, start in enumerate(range(0, len(photos), per_shard)):
        with tarfile.open(folder / f"{n:05d}.tar", "w") as tar:
            for p in photos[start : start + per_shard]:
                tar.add(p, arcname=p.name)
    return f"{folder}/{{00000..{n:05d}}}.tar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--per-shard", type=int, default=100)
    args = parser.parse_args()
    n = 300 if args.quick else 1000
    rounds = args.rounds or (2 if args.quick else 3)

    from imgindex.cluster.connect import connect
    from imgindex.cluster.worker import setup_workers
    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.embed import ModelSpec

    data = ensure_photos(ROOT / "bench-data" / f"photos-{n}", n, 300, 1000, 1)
    photos = sorted(data.glob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="imgindex-tar-bench-") as tmp:
        work = Path(tmp)
        pattern = pack(photos, work / "shards", args.per_shard)
        size = sum(p.stat().st_size for p in photos) / 2**20
        shards = len(list((work / "shards").glob("*.tar")))
        print(f"{n} photos ({size:.0f} MiB), {shards} shards of {args.per_shard}")
        spec = ModelSpec.from_config()
        rates: dict[str, list[float]] = {"loose": [], "tar": []}
        walls: dict[str, list[float]] = {"loose": [], "tar": []}
        with connect() as conn:
            setup_workers(conn.client, spec, wait_for_models=True)
            threads = sum(conn.client.nthreads().values())
            print(f"cluster: {conn.reason}, {threads} threads")
            run_build(conn.client, data, work / "warm", spec=spec, rebuild=True)
            for r in range(rounds):
                order = ("loose", "tar") if r % 2 == 0 else ("tar", "loose")
                for kind in order:
                    dataset = data if kind == "loose" else pattern
                    started = time.perf_counter()
                    summary = run_build(
                        conn.client, dataset, work / kind, spec=spec, rebuild=True
                    )
                    wall = time.perf_counter() - started
                    assert summary.indexed == n and not summary.failed, summary
                    rate = summary.embedded / summary.stage_seconds["embed"]
                    rates[kind].append(rate)
                    walls[kind].append(wall)
                    print(
                        f"  round {r + 1} {kind:5}: embed {rate:6.1f} images/s, "
                        f"build {wall:5.1f} s ({summary.partitions} tasks)"
                    )

    loose, tar = statistics.median(rates["loose"]), statistics.median(rates["tar"])
    wall_ratio = statistics.median(walls["loose"]) / statistics.median(walls["tar"])
    print()
    print(f"{'':28}{'loose':>10}{'tar':>10}{'tar/loose':>11}")
    print(f"{'embed stage, images/s':28}{loose:10.1f}{tar:10.1f}{tar / loose:11.3f}")
    print(
        f"{'whole build, images/s':28}{n / statistics.median(walls['loose']):10.1f}"
        f"{n / statistics.median(walls['tar']):10.1f}{wall_ratio:11.3f}"
    )
    verdict = "met" if tar / loose >= 0.95 else "NOT met"
    print(f"target: tar >= 0.95 x loose (embed stage): {verdict}")


if __name__ == "__main__":
    main()
