"""What a search pays to open an index's manifest: whole, or by id.

A search needs the rows of its hits only. Before imgindex 0.5 it parsed the
whole manifest into a dict of every id's path; now it reads ``manifest.ids``
(16 bytes an image) and then each hit's line (pipeline/manifest_ids.py). For
each size N this writes an index directory of N images with realistic paths
(small 8-d vectors: the manifest is what is measured, and both ways read the
same index), then, each in a fresh process that reports its own peak memory:

- whole: ``read_index_dir`` as search used to, the index read and checked, a
  dict of every id's path (``paths_by_id``) and the hits' rows from it;
- by id: ``read_index_dir(by_id=True)``, the index read and checked, the lookup,
  and the hits' rows through it;
- an index written by imgindex 0.4 (no ``manifest.ids``), read by id: the
  lookup is then built from one pass over the manifest.

    python bench/search_open.py --sizes 100000,1000000 --work /tmp/search-open

The model's load (about a second) is the same both ways and not included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.processes import peak_rss, run_step  # noqa: E402 (after the path)

HITS = 1000  # rows looked up after opening: 100 queries of k=10
DIM = 8


def write_collection(dest: str, n: str) -> None:
    from imgindex import __version__
    from imgindex.pipeline.discover import ImageRecord
    from imgindex.pipeline.index import build_index
    from imgindex.pipeline.meta import IndexMeta
    from imgindex.pipeline.store import write_index_dir

    n_images = int(n)
    records = [
        ImageRecord(
            f"site{i % 40:02d}/camera{i % 700:03d}/2026-{1 + i % 12:02d}-"
            f"{1 + i % 28:02d}/IMG_{i:08d}.JPG",
            2_000_000 + i,
            1_760_000_000_000_000_000 + i,
        )
        for i in range(n_images)
    ]
    vectors = np.random.default_rng(0).standard_normal((n_images, DIM), np.float32)
    index = build_index(np.array([r.id for r in records], np.int64), vectors)
    meta = IndexMeta(
        name="photos",
        source="/data/photos",
        model="test",
        dim=DIM,
        count=n_images,
        created="2026-12-06T00:00:00+00:00",
        imgindex_version=__version__,
    )
    write_index_dir(dest, index, records, meta, [])
    print(json.dumps({}))


def open_index(dest: str, how: str) -> None:
    from imgindex.pipeline.store import read_index_dir

    before = peak_rss()
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    if how == "index":  # what both ways read besides the manifest
        from imgindex.pipeline.index import read_index_at

        read_index_at(Path(dest) / "index.faiss", False)
        opened = round(time.perf_counter() - started, 3)
        added = round((peak_rss() - before) / 2**20, 1)
        print(json.dumps({"open_s": opened, "added_mib": added}))
        return
    if how == "whole":
        stored = read_index_dir(dest)
        index = stored.index
        paths = {r.id: r.path for r in stored.manifest}
    else:
        stored = read_index_dir(dest, by_id=True)
        index = stored.index
        paths = stored.lookup()
    opened = time.perf_counter() - started
    picks = [int(index.id_map.at(int(i))) for i in rng.integers(0, index.ntotal, HITS)]
    started = time.perf_counter()
    found = [paths[i] for i in picks]
    per_hit = (time.perf_counter() - started) / HITS
    assert len(found) == HITS and all(found)
    result = {
        "open_s": round(opened, 3),
        "per_hit_us": round(per_hit * 1e6, 1),
        "peak_mib": round(peak_rss() / 2**20, 1),
        "added_mib": round((peak_rss() - before) / 2**20, 1),
    }
    stored.close()
    print(json.dumps(result))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--call":
        {"write": write_collection, "open": open_index}[sys.argv[2]](*sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    scratch = Path(tempfile.gettempdir()) / "imgindex-search-open"
    parser.add_argument("--work", type=Path, default=scratch)
    args = parser.parse_args()
    script = str(Path(__file__).resolve())
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        dest = args.work / f"photos-{n}"
        if not (dest / "manifest.ids").exists():
            shutil.rmtree(dest, ignore_errors=True)
            run_step(script, "write", str(dest), str(n))
        old = args.work / f"photos-{n}-0.4"
        shutil.rmtree(old, ignore_errors=True)
        shutil.copytree(dest, old)
        os.remove(old / "manifest.ids")
        size = (dest / "manifest.jsonl").stat().st_size
        alone = sorted(
            (run_step(script, "open", str(dest), "index") for _ in range(3)),
            key=lambda x: x["open_s"],
        )[1]
        print(
            f"{n:>9,} images: the index file alone reads in {alone['open_s']:.3f} s "
            f"(+{alone['added_mib']:.1f} MiB)"
        )
        for label, where, how in (
            ("whole (before)", dest, "whole"),
            ("by id", dest, "by_id"),
            ("by id, 0.4 index", old, "by_id"),
        ):
            # The median of three runs: this shared host's noise is larger
            # than the by-id open itself.
            runs = [run_step(script, "open", str(where), how) for _ in range(3)]
            r = sorted(runs, key=lambda x: x["open_s"])[1]
            r["index_alone"] = alone
            rows.append(
                {"n": n, "manifest_mb": round(size / 1e6, 1), "how": label, **r}
            )
            print(
                f"{n:>9,} images, manifest {size / 1e6:6.1f} MB, {label:17s}: "
                f"open {r['open_s']:6.3f} s, a hit's row {r['per_hit_us']:6.1f} us, "
                f"peak {r['peak_mib']:7.1f} MiB (+{r['added_mib']:.1f} opening)"
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
