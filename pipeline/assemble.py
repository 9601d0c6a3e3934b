"""From a manifest and its shards to a built, measured index (build and reindex).

Decides the index (policy + ``imgindex.index.*`` config + the previous
version), selects exactly one shard row per manifest image, and runs the
reduction of :mod:`pipeline.index_build`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgindex import __version__
from imgindex.pipeline.config import config_value
from imgindex.pipeline.discover import Failure, ImageRecord
from imgindex.pipeline.errors import BuildFailed, IndexDirError
from imgindex.pipeline.index_build import (
    Append,
    BuiltIndex,
    IndexSettings,
    Runner,
    ShardDamaged,
    ShardRows,
    build_from_shards,
)
from imgindex.pipeline.index_policy import KINDS, IndexChoice, Thresholds, choose_index
from imgindex.pipeline.lookup import rows_in_sorted
from imgindex.pipeline.meta import IndexMeta
from imgindex.pipeline.plan import Plan
from imgindex.pipeline.shards import INDEX_WORK, Shard, clear_index_work
from imgindex.pipeline.store import INDEX_FILE, StoredIndex, link_index_files

logger = logging.getLogger(__name__)

REFILLED = ": refilled without training"


@dataclass(frozen=True)
class IndexRequest:
    """What the user asked for (CLI flags, else ``imgindex.index.*`` config)."""

    index_type: str
    max_memory: int | None
    on_disk: bool | None
    thresholds: Thresholds
    settings: IndexSettings
    retrain_growth: float

    @property
    def factory_string(self) -> bool:
        """A FAISS factory string rather than one of the named kinds."""
        return self.index_type.strip().lower() not in KINDS

    @classmethod
    def from_config(
        cls,
        index_type: str | None = None,
        max_memory: str | int | None = None,
        recall_target: float | None = None,
    ) -> IndexRequest:
        """Flags given here win over config; bad values raise ValueError naming them."""
        from dask.utils import parse_bytes

        kind = str(config_value(index_type, "imgindex.index.type")).strip()
        if not kind:
            raise ValueError("--index-type is empty")
        memory = config_value(max_memory, "imgindex.index.max-memory")
        if memory in (None, "auto"):
            budget = _half_of_ram()
        else:
            try:
                budget = (
                    int(parse_bytes(memory)) if isinstance(memory, str) else int(memory)
                )
            except (ValueError, TypeError):
                raise ValueError(
                    f"--max-index-memory {memory!r} is not a size (e.g. 8GiB)"
                ) from None
            if budget <= 0:
                raise ValueError(f"--max-index-memory {memory!r} must be above 0")
        on_disk = config_value(None, "imgindex.index.on-disk")
        target = float(config_value(recall_target, "imgindex.index.recall-target"))
        if not 0 < target <= 1:
            raise ValueError(f"--recall-target {target} must be in (0, 1]")
        return cls(
            index_type=kind,
            max_memory=budget,
            on_disk=None if on_disk in (None, "auto") else bool(on_disk),
            thresholds=Thresholds(
                flat_max=int(config_value(None, "imgindex.index.flat-max")),
                hnsw_max=int(config_value(None, "imgindex.index.hnsw-max")),
            ),
            settings=IndexSettings(
                recall_target=target,
                recall_k=int(config_value(None, "imgindex.index.recall-k")),
                queries=int(config_value(None, "imgindex.index.recall-queries")),
            ),
            retrain_growth=float(config_value(None, "imgindex.index.retrain-growth")),
        )

    def choose(self, n_vectors: int, dim: int) -> IndexChoice:
        """The policy's choice; ValueError (one line) for a type FAISS rejects."""
        choice = choose_index(
            n_vectors,
            dim,
            self.index_type,
            self.max_memory,
            thresholds=self.thresholds,
            on_disk=self.on_disk,
        )
        if choice.kind == "custom":
            from imgindex.pipeline.index import new_index

            new_index(choice.key, dim)  # raises for a string FAISS cannot parse
        return choice


