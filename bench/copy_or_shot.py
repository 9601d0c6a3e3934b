"""Copy or second shot? The signals that could tell them apart, measured (issue 33).

    python bench/copy_or_shot.py                 # ~3 minutes on 2 cores
    python bench/copy_or_shot.py --json out.json # each pair's figures too
    python bench/copy_or_shot.py --end-to-end DIR  # build + duplicates, ~4 min
    python bench/copy_or_shot.py --end-to-end DIR --edits-oldest  # the keeper's test
    python bench/copy_or_shot.py --end-to-end DIR --edit-copies   # edits copied too

Pairs of real photographs, from two packages:

- **copies**: scikit-image's photos, each against a copy made every way in
  pipeline.synthetic.COPY_MAKERS (resized, re-encoded, cropped, flipped,
  turned, rotated, brightened, colour-shifted, captioned) and edited every way
  in its EDIT_MAKERS (a sticker pasted, a watermark, re-encoded at quality 10,
  strong contrast, a thumbnail, sharpened), saved as JPEGs;
- **second shots**: tiles of scikit-image's stereo pair (two exposures of one
  scene from cameras 5 % of the frame apart: real parallax, each its own
  sensor noise). A tile of the left view is paired with the tile of the right
  view shifted by the tile's median disparity (from the pair's disparity
  map), so that the two frame the same part of the scene, as a second shot
  from a slightly moved camera does. Several tile sizes and places give
  pairs of one scene only;
- **OpenCV's sample photos** (Debian's ``opencv-doc``, in
  /usr/share/doc/opencv-doc/examples/data, or ``--opencv DIR``): real second
  exposures of kinds the stereo tiles lack, each pair as the package ships
  it: a chessboard held before a fixed camera, seen by two cameras at once
  (13 pairs) and moved between frames (12 pairs: a moved subject, a flat
  textured one); two frames of a video of two men throwing a ball (moved
  subject, camera still); Middlebury's RubberWhale pair (objects moved a few
  pixels); Middlebury's Aloe stereo pair; a graffiti wall from two
  viewpoints (flat textured subject); two phone photos of a street taken
  14 s apart (EXIF); two aerial views; two views of books on a desk. One
  real edit: a phone photo and its retouched, recropped copy (a sticker
  added; the same EXIF capture time). Copies are made of 14 of these
  photos every way, as of scikit-image's, and unrelated pairs taken among
  them;
- **generated photos** (pipeline.synthetic.write_photos: shapes on striped
  grounds), every ordered pair of 40 as unrelated pairs: a few corners alike
  in two of them can agree on a similarity under which each covers half of
  the other.

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

Also measured (printed as ranges, where the rest of the check says copy):

- ``differs``: the share of the footprint in a region where the two differ
  (a sticker, lettering: an edit; pipeline.geometry.differing_share), left
  out of the correlation where it took it under 0.8;
- ``moved``: patches of one image found a few pixels from where the
  similarity puts them, where the dense optical flow goes too
  (:func:`pipeline.geometry.moved_patches`), and
  ``drifted``: the blocks of the largest region that dense optical flow
  finds 0.6 px or more away (:func:`pipeline.geometry.drifted_region`),
  which the check uses too;
- not used by the check: ``noise``: the correlation of the two images' high frequencies
  (grey minus its Gaussian blur, sigma 1 px) over their flattest half, at
  full resolution, for pairs of one size that the rest of the check calls
  copies: a copy shares its original's sensor noise, a second exposure has
  its own;
- ``same_tables``: whether two JPEG files carry the same quantisation
  tables.

EXIF capture times decide where both files carry one (pipeline/exposure.py):
``exif_kind`` is the verdict with them, ``decided`` without.

Printed: what the check calls each pair, by situation, with copy precision
and recall and the share of second exposures called shots; each signal's
range per kind; the pairs it gets wrong. ``--end-to-end`` builds an index of
the sets' files and runs ``imgindex duplicates`` on it instead: pair
precision and recall of the copy groups, and where each second exposure
ends up.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


@dataclass
class Pair:
    kind: str  # "copy", "shot" or "other" (unrelated photos)
    name: str
    correlation: float
    inside: float
    is_copy_today: bool  # by the check without its measures of local motion
    shift_p90: float | None = None
    # Of all the similarities the check looks at (pipeline.geometry.lay):
    # the most inliers, and the largest cover of each image by the other.
    inliers: int = 0
    overlap: float = 0.0
    decided: str | None = None  # what `imgindex duplicates` calls the pair
    group: str = ""  # the situation the pair comes from
    moved: int | None = None
    drifted: int | None = None
    noise: float | None = None
    same_tables: bool | None = None
    exif_kind: str | None = None  # what it calls the pair with EXIF
    # share of the footprint in a region where the two differ (an edit); None: none
    differs: float | None = None
    # Of the check's alignment: distinct features among its inliers (up to
    # 12) and the places they lie in (pipeline.geometry._evidence).
    distinct: int = 0
    places: int = 0


def jpeg(image: Image.Image, quality: int = 90) -> io.BytesIO:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return buf


def grey_at(buf: io.BytesIO, side: int) -> np.ndarray:
    """The file's grey pixels as the check sees them, ``side`` on the longer
    side (pipeline.geometry.upright_grey)."""
    from imgindex.pipeline.geometry import upright_grey

    buf.seek(0)
    return upright_grey(buf, side)[0]


def features(buf: io.BytesIO, side: int):  # -> pipeline.geometry.Features
    """The check's features of the file, as `imgindex duplicates` finds them."""
    from imgindex.pipeline.geometry import image_features

    buf.seek(0)
    return image_features(buf, side)


