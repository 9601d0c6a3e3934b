"""Is one image a copy of (part of) another, or another shot of the same scene?
A geometric check for candidate pairs.

A copy keeps its original's geometry up to a similarity: it may be resized,
cropped, turned, mirrored or slightly rotated, but what it shows sits where
it sat in the original. Another photo of the same scene does not: the camera
moved, so either each image shows what the other lacks (a pan) or near and
far things shift against each other (parallax). So a pair is a copy when

1. ORB features of the two images match under one similarity transform
   (RANSAC), of one image or its mirror image onto the other;
2. that transform puts (almost) all of one image inside the other, where
   it covers at least MIN_COPY_COVER of it (not a speck), and
3. over that footprint the aligned grey levels correlate strongly, which
   brightness, colour shifts and re-encoding do not change and a caption
   covering part of the image changes only a little (a vignette's smooth
   gain is fitted, and a pasted sticker, which can change it much, left
   out: :func:`_correlation`); and
4. what one image shows sits where the transform puts it, to a fraction of
   a pixel, wherever the other image shows it too (:func:`residual_shift`):
   a second shot from a slightly moved camera can frame the scene alike and
   correlate as well as a copy, but leaves parallax and perspective; and
5. no more than MAX_MOVED patches show what the other image shows a few
   pixels away, where the dense optical flow finds them too and their own
   image does not show them (:func:`moved_patches`): a second exposure of
   a moving subject from a camera held still aligns to the pixel but for
   the subject; and
6. no region of more than MAX_DRIFTED blocks drifted as one by more than
   half a pixel (:func:`drifted_region`): objects moved by about a pixel
   pass steps 4 and 5.

Measured on the duplicates test set (pipeline.synthetic.write_copy_set: 9
photos, 10 kinds of copy each, 2 pairs of panned views) plus scikit-image's
stereo pair: aligned copies correlate at 0.86 or more (0.86-0.89 only for a
caption over a night sky), unrelated photos at most 0.61, the stereo pair's
two views 0.75; panned views cover 75 % of each other and fail step 2.
Tiles of the stereo pair framed on one part of the scene (real second
shots, bench/copy_or_shot.py) correlate at up to 0.95 and pass steps 1-3
half the time; their residual shift is 2.2-5.4 pixels.

OpenCV's sample photos (Debian's opencv-doc; bench/copy_or_shot.py) add real
second exposures of other kinds: a chessboard seen by two cameras and moved
between frames, a video's two frames of people moving before a still camera,
Middlebury's stereo and moved-objects pairs, a graffiti wall from two
viewpoints. Over 376 copies of 20 photos and the 14 second exposures that
pass steps 1-3, step 4 (once the shift field's smooth part, an error of the
transform, is taken out) leaves copies at 0.60 px at most, shots at
0.89-4.3 (RubberWhale's objects, moved by a pixel, the least), so step 4
allows 0.75. (Until each patch was windowed into a copy of its own, the
phase correlation windowed the images in place, the patches overlapping:
copies measured up to 0.55 px and shots from 0.30.) Over 376 copies of 20
photos made 19 ways (harder edits too: a sticker, a watermark, quality 10,
thumbnails, a vignette, lettering), step 5 finds at most 1 moved
patch in a copy (up to 19 in a stickered or watermarked one before the
patches had to agree with the dense optical flow, 2 before they had to be
distinct) and 14 or more in every shot but one: Middlebury's RubberWhale,
whose objects move about a pixel at this scale. Step 6 follows each block of
16 pixels by that flow: it finds regions of at most 4 drifted blocks in a
copy, here and there; in every second exposure that passes steps 1-3,
RubberWhale's included, 49 or more; and 9 or more between RubberWhale's
second frame and a copy of its first (re-encoded at quality 10,
watermarked, a quarter cropped), which the report would otherwise join to
the first frame's group of copies.

A copy that differs from the other image in a region (a sticker, lettering,
a caption, a retouched spot) is an edit of it, or it of the copy: its pair's
``differs`` says how much (:func:`differing_share`), so that the report keeps
both.

A pair that is no copy is **another shot of the same scene** when step 1
finds a similarity under which each image covers at least MIN_SHOT_OVERLAP
of the other, and which MIN_INLIERS distinct features agree on, lying in
MIN_PLACES places (cells of _PLACE pixels) of each image, or under which
they correlate as a copy would (step 3): the same things, seen again from a
moved camera (parallax), moved, or framed otherwise.
(Each way: a similarity that shrinks one image to a speck lays all of it
inside the other.) On the same sets every stereo tile pair qualifies
(88-505 inliers, 93-100 % covered). Of 211 pairs of unrelated photos
(scikit-image's and OpenCV's), 9 reach 12 inliers (43 at most: a
chessboard's corners), but under none of those similarities does one image
cover a thousandth of the other, where the real second exposures called
shots cover 53 % or more. Generated photos (shapes on striped grounds) do:
of 2,900, 57 pairs of unrelated ones that `duplicates` checked had 12-22
inliers under a similarity covering half of each or more, all in one small
patch of each image (a shape's corner on the stripes, found again at
several scales of ORB's pyramid), which fits almost any similarity: 2-12
distinct features (closer than _SAME_FEATURE pixels counting once) in 2-6
places. The real second exposures agree in 13 or more distinct features,
in 6 or more places (bench/copy_or_shot.py). A panned view of a photo is
another shot too.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image

from imgindex.pipeline.decode import load_rgb

SIDE = 384  # pixels on the longer side the check works at (any image)
MIN_INLIERS = 12  # matched features agreeing on the transform
MIN_INSIDE = 0.9  # share of one image that must land inside the other
MIN_SHOT_OVERLAP = 0.5  # ... for another shot of the scene (see the docstring)
# Inliers closer than this (pixels at SIDE) are one feature: ORB finds a
# corner again at several scales of its pyramid.
_SAME_FEATURE = 3.0
# Places (cells of _PLACE pixels at SIDE) the inliers of another shot must
# lie in, in each image (see the docstring).
MIN_PLACES = 5
_PLACE = 32
# Share of the larger image a copy must cover. A crop keeping a quarter of a
# photo covers 0.25 (0.248 the least measured, bench/copy_or_shot.py). Laid
# as a speck inside the other, an image lies wholly inside it and its few
# blurred pixels correlate at anything up to 1.0: repeated texture (stripes, a
# page of text) let 17-38 features agree on such similarities, covering
# 0.002-0.004, between unrelated images of low cosine, which `duplicates`
# never checks and `search --copies` does (bench/search_kinds.py).
MIN_COPY_COVER = 0.05
MIN_CORRELATION = 0.8  # of the aligned grey levels (see the module docstring)
# Share of the footprint one region where the images differ (a sticker) may
# cover and be left out of the correlation: stickers of a ninth of a photo
# covered 0.09-0.13 of it (bench/copy_or_shot.py).
MAX_DIFFERING = 0.2
_DIFFERING = 1.5  # a block's mean squared difference of the scaled grey levels
_REST_CORRELATION = 0.9  # of the rest, for a region to be left out
# The same for a region that shows an edit between two copies
# (differing_share): copies made without one showed none under 0.6.
_EDITED = 0.8
# Pixels (90th percentile over the footprint's patches) that what one image
# shows may sit away from where the similarity puts it (see the docstring).
MAX_SHIFT = 0.75
# Patches of a copy's footprint found moved in the other image (see
# moved_patches): a copy had at most 1 of the 376 measured, a moved subject
# 14 and a stereo tile 16 or more (bench/copy_or_shot.py); half a video
# frame, cropped, shows 3 or 4 against the next frame (an arm moved).
MAX_MOVED = 2
# Blocks of one region found drifted (drifted_region): copies had at most 4,
# second exposures 9 or more (bench/copy_or_shot.py).
MAX_DRIFTED = 5
_DRIFT = 0.6  # pixels a block must drift to count (drifted_region)
_MOVED_PATCH = 16  # pixels of a patch (moved_patches) or block (drifted_region)
_MOVED_REACH = 12  # pixels a patch is looked for around its place
# How much better a moved patch must match the other image than its own
# image at the same place (moved_patches).
_DISTINCT = 0.1
_PATCH = 32  # pixels of a patch of the residual shift field
_FOUND = 0.6  # correlation of a patch, moved by its shift, with the other's
_FEATURES = 1000
# Features of a second look at a pair the first finds nothing in: a scene's
# strongest corners (a chessboard's) can crowd out the rest of it.
_DENSE_FEATURES = 2000
# Matches (Lowe's test passed) of the first look that call for the second
# when it finds nothing: where a scene's strongest corners are all on one
# thing, they match each other. Unrelated photos match few: 18 at the
# median, 39 at the 90th percentile, 84 at most of 1,771 pairs (real and
# generated) and 72 of 1,500 candidate pairs of 2,900 generated photos; the
# six pairs only the second look found another shot in, 57-209
# (bench/copy_or_shot.py's photos). For an unrelated pair the second look
# took a third of the check's time, reading the images included.
_SECOND_LOOK_MATCHES = 40
_RATIO = 0.8  # Lowe's ratio test for a feature match
_MODELS = 3  # similarities looked for among a pair's matches
_BLUR = 1.5  # pixels (sigma): aligned pixels need not agree exactly
# Enlargement past which both images of a pair are compared at the smaller's
# detail (align): more than a large photo's draft decode makes.
_ENLARGED = 2.0


@dataclass
class Features:
    """One image's grey pixels and ORB features, and those of its mirror image.

    Given a ``load`` that makes its grey pixels again, it can let go of them
    (:meth:`shed_pixels`): most of its memory, and needed only where a
    pair's features agree on a transform or call for the second look
    (:func:`align`).
    """

    _grey: np.ndarray | None  # uint8, longer side SIDE (``grey``)
    points: np.ndarray  # float32 (n, 2)
    descriptors: np.ndarray | None  # uint8 (n, 32); None: no features found
    wanted: int = _FEATURES  # the most features looked for
    # How many times the pixels at hand were enlarged to make ``grey`` (1 or
    # less: not enlarged): a thumbnail holds no detail finer than its pixels.
    enlarged: float = 1.0
    _mirror: Features | None = field(default=None, repr=False)
    _dense: Features | None = field(default=None, repr=False)
    load: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    shape: tuple[int, ...] = field(init=False)  # of ``grey``, kept when shed

    def __post_init__(self) -> None:
        self.shape = () if self._grey is None else self._grey.shape

    @property
    def grey(self) -> np.ndarray:
        if self._grey is None:
            if self.load is None:
                raise ValueError("these features were given no grey pixels")
            self._grey = self.load()
        return self._grey

    @property
    def decidable(self) -> bool:
        """Whether it has enough features to be matched at all (flat images do not)."""
        return self.descriptors is not None and len(self.descriptors) >= MIN_INLIERS

    def mirror(self) -> Features:
        if self._mirror is None:
            self._mirror = features_of(
                np.ascontiguousarray(self.grey[:, ::-1]), self.wanted, self.enlarged
            )
            of = weakref.ref(self)  # not a cycle: freed as soon as let go
            self._mirror.load = lambda: np.ascontiguousarray(of().grey[:, ::-1])
        return self._mirror

    def dense(self) -> Features:
        """The same image with up to _DENSE_FEATURES features."""
        if self.wanted >= _DENSE_FEATURES:
            return self
        if self._dense is None:
            self._dense = features_of(self.grey, _DENSE_FEATURES, self.enlarged)
            of = weakref.ref(self)
            self._dense.load = lambda: of().grey
        return self._dense

    def shed_pixels(self) -> None:
        """Let go of the grey pixels, its mirror image's and its denser
        features', where ``load`` can make them again; the features stay."""
        if self.load is None:
            return
        self._grey = None
        for other in (self._mirror, self._dense):
            if other is not None:
                other.shed_pixels()