def decide(
    request: IndexRequest,
    n_vectors: int,
    dim: int,
    previous: IndexMeta | None,
    previous_file: Path | None,
) -> tuple[IndexChoice, Path | None, int]:
    """(choice, index file whose quantizer to reuse or None, vectors trained for).

    An IVF index of the same kind is refilled with its trained quantizer
    (no retraining) while the collection stays within ``retrain-growth``
    times the size it was trained for; past that, it is trained again.
    """
    choice = request.choose(n_vectors, dim)
    if previous is None or previous_file is None or not choice.trains:
        return choice, None, n_vectors if choice.trains else 0
    same_kind = previous.index_kind == choice.kind and (
        choice.kind != "custom" or previous.index_key == choice.key
    )
    trained_for = previous.trained_for
    growth = request.retrain_growth
    within = (
        trained_for > 0 and trained_for / growth <= n_vectors <= trained_for * growth
    )
    if same_kind and within and previous.dim == dim:
        kept = dataclasses.replace(
            choice,
            key=previous.index_key,
            reason=(
                f"{previous.index_key}: trained for {trained_for:,} vectors, now "
                f"{n_vectors:,} (within imgindex.index.retrain-growth {growth:g}x)"
                f"{REFILLED}"
            ),
        )
        return kept, previous_file, trained_for
    return choice, None, n_vectors


def index_in_place(
    plan: Plan, reusable: StoredIndex | None, request: IndexRequest
) -> str | None:
    """Why the index in place is already what this build would write; None if not.

    ``reusable``: the plan's previous index if its file is whole (headers and
    size, see :func:`intact`). Nothing was added, changed or removed and the
    same files failed; this version of imgindex wrote it; and the policy
    would choose the same index and tune it for the same recall. Then
    rebuilding it would spend minutes on a large collection to write the
    same index again.
    """
    previous = reusable
    if previous is None or plan.to_embed or plan.removed:
        return None
    if not as_this_build_would(plan, previous, request, plan.known_failures):
        return None
    return f"nothing added, changed or removed since {previous.meta.updated}"


def holds_every_vector(
    plan: Plan,
    reusable: StoredIndex | None,
    request: IndexRequest,
    manifest: Sequence[ImageRecord],
    failures: Iterable[Failure],
    restamped: np.ndarray,
) -> bool:
    """Whether the index in place answers for ``manifest`` with the vectors it
    holds, as this build would write it: its images are the index's, each
    unchanged or ``restamped`` (keys of images with a new time and the same
    bytes, :mod:`pipeline.touched`), the same files failed, and the settings
    ask for the same index (:func:`index_in_place`).

    Then its file is kept in the new version rather than built again: an
    HNSW graph of 300,000 images took 176 s to build (docs/performance.md),
    and a copy made without its files' times restamps every image.
    """
    if reusable is None or not len(restamped) or plan.removed:
        return False
    if len(manifest) != reusable.meta.count:
        return False
    if not as_this_build_would(plan, reusable, request, failures):
        return False
    known = np.concatenate([record_keys(reusable.records()), restamped])
    return bool(np.isin(record_keys(manifest), known).all())


def as_this_build_would(
    plan: Plan,
    previous: StoredIndex,
    request: IndexRequest,
    failures: Iterable[Failure],
) -> bool:
    """The index in place was written by this version of imgindex with these
    ``failures``, and the settings would choose and tune the same index."""
    meta = previous.meta
    if meta.imgindex_version != __version__:
        return False
    failed = {(f.path, f.reason) for f in failures}
    if failed != {(f.path, f.reason) for f in previous.failures}:
        return False
    if plan.metadata_digest != meta.metadata_digest:
        return False  # a list's other columns were edited: the manifest is new
    # The model was checked against the plan's (pipeline.plan), so its dim
    # is the index's.
    choice, _, _ = decide(
        request, meta.count, meta.dim, meta, previous.path / INDEX_FILE
    )
    if (choice.key, choice.on_disk) != (meta.index_key, meta.on_disk):
        return False
    measured, settings = meta.quality, request.settings
    # A collection smaller than recall-k was measured at k = its size.
    k = min(settings.recall_k, meta.count - meta.copies)
    return not measured.get("queries") or (
        measured.get("target") == settings.recall_target and measured.get("k") == k
    )