def measure(kind: str, name: str, a_buf, b_buf, side: int, group: str = "") -> Pair:
    from imgindex.pipeline import geometry as g
    from imgindex.pipeline.duplicates import Checked
    from imgindex.pipeline.exposure import capture_of, same_exposure

    a, b = (features(buf, side) for buf in (a_buf, b_buf))
    inliers, overlap = matched(a, b)
    aligned = g.align(a, b)
    exposure = same_exposure(capture_of(a_buf), capture_of(b_buf))
    laid = g.lay(a, b)
    pair = Pair(kind, name, 0.0, 0.0, False, None, inliers, overlap, aligned.kind)
    pair.group, pair.same_tables = group, same_tables(a_buf, b_buf)
    pair.exif_kind = Checked(aligned, exposure).kind
    if laid is None:
        return pair
    alignment = laid.alignment
    pair.distinct, pair.places = alignment.distinct, alignment.places
    pair.correlation = round(alignment.correlation, 4)
    pair.inside = round(alignment.inside, 4)
    pair.differs = round(aligned.differs, 4) or None
    pair.is_copy_today = alignment.is_copy  # the check without local motion
    # At the check's scale: what `imgindex duplicates` decides on.
    motion = g.local_motion(laid, max(a.enlarged, b.enlarged))
    pair.shift_p90, pair.moved, pair.drifted = (
        motion["shift"],
        motion["moved"],
        motion["drifted"],
    )
    if alignment.is_copy:
        pair.noise = noise_correlation(laid, a_buf, b_buf)
    return pair


def same_tables(a_buf, b_buf) -> bool | None:
    """Whether two JPEG files carry the same quantisation tables (None: not
    both JPEG)."""
    tables = []
    for buf in (a_buf, b_buf):
        buf.seek(0)
        with Image.open(buf) as image:
            if image.format != "JPEG":
                return None
            tables.append(image.quantization)
    return tables[0] == tables[1]


