"""Photo-like test images (gradients, shapes, texture) for demos, tests and bench,
and index directories of given vectors (for what only the index is under test).

Run as ``python -m pipeline.synthetic OUT N [--seed S]``.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


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
    from pipeline.embed import ModelSpec
    from pipeline.index import build_index
    from pipeline.meta import IndexMeta
    from pipeline.shards import write_vectors
    from pipeline.store import write_index_dir

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
