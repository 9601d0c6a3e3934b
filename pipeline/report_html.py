"""`imgindex duplicates --html`: the report as one static page and a thumbnail folder.

The page holds the report's data as JSON and draws it with a little inline
script: no server, no network, nothing to install, so it opens offline from
a laptop's disk or a cluster's home directory. Duplicate groups are paged
(a page of groups at a time) and thumbnails load lazily, so a report of
thousands of groups opens at once. Thumbnails are made on the workers, which
read the images; the client writes the files they send back, so the report
can go where the workers cannot write.

imgindex overwrites a report only if it wrote it: the page carries a
generator tag and the folder a marker file; anything else at those paths is
left alone and reported.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from imgindex.pipeline.atomic import atomic_file, shared_dir_mode
from imgindex.pipeline.decode import load_rgb
from imgindex.pipeline.discover import THUMBNAILS_MARKER
from imgindex.pipeline.duplicates import DuplicateReport
from imgindex.pipeline.errors import DecodeError, IndexDirError
from imgindex.pipeline.index_build import Runner, StepCallback
from imgindex.pipeline.sources import Source, as_source, image_file, source_of

GENERATOR = '<meta name="generator" content="imgindex duplicates">'
THUMB_SIDE = 160
THUMBS_PER_TASK = 200
LISTED = 500  # outliers and images per flag shown (the JSON report has all)


@dataclass(frozen=True)
class HtmlReport:
    page: Path
    thumbnails: Path
    groups: int  # groups on the page
    images: int  # thumbnails made


def write_html_report(
    report: DuplicateReport,
    page: str | os.PathLike,
    client=None,
    max_groups: int = 5000,
    on_step: StepCallback | None = None,
) -> HtmlReport:
    """Write ``page`` and its thumbnail folder ``<page stem>_thumbs`` beside it.

    Raises
    ------
    IndexDirError
        If ``page`` or the folder exists and was not written by imgindex, or
        cannot be written.
    """
    page = Path(page).absolute()
    folder = check_report_paths(page)
    groups = report.groups[:max_groups]
    shots = report.shots[:max_groups]
    shown = [m.path for g in [*groups, *shots] for m in g.members]
    shown += [o.path for o in report.outliers[:LISTED]]
    shown += [p for paths in report.flagged.values() for p in paths[:LISTED]]
    paths = list(dict.fromkeys(shown))  # each image once, in page order
    names = {p: _thumb_name(p) for p in paths}

    runner = Runner(client, "report", on_step=on_step, prefix="duplicates")
    futures = [
        runner.submit(
            "thumbnails",
            make_thumbnails,
            source_of(report),
            paths[i : i + THUMBS_PER_TASK],
            THUMB_SIDE,
        )
        for i in range(0, len(paths), THUMBS_PER_TASK)
    ]
    try:
        page.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=page.parent))
    except OSError as e:
        raise IndexDirError(
            f"cannot write the report beside {str(page)!r}: {e}"
        ) from None
    try:
        os.chmod(staging, shared_dir_mode(page.parent))
        (staging / THUMBNAILS_MARKER).write_text(
            "written by imgindex duplicates --html\n"
        )
        made = set()
        thumbs = (t for part in runner.gather(futures) for t in part)
        for path, data in zip(paths, thumbs, strict=True):
            if data is not None:
                (staging / names[path]).write_bytes(data)
                made.add(path)
        data = _page_data(report, groups, shots, folder.name, names, made)
        _swap_in(staging, folder)
        with atomic_file(page, "w") as f:
            f.write(_page(data))
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise IndexDirError(f"cannot write the report {str(page)!r}: {e}") from None
    except BaseException:  # a failed task, Ctrl-C: leave no half-made folder
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return HtmlReport(page, folder, len(groups), len(made))


def make_thumbnails(
    source: Source | str, paths: Sequence[str], side: int
) -> list[bytes | None]:
    """JPEG thumbnails of ``source``'s ``paths`` (None: unreadable now): the
    Dask task. ``source`` may be a folder's absolute path."""
    source = as_source(source)
    out: list[bytes | None] = [None] * len(paths)
    # Read in path order: a tar shard's members then come in one pass over
    # it, not one pass each time the page's order goes back to it.
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    with source.reader(paths) as reader:
        for i in order:
            try:
                image = load_rgb(image_file(source, paths[i], reader), side)
            except DecodeError:
                continue
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
            out[i] = buffer.getvalue()
    return out


