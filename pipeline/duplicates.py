"""Groups of near-duplicate images in an index, found on the cluster from its shards.

Candidate pairs come from three places, none of which compares all n x n:

1. ``neighbours`` tasks, on the workers: each searches the index for the
   nearest ``neighbours`` of a range of shard rows and keeps the pairs whose
   cosine reaches ``threshold`` (the index is read once per worker);
2. equal flip- and turn-invariant perceptual hashes (pipeline/traits.py),
   which find rotated copies whose embeddings are far apart;
3. equal content samples (size, head and tail), confirmed by ``hash`` tasks
   that read the whole files: byte copies are always grouped.

A cosine alone cannot tell a copy from another photo of the same scene (a
re-encoded, flipped or cropped copy scores as high as a sibling, or lower),
so with the ``copy`` criterion every candidate pair is checked by ``verify``
tasks on the workers (pipeline/geometry.py): a pair is a copy when one image,
or its mirror image, lies inside the other under a similarity transform and
their aligned pixels agree, in place (no parallax, no moved subject); a pair
that is no copy is another shot of the scene when the two cover each other
under a similarity. Groups of copies are the connected components of the
copy pairs, each image of which is then checked against its group's keeper
(one pair wrongly called a copy must not join two photos' groups); groups
of other shots join the rest, an image with copies standing in them for its
keeper.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import numpy as np

from imgindex.pipeline import geometry
from imgindex.pipeline import index as fx
from imgindex.pipeline.config import config_number, config_value
from imgindex.pipeline.copies import Copies, folder_copies
from imgindex.pipeline.discover import Failure, ImageRecord
from imgindex.pipeline.errors import ConfigError, DecodeError, IndexDirError
from imgindex.pipeline.exposure import Capture, capture_of, same_exposure
from imgindex.pipeline.index_build import Runner, ShardRows, StepCallback, group_shards
from imgindex.pipeline.lookup import rows_in_sorted
from imgindex.pipeline.pair_order import local_order
from imgindex.pipeline.reindex import stored_selection
from imgindex.pipeline.sources import (
    Reader,
    Source,
    as_source,
    content_digest,
    image_file,
    moved_hint,
    source_of,
)
from imgindex.pipeline.statistics import StatisticsSettings, flag_rows, outlier_rows
from imgindex.pipeline.store import INDEX_FILE, iter_manifest, read_index_dir
from imgindex.pipeline.traits import TRAITS, canonical_hash, hash_distance

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

CRITERIA = ("copy", "cosine")
# Images this flat have no structure for a perceptual hash to describe (all
# blank pages hash alike): they are grouped only by content or embedding.
MIN_HASH_CONTRAST = 4.0
# Pairs the geometric check cannot decide (an image unreadable now, or too
# plain to have features) are copies only when their embeddings agree this
# well (re-encoded copies of the test set score 0.67-0.99: most are missed).
UNDECIDED_COSINE = 0.97


@dataclass(frozen=True)
class DuplicateSettings:
    """How pairs are found and kept (dask config ``imgindex.duplicates.*``)."""

    threshold: float = 0.5
    neighbours: int = 16
    criterion: str = "copy"
    rows_per_task: int = 20_000
    pairs_per_task: int = 4000

    @classmethod
    def from_config(
        cls,
        threshold: float | None = None,
        criterion: str | None = None,
        neighbours: int | None = None,
    ) -> DuplicateSettings:
        """Settings from flags, falling back to config; bad values raise ConfigError."""

        settings = cls(
            threshold=config_number(threshold, "imgindex.duplicates.threshold"),
            neighbours=config_number(neighbours, "imgindex.duplicates.neighbours", int),
            criterion=str(config_value(criterion, "imgindex.duplicates.criterion")),
            rows_per_task=config_number(None, "imgindex.duplicates.rows-per-task", int),
            pairs_per_task=config_number(
                None, "imgindex.duplicates.pairs-per-task", int
            ),
        )
        if not -1.0 <= settings.threshold <= 1.0:
            raise ConfigError(
                f"duplicates threshold {settings.threshold} is not a cosine "
                "between -1 and 1 (--threshold / imgindex.duplicates.threshold)"
            )
        if settings.criterion not in CRITERIA:
            raise ConfigError(
                f"duplicates criterion {settings.criterion!r} is not one of "
                f"{', '.join(CRITERIA)} (--criterion / imgindex.duplicates.criterion)"
            )
        counts = (settings.neighbours, settings.rows_per_task, settings.pairs_per_task)
        if min(counts) < 1:
            raise ConfigError(
                "imgindex.duplicates.neighbours, rows-per-task and pairs-per-task "
                "must be >= 1"
            )
        return settings


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    # None: not among each other's nearest neighbours (found by hash, or
    # checked against its group's keeper)
    cosine: float | None
    hash_distance: int | None  # bits; None where an image has no traits
    correlation: float | None  # of the aligned pixels; None: not checked
    # "identical" (same bytes), "copy", "shot" (another shot of the scene),
    # or "similar" (cosine only)
    kind: str
    # pixels left between the aligned images (pipeline.geometry.residual_shift)
    shift: float | None = None
    # the smaller share of either image the other covers once aligned (a crop
    # covers little of its original; two shots of one scene much of each
    # other); None: not checked
    overlap: float | None = None
    # by EXIF capture time and camera: True one exposure, False two, None
    # where a file has no record (pipeline/exposure.py)
    same_exposure: bool | None = None
    # patches of one image found displaced in the other (a moved subject,
    # parallax: pipeline.geometry.moved_patches); None: not measured
    moved: int | None = None
    # blocks of the largest region of one image found drifted as one in the
    # other (objects moved by a pixel: pipeline.geometry.drifted_region);
    # None: not measured
    drifted: int | None = None
    # the share of the aligned area in a region where the two differ (a
    # sticker, lettering, a retouched spot: one is an edit of the other;
    # left out of the correlation where it took it under 0.8); None: not
    # checked
    differs: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "cosine": _rounded(self.cosine),
            "hash_distance": self.hash_distance,
            "correlation": _rounded(self.correlation),
            "shift": _rounded(self.shift),
            "overlap": _rounded(self.overlap),
            "same_exposure": self.same_exposure,
            "moved": self.moved,
            "drifted": self.drifted,
            "differs": _rounded(self.differs),
            "kind": self.kind,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class Edge(NamedTuple):
    """A candidate pair of image ids (a < b) and what is known of it."""

    a: int
    b: int
    cosine: float | None
    hash_distance: int | None
    correlation: float | None = None
    shift: float | None = None
    overlap: float | None = None
    exposure: bool | None = None  # one exposure by EXIF (None: not known)
    moved: int | None = None
    drifted: int | None = None
    differs: float | None = None

    def pair(self, a: str, b: str, kind: str) -> Pair:
        """The pair of paths ``a`` and ``b`` with this edge's evidence."""
        return Pair(
            a,
            b,
            self.cosine,
            self.hash_distance,
            self.correlation,
            kind,
            self.shift,
            self.overlap,
            self.exposure,
            self.moved,
            self.drifted,
            self.differs,
        )


