"""`imgindex search --copies`: is each hit told right, and what does it cost?

    python bench/search_kinds.py --work /tmp/search-kinds   # ~6 minutes on 2 cores

The index: 18 scikit-image photos (bench/search_copies.py's but the stereo
pair), one view of each of 6 scenes (a panned view of 3 generated photos,
pipeline.synthetic.sibling_views, and the left camera of 3 tiles of
scikit-image's stereo pair) and 300 generated photos. The queries, none of
them in the index: a copy of each photo made every way in
pipeline.synthetic.COPY_MAKERS and EDIT_MAKERS, and the other view of each
scene (a second shot). Each query's 10 hits are told (``Index.search(...,
copies=True)``) and set against what they are: a query's own photo is a
copy, its scene's other view a shot, anything else neither (the stereo
tiles overlap: a tile's other tiles may be shots too).

Printed: per kind of query, how often its own photo (or view) was among the
hits, how often it was told right, and how many of those scored under the
cosine the page draws its line at (0.5); every other hit told a copy or a
shot (none expected); and the seconds the check added, per hit.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.search_copies import PHOTOS  # noqa: E402 (after the path)

K = 10
SAME_IMAGE = 0.5  # the page's line (imgindex.duplicates.threshold)
SCENES = 3  # generated photos, a panned view of each in the index, one a query
STEREO_TILES = 3  # of pipeline.synthetic.second_shots, spread over the pair


def write_set(root: Path) -> dict[str, tuple[str, str]]:
    """The index's and the queries' files; {query: (its kind, the file it
    is a copy or another shot of)}."""
    import skimage.data

    from imgindex.pipeline.synthetic import (
        COPY_MAKERS,
        EDIT_MAKERS,
        second_shots,
        sibling_views,
        synthetic_photo,
        write_photos,
    )

    index, queries = root / "index", root / "queries"
    index.mkdir(parents=True)
    queries.mkdir()
    truth: dict[str, tuple[str, str]] = {}
    # The stereo pair's left view is one of PHOTOS: its tiles would be copies.
    for name in [p for p in PHOTOS if p != "stereo_motorcycle"]:
        pixels = getattr(skimage.data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels
        photo = Image.fromarray(pixels).convert("RGB")
        photo.save(index / f"{name}.jpg", quality=92)
        for how, make in (COPY_MAKERS | EDIT_MAKERS).items():
            query = f"{name}.{how}.jpg"
            make(photo).convert("RGB").save(queries / query, quality=90)
            truth[query] = (f"copy: {how}", f"{name}.jpg")
    # Scenes of their own: a view of one of PHOTOS would be a crop of it.
    rng = np.random.default_rng(3)
    for n in range(SCENES):
        first, second = sibling_views(synthetic_photo(rng, 900, 700))
        first.save(index / f"scene-{n}-view-a.jpg", quality=90)
        second.save(queries / f"scene-{n}-view-b.jpg", quality=90)
        truth[f"scene-{n}-view-b.jpg"] = ("shot: panned view", f"scene-{n}-view-a.jpg")
    tiles = list(second_shots(*skimage.data.stereo_motorcycle()))
    step = len(tiles) // STEREO_TILES
    for n, (_, left, right) in enumerate(tiles[::step][:STEREO_TILES]):
        left.save(index / f"stereo-{n}-left.jpg", quality=92)
        right.save(queries / f"stereo-{n}-right.jpg", quality=92)
        truth[f"stereo-{n}-right.jpg"] = ("shot: stereo tile", f"stereo-{n}-left.jpg")
    write_photos(index, 300, seed=5, max_side=640)
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-data/search-kinds"))
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    import imgindex

    truth = write_set(args.work)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1) as cluster,
        Client(cluster) as client,
    ):
        imgindex.build(args.work / "index", args.work / "out", client=client,
                       progress=False)  # fmt: skip
    queries = [args.work / "queries" / q for q in sorted(truth)]
    with imgindex.open(args.work / "out" / "index") as idx:
        idx.search(queries[:2], k=K)  # the model loaded, its first passes run
        started = time.perf_counter()
        plain = idx.search(queries, k=K)
        plain_s = time.perf_counter() - started
        started = time.perf_counter()
        told = idx.search(queries, k=K, copies=True)
        told_s = time.perf_counter() - started
    assert (plain[["query", "id"]].values == told[["query", "id"]].values).all()

    by_kind: dict[str, collections.Counter] = collections.defaultdict(
        collections.Counter
    )
    wrong: list[str] = []
    for query, hits in told.groupby("query", sort=False):
        kind, source = truth[Path(query).name]
        expected = kind.split(":")[0]
        counts = by_kind[kind]
        counts["queries"] += 1
        for hit in hits.itertuples():
            name = Path(hit.path).name
            if name == source:
                counts["found"] += 1
                counts["told"] += hit.kind == expected
                counts["under line"] += hit.score < SAME_IMAGE
                counts["told under line"] += hit.score < SAME_IMAGE and (
                    hit.kind == expected
                )
                if hit.kind != expected:
                    wrong.append(f"{Path(query).name} -> {name}: {hit.kind}")
            elif name.startswith("stereo-") and kind.startswith("shot: stereo"):
                pass  # the pair's tiles overlap: another shot or neither is right
            elif hit.kind in ("copy", "shot", "identical"):
                counts["others told alike"] += 1
                wrong.append(f"{Path(query).name} -> {name}: {hit.kind}")
            counts["undecided"] += hit.kind == "undecided"
    hits = len(told)
    figures = {
        "queries": len(queries),
        "hits": hits,
        "search_s": round(plain_s, 2),
        "with_copies_s": round(told_s, 2),
        "added_s_per_hit": round((told_s - plain_s) / hits, 4),
        "kinds": {kind: dict(c) for kind, c in sorted(by_kind.items())},
        "wrong": wrong,
    }
    print(f"{len(queries)} queries, {K} hits each: search {plain_s:.1f} s, with "
          f"--copies {told_s:.1f} s ({figures['added_s_per_hit'] * 1000:.0f} ms "
          f"a hit more, on this machine's cores)")  # fmt: skip
    print()
    print("| queries | own found | told right | of them under 0.5 | told right "
          "under 0.5 | other hits told copy/shot | undecided |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, c in sorted(by_kind.items()):
        print(f"| {c['queries']} {kind} | {c['found']} | {c['told']} | "
              f"{c['under line']} | {c['told under line']} | "
              f"{c['others told alike']} | {c['undecided']} |")  # fmt: skip
    for line in wrong:
        print("  wrong:", line)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
