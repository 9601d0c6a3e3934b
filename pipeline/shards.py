"""Embedding shards: one file per partition, written where the vectors are computed.

A shard is a NumPy ``.npz`` archive, readable with ``numpy.load`` alone:

- ``ids``      int64 [n]: image ids (63-bit hash of the dataset-relative path);
- ``vectors``  float32 [n, d]: L2-normalised embeddings, row i belongs to ids[i];
- ``traits``   :data:`pipeline.traits.TRAITS` [n]: size, perceptual hashes and
  grey-level statistics of each image (shards written before imgindex
  measured them, and shards of vectors not made from images, lack it);
- ``info``     uint8 [k]: UTF-8 JSON ``{"format", "spec", "records", "paths",
  "dim", "failures", "worker", "timings"}``; ``records`` are the ``[path, size,
  mtime_ns]`` of every image the partition covered (failed ones too), so a
  shard is reused only while none of its files has changed. A partition of
  tar shards also has ``units``: the ``[path, size, mtime_ns]`` of the tar
  shards it read (their members are its ``records``).

Why ``.npz`` and not Parquet: the vectors are fixed-width float32 rows, which
is what an ndarray is; numpy is already a dependency (pyarrow would add ~100 MB
to every worker); the zip container carries a CRC per member, so a damaged
shard is detected on read; and members load lazily, so a shard's ``info`` is
read without its vectors. float32 is kept: float16 would halve the bytes, but
nothing here measured that recall is unchanged.

A shard is written under a temporary name, fsynced and renamed, so a worker
killed mid-write never leaves a file that looks finished; its name is a hash
of its content, so a partition that runs twice writes the same file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgindex.pipeline.atomic import save_array_file
from imgindex.pipeline.copies import COPIES_FILE
from imgindex.pipeline.discover import Failure, ImageRecord
from imgindex.pipeline.errors import BuildFailed
from imgindex.pipeline.traits import TRAITS, current_traits

if TYPE_CHECKING:
    from imgindex.pipeline.embed import ModelSpec, PartitionResult

logger = logging.getLogger(__name__)

SHARD_FORMAT = 1
SUFFIX = ".npz"


def spec_key(spec: ModelSpec) -> str:
    """What a shard's vectors depend on: model, preprocessing limits, version."""
    fields = dataclasses.asdict(spec)
    # How a worker runs the model changes neither the vectors (beyond the
    # rounding of fp16, cosine >= 0.999, or the GPU's decoding, >= 0.995:
    # tests/test_batch_decode.py) nor the index; leaving these out also
    # keeps the shards of versions before them valid.
    for irrelevant in (
        "batch_size",
        "device",
        "decode_threads",
        "decoder",
        "precision",
        "runtime",
    ):
        fields.pop(irrelevant, None)
    text = json.dumps(fields, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Shard:
    """A shard on disk, known by its ``info`` (vectors not loaded)."""

    path: Path
    info: dict[str, Any]

    @property
    def records(self) -> list[ImageRecord]:
        """Every image the partition covered (embedded or failed)."""
        return [ImageRecord(p, s, m) for p, s, m in self.info["records"]]

    @property
    def units(self) -> list[ImageRecord]:
        """What the partition's task was given: its images, or its tar shards."""
        units = self.info.get("units")
        if units is None:
            return self.records
        return [ImageRecord(p, s, m) for p, s, m in units]

    @property
    def failures(self) -> list[Failure]:
        return [Failure(*row) for row in self.info["failures"]]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors), read now.

        Raises
        ------
        OSError, ValueError, zipfile.BadZipFile
            If the file is damaged.
        """
        with open_npz(self.path) as data:
            ids, vectors = data["ids"], data["vectors"]
        if len(ids) != len(vectors) or len(ids) != len(self.info["paths"]):
            raise ValueError(f"{self.path.name}: ids, vectors and paths disagree")
        return ids, vectors

    def traits(self) -> np.ndarray | None:
        """The images' :data:`~pipeline.traits.TRAITS` rows, or None if not stored.

        Raises
        ------
        OSError, ValueError, zipfile.BadZipFile
            If the file is damaged.
        """
        traits = load_traits(self.path)
        if traits is not None and len(traits) != len(self.info["paths"]):
            raise ValueError(f"{self.path.name}: traits and paths disagree")
        return traits


@contextlib.contextmanager
def open_npz(path: str | os.PathLike) -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load`` of an .npz whose file is closed even when the zip is
    damaged: np.load leaves a handle of its own open then."""
    with open(path, "rb") as f, np.load(f) as data:
        yield data


