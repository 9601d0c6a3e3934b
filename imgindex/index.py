"""``imgindex.open``: an index directory as a Python object to search and read."""

from __future__ import annotations

import io
import logging
import numbers
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imgindex.pipeline.errors import DecodeError, ImgindexError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import dask.array
    import numpy as np
    import pandas as pd
    from distributed import Client

    from imgindex.pipeline.duplicates import DuplicateReport
    from imgindex.pipeline.index_build import ShardRows
    from imgindex.pipeline.search import Searcher
    from imgindex.results import SearchResults

# A query: an image file (or a folder of them), encoded image bytes, a PIL
# image, or an array of pixels (height x width, x 3 or 4 channels).
Query = Any


def open(path: str | os.PathLike) -> Index:  # noqa: A001 (imgindex.open, as zarr.open)
    """Open the index directory ``path`` (``OUT/<name>`` of a build).

    Raises
    ------
    IndexDirError
        If ``path`` is not a readable imgindex index directory.
    ConfigError
        If an ``imgindex.*`` setting holds a value it does not take.
    """
    from imgindex.pipeline.config_check import check_config

    check_config()
    return Index(path)


class Index:
    """An index directory: search it, read its vectors and manifest, find its
    duplicates.

    The model is loaded at the first search and kept for the next ones.
    Use it as a context manager, or call :meth:`close`, to let go of the
    index file at once.
    """

    def __init__(self, path: str | os.PathLike):
        from imgindex.pipeline.sources import moved_hint
        from imgindex.pipeline.store import read_meta

        self.path = Path(path).resolve()
        self.meta = read_meta(self.path)  # one line if it is not an index
        hint = moved_hint(self.meta, self.path)
        if hint:
            logger.warning(
                "%s: %s; searches work, but no image or thumbnail can be read",
                self.name,
                hint,
            )
        self._searcher: Searcher | None = None
        self._remote: Searcher | None = None  # the last client's
        self._selection: list[ShardRows] | None = None

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def model(self) -> str:
        return self.meta.model

    @property
    def dim(self) -> int:
        return self.meta.dim

    def __len__(self) -> int:
        return self.meta.count

    def __repr__(self) -> str:
        return (
            f"<imgindex.Index {self.name!r}: {len(self):,} images, "
            f"{self.model} {self.dim}-d, {self.meta.index_key or 'flat'} "
            f"at {str(self.path)!r}>"
        )

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the index file and the model."""
        for searcher in (self._searcher, self._remote):
            if searcher is not None:
                searcher.close()
        self._searcher = self._remote = None

    def info(self) -> dict[str, Any]:
        """What ``imgindex info --json`` prints: model, size, shards, failures."""
        from imgindex.pipeline.describe import describe_index

        return describe_index(self.path)

    def search(
        self,
        queries: Query | Sequence[Query],
        k: int = 10,
        *,
        turns: bool | None = None,
        unreadable: Literal["raise", "skip"] = "raise",
        copies: bool = False,
        client: Client | None = None,
    ) -> SearchResults:
        """The ``k`` images most similar to each query.

        Parameters
        ----------
        queries
            One query or a list: image files (a folder: every image under
            it), encoded image bytes, PIL images, or arrays of pixels
            (``uint8``, height x width, or x 3 or 4 channels).
        k
            Results per query.
        turns
            Also search each query turned by 90, 180 and 270 degrees (copies
            whose orientation was lost); default ``imgindex.search.turns``.
        unreadable
            ``"skip"``: a query that cannot be read as an image is logged,
            gets no rows and is listed in the results' ``unreadable``, and
            the others are searched (a folder of thousands with one bad
            file); ``"raise"``: it raises :class:`DecodeError`.
        copies
            Tell each hit what it is to its query, as :meth:`duplicates`
            does: a ``kind`` column of ``identical`` (the query's bytes),
            ``copy`` (the same photo, however resized, cropped, turned or
            re-encoded), ``shot`` (another shot of its scene), ``neither``,
            or ``undecided`` (a file that cannot be read now, or too flat to
            match). Each hit's file is read:
            about 0.15 s a copy on one core, less for the rest.
        client
            Embed the queries, and check the hits with ``copies``, on this
            ``distributed.Client``'s workers (which load the model; those
            that cannot see the images' folder leave the checks here); this
            process reads the queries and searches the index. Thousands of
            queries are minutes of work for one machine; a few are quicker
            here, so no default client is taken.

        Returns
        -------
        SearchResults
            A pandas DataFrame, one row per hit: ``query`` (the file's path,
            else ``<image N>``), ``rank``, ``path``, ``score`` (cosine,
            higher is more similar), ``id``; plus ``kind`` with ``copies``,
            and ``meta`` where the dataset was a file list with more columns.
            In Jupyter it shows each query and its hits as a row of
            thumbnails. Its ``unreadable`` maps each query skipped to why.

        Raises
        ------
        DecodeError
            Naming the query that could not be read as an image.
        """
        from imgindex.pipeline.config import config_value
        from imgindex.results import SearchResults, SearchShown

        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k: {k!r} is not a whole number of results")
        if k < 1:
            raise ValueError(f"k: {k} is not a number of results (1 or more)")
        if unreadable not in ("raise", "skip"):
            raise ValueError(f"unreadable: {unreadable!r} is not 'raise' or 'skip'")
        turns = bool(config_value(turns, "imgindex.search.turns"))
        searcher = self._searcher_for(turns, client)
        given = list(_queries(queries))
        if not given:
            raise ValueError("queries: no query images given")
        skipped: dict[int, DecodeError] = {}

        def skip(n: int, error: DecodeError) -> None:
            logger.warning("not searched: %s", error)
            skipped[n] = error

        hits = searcher.search_images(
            given,
            k,
            unreadable=skip if unreadable == "skip" else None,
            opened=lambda one: _opened(*one),
            copies=copies,
        )
        rows = [
            {
                "query": label,
                "rank": h.rank,
                "path": h.path,
                "score": h.score,
                "id": h.id,
                **({"kind": h.kind} if copies else {}),
                **({"meta": h.meta} if h.meta is not None else {}),
            }
            for (label, _), found in zip(given, hits, strict=True)
            for h in found  # none for a query skipped
        ]
        # Only the hits' paths: the index's map holds every image.
        shown = SearchShown(
            searcher.source,
            {row["id"]: searcher.paths[row["id"]] for row in rows},
            {
                label: query
                for n, (label, query) in enumerate(given)
                if n not in skipped
            },
            {given[n][0]: e.reason for n, e in skipped.items()},
        )
        return SearchResults.of(rows, shown, ["kind"] if copies else [])

    def _searcher_for(self, turns: bool, client: Client | None = None) -> Searcher:
        from imgindex.pipeline.search import Searcher

        if client is not None:
            from imgindex.cluster.connect import use_client

            use_client(client)  # one line for a closed client or none at work
            if self._remote is None or self._remote.runner.client is not client:
                if self._remote is not None:
                    self._remote.close()
                    self._remote = None
                self._remote = Searcher(self.path, turns=turns, client=client)
            self._remote.turns = turns
            return self._remote
        if self._searcher is None:
            # The model is loaded once; a query or two need no ONNX export.
            self._searcher = Searcher(self.path, turns=turns, few_passes=True)
        self._searcher.turns = turns
        return self._searcher

    def vectors(self) -> dask.array.Array:
        """The index's vectors as a lazy Dask Array, one chunk per shard
        (``len(self)`` x ``self.dim``, float32, unit length).

        Row ``i`` is the image whose id is row ``i`` of :meth:`ids`. Nothing
        is read until it is computed, on the client's workers where there is
        a default client.

        Raises
        ------
        IndexDirError
            If a shard is missing or damaged, or the index was built before
            imgindex kept shards.
        """
        import numpy as np

        return self._shard_array(1, (self.dim,), np.float32)

    def ids(self) -> dask.array.Array:
        """The images' ids (int64), in the order of :meth:`vectors`' rows."""
        import numpy as np

        return self._shard_array(0, (), np.int64)

    def _shard_array(self, member: int, shape: tuple[int, ...], dtype):
        import dask
        import dask.array as da

        from imgindex.pipeline.reindex import stored_selection

        if self._selection is None:
            # Read once (the manifest and every shard's record) for both
            # vectors() and ids(), from the version this Index opened.
            self._selection, _ = stored_selection(self.path, self.meta.count)
        selection = self._selection
        load = dask.delayed(_shard_member, pure=True)
        chunks = [
            da.from_delayed(load(rows, member), (rows.count, *shape), dtype=dtype)
            for rows in selection
        ]
        if not chunks:
            return da.zeros((0, *shape), dtype=dtype)
        return da.concatenate(chunks)

    def manifest(self) -> pd.DataFrame:
        """Every indexed image: ``id``, ``path`` (as search results give it),
        ``size`` (bytes), ``mtime`` (the file's, UTC), and the other columns
        of a file list the index was built from.

        Raises
        ------
        IndexDirError
            If the index is unreadable, or changed while it was read.
        """
        import pandas as pd

        from imgindex.pipeline.sources import source_of
        from imgindex.pipeline.store import read_index_dir

        # Read whole, from one version of the directory: a build may swap in
        # a newer one meanwhile.
        with read_index_dir(self.path) as stored:
            source = source_of(stored.meta)
            records, metadata = stored.manifest, stored.metadata
        metas = [metadata.get(r.path, {}) for r in records] if metadata else []
        frame = pd.DataFrame(
            {
                "id": pd.array([r.id for r in records], dtype="int64"),
                "path": [source.location(r.path) for r in records],
                "size": pd.array([r.size for r in records], dtype="int64"),
                "mtime": pd.to_datetime(
                    [r.mtime_ns for r in records], unit="ns", utc=True
                ),
            }
        )
        if metas:
            others = pd.DataFrame.from_records(metas, index=frame.index)
            clash = {c: f"{c}_meta" for c in others.columns if c in frame.columns}
            frame = pd.concat([frame, others.rename(columns=clash)], axis=1)
        return frame

    def duplicates(
        self,
        *,
        threshold: float | None = None,
        criterion: str | None = None,
        neighbours: int | None = None,
        client: Client | None = None,
    ) -> DuplicateReport:
        """Group the index's near-duplicate images, as ``imgindex duplicates``.

        Parameters
        ----------
        threshold, criterion, neighbours
            As the flags of the same names; None takes
            ``imgindex.duplicates.*``.
        client
            Run the neighbour searches and checks on this client's workers
            (they must see the index and the images). Default: the current
            default client if there is one, else here, in this process.

        Returns
        -------
        DuplicateReport
            Its groups of copies (``groups``, the keeper first, edits of a
            region kept too: ``Group.edited``, their copies not:
            ``Group.edit_copies``), its groups
            of other shots of one scene (``shots``, the best first, nothing
            to remove), outliers, flagged and broken images; ``to_json()``
            is ``--json``'s object. In Jupyter it shows each group as a row
            of thumbnails.
        """
        from imgindex.api import default_client
        from imgindex.pipeline.duplicates import DuplicateSettings, find_duplicates

        settings = DuplicateSettings.from_config(threshold, criterion, neighbours)
        client = client or default_client()
        if client is not None:
            from imgindex.cluster.shared import workers_without

            blind = workers_without(client, self.path.parent)
            if blind:
                logger.warning(
                    "searched here: %d worker(s) cannot see %s", len(blind), self.path
                )
                client = None
        return find_duplicates(self.path, settings, client)


def _shard_member(rows, member: int) -> np.ndarray:
    return rows.load()[member]


def _queries(queries: Query | Sequence[Query]) -> Iterator[tuple[str, Query]]:
    """(label, query) for each query; a folder gives each image under it."""
    from imgindex.pipeline.search import query_files

    if _is_one(queries):
        queries = [queries]
    for n, query in enumerate(queries):
        if isinstance(query, str | os.PathLike):
            for path in query_files(query):
                yield str(path), path
        else:
            yield f"<image {n}>", query


def _is_one(queries) -> bool:
    if isinstance(queries, str | os.PathLike | bytes):
        return True
    if type(queries).__module__.startswith("PIL."):
        return True
    ndim = getattr(queries, "ndim", None)
    return ndim is not None and ndim in (2, 3)


def _opened(label: str, query: Query) -> str | io.BytesIO:
    """What Pillow opens for a query: its path, or its bytes."""
    import numpy as np
    from PIL import Image

    if isinstance(query, Path):
        return os.fspath(query)
    if isinstance(query, bytes):
        return io.BytesIO(query)
    if isinstance(query, np.ndarray):
        try:
            query = Image.fromarray(_pixels(query))
        except (TypeError, ValueError) as e:
            raise DecodeError(label, f"not an image's pixels: {e}") from None
    if not isinstance(query, Image.Image):
        raise ImgindexError(
            f"query {label}: a {type(query).__name__} is not an image; give a "
            "path, encoded bytes, a PIL image or an array of pixels"
        )
    # Through PNG, losslessly: the decoder's colour handling, EXIF turn and
    # size limit apply to it as to a file.
    buffer = io.BytesIO()
    query.save(buffer, "PNG")
    buffer.seek(0)
    return buffer


def _pixels(array: np.ndarray) -> np.ndarray:
    import numpy as np

    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"shape {array.shape} (give height x width [x 3 or 4])")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1:
            array = array * 255  # floats in [0, 1], as skimage gives them
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)
