"""Results as HTML with their thumbnails inline, for Jupyter's ``_repr_html_``.

A notebook shows the HTML a result returns; the thumbnails travel inside it
as ``data:`` URIs (about 3 KB each at 96 px), so nothing needs a server or
a folder of files, and a saved notebook keeps them. Only the first rows are
drawn: a cell of 10,000 thumbnails would freeze the browser.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imgindex.pipeline.sources import Source
from imgindex.pipeline.words import counted

if TYPE_CHECKING:
    from imgindex.pipeline.duplicates import DuplicateReport, Group, ShotGroup

THUMB_SIDE = 96  # pixels, the longer side
SHOWN_ROWS = 20  # queries or groups drawn; the rest are counted

# Inline styles, not a <style> block: Jupyter strips those from the outputs
# of a notebook it does not trust (one opened from elsewhere).
_ROW = "display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:4px 0 10px"
_TILE = (
    f"width:{THUMB_SIDE}px;font:11px/1.3 sans-serif;text-align:center;"
    "overflow-wrap:anywhere"
)
_QUERY = "border-right:2px solid #888;padding-right:6px"
_PICTURE = (
    f"width:{THUMB_SIDE}px;height:{THUMB_SIDE}px;object-fit:contain;"
    "background:#eee;display:block"
)
_HEAD = "font:bold 12px sans-serif;margin-top:6px"


def data_uri(jpeg: bytes | None) -> str | None:
    if jpeg is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def thumbnails(source: Source, paths: Sequence[str]) -> dict[str, str | None]:
    """``source``'s images ``paths`` as data URIs (None: unreadable now)."""
    from imgindex.pipeline.report_html import make_thumbnails

    unique = list(dict.fromkeys(paths))
    made = make_thumbnails(source, unique, THUMB_SIDE)
    return {p: data_uri(jpeg) for p, jpeg in zip(unique, made, strict=True)}


def image_uri(image: Any) -> str | None:
    """A PIL image's thumbnail as a data URI."""
    image = image.convert("RGB")
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return data_uri(buffer.getvalue())


def tile(uri: str | None, lines: Sequence[str], title: str, query: bool = False) -> str:
    """One thumbnail and its caption lines (escaped here)."""
    picture = (
        f'<img src="{uri}" alt="" style="{_PICTURE}">'
        if uri
        else f'<div style="{_PICTURE}">unreadable</div>'
    )
    caption = "<br>".join(html.escape(line) for line in lines)
    style = f"{_TILE};{_QUERY}" if query else _TILE
    return (
        f'<div class="imgindex-tile" style="{style}" '
        f'title="{html.escape(title, quote=True)}">{picture}{caption}</div>'
    )


def rows_html(heads: Sequence[str], rows: Sequence[Sequence[str]], more: str) -> str:
    """Rows of tiles, each under its heading (escaped here), then ``more``'s
    lines."""
    body = "".join(
        f'<div style="{_HEAD}">{html.escape(head)}</div>'
        f'<div class="imgindex-row" style="{_ROW}">{"".join(tiles)}</div>'
        for head, tiles in zip(heads, rows, strict=True)
    )
    tail = "".join(f"<div>{html.escape(line)}</div>" for line in more.splitlines())
    return f'<div class="imgindex">{body}{tail}</div>'


def short_name(path: str) -> str:
    """The file name a caption shows: the path's last part."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def group_tiles(group: Group | ShotGroup, thumbs: dict[str, str | None]) -> list[str]:
    """A group: its keeper (copies) or best shot (other shots) first, each
    member with its size and the pair that joined it to another (kind,
    cosine)."""
    first = "best: " if group.ROLE == "best" else "keep: "
    joined: dict[str, str] = {}
    for p in group.pairs:
        how = p.kind if p.cosine is None else f"{p.kind} {p.cosine:.3f}"
        joined.setdefault(p.b, how)
        joined.setdefault(p.a, how)
    tiles = []
    for i, m in enumerate(group.members):
        size = f"{m.width}x{m.height}" if m.width else "size unknown"
        lines = [(first if i == 0 else "") + short_name(m.path), size]
        note = group.note(m.path, short_name)
        if note:
            lines.append(note)
        elif m.path in joined:
            lines.append(joined[m.path])
        tiles.append(tile(thumbs.get(m.path), lines, m.path, query=i == 0))
    return tiles


def group_html(group: Group | ShotGroup, source: Source) -> str:
    thumbs = thumbnails(source, [m.path for m in group.members])
    first = short_name(group.members[0].path)
    head = f"{len(group.members)} images, {group.ROLE} {first}"
    return rows_html([head], [group_tiles(group, thumbs)], "")


def report_html(report: DuplicateReport, source: Source) -> str:
    """The report's counts, then its first groups of copies and of other
    shots as rows of thumbnails."""
    shown = report.groups[:SHOWN_ROWS]
    shots = report.shots[:SHOWN_ROWS]
    thumbs = thumbnails(source, [m.path for g in [*shown, *shots] for m in g.members])
    heads = [
        f"copies {n}: {len(g.members)} images" for n, g in enumerate(shown, start=1)
    ] + [
        f"other shots {n}: {len(g.members)} images"
        for n, g in enumerate(shots, start=1)
    ]
    rows = [group_tiles(g, thumbs) for g in [*shown, *shots]]
    hidden = len(report.groups) - len(shown) + len(report.shots) - len(shots)
    more = (
        f"... and {hidden:,} more groups (report.groups, report.shots)"
        if hidden > 0
        else ""
    )
    summary = (
        f"<p><b>{html.escape(report.index)}</b>: {report.images_in_groups:,} of "
        f"{report.count:,} images in {counted(len(report.groups), 'group')} of "
        f"copies; {report.removable:,} could be removed; "
        f"{counted(len(report.shots), 'group')} of other shots of one scene; "
        f"{counted(len(report.outliers), 'outlier')}, "
        f"{len(report.broken):,} not indexed</p>"
    )
    return summary + rows_html(heads, rows, more)