def load_traits(path: str | os.PathLike) -> np.ndarray | None:
    """A shard file's traits rows, or None if it has none (see :meth:`Shard.traits`)."""
    with open_npz(path) as data:
        return traits_member(data)


def traits_member(data: np.lib.npyio.NpzFile) -> np.ndarray | None:
    """The traits of an opened shard; None if it has none, or another version's."""
    if "traits" not in data.files:
        return None
    return current_traits(data["traits"])


def write_shard(
    folder: str | os.PathLike,
    spec: ModelSpec,
    records: Sequence[ImageRecord],
    result: PartitionResult,
) -> str:
    """Write one partition's shard atomically into ``folder``; return its file name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Given tar shards, the task found their members: those are the records.
    covered = records if result.records is None else result.records
    info = {
        "format": SHARD_FORMAT,
        "spec": spec_key(spec),
        "records": [[r.path, r.size, r.mtime_ns] for r in covered],
        "paths": list(result.paths),
        "dim": int(np.shape(result.vectors)[1]) if len(result.paths) else 0,
        "failures": [[f.path, f.reason, f.transient] for f in result.failures],
        "worker": result.worker,
        "timings": result.timings,
    }
    if result.preprocess is not None:
        info["preprocess"] = result.preprocess
    if result.records is not None:
        info["units"] = [[r.path, r.size, r.mtime_ns] for r in records]
    text = json.dumps(info, ensure_ascii=True).encode()
    digest = hashlib.blake2b(text, digest_size=12)
    digest.update(np.ascontiguousarray(result.vectors).tobytes())
    arrays = {
        "ids": np.asarray(result.ids, np.int64),
        "vectors": np.asarray(result.vectors, np.float32),
    }
    if result.traits is not None:
        traits = np.ascontiguousarray(result.traits, TRAITS)
        arrays["traits"] = traits  # a structured .npy member: no pickle needed
        digest.update(traits.tobytes())
    name = f"{digest.hexdigest()}{SUFFIX}"
    blob = np.frombuffer(text, dtype=np.uint8)
    save_array_file(folder / name, info=blob, **arrays)
    return name


def write_vectors(
    folder: str | os.PathLike,
    spec: ModelSpec,
    records: Sequence[ImageRecord],
    vectors: np.ndarray,
    worker: str,
) -> Path:
    """Write ``vectors`` (row i: ``records[i]``, none failed) as one shard; its path.

    For vectors that come from elsewhere than a partition's task (an old
    index's, or generated ones in tests and benchmarks).
    """
    from imgindex.pipeline.embed import PartitionResult

    result = PartitionResult(
        np.array([r.id for r in records], np.int64),
        [r.path for r in records],
        vectors,
        [],
        worker,
    )
    return Path(folder) / write_shard(folder, spec, records, result)


def read_shard(path: str | os.PathLike) -> Shard:
    """A shard's ``info``; its vectors stay on disk until :meth:`Shard.arrays`.

    Raises
    ------
    OSError, ValueError, KeyError, zipfile.BadZipFile
        If the file is not a complete shard.
    """
    path = Path(path)
    with open_npz(path) as data:
        info = json.loads(data["info"].tobytes())
        if "ids" not in data.files or "vectors" not in data.files:
            raise KeyError("ids/vectors")
    if info.get("format") != SHARD_FORMAT:
        raise ValueError(f"shard format {info.get('format')!r}")
    return Shard(path, info)


class ShardFiles:
    """Shards named by their files, read again (their info, not their
    vectors) each time they are iterated: a build's thousands of shards, each
    listing its images, are not all held at once."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Shard]:
        for path in self.paths:
            try:
                yield read_shard(path)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                raise BuildFailed(
                    f"the shard {str(path)!r} became unreadable during the build "
                    f"({type(e).__name__}: {e}); run the same command again: it "
                    "resumes"
                ) from None


