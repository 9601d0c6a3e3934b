"""Photo-like test images (gradients, shapes, texture) for demos, tests and bench,
and index directories of given vectors (for what only the index is under test).

Run as ``python -m pipeline.synthetic OUT N [--seed S]``.
"""

from __future__ import annotations

import argparse
import io
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One image with structure at several scales, unlike flat colours or noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
    base = c0 * (1 - t[..., None]) + c1 * t[..., None]
    freq = rng.uniform(2, 12, 2)
    base += (
        25
        * np.sin(2 * np.pi * (freq[0] * xx / width + freq[1] * yy / height))[..., None]
    )
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(im)
    scale = min(width, height)
    for _ in range(int(rng.integers(6, 18))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.04, 0.3) * scale
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse([x - r, y - r * rng.uniform(0.4, 1), x + r, y + r], fill=color)
        elif kind == 1:
            draw.rectangle([x - r, y - r / 2, x + r, y + r / 2], fill=color)
        elif kind == 2:
            pts = [
                (x + r * np.cos(a), y + r * np.sin(a))
                for a in np.sort(rng.uniform(0, 6.28, 5))
            ]
            draw.polygon(pts, fill=color)
        else:
            x2, y2 = rng.uniform(0, width), rng.uniform(0, height)
            draw.line([x, y, x2, y2], fill=color, width=int(max(2, r / 8)))
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    noise = rng.normal(0, 6, (height, width, 3))
    arr = np.clip(np.asarray(im, np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def write_photos(
    folder: str | Path,
    n: int,
    seed: int = 0,
    min_side: int = 300,
    max_side: int = 1000,
    prefix: str = "img",
) -> list[Path]:
    """Write ``n`` JPEGs, sides ``min_side``-``max_side`` px, into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        path = folder / f"{prefix}{i:05d}.jpg"
        synthetic_photo(rng, w, h).save(path, quality=int(rng.integers(80, 95)))
        paths.append(path)
    return paths


def write_kinds(folder: str | Path, seed: int = 29) -> dict[str, Path]:
    """Photos of every form a collection holds, for checking that two ways of
    decoding agree: plain JPEGs (from 90 to 1,500 px), each EXIF orientation
    2-8, progressive, CMYK and grey JPEGs, PNG with alpha, 16-bit PNG."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = ((1200, 800), (640, 900), (1500, 1000), (451, 300), (600, 400))
    photos = [synthetic_photo(rng, w, h) for w, h in sizes]
    made: dict[str, tuple[Image.Image, dict]] = {}
    for n, photo in enumerate(photos):
        made[f"plain{n}.jpg"] = (photo, {"quality": 90})
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        made[f"orientation{orientation}.jpg"] = (
            photos[orientation % len(photos)],
            {"exif": exif},
        )
    made["progressive.jpg"] = (photos[0], {"progressive": True})
    made["cmyk.jpg"] = (photos[1].convert("CMYK"), {})
    made["grey.jpg"] = (photos[2].convert("L"), {})
    made["small.jpg"] = (photos[3].resize((90, 60)), {})
    rgba = photos[4].convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    made["alpha.png"] = (rgba, {})
    deep = np.asarray(photos[0].convert("L"), np.uint16) * 257
    made["deep16.png"] = (Image.fromarray(deep), {})
    paths = {}
    for name, (image, options) in made.items():
        image.save(folder / name, **options)
        paths[name] = folder / name
    return paths


def _reencoded(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _cropped(image: Image.Image, area: float) -> Image.Image:
    """A window of ``area`` of the image, off-centre (as people crop)."""
    w, h = image.size
    cw, ch = round(w * area**0.5), round(h * area**0.5)
    x, y = round((w - cw) * 0.3), round((h - ch) * 0.6)
    return image.crop((x, y, x + cw, y + ch))


def _captioned(image: Image.Image) -> Image.Image:
    out = image.copy()
    w, h = out.size
    font = ImageFont.load_default(size=max(10, h // 16))
    ImageDraw.Draw(out).text(
        (w * 0.05, h * 0.85), "(c) 2026 archive", fill=(255, 255, 255), font=font
    )
    return out


def _colour_shifted(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, np.float32) * (1.1, 0.95, 0.85) + (5, 0, -5)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# How people copy a photo: each makes one copy of an RGB image.
COPY_MAKERS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resized": lambda im: im.resize((im.width // 2, im.height // 2)),
    "reencoded": lambda im: _reencoded(im, 30),
    "cropped-50": lambda im: _cropped(im, 0.5),
    "cropped-25": lambda im: _cropped(im, 0.25),
    "flipped": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "turned-90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "rotated-5": lambda im: im.rotate(5, Image.Resampling.BILINEAR),
    "brightened": lambda im: ImageEnhance.Brightness(im).enhance(1.35),
    "colour-shifted": _colour_shifted,
    "captioned": _captioned,
}


def _stickered(image: Image.Image) -> Image.Image:
    """A picture pasted over a ninth of the image (content found nowhere in
    the original)."""
    out = image.copy()
    w, h = out.size
    sticker = synthetic_photo(np.random.default_rng(33), max(1, w // 3), max(1, h // 3))
    out.paste(sticker, (w // 2, h // 8))
    return out


def _watermarked(image: Image.Image) -> Image.Image:
    """Three lines of large half-transparent text across the image."""
    base = image.convert("RGBA")
    w, h = base.size
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    font = ImageFont.load_default(size=max(10, h // 5))
    draw = ImageDraw.Draw(layer)
    for line in range(3):
        draw.text(
            (w * 0.05, h * (0.1 + 0.3 * line)),
            "(c) STOCK",
            fill=(255, 255, 255, 90),
            font=font,
        )
    return Image.alpha_composite(base, layer).convert("RGB")


def _vignetted(image: Image.Image) -> Image.Image:
    """Darkened towards the corners, to 30 % of the centre's light, as a
    photo filter does."""
    w, h = image.size
    y, x = np.mgrid[:h, :w]
    radius = np.hypot((x - w / 2) / (w / 2), (y - h / 2) / (h / 2))
    gain = np.clip(1.2 - 0.6 * radius**2, 0.3, 1.0)[..., None]
    return Image.fromarray((np.asarray(image, np.float32) * gain).astype(np.uint8))


def _lettered(image: Image.Image) -> Image.Image:
    """Two lines of large white lettering outlined in black, at the top and
    the bottom, as a meme has."""
    out = image.copy()
    w, h = out.size
    font = ImageFont.load_default(size=max(12, h // 8))
    draw = ImageDraw.Draw(out)
    for text, top in (("WHEN THE CODE", 0.02), ("FINALLY WORKS", 0.82)):
        draw.text((w * 0.05, h * top), text, fill="white", font=font,
                  stroke_width=3, stroke_fill="black")  # fmt: skip
    return out


def _thumbnail(image: Image.Image, side: int = 160) -> Image.Image:
    scale = side / max(image.size)
    size = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    return image.resize(size, Image.Resampling.LANCZOS)


# Copies edited harder than COPY_MAKERS' (bench/copy_or_shot.py): what they
# add or lose leaves the checks of local motion (pipeline/geometry.py) the
# most noise to take for a moved subject.
EDIT_MAKERS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "stickered": _stickered,
    "watermarked": _watermarked,
    "reencoded-10": lambda im: _reencoded(im, 10),
    "contrast": lambda im: ImageEnhance.Contrast(im).enhance(1.6),
    "thumbnail": _thumbnail,
    "thumbnail-96": lambda im: _thumbnail(im, 96),
    "sharpened": lambda im: im.filter(ImageFilter.UnsharpMask(2, 150, 3)),
    "vignetted": _vignetted,
    "lettered": _lettered,
}


def sibling_views(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Two photos of one scene: the camera panned a quarter, the light changed.

    Neither contains the other, so neither is a copy of the other.
    """
    w, h = image.size
    cw, ch = round(w * 0.75), round(h * 0.8)
    dx, dy = round(w * 0.25), round(h * 0.1)
    first = image.crop((0, 0, cw, ch))
    second = image.crop((dx, dy, dx + cw, dy + ch))
    return first, ImageEnhance.Brightness(second).enhance(0.9)


# Stereo tiles: (width, height) in pixels of scikit-image's 741 x 500 views.
STEREO_TILES = ((500, 360), (400, 300), (600, 420))


def second_shots(
    left: np.ndarray, right: np.ndarray, disparity: np.ndarray
) -> Iterator[tuple[str, Image.Image, Image.Image]]:
    """Pairs of real second shots of one scene from a stereo pair: (name,
    tile of the left view, tile of the right view).

    Each tile of the right view is shifted by the tile's median disparity,
    so that the two frame the same part of the scene, as a second shot from
    a slightly moved camera does: real parallax (near and far things shift
    against each other) and each its own sensor noise. Not a crop of one
    photo offset by a few pixels, which would be a copy. Several sizes and
    places; all of one scene.
    """
    disparity = np.where(np.isfinite(disparity), disparity, np.nan)
    views = Image.fromarray(left), Image.fromarray(right)
    height, width = left.shape[:2]
    for tw, th in STEREO_TILES:
        for x in range(60, width - tw, 60):
            for y in sorted({0, height - th}):
                shift = int(round(np.nanmedian(disparity[y : y + th, x : x + tw])))
                if x - shift < 0:
                    continue
                a = views[0].crop((x, y, x + tw, y + th))
                b = views[1].crop((x - shift, y, x - shift + tw, y + th))
                yield f"stereo {tw}x{th} at {x},{y}", a, b


def write_copy_set(
    folder: str | Path,
    originals: Mapping[str, Image.Image],
    scenes: Mapping[str, Image.Image] | None = None,
    singles: Mapping[str, Image.Image] | None = None,
) -> dict[str, str]:
    """JPEGs of ``originals`` and a copy of each made by every :data:`COPY_MAKERS`,
    two :func:`sibling_views` of each of ``scenes``, and ``singles`` as they
    are (other photos of one scene, say); {file name: family}.

    An original and its copies share a family; each sibling view and single
    is a family of its own (a good duplicate finder keeps them apart).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    families: dict[str, str] = {}
    for name, image in originals.items():
        image = image.convert("RGB")
        image.save(folder / f"{name}.jpg", quality=92)
        families[f"{name}.jpg"] = name
        for how, make in COPY_MAKERS.items():
            make(image).convert("RGB").save(folder / f"{name}.{how}.jpg", quality=90)
            families[f"{name}.{how}.jpg"] = name
    for name, image in (scenes or {}).items():
        for side, view in zip("ab", sibling_views(image.convert("RGB")), strict=True):
            view.save(folder / f"{name}.view-{side}.jpg", quality=90)
            families[f"{name}.view-{side}.jpg"] = f"{name}.view-{side}"
    for name, image in (singles or {}).items():
        image.convert("RGB").save(folder / f"{name}.jpg", quality=92)
        families[f"{name}.jpg"] = name
    return families


def write_vector_index(
    dest: Path,
    chunks: Iterable[tuple[list, np.ndarray]],
    dim: int,
    index=None,
    version: str = "synthetic",
) -> Path:
    """An index directory at ``dest`` as a build leaves it, of given vectors.

    ``chunks`` yields (image records, their unit vectors), one shard each, so
    a caller can generate more vectors than fit in memory. ``index`` is the
    FAISS index stored beside them; by default an empty Flat placeholder,
    which `imgindex reindex` replaces with one built from the shards.
    """
    from imgindex.pipeline.embed import ModelSpec
    from imgindex.pipeline.index import build_index
    from imgindex.pipeline.meta import IndexMeta
    from imgindex.pipeline.shards import write_vectors
    from imgindex.pipeline.store import write_index_dir

    spec = ModelSpec.from_config()
    staging = dest.parent / f".{dest.name}.made"
    shards, records = [], []
    for chunk, vectors in chunks:
        shards.append(write_vectors(staging, spec, chunk, vectors, version))
        records.extend(chunk)
    meta = IndexMeta(
        name=dest.name,
        source=str(dest.parent / "images"),
        model=spec.name,
        dim=dim,
        count=len(records),
        created="2026-11-22T00:00:00+00:00",
        imgindex_version=version,
    )
    if index is None:
        index = build_index(np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
    records.sort(key=lambda r: r.path)
    write_index_dir(dest, index, records, meta, [], {}, shards)
    shutil.rmtree(staging)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("n", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=1000)
    args = parser.parse_args()
    write_photos(args.out, args.n, args.seed, args.min_side, args.max_side)


if __name__ == "__main__":
    main()
