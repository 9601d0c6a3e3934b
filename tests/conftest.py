"""Shared fixtures: real Dask clusters and real image files written with Pillow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.synthetic import write_photos


@pytest.fixture(scope="session")
def client():
    """In-process cluster: fast, shares the test's model cache."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        yield c


@pytest.fixture(scope="session")
def process_cluster():
    """Worker processes: only they prove that tasks and results pickle."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def photo_sets(tmp_path_factory) -> dict[str, list[Path]]:
    """Two datasets of structured JPEGs (36 + 28 images), written once per session."""
    root = tmp_path_factory.mktemp("photos")
    return {
        "beach": write_photos(root / "beach", 36, seed=1, max_side=640),
        "forest": write_photos(root / "forest", 28, seed=2, max_side=640),
    }


def copy_tree(paths: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


@pytest.fixture
def dataset(tmp_path, photo_sets) -> Path:
    """A private, writable copy of the 'beach' photos."""
    return copy_tree(photo_sets["beach"], tmp_path / "beach")


def crop_query(src: Path, dest: Path) -> Path:
    """A near-duplicate: cropped, resized and re-encoded."""
    with Image.open(src) as im:
        w, h = im.size
        box = (int(w * 0.08), int(h * 0.05), int(w * 0.94), int(h * 0.92))
        q = im.crop(box).resize((int(w * 0.6), int(h * 0.6)))
        q.save(dest, quality=70)
    return dest


def write_bad_files(folder: Path) -> dict[str, str]:
    """The bad-input corpus; returns name -> the substring its reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    good = folder / "good_ref.jpg"
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(good)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(
        good.read_bytes()[: good.stat().st_size // 3]
    )
    (folder / "random.jpg").write_bytes(rng.bytes(5000))
    (folder / "text.png").write_text("this is not a png\n")
    os.symlink(folder / "nowhere.jpg", folder / "broken_link.jpg")
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated",
        "random.jpg": "not an image",
        "text.png": "not an image",
        "broken_link.jpg": "broken symbolic link",
    }
