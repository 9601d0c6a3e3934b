"""Dask spans a build can leave and enter again, staying one span.

``distributed.span()`` makes a new span each time it is entered, and holds
its annotation in a context variable, so it cannot stay open across a
generator's ``yield`` (a build of several datasets submits each, then
collects each). A :class:`BuildSpan` is made once and entered around each
piece of submitting; the dashboard's Fine Performance Metrics and Groups
pages then show one span per build, dataset and stage.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any


def task_label(name: str) -> str:
    """``name`` as it may appear in a Dask task key (ASCII, short)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name)[:40] or "dataset"


class BuildSpan:
    """One Dask span, ``tags`` under ``parent``'s, entered with :meth:`entered`."""

    def __init__(self, *tags: str, parent: BuildSpan | None = None):
        import dask
        from distributed import span

        around = parent.entered() if parent else contextlib.nullcontext()
        with around, span(*map(_printable, tags)):
            # Documented: "retrieve the current span with
            # dask.get_annotations().get('span')"; it holds the tags and ids.
            self.annotation: dict[str, Any] = dict(dask.get_annotations()["span"])

    def child(self, *tags: str) -> BuildSpan:
        return BuildSpan(*tags, parent=self)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Tasks submitted from this thread inside the block belong to this span."""
        import dask

        with dask.annotate(span=self.annotation):
            yield


def _printable(tag: str) -> str:
    """``tag`` as UTF-8 can carry it: a folder name that is not UTF-8 holds
    surrogates, which would break the comm that sends the span to the scheduler."""
    return tag.encode("utf-8", "backslashreplace").decode("utf-8")