@dataclass(frozen=True)
class Alignment:
    """The best way found to lay one image of a pair onto the other."""

    correlation: float  # of the aligned grey levels; 0 where none was found
    inside: float  # share of the laid image inside the other
    inliers: int
    mirrored: bool
    # The residual shift (pixels, 90th percentile) once aligned; None where
    # too little of the footprint has texture to measure it.
    shift: float | None = None
    # The smaller share of either image the other covers: a crop lies inside
    # its original (inside 1) but covers little of it; two shots of one
    # scene cover much of each other.
    mutual: float = 0.0
    # Patches whose content sits elsewhere in the other image
    # (moved_patches); None where not measured.
    moved: int | None = None
    # Blocks of the largest region that drifted as one (drifted_region);
    # None where not measured.
    drifted: int | None = None
    # Distinct features among the inliers (counted up to MIN_INLIERS, all
    # the rule for another shot needs) and the places they lie in: the
    # fewer of either image's (_evidence).
    distinct: int = 0
    places: int = 0
    # The share of the footprint in the largest region where the two
    # differ (a sticker, lettering, a retouched spot: one is an edit of the
    # other): left out of the correlation where it took it under
    # MIN_CORRELATION (_correlation), else measured for copies
    # (differing_share).
    differs: float = 0.0

    @property
    def could_copy(self) -> bool:
        """Whether the alignment lays one image as a copy would, before its
        local motion is measured."""
        return (
            _lies_as_copy(self.inside, self.mutual)
            and self.correlation >= MIN_CORRELATION
        )

    @property
    def is_copy(self) -> bool:
        return (
            self.inliers >= MIN_INLIERS
            and self.could_copy
            and (self.shift is None or self.shift <= MAX_SHIFT)
            and (self.moved is None or self.moved <= MAX_MOVED)
            and (self.drifted is None or self.drifted <= MAX_DRIFTED)
        )

    @property
    def kind(self) -> str | None:
        """``copy``, ``shot`` (another shot of the scene), or None (unrelated
        as far as the pixels tell)."""
        if self.is_copy:
            return "copy"
        if self.could_be_shot:
            return "shot"
        return None

    @property
    def could_be_shot(self) -> bool:
        """Whether the two cover each other under a similarity that enough
        distinct features, spread over the images, agree on, or under which
        they correlate as a copy would (a plain picture's copy, with few
        features, that its local motion takes for no copy)."""
        spread = self.distinct >= MIN_INLIERS and self.places >= MIN_PLACES
        return (
            self.inliers >= MIN_INLIERS
            and self.mutual >= MIN_SHOT_OVERLAP
            and (spread or self.could_copy)
        )