def noise_correlation(laid, a_buf, b_buf) -> float | None:
    """Correlation of the aligned images' finest detail over their flattest
    half, at full resolution; None unless the two are one size (no
    resampling then mixes the noise of neighbouring pixels)."""
    import cv2

    src_buf, dst_buf = (b_buf, a_buf) if laid.b_onto_a else (a_buf, b_buf)
    sizes = []
    for buf in (src_buf, dst_buf):
        buf.seek(0)
        with Image.open(buf) as image:
            sizes.append(max(image.size))
    scale = float(np.sqrt(abs(np.linalg.det(laid.matrix[:, :2]))))
    if sizes[0] != sizes[1] or abs(scale - 1) > 0.02 or sizes[0] > 2048:
        return None
    src, dst = grey_at(src_buf, sizes[0]), grey_at(dst_buf, sizes[1])
    if laid.alignment.mirrored:  # lay mirrors a, whichever way it lies
        if laid.b_onto_a:
            dst = np.ascontiguousarray(dst[:, ::-1])
        else:
            src = np.ascontiguousarray(src[:, ::-1])
    # The check's transform, from its pixels to these (pixel centres).
    k = [
        np.array([[x, 0, (x - 1) / 2], [0, y, (y - 1) / 2], [0, 0, 1]])
        for x, y in (
            (img.shape[1] / low.shape[1], img.shape[0] / low.shape[0])
            for img, low in ((src, laid.src), (dst, laid.dst))
        )
    ]
    matrix = (k[1] @ np.vstack([laid.matrix, [0, 0, 1]]) @ np.linalg.inv(k[0]))[:2]
    h, w = dst.shape
    placed = cv2.warpAffine(src.astype(np.float32), matrix, (w, h))
    footprint = cv2.warpAffine(
        np.ones_like(src), matrix, (w, h), flags=cv2.INTER_NEAREST
    )
    target = dst.astype(np.float32)
    smooth = cv2.GaussianBlur(target, (0, 0), 2.0)
    gradient = np.hypot(
        cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    )
    inside = cv2.erode(footprint, np.ones((7, 7), np.uint8)) > 0
    flat = inside & (gradient <= np.percentile(gradient[inside], 50))
    flat &= (target > 10) & (target < 245)  # clipped pixels have no noise
    if flat.sum() < 1000:
        return None

    def detail(x: np.ndarray) -> np.ndarray:
        return (x - cv2.GaussianBlur(x, (0, 0), 1.0))[flat]

    return round(float(np.corrcoef(detail(placed), detail(target))[0, 1]), 3)


def matched(a, b) -> tuple[int, float]:
    """The most inliers of any similarity the check looks at between ``a``
    (or its mirror) and ``b`` (each RANSAC round, at both feature counts),
    and the largest share of each image the other covers (the smaller of
    the two ways) under one with MIN_INLIERS or more."""
    import cv2

    from imgindex.pipeline import geometry as g

    inliers, cover = 0, 0.0
    for fa, fb in ((a, b), (a.dense(), b.dense())):
        for x in (fa, fa.mirror()):
            for matrix, agree, _ in g._similarities(x, fb)[0]:
                back = cv2.invertAffineTransform(matrix)
                mutual = min(
                    g._inside(x.grey.shape, fb.grey.shape, matrix),
                    g._inside(fb.grey.shape, x.grey.shape, back),
                )
                inliers, cover = max(inliers, agree), max(cover, mutual)
    return inliers, round(cover, 4)


def copy_makers() -> list[tuple[str, str, Callable[[Image.Image], Image.Image]]]:
    """(situation, how, maker): the ways copies are made, usual and harder."""
    from imgindex.pipeline.synthetic import COPY_MAKERS, EDIT_MAKERS

    return [("made", how, make) for how, make in COPY_MAKERS.items()] + [
        ("edited", how, make) for how, make in EDIT_MAKERS.items()
    ]


def copy_pairs(side: int) -> list[Pair]:
    import skimage.data

    pairs = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        original = jpeg(image, 92)
        for way, how, make in copy_makers():
            pairs.append(
                measure("copy", f"{name} {how}", original, jpeg(make(image)), side,
                        f"{way}: {how}")
            )  # fmt: skip
    return pairs


def shot_pairs(side: int) -> list[Pair]:
    import skimage.data

    from imgindex.pipeline.synthetic import second_shots

    return [
        measure(
            "shot", name, jpeg(a, 92), jpeg(b, 92), side, "stereo tiles (scikit-image)"
        )
        for name, a, b in second_shots(*skimage.data.stereo_motorcycle())
    ]


def other_pairs(side: int) -> list[Pair]:
    """Unrelated photos: every two of PHOTOS, and each against a stereo tile."""

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


def generated_pairs(side: int) -> list[Pair]:
    """Unrelated generated photos (pipeline.synthetic.write_photos): shapes on
    striped grounds, whose few alike corners can agree on a similarity."""
    import tempfile

    from imgindex.pipeline.synthetic import write_photos

    with tempfile.TemporaryDirectory() as folder:
        files = [
            io.BytesIO(p.read_bytes())
            for p in write_photos(folder, 40, seed=2, max_side=600)
        ]
    return [
        measure("other", f"generated {i} ~ {j}", files[i], files[j], side, "generated")
        for i, j in itertools.permutations(range(len(files)), 2)
    ]


OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
# Photos of OpenCV's set that copies are made of.
OPENCV_PHOTOS = (
    "graf1.png", "leuvenA.jpg", "left01.jpg", "aloeL.jpg", "rubberwhale1.png",
    "basketball1.png", "baboon.jpg", "building.jpg", "fruits.jpg",
    "starry_night.jpg", "messi5.jpg", "home.jpg", "sudoku.png", "smarties.png",
)  # fmt: skip
_BOARD = ("01", "02", "03", "04", "05", "06", "07", "08", "09", "11", "12", "13", "14")
# (situation, pairs of files): real second exposures as the package ships them.
OPENCV_SHOTS = (
    ("chessboard, two cameras at once",
     [(f"left{k}.jpg", f"right{k}.jpg") for k in _BOARD]),
    ("chessboard moved between frames",
     [(f"left{a}.jpg", f"left{b}.jpg") for a, b in itertools.pairwise(_BOARD)]),
    ("video: people moving, camera still", [("basketball1.png", "basketball2.png")]),
    ("objects moved a few pixels (Middlebury)",
     [("rubberwhale1.png", "rubberwhale2.png")]),
    ("stereo pair (Middlebury Aloe)", [("aloeL.jpg", "aloeR.jpg")]),
    ("graffiti wall, new viewpoint", [("graf1.png", "graf3.png")]),
    ("phone, street, 14 s apart (EXIF)", [("leuvenA.jpg", "leuvenB.jpg")]),
    ("aerial, new viewpoint", [("aero1.jpg", "aero3.jpg")]),
    ("books on a desk, new viewpoint", [("left.jpg", "right.jpg")]),
)  # fmt: skip
OPENCV_EDITS = (
    ("retouched and recropped (EXIF)", [("ela_original.jpg", "ela_modified.jpg")]),
)
# Photos of distinct subjects, for unrelated pairs.
OPENCV_OTHERS = (
    "baboon.jpg", "fruits.jpg", "building.jpg", "messi5.jpg", "starry_night.jpg",
    "home.jpg", "stuff.jpg", "orange.jpg", "butterfly.jpg", "board.jpg",
    "graf1.png", "left01.jpg", "aloeL.jpg", "basketball1.png", "leuvenA.jpg",
    "aero1.jpg", "smarties.png", "sudoku.png", "squirrel_cls.jpg", "rubberwhale1.png",
)  # fmt: skip


def opencv_pairs(data: Path, side: int) -> list[Pair]:
    """Copies, real second exposures, a real edit and unrelated pairs of
    OpenCV's sample photos."""

    def read(name: str) -> io.BytesIO:
        return io.BytesIO((data / name).read_bytes())

    pairs = []
    for name in OPENCV_PHOTOS:
        image = Image.open(data / name).convert("RGB")
        for way, how, make in copy_makers():
            pairs.append(measure("copy", f"{name} {how}", read(name),
                                 jpeg(make(image)), side, f"{way}: {how}"))  # fmt: skip
    for kind, sets in (("shot", OPENCV_SHOTS), ("copy", OPENCV_EDITS)):
        for group, files in sets:
            for a, b in files:
                pairs.append(measure(kind, f"{a} ~ {b}", read(a), read(b), side, group))
    for a, b in itertools.combinations(OPENCV_OTHERS, 2):
        pairs.append(measure("other", f"{a} ~ {b}", read(a), read(b), side, "opencv"))
    return pairs


# The ways of making a copy that add something to a region of it.
EDITS_OF_A_REGION = ("stickered", "lettered", "captioned", "watermarked")


