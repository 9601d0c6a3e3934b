"""A manifest's rows found by image id, without reading the manifest.

Beside ``manifest.jsonl`` an index directory keeps ``manifest.ids``: for each
of its lines in order, the image's id and the line's length in bytes (two
little-endian int64). A search of a million-image index reads those 16 MB and
then only its hits' lines; parsing the whole manifest took 6.5 s and 339 MiB
there (docs/performance.md). The workers write the two files of their path
range side by side, so the client joins both as bytes and parses no row.

An index written before the ids file existed is scanned instead: the same
lookup, built from one pass over the manifest.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from imgindex.pipeline.discover import ImageRecord, image_id
from imgindex.pipeline.errors import IndexDirError

IDS_FILE = "manifest.ids"
ROW = np.dtype([("id", "<i8"), ("length", "<i8")])
_MISMATCH = f"its {IDS_FILE} does not match its manifest"


def damaged_manifest(index: str | os.PathLike, problem: object) -> str:
    """The one-line error for an index whose manifest disagrees with its ids
    file, meta.json or index.faiss."""
    return (
        f"index {str(index)!r} is damaged: {problem}; rebuild it with "
        "`imgindex build --rebuild`"
    )


def manifest_line(record: ImageRecord, meta: dict[str, Any] | None = None) -> str:
    """``record``'s line in the manifest file (with a file list's other
    columns, ``meta``)."""
    r = record
    row = {"id": r.id, "path": r.path, "size": r.size, "mtime_ns": r.mtime_ns}
    if meta is not None:
        row["meta"] = meta
    return jsonl_line(row)


def jsonl_line(row: dict[str, Any]) -> str:
    # ensure_ascii keeps undecodable file names (surrogate escapes) round-trippable.
    return json.dumps(row, ensure_ascii=True) + "\n"


def ids_path(lines: str | os.PathLike) -> Path:
    """The ids file that goes with a file of manifest lines."""
    return Path(lines).with_suffix(".ids")


class ManifestWriter:
    """Writes manifest lines and, beside them, each line's id and length."""

    def __init__(self, lines: str | os.PathLike):
        self._lines = open(lines, "w", encoding="ascii")
        self._ids = open(ids_path(lines), "wb")
        self._pending: list[tuple[int, int]] = []

    def write(self, record: ImageRecord, meta: dict[str, Any] | None = None) -> None:
        line = manifest_line(record, meta)
        self._lines.write(line)
        # ASCII (jsonl_line escapes the rest): characters are bytes.
        self._pending.append((record.id, len(line)))
        if len(self._pending) >= 65536:
            self._flush()

    def _flush(self) -> None:
        self._ids.write(np.array(self._pending, ROW).tobytes())
        self._pending.clear()

    def close(self) -> None:
        self._flush()
        self._lines.close()
        self._ids.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rows(manifest: BinaryIO, ids_file: BinaryIO) -> np.ndarray:
    """The ids file's rows (``ROW``), checked against the manifest's size.

    Raises
    ------
    ValueError
        If the ids file does not describe this manifest byte for byte.
    """
    raw = os.pread(ids_file.fileno(), os.fstat(ids_file.fileno()).st_size, 0)
    if len(raw) % ROW.itemsize:
        raise ValueError(f"its {IDS_FILE} is truncated")
    rows = np.frombuffer(raw, ROW)
    lengths = rows["length"]
    size = os.fstat(manifest.fileno()).st_size
    if int(lengths.sum()) != size or (len(rows) and lengths.min() < 1):
        raise ValueError(_MISMATCH)
    return rows


class ManifestLookup:
    """The rows of one version's manifest, by image id, read when asked.

    Holds 24 bytes an image (sorted ids, each line's offset and length) and
    the manifest open, so a build that swaps in a newer version meanwhile
    changes nothing here. Safe to share between threads (``os.pread``). Its
    file is closed by :meth:`close`, or quietly once it is no longer used:
    the service drops a version that requests may still be reading.
    """

    def __init__(self, manifest: BinaryIO, ids, offsets, lengths, label: str = ""):
        self.label = label  # the index directory, for messages
        order = np.argsort(ids, kind="stable")
        self.ids = np.ascontiguousarray(ids[order])
        self._offsets = offsets[order]
        self._lengths = lengths[order]
        self._fd = os.dup(manifest.fileno())
        self.close = weakref.finalize(self, os.close, self._fd)

    @classmethod
    def from_ids(
        cls, manifest: BinaryIO, ids_file: BinaryIO, label: str = ""
    ) -> ManifestLookup:
        """From the ids file written with the manifest.

        Raises
        ------
        ValueError
            If the ids file does not describe this manifest byte for byte.
        """
        rows = read_rows(manifest, ids_file)
        ends = np.cumsum(rows["length"])
        return cls(manifest, rows["id"], ends - rows["length"], rows["length"], label)

    @classmethod
    def scanned(cls, manifest: BinaryIO, label: str = "") -> ManifestLookup:
        """From one pass over a manifest that has no ids file."""
        ids, offsets, lengths = [], [], []
        offset = 0
        manifest.seek(0)
        for line in manifest:
            if line.strip():
                ids.append(image_id(json.loads(line)["path"]))
                offsets.append(offset)
                lengths.append(len(line))
            offset += len(line)
        return cls(
            manifest,
            np.array(ids, np.int64),
            np.array(offsets, np.int64),
            np.array(lengths, np.int64),
            label,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, image: int) -> dict[str, Any] | None:
        """The manifest's row of ``image`` (id, path, size, mtime_ns, and a
        file list's columns as ``meta``), or None if it lists no such id.

        Raises
        ------
        IndexDirError
            If the line there is not the row of ``image``.
        """
        at = int(np.searchsorted(self.ids, image))
        if at == len(self.ids) or self.ids[at] != image:
            return None
        line = os.pread(self._fd, int(self._lengths[at]), int(self._offsets[at]))
        try:
            row = json.loads(line)
            if image_id(row["path"]) == image:
                return row
        except (ValueError, KeyError, TypeError):
            pass
        raise IndexDirError(damaged_manifest(self.label, _MISMATCH))

    def get(self, image: int) -> str | None:
        """The dataset-relative path of ``image``, or None."""
        row = self.row(image)
        return None if row is None else row["path"]

    def __getitem__(self, image: int) -> str:
        path = self.get(image)
        if path is None:
            raise KeyError(image)
        return path