NO_ALIGNMENT = Alignment(0.0, 0.0, 0, False)


def _lies_as_copy(inside: float, mutual: float) -> bool:
    """Whether one image lies in the other as a copy would: (almost) all of
    it inside, covering more than a speck."""
    return inside >= MIN_INSIDE and mutual >= MIN_COPY_COVER


def image_features(path: str | os.PathLike | BinaryIO, side: int = SIDE) -> Features:
    """Load ``path`` (or an open image file) upright at ``side`` pixels and
    find its features.

    Raises DecodeError (pipeline.errors) for what is not a usable image.
    """
    grey, enlarged = upright_grey(path, side)
    return features_of(grey, enlarged=enlarged)


def upright_grey(
    path: str | os.PathLike | BinaryIO, side: int = SIDE
) -> tuple[np.ndarray, float]:
    """``path`` upright and grey, ``side`` pixels on its longer side, and how
    many times the pixels at hand were enlarged to get there.

    A JPEG is decoded at a reduced size (draft) whose shorter side still
    covers half of ``side``, so that takes up to 2 for a large photo.
    """
    image = load_rgb(path, side // 2)
    # Small images are scaled up too: ORB finds too few features in a thumbnail.
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.convert("L").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image), scale


def features_of(
    grey: np.ndarray, wanted: int = _FEATURES, enlarged: float = 1.0
) -> Features:
    import cv2

    # Dask runs one task per worker thread: OpenCV's own threads would only
    # compete with them.
    cv2.setNumThreads(1)
    orb = cv2.ORB_create(nfeatures=wanted, fastThreshold=10)
    keypoints, descriptors = orb.detectAndCompute(grey, None)
    points = np.float32([k.pt for k in keypoints]).reshape(-1, 2)
    return Features(grey, points, descriptors, wanted, enlarged)


def align(a: Features, b: Features) -> Alignment:
    """The best alignment of ``a`` or its mirror image with ``b``, either way
    round, with the local motion left between them where the rest says copy,
    and for a copy the share where the two differ (an edit)."""
    laid = lay(a, b)
    if laid is None:
        return NO_ALIGNMENT
    if not laid.alignment.is_copy:  # no copy already: the rest (60 ms) is moot
        return laid.alignment
    motion = local_motion(laid, max(a.enlarged, b.enlarged))
    found = dataclasses.replace(laid.alignment, **motion)
    if found.is_copy and not found.differs:
        found = dataclasses.replace(found, differs=differing_share(laid))
    return found


