"""How a build shows its progress: bars on a terminal, a live table in a
notebook, and a JSON progress file (``--progress-file``).

Click only: the command line imports this module when it starts.
"""

from __future__ import annotations

import html
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from imgindex.building import BuildFeedback

if TYPE_CHECKING:
    from imgindex.pipeline.progress import ProgressFile

logger = logging.getLogger(__name__)


def shown(text: str) -> str:
    """Text safe on any terminal: undecodable bytes as \\xNN, and control
    characters (escape sequences, newlines) as escapes, so a file name can
    neither clear the screen nor print a fake result line."""
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


class TerminalFeedback(BuildFeedback):
    """A build's lines and bars on stderr, and its progress file if asked for."""

    def __init__(self, tracker: ProgressFile | None = None):
        self.tracker = tracker

    def say(self, line: str) -> None:
        click.echo(shown(line), err=True)

    def observer(self, name: str) -> ProgressBars:
        return ProgressBars(name, self.tracker)

    def cluster(self, cluster: dict[str, Any]) -> None:
        if self.tracker:
            self.tracker.set_cluster(cluster)

    def finish(self, error: str | None = None, state: str | None = None) -> None:
        if self.tracker:
            self.tracker.finish(error=error, state=state)


class ProgressBars:
    """Bars on stderr (embedding, then each index stage) and the progress file."""

    def __init__(self, label: str, tracker: ProgressFile | None = None):
        from imgindex.pipeline.progress import DatasetProgress, Throughput

        self.label = label
        self.tracker = DatasetProgress(tracker, label) if tracker else None
        self.bar = None
        self.shown = 0
        self.stage: str | None = None
        self.rate = Throughput()

    def update(self, done: int, total: int, failed: int) -> None:
        if self.bar is None:
            self._open(self.label, total, own_eta=True)
        self.bar.length = max(total, 1)  # tar shards: an estimate that improves
        self.rate.add(done)
        self.bar.update(done - self.shown, self._rate_words(total))
        self.shown = done
        if self.tracker:
            self.tracker.update(done, total, failed)

    def _rate_words(self, total: int) -> str:
        """Click's ETA is the time per image since the start: skewed for good
        by files kept as they were (read, not embedded)."""
        from imgindex.pipeline.progress import duration

        per_second = self.rate.per_second()
        if per_second is None:
            return ""
        return (
            f"{per_second:.1f} images/s, ETA {duration(self.rate.eta_seconds(total))}"
        )

    def index_step(self, stage: str, done: int, total: int) -> None:
        """One bar per index stage: training can take minutes after the last image."""
        from imgindex.pipeline.index_build import STEP_NAMES

        if stage != self.stage:
            self._close_bar()
            self.stage = stage
            self._open(f"{self.label}: {STEP_NAMES.get(stage, stage)}", total)
        self.bar.length = max(total, 1)
        self.bar.update(done - self.shown)
        self.shown = done
        if self.tracker:
            self.tracker.index_step(stage, done, total)

    def close(self, error: str | None = None) -> None:
        self._close_bar()
        if self.tracker:
            self.tracker.close(error)

    def _open(self, label: str, total: int, own_eta: bool = False) -> None:
        self.bar = click.progressbar(
            length=max(total, 1),
            label=label,
            file=sys.stderr,
            show_pos=True,
            show_eta=not own_eta,
            item_show_func=(lambda words: words) if own_eta else None,
        )
        self.bar.__enter__()
        self.shown = 0

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where HTML output shows)."""
    shell = sys.modules.get("IPython") and _ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


class NotebookFeedback(BuildFeedback):
    """A build in a notebook cell: the cluster's line (with its dashboard as
    a link) and a live bar per dataset, updated in place."""

    def __init__(self):
        from IPython.display import HTML, display

        self._html = HTML
        self.lines: list[str] = []
        self.handle = display(HTML(""), display_id=True)

    def say(self, line: str) -> None:
        logger.info("%s", line)
        if line.startswith("dashboard: "):
            url = html.escape(line.removeprefix("dashboard: "), quote=True)
            self.lines.append(f'dashboard: <a href="{url}" target="_blank">{url}</a>')
        else:
            self.lines.append(html.escape(line))
        self.handle.update(self._html("<br>".join(self.lines)))

    def observer(self, name: str) -> NotebookBar:
        return NotebookBar(name)


class NotebookBar:
    """One dataset's progress as an HTML ``<progress>`` bar, redrawn at most
    five times a second (each redraw is a message to the browser)."""

    EVERY = 0.2  # seconds between redraws

    def __init__(self, label: str):
        from IPython.display import HTML, display

        self._html = HTML
        self.label = label
        self.stage = "embedding"
        self.drawn = 0.0
        self.embedded = ""  # "18 images, 1 failed" once the embedding is done
        self.handle = display(HTML(self._row(0, 0, "")), display_id=True)

    def update(self, done: int, total: int, failed: int) -> None:
        more = f", {failed} failed" if failed else ""
        self.embedded = f" ({done:,} images{more})"
        self._draw(done, total, more)

    def index_step(self, stage: str, done: int, total: int) -> None:
        from imgindex.pipeline.index_build import STEP_NAMES

        self.stage = STEP_NAMES.get(stage, stage)
        self._draw(done, total, "", force=done == 0 or done >= total)

    def close(self, error: str | None = None) -> None:
        if error:
            self.handle.update(
                self._html(
                    f"<b>{html.escape(self.label)}</b>: failed: {html.escape(error)}"
                )
            )
        else:
            done = f"<b>{html.escape(self.label)}</b>: done{html.escape(self.embedded)}"
            self.handle.update(self._html(done))

    def _draw(self, done: int, total: int, more: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.drawn < self.EVERY and done < total:
            return
        self.drawn = now
        self.handle.update(self._html(self._row(done, total, more)))

    def _row(self, done: int, total: int, more: str) -> str:
        return (
            f"<b>{html.escape(self.label)}</b> {html.escape(self.stage)} "
            f'<progress value="{done}" max="{max(total, 1)}" '
            'style="width: 40%; vertical-align: middle"></progress> '
            f"{done:,} / {total:,}{html.escape(more)}"
        )
