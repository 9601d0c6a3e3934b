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
correlation of the aligned grey levels), then through candidate signals over
the aligned footprint:

- ``shift_p90``: the residual shift field. The aligned images are cut into
  patches; each patch's shift against the other image is measured by phase
  correlation (sub-pixel). A copy is a similarity of its original, so what is
  left is interpolation noise; a second shot leaves parallax (near and far
  things shift against each other) and perspective. The 90th percentile of
  the shift, in pixels at the check's scale (``--side``) and at twice it.
- ``noise_corr``: correlation of the high-pass residuals (the image less a
  blurred copy of it) of the aligned images at twice the check's scale: a
  copy carries its original's noise and fine detail, a second exposure has
  noise of its own.

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
# Stereo tiles: (width, height) in pixels of the 741 x 500 views.
TILES = ((500, 360), (400, 300), (600, 420))
PATCH = 32  # pixels of a patch of the shift field, at the check's scale


@dataclass
class Pair:
    kind: str  # "copy" or "shot"
    name: str
    correlation: float
    inside: float
    is_copy_today: bool
    shift_p90: float | None = None
    shift_p90_fine: float | None = None
    noise_corr: float | None = None


def jpeg(image: Image.Image, quality: int = 90) -> io.BytesIO:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return buf


def grey_at(buf: io.BytesIO, side: int) -> np.ndarray:
    from pipeline.decode import load_rgb

    buf.seek(0)
    image = load_rgb(buf, side // 2)
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    grey = image.convert("L").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(grey)


def best_alignment(a, b):
    """(alignment, src, dst, matrix) as pipeline.geometry.align chooses it."""
    import cv2

    from pipeline import geometry as g

    best = None
    for mirrored, x in ((False, a), (True, a.mirror())):
        matrix, inliers = g._similarity(x, b)
        if matrix is None:
            continue
        for src, dst, m, flipped in (
            (x, b, matrix, False),
            (b, x, cv2.invertAffineTransform(matrix), True),
        ):
            inside = g._inside(src.grey.shape, dst.grey.shape, m)
            if inside < g.MIN_INSIDE:
                continue
            found = g.Alignment(
                g._correlation(src.grey, dst.grey, m), inside, inliers, mirrored
            )
            if best is None or found.correlation > best[0].correlation:
                best = (found, mirrored, flipped, m)
    return best


def footprint(src_shape, dst_shape, matrix) -> np.ndarray:
    import cv2

    h, w = dst_shape
    ones = np.ones(src_shape, np.uint8)
    placed = cv2.warpAffine(ones, matrix, (w, h), flags=cv2.INTER_NEAREST)
    return cv2.erode(placed, np.ones((5, 5), np.uint8)) > 0


def shift_p90(placed: np.ndarray, dst: np.ndarray, inside: np.ndarray, patch: int):
    import cv2

    window = cv2.createHanningWindow((patch, patch), cv2.CV_32F)
    shifts = []
    h, w = dst.shape
    for y in range(0, h - patch + 1, patch // 2):
        for x in range(0, w - patch + 1, patch // 2):
            if not inside[y : y + patch, x : x + patch].all():
                continue
            p, q = (
                placed[y : y + patch, x : x + patch],
                dst[y : y + patch, x : x + patch],
            )
            if p.std() < 4 or q.std() < 4:  # flat: no shift to measure
                continue
            (dx, dy), response = cv2.phaseCorrelate(p, q, window)
            if response >= 0.2:
                shifts.append(np.hypot(dx, dy))
    return float(np.percentile(shifts, 90)) if len(shifts) >= 5 else None


def measure(kind: str, name: str, a_buf, b_buf, side: int) -> Pair:
    import cv2

    from pipeline import geometry as g

    a = g.features_of(grey_at(a_buf, side))
    b = g.features_of(grey_at(b_buf, side))
    found = best_alignment(a, b)
    if found is None:
        return Pair(kind, name, 0.0, 0.0, False)
    alignment, mirrored, flipped, m = found
    pair = Pair(
        kind,
        name,
        round(alignment.correlation, 4),
        round(alignment.inside, 4),
        alignment.is_copy,
    )
    # At the check's scale, and at twice it (the same transform, scaled).
    for fine in (False, True):
        factor = 2 if fine else 1
        ga, gb = (grey_at(x, side * factor) for x in (a_buf, b_buf))
        if mirrored:
            ga = np.ascontiguousarray(ga[:, ::-1])
        src, dst = (gb, ga) if flipped else (ga, gb)
        matrix = m.copy()
        matrix[:, 2] *= factor
        h, w = dst.shape
        placed = cv2.warpAffine(src.astype(np.float32), matrix, (w, h))
        inside = footprint(src.shape, dst.shape, matrix)
        value = shift_p90(placed, dst.astype(np.float32), inside, PATCH * factor)
        value = None if value is None else round(value / factor, 3)
        if fine:
            pair.shift_p90_fine = value
            residual = placed - cv2.GaussianBlur(placed, (0, 0), 1.5)
            target = dst.astype(np.float32)
            residual_dst = target - cv2.GaussianBlur(target, (0, 0), 1.5)
            x, y = residual[inside], residual_dst[inside]
            x, y = x - x.mean(), y - y.mean()
            scale = float(np.linalg.norm(x) * np.linalg.norm(y))
            pair.noise_corr = round(float(x @ y) / scale, 4) if scale else None
        else:
            pair.shift_p90 = value
    return pair


def copy_pairs(side: int) -> list[Pair]:
    import skimage.data

    from pipeline.synthetic import COPY_MAKERS

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

    left, right, disparity = skimage.data.stereo_motorcycle()
    disparity = np.where(np.isfinite(disparity), disparity, np.nan)
    views = Image.fromarray(left), Image.fromarray(right)
    height, width = left.shape[:2]
    pairs = []
    for tw, th in TILES:
        for x in range(60, width - tw, 60):
            for y in sorted({0, height - th}):
                shift = int(round(np.nanmedian(disparity[y : y + th, x : x + tw])))
                if x - shift < 0:
                    continue
                a = views[0].crop((x, y, x + tw, y + th))
                b = views[1].crop((x - shift, y, x - shift + tw, y + th))
                name = f"stereo {tw}x{th} at {x},{y}"
                pairs.append(measure("shot", name, jpeg(a, 92), jpeg(b, 92), side))
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
    pairs = copy_pairs(args.side) + shot_pairs(args.side)
    n_copy = sum(p.kind == "copy" for p in pairs)
    n_shot = len(pairs) - n_copy
    today = sum(p.is_copy_today for p in pairs if p.kind == "shot")
    found = sum(p.is_copy_today for p in pairs if p.kind == "copy")
    print(f"{n_copy} copy pairs, {n_shot} second-shot pairs")
    print(f"copy check of today: {found}/{n_copy} copies found, "
          f"{today}/{n_shot} second shots called copies")  # fmt: skip
    print()
    print("| signal | copies | second shots | threshold | copies on their side "
          "| shots on their side |")  # fmt: skip
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for signal, copies_low in (
        ("correlation", False),
        ("shift_p90", True),
        ("shift_p90_fine", True),
        ("noise_corr", False),
    ):
        s = separation(pairs, signal, copies_low)
        print(
            f"| {signal} | {s['copy range'][0]:.3f}-{s['copy range'][1]:.3f} "
            f"| {s['shot range'][0]:.3f}-{s['shot range'][1]:.3f} "
            f"| {s['threshold']:.3f} | {s['copies']:.0%} | {s['shots']:.0%} |"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in pairs], indent=1))


if __name__ == "__main__":
    main()