def local_motion(laid: Laid, enlarged: float = 1.0) -> dict[str, float | int | None]:
    """What is left between the two images of ``laid`` once aligned: the
    residual ``shift``, the ``moved`` patches and the ``drifted`` region,
    as :class:`Alignment` names them. ``enlarged``: the most either image was
    enlarged to SIDE (Features.enlarged)."""
    import cv2

    src, dst, matrix = laid.src, laid.dst, laid.matrix
    if enlarged > _ENLARGED:
        # Both at the detail the smaller holds: a thumbnail's interpolation
        # against its original's detail reads as local motion (of copies
        # 96 px on the longer side, 4 of 20 drifted or shifted, 0 once both
        # were blurred so).
        src, dst = (cv2.GaussianBlur(x, (0, 0), 0.7 * enlarged) for x in (src, dst))
    flow = dense_flow(src, dst, matrix)
    return {
        "shift": residual_shift(src, dst, matrix),
        "moved": moved_patches(src, dst, matrix, flow),
        "drifted": drifted_region(src, dst, matrix, flow),
    }


@dataclass(frozen=True)
class Laid:
    """The best alignment found, and how: ``matrix`` lays ``src`` (``b``'s
    grey pixels where ``b_onto_a``, else ``a``'s, mirrored where the
    alignment is) onto ``dst``."""

    alignment: Alignment
    b_onto_a: bool
    matrix: np.ndarray
    src: np.ndarray
    dst: np.ndarray


def lay(a: Features, b: Features) -> Laid | None:
    """:func:`align` without measuring the local motion, and the
    transform found (None where no similarity lays MIN_INSIDE of one image
    inside the other or covers MIN_SHOT_OVERLAP of each with the other).

    Where the features find nothing, though many of them match, a second
    look with _DENSE_FEATURES: the strongest corners of a scene can all be
    on one thing (a chessboard moved between two frames), leaving the rest
    of it unmatched. Unrelated photos match few features, and pay for it
    only where they match _SECOND_LOOK_MATCHES.
    """
    laid, matched = _lay(a, b)
    if (laid is None or laid.alignment.kind is None) and (
        matched >= _SECOND_LOOK_MATCHES
    ):
        again, _ = _lay(a.dense(), b.dense())
        if again is not None and (
            laid is None or _rank(again.alignment) > _rank(laid.alignment)
        ):
            return again
    return laid


def _lay(a: Features, b: Features) -> tuple[Laid | None, int]:
    """:func:`lay` with ``a``'s and ``b``'s features as they are, and the
    most features matched (of ``a`` or its mirror image).

    Each of the similarities that :func:`_similarities` finds, of ``a`` or
    its mirror image onto ``b``, is tried either way round. One that could
    make a copy wins (of those, the one with most inliers), then one under
    which the two cover each other, then the best correlated.
    """
    import cv2

    best: Laid | None = None
    matched = 0
    for mirrored, x in ((False, a), (True, a.mirror())):
        similarities, matches = _similarities(x, b)
        matched = max(matched, matches)
        for matrix, inliers, (distinct, places) in similarities:
            # x laid onto b (a crop of b, or a resized b), and b laid onto x.
            ways = (
                (x, b, matrix, False),
                (b, x, cv2.invertAffineTransform(matrix), True),
            )
            insides = [_inside(src.shape, dst.shape, m) for src, dst, m, _ in ways]
            mutual = min(insides)
            for (src, dst, m, b_onto_a), inside in zip(ways, insides, strict=True):
                copy_like = _lies_as_copy(inside, mutual)
                if not copy_like and mutual < MIN_SHOT_OVERLAP:
                    continue  # neither a copy nor another shot: a speck, say
                correlation, differs = _correlation(src.grey, dst.grey, m, copy_like)
                found = Alignment(
                    correlation,
                    inside,
                    inliers,
                    mirrored,
                    mutual=mutual,
                    differs=differs,
                    distinct=distinct,
                    places=places,
                )
                if best is None or _rank(found) > _rank(best.alignment):
                    best = Laid(found, b_onto_a, m, src.grey, dst.grey)
    return best, matched


def _rank(found: Alignment) -> tuple[bool, int, bool, float]:
    could_copy = found.could_copy
    # Of the ways a copy could lie, the one most features agree on is the
    # most exact (RANSAC's leftovers can fit the same way a little off).
    agree = found.inliers if could_copy else 0
    return (could_copy, agree, found.could_be_shot, found.correlation)


def residual_shift(
    src: np.ndarray, dst: np.ndarray, matrix: np.ndarray
) -> float | None:
    """How far what ``src`` shows sits from where ``matrix`` lays it on
    ``dst``: the 90th percentile, in pixels, of the shifts of its patches
    (phase correlation, sub-pixel) over the footprint, of those found again
    in ``dst`` (:func:`_found_there`); None where fewer than 5 patches have
    texture enough to tell.

    A copy is a similarity of its original: what is left is interpolation,
    a tenth of a pixel to half of one (bench/copy_or_shot.py). A second shot
    of the scene from a moved camera leaves parallax and perspective: near
    and far things shift against each other, more than half a pixel at this
    scale in every stereo tile measured.
    """
    import cv2

    h, w = dst.shape
    placed = cv2.warpAffine(src.astype(np.float32), matrix, (w, h))
    footprint = _footprint(src, matrix, (w, h))
    target = dst.astype(np.float32)
    window = cv2.createHanningWindow((_PATCH, _PATCH), cv2.CV_32F)
    found = []  # patch centre x, y and its shift dx, dy
    step = _PATCH // 2
    ys, xs = np.arange(0, h - _PATCH + 1, step), np.arange(0, w - _PATCH + 1, step)
    usable = (
        _window_all(footprint, ys, xs, _PATCH)
        # flat: no shift to measure
        & (_window_std(placed, ys, xs, _PATCH) >= 4)
        & (_window_std(target, ys, xs, _PATCH) >= 4)
    )
    for i, j in np.argwhere(usable):
        y, x = int(ys[i]), int(xs[j])
        # Windowed here, into copies: given the window, OpenCV's
        # phaseCorrelate multiplies its inputs by it in place where their
        # size is a DFT size already (32 is), and these are views: each
        # patch would window the half of the next that it overlaps, again and
        # again, and _found_there would read windowed images.
        p = placed[y : y + _PATCH, x : x + _PATCH] * window
        q = target[y : y + _PATCH, x : x + _PATCH] * window
        (dx, dy), response = cv2.phaseCorrelate(p, q)
        if response >= 0.2:  # a peak, not noise
            found.append((x + step, y + step, dx, dy))
    found = np.array(found).reshape(-1, 4)
    found = found[_found_there(placed, target, found)]
    if len(found) < 5:
        return None
    return float(np.percentile(_local(found), 90))