@dataclass(frozen=True)
class Member:
    path: str
    width: int | None
    height: int | None
    size: int
    mtime_ns: int
    # The build's measures of the image (pipeline/traits.py); None: not kept.
    sharpness: float | None = None
    brightness: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "bytes": self.size,
            "mtime_ns": self.mtime_ns,
            "sharpness": _rounded(self.sharpness),
            "brightness": _rounded(self.brightness),
        }


KEEPER_RULE = (
    "largest resolution, then oldest file, then shortest path, of the copies "
    "that are no edit (the fewest that account for every pair differing in a "
    "region); copies that differ from the keeper in a region (an edit, or it "
    "is one) are kept too, the first of each edit's copies by the same rule"
)


@dataclass
class _Photos:
    """Images grouped by their pairs, the one to keep first."""

    ROLE = ""  # what the first member is: "keeper" or "best"

    members: list[Member]
    pairs: list[Pair]
    # Where the members are read from, for the thumbnails of _repr_html_.
    source: Source | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            self.ROLE: self.members[0].path,
            "members": [m.to_json() for m in self.members],
            "pairs": [p.to_json() for p in self.pairs],
        }

    def note(self, path: str, name: Callable[[str], str] = str) -> str:
        """What a member's label says beside its size, as the report, its
        page, ``serve`` and the notebook show it ("" for none); ``name``
        shortens the paths it names."""
        return ""

    def _repr_html_(self) -> str | None:
        """A row of thumbnails in Jupyter, the first member first."""
        if self.source is None:
            return None
        from imgindex.pipeline.notebook_html import group_html

        return group_html(self, self.source)


@dataclass
class Group(_Photos):
    """Copies of one photo: one to keep, the rest could be removed but for
    the ``edited`` ones."""

    ROLE = "keeper"

    # Members that differ from the keeper in a region (a sticker, lettering,
    # a retouched spot): one of the two is an edit (the keeper is none where
    # the group's pairs tell, _keeper), so both are kept.
    edited: list[str] = field(default_factory=list)
    # Members that differ from the keeper as an edited one does, but are a
    # copy of it (no region differs): each could go, its edit being kept.
    edit_copies: dict[str, str] = field(default_factory=dict)

    @property
    def keeper(self) -> Member:
        return self.members[0]

    @property
    def removable(self) -> int:
        return len(self.members) - 1 - len(self.edited)

    def to_json(self) -> dict[str, Any]:
        notes = {m.path: self.note(m.path) for m in self.members}
        return super().to_json() | {
            "edited": self.edited,
            "edit_copies": self.edit_copies,
            "removable": self.removable,
            "notes": {path: note for path, note in notes.items() if note},
        }

    def note(self, path: str, name: Callable[[str], str] = str) -> str:
        if path in self.edited:
            return "differs from the keeper in a region: kept"
        if path in self.edit_copies:
            return f"a copy of {name(self.edit_copies[path])}, which is kept"
        return ""


BEST_SHOT_RULE = (
    "sharpest, then best exposed (mean grey nearest mid-grey), then largest"
)


@dataclass
class ShotGroup(_Photos):
    """Other shots of one scene (each a photo of its own, or the keeper of its
    copies): none is a copy to remove; the best is suggested to keep."""

    ROLE = "best"

    @property
    def best(self) -> Member:
        return self.members[0]


@dataclass(frozen=True)
class Outlier:
    path: str
    nearest: float  # cosine to its nearest neighbour

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "nearest_cosine": round(self.nearest, 6)}