def check_report_paths(page: Path) -> Path:
    """The thumbnail folder of ``page``, once both are found to be imgindex's
    to (over)write; else IndexDirError, naming the path."""
    page = Path(page).absolute()
    folder = page.with_name(f"{page.stem}_thumbs")
    if page.exists():
        try:
            ours = GENERATOR in page.read_text(errors="replace")[:4096]
        except OSError:
            ours = False
        if not ours:
            raise IndexDirError(
                f"{str(page)!r} exists and was not written by imgindex; "
                "choose another --html path"
            )
    if folder.exists() and not (folder / THUMBNAILS_MARKER).is_file():
        raise IndexDirError(
            f"{str(folder)!r} exists and was not written by imgindex; choose "
            "another --html path (its thumbnails would go there)"
        )
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace our previous thumbnail folder (if any) by ``staging``."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.rename(folder, old)
    os.rename(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _thumb_name(path: str) -> str:
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=10)
    return digest.hexdigest() + ".jpg"


def _page_data(
    report: DuplicateReport,
    groups: list,
    shots: list,
    folder: str,
    names: dict[str, str],
    made: set[str],
) -> dict[str, Any]:
    def thumb(path: str) -> str | None:
        return f"{quote(folder)}/{names[path]}" if path in made else None

    def drawn(group) -> dict[str, Any]:
        return group.to_json() | {
            "members": [m.to_json() | {"thumb": thumb(m.path)} for m in group.members],
        }

    return report.totals() | {
        "shown_groups": len(groups),
        "duplicate_groups": [drawn(group) for group in groups],
        "shown_shot_groups": len(shots),
        "other_shots": [drawn(group) for group in shots],
        "outliers": [
            o.to_json() | {"thumb": thumb(o.path)} for o in report.outliers[:LISTED]
        ],
        "outlier_count": len(report.outliers),
        "outlier_share": report.statistics.outliers,
        "flagged": {
            name: {
                "meaning": meaning,
                "count": len(report.flagged.get(name, [])),
                "images": [
                    {"path": p, "thumb": thumb(p)}
                    for p in report.flagged.get(name, [])[:LISTED]
                ],
            }
            for name, meaning in report.statistics.describe().items()
        },
        "broken": report.broken_json(),
    }