def _found_there(
    placed: np.ndarray, target: np.ndarray, found: np.ndarray
) -> np.ndarray:
    """Which patches (rows of centre x, y and shift dx, dy) of ``placed``,
    moved by their shift, show what ``target`` shows there: normalised
    correlation _FOUND or more over the patch's central block (of _PATCH / 2
    pixels: the patches overlap by half, their central blocks do not).

    Where one does not (a meme's lettering, a sticker), its shift measures
    nothing: lettering over a copy read as 0.6-1.0 px of shift.
    """
    half = _PATCH // 4
    h, w = target.shape
    shift_x, shift_y = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    blocks = []
    for x, y, dx, dy in found:
        block = (
            slice(int(y) - half, int(y) + half),
            slice(int(x) - half, int(x) + half),
        )
        shift_x[block], shift_y[block] = dx, dy
        blocks.append(block)
    if not blocks:
        return np.zeros(0, bool)
    moved = _followed(placed, -shift_x, -shift_y)
    here = np.stack([moved[b].ravel() for b in blocks])
    there = np.stack([target[b].ravel() for b in blocks])
    return _correlations(here, there) >= _FOUND


def _local(found: np.ndarray) -> np.ndarray:
    """The shifts (rows of x, y, dx, dy) less the affine field that fits
    most of them: RANSAC's similarity, fit to features found at this scale,
    can be a few hundredths of a degree or pixel off, which leaves a smooth
    shift across the image (up to 0.8 px in a turned copy); what is left is
    local, as parallax and moved things are."""
    at = np.c_[found[:, :2], np.ones(len(found))]
    keep = np.ones(len(found), bool)
    for _ in range(3):  # refit without the patches that fit worst
        fit, *_ = np.linalg.lstsq(at[keep], found[keep, 2:], rcond=None)
        left = np.hypot(*(found[:, 2:] - at @ fit).T)
        keep = left <= max(0.5, float(np.percentile(left, 75)))
    return left