def iter_shards(folder: str | os.PathLike) -> Iterator[Shard | tuple[Path, str]]:
    """Every shard in ``folder`` in name order; a damaged one as (path, reason)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            yield read_shard(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            yield path, f"{type(e).__name__}: {e}"


def usable_shards(
    shards: Iterable[Shard | tuple[Path, str]],
    spec: ModelSpec,
    wanted: Mapping[str, ImageRecord],
) -> tuple[list[Shard], list[Path]]:
    """Of ``shards`` (as :func:`iter_shards` gives them), those still valid
    for ``wanted`` (path -> current record), and the damaged ones.

    A shard is valid if it was made with ``spec`` and every image (or tar
    shard) its task was given is in ``wanted`` unchanged, and not claimed by
    an earlier shard. Damaged
    shards are reported here (and their images embedded again), never indexed.
    """
    key = spec_key(spec)
    found: list[Shard] = []
    damaged: list[Path] = []
    claimed: set[str] = set()
    for shard in shards:
        if isinstance(shard, tuple):
            logger.warning("ignoring damaged shard %s (%s)", *shard)
            damaged.append(shard[0])
            continue
        if shard.info["spec"] != key:
            continue
        units = shard.units
        if all(wanted.get(r.path) == r and r.path not in claimed for r in units):
            claimed.update(r.path for r in units)
            found.append(shard)
    return found, damaged


def shard_stats(folder: str | os.PathLike) -> dict[str, Any]:
    """Count, bytes and dtype of the shards in ``folder`` (for ``imgindex info``)."""
    paths = sorted(Path(folder).glob(f"*{SUFFIX}")) if Path(folder).is_dir() else []
    dtype = None
    if paths:
        with open_npz(paths[0]) as data:
            dtype = str(data["vectors"].dtype)
    return {
        "count": len(paths),
        "bytes": sum(p.stat().st_size for p in paths),
        "dtype": dtype,
    }


def staging_dir(index_dest: str | os.PathLike) -> Path:
    """Where a build's new shards go until the index is written: beside it."""
    dest = Path(index_dest)
    return dest.parent / f".{dest.name}.partial"


INDEX_WORK = "index"  # in the staging folder: index files being built
# In the staging folder: shards of touched, unchanged images (pipeline/touched.py)
TOUCHED_WORK = "touched"


def clear_index_work(work: Path) -> None:
    """Remove the index files a build wrote into ``work``, and it if then empty."""
    if not work.is_dir():
        return
    for path in work.iterdir():
        if path.is_file() and (
            path.suffix in (".faiss", ".ivfdata")
            or path.name == COPIES_FILE
            or ".tmp-" in path.name
        ):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something not ours is left: keep it
        work.rmdir()


def clear_staging(folder: Path) -> None:
    """Remove a build's staging folder: its shards and temporary files only."""
    if not folder.is_dir():
        return
    clear_index_work(folder / INDEX_WORK)
    clear_shard_files(folder / TOUCHED_WORK)
    for path in folder.glob(".probe-*"):
        if path.is_file():
            path.unlink(missing_ok=True)
    clear_shard_files(folder)


def clear_shard_files(folder: Path) -> None:
    """Remove the shards and temporary files in ``folder``, and it if then empty."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and (path.name.endswith(SUFFIX) or ".tmp-" in path.name):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something not ours is left: keep it
        folder.rmdir()