def _page(data: dict[str, Any]) -> str:
    # "</" cannot end the script element early; U+2028/9 are JSON but not JS.
    payload = (
        json.dumps(data, ensure_ascii=False)
        .replace("</", "<\\/")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    return _TEMPLATE.replace("@GENERATOR@", GENERATOR).replace("@DATA@", payload)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
@GENERATOR@
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgindex duplicates</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 16px 40px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 16px 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.muted { color: #666; }
.totals { font-size: 16px; margin: 8px 0; }
nav a { margin-right: 14px; }
.group { background: #fff; border: 1px solid #ddd; border-radius: 6px;
         margin: 10px 0; padding: 8px 10px; }
.row { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 168px; font-size: 12px; }
figure img, figure .missing { width: 160px; height: 160px; object-fit: contain;
         background: #eee; border: 3px solid transparent; display: block; }
figure.keeper img, figure.keeper .missing { border-color: #2a8a2a; }
figure.edited img, figure.edited .missing { border-color: #c98a1b; }
figure .missing { display: flex; align-items: center; justify-content: center;
         color: #888; }
figcaption { word-break: break-all; }
figcaption .note { word-break: normal; }
.badge { display: inline-block; background: #2a8a2a; color: #fff; border-radius: 3px;
         padding: 0 4px; font-size: 11px; margin-right: 4px; }
figure.edited .badge { background: #c98a1b; }
details { margin-top: 6px; }
table { border-collapse: collapse; font-size: 12px; }
td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; }
.pager { margin: 10px 0; }
.pager button { margin-right: 8px; }
</style>
</head>
<body>
<h1>Duplicates in <span id="index"></span></h1>
<div class="muted" id="source"></div>
<div class="totals" id="totals"></div>
<nav><a href="#groups">Duplicate groups</a><a href="#shots">Other shots</a>
<a href="#outliers">Outliers</a>
<a href="#flagged">Blurry, dark, bright, tiny</a>
<a href="#broken">Not indexed</a></nav>
<h2 id="groups">Duplicate groups</h2>
<div class="muted" id="keeper-rule"></div>
<div class="pager" id="pager-top"></div>
<div id="group-list"></div>
<div class="pager" id="pager-bottom"></div>
<h2 id="shots">Other shots of one scene</h2>
<div class="muted" id="shot-rule"></div>
<div id="shot-list"></div>
<h2 id="outliers">Outliers</h2>
<div class="muted" id="outlier-note"></div>
<div class="row" id="outlier-list"></div>
<h2 id="flagged">Blurry, dark, bright, tiny</h2>
<div id="flag-list"></div>
<h2 id="broken">Not indexed</h2>
<div id="broken-list"></div>
<script type="application/json" id="report-data">@DATA@</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("report-data").textContent);
const PAGE = 25;
const n = (x) => x.toLocaleString("en");
const images = (x) => `${n(x)} image${x === 1 ? "" : "s"}`;
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}
// role: "" or the class that frames it ("keeper", "edited"); badge: its label;
// note: a line of words under the caption (broken between words, not paths').
function figure(path, thumb, caption, role, badge, note) {
  const pic = thumb ? el("img", {src: thumb, loading: "lazy", alt: path})
                    : el("div", {class: "missing"}, "no thumbnail");
  const cap = el("figcaption", {});
  if (role) cap.append(el("span", {class: "badge"}, badge || role));
  cap.append(path);
  if (caption) cap.append(el("br"), el("span", {class: "muted"}, caption));
  if (note) cap.append(el("br"), el("span", {class: "muted note"}, note));
  return el("figure", {class: role, title: path}, pic, cap);
}
function fmt(x, digits) { return x == null ? "" : x.toFixed(digits); }
function exposure(same) {
  return same == null ? "" : same ? "one exposure" : "two exposures";
}
function drawGroup(group, number, shots) {
  const box = el("div", {class: "group"});
  const edited = new Set(group.edited || []);
  box.append(el("div", {}, el("b", {}, `${shots ? "Shots" : "Group"} ${n(number)}`),
    ` \u2014 ${images(group.members.length)}` + (shots ?
    ", other shots of one scene: nothing to remove, pick by hand" :
    `, ${group.removable} could be removed`)));
  const row = el("div", {class: "row"});
  group.members.forEach((m, i) => {
    const size = m.width ? `${m.width}\u00d7${m.height}` : "size unknown";
    const sharp = shots && m.sharpness != null ?
      `, sharpness ${fmt(m.sharpness, 0)}` : "";
    const role = i === 0 ? "keeper" : edited.has(m.path) ? "edited" : "";
    const badge = i === 0 ? (shots ? "best" : "keeper") : "edit, kept";
    // An edit's badge says why it is kept; other notes name what it copies.
    const note = edited.has(m.path) ? "" : (group.notes || {})[m.path] || "";
    row.append(figure(m.path, m.thumb, `${size}, ${n(m.bytes)} bytes${sharp}`,
                      role, badge, note));
  });
  box.append(row);
  const table = el("table", {}, el("tr", {}, el("th", {}, "a"), el("th", {}, "b"),
    el("th", {}, "cosine"), el("th", {}, "hash bits"), el("th", {}, "aligned r"),
    el("th", {}, "shift px"), el("th", {}, "moved patches"),
    el("th", {}, "drifted blocks"), el("th", {}, "differs"),
    el("th", {}, "overlap"), el("th", {}, "EXIF"), el("th", {}, "kind")));
  for (const p of group.pairs) {
    table.append(el("tr", {}, el("td", {}, p.a), el("td", {}, p.b),
      el("td", {}, fmt(p.cosine, 3)),
      el("td", {}, p.hash_distance === null ? "" : String(p.hash_distance)),
      el("td", {}, fmt(p.correlation, 3)), el("td", {}, fmt(p.shift, 2)),
      el("td", {}, p.moved == null ? "" : String(p.moved)),
      el("td", {}, p.drifted == null ? "" : String(p.drifted)),
      el("td", {}, p.differs ? `${Math.round(p.differs * 100)} %` : ""),
      el("td", {}, fmt(p.overlap, 2)), el("td", {}, exposure(p.same_exposure)),
      el("td", {}, p.kind)));
  }
  const count = group.pairs.length;
  const summary = el("summary", {}, `${count} pair${count === 1 ? "" : "s"}`);
  box.append(el("details", {}, summary, table));
  return box;
}
let page = 0;
function drawPage() {
  const groups = data.duplicate_groups;
  const pages = Math.max(1, Math.ceil(groups.length / PAGE));
  page = Math.min(Math.max(page, 0), pages - 1);
  const list = document.getElementById("group-list");
  list.replaceChildren();
  groups.slice(page * PAGE, (page + 1) * PAGE)
        .forEach((g, i) => list.append(drawGroup(g, page * PAGE + i + 1)));
  if (!groups.length) list.append(el("p", {}, "No duplicates found."));
  for (const id of ["pager-top", "pager-bottom"]) {
    const pager = document.getElementById(id);
    const prev = el("button", {type: "button"}, "\u2190 previous");
    const next = el("button", {type: "button"}, "next \u2192");
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
    prev.onclick = () => { page -= 1; drawPage(); };
    next.onclick = () => { page += 1; drawPage(); };
    pager.replaceChildren(prev, next, el("span", {class: "page-label"},
      `page ${page + 1} of ${pages}`));
  }
}
document.getElementById("index").textContent = data.index;
document.getElementById("source").textContent =
  `images in ${data.source}; criterion ${data.criterion}, threshold ${data.threshold}`;
document.getElementById("totals").textContent =
  `${n(data.images_in_groups)} of ${n(data.images)} images in ${n(data.groups)} ` +
  `groups; ${n(data.removable)} could be removed`;
document.getElementById("keeper-rule").textContent =
  `Keeper (green): ${data.keeper_rule}.` + (data.shown_groups < data.groups ?
  ` The first ${n(data.shown_groups)} groups are shown; --json lists all.` : "");
drawPage();
document.getElementById("shot-rule").textContent =
  `${n(data.shot_groups)} groups of photos of one scene that are not copies of ` +
  `each other (another exposure, a moved camera or subject). Best (green): ` +
  `${data.best_shot_rule}.` + (data.shown_shot_groups < data.shot_groups ?
  ` The first ${n(data.shown_shot_groups)} are shown; --json lists all.` : "");
const shotList = document.getElementById("shot-list");
data.other_shots.forEach((g, i) => shotList.append(drawGroup(g, i + 1, true)));
if (!data.other_shots.length) shotList.append(el("p", {}, "None found."));
document.getElementById("outlier-note").textContent =
  `${images(data.outlier_count)}: the ${(data.outlier_share * 100).toFixed(1)} % ` +
  `farthest from their nearest neighbour, the loneliest first, with the cosine to it.`;
const outliers = document.getElementById("outlier-list");
for (const o of data.outliers)
  outliers.append(figure(o.path, o.thumb, `nearest ${o.nearest_cosine.toFixed(3)}`));
const flags = document.getElementById("flag-list");
for (const [name, flag] of Object.entries(data.flagged)) {
  flags.append(el("h3", {}, `${name}: ${images(flag.count)}`),
               el("div", {class: "muted"}, flag.meaning));
  const row = el("div", {class: "row"});
  for (const image of flag.images) row.append(figure(image.path, image.thumb, ""));
  flags.append(row);
}
const broken = document.getElementById("broken-list");
if (data.broken.length) {
  const head = el("tr", {}, el("th", {}, "file"), el("th", {}, "reason"));
  const table = el("table", {}, head);
  for (const b of data.broken)
    table.append(el("tr", {}, el("td", {}, b.path), el("td", {}, b.reason)));
  const count = `${n(data.broken.length)} files could not be indexed:`;
  broken.append(el("p", {}, count), table);
} else {
  broken.append(el("p", {}, "None: every file was indexed."));
}
</script>
</body>
</html>
"""