@dataclass
class DuplicateReport:
    """Copies grouped (``groups``), other shots of one scene grouped apart
    (``shots``), and what else the collection holds: outliers, flagged and
    broken images."""

    index: str
    source: str
    count: int  # images in the index
    settings: DuplicateSettings
    groups: list[Group]
    candidates: int  # pairs considered
    verified: int  # pairs given the geometric check
    undecided: int  # of those, pairs it could not decide (see UNDECIDED_COSINE)
    without_traits: int  # images whose shards predate traits (cosine only)
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)
    flagged: dict[str, list[str]] = field(default_factory=dict)  # flag -> paths
    outliers: list[Outlier] = field(default_factory=list)  # the loneliest first
    broken: list[Failure] = field(default_factory=list)  # not indexed, and why
    # What ``source`` is and what paths are relative to (pipeline/sources.py).
    source_kind: str = "folder"
    source_base: str = ""
    # Other shots of one scene: not copies, nothing to remove.
    shots: list[ShotGroup] = field(default_factory=list)

    @property
    def images_in_groups(self) -> int:
        return sum(len(g.members) for g in self.groups)

    @property
    def removable(self) -> int:
        return sum(g.removable for g in self.groups)

    def totals(self) -> dict[str, Any]:
        """The counts, settings and times, without the lists."""
        s = self.settings
        return {
            "index": self.index,
            "source": self.source,
            "images": self.count,
            "groups": len(self.groups),
            "images_in_groups": self.images_in_groups,
            "removable": self.removable,
            "keeper_rule": KEEPER_RULE,
            "shot_groups": len(self.shots),
            "images_in_shot_groups": sum(len(g.members) for g in self.shots),
            "best_shot_rule": BEST_SHOT_RULE,
            "criterion": s.criterion,
            "threshold": s.threshold,
            "neighbours": s.neighbours,
            "candidates": self.candidates,
            "verified": self.verified,
            "undecided": self.undecided,
            "without_traits": self.without_traits,
            "seconds": self.seconds,
            "stage_seconds": self.stage_seconds,
        }

    def _repr_html_(self) -> str:
        """The counts and the first groups as rows of thumbnails, in Jupyter."""
        from imgindex.pipeline.notebook_html import report_html

        return report_html(self, source_of(self))

    def broken_json(self) -> list[dict[str, Any]]:
        return [
            {"path": f.path, "reason": f.reason, "transient": f.transient}
            for f in self.broken
        ]

    def to_json(self) -> dict[str, Any]:
        """:meth:`totals` and every group, outlier, flagged and broken image."""
        return self.totals() | {
            "duplicate_groups": [g.to_json() for g in self.groups],
            "other_shots": [g.to_json() for g in self.shots],
            "outliers": [o.to_json() for o in self.outliers],
            "outlier_share": self.statistics.outliers,
            "flagged": {
                name: {"meaning": meaning, "images": self.flagged.get(name, [])}
                for name, meaning in self.statistics.describe().items()
            },
            "broken": self.broken_json(),
        }


def find_duplicates(
    index_dir: str | os.PathLike,
    settings: DuplicateSettings | None = None,
    client: Client | None = None,
    on_step: StepCallback | None = None,
    statistics: StatisticsSettings | None = None,
) -> DuplicateReport:
    """Group the near-duplicate images of ``index_dir`` (see the module docstring),
    and list its outliers, its flagged images (pipeline.statistics) and the
    files its build could not index.

    With a ``client`` the neighbour searches and file hashes run on its
    workers, which must see ``index_dir`` and the images; without, here.
    The client holds, per image, its id and traits (about 110 bytes with the
    manifest's ids, streamed once), plus the candidate pairs; never the vectors.

    Raises
    ------
    IndexDirError
        If ``index_dir`` is not a readable index with its shards, or changed
        while this ran.
    """
    started = time.perf_counter()
    settings = settings or DuplicateSettings.from_config()
    statistics = statistics or StatisticsSettings.from_config()
    dest = Path(index_dir).resolve()
    stored = read_index_dir(dest, manifest=False)
    meta = stored.meta
    hint = moved_hint(meta, dest)
    if hint:
        logger.warning(
            "%s: %s; until then no image can be read: pairs are judged by their "
            "embeddings alone, and no thumbnails are made",
            meta.name,
            hint,
        )
    selection, _ = stored_selection(dest, meta.count)
    stamp = _index_stamp(dest)
    runner = Runner(client, meta.name, on_step=on_step, prefix="duplicates")
    futures = [
        runner.submit(
            "neighbours",
            neighbour_pairs,
            str(dest),
            stamp,
            meta.on_disk,
            dict(meta.search_params),
            rows,
            settings.neighbours,
            settings.threshold,
        )
        for rows in group_shards(selection, runner.threads, settings.rows_per_task)
    ]
    found = runner.gather(futures) or [NeighbourPairs.empty()]
    t_neighbours = time.perf_counter() - started

    ids = np.concatenate([f.ids for f in found])
    traits = np.concatenate([f.traits for f in found])
    has_traits = np.concatenate([f.has_traits for f in found])
    nearest = np.concatenate([f.nearest for f in found])
    order = np.argsort(ids)
    ids, traits, has_traits = ids[order], traits[order], has_traits[order]
    nearest = nearest[order]
    a, b, cos = _unique_pairs(
        np.concatenate([f.a for f in found]),
        np.concatenate([f.b for f in found]),
        np.concatenate([f.score for f in found]),
    )
    del found
    ia, ib = rows_in_sorted(ids, a), rows_in_sorted(ids, b)
    known = (ia >= 0) & (ib >= 0)  # else a vector the manifest does not list
    a, b, cos, ia, ib = a[known], b[known], cos[known], ia[known], ib[known]
    dist = np.full(len(a), -1, np.int32)
    hashable = has_traits & (traits["contrast"] >= MIN_HASH_CONTRAST)
    both = hashable[ia] & hashable[ib]
    dist[both] = hash_distance(traits[ia[both]], traits[ib[both]])
    edges = [
        Edge(int(x), int(y), float(c), int(d) if d >= 0 else None)
        for x, y, c, d in zip(a, b, cos, dist, strict=True)
    ]
    edges = _best_edges(edges + _hash_edges(ids, traits, hashable, settings))
    runs = _content_runs(ids, traits, has_traits)
    flags = flag_rows(traits, has_traits, statistics)
    lonely = outlier_rows(nearest, statistics.outliers)
    wanted = {x for edge in edges for x in edge[:2]} | {x for run in runs for x in run}
    wanted |= {int(x) for rows in flags.values() for x in ids[rows]}
    wanted |= {int(x) for x in ids[lonely]}
    records = _listed_records(dest, ids, wanted)
    t_hash = time.perf_counter()
    source = source_of(meta)
    identical = _identical_edges(runner, source, runs, records)
    stage_seconds = {
        "neighbours": round(t_neighbours, 3),
        "hash": round(time.perf_counter() - t_hash, 3),
    }
    undecided = 0
    shot_edges: list[Edge] = []
    member = _members(ids, traits, has_traits, records)
    if settings.criterion == "copy":
        t_verify = time.perf_counter()
        checked = [e for e in edges if (e.a, e.b) not in identical]
        edges, shot_edges, unsure = _verified(
            runner, source, checked, records, settings
        )
        edges, more_shots, more_checked, more_unsure = _keeper_checked(
            runner, source, edges, identical, records, member, settings
        )
        shot_edges += more_shots
        undecided = len(unsure) + more_unsure
        checked += more_checked
        stage_seconds["verify"] = round(time.perf_counter() - t_verify, 3)
    else:
        checked = []
    groups = _groups(member, records, edges, identical, settings)
    shots = _shot_groups(member, records, shot_edges, groups)
    for group in [*groups, *shots]:
        group.source = source
    return DuplicateReport(
        shots=shots,
        index=str(dest),
        source=meta.source,
        source_kind=source.kind,
        source_base=source.base,
        count=meta.count,
        settings=settings,
        groups=groups,
        candidates=len(a),
        verified=len(checked),
        undecided=undecided,
        without_traits=int((~has_traits).sum()),
        seconds=round(time.perf_counter() - started, 3),
        stage_seconds=stage_seconds,
        statistics=statistics,
        flagged={
            name: sorted(records[int(x)].path for x in ids[rows])
            for name, rows in flags.items()
        },
        outliers=[
            Outlier(records[int(ids[r])].path, float(nearest[r])) for r in lonely
        ],
        broken=stored.failures,
    )