def dense_flow(src: np.ndarray, dst: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Where each pixel of ``src`` (uint8 grey), laid on ``dst`` by
    ``matrix``, went in ``dst``: (h, w, 2) shifts, x then y, by OpenCV's DIS
    optical flow.

    Both images are normalised to local contrast first: the flow assumes
    grey levels that stay, which a brightened copy's do not.
    """
    import cv2

    h, w = dst.shape
    placed = cv2.warpAffine(src, matrix, (w, h))
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(
        _contrast_normalised(placed), _contrast_normalised(dst), None
    )


def moved_patches(
    src: np.ndarray, dst: np.ndarray, matrix: np.ndarray, flow: np.ndarray
) -> int:
    """How many patches of ``src``, laid on ``dst`` by ``matrix``, show what
    ``dst`` shows a few pixels away rather than in their place.

    A copy's content sits where the similarity puts it; where a copy differs
    from its original (a caption, a retouched spot) the new content is found
    nowhere near. A second exposure of a moving subject (an arm, a ball) or
    from a moved camera (near things against far ones) shows the same
    content displaced: the patch matches badly in place (normalised
    correlation < 0.6, so brightness and colour changes do not count) and
    well (>= 0.85) two or more pixels away, where the :func:`dense_flow`
    goes too (within 2 pixels), and _DISTINCT better than its own image
    does there. Without the flow's word, a watermark's letters or a
    sticker's smooth texture found a chance match near their place in 4 to
    19 patches of a copy; with it, in 3 at most; a smooth gradient shows
    itself a few pixels away too, and once the match had to be distinct, 1
    at most (bench/copy_or_shot.py, tests/test_duplicates.py).
    """
    import cv2

    size, reach = _MOVED_PATCH, _MOVED_REACH
    h, w = dst.shape
    placed = cv2.warpAffine(
        cv2.GaussianBlur(src.astype(np.float32), (0, 0), 1.0), matrix, (w, h)
    )
    footprint = _footprint(src, matrix, (w, h))
    target = cv2.GaussianBlur(dst.astype(np.float32), (0, 0), 1.0)
    ys = np.arange(reach, h - size - reach + 1, size)
    xs = np.arange(reach, w - size - reach + 1, size)
    usable = (
        _window_all(footprint, ys - reach, xs - reach, size + 2 * reach)
        # flat: nothing to find
        & (_window_std(placed, ys, xs, size) >= 6)
        & (_window_std(target, ys, xs, size) >= 6)
    )
    moved = 0
    for i, j in np.argwhere(usable):
        y, x = int(ys[i]), int(xs[j])
        around = (
            slice(y - reach, y + size + reach),
            slice(x - reach, x + size + reach),
        )
        patch = placed[y : y + size, x : x + size]
        scores = cv2.matchTemplate(target[around], patch, cv2.TM_CCOEFF_NORMED)
        if scores[reach, reach] >= 0.6:
            continue  # in its place
        _, best, _, (bx, by) = cv2.minMaxLoc(scores)
        dx, dy = bx - reach, by - reach
        if best < 0.85 or np.hypot(dx, dy) < 2:
            continue
        # Where its own image shows it there too (a smooth gradient, a
        # repeated texture), finding it there says nothing of motion.
        itself = cv2.matchTemplate(placed[around], patch, cv2.TM_CCOEFF_NORMED)
        if best < itself[by, bx] + _DISTINCT:
            continue
        fx, fy = np.median(flow[y : y + size, x : x + size].reshape(-1, 2), axis=0)
        moved += np.hypot(fx - dx, fy - dy) <= 2
    return int(moved)


def drifted_region(
    src: np.ndarray, dst: np.ndarray, matrix: np.ndarray, flow: np.ndarray
) -> int:
    """How many blocks (of _MOVED_PATCH pixels) of ``src``, laid on ``dst``
    by ``matrix``, make up the largest connected region whose content sits
    _DRIFT pixels or more from its place, by the :func:`dense_flow`.

    Objects moved by about a pixel (Middlebury's RubberWhale) are too few
    for residual_shift's 90th percentile and move too little for
    moved_patches; but what moved drifts as one, over neighbouring blocks.
    A copy's flow is noise, a block here and there.

    A block counts only where its flow explains it: moved by its flow, it
    matches ``dst`` (normalised correlation 0.9 or more, and 0.02 better
    than in place). Content a copy adds (a caption, a sticker, a watermark)
    is found nowhere, so the flow over it, whatever it says, does not.
    """
    import cv2

    h, w = dst.shape
    placed = cv2.warpAffine(src, matrix, (w, h))
    # dst's pixels where the flow says placed's went, back in placed's place
    followed = _followed(dst.astype(np.float32), flow[..., 0], flow[..., 1])
    here, there = _blocks(placed.astype(np.float32)), _blocks(dst.astype(np.float32))
    usable = (
        _blocks(_footprint(src, matrix, (w, h))).all(-1)
        & (here.std(-1) >= 6)  # flat: nothing to follow
        & (there.std(-1) >= 6)
    )
    if usable.sum() < 5:
        return 0
    at = np.argwhere(usable)
    shifts = np.median(_blocks(flow), axis=2)[usable]  # (n, 2): dx, dy
    drift = _local(np.c_[(at[:, ::-1] + 0.5) * _MOVED_PATCH, shifts])
    in_place = _correlations(here, there)[usable]
    fit = _correlations(here, _blocks(followed))[usable]
    drifted = (drift >= _DRIFT) & (fit >= 0.9) & (fit >= in_place + 0.02)
    grid = np.zeros(usable.shape, np.uint8)
    grid[at[drifted, 0], at[drifted, 1]] = 1
    count, _, stats, _ = cv2.connectedComponentsWithStats(grid, connectivity=8)
    return int(stats[1:, cv2.CC_STAT_AREA].max()) if count > 1 else 0


def _window_sums(
    integral: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int
) -> np.ndarray:
    """Sums over the ``size``-pixel squares whose top-left corners are
    (``ys`` × ``xs``), from an integral image: a (len(ys), len(xs)) grid."""
    y, x = ys[:, None], xs[None, :]
    return (
        integral[y + size, x + size]
        - integral[y, x + size]
        - integral[y + size, x]
        + integral[y, x]
    )


def _window_std(
    image: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int
) -> np.ndarray:
    """The standard deviation of ``image`` over each square window (see
    :func:`_window_sums`): at once, not patch by patch (a pair's check took
    about a thousand numpy calls for them, a quarter of its time)."""
    import cv2

    sums, squares = cv2.integral2(image, sdepth=cv2.CV_64F, sqdepth=cv2.CV_64F)
    n = size * size
    mean = _window_sums(sums, ys, xs, size) / n
    variance = _window_sums(squares, ys, xs, size) / n - mean * mean
    return np.sqrt(np.maximum(variance, 0.0))


def _window_all(
    mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int
) -> np.ndarray:
    """Whether ``mask`` holds over all of each square window."""
    import cv2

    counts = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_32S)
    return _window_sums(counts, ys, xs, size) == size * size


def _followed(image: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """``image`` read at each pixel's place plus (dx, dy): where a field of
    shifts says each pixel's content is, brought back to that pixel."""
    import cv2

    h, w = image.shape
    x, y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, x + dx, y + dy, cv2.INTER_LINEAR)


def _contrast_normalised(grey: np.ndarray) -> np.ndarray:
    """``grey`` less its local mean, over its local spread (sigma 4 px), as uint8."""
    import cv2

    grey = grey.astype(np.float32)
    detail = grey - cv2.GaussianBlur(grey, (0, 0), 4)
    spread = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), 4)) + 4
    return np.clip(detail / spread * 40 + 128, 0, 255).astype(np.uint8)


def _blocks(image: np.ndarray) -> np.ndarray:
    """``image`` (h, w, ...) cut into blocks of _MOVED_PATCH pixels: (rows,
    cols, pixels, ...), the rim that makes no whole block left out."""
    size = _MOVED_PATCH
    rows, cols = image.shape[0] // size, image.shape[1] // size
    rest = image.shape[2:]
    cut = image[: rows * size, : cols * size].reshape(rows, size, cols, size, *rest)
    return np.moveaxis(cut, 2, 1).reshape(rows, cols, size * size, *rest)


