"""Search results: a pandas DataFrame that shows its thumbnails in Jupyter."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from imgindex.pipeline.sources import Source

COLUMNS = ["query", "rank", "path", "score", "id"]


@dataclass(frozen=True)
class SearchShown:
    """What drawing the results' thumbnails needs: where the hits are read
    from (their paths within the source, by id) and the queries themselves."""

    source: Source
    relpaths: dict[int, str]
    queries: dict[str, Any]  # label -> the query as given (a path, pixels ...)
    unreadable: dict[str, str]  # label -> why it was not searched


class SearchResults(pd.DataFrame):
    """One row per hit: ``query``, ``rank``, ``path``, ``score``, ``id`` (and
    ``kind``, ``meta`` where asked or given).

    A DataFrame in every way (filter, sort, ``to_csv``); in Jupyter each
    query and its hits show as a row of thumbnails with their scores. A
    slice of it shows its own rows.
    """

    _metadata = ["_shown"]

    @property
    def _constructor(self):
        return SearchResults

    @property
    def unreadable(self) -> dict[str, str]:
        """The queries skipped as unreadable (``search(unreadable="skip")``),
        each with why."""
        shown = getattr(self, "_shown", None)
        return dict(shown.unreadable) if shown is not None else {}

    @classmethod
    def of(
        cls, rows: list[dict[str, Any]], shown: SearchShown, more: Sequence[str] = ()
    ) -> SearchResults:
        """``rows`` of COLUMNS, ``more`` columns and any ``meta``."""
        meta = ["meta"] if rows and "meta" in rows[0] else []
        frame = cls(rows, columns=[*COLUMNS, *more, *meta])
        frame = frame.astype({"rank": "int64", "score": "float32", "id": "int64"})
        frame._shown = shown
        return frame

    def _repr_html_(self) -> str | None:
        shown = getattr(self, "_shown", None)
        if shown is None or not set(COLUMNS) <= set(self.columns):
            return super()._repr_html_()
        from imgindex.pipeline import notebook_html as nb

        queries = list(dict.fromkeys(self["query"]))
        drawn = queries[: nb.SHOWN_ROWS]
        hits = self[self["query"].isin(drawn)]
        thumbs = nb.thumbnails(
            shown.source, [shown.relpaths[int(i)] for i in hits["id"]]
        )
        rows = []
        for label in drawn:
            tiles = [
                nb.tile(_query_uri(shown.queries.get(label)), ["query"], label, True)
            ]
            for hit in hits[hits["query"] == label].itertuples():
                # A copy of the query, another shot of its scene ... (copies=True)
                kind = f" {hit.kind}" if "kind" in self.columns else ""
                tiles.append(
                    nb.tile(
                        thumbs.get(shown.relpaths[int(hit.id)]),
                        [f"{hit.rank}. {hit.score:.3f}{kind}", nb.short_name(hit.path)],
                        hit.path,
                    )
                )
            rows.append(tiles)
        hidden = len(queries) - len(drawn)
        more = [f"... and {hidden:,} more queries"] if hidden > 0 else []
        more += [f"not searched: {q}: {why}" for q, why in shown.unreadable.items()]
        return nb.rows_html(drawn, rows, "\n".join(more))


def _query_uri(query: Any) -> str | None:
    """A query's thumbnail, from the file or pixels it was given as."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from imgindex.pipeline import notebook_html as nb

    try:
        if isinstance(query, str | os.PathLike):
            with Image.open(Path(query)) as image:
                image.draft("RGB", (nb.THUMB_SIDE * 2, nb.THUMB_SIDE * 2))
                return nb.image_uri(image)
        if isinstance(query, bytes):
            with Image.open(io.BytesIO(query)) as image:
                return nb.image_uri(image)
        if isinstance(query, np.ndarray):
            from imgindex.index import _pixels

            return nb.image_uri(Image.fromarray(_pixels(query)))
        if isinstance(query, Image.Image):
            return nb.image_uri(query)
    except (OSError, ValueError, UnidentifiedImageError):
        return None
    return None