# -- on the workers ---------------------------------------------------------------


@dataclass
class NeighbourPairs:
    """One task's rows (ids, traits) and the pairs it found among their neighbours."""

    ids: np.ndarray
    traits: np.ndarray  # TRAITS rows (zeros where has_traits is False)
    has_traits: np.ndarray  # bool per row: its shard stored traits
    nearest: np.ndarray  # per row: the best cosine to another image (-1: none)
    a: np.ndarray
    b: np.ndarray
    score: np.ndarray

    @classmethod
    def empty(cls) -> NeighbourPairs:
        none = np.zeros(0, np.int64)
        scores = np.zeros(0, np.float32)
        return cls(none, np.zeros(0, TRAITS), none > 0, scores, none, none, scores)


_INDEXES: dict[tuple, tuple[Any, Copies]] = {}
_INDEXES_LOCK = threading.Lock()
# A verify task keeps the features of the last _KEPT_FEATURES images it read
# (up to 80 KiB each, its mirror image's included; as much again for one given
# the second look's 2,000 features) and the grey pixels of the last
# _KEPT_PIXELS (110-150 KiB, as much again for the mirror image), which only a
# pair whose features agree, or that takes the second look, uses; an image
# that shed them is read again for them. Tasks of up to 4,000 pairs so kept
# read 2 to 3 times fewer images than tasks of 500 keeping 256 images whole,
# in less memory (bench/pair_order.py).
_KEPT_FEATURES = 1024
_KEPT_PIXELS = 64
# Verify tasks: of one size, as many as keep every thread at work to the end,
# of at least _FEWEST_PAIRS (imgindex.duplicates.pairs-per-task is the most).
_TASKS_PER_THREAD = 4
_FEWEST_PAIRS = 250
_TAR_PAIRS = 500  # the most for images in tar shards


def neighbour_pairs(
    index_dir: str,
    stamp: tuple[int, int, int],
    on_disk: bool,
    search_params: dict[str, int],
    rows: Sequence[ShardRows],
    k: int,
    threshold: float,
) -> NeighbourPairs:
    """Search the index for the ``k`` nearest neighbours of ``rows``: the Dask task."""
    index, copies = _worker_index(index_dir, stamp, on_disk, search_params)
    id_parts, trait_parts, has_parts, nearest, a, b, score = [], [], [], [], [], [], []
    for part in rows:
        ids, vectors, traits = part.load_with_traits()
        id_parts.append(ids)
        has_parts.append(np.full(len(ids), traits is not None))
        trait_parts.append(traits if traits is not None else np.zeros(len(ids), TRAITS))
        scores, found = copies.search(index, vectors, k + 1)
        other = (found >= 0) & (found != ids[:, None])
        nearest.append(np.where(other, scores, -1.0).max(axis=1).astype(np.float32))
        hit = other & (scores >= threshold)
        rows_hit, cols = np.nonzero(hit)
        a.append(ids[rows_hit])
        b.append(found[rows_hit, cols])
        score.append(scores[rows_hit, cols].astype(np.float32))
    return NeighbourPairs(
        ids=np.concatenate(id_parts),
        traits=np.concatenate(trait_parts),
        has_traits=np.concatenate(has_parts),
        nearest=np.concatenate(nearest),
        a=np.concatenate(a),
        b=np.concatenate(b),
        score=np.concatenate(score),
    )


