"""Write the demo images: real photos (scikit-image), synthetic ones, and queries.

Usage: python demo/make_data.py DEMO_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from imgindex.pipeline.synthetic import write_photos

# scikit-image ships these photos in its wheel (others would need a download).
PHOTOS = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "horse",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "clock",
    "grass",
    "gravel",
    "brick",
    "page",
    "moon",
    "colorwheel",
    "logo",
]


def main(root: Path) -> None:
    import skimage.data

    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # a data file missing from this scikit-image build
            continue
        Image.fromarray(arr).convert("RGB").save(photos / f"{name}.jpg", quality=92)
    write_photos(root / "synthetic", 150, seed=42, max_side=800)

    queries = root / "queries"
    queries.mkdir(exist_ok=True)
    for name in ("chelsea", "coffee", "rocket"):
        with Image.open(photos / f"{name}.jpg") as im:
            w, h = im.size
            crop = im.crop((w // 10, h // 10, w - w // 12, h - h // 8))
            crop.resize((crop.width * 2 // 3, crop.height * 2 // 3)).save(
                queries / f"{name}-crop.jpg", quality=70
            )
    print(f"demo images written under {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-data"))