def _correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Normalised correlation of each pair of blocks (over the last axis)."""
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1) + 1e-6)


def _similarities(
    x: Features, y: Features
) -> tuple[list[tuple[np.ndarray, int, tuple[int, int]]], int]:
    """Similarities taking x's matched features onto y's, each with its
    inlier count (MIN_INLIERS or more) and :func:`_evidence`, best first;
    and how many features matched.

    RANSAC finds the transform most matches agree on; the matches it leaves
    are searched again, up to _MODELS times. A scene can hold more than one:
    a chessboard moved before a still room (the board's repeated corners
    can outvote the room), a subject moved against its background.
    """
    import cv2

    if not (x.decidable and y.decidable):
        return [], 0
    good, theirs = _matches(x.descriptors, y.descriptors)
    src, dst = x.points[good], y.points[theirs]
    found: list[tuple[np.ndarray, int, tuple[int, int]]] = []
    while len(found) < _MODELS and len(src) >= MIN_INLIERS:
        matrix, mask = cv2.estimateAffinePartial2D(
            src,
            dst,
            method=cv2.RANSAC,
            ransacReprojThreshold=4.0,
            maxIters=2000,
            confidence=0.99,
        )
        if matrix is None:
            break
        agree = mask.ravel().astype(bool)
        if agree.sum() < MIN_INLIERS:
            break
        found.append((matrix, int(agree.sum()), _evidence(src[agree], dst[agree])))
        src, dst = src[~agree], dst[~agree]
    return found, len(good)


def _matches(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the binary descriptors ``x`` whose nearest of ``y`` (by
    Hamming distance) passes Lowe's ratio test, and that nearest row of each.

    FAISS's binary index finds the two nearest as OpenCV's brute-force
    matcher does, 4 times as fast (1.3 against 5.0 ms for 1,000 features
    each, one thread); where the test passes, the nearest is the only one.
    """
    import faiss

    # No team of threads beside a worker's other tasks, whatever an index
    # build set here; OpenMP's setting is this thread's, and is given back
    # (a search without a cluster runs in the caller's thread).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index = faiss.IndexBinaryFlat(8 * y.shape[1])
        index.add(y)
        distance, nearest = index.search(x, 2)
    finally:
        faiss.omp_set_num_threads(threads)
    good = np.flatnonzero(
        (nearest[:, 1] >= 0) & (distance[:, 0] < _RATIO * distance[:, 1])
    )
    return good, nearest[good, 0]