def _worker_index(
    index_dir: str, stamp: tuple, on_disk: bool, params: dict
) -> tuple[Any, Copies]:
    """The index and its copies, read once per worker process (kept while it
    is the same file)."""
    key = (index_dir, stamp)
    with _INDEXES_LOCK:
        held = _INDEXES.get(key)
        if held is None:
            path = Path(index_dir) / INDEX_FILE
            if _index_stamp(Path(index_dir)) != stamp:
                raise IndexDirError(
                    f"index {index_dir!r} was rebuilt while duplicates ran; run "
                    "`imgindex duplicates` again"
                )
            _INDEXES.clear()  # one index at a time: they can be large
            index = fx.read_index_at(path, on_disk)
            fx.set_search_params(index, params)
            held = _INDEXES[key] = (index, folder_copies(index_dir))
    return held


def file_digests(source: Source | str, paths: Sequence[str]) -> list[str | None]:
    """Whole-file hashes of ``source``'s ``paths`` (None: unreadable now): the
    Dask task. ``source`` may be a folder's absolute path."""
    source = as_source(source)
    out: list[str | None] = []
    with source.reader(paths) as reader:
        for path in paths:
            try:
                out.append(content_digest(source, path, reader))
            except (OSError, DecodeError):
                out.append(None)
    return out


class Checked(NamedTuple):
    """What the workers found of a candidate pair."""

    alignment: geometry.Alignment
    # From their EXIF (pipeline/exposure.py): True one exposure, False two,
    # None where a record is missing.
    same_exposure: bool | None

    @property
    def kind(self) -> str | None:
        """The geometry's verdict, unless EXIF says otherwise: two capture
        times are two exposures (a burst from a camera held still aligns to
        the pixel); one capture time is one photo, however edited."""
        kind = self.alignment.kind
        if self.same_exposure is False and kind == "copy":
            return "shot"
        if self.same_exposure is True and kind == "shot":
            return "copy"
        return kind


# What the check needs of one image: its features and its EXIF capture record.
Seen = tuple[geometry.Features, Capture | None]


def seen(opened: str | os.PathLike | BinaryIO) -> Seen | None:
    """What :func:`check_pair` needs of an image Pillow can open (None: it
    cannot be read now, as a file deleted or changed since the build)."""
    try:
        return geometry.image_features(opened), capture_of(opened)
    except DecodeError:
        return None


def check_pair(a: Seen | None, b: Seen | None) -> Checked | None:
    """The geometric and EXIF check of two images (None: undecidable, where
    one is unreadable or too flat to hold features)."""
    if a is None or b is None or not (a[0].decidable and b[0].decidable):
        return None
    return Checked(geometry.align(a[0], b[0]), same_exposure(a[1], b[1]))


def verify_pairs(
    source: Source | str, pairs: Sequence[tuple[str, str]]
) -> list[Checked | None]:
    """The geometric and EXIF check of each pair of ``source``'s paths
    (None: undecidable). ``source`` may be a folder's absolute path.

    The same image recurs across a task's pairs (pipeline.pair_order): the
    features of the last _KEPT_FEATURES images read are kept, and the grey
    pixels of the last _KEPT_PIXELS.
    """
    cache: OrderedDict[str, Seen | None] = OrderedDict()  # the latest last
    whole: OrderedDict[str, geometry.Features] = OrderedDict()  # with pixels
    # The check finds the mirror image's features of a pair's first image:
    # one that will be first again is given them before its pixels go.
    last_first = {a: i for i, (a, _) in enumerate(pairs)}

    def features(path: str, now: int) -> Seen | None:
        """``path``'s features, for the ``now``-th pair."""
        if path in cache:
            cache.move_to_end(path)
            found = cache[path]
        else:
            try:
                found = seen(image_file(source, path, reader))
            except DecodeError:
                found = None  # deleted since the build: nothing to compare
            if found is not None:
                found[0].load = partial(
                    _grey_again, source, path, reader, _crc(found[0].grey)
                )
            cache[path] = found
            if len(cache) > _KEPT_FEATURES:
                cache.popitem(last=False)
        if found is not None:
            whole[path] = found[0]
            whole.move_to_end(path)
            if len(whole) > _KEPT_PIXELS:
                oldest, shed = whole.popitem(last=False)
                if last_first.get(oldest, -1) >= now and shed.decidable:
                    shed.mirror()
                shed.shed_pixels()
        return found

    def checked(now: int, a: str, b: str) -> Checked | None:
        try:
            return check_pair(features(a, now), features(b, now))
        except DecodeError:
            return None  # read again for its pixels, and gone or changed since

    source = as_source(source)
    with source.reader([p for pair in pairs for p in pair]) as reader:
        return [checked(now, a, b) for now, (a, b) in enumerate(pairs)]


def _grey_again(source: Source, path: str, reader: Reader, crc: int) -> np.ndarray:
    """An image's grey pixels for :class:`geometry.Features`, read again:
    those of its first read (their CRC-32), or DecodeError."""
    grey, _ = geometry.upright_grey(image_file(source, path, reader))
    if _crc(grey) != crc:
        raise DecodeError(source.location(path), "changed while being checked")
    return grey


def _crc(grey: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(grey), zlib.crc32(repr(grey.shape).encode()))


