"""Copy or second shot? The signals that could tell them apart, measured (issue 33).

    python bench/copy_or_shot.py                 # ~2 minutes on 2 cores
    python bench/copy_or_shot.py --json out.json

Two sets of pairs, both of real photographs:

- **copies**: scikit-image's photos, each against a copy made every way in
  pipeline.synthetic.COPY_MAKERS (resized, re-encoded, cropped, flipped,
  turned, rotated, brightened, colour-shifted, captioned), saved as JPEGs;
- **second shots**: tiles of scikit-image's stereo pair (two exposures of one
  scene from cameras 5 % of the frame apart: real parallax, each its own
  sensor noise). A tile of the left view is paired with the tile of the right
  view shifted by the tile's median disparity (from the pair's disparity
  map), so that the two frame the same part of the scene, as a second shot
  from a slightly moved camera does. Several tile sizes and places give
  pairs of one scene only: what this set cannot show is a moved subject, a
  flat textured subject, or a burst with the camera held still.

Each pair goes through the copy check of ``imgindex duplicates``
(pipeline/geometry.py: ORB features, a similarity by RANSAC, footprint,
correlation of the aligned grey levels), and its residual shift field is
measured (``shift_p90``, :func:`pipeline.geometry.residual_shift`): the
aligned images are cut into patches of 32 pixels, each patch's shift against
the other image measured by phase correlation (sub-pixel), and the 90th
percentile taken, in pixels at the check's scale (384 on the longer side). A
copy is a similarity of its original, so what is left is interpolation; a
second shot leaves parallax (near and far things shift against each other)
and perspective.

Not measured here (issue 33 names them): the correlation of sensor noise
and JPEG quantisation tables. EXIF capture times decide where both files
carry one (pipeline/exposure.py), but scikit-image's photos carry none.

Printed: each signal's range per kind, and for each the threshold that best
separates the two, with the share of each kind on its side.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


@dataclass
class Pair:
    kind: str  # "copy", "shot" or "other" (unrelated photos)
    name: str
    correlation: float
    inside: float
    is_copy_today: bool  # by the check without the shift
    shift_p90: float | None = None
    # The similarity RANSAC found at all (of either image, or the mirror,
    # onto the other): its inliers and the smaller share of either image the
    # other covers under it, whatever the footprint rule of the copy check.
    inliers: int = 0
    overlap: float = 0.0
    decided: str | None = None  # what `imgindex duplicates` calls the pair


def jpeg(image: Image.Image, quality: int = 90) -> io.BytesIO:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return buf


def grey_at(buf: io.BytesIO, side: int) -> np.ndarray:
    from imgindex.pipeline.decode import load_rgb

    buf.seek(0)
    image = load_rgb(buf, side // 2)
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    grey = image.convert("L").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(grey)


def measure(kind: str, name: str, a_buf, b_buf, side: int) -> Pair:
    from imgindex.pipeline import geometry as g

    a = g.features_of(grey_at(a_buf, side))
    b = g.features_of(grey_at(b_buf, side))
    inliers, overlap = matched(a, b)
    decided = g.align(a, b).kind
    laid = g.lay(a, b)
    if laid is None:
        return Pair(kind, name, 0.0, 0.0, False, None, inliers, overlap, decided)
    alignment = laid.alignment
    pair = Pair(
        kind,
        name,
        round(alignment.correlation, 4),
        round(alignment.inside, 4),
        alignment.is_copy,  # the check without the shift
    )
    # At the check's scale: what `imgindex duplicates` decides on.
    pair.shift_p90 = g.residual_shift(laid.src, laid.dst, laid.matrix)
    pair.inliers, pair.overlap, pair.decided = inliers, overlap, decided
    return pair


def matched(a, b) -> tuple[int, float]:
    """The most inliers of a similarity between ``a`` (or its mirror) and
    ``b``, and the smaller share of either image the other covers under it."""
    import cv2

    from imgindex.pipeline import geometry as g

    best = (0, 0.0)
    for x in (a, a.mirror()):
        matrix, inliers = g._similarity(x, b)
        if matrix is None:
            continue
        overlap = min(
            g._inside(x.grey.shape, b.grey.shape, matrix),
            g._inside(b.grey.shape, x.grey.shape, cv2.invertAffineTransform(matrix)),
        )
        best = max(best, (inliers, round(overlap, 4)))
    return best


def copy_pairs(side: int) -> list[Pair]:
    import skimage.data

    from imgindex.pipeline.synthetic import COPY_MAKERS

    pairs = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        original = jpeg(image, 92)
        for how, make in COPY_MAKERS.items():
            pairs.append(
                measure("copy", f"{name} {how}", original, jpeg(make(image)), side)
            )
    return pairs


def shot_pairs(side: int) -> list[Pair]:
    import skimage.data

    from imgindex.pipeline.synthetic import second_shots

    return [
        measure("shot", name, jpeg(a, 92), jpeg(b, 92), side)
        for name, a, b in second_shots(*skimage.data.stereo_motorcycle())
    ]


def other_pairs(side: int) -> list[Pair]:
    """Unrelated photos: every two of PHOTOS, and each against a stereo tile."""
    import itertools

    import skimage.data

    from imgindex.pipeline.synthetic import second_shots

    photos = {
        name: jpeg(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"), 92)
        for name in PHOTOS
    }
    pairs = [
        measure("other", f"{x} ~ {y}", photos[x], photos[y], side)
        for x, y in itertools.combinations(PHOTOS, 2)
    ]
    tiles = list(second_shots(*skimage.data.stereo_motorcycle()))[::4]
    for (tile, a, _), name in zip(tiles, itertools.cycle(PHOTOS)):
        pairs.append(measure("other", f"{name} ~ {tile}", photos[name], jpeg(a), side))
    return pairs


def separation(pairs: list[Pair], signal: str, copies_low: bool) -> dict:
    """The threshold on ``signal`` that puts most of each kind on its side."""
    values = {
        kind: sorted(getattr(p, signal) for p in pairs if p.kind == kind
                     and getattr(p, signal) is not None)
        for kind in ("copy", "shot")
    }  # fmt: skip
    candidates = sorted(set(values["copy"]) | set(values["shot"]))
    best = None
    for t in candidates:
        if copies_low:
            copy_ok = sum(v <= t for v in values["copy"]) / len(values["copy"])
            shot_ok = sum(v > t for v in values["shot"]) / len(values["shot"])
        else:
            copy_ok = sum(v >= t for v in values["copy"]) / len(values["copy"])
            shot_ok = sum(v < t for v in values["shot"]) / len(values["shot"])
        score = min(copy_ok, shot_ok)
        if best is None or score > best["balanced"]:
            best = {
                "threshold": t,
                "copies": copy_ok,
                "shots": shot_ok,
                "balanced": score,
            }
    return {
        "copy range": (values["copy"][0], values["copy"][-1]),
        "shot range": (values["shot"][0], values["shot"][-1]),
        **(best or {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pairs = copy_pairs(args.side) + shot_pairs(args.side) + other_pairs(args.side)
    n_copy = sum(p.kind == "copy" for p in pairs)
    n_shot = sum(p.kind == "shot" for p in pairs)
    today = sum(p.is_copy_today for p in pairs if p.kind == "shot")
    found = sum(p.is_copy_today for p in pairs if p.kind == "copy")
    print(f"{n_copy} copy pairs, {n_shot} second-shot pairs")
    print(f"copy check of today: {found}/{n_copy} copies found, "
          f"{today}/{n_shot} second shots called copies")  # fmt: skip
    from imgindex.pipeline.geometry import MAX_SHIFT

    def now(p: Pair) -> bool:
        return p.is_copy_today and (p.shift_p90 is None or p.shift_p90 <= MAX_SHIFT)

    found = sum(now(p) for p in pairs if p.kind == "copy")
    called = sum(now(p) for p in pairs if p.kind == "shot")
    print(f"with the residual shift at most {MAX_SHIFT} px: {found}/{n_copy} copies "
          f"found, {called}/{n_shot} second shots called copies")  # fmt: skip
    print()
    print("| signal | copies | second shots | threshold | copies on their side "
          "| shots on their side |")  # fmt: skip
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for signal, copies_low in (("correlation", False), ("shift_p90", True)):
        s = separation(pairs, signal, copies_low)
        print(
            f"| {signal} | {s['copy range'][0]:.3f}-{s['copy range'][1]:.3f} "
            f"| {s['shot range'][0]:.3f}-{s['shot range'][1]:.3f} "
            f"| {s['threshold']:.3f} | {s['copies']:.0%} | {s['shots']:.0%} |"
        )
    print()
    print("What `imgindex duplicates` calls each pair (pipeline/geometry.py):")
    print("| pairs | called copy | called shot | neither |")
    print("| --- | ---: | ---: | ---: |")
    for kind in ("copy", "shot", "other"):
        of = [p for p in pairs if p.kind == kind]
        called = [sum(p.decided == k for p in of) for k in ("copy", "shot", None)]
        print(f"| {len(of)} {kind} | {called[0]} | {called[1]} | {called[2]} |")
    print()
    print("| kind | pairs | a similarity found (inliers >= 12) | covering >= 0.5 |")
    print("| --- | ---: | ---: | ---: |")
    for kind in ("copy", "shot", "other"):
        of = [p for p in pairs if p.kind == kind]
        sim = [p for p in of if p.inliers >= 12]
        over = [p for p in sim if p.overlap >= 0.5]
        print(f"| {kind} | {len(of)} | {len(sim)} | {len(over)} |")
    for p in pairs:
        if p.kind != "copy":
            print(f"  {p.kind} {p.name}: inliers {p.inliers}, overlap {p.overlap}, "
                  f"corr {p.correlation}, shift {p.shift_p90}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in pairs], indent=1))


if __name__ == "__main__":
    main()
