"""Does a copy find its original? Rank 1 per kind of copy (docs/guide/search.md).

The index: 19 scikit-image photos, two panned views of each
(pipeline.synthetic.sibling_views) and 300 generated photos. The queries: a
copy of each photo made every way in pipeline.synthetic.COPY_MAKERS. Printed
per kind of copy: the share of photos found at rank 1 and the mean lead of
the original over the best other image,

- as the query is, and with the turned searches of ``imgindex search``
  (max over the four quarter turns, a turned match less ``penalty``);
- among unrelated images only (the photo's own panned views set aside), with
  the centre square (as indexes are built) and with the whole image padded
  to a square.

    python bench/search_copies.py --work /tmp/search-copies
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

PHOTOS = (
    "astronaut brick camera cell chelsea clock coffee coins colorwheel grass gravel "
    "hubble_deep_field immunohistochemistry moon page retina rocket "
    "stereo_motorcycle text"
).split()


def write_set(root: Path) -> None:
    import skimage.data

    from imgindex.pipeline.synthetic import COPY_MAKERS, sibling_views, write_photos

    (root / "index").mkdir(parents=True)
    (root / "queries").mkdir()
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels
        photo = Image.fromarray(pixels).convert("RGB")
        photo.save(root / "index" / f"{name}.jpg", quality=92)
        for side, view in zip("ab", sibling_views(photo), strict=True):
            view.save(root / "index" / f"{name}-view{side}.jpg", quality=90)
        for how, make in COPY_MAKERS.items():
            make(photo).convert("RGB").save(
                root / "queries" / f"{name}.{how}.jpg", quality=90
            )
    write_photos(root / "index", 300, seed=5, max_side=640)


def whole_square(path: Path) -> np.ndarray:
    """The whole image padded to a square, at the model's 224 pixels."""
    from imgindex.pipeline.decode import load_rgb

    image = load_rgb(path, 256)
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (124, 116, 104))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return np.asarray(canvas.resize((224, 224), Image.Resampling.BILINEAR))


def main() -> None:
    from imgindex.pipeline.decode import decode_image
    from imgindex.pipeline.embed import Embedder, ModelSpec
    from imgindex.pipeline.search import TURN_PENALTY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-data/search-copies"))
    args = parser.parse_args()
    if not (args.work / "queries").is_dir():
        write_set(args.work)
    embedder = Embedder(ModelSpec())

    def embed(pixels: list[np.ndarray]) -> np.ndarray:
        parts = [pixels[i : i + 32] for i in range(0, len(pixels), 32)]
        return np.concatenate([embedder.embed_pixels(part) for part in parts])

    indexed = sorted((args.work / "index").glob("*.jpg"))
    names = [p.stem for p in indexed]
    queries = sorted((args.work / "queries").glob("*.jpg"))
    photo = [q.name.split(".")[0] for q in queries]
    kind = [q.name.split(".")[1] for q in queries]

    def report(label: str, scores: np.ndarray, unrelated_only: bool) -> None:
        found, lead, count = (collections.Counter() for _ in range(3))
        for row, (name, how) in enumerate(zip(photo, kind, strict=True)):
            columns = [
                j
                for j, m in enumerate(names)
                if not (unrelated_only and m.startswith(f"{name}-view"))
            ]
            s = scores[row, columns]
            truth = columns.index(names.index(name))
            others = np.delete(s, truth)
            count[how] += 1
            found[how] += int(np.argmax(s)) == truth
            lead[how] += float(s[truth] - others.max())
        print(f"{label}:")
        for how in sorted(count):
            print(
                f"  {how:15s} rank 1 {found[how] / count[how]:5.0%}  "
                f"lead {lead[how] / count[how]:+.3f}"
            )

    pixels = [decode_image(q) for q in queries]
    index = embed([decode_image(p) for p in indexed])
    plain = embed(pixels) @ index.T
    report("as the query is", plain, False)
    turned = plain
    for turn in (1, 2, 3):
        variant = [np.ascontiguousarray(np.rot90(x, turn)) for x in pixels]
        turned = np.maximum(turned, embed(variant) @ index.T - TURN_PENALTY)
    report(f"with the turned searches (penalty {TURN_PENALTY})", turned, False)
    report("centre square, unrelated images only", plain, True)
    whole = embed([whole_square(q) for q in queries])
    whole_index = embed([whole_square(p) for p in indexed])
    report("whole image, unrelated images only", whole @ whole_index.T, True)


if __name__ == "__main__":
    main()