def verify_task_size(pairs: int, threads: int, most: int) -> int:
    """How many of ``pairs`` candidate pairs a verify task checks, on
    ``threads`` threads: the most that keep every thread at work to the end
    (tasks of one size, as many for each thread, _TASKS_PER_THREAD or more),
    up to ``most``. The more, the fewer reads: a task reads an image once
    for all of its pairs that have it."""
    tasks = max(_TASKS_PER_THREAD * threads, -(-pairs // most))
    tasks = -(-tasks // threads) * threads
    return min(most, max(_FEWEST_PAIRS, -(-pairs // tasks)))


# -- on the client ----------------------------------------------------------------


def _verified(
    runner: Runner,
    source: Source,
    edges: list[Edge],
    records: dict[int, ImageRecord],
    settings: DuplicateSettings,
) -> tuple[list[Edge], list[Edge], list[Edge]]:
    """The ``edges`` the geometric check finds to be copies, those it finds to
    be other shots of one scene, and those it could not decide (copies too
    when their cosine reaches UNDECIDED_COSINE)."""
    # Pairs that share images in the same task, where their features are
    # kept (pipeline.pair_order): a third fewer reads than sorted by path.
    edges = sorted(edges, key=lambda e: (e.a, e.b))
    edges = [
        edges[i]
        for i in local_order(
            np.fromiter((e.a for e in edges), np.int64, len(edges)),
            np.fromiter((e.b for e in edges), np.int64, len(edges)),
        )
    ]
    most = settings.pairs_per_task
    if source.kind == "tar":
        # A shard is read in forward passes that hold the members a task
        # wants until it asks for them: a larger task would hold more.
        most = min(most, _TAR_PAIRS)
    step = verify_task_size(len(edges), runner.threads, most)
    futures = [
        runner.submit(
            "verify",
            verify_pairs,
            source,
            [(records[e.a].path, records[e.b].path) for e in edges[i : i + step]],
        )
        for i in range(0, len(edges), step)
    ]
    kept, shots, undecided = [], [], []
    alignments = (x for part in runner.gather(futures) for x in part)
    for edge, found in zip(edges, alignments, strict=True):
        if found is None:
            undecided.append(edge)
            if (edge.cosine or 0.0) >= max(settings.threshold, UNDECIDED_COSINE):
                kept.append(edge)
            continue
        kind = found.kind
        aligned = found.alignment
        evidence = edge._replace(
            correlation=aligned.correlation,
            shift=aligned.shift,
            overlap=aligned.mutual,
            exposure=found.same_exposure,
            moved=aligned.moved,
            drifted=aligned.drifted,
            differs=aligned.differs,
        )
        if kind == "copy":
            kept.append(evidence)
        elif kind == "shot":
            shots.append(evidence)
    return kept, shots, undecided


def _keeper_checked(
    runner: Runner,
    source: Source,
    edges: list[Edge],
    identical: set[tuple[int, int]],
    records: dict[int, ImageRecord],
    member,
    settings: DuplicateSettings,
) -> tuple[list[Edge], list[Edge], list[Edge], int]:
    """The copy ``edges`` once every image of a group is checked against its
    group's keeper: (copy edges, shot edges, edges checked, undecided).

    A group is a connected component of copy pairs, so one pair wrongly
    called a copy would join two photos' groups: a crop of a video frame
    that shows little of what moved is, to the pixels, a copy of the next
    frame too, and would bring that frame into the first one's group, to be
    suggested for removal. So an image joined to its keeper only through
    others is checked against the keeper itself. One found not to be a copy
    of it leaves the group with the pairs that joined it (another shot of
    the keeper's scene, where the check says so); what it leaves may form
    groups of its own, checked the same way, until every image of every
    group is a copy of its keeper by its own pair (or byte for byte, or
    undecidable by the check, which tells nothing against it). The keeper
    (:func:`_keeper`) may change as the pairs checked tell which images are
    edits; an image that an earlier check found no copy of the new keeper
    leaves too.
    """
    verdict = {(e.a, e.b): True for e in edges} | dict.fromkeys(identical, True)
    edges_now, shots, checked, undecided = list(edges), [], [], 0
    while True:
        keeper_of, wanted, left = {}, [], set()
        differing = _differing(edges_now)
        for ids in _copy_sets(edges_now, identical).members().values():
            keeper = _keeper(_ranked(ids, member), differing)
            for i in ids:
                keeper_of[i] = keeper
                pair = _pair(i, keeper)
                if i == keeper:
                    continue
                if pair not in verdict:
                    wanted.append(Edge(*pair, None, None))
                elif not verdict[pair]:  # the keeper changed to one it is no copy of
                    left.add(i)
        checked += wanted
        copies, shot, unsure = (
            _verified(runner, source, wanted, records, settings)
            if wanted
            else ([], [], [])
        )
        undecided += len(unsure)
        kept = {(e.a, e.b) for e in copies + unsure}
        for e in wanted:
            verdict[e.a, e.b] = (e.a, e.b) in kept
            if (e.a, e.b) not in kept:
                left.add(e.a if keeper_of[e.a] == e.b else e.b)
        shots += shot
        before = len(edges_now)
        edges_now = [e for e in edges_now + copies if (e.a in left) == (e.b in left)]
        # Nothing new checked and nothing left: done (an image joined by
        # bytes alone to one it left stays, as its byte copy does).
        if not wanted and len(edges_now) == before:
            return edges_now, shots, checked, undecided


def _pair(x: int, y: int) -> tuple[int, int]:
    """The key of the unordered pair of ids ``x`` and ``y``, as edges hold it."""
    return (min(x, y), max(x, y))


def _same_edit(
    pair: tuple[int, int],
    edge_of: dict[tuple[int, int], Edge],
    identical: set[tuple[int, int]],
) -> bool:
    """Whether ``pair`` is the same bytes, or was checked (an undecided pair
    has no ``differs``) and found a copy where no region differs."""
    if pair in identical:
        return True
    edge = edge_of.get(pair)
    return edge is not None and edge.differs is not None and not edge.differs


def _differing(edges: list[Edge]) -> dict[int, set[int]]:
    """Per image, the images its copy pairs say differ from it in a region
    (Pair.differs: one of the two is an edit of the other)."""
    differing: dict[int, set[int]] = {}
    for edge in edges:
        if edge.differs:
            differing.setdefault(edge.a, set()).add(edge.b)
            differing.setdefault(edge.b, set()).add(edge.a)
    return differing


def _ranked(ids: Iterable[int], member) -> list[int]:
    """A group's image ids, first by _keeper_order."""
    return sorted(ids, key=lambda i: _keeper_order(member(i)))


def _keeper(ranked: list[int], differing: dict[int, set[int]]) -> int:
    """The image of a group of copies (``ranked`` by :func:`_ranked`) to
    keep: the first of those that are no edit.

    Each pair that differs in a region holds an edit (no copy made without
    one showed a region, bench/copy_or_shot.py), but which of the two is
    one the pair cannot tell, and an edit's pair with one copy may show its
    region where its pair with another does not. So the edits are taken to
    be the fewest images that account for every such pair: a sticker
    differs from every other copy of its photo, the photo and its other
    copies from the sticker alone. They are picked greedily, the image in
    the most pairs not yet accounted for first (of equals, the one the
    keeper rule ranks last: a photo and its edit alone leave the rule's
    first to keep).
    """
    group = set(ranked)
    left = {i: differing.get(i, set()) & group for i in ranked}
    edits = set()
    while True:
        # Of equals, max keeps the first it meets: the rule's last.
        edit = max(reversed(ranked), key=lambda i: len(left[i]))
        if not left[edit]:
            return next(i for i in ranked if i not in edits)
        edits.add(edit)
        for other in left[edit]:
            left[other].discard(edit)
        left[edit] = set()


def _index_stamp(dest: Path) -> tuple[int, int, int]:
    st = os.stat(dest / INDEX_FILE)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _unique_pairs(
    a: np.ndarray, b: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each unordered pair once (found from both sides or one), its best score."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((-score, hi, lo))
    lo, hi, score = lo[order], hi[order], score[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], score[first]


def _hash_edges(
    ids: np.ndarray,
    traits: np.ndarray,
    hashable: np.ndarray,
    settings: DuplicateSettings,
) -> list[Edge]:
    """Pairs of images with equal flip/turn-invariant hashes (rotated copies).

    A pair also found among the neighbours is listed twice; :func:`_best_edges`
    keeps the copy with its cosine.
    """
    if settings.criterion != "copy":
        return []
    where = np.flatnonzero(hashable)
    edges = []
    for run in _equal_runs(canonical_hash(traits[where])):
        rows = where[run]
        # A star from the first member is enough to connect the group.
        first = np.repeat(rows[:1], len(rows) - 1)
        dist = hash_distance(traits[first], traits[rows[1:]])
        for r, d in zip(rows[1:], dist, strict=True):
            x, y = int(ids[rows[0]]), int(ids[r])
            edges.append(Edge(*_pair(x, y), None, int(d)))
    return edges


def _equal_runs(values: np.ndarray) -> Iterable[np.ndarray]:
    """Index arrays of the positions sharing a value, for values held twice or more."""
    if len(values) < 2:
        return
    order = np.argsort(values, kind="stable")
    v = values[order]
    bounds = np.flatnonzero(np.diff(v) != 0) + 1
    for run in np.split(order, bounds):
        if len(run) > 1:
            yield run


def _content_runs(
    ids: np.ndarray, traits: np.ndarray, has_traits: np.ndarray
) -> list[list[int]]:
    """Ids of the images sharing a content sample (size, head, tail), per sample."""
    where = np.flatnonzero(has_traits & (traits["content"] != 0))
    return [
        [int(ids[i]) for i in where[run]]
        for run in _equal_runs(traits["content"][where])
    ]


def _identical_edges(
    runner: Runner,
    source: Source,
    runs: list[list[int]],
    records: dict[int, ImageRecord],
) -> set[tuple[int, int]]:
    """Pairs (smaller id first) of byte-identical files among ``runs``, by
    whole-file hashes."""
    futures = [
        runner.submit("hash", file_digests, source, [records[m].path for m in run])
        for run in runs
    ]
    edges = set()
    for members, hashes in zip(runs, runner.gather(futures), strict=True):
        by_hash: dict[str, int] = {}
        for member, digest in zip(members, hashes, strict=True):
            if digest is None:
                continue
            if digest in by_hash:
                first = by_hash[digest]
                edges.add(_pair(first, member))
            else:
                by_hash[digest] = member
    return edges


def _listed_records(
    dest: Path, ids: np.ndarray, wanted: set[int]
) -> dict[int, ImageRecord]:
    """The manifest records of the ``wanted`` ids, in one pass over the manifest.

    Every one of ``ids`` must still be listed (8 bytes an image are kept to
    check that): else the index was rebuilt since its shards were read.
    """
    listed = array("q")
    records: dict[int, ImageRecord] = {}
    for record in iter_manifest(dest):
        listed.append(record.id)
        if record.id in wanted:
            records[record.id] = record
    if not np.isin(ids, np.frombuffer(listed, np.int64)).all():
        raise IndexDirError(
            f"index {str(dest)!r} changed while duplicates ran; run it again"
        )
    return records


def _members(
    ids: np.ndarray,
    traits: np.ndarray,
    has_traits: np.ndarray,
    records: dict[int, ImageRecord],
):
    """A function making an image's :class:`Member` from its id."""

    def member(i: int) -> Member:
        at = int(np.searchsorted(ids, i))
        t = traits[at]
        known = bool(has_traits[at])
        return Member(
            records[i].path,
            int(t["width"]) if known else None,
            int(t["height"]) if known else None,
            records[i].size,
            records[i].mtime_ns,
            float(t["sharpness"]) if known else None,
            float(t["brightness"]) if known else None,
        )

    return member


class _Sets:
    """Union-find over hashable items."""

    def __init__(self):
        self.parent: dict = {}

    def root(self, x):
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def join(self, x, y) -> None:
        self.parent[self.root(x)] = self.root(y)

    def members(self) -> dict:
        """root -> its items."""
        out: dict = {}
        for x in self.parent:
            out.setdefault(self.root(x), []).append(x)
        return out


def _copy_sets(edges: list[Edge], identical: set[tuple[int, int]]) -> _Sets:
    """The images joined by copy ``edges`` and byte copies: a group's members."""
    sets = _Sets()
    for edge in edges:
        sets.join(edge.a, edge.b)
    for x, y in identical:
        sets.join(x, y)
    return sets


def _groups(
    member,
    records: dict[int, ImageRecord],
    edges: list[Edge],
    identical: set[tuple[int, int]],
    settings: DuplicateSettings,
) -> list[Group]:
    sets = _copy_sets(edges, identical)
    members_of = sets.members()
    root = sets.root
    paths = {x: records[x].path for x in sets.parent}
    pairs_of: dict[int, list[Pair]] = {}
    copy_kind = "copy" if settings.criterion == "copy" else "similar"
    for edge in edges:
        x, y = edge.a, edge.b
        kind = "identical" if (x, y) in identical else copy_kind
        pairs_of.setdefault(root(x), []).append(edge.pair(paths[x], paths[y], kind))
    seen = {(e.a, e.b) for e in edges}
    for x, y in identical:
        if (x, y) not in seen:
            pairs_of.setdefault(root(x), []).append(
                Pair(paths[x], paths[y], None, None, None, "identical")
            )

    differing = _differing(edges)
    edge_of = {(e.a, e.b): e for e in edges}
    groups = []
    for top, member_ids in members_of.items():
        ranked = _ranked(member_ids, member)
        keeper = _keeper(ranked, differing)
        others = [i for i in ranked if i != keeper]
        kept, copied = _edits_kept(keeper, others, edge_of, identical)
        members = [member(keeper)] + [member(i) for i in others]
        pairs = sorted(pairs_of.get(top, []), key=lambda p: (p.a, p.b))
        groups.append(
            Group(
                members,
                pairs,
                edited=[paths[i] for i in kept],
                edit_copies={paths[i]: paths[of] for i, of in copied.items()},
            )
        )
    groups.sort(key=lambda g: (-len(g.members), g.keeper.path))
    return groups


def _edits_kept(
    keeper: int,
    others: list[int],
    edge_of: dict[tuple[int, int], Edge],
    identical: set[tuple[int, int]],
) -> tuple[list[int], dict[int, int]]:
    """Of a group's ``others`` (in the keeper rule's order), those kept as
    edits, and those that could go as copies of one of them.

    A member whose own pair with the keeper differs in a region is, or
    holds, an edit: kept. But a meme or a stickered photo is copied as
    often as a photo is, and keeping every copy of an edit would keep them
    all: so a member whose own pair with an edit kept before it (by the
    rule: larger, older) is a copy with no such region, or the same bytes,
    is a copy of that edit, and could go. Only pairs already checked are
    used: two edits never paired are both kept.
    """
    kept: list[int] = []
    copied: dict[int, int] = {}
    for i in others:
        with_keeper = edge_of.get(_pair(i, keeper))
        if with_keeper is None or not with_keeper.differs:
            continue
        of = next(
            (e for e in kept if _same_edit(_pair(i, e), edge_of, identical)), None
        )
        if of is None:
            kept.append(i)
        else:
            copied[i] = of
    return kept, copied


def _shot_groups(
    member,
    records: dict[int, ImageRecord],
    edges: list[Edge],
    copies: list[Group],
) -> list[ShotGroup]:
    """Groups of other shots of one scene, joined by ``edges``; an image with
    copies stands for them by its keeper, and shots within one copy group
    (its copies are that already) are left out."""
    keeper_of = {m.path: g.keeper.path for g in copies for m in g.members}
    id_of = {r.path: i for i, r in records.items()}
    sets = _Sets()
    pairs: list[tuple[str, Pair]] = []
    for edge in edges:
        a, b = records[edge.a].path, records[edge.b].path
        ka, kb = keeper_of.get(a, a), keeper_of.get(b, b)
        if ka == kb:
            continue
        sets.join(ka, kb)
        pairs.append((ka, edge.pair(a, b, "shot")))
    pairs_of: dict[str, list[Pair]] = {}
    for ka, pair in pairs:
        pairs_of.setdefault(sets.root(ka), []).append(pair)
    groups = []
    for top, paths in sets.members().items():
        members = sorted((member(id_of[p]) for p in paths), key=_best_shot_order)
        found = sorted(pairs_of[top], key=lambda p: (p.a, p.b))
        groups.append(ShotGroup(members, found))
    groups.sort(key=lambda g: (-len(g.members), g.best.path))
    return groups


def _best_shot_order(m: Member) -> tuple:
    exposure = abs((m.brightness if m.brightness is not None else 127.5) - 127.5)
    pixels = (m.width or 0) * (m.height or 0)
    return (-(m.sharpness or 0.0), exposure, -pixels, m.path)


def _best_edges(edges: list[Edge]) -> list[Edge]:
    """Each pair once, the copy with a cosine preferred (hash edges have none)."""
    best: dict[tuple[int, int], Edge] = {}
    for edge in edges:
        key = (edge.a, edge.b)
        if key not in best or best[key].cosine is None:
            best[key] = edge
    return list(best.values())


def _keeper_order(m: Member) -> tuple:
    pixels = (m.width or 0) * (m.height or 0)
    return (-pixels, m.mtime_ns, len(m.path), m.path)