def end_to_end(
    data: Path, work: Path, edits_oldest: bool = False, edit_copies: bool = False
) -> None:
    """``imgindex build`` and ``imgindex duplicates`` (defaults, a
    LocalCluster) over every file of the sets above but the stereo tiles
    (the whole stereo pair instead); what the report groups, pair by pair,
    against what each pair is, and which images it keeps.

    ``edits_oldest``: the copies that add to a region are made older than
    every other file, so that a keeper chosen by size and file date alone
    would be one of them (an archive gathered from several disks has the
    dates of the copying); else each photo is written before its copies.

    ``edit_copies``: each of those copies is copied in turn, at half its
    size (a meme shared on), written after it."""

    import skimage.data
    from distributed import Client, LocalCluster

    import imgindex

    folder = work / "photos"
    folder.mkdir(parents=True)
    family: dict[str, str] = {}  # file: the photo it is a copy of (or is)
    scene: dict[str, str] = {}  # family: the scene it shows
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        image.save(folder / f"{name}.jpg", quality=92)
        family[f"{name}.jpg"] = name
        for _, how, make in copy_makers():
            make(image).convert("RGB").save(folder / f"{name}.{how}.jpg", quality=90)
            family[f"{name}.{how}.jpg"] = name
    left, right, _ = skimage.data.stereo_motorcycle()
    shots = [("stereo-left.jpg", "stereo-right.jpg")]
    for side, view in (("left", left), ("right", right)):
        Image.fromarray(view).save(folder / f"stereo-{side}.jpg", quality=92)
        family[f"stereo-{side}.jpg"] = f"stereo-{side}"
        scene[f"stereo-{side}"] = "motorcycle"
    originals = {
        n for _, files in OPENCV_SHOTS + OPENCV_EDITS for p in files for n in p
    }
    for name in sorted(originals | set(OPENCV_PHOTOS) | set(OPENCV_OTHERS)):
        (folder / name).write_bytes((data / name).read_bytes())
        family[name] = name
    for name in OPENCV_PHOTOS:
        image = Image.open(data / name).convert("RGB")
        stem = name.rsplit(".", 1)[0]
        for _, how, make in copy_makers():
            make(image).convert("RGB").save(folder / f"{stem}.{how}.jpg", quality=90)
            family[f"{stem}.{how}.jpg"] = name
    family["ela_modified.jpg"] = "ela_original.jpg"  # the one real edit
    edits = {f for f in family if f.rsplit(".", 2)[-2] in EDITS_OF_A_REGION}
    for name in edits if edits_oldest else ():
        os.utime(folder / name, ns=(10**18, 10**18))
    copied_edits: dict[str, str] = {}  # a copy of an edit: the edit
    for name in sorted(edits - {"ela_modified.jpg"}) if edit_copies else ():
        image = Image.open(folder / name)
        copy = name.removesuffix(".jpg") + ".half.jpg"
        image.resize((image.width // 2, image.height // 2)).save(
            folder / copy, quality=85
        )
        family[copy] = family[name]
        copied_edits[copy] = name
    for group, files in OPENCV_SHOTS:
        shots += files
        for a, b in files:
            # One scene: the chessboard's frames, or each pair's own.
            where = "chessboard" if group.startswith("chessboard") else a
            scene[a] = scene[b] = where
    with (
        LocalCluster(n_workers=2, threads_per_worker=1) as cluster,
        Client(cluster) as client,
    ):
        imgindex.build(folder, work / "out", client=client, progress=False)
        report = imgindex.open(work / "out" / "photos").duplicates(client=client)

    def same(x: str, y: str, by: dict) -> bool:
        return by.get(x, x) == by.get(y, y)

    called = [
        pair for g in report.groups for pair in itertools.combinations(
            sorted(m.path for m in g.members), 2)
    ]  # fmt: skip
    true = [
        pair for pair in itertools.combinations(sorted(family), 2)
        if same(*pair, family)
    ]  # fmt: skip
    right = [p for p in called if same(*p, family)]
    found = {frozenset(p) for p in called}
    took = report.stage_seconds.get("verify", 0.0)
    print(f"{len(family)} images, {len(report.groups)} copy groups, "
          f"{len(report.shots)} shot groups; {report.verified} candidate pairs "
          f"checked in {took:.1f} s on 2 workers")  # fmt: skip
    recall = sum(frozenset(p) in found for p in true) / len(true)
    print(f"copy pairs: precision {len(right) / len(called):.3f} "
          f"({len(called) - len(right)} of {len(called)} wrong), "
          f"recall {recall:.3f}")  # fmt: skip
    for p in called:
        if not same(*p, family):
            print(f"  grouped as copies: {p[0]} ~ {p[1]}")
    for p in true:
        if frozenset(p) not in found:
            print(f"  copies not grouped: {p[0]} ~ {p[1]}")
    keeper = {m.path: g.keeper.path for g in report.groups for m in g.members}
    shot_of = {m.path: i for i, g in enumerate(report.shots) for m in g.members}
    kinds = []
    for a, b in shots:
        ka, kb = keeper.get(a, a), keeper.get(b, b)
        if ka == kb:
            kinds.append("copy")
        elif ka in shot_of and shot_of.get(ka) == shot_of.get(kb):
            kinds.append("shot")
        else:
            kinds.append(None)
            print(f"  second exposure neither: {a} ~ {b}")
    print(f"second exposures: {kinds.count('shot')} of {len(shots)} shot, "
          f"{kinds.count('copy')} copy, {kinds.count(None)} neither")  # fmt: skip
    wrong = [
        (x.path, y.path) for g in report.shots
        for x, y in itertools.combinations(g.members, 2)
        if not same(family.get(x.path, x.path), family.get(y.path, y.path), scene)
    ]  # fmt: skip
    print(f"shot groups joining different scenes: {len(wrong)} pairs {wrong[:5]}")
    from imgindex.pipeline.duplicates import _keeper_order

    by_date = [min(g.members, key=_keeper_order).path for g in report.groups]
    kept = [path for g in report.groups for path in g.edited]
    print(f"keepers that are an edit of a region: "
          f"{sum(g.keeper.path in edits for g in report.groups)} of "
          f"{len(report.groups)} groups (by size and file date alone: "
          f"{sum(path in edits for path in by_date)}); members kept as edits: "
          f"{len(kept)}, {sum(path in edits for path in kept)} of them edits "
          f"(of {len(edits & set(keeper))} grouped); removable: "
          f"{report.removable}")  # fmt: skip
    lost = [
        m.path for g in report.groups if g.keeper.path in edits
        for m in g.members[1:] if family[m.path] == m.path and m.path not in kept
    ]  # fmt: skip
    print(f"photos suggested for removal while an edit of them is kept: {len(lost)}")
    if copied_edits:
        going = {p: of for g in report.groups for p, of in g.edit_copies.items()}
        grouped = [c for c in copied_edits if c in keeper]
        print(
            f"copies of edits: {len(grouped)} of {len(copied_edits)} grouped; "
            f"{sum(going.get(c) == copied_edits[c] for c in grouped)} could go "
            f"as a copy of their edit, kept, "
            f"{sum(c in going and going[c] != copied_edits[c] for c in grouped)} "
            f"as a copy of another, {sum(c in kept for c in grouped)} kept as "
            f"edits, {sum(keeper[c] == c for c in grouped)} keepers"
        )
    for g in report.groups:
        if g.keeper.path in edits or set(g.edited) - edits:
            print(f"  kept: {g.keeper.path} and {g.edited}")


def ranges(pairs: list[Pair], signal: str) -> str:
    values = [getattr(p, signal) for p in pairs if getattr(p, signal) is not None]
    if not values:
        return "-"
    shown = "{:.2f}-{:.2f}" if isinstance(values[0], float) else "{}-{}"
    return f"{shown.format(min(values), max(values))} ({len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--opencv", type=Path, default=OPENCV,
                        help="OpenCV's sample data (Debian: opencv-doc)")  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--end-to-end",
        type=Path,
        metavar="DIR",
        help="build and run `duplicates` over the sets' files in DIR (new) instead",
    )
    parser.add_argument(
        "--edits-oldest",
        action="store_true",
        help="with --end-to-end: make the copies that add to a region (a sticker, "
        "lettering, a caption, a watermark) the oldest files",
    )
    parser.add_argument(
        "--edit-copies",
        action="store_true",
        help="with --end-to-end: copy each of those copies again, at half size",
    )
    args = parser.parse_args()
    if args.end_to_end:
        return end_to_end(
            args.opencv, args.end_to_end, args.edits_oldest, args.edit_copies
        )
    pairs = copy_pairs(args.side) + shot_pairs(args.side) + other_pairs(args.side)
    pairs += generated_pairs(args.side)
    if (args.opencv / "graf1.png").exists():
        pairs += opencv_pairs(args.opencv, args.side)
    else:
        print(
            f"{args.opencv} not found (apt install opencv-doc): its pairs are left out"
        )
    print("What `imgindex duplicates` calls each pair, by pixels (with EXIF where both")
    print("files carry a capture record):")
    print()
    print("| pairs | situation | called copy | called shot | neither |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind in ("copy", "shot", "other"):
        of = [p for p in pairs if p.kind == kind]
        groups = sorted(
            {p.group for p in of}, key=lambda g: [p.group for p in of].index(g)
        )
        for group in [None, *groups]:
            rows = of if group is None else [p for p in of if p.group == group]
            called = [
                " ".join(
                    [str(sum(p.decided == k for p in rows))]
                    + ([f"({sum(p.exif_kind == k for p in rows)})"]
                       if any(p.exif_kind != p.decided for p in rows) else [])
                )
                for k in ("copy", "shot", None)
            ]  # fmt: skip
            label = (
                f"**all {len(rows)} {kind}**"
                if group is None
                else f"{len(rows)} {kind}"
            )
            print(f"| {label} | {group or ''} | {' | '.join(called)} |")
    print()
    for by in ("decided", "exif_kind"):
        called = [p for p in pairs if getattr(p, by) == "copy"]
        copies = [p for p in pairs if p.kind == "copy"]
        shots = [p for p in pairs if p.kind == "shot"]
        right = sum(p.kind == "copy" for p in called)
        as_shot = sum(getattr(p, by) == "shot" for p in shots) / len(shots)
        print(
            f"{'by pixels' if by == 'decided' else 'with EXIF'}: copy precision "
            f"{right / len(called):.3f}, recall {right / len(copies):.3f}; "
            f"second exposures called shot {as_shot:.3f}, "
            f"called copy {sum(getattr(p, by) == 'copy' for p in shots)}"
        )
    others = [p for p in pairs if p.kind == "other"]
    for group in sorted({p.group for p in others}):
        of = [p for p in others if p.group == group]
        reach = [p for p in of if p.inliers >= 12]
        cover = [p for p in reach if p.overlap >= 0.5]
        print(f"unrelated pairs ({group or 'scikit-image'}): {len(reach)} of {len(of)} "
              f"reach 12 inliers; the largest cover of each by the other under any "
              f"similarity {max(p.overlap for p in of):.3f}"
              + (f"; {len(cover)} cover half of each other, their inliers "
                 f"{ranges(cover, 'distinct')} distinct features in "
                 f"{ranges(cover, 'places')} places" if cover else ""))  # fmt: skip
    called = [p for p in pairs if p.kind == "shot" and p.decided == "shot"]
    print(
        f"second exposures called shots: inliers in {ranges(called, 'places')} "
        "places (another shot needs 12 distinct features in 5)"
    )
    print()
    print("Signals (min-max (pairs measured)) of pairs the rest of the check")
    print("calls copies; JPEG tables of all pairs of two JPEG files:")
    print()
    print("| pairs | differing region | shift p90 px | moved patches | drifted blocks "
          "| noise correlation | same tables |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in ("copy", "shot"):
        rows = [p for p in pairs if p.kind == kind and p.is_copy_today]
        tables = [
            p.same_tables for p in pairs if p.kind == kind and p.same_tables is not None
        ]
        print(
            f"| {len(rows)} {kind} | {ranges(rows, 'differs')} "
            f"| {ranges(rows, 'shift_p90')} "
            f"| {ranges(rows, 'moved')} | {ranges(rows, 'drifted')} "
            f"| {ranges(rows, 'noise')} "
            f"| {sum(tables)} of {len(tables)} |"
        )
    for p in pairs:
        if (
            (p.kind == "copy") != (p.exif_kind == "copy")
            or p.kind == "shot"
            and p.decided != "shot"
        ):
            print(f"  {p.kind} {p.name} ({p.group}): called {p.decided}, "
                  f"with EXIF {p.exif_kind}; inliers {p.inliers}, overlap "
                  f"{p.overlap}, corr {p.correlation}, shift {p.shift_p90}, "
                  f"moved {p.moved}, drifted {p.drifted}, noise {p.noise}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in pairs], indent=1))


if __name__ == "__main__":
    main()