def _evidence(src: np.ndarray, dst: np.ndarray) -> tuple[int, int]:
    """How many distinct features the inliers ``src`` (matched to ``dst``)
    are, counted up to MIN_INLIERS, and in how many places they lie: the
    fewer of either image's.

    A few corners alike in two unrelated images (a shape's corner on a
    striped ground) give a dozen inliers, each found at several scales, in
    one small patch, where almost any similarity fits them.
    """
    distinct = min(_distinct(points, MIN_INLIERS) for points in (src, dst))
    places = min(
        len(np.unique((points // _PLACE).astype(np.int64), axis=0))
        for points in (src, dst)
    )
    return distinct, places


def _distinct(points: np.ndarray, enough: int) -> int:
    """Points more than _SAME_FEATURE apart, counted up to ``enough``."""
    kept = np.empty((0, 2), np.float32)
    for point in points:
        if not len(kept) or np.hypot(*(kept - point).T).min() > _SAME_FEATURE:
            kept = np.vstack([kept, point])
            if len(kept) >= enough:
                break
    return len(kept)


def _inside(src_shape: tuple, dst_shape: tuple, matrix: np.ndarray) -> float:
    """Share of the src rectangle's area that ``matrix`` puts inside dst's."""
    import cv2

    h, w = src_shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    placed = (corners @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)
    area = abs(cv2.contourArea(placed))
    if area < 1:
        return 0.0
    dh, dw = dst_shape[:2]
    frame = np.float32([[0, 0], [dw, 0], [dw, dh], [0, dh]])
    overlap, _ = cv2.intersectConvexConvex(placed, frame)
    return float(overlap) / area


def _footprint(
    src: np.ndarray, matrix: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Where ``src`` lands when ``matrix`` lays it on an image of ``size``
    (width, height): a boolean mask, less a 2-pixel rim, whose pixels mix in
    the black border the warp adds."""
    import cv2

    landed = cv2.warpAffine(np.ones_like(src), matrix, size, flags=cv2.INTER_NEAREST)
    return cv2.erode(landed, np.ones((5, 5), np.uint8)) > 0


def _correlation(
    src: np.ndarray, dst: np.ndarray, matrix: np.ndarray, could_copy: bool = True
) -> tuple[float, float]:
    """Pearson correlation of the blurred grey levels where src lands on dst,
    and the share of that footprint left out of it.

    Where ``could_copy`` (the rest of the check allows a copy) and the
    correlation is under MIN_CORRELATION, the correlation under a smooth gain
    (:func:`_under_smooth_gain`, a vignette) is taken where higher; still
    under it, the largest region of blocks where the two differ
    (a pasted sticker, a retouched spot) is left out, if it covers at most
    MAX_DIFFERING of the footprint and the rest correlates at
    _REST_CORRELATION or more. A sticker of a ninth of a photo took a copy's
    correlation down to 0.43-0.80, where the rest correlated at 0.99 and more;
    second shots leave no such region (bench/copy_or_shot.py).
    """
    import cv2

    x, y, footprint = _blurred_laid(src, dst, matrix)
    if footprint.sum() < 100:
        return 0.0, 0.0
    found = _pearson(x[footprint], y[footprint])
    if found >= MIN_CORRELATION or not could_copy:
        return found, 0.0
    found = max(found, _under_smooth_gain(x, y, footprint))
    if found >= MIN_CORRELATION:
        return found, 0.0
    inside = _blocks(footprint).mean(-1) > 0.5
    kept, share = footprint, 0.0
    # Twice: a bright sticker inflates the grey levels' spread, which the
    # second look measures without it.
    for _ in range(2):
        region = _differing_region(x, y, kept, footprint, inside)
        if not region.any() or region.sum() > MAX_DIFFERING * inside.sum():
            break
        cover = np.kron(region, np.ones((_MOVED_PATCH, _MOVED_PATCH), np.uint8))
        cover = cv2.dilate(cover, np.ones((9, 9), np.uint8)) > 0  # its edges
        left_out = np.zeros_like(footprint)
        left_out[: cover.shape[0], : cover.shape[1]] = cover
        if (footprint & ~left_out).sum() < 100:
            break
        kept, share = footprint & ~left_out, float(region.sum() / inside.sum())
    rest = _pearson(x[kept], y[kept]) if share else 0.0
    # A copy's rest matches nearly exactly (0.99 and more measured); a second
    # shot's differs all over, and leaving a region out took none over 0.84.
    return (rest, share) if rest >= _REST_CORRELATION else (found, 0.0)


def _blurred_laid(
    src: np.ndarray, dst: np.ndarray, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``src`` laid on ``dst`` by ``matrix`` and ``dst``, both blurred by
    _BLUR (float32), and the footprint where ``src`` lands."""
    import cv2

    h, w = dst.shape
    x = cv2.warpAffine(
        cv2.GaussianBlur(src.astype(np.float32), (0, 0), _BLUR), matrix, (w, h)
    )
    y = cv2.GaussianBlur(dst.astype(np.float32), (0, 0), _BLUR)
    return x, y, _footprint(src, matrix, (w, h))


def _under_smooth_gain(x: np.ndarray, y: np.ndarray, footprint: np.ndarray) -> float:
    """The correlation of ``y`` with ``x`` times a gain that varies smoothly
    across the image (quadratic in position), plus a constant: what a
    vignette or a graduated filter does to a copy (the vignette of
    pipeline.synthetic took copies down to 0.49, and to 0.99 and more under
    such a gain). 0 where the gain fitted is not positive all over: no
    filter turns grey levels upside down."""
    fitted = _smooth_gain(x, y, footprint)
    if fitted is None:
        return 0.0
    fit, field, xs, ys = fitted
    return _pearson(field @ fit[:6] * xs + fit[6], ys)


_GAIN_STEP = 4  # fitted on every 4th pixel each way: 7 numbers need no more


def _gain_terms(rows: np.ndarray, cols: np.ndarray, shape: tuple) -> np.ndarray:
    h, w = shape
    u, v = cols / (w / 2) - 1, rows / (h / 2) - 1
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], -1)


def _smooth_gain(x: np.ndarray, y: np.ndarray, footprint: np.ndarray):
    """The least-squares fit of ``y`` by ``x`` times a quadratic gain plus a
    constant, on every _GAIN_STEP-th pixel of ``footprint`` (every pixel
    took 10 ms a similarity, this 1): (the 7 numbers, the gain's terms and
    ``x``'s and ``y``'s values there), or None where the gain is not
    positive there."""
    step = _GAIN_STEP
    sampled = footprint[::step, ::step]
    rows, cols = np.nonzero(sampled)
    field = _gain_terms(rows * step, cols * step, x.shape)
    xs = x[::step, ::step][sampled].astype(np.float64)
    ys = y[::step, ::step][sampled].astype(np.float64)
    design = np.c_[field * xs[:, None], np.ones_like(xs)]
    try:
        fit = np.linalg.solve(design.T @ design, design.T @ ys)
    except np.linalg.LinAlgError:  # a flat footprint
        return None
    if (field @ fit[:6]).min() <= 0:
        return None
    return fit, field, xs, ys


def differing_share(laid: Laid) -> float:
    """The share of the footprint of ``laid`` in the largest region of
    blocks where its two images differ once a smooth gain (a vignette) is
    taken out: what one shows and the other lacks (a pasted sticker,
    lettering, a caption, a watermark, a retouched spot); 0 where there is
    none.

    A block differs here by more than _EDITED on average, against
    _DIFFERING for a region the correlation may leave out: of the copies of
    20 photos that the check calls copies (bench/copy_or_shot.py), none of
    the 299 made 15 ways without such an edit (resized, cropped, turned,
    re-encoded at quality 10, brightened, contrast, thumbnails, sharpened,
    vignetted) shows a region (a quarter crop did under 0.6); of those
    edited so, all 20 stickered, 17 of 18 lettered, 9 of 20 captioned and
    6 of 19 faintly watermarked do.
    """
    import cv2

    x, y, footprint = _blurred_laid(laid.src, laid.dst, laid.matrix)
    inside = _blocks(footprint).mean(-1) > 0.5
    if footprint.sum() < 100 or not inside.any():
        return 0.0
    fitted = _smooth_gain(x, y, footprint)
    if fitted is not None:
        # The gain at every _GAIN_STEP-th pixel, enlarged: as good for a
        # quadratic, and a tenth of the 11 ms it took at every pixel.
        h, w = x.shape
        rows, cols = np.mgrid[0:h:_GAIN_STEP, 0:w:_GAIN_STEP]
        fit = fitted[0]
        coarse = (_gain_terms(rows, cols, x.shape) @ fit[:6]).astype(np.float32)
        x = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR) * x + fit[6]
    region = _differing_region(x, y, footprint, footprint, inside, _EDITED)
    return float(region.sum() / inside.sum())


def _differing_region(
    x: np.ndarray,
    y: np.ndarray,
    kept: np.ndarray,
    footprint: np.ndarray,
    inside: np.ndarray,
    threshold: float = _DIFFERING,
) -> np.ndarray:
    """The largest connected region of blocks (of those ``inside`` the
    footprint) where ``x`` and ``y``, each scaled to zero mean and unit
    spread over ``kept``, differ by more than ``threshold`` on average (a
    block's squared difference), its holes closed."""
    import cv2

    def scaled(image: np.ndarray) -> np.ndarray:
        return (image - image[kept].mean()) / (image[kept].std() + 1e-6)

    differs = np.where(footprint, (scaled(y) - scaled(x)) ** 2, 0.0)
    bad = ((_blocks(differs).mean(-1) > threshold) & inside).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bad, connectivity=8)
    if count <= 1:
        return np.zeros(bad.shape, bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = (labels == largest).astype(np.uint8)
    closed = cv2.morphologyEx(region, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    return (closed > 0) & inside


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    scale = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / scale if scale > 0 else 0.0