def kept_index(stored: StoredIndex, staging: Path) -> BuiltIndex:
    """The index in place as a build into ``staging`` would have written it
    (:func:`holds_every_vector`): its files linked into the work folder."""
    meta = stored.meta
    folder = staging / INDEX_WORK
    clear_index_work(folder)
    link_index_files(stored.path, folder)
    choice = IndexChoice(
        key=meta.index_key,
        kind=meta.index_kind,
        reason=meta.index_reason,
        bytes_estimate=0,
        train_size=0,
        on_disk=meta.on_disk,
    )
    return BuiltIndex(
        folder,
        choice,
        count=meta.count,
        trained_on=0,
        search_params=dict(meta.search_params),
        quality=dict(meta.quality),
        copies=meta.copies,
    )


def intact(stored: StoredIndex | None) -> StoredIndex | None:
    """``stored`` if its index file looks whole (headers, size), so that a
    build may keep or grow it; else None: it is built again from the shards."""
    if stored is None:
        return None
    problem = stored.problem()
    if problem:
        logger.warning(
            "%s is damaged (%s): building it again from the shards",
            stored.path / INDEX_FILE,
            problem,
        )
        return None
    return stored


def plan_append(
    choice: IndexChoice,
    trained: Path | None,
    stored: StoredIndex | None,
    manifest: Sequence[ImageRecord],
    shards: Iterable[Shard],
    restamped: np.ndarray | None = None,
) -> tuple[IndexChoice, Append | None]:
    """Grow the previous index when its quantizer is kept (see :func:`decide`),
    or when it is a graph of the same kind and images were only added.

    Its entries for images unchanged since, or ``restamped`` (keys of images
    with a new time and the same bytes, :mod:`pipeline.touched`), are kept
    as they are; only new and changed images are encoded; removed and
    changed images' entries dropped (IVF; a graph cannot drop a node, so it
    is built again then).
    Returns the choice with a reason that says so, and the plan (None: refill).
    """
    if stored is None or stored.meta.on_disk != choice.on_disk:
        return choice, None
    grows_graph = choice.is_graph and stored.meta.index_key == choice.key
    if trained is None and not grows_graph:
        return choice, None
    before, now = record_keys(stored.records()), record_keys(manifest)
    # The old ids, read once: a streamed manifest is read from its file.
    ids = np.fromiter((r.id for r in stored.records()), np.int64, len(before))
    kept = np.isin(now, before)  # the same path, size and mtime in both
    gone = ~np.isin(before, now)
    if restamped is not None and len(restamped):
        # A restamped image's old record is gone, but its entry is its vector.
        again = np.isin(now, restamped) & ~kept
        kept |= again
        gone &= ~np.isin(ids, _ids_of(manifest, again))
    changed = [r for r, same in zip(manifest, kept, strict=True) if not same]
    rows, _, missing = select_rows(shards, changed)
    if missing:
        return choice, None  # cannot happen after select_rows on all; refill
    drop = ids[gone]
    if trained is None:  # the graph
        if len(drop):
            return choice, None
        reason = (
            f"{choice.reason}: kept {int(kept.sum()):,} vectors as they were, "
            f"adding {len(changed):,} new to the graph"
        )
        copies = np.column_stack([stored.copies.ids, stored.copies.of])
        graph = Append(stored.path / INDEX_FILE, rows, drop, copies)
        return dataclasses.replace(choice, reason=reason), graph
    reason = (
        f"{choice.reason.removesuffix(REFILLED)}: kept {int(kept.sum()):,} vectors "
        f"as they were, encoding {len(changed):,} new or changed and dropping "
        f"{len(drop):,} without training"
    )
    return dataclasses.replace(choice, reason=reason), Append(trained, rows, drop)


def _ids_of(records: Sequence[ImageRecord], which: np.ndarray) -> np.ndarray:
    return np.fromiter(
        (r.id for r, this in zip(records, which, strict=True) if this), np.int64
    )


