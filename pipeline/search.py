"""Search an index directory with query images, embedded exactly as at build time.

A query is also searched turned by 90, 180 and 270 degrees (a phone photo
whose EXIF orientation was lost is a turned copy): an image found that way
scores its turned cosine less TURN_PENALTY. Measured on 19 scikit-image
photos with their panned views and 300 generated photos as the index, and
the copies of pipeline.synthetic.COPY_MAKERS as queries: turned copies find
their original at rank 1 for 79 % of the photos without the turns (the rest
find a panned view of it first) and for 100 % with them; with a penalty of
0 re-encoded and resized copies lost 5 points to the turned views of other
photos, with 0.06 no kind of copy lost any (bench/search_copies.py). It
costs four embeddings a query instead of one (``turns=False``).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from imgindex.pipeline import index as faiss_index
from imgindex.pipeline.embed import (
    Embedder,
    ModelSpec,
    model_threads,
    runs_from_cache,
)
from imgindex.pipeline.errors import DecodeError, ImgindexError, IndexDirError
from imgindex.pipeline.manifest_ids import damaged_manifest
from imgindex.pipeline.sources import Source, image_file, opened_digest, source_of
from imgindex.pipeline.store import StoredIndex, read_index_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rank: int
    path: str  # absolute path of the indexed image
    score: float  # cosine similarity, higher = more similar
    id: int = -1  # the image's id in the index
    meta: dict | None = None  # its file list's other columns, if it had any
    # Against the query, where asked (Searcher.iter_hits' copies): one of KINDS.
    kind: str | None = None

    def to_json(self) -> dict:
        row = {"rank": self.rank, "path": self.path, "score": round(self.score, 6)}
        if self.kind is not None:
            row["kind"] = self.kind
        if self.meta is not None:
            row["meta"] = self.meta
        return row


# What the check of `imgindex duplicates` makes of a hit against its query:
# the same bytes, a copy of it, another shot of its scene, neither, or
# undecided (one of the two cannot be read now, or is too flat to hold the
# features the check matches).
KINDS = ("identical", "copy", "shot", "neither", "undecided")


TURN_PENALTY = 0.06
BATCH = 64  # images (a query and its turns) embedded at a time


class Searcher:
    """An index directory opened for repeated queries (model loaded once).

    With a ``client`` (a ``distributed.Client``), :meth:`iter_hits` embeds the
    queries and checks the hits on its workers (pipeline/search_remote.py),
    which load the model; the client only reads the queries' bytes and
    searches the index. Workers that cannot see a folder dataset leave the
    checks to this process.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        device: str = "cpu",
        turns: bool = True,
        runtime: str | None = None,
        few_passes: bool = False,
        client: Any = None,
    ):
        """``few_passes``: the searches will run few forward passes, so ``auto``
        means torch unless ONNX Runtime runs from its cache here."""
        self.turns = turns
        # Only the hits' rows are read: a million images' manifest is 130 MB.
        self.stored: StoredIndex = read_index_dir(index_dir, by_id=True)
        self.runner = None
        self._embedder: Embedder | None = None
        self._checks_on_workers: bool | None = None
        try:
            self._open(device, runtime, few_passes, client)
        except BaseException:
            self.stored.close()
            raise

    def _open(
        self, device: str, runtime: str | None, few_passes: bool, client: Any
    ) -> None:
        # Read now, from the handles opened with the manifest: a build may swap
        # in a newer version while the model loads. An on-disk index is mapped,
        # not read: only the lists a query probes are paged in.
        self.index = self.stored.index
        self.paths = self.stored.lookup()
        meta = self.stored.meta
        # Tuned at build time to reach the recall target (meta.quality).
        faiss_index.set_search_params(self.index, meta.search_params)
        self.source = source_of(meta)
        self.root = Path(self.source.base)
        if client is not None:
            from imgindex.cluster.worker import setup_workers
            from imgindex.pipeline.index_build import Runner

            # The workers' own device (a GPU worker's GPU), as in a build.
            self.spec = ModelSpec.from_config(meta.model, runtime=runtime)
            setup_workers(client, self.spec)
            # The remote search keeps its own watchdog (with time limits).
            self.runner = Runner(client, meta.name, prefix="search", watch=False)
            return
        spec = ModelSpec.from_config(meta.model, device, runtime=runtime)
        if few_passes and spec.runtime == "auto" and not runs_from_cache(spec):
            # Exporting the graph or timing the runtimes costs about a second
            # and ONNX Runtime saves ~20 ms a pass (docs/guide/models.md).
            spec = replace(spec, runtime="torch")
        self.spec = spec
        self.check_dim(self.embedder.dim)

    @property
    def embedder(self) -> Embedder:
        """The model, here (loaded on first use with a client)."""
        if self._embedder is None:
            spec = self.spec
            if self.runner is not None:
                spec = replace(spec, device="cpu")
            self._embedder = Embedder(spec)
        return self._embedder

    def check_dim(self, dim: int) -> None:
        """Raises ImgindexError where the model's vectors do not fit the index."""
        meta = self.stored.meta
        if dim != meta.dim:
            raise ImgindexError(
                f"model {meta.model!r} gives {dim}-d vectors but the "
                f"index holds {meta.dim}-d ones; rebuild it with "
                "`imgindex build --rebuild`"
            )

    def checks_on_workers(self) -> bool:
        """Whether the workers can read the hits' files (a dataset in an
        object store, or a folder they see), asked once."""
        if self._checks_on_workers is None:
            from imgindex.pipeline.search_remote import workers_seeing

            client = self.runner.client
            self._checks_on_workers = self.source.remote or workers_seeing(
                client, self.source.base
            )
            if not self._checks_on_workers:
                logger.warning(
                    "some workers cannot see %s: the hits are checked here",
                    self.source.base,
                )
        return self._checks_on_workers

    def close(self) -> None:
        """Release the version's files (the searcher cannot be used after)."""
        self.stored.close()

    def search_images(
        self, images: Sequence[str | os.PathLike], k: int = 10, **options: Any
    ) -> list[list[Hit]]:
        """Top-``k`` hits for each query image file, in order; ``options``
        are :meth:`iter_hits`'s."""
        return list(self.iter_hits(images, k, **options))

    def iter_hits(
        self,
        images: Sequence[Any],
        k: int = 10,
        batch: int = BATCH,
        progress: Callable[[int, int], None] | None = None,
        unreadable: Callable[[int, DecodeError], None] | None = None,
        opened: Callable[[Any], str | os.PathLike | BinaryIO] | None = None,
        copies: bool = False,
    ) -> Iterator[list[Hit]]:
        """Top-``k`` hits for each query image file, in order, as each batch
        is searched.

        Queries are decoded, embedded and searched ``batch`` images (a query
        and its turns) at a time, so thousands of them need the memory of one
        batch. ``progress(done, total)`` is called with the queries searched
        after each batch. ``opened(query)`` gives what Pillow opens for a
        query that is no file (default: the query itself, a path).

        Given ``unreadable``, a query that cannot be read is passed to it
        (its position and the error) and gets no hits, and the others are
        searched; without it, the first such query raises.

        With ``copies``, each hit's ``kind`` says what the geometric check of
        `imgindex duplicates` makes of it against its query (:data:`KINDS`):
        each hit's file is read: about 0.15 s a copy on one core, less for
        the rest.

        Raises
        ------
        DecodeError
            Naming the query that could not be read.
        """
        if opened is None:
            opened = os.fspath
        step = self.queries_per_batch(batch)
        if self.runner is not None:
            from imgindex.pipeline.search_remote import iter_remote_hits

            yield from iter_remote_hits(
                self, images, k, step, progress, unreadable, opened, copies
            )
            return
        for start in range(0, len(images), step):
            read: dict[int, np.ndarray] = {}
            for n, query in enumerate(images[start : start + step], start=start):
                try:
                    read[n] = self.embedder.decode(opened(query))
                except DecodeError as e:
                    if unreadable is None:
                        raise
                    unreadable(n, e)
            searched = self.search_pixels(list(read.values()), k) if read else []
            found = dict(zip(read, searched, strict=True))
            if copies:
                found = self.with_kinds_here(
                    {n: opened(images[n]) for n in read}, found
                )
            end = min(start + step, len(images))
            if progress is not None:
                progress(end, len(images))
            for n in range(start, end):
                yield found.get(n, [])

    def told(self, query: str | os.PathLike | BinaryIO, hits: list[Hit]) -> list[Hit]:
        """``hits`` each with its ``kind`` (:data:`KINDS`) against ``query``,
        what Pillow opens for it: its path or bytes."""
        return self.with_kinds_here({0: query}, {0: hits})[0]

    def with_kinds_here(
        self, queries: dict[int, str | BinaryIO], found: dict[int, list[Hit]]
    ) -> dict[int, list[Hit]]:
        """``found``'s hits, each with its kind against its query (KINDS)."""
        # As many threads as the model's forward pass uses here
        # (OMP_NUM_THREADS on a shared login node, else the cores this
        # process may use).
        kinds = tell_kinds(self.source, queries, self.hit_rows(found), model_threads())
        return with_kinds(found, kinds)

    def hit_rows(self, found: dict[int, list[Hit]]) -> dict[int, list[dict]]:
        """Each query's hits' manifest rows, what :func:`tell_kinds` reads."""
        return {
            n: [_path_and_size(self.paths.row(hit.id)) for hit in hits]
            for n, hits in found.items()
        }

    def queries_per_batch(self, batch: int = BATCH) -> int:
        """Queries in a batch of ``batch`` images: with turns, four a query."""
        return max(1, batch // 4) if self.turns else batch

    def search_pixels(
        self, pixels: Sequence[np.ndarray], k: int = 10, turns: bool | None = None
    ) -> list[list[Hit]]:
        """Top-``k`` hits for decoded query crops (:meth:`Embedder.decode`).

        With turns, each crop and its three turns go through the model as one
        batch: one forward pass instead of four.
        """
        turns = self.turns if turns is None else turns
        vectors = self.embedder.embed_pixels(with_turns(pixels, turns))
        return self.search_embedded(vectors, k, turns)

    def search_embedded(
        self, vectors: np.ndarray, k: int = 10, turns: bool | None = None
    ) -> list[list[Hit]]:
        """Top-``k`` hits for the vectors of :func:`with_turns`' batch."""
        turns = self.turns if turns is None else turns
        n = len(vectors) // 4 if turns else len(vectors)
        scores, ids = self._search(vectors[:n], k)
        if turns:
            for t in range(1, 4):
                more = self._search(vectors[t * n : (t + 1) * n], k)
                scores, ids = _merged((scores, ids), more, TURN_PENALTY, k)
        return self._hits(scores, ids)

    def search_vectors(self, queries, k: int = 10) -> list[list[Hit]]:
        return self._hits(*self._search(queries, k))

    def stored_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors the index holds for ``ids`` (a copy gets its original's).

        Raises
        ------
        RuntimeError
            Where the index cannot give vectors back (IVF-PQ, on-disk lists).
        """
        return faiss_index.reconstruct(self.index, self.stored.copies.stored_ids(ids))

    def _search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.stored.copies.search(self.index, queries, k)

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        return [
            [
                self._hit(rank, float(s), int(i))
                for rank, (s, i) in enumerate(zip(row_s, row_i, strict=True), start=1)
                if i >= 0
            ]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    def _hit(self, rank: int, score: float, image: int) -> Hit:
        row = self.paths.row(image)
        if row is None:  # an on-disk index's ids are not all checked on open
            problem = f"it holds image id {image}, which its manifest does not list"
            raise IndexDirError(damaged_manifest(self.stored.path, problem))
        path = self.source.location(row["path"])
        return Hit(rank, path, score, image, row.get("meta"))


def with_turns(pixels: Sequence[np.ndarray], turns: bool) -> list[np.ndarray]:
    """The crops, then, with ``turns``, each of them turned by 90, 180 and
    270 degrees: the model's batch for :meth:`Searcher.search_embedded`."""
    # The centre square turned is the turned image's centre square.
    batch = list(pixels)
    if turns:
        batch += [
            np.ascontiguousarray(np.rot90(x, t)) for t in (1, 2, 3) for x in pixels
        ]
    return batch


@dataclass(frozen=True)
class EmbeddedQueries:
    """A batch of queries as a worker embedded them (:func:`embed_queries`)."""

    positions: list[int]  # of the queries decoded, in order
    vectors: np.ndarray  # their :func:`with_turns` batch's vectors
    unreadable: list[tuple[int, str]]  # (position, reason) of the others


def embed_queries(
    spec: ModelSpec, queries: list[tuple[int, io.BytesIO]], turns: bool
) -> EmbeddedQueries:
    """Decode and embed a batch of queries (a worker's task): each is its
    position and its bytes, named as the query (:func:`read_query`)."""
    embedder = Embedder(spec)  # loaded once per process
    positions, pixels, unreadable = [], [], []
    for n, data in queries:
        try:
            pixels.append(embedder.decode(data))
            positions.append(n)
        except DecodeError as e:
            unreadable.append((n, e.reason))
    vectors = (
        embedder.embed_pixels(with_turns(pixels, turns))
        if pixels
        else np.zeros((0, embedder.dim), np.float32)
    )
    return EmbeddedQueries(positions, vectors, unreadable)


def read_query(opened: str | os.PathLike | BinaryIO) -> io.BytesIO:
    """A query's bytes, to be sent to a worker, named as the query (errors
    name it).

    Raises
    ------
    DecodeError
        Where the file cannot be read.
    """
    from imgindex.pipeline.decode import read_error

    if isinstance(opened, io.IOBase):
        name = getattr(opened, "name", None)
        opened.seek(0)
        data = io.BytesIO(opened.read())
    else:
        name = os.fspath(opened)
        try:
            with open(name, "rb") as f:
                data = io.BytesIO(f.read())
        except OSError as e:
            raise read_error(name, e) from None
    if isinstance(name, str):
        data.name = name
    return data


def _size(opened: str | os.PathLike | BinaryIO) -> int:
    if isinstance(opened, io.BytesIO):
        return len(opened.getbuffer())
    return os.path.getsize(opened)


def with_kinds(
    found: dict[int, list[Hit]], kinds: dict[int, list[str]]
) -> dict[int, list[Hit]]:
    return {
        n: [replace(hit, kind=k) for hit, k in zip(hits, kinds[n], strict=True)]
        for n, hits in found.items()
    }


def _path_and_size(row: dict) -> dict:
    return {"path": row["path"], "size": row.get("size")}


def tell_kinds(
    source: Source,
    queries: dict[int, str | os.PathLike | BinaryIO],
    rows: dict[int, list[dict]],
    threads: int,
) -> dict[int, list[str]]:
    """The kind (:data:`KINDS`) of each query's hits against it: ``rows[n]``
    are query ``n``'s hits' manifest rows (path and size), ``queries[n]`` what
    Pillow opens for it. Runs here or as a worker's task.

    Each image is read and its features found once, however many of the
    batch's queries it is a hit of (copies of one photo share their hits),
    for at most :data:`HELD_FEATURES` hits at a time; all of it in
    ``threads`` threads, as OpenCV lets go of the GIL.
    """
    kinds: dict[int, list[str]] = {n: [] for n in queries}
    for part in _parts(queries, rows, HELD_FEATURES):
        told = _tell_part(source, {n: queries[n] for n in part}, part, threads)
        for n, more in told.items():
            kinds[n].extend(more)
    return kinds


# The hits' features held at once by tell_kinds: about 150 KB each, so a
# batch of 16 queries at -k 100 takes 38 MB, not 240.
HELD_FEATURES = 256


def _parts(
    queries: dict[int, Any], rows: dict[int, list[dict]], most: int
) -> Iterator[dict[int, list[dict]]]:
    """The queries' hits in parts of at most ``most`` files, each query's in
    order (a query of more hits spans parts)."""
    part: dict[int, list[dict]] = {}
    paths: set[str] = set()
    for n in queries:
        for i in range(0, len(rows[n]), most):
            chunk = rows[n][i : i + most]
            new = {row["path"] for row in chunk} - paths
            if part and len(paths) + len(new) > most:
                yield part
                part, paths = {}, set()
                new = {row["path"] for row in chunk}
            part.setdefault(n, []).extend(chunk)
            paths |= new
    if part:
        yield part


def _tell_part(
    source: Source,
    queries: dict[int, str | os.PathLike | BinaryIO],
    rows: dict[int, list[dict]],
    threads: int,
) -> dict[int, list[str]]:
    from concurrent.futures import ThreadPoolExecutor

    from imgindex.pipeline.duplicates import check_pair, seen

    sizes = {row["path"]: row.get("size") for n in queries for row in rows[n]}

    def query_seen(opened: str | BinaryIO):
        try:
            size = _size(opened)
            digest = opened_digest(opened) if size in sizes.values() else None
        except OSError:  # gone since it was searched
            size = digest = None
        return seen(opened), size, digest

    def hit_seen(path: str):
        try:
            opened = image_file(source, path, reader)
            same = sizes[path] in query_sizes
            return seen(opened), opened_digest(opened) if same else None
        except (OSError, DecodeError):  # gone since the build
            return None, None

    def kind(query, hit) -> str:
        (features, _, digest), (theirs, their_digest) = query, hit
        if digest is not None and digest == their_digest:
            return "identical"
        checked = check_pair(features, theirs)
        return "undecided" if checked is None else checked.kind or "neither"

    # The reader takes each tar shard in one pass, not one for each hit in it.
    with (
        source.reader(list(sizes)) as reader,
        ThreadPoolExecutor(max(1, threads)) as pool,
    ):
        mine = dict(zip(queries, pool.map(query_seen, queries.values()), strict=True))
        # hit_seen digests only hits of a query's size.
        query_sizes = {size for _, size, _ in mine.values()}
        theirs = dict(zip(sizes, pool.map(hit_seen, sizes), strict=True))
        return {
            n: list(
                pool.map(
                    kind, [mine[n]] * len(rows[n]), [theirs[r["path"]] for r in rows[n]]
                )
            )
            for n in queries
        }


def check_queries(
    source: Source, queries: list[tuple[int, io.BytesIO]], rows: dict[int, list[dict]]
) -> dict[int, list[str]]:
    """:func:`tell_kinds` as a worker's task, of the batch's queries that
    have hits (``rows``), from the bytes :func:`embed_queries` had."""
    # One thread: the worker's other threads check the other batches.
    return tell_kinds(source, {n: q for n, q in queries if n in rows}, rows, 1)


def _merged(
    found: tuple[np.ndarray, np.ndarray],
    more: tuple[np.ndarray, np.ndarray],
    penalty: float,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of two result lists per query, ``more``'s scores less
    ``penalty``; an id in both keeps its better score."""
    scores = np.concatenate([found[0], more[0] - penalty], axis=1)
    ids = np.concatenate([found[1], more[1]], axis=1)
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for row, (s, i) in enumerate(zip(scores, ids, strict=True)):
        kept: dict[int, int] = {}  # id -> column of its best score
        for j in np.argsort(-s, kind="stable"):
            if i[j] >= 0 and i[j] not in kept:
                kept[int(i[j])] = j
                if len(kept) == k:
                    break
        columns = list(kept.values())
        out_s[row, : len(columns)] = s[columns]
        out_i[row, : len(columns)] = i[columns]
    return out_s, out_i


def query_files(query: str | os.PathLike) -> list[Path]:
    """The image files a query path names: itself, or every image under a
    folder (walked as a dataset is).

    Raises
    ------
    DecodeError
        Where nothing is at the path: before any query is embedded, and
        without the build's hint that a discovered file was deleted since.
    DatasetError
        For a folder that holds no images.
    """
    from imgindex.pipeline.discover import check_dataset, discover_images

    path = Path(query)
    if path.is_dir():
        root = check_dataset(path).resolve()
        return [root / record.path for record in discover_images(root, [])]
    if not os.path.lexists(path):
        raise DecodeError(str(path), "no such file or folder")
    return [path]


def search_images(
    index_dir: str | os.PathLike,
    images: list[str | os.PathLike],
    k: int = 10,
    turns: bool = True,
) -> list[list[Hit]]:
    """Open ``index_dir`` and return the top-``k`` hits for each query image."""
    return Searcher(index_dir, turns=turns).search_images(images, k)


__all__ = ["DecodeError", "Hit", "Searcher", "query_files", "search_images"]
