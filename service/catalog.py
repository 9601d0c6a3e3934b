"""The indexes under the service's root, each opened once for searching.

An index is opened on its first search and kept: the model is loaded once
per process (pipeline.models caches it) and the FAISS index once per version
of the directory. A build that swaps in a new version changes meta.json's
inode, and the next request opens the new one.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgindex.pipeline.discover import image_id
from imgindex.pipeline.errors import IndexDirError
from imgindex.pipeline.search import Searcher
from imgindex.pipeline.sources import Source, place_gone, source_of
from imgindex.pipeline.store import DUPLICATES_FILE, META_FILE, is_index_dir, read_meta
from imgindex.service.errors import ApiError
from imgindex.service.images import IndexedImage

logger = logging.getLogger(__name__)


@dataclass
class OpenIndex:
    """One version of an index directory, opened for searching."""

    name: str
    path: Path
    stamp: tuple[int, int]
    searcher: Searcher

    @property
    def root(self) -> Path:
        """The dataset folder its manifest's paths are relative to."""
        return self.searcher.root

    def relpath(self, image_id: int) -> str:
        """The dataset-relative path of an indexed image (404 if there is none)."""
        path = self.searcher.paths.get(image_id)
        if path is None:
            raise ApiError(
                404, f"index {self.name!r} holds no image with id {image_id}"
            )
        return path

    def id_of(self, relpath: str) -> int:
        """The id of the indexed image at ``relpath`` (404 if none)."""
        try:
            found = image_id(relpath)
        except UnicodeEncodeError:  # no file name is this string
            found = -1
        if found < 0 or self.searcher.paths.get(found) != relpath:
            if relpath.startswith("/") or ".." in relpath.split("/"):
                # Only a file list's manifest may name such paths.
                raise ApiError(400, f"path {relpath!r} lies outside the dataset root")
            raise ApiError(404, f"index {self.name!r} holds no image {relpath!r}")
        return found

    def file(self, image_id: int) -> IndexedImage:
        """The image of ``image_id``, which must lie inside the dataset.

        A symbolic link in a dataset folder that leads out of it is refused:
        the service serves its indexes' datasets and nothing else. A file
        list's dataset is the files it lists, wherever they are; a tar
        shard's member, or an object behind a URL, is read where it is.
        """
        relpath = self.relpath(image_id)
        source = self.searcher.source
        if source.kind != "folder" or source.remote:
            return IndexedImage(source, relpath)
        root = self.root.resolve()
        path = Path(source.location(relpath)).resolve()
        if not path.is_relative_to(root):
            raise ApiError(
                403, f"image {relpath!r} lies outside the dataset {str(root)!r}"
            )
        folder = str(path.parent)
        return IndexedImage(Source("folder", folder, folder), path.name)

    def vector(self, image_id: int) -> np.ndarray | None:
        """The stored vector of ``image_id``, or None where the index cannot
        give vectors back (IVF-PQ, on-disk lists): then it is embedded anew."""
        self.relpath(image_id)
        try:
            return self.searcher.stored_vectors(np.array([image_id], np.int64))
        except RuntimeError:
            return None


class Catalog:
    """The index directories directly under ``root``, by name."""

    def __init__(self, root: str | os.PathLike, device: str = "cpu"):
        self.root = Path(root).resolve()
        self.device = device
        self._open: dict[str, OpenIndex] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def n_open(self) -> int:
        return len(self._open)

    def names(self) -> list[str]:
        """Names of the index directories under the root, sorted."""
        try:
            entries = sorted(os.listdir(self.root))
        except OSError as e:
            logger.warning("cannot list %s: %s", self.root, e)
            return []
        return [n for n in entries if not n.startswith(".") and self._is_index(n)]

    def _is_index(self, name: str) -> bool:
        return is_index_dir(self.root / name)

    def path(self, name: str) -> Path:
        """The directory of index ``name`` (404 unless it is one)."""
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise ApiError(404, f"no index named {name!r}")
        path = self.root / name
        if not self._is_index(name):
            raise ApiError(404, f"no index named {name!r} under {str(self.root)!r}")
        return path

    def summary(self, name: str) -> dict[str, Any]:
        """What the index list shows: cheap, from meta.json alone."""
        path = self.path(name)
        try:
            m = read_meta(path)
        except IndexDirError as e:
            return {"name": name, "error": str(e)}
        return {
            "name": name,
            "count": m.count,
            "model": m.model,
            "dim": m.dim,
            "index_key": m.index_key,
            "index_kind": m.index_kind,
            "source": m.source,
            "source_found": not place_gone(source_of(m)),
            "updated": m.updated or m.created,
            "duplicates": (path / DUPLICATES_FILE).is_file(),
        }

    def open(self, name: str) -> OpenIndex:
        """Index ``name`` opened for searching, reopened when it was rebuilt.

        Raises
        ------
        ApiError
            404 if there is no such index, 409 if it cannot be read now.
        """
        path = self.path(name)
        stamp = _stamp(path)
        current = self._open.get(name)
        if current is not None and current.stamp == stamp:
            return current
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:  # one load per index at a time; the others wait for it
            current = self._open.get(name)
            if current is not None and current.stamp == _stamp(path):
                return current
            try:
                stamp = _stamp(path)
                searcher = Searcher(path, device=self.device)
            except IndexDirError as e:
                raise ApiError(409, str(e)) from None
            opened = OpenIndex(name, path, stamp, searcher)
            self._open[name] = opened
            logger.info("opened index %s (%d vectors)", name, searcher.index.ntotal)
            return opened


def _stamp(path: Path) -> tuple[int, int]:
    """Which version of the directory: a swap gives meta.json a new inode."""
    try:
        st = os.stat(path / META_FILE)
    except OSError:
        return (0, 0)
    return (st.st_ino, st.st_mtime_ns)