def select_rows(
    shards: Iterable[Shard], manifest: Iterable[ImageRecord]
) -> tuple[list[ShardRows], list[Path], list[ImageRecord]]:
    """One shard row per manifest image: (selection, shards used, images without).

    A row counts only while its image is in the manifest unchanged (an
    incremental build keeps an old shard while another of its images is
    current); the first shard (in the given order) to hold an image wins.
    """
    selection, used, covered = select_by_keys(shards, record_keys(manifest))
    if covered.all():  # as it should be: ``manifest`` is not read again
        return selection, used, []
    missing = [r for r, has in zip(manifest, covered, strict=True) if not has]
    return selection, used, missing


def record_keys(records: Iterable[ImageRecord]) -> np.ndarray:
    """A 64-bit key per record (path, size, mtime), in order.

    Eight bytes an image where a dict of records takes hundreds: a reindex of
    100 M images holds these, never the records. Python's string hash differs
    between processes, so keys are compared only within one.
    """
    return np.fromiter(
        (_key(r.path, r.size, r.mtime_ns) for r in records), dtype=np.int64
    )


def _key(path: str, size: int, mtime_ns: int) -> int:
    return hash((path, size, mtime_ns))


def select_by_keys(
    shards: Iterable[Shard], keys: np.ndarray
) -> tuple[list[ShardRows], list[Path], np.ndarray]:
    """:func:`select_rows` on keys: (selection, shards used, which keys got a row).

    ``shards`` may be a generator: each shard's file records are dropped once
    its rows are chosen.
    """
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    covered = np.zeros(len(keys), bool)
    selection: list[ShardRows] = []
    used: list[Path] = []
    for shard in shards:
        paths = shard.info["paths"]
        if not paths or not len(keys):
            continue
        known = {p: (size, mtime) for p, size, mtime in shard.info["records"]}
        here = np.fromiter(
            (_key(p, *known.get(p, (-1, -1))) for p in paths), dtype=np.int64
        )
        at = rows_in_sorted(ordered, here)
        which = order[at]
        keep = (at >= 0) & ~covered[which]
        if not keep.any():
            continue
        covered[which[keep]] = True
        rows = np.flatnonzero(keep)
        count = len(rows)
        selection.append(
            ShardRows(str(shard.path), None if count == len(paths) else rows, count)
        )
        used.append(shard.path)
    return selection, used, covered


def run_index_build(
    runner: Runner,
    selection: Sequence[ShardRows],
    dim: int,
    choice: IndexChoice,
    staging: Path,
    request: IndexRequest,
    trained: Path | None,
    append: Append | None = None,
) -> BuiltIndex:
    """Build into ``staging``'s work folder (emptied first) and log the outcome."""
    work = staging / INDEX_WORK
    clear_index_work(work)
    logger.info("index: %s", choice.reason)
    try:
        built = build_from_shards(
            runner, selection, dim, choice, work, request.settings, trained, append
        )
    except ShardDamaged as e:
        raise IndexDirError(
            f"{e}; rebuild the index with `imgindex build --rebuild`"
        ) from None
    except RuntimeError as e:  # FAISS refused (too few vectors for the lists...)
        from imgindex.pipeline.index import faiss_reason

        raise BuildFailed(
            f"FAISS could not build {choice.key!r}: {faiss_reason(e)}; choose "
            "another --index-type"
        ) from None
    except OSError as e:  # raised on a worker as it wrote its part
        raise IndexDirError(
            f"could not write the index in {str(work)!r}: {e.strerror or e}; the "
            "old index (if any) is untouched, and re-running resumes"
        ) from None

    q = built.quality
    if q.get("queries") and not q.get("reached", True):
        logger.warning(
            "index: recall@%d is %.3f at best, under the target %.2f; a less "
            "compressed --index-type (or more --max-index-memory) gets closer",
            q["k"],
            q["recall_at_k"],
            q["target"],
        )
    return built


def _half_of_ram() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total // 2)
    except ImportError:
        return None
