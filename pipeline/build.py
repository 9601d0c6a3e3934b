"""Build one dataset's index: plan what to embed, dispatch it, assemble, write."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from imgindex import __version__
from imgindex.pipeline.assemble import (
    IndexRequest,
    as_this_build_would,
    decide,
    holds_every_vector,
    index_in_place,
    intact,
    kept_index,
    plan_append,
    record_keys,
    run_index_build,
    select_rows,
)
from imgindex.pipeline.cancel import Cancel
from imgindex.pipeline.config import config_value, count_or_auto, seconds_value
from imgindex.pipeline.discover import Failure, ImageRecord, image_id
from imgindex.pipeline.dispatch import DispatchSettings, PartitionDispatcher
from imgindex.pipeline.embed import ModelSpec, PartitionResult
from imgindex.pipeline.errors import (
    BuildCancelled,
    BuildFailed,
    ImgindexError,
    IndexDirError,
    IndexLocked,
    error_text,
)
from imgindex.pipeline.index import reconstruct
from imgindex.pipeline.index_build import Runner, StepCallback
from imgindex.pipeline.lock import lock_index
from imgindex.pipeline.lookup import rows_in_sorted
from imgindex.pipeline.manifest_merge import ManifestInput, merge_manifest
from imgindex.pipeline.meta import IndexMeta, now_stamp
from imgindex.pipeline.models import ModelCard, Preprocess, get_model
from imgindex.pipeline.parts import PartRecords, PartWriter, row_of
from imgindex.pipeline.plan import (
    INDEXED,
    LISTING,
    MANIFEST,
    REMAINING,
    Plan,
    clear_plan,
    plan_build,
    plan_dir,
)
from imgindex.pipeline.ranges import compact_parts, label
from imgindex.pipeline.shards import (
    TOUCHED_WORK,
    Shard,
    ShardFiles,
    clear_shard_files,
    clear_staging,
    iter_shards,
    read_shard,
    shard_stats,
    spec_key,
    staging_dir,
    usable_shards,
    write_shard,
    write_vectors,
)
from imgindex.pipeline.sources import Source, parse_source, source_fields
from imgindex.pipeline.spans import BuildSpan
from imgindex.pipeline.store import (
    INDEX_FILE,
    SHARDS_DIR,
    ManifestLines,
    StoredIndex,
    recover_index_dir,
    write_index_dir,
    write_meta_version,
)
from imgindex.pipeline.touched import (
    Restamped,
    TouchedInput,
    claimed_once,
    restamp_touched,
    without_ids,
)

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

# (images done, images to embed, of which failed)
ProgressCallback = Callable[[int, int, int], None]


@dataclass
class BuildSummary:
    """What one dataset's build did; the per-dataset part of ``build --json``."""

    name: str
    source: str
    index: str
    indexed: int = 0
    embedded: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    partitions: int = 0
    resumed_partitions: int = 0
    resumed_images: int = 0
    workers: dict[str, int] = field(default_factory=dict)
    runtimes: dict[str, int] = field(default_factory=dict)  # images embedded by each
    runtime_reasons: dict[str, str] = field(default_factory=dict)  # one worker's why
    # Summed over this run's tasks: where worker time went.
    task_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    vectors: str = ""  # "written by workers" | "streamed to client"
    shards: int = 0
    damaged_shards: list[str] = field(default_factory=list)
    index_key: str = ""  # the FAISS factory string built
    index_reason: str = ""  # why (pipeline/index_policy.py)
    on_disk: bool = False
    search_params: dict[str, int] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)  # recall, latency, bytes
    copies: int = 0  # images whose vector is another's, stored once (graph index)
    kept: str = ""  # why the index in place was kept as it was ("": written now)
    moved_from: str = ""  # where the index said its dataset was, if moved (--moved)
    # Of ``unchanged``, images whose mtime changed but not their bytes
    # (pipeline/touched.py): their vectors were kept.
    touched: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_build(
    client: Client, dataset: str | Path | Source, out: str | Path, **options: Any
) -> BuildSummary:
    """Build one dataset: both steps of :func:`build_steps`, one after the other."""
    steps = build_steps(client, dataset, out, **options)
    next(steps)
    return _last_step(steps)


@dataclass
class PlannedBuild:
    """One dataset planned under its index's lock, which it holds until
    closed: what to embed, or why the index in place is kept as it is.

    Planning needs no cluster, so a build plans first and starts none when
    every index is current.
    """

    source: Source
    name: str
    dest: Path
    plan: Plan
    # The plan's previous index if its file is whole: it may be kept, grown
    # or lend its quantizer (None with --rebuild).
    reusable: StoredIndex | None
    kept: str | None  # why the index in place is what this build would write
    rebuild: bool
    started: float
    stages: StageTimer
    _held: contextlib.ExitStack
    # Where its only change was a few files with a new time, checked here
    # while planning and all of the same bytes: their shards, restamped.
    restamped: list[tuple[Path, Restamped]] | None = None

    @property
    def needs_workers(self) -> bool:
        """Whether it has images to embed (or may have: not checked yet)."""
        return not self.kept and self.restamped is None

    def close(self) -> None:
        """Release the lock and the previous index's handles (idempotent)."""
        self._held.close()

    def __enter__(self) -> PlannedBuild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_dataset(
    dataset: str | Path | Source,
    out: str | Path,
    *,
    name: str | None = None,
    spec: ModelSpec | None = None,
    rebuild: bool = False,
    index: IndexRequest | None = None,
    cluster: Any = None,
    moved: bool = False,
) -> PlannedBuild:
    """Lock ``out/<name>``, discover ``dataset`` and diff it against the index
    there (see :func:`build_steps` for the arguments); no cluster is needed,
    but a large dataset is listed on ``cluster``'s workers once it is at
    hand (a Client, or a Future that gives one or None).

    Raises
    ------
    DatasetError, IndexDirError, IndexLocked
    """
    started = time.perf_counter()
    spec = spec or ModelSpec.from_config()
    index = index or IndexRequest.from_config()
    source = dataset if isinstance(dataset, Source) else parse_source(dataset)
    name = name or source.name
    dest = Path(out).resolve() / name
    if dest.exists() and not dest.is_dir():
        raise IndexDirError(
            f"{str(dest)!r} is a file, not an index directory; choose another "
            "--out or --name"
        )
    held = contextlib.ExitStack()
    try:
        held.enter_context(lock_index(dest))
        recovered = recover_index_dir(dest)
        if recovered:
            logger.warning("%s: %s", dest, recovered)
        stages = StageTimer()
        with stages("discover"):
            plan = plan_build(source, dest, spec, rebuild, cluster, moved)
        held.callback(clear_plan, plan_dir(dest))
        held.callback(lambda: plan.previous and plan.previous.close())
        reusable = intact(plan.previous)
        kept = index_in_place(plan, reusable, index)
        restamped = None
        if kept is None and _touched_only(plan, reusable, index):
            with stages("prepare"):
                restamped = _restamp_here(plan, source, spec, dest, reusable)
    except BaseException:
        held.close()
        raise
    return PlannedBuild(
        source,
        name,
        dest,
        plan,
        reusable,
        kept,
        rebuild,
        started,
        stages,
        held,
        restamped,
    )


# A build whose only change is a few files with a new time checks their bytes
# while it plans, here, and starts no cluster if none changed: a `touch`
# should not wait for workers (with --jobqueue, for a batch job).
TOUCHED_HERE_IMAGES = 1_000
TOUCHED_HERE_BYTES = 256 * 2**20


def _touched_only(
    plan: Plan, reusable: StoredIndex | None, index: IndexRequest
) -> bool:
    """Whether all ``plan`` embeds is a few touched files (not tar shards),
    whose index would be kept as it is were they all unchanged."""
    if reusable is None or plan.by_shard or plan.removed or not plan.n_touched:
        return False
    if plan.n_touched != len(plan.to_embed) or plan.n_touched > TOUCHED_HERE_IMAGES:
        return False
    if sum(r.size for r in plan.to_embed) > TOUCHED_HERE_BYTES:
        return False
    return as_this_build_would(plan, reusable, index, plan.known_failures)


def _restamp_here(
    plan: Plan, source: Source, spec: ModelSpec, dest: Path, reusable: StoredIndex
) -> list[tuple[Path, Restamped]] | None:
    """The touched images' shards, restamped in this process, if every one of
    them has the bytes it had; else None, and nothing written is left: the
    build restamps them on its workers, beside embedding the changed ones."""
    given = _touched_input(plan, source, spec, reusable.meta.preprocess)
    staging = staging_dir(dest)
    written = list(restamp_touched(given, dest / SHARDS_DIR, staging, None))
    use, drop = claimed_once(written)
    if not drop and sum(len(one.ids) for _, one in use) == plan.n_touched:
        logger.info(
            "%s: %d touched images checked here: unchanged", dest.name, plan.n_touched
        )
        return use
    clear_shard_files(staging / TOUCHED_WORK)
    with contextlib.suppress(OSError):
        staging.rmdir()  # made for them, if it holds nothing else
    return None


def model_card(client: Client, spec: ModelSpec) -> ModelCard:
    """The dim and preprocessing that meta.json records: from a worker that
    loaded the model in set-up, else from a copy loaded here (which also
    fails fast, before any task, on a model that cannot load).

    Raises
    ------
    ModelUnavailable, WorkerEnvironmentError
    """
    from imgindex.cluster.worker import card_from_workers

    card = card_from_workers(client, spec)
    if card is None:
        logger.debug("no worker has %s loaded; loading it here", spec.name)
        card = get_model(spec.name, "cpu").card()
    return card


def _last_step(steps: Generator[None, None, BuildSummary]) -> BuildSummary:
    try:
        next(steps)
    except StopIteration as done:
        return done.value
    raise AssertionError("build_steps has two steps")


def build_steps(
    client: Client | None,
    dataset: str | Path | Source,
    out: str | Path,
    *,
    spec: ModelSpec | None = None,
    partition_size: int | None = None,
    rebuild: bool = False,
    retries: int | None = None,
    task_timeout: float | str | None = None,
    tasks_per_thread: int | None = None,
    gpu_resource: bool | None = None,
    progress: ProgressCallback | None = None,
    on_index_step: StepCallback | None = None,
    name: str | None = None,
    workers_write: bool = True,
    index: IndexRequest | None = None,
    cancel: Cancel | None = None,
    build_id: str | None = None,
    ranks: Iterator[int] | None = None,
    model: ModelCard | None = None,
    planned: PlannedBuild | None = None,
    moved: bool = False,
) -> Generator[None, None, BuildSummary]:
    """Embed ``dataset`` on ``client``'s cluster and write ``out/<name>/``, in two
    steps: the first locks the index, plans and submits every partition, then
    yields; the second collects the results, builds the index and returns the
    summary. A build of several datasets takes the first step of each before
    the second of any, so the scheduler knows the whole job from the start.
    Closing the generator between the steps cancels the submitted tasks.
    An index already current (nothing added, changed or removed: see
    :func:`pipeline.assemble.index_in_place`) is kept as it is, and the
    summary's ``kept`` says why.

    Parameters
    ----------
    client
        A connected ``distributed.Client``; how it was obtained is not our concern.
    dataset
        A folder of images (walked recursively), a file list, tar shards or
        an fsspec URL of one (:func:`pipeline.sources.parse_source`), or the
        :class:`pipeline.sources.Source` parsed already. Workers open local
        files by absolute path, so remote workers must see them at the same
        path (a shared FS); URLs they open themselves.
    out
        Root folder; the index goes to ``out/<dataset folder name>``.
    spec
        Model, device and decode settings sent to workers with every task.
    rebuild
        Ignore an existing index and its unfinished shards; embed everything.
    moved
        An index in place that names another dataset of this kind holds
        this one, moved here: its images are matched by their paths within
        the dataset, and it names this one from now on.
    gpu_resource
        Run tasks only on workers started with ``--resources GPU=1``.
    progress
        Called as ``progress(done, total, failed)`` as partitions finish.
    on_index_step
        Called as ``on_index_step(stage, done, total)`` as index tasks finish.
    name
        The index's name under ``out`` (default: the dataset folder's name).
    workers_write
        Workers write each partition's vectors as a shard beside the index
        (they must see ``out`` at the same path); False: the vectors travel
        back and the client writes the shards (and builds the index).
    index
        Which index to build and how to tune it (default: ``imgindex.index.*``).
    cancel
        Stops the build when requested from another thread: the tasks in
        flight are cancelled, the finished partitions kept for a resume.
    build_id
        Names the build's Dask span, ``("imgindex build <id>", name)``, with
        sub-spans ``embed`` and ``index``, so the dashboard's Fine
        Performance Metrics and Groups pages tell concurrent builds and
        their stages apart (default: a new random id).
    ranks
        Task priority ranks shared by the datasets of one build, so their
        partitions run in the order the datasets were started.
    model
        ``spec``'s model card, where the caller already has it (default:
        :func:`model_card`).
    planned
        The dataset planned already by :func:`plan_dataset` (its lock held);
        ``dataset``, ``out``, ``name`` and ``rebuild`` are then not read.
        Where its index is kept, ``client`` may be None.

    Returns
    -------
    BuildSummary (the generator's return value)

    Raises
    ------
    DatasetError, IndexDirError, IndexLocked, BuildFailed, BuildCancelled
    """
    cancel = cancel or Cancel()
    spec = spec or ModelSpec.from_config()
    index = index or IndexRequest.from_config()
    # 0 (auto): the dispatcher sizes tasks for the workers' devices.
    partition_size = count_or_auto(partition_size, "imgindex.partition-size")
    settings = dataclasses.replace(
        DispatchSettings.watching(seconds_value(task_timeout, "imgindex.task-timeout")),
        retries=int(config_value(retries, "imgindex.retries")),
        tasks_per_thread=int(
            config_value(tasks_per_thread, "imgindex.tasks-per-thread")
        ),
        max_queued=int(config_value(None, "imgindex.max-queued-partitions")),
        gpu_resource=bool(config_value(gpu_resource, "imgindex.gpu-resource")),
    )

    planned = planned or plan_dataset(
        dataset,
        out,
        name=name,
        spec=spec,
        rebuild=rebuild,
        index=index,
        cluster=client,
        moved=moved,
    )
    with planned:
        started, stages, plan = planned.started, planned.stages, planned.plan
        source, name, dest, reusable = (
            planned.source,
            planned.name,
            planned.dest,
            planned.reusable,
        )
        summary = BuildSummary(name=name, source=source.spec, index=str(dest))
        summary.added, summary.updated = plan.added, plan.updated
        summary.removed, summary.unchanged = plan.removed, plan.unchanged
        summary.moved_from = plan.moved_from
        if planned.kept:
            clear_staging(staging_dir(dest))  # only shards no image needs now
            yield
            return _kept(summary, plan, planned.kept, started, source)

        if client is None:
            if planned.needs_workers:
                raise BuildFailed(f"{name}: images to embed, and no cluster given")
            model = model or _index_card(plan)  # restamped while planning
        else:
            model = model or model_card(client, spec)
            summary.vectors = (
                "written by workers" if workers_write else "streamed to client"
            )
        build_span = BuildSpan(
            f"imgindex build {build_id or uuid.uuid4().hex[:6]}", name
        )
        embed_span, index_span = build_span.child("embed"), build_span.child("index")
        with stages("prepare"):
            staging = staging_dir(dest)
            if planned.rebuild:
                clear_staging(staging)
            sink = _ShardSink(plan, model, plan_dir(dest))
            tracker = _progress_of(plan, progress)
            # With a cluster after all (planning took long, or another
            # dataset needs one), its workers' model card rules: read again.
            here = planned.restamped if client is None else None
            to_embed = _restamp(
                sink, plan, source, spec, dest, client, name, tracker, here
            )
            remaining, summary.damaged_shards = _resume(
                sink, staging, spec, to_embed, dest
            )
            summary.resumed_images = sink.resumed_images
            summary.resumed_partitions = len(sink.shards) - sink.touched_shards
            # Touched, unchanged: not embedded, and counted as unchanged.
            summary.touched = sink.touched_images
            summary.updated -= summary.touched
            summary.unchanged += summary.touched
            if sink.resumed_images:
                logger.info(
                    "%s: resuming; %d images embedded before",
                    name,
                    sink.resumed_images,
                )
            tracker.failed = len(sink.failures) - len(plan.known_failures)
            resumed_bytes = 0
            if plan.by_shard:  # the tar shards resumed are read whole
                resumed_bytes = sum(r.size for r in to_embed)
                resumed_bytes -= sum(r.size for r in remaining)
            if sink.resumed_images or resumed_bytes:
                tracker.advance(sink.resumed_images, 0, resumed_bytes)

        with stages("embed"), embed_span.entered():

            def on_result(part, result) -> None:
                try:
                    if not result.shard and len(result.ids):
                        # Streamed: the client keeps the shard the worker could not.
                        result.shard = write_shard(staging, spec, part, result)
                    shard = read_shard(staging / result.shard) if result.shard else None
                except FileNotFoundError:
                    raise BuildFailed(
                        f"worker {result.worker} wrote its shard where this client "
                        f"cannot see it ({str(staging)!r} is not shared with it); "
                        "give every worker the same file system, or run the build "
                        "where the workers' files are"
                    ) from None
                except OSError as e:
                    raise IndexDirError(
                        f"could not keep finished work in {str(staging)!r}: "
                        f"{e.strerror or e}; free space there and run the same "
                        "command again: it resumes"
                    ) from None
                except (ValueError, KeyError, zipfile.BadZipFile) as e:
                    raise BuildFailed(
                        f"the shard {result.shard} from worker {result.worker} is "
                        f"unreadable here ({e}); run the same command again"
                    ) from None
                if source.by_shard:
                    tracker.advance(
                        result.n_embedded + len(result.failures),
                        len(result.failures),
                        sum(r.size for r in part),
                    )
                else:
                    tracker.advance(len(part), len(result.failures))
                sink.add(result, shard)

            if client is None and len(remaining):
                raise BuildFailed(
                    f"{len(remaining)} images changed since this build was "
                    "planned; run the same command again"
                )
            dispatcher = (
                PartitionDispatcher(
                    client,
                    name,
                    source,
                    spec,
                    settings,
                    on_result,
                    shard_dir=str(staging) if workers_write else None,
                    cancel=cancel,
                    ranks=ranks,
                )
                if client is not None
                else _NothingToDispatch()
            )
            size = dispatcher.partition_size(len(remaining), partition_size)
            partitions = source.partitions(remaining, size, dispatcher.threads())
            summary.partitions = len(partitions) + summary.resumed_partitions
            if partitions:
                staging.mkdir(parents=True, exist_ok=True)
            dispatcher.start(partitions)
        try:
            yield
        except GeneratorExit:  # another dataset's failure ended the whole build
            dispatcher.abandon()
            raise
        with stages("embed"), embed_span.entered():
            tracker.advance(0, 0)
            dispatcher.collect()

        cancel.check()
        with stages("index"), index_span.entered():
            manifest, lines, failures, failed_records = sink.finish(
                plan, client if workers_write else None, name
            )
            if plan.by_shard:  # the shards' images are known now
                summary.added, summary.updated, summary.removed = _image_changes(
                    plan, sink.found, manifest, failures
                )
            # This run's shards first: a re-embedded image's new row wins.
            candidates = ShardFiles(sink.shards + _live_shards(dest, plan))
            selection, shards, missing = select_rows(candidates, manifest)
            if missing:
                migrated = _migrate(plan, missing, staging, spec)
                more, more_used, missing = select_rows(migrated, missing)
                selection, shards = selection + more, shards + more_used
            if missing:
                raise BuildFailed(
                    f"{len(missing)} indexed images have no stored vector (e.g. "
                    f"{missing[0].path!r}); run the build again with --rebuild"
                )
            previous = plan.previous.meta if plan.previous else None
            restamped = sink.restamped
            if holds_every_vector(plan, reusable, index, manifest, failures, restamped):
                # Only times changed: the index holds every vector as it is.
                assert reusable is not None and previous is not None
                built, trained_for = kept_index(reusable, staging), previous.trained_for
                choice = built.choice
                logger.info("%s: only times changed: index file kept", name)
            else:
                choice, trained, trained_for = decide(
                    index,
                    len(manifest),
                    int(model.dim),
                    previous,
                    dest / INDEX_FILE if reusable else None,
                )
                choice, append = plan_append(
                    choice, trained, reusable, manifest, candidates, restamped
                )

                def on_step(stage: str, done: int, total: int) -> None:
                    cancel.check()
                    if on_index_step is not None:
                        on_index_step(stage, done, total)

                runner = Runner(
                    client if workers_write else None,
                    name,
                    settings.retries,
                    on_step=on_step,
                )
                with cancel.hook(runner.cancel_running):
                    try:
                        built = run_index_build(
                            runner,
                            selection,
                            int(model.dim),
                            choice,
                            staging,
                            index,
                            trained,
                            append,
                        )
                    except BaseException:
                        # Leave no index tasks on the cluster (unless it is gone).
                        with contextlib.suppress(Exception):
                            runner.cancel_running()
                        cancel.check()  # a cancelled task's error: say why it was
                        raise
            if built.count != len(manifest):
                raise BuildFailed(
                    f"the index holds {built.count} vectors for {len(manifest)} "
                    "images; run the same command again"
                )
        with stages("write"):
            now = now_stamp()
            meta = IndexMeta(
                name=name,
                **source_fields(source),
                metadata_columns=plan.metadata_columns,
                metadata_digest=plan.metadata_digest,
                model=spec.name,
                preprocess=asdict(model.preprocess),
                dim=int(model.dim),
                **built.meta_fields(trained_for),
                failed=len(failures),
                runtimes=dict(
                    Counter(previous.runtimes if previous else {}) + sink.by_runtime
                ),
                created=previous.created if previous else now,
                updated=now,
                imgindex_version=__version__,
            )
            write_index_dir(
                dest,
                built.folder,
                lines,
                meta,
                failures,
                failed_records,
                shards,
            )
            clear_staging(staging)
    summary.stage_seconds = dict(stages)
    summary.index_key = choice.key
    summary.index_reason = choice.reason
    summary.on_disk = choice.on_disk
    summary.search_params = built.search_params
    summary.quality = built.quality
    summary.copies = built.copies

    summary.indexed = built.count
    summary.embedded = sink.embedded
    summary.failed = _failure_rows(failures)
    summary.workers = dict(sink.by_worker)
    summary.runtimes = dict(sink.by_runtime)
    summary.runtime_reasons = sink.runtime_reasons
    summary.task_seconds = {
        **{k: round(v, 3) for k, v in sink.task_seconds.items()},
        **{f"index {k}": v for k, v in built.task_seconds.items()},
    }
    summary.shards = len(shards)
    summary.seconds = round(time.perf_counter() - started, 3)
    # Touched, unchanged images were read, not embedded: like the kept ones,
    # they are not part of the rate.
    attempted = tracker.total if source.by_shard else len(plan.to_embed)
    attempted -= summary.touched
    if attempted:
        summary.images_per_second = round(attempted / summary.seconds, 2)
    logger.info(
        "%s: %d indexed, %d embedded, %d failed in %.1f s (%s)",
        name,
        summary.indexed,
        sink.embedded,
        len(failures),
        summary.seconds,
        ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()),
    )
    return summary


def _restamp(
    sink: _ShardSink,
    plan: Plan,
    source: Source,
    spec: ModelSpec,
    dest: Path,
    client: Client | None,
    name: str,
    tracker: _Progress,
    here: list[tuple[Path, Restamped]] | None = None,
) -> Sequence[ImageRecord]:
    """Keep the vectors of the plan's touched images whose bytes did not
    change (:mod:`pipeline.touched`, on ``client``'s workers, or ``here``
    while planning): their shards go to ``sink`` (``tracker`` counts them
    done as they come), and the rest of ``plan.to_embed`` is what is left
    to embed."""
    if not (plan.touched or plan.touched_units):
        return plan.to_embed
    found: Iterable[tuple[Path, Restamped]] | None = here
    if found is None:
        logger.info(
            "%s: %d images have a new time but their recorded size: reading them",
            name,
            plan.n_touched,
        )
        found = restamp_touched(
            _touched_input(plan, source, spec, sink.preprocess),
            dest / SHARDS_DIR,
            staging_dir(dest),
            (str(plan_dir(dest) / LISTING), plan.token),
            client,
            label("touched", name),
        )
    written = []
    for path, one in found:
        written.append((path, one))
        tracker.advance(len(one.ids), 0, one.nbytes)
    use, drop = claimed_once(written)
    kept = [np.zeros(0, np.int64)]
    units: set[str] = set()
    for path, one in use:
        try:
            shard = read_shard(path)
            sink.add_touched(shard)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            logger.warning("ignoring shard %s (%s): embedding its images", path, e)
            drop.append((path, one))
        else:
            kept.append(one.ids)
            if plan.by_shard:
                units.update(r.path for r in shard.units)
    for _, one in drop:  # counted done as they came: embedded after all
        tracker.advance(-len(one.ids), 0, -one.nbytes)
    logger.info("%s: %d touched images kept their vectors", name, sink.touched_images)
    if plan.by_shard:
        return [r for r in plan.to_embed if r.path not in units]
    ids = np.sort(np.concatenate(kept))
    return without_ids(plan.to_embed, ids, plan_dir(dest) / REMAINING)


def _touched_input(
    plan: Plan, source: Source, spec: ModelSpec, preprocess: dict | None
) -> TouchedInput:
    """What each task of :func:`pipeline.touched.restamp_touched` reads."""
    return TouchedInput(
        tuple(plan.touched),
        source.for_tasks(),
        spec,
        preprocess,
        tuple(plan.touched_units),
    )


def _index_card(plan: Plan) -> ModelCard:
    """The model card the index in place recorded (the plan checked that its
    model is the one asked for): a build with nothing to embed has no worker
    to ask."""
    assert plan.previous is not None
    meta = plan.previous.meta
    return ModelCard(meta.model, meta.dim, Preprocess.from_json(meta.preprocess))


class _NothingToDispatch:
    """The dispatcher of a build with nothing to embed, and no cluster."""

    def partition_size(self, n_images: int, largest: int = 0) -> int:
        return 1

    def threads(self) -> int:
        return 1

    def start(self, partitions: Sequence[object]) -> None:
        assert not partitions

    def collect(self) -> int:
        return 0

    def abandon(self) -> None:
        pass


def _progress_of(plan: Plan, progress: ProgressCallback | None) -> _Progress:
    """Images done of those the plan has to embed, none yet."""
    if plan.by_shard:
        # How many images the shards hold is known as they are read: the
        # total is estimated from the bytes read so far.
        total_bytes = sum(r.size for r in plan.to_embed)
        return _Progress(progress, 0, 0, total_bytes=total_bytes)
    return _Progress(progress, len(plan.to_embed), 0)


def _resume(
    sink: _ShardSink,
    staging: Path,
    spec: ModelSpec,
    to_embed: Sequence[ImageRecord],
    dest: Path,
) -> tuple[Sequence[ImageRecord], list[str]]:
    """Take the shards an interrupted run left in ``staging`` into ``sink``:
    (what is left to embed, the names of the damaged shards skipped). The
    shards' records are let go once read (a function of its own: a build's
    generator would keep them to its end)."""
    # Read once: which records to look up depends on what they hold.
    staged = list(iter_shards(staging))
    resumed, damaged = usable_shards(staged, spec, _resumable(staged, spec, to_embed))
    del staged
    done: set[str] = set()
    for shard in resumed:
        try:
            sink.add_shard(shard)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            logger.warning("ignoring damaged shard %s (%s)", shard.path, e)
            damaged.append(shard.path)
        else:
            done.update(r.path for r in shard.units)
    return _remaining(to_embed, done, dest), [p.name for p in damaged]


def _resumable(
    staged: Sequence[Shard | tuple[Path, str]],
    spec: ModelSpec,
    to_embed: Iterable[ImageRecord],
) -> dict[str, ImageRecord]:
    """The records of ``to_embed`` that the shards ``staged`` by an
    interrupted run may hold (path -> record): those alone, not all."""
    key = spec_key(spec)
    held = {
        r.path
        for shard in staged
        if not isinstance(shard, tuple) and shard.info.get("spec") == key
        for r in shard.units
    }
    return {r.path: r for r in to_embed if r.path in held} if held else {}


def _remaining(
    to_embed: Sequence[ImageRecord], done: set[str], dest: Path
) -> Sequence[ImageRecord]:
    """``to_embed`` but the images of ``done`` (kept in parts where the
    plan's are)."""
    if not done:
        return to_embed
    if isinstance(to_embed, PartRecords):
        return to_embed.without(done, plan_dir(dest) / REMAINING)
    return [r for r in to_embed if r.path not in done]


def _image_changes(
    plan: Plan,
    found: np.ndarray,
    manifest: Iterable[ImageRecord],
    failures: Sequence[Failure],
) -> tuple[int, int, int]:
    """(added, updated, removed) images, where tar shards were read again;
    ``found`` holds the ids of the images read (ids, not paths: 8 bytes an
    image)."""
    old = np.zeros(0, np.int64)
    if plan.previous is not None:
        old = _ids(plan.previous.records(), plan.previous.failures)
    found = np.unique(found)
    again = np.isin(found, old)
    removed = np.isin(old, _ids(manifest, failures), invert=True)
    return int((~again).sum()), int(again.sum()), int(removed.sum())


def _ids(records: Iterable[ImageRecord], failures: Iterable[Failure]) -> np.ndarray:
    """The ids of ``records`` and of ``failures``' images, each once."""
    ids = itertools.chain((r.id for r in records), (image_id(f.path) for f in failures))
    return np.unique(np.fromiter(ids, np.int64))


def _failure_rows(failures: Iterable[Failure]) -> list[dict[str, str]]:
    return [{"path": f.path, "reason": f.reason} for f in failures]


def _kept(
    summary: BuildSummary, plan: Plan, reason: str, started: float, source: Source
) -> BuildSummary:
    """The summary of a build that kept the index in place as it was (but
    for the dataset's place, where it moved)."""
    assert plan.previous is not None
    meta = plan.previous.meta
    plan.previous.close()
    if plan.moved_from:
        meta = replace(meta, **source_fields(source), updated=now_stamp())
        write_meta_version(plan.previous.path, meta)
    summary.kept = reason
    summary.indexed = meta.count
    summary.failed = _failure_rows(plan.previous.failures)
    summary.shards = shard_stats(plan.previous.path / SHARDS_DIR)["count"]
    summary.index_key = meta.index_key
    summary.index_reason = meta.index_reason
    summary.on_disk, summary.copies = meta.on_disk, meta.copies
    summary.search_params, summary.quality = meta.search_params, meta.quality
    summary.seconds = round(time.perf_counter() - started, 3)
    logger.info("%s: %d indexed; index kept: %s", summary.name, meta.count, reason)
    return summary


class DatasetObserver(Protocol):
    """What follows one dataset's build: a progress bar, a progress file."""

    def update(self, done: int, total: int, failed: int) -> None: ...
    def index_step(self, stage: str, done: int, total: int) -> None: ...
    def close(self, error: str | None = None) -> None: ...


def run_builds(
    client: Client | None,
    jobs: Sequence[tuple[Path | Source, str]],
    out: str | Path,
    observe: Callable[[str], DatasetObserver],
    build_id: str | None = None,
    planned: Sequence[PlannedBuild | ImgindexError] | None = None,
    **options: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Build each ``(dataset, name)`` of ``jobs`` with :func:`build_steps`.

    Every dataset is planned and its partitions submitted first, so the
    dashboard shows the whole job; then each is collected and indexed in
    turn. One dataset failing does not stop the others: its summary is
    ``{"name", "source", "error"}`` and its one-line error is listed.
    ``observe(name)`` follows each build; ``build_id`` names the Dask spans
    of all of them (one id, so the dashboard shows them as one build);
    ``planned``, where given, is :func:`plan_datasets`'s answer for ``jobs``
    (``client`` may then be None if every index is kept); ``options`` go to
    :func:`run_build`.

    Returns
    -------
    (summaries, errors)

    Raises
    ------
    BuildCancelled
        When ``options["cancel"]`` was requested; the others' tasks are
        cancelled too.
    """
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    ranks = itertools.count(1)
    # Asked of the workers once for all datasets: each ask may wait
    # imgindex.call-timeout on a frozen worker.
    options["spec"] = options.get("spec") or ModelSpec.from_config()
    ahead: Sequence[PlannedBuild | ImgindexError | None] = planned or [None] * len(jobs)
    card_error: Exception | None = None
    if needs_cluster(ahead):
        try:
            options["model"] = model_card(client, options["spec"])
        except (ImgindexError, OSError) as e:
            card_error = e
    started: list[tuple[int, DatasetObserver, Generator]] = []

    def failed(i: int, watch: DatasetObserver, e: Exception) -> None:
        dataset, name = jobs[i]
        text = error_text(e)
        errors.append(text)
        source = dataset.spec if isinstance(dataset, Source) else str(dataset)
        results[i] = {"name": name, "source": source, "error": text}
        watch.close(error=text)

    try:
        # Every dataset's partitions are submitted before any is collected.
        for i, (dataset, name) in enumerate(jobs):
            results.append({})
            watch = observe(name)
            this = ahead[i]
            if isinstance(this, ImgindexError):
                failed(i, watch, this)
                continue
            if card_error is not None and (not this or this.needs_workers):
                if this:
                    this.close()
                failed(i, watch, card_error)
                continue
            steps = build_steps(
                client,
                dataset,
                out,
                progress=watch.update,
                on_index_step=watch.index_step,
                name=name,
                build_id=build_id,
                ranks=ranks,
                planned=this,
                **options,
            )
            try:
                next(steps)
            except BuildCancelled:
                raise
            except (ImgindexError, OSError) as e:
                failed(i, watch, e)
            else:
                started.append((i, watch, steps))
        while started:
            i, watch, steps = started[0]
            try:
                results[i] = _last_step(steps).to_json()
            except BuildCancelled:
                raise  # the caller ends the whole build, this dataset with it
            except (ImgindexError, OSError) as e:
                failed(i, watch, e)
            else:
                watch.close()
            started.pop(0)
    finally:
        for _, _, steps in started:  # interrupted: their tasks are cancelled
            steps.close()
    return results, errors


def plan_datasets(
    jobs: Sequence[tuple[Path | Source, str]], out: str | Path, **options: Any
) -> list[PlannedBuild | ImgindexError]:
    """:func:`plan_dataset` for each ``(dataset, name)``, in order: a dataset
    that cannot be built gets its one-line error in its place, for
    :func:`run_builds` to report beside the others' results.

    Raises
    ------
    IndexLocked
        If another build holds one of the indexes: the whole build is
        refused, and the locks taken already are released.
    """
    planned: list[PlannedBuild | ImgindexError] = []
    try:
        for dataset, name in jobs:
            try:
                planned.append(plan_dataset(dataset, out, name=name, **options))
            except IndexLocked:
                raise
            except ImgindexError as e:
                planned.append(e)
            except OSError as e:
                planned.append(ImgindexError(error_text(e)))
    except BaseException:
        for p in planned:
            if isinstance(p, PlannedBuild):
                p.close()
        raise
    return planned


def needs_cluster(planned: Sequence[PlannedBuild | ImgindexError | None]) -> bool:
    """Whether a dataset of ``planned`` has images to embed (or is not
    planned yet): those that keep their index, only record new times of
    files checked while planning, or cannot be built at all, need no worker."""
    return any(
        p is None or (isinstance(p, PlannedBuild) and p.needs_workers) for p in planned
    )


def no_cluster(planned: Sequence[PlannedBuild | ImgindexError]) -> dict[str, Any]:
    """``build --json``'s cluster where :func:`needs_cluster` said none was."""
    builds = [p for p in planned if isinstance(p, PlannedBuild)]
    if any(p.restamped is not None for p in builds):
        reason = (
            "none started: nothing to embed (files with only a new time were "
            "read here: the same bytes)"
        )
    elif builds:
        reason = (
            "none started: every index is current (nothing added, changed or removed)"
        )
    else:
        reason = "none started: no dataset could be built"
    return {
        "kind": "none",
        "address": "",
        "reason": reason,
        "dashboard": "",
        "workers": 0,
    }


def _live_shards(dest: Path, plan: Plan) -> list[Path]:
    """The previous index's shards that still hold a kept image's vector."""
    if plan.previous is None or not plan.kept:
        return []
    kept = np.sort(record_keys(plan.kept))
    live = []
    for shard in iter_shards(dest / SHARDS_DIR):
        if isinstance(shard, tuple):
            logger.warning("%s: dropping damaged shard %s (%s)", dest, *shard)
        elif (rows_in_sorted(kept, record_keys(shard.records)) >= 0).any():
            live.append(shard.path)
    return live


def _migrate(
    plan: Plan, missing: list[ImageRecord], staging: Path, spec: ModelSpec
) -> list[Shard]:
    """Shards for kept images that have none, from the previous index's vectors.

    Indexes written before imgindex kept shards (format 1) hold their vectors
    only in index.faiss; they are copied out once, in chunks, so that the
    index can be rebuilt from shards like any other.
    """
    if plan.previous is None:
        return []
    try:
        old = plan.previous.index
    except IndexDirError as e:
        raise BuildFailed(f"{e}") from None
    logger.info("moving %d vectors of the previous index into shards", len(missing))
    shards = []
    for i in range(0, len(missing), _MIGRATE_CHUNK):
        chunk = missing[i : i + _MIGRATE_CHUNK]
        ids = np.array([r.id for r in chunk], np.int64)
        try:
            vectors = reconstruct(old, plan.previous.copies.stored_ids(ids))
        except RuntimeError:
            return shards  # it cannot give vectors back: the rest stay missing
        shards.append(
            read_shard(write_vectors(staging, spec, chunk, vectors, "migrated"))
        )
    return shards


_MIGRATE_CHUNK = 65_536


class StageTimer(dict):
    """Seconds per stage: ``with stages("embed"): ...`` (a stage may come twice)."""

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = round(self.get(stage, 0.0) + time.perf_counter() - t, 3)


class _ShardSink:
    """What each finished partition left: its shard, failures, counts.

    Only the shards' files are held here; their vectors stay on disk until
    the index is built from them on the workers (pipeline/index_build.py),
    and the images they hold go to parts in the plan's folder as they come,
    so that the manifest is a merge of parts, never a list in the client.
    """

    def __init__(self, plan: Plan, model: ModelCard, work: Path):
        self.dim = model.dim
        # As a shard's JSON holds it (tuples become lists).
        self.preprocess = json.loads(json.dumps(asdict(model.preprocess)))
        self.failures = list(plan.known_failures)
        self.embedded = 0
        self.by_worker: Counter = Counter()
        self.by_runtime: Counter = Counter()
        self.runtime_reasons: dict[str, str] = {}
        self.task_seconds: Counter = Counter()
        self.shards: list[Path] = []  # this run's, and the resumed ones
        self.resumed_images = 0
        # Shards of touched, unchanged images, the images they hold, and
        # their record_keys: the index in place holds their vectors.
        self.touched_shards = self.touched_images = 0
        self._restamped: list[np.ndarray] = []
        self.work = work  # the plan's folder
        self._indexed = PartWriter(work / INDEXED)  # the shards' images, as rows
        # The failed images' file records, where their shards tell them.
        self._failed: dict[str, ImageRecord] = {}
        # Ids of the images read from tar shards (plan.to_embed holds the
        # shards themselves), for the summary's added/updated counts.
        self._found: list[np.ndarray] = []

    def add(self, result: PartitionResult, shard: Shard | None) -> None:
        """A finished partition; ``shard`` holds its vectors."""
        self.failures.extend(result.failures)
        if shard is not None:
            self._add_shard(shard)
        if result.n_embedded:
            self.embedded += result.n_embedded
            self.by_worker[result.worker] += result.n_embedded
            self.by_runtime[result.runtime or "torch"] += result.n_embedded
            self.runtime_reasons.setdefault(
                result.runtime or "torch", result.runtime_reason
            )
        self.task_seconds.update(result.timings)

    def add_shard(self, shard: Shard) -> None:
        """A partition finished by an earlier, interrupted run.

        Raises
        ------
        OSError, ValueError, zipfile.BadZipFile
            If its vectors are damaged (nothing was added then).
        """
        shard.arrays()  # read once, here, so a damaged one is embedded again
        self._add_shard(shard)
        self.failures.extend(shard.failures)
        self.resumed_images += len(shard.info["records"])

    def add_touched(self, shard: Shard) -> None:
        """A shard of touched, unchanged images (pipeline/touched.py): tar
        shards of it are read again, but none of their images changed."""
        self._add_shard(shard, changed=False)
        self.touched_shards += 1
        self.touched_images += len(shard.info["records"])
        indexed = set(shard.info["paths"])
        kept = (r for r in shard.records if r.path in indexed)
        self._restamped.append(record_keys(kept))

    @property
    def restamped(self) -> np.ndarray:
        """The record keys of the touched images whose vectors were kept."""
        return np.concatenate([np.zeros(0, np.int64), *self._restamped])

    def _add_shard(self, shard: Shard, changed: bool = True) -> None:
        width = shard.info.get("dim")
        if shard.info["paths"] and width is not None and width != self.dim:
            raise BuildFailed(
                f"shard {shard.path.name} from worker {shard.info['worker']} holds "
                f"{width}-d vectors, expected {self.dim}: its model differs; run "
                "`imgindex doctor`"
            )
        made_with = shard.info.get("preprocess")  # absent from older shards
        if shard.info["paths"] and made_with and made_with != self.preprocess:
            raise BuildFailed(
                f"shard {shard.path.name} from worker {shard.info['worker']} was "
                f"made with preprocessing {made_with}, expected {self.preprocess}: "
                "its copy of the model differs; install the same version of the "
                "model's package on every worker (`imgindex doctor`)"
            )
        indexed = set(shard.info["paths"])
        for record in shard.records:  # the images it covered: indexed or failed
            if record.path in indexed:
                self._indexed.add(row_of(record))
            else:
                self._failed[record.path] = record
        self.shards.append(shard.path)
        if "units" in shard.info and changed:
            ids = [image_id(p) for p, _, _ in shard.info["records"]]
            self._found.append(np.array(ids, np.int64))

    @property
    def found(self) -> np.ndarray:
        """The ids of the images this run's tar shards held (indexed or not),
        but those of touched, unchanged ones."""
        return np.concatenate([np.zeros(0, np.int64), *self._found])

    def finish(
        self, plan: Plan, cluster: Any = None, name: str = "dataset"
    ) -> tuple[PartRecords, ManifestLines, list[Failure], dict[str, ImageRecord]]:
        """(manifest in path order, as parts and as the manifest file's
        lines; failures in path order; their file records). The manifest is
        merged on ``cluster``'s workers where it is at hand."""
        seen = (str(self.work / LISTING), plan.token)
        indexed = compact_parts(
            self._indexed.close(),
            self.work / INDEXED,
            seen,
            cluster,
            label("merge", name),
        )
        given = ManifestInput(
            kept=tuple(plan.kept.parts),
            indexed=tuple(indexed),
            # A table's: its rows' other columns.
            metas=tuple(plan.to_embed.parts) if plan.metadata_columns else (),
        )
        manifest, lines = merge_manifest(
            given, self.work / MANIFEST, seen, cluster, name
        )
        failures = sorted(self.failures, key=lambda f: f.path)
        wanted = {f.path for f in failures} - self._failed.keys()
        if wanted:  # failed where no shard was written: the plan has them
            for r in itertools.chain(plan.to_embed, plan.known_records):
                if r.path in wanted:
                    self._failed[r.path] = r
        failed_records = {
            f.path: self._failed[f.path] for f in failures if f.path in self._failed
        }
        return manifest, lines, failures, failed_records


class _Progress:
    """Images done of the total, for the ``progress`` callback.

    With ``total_bytes`` (tar shards, whose images are counted as they are
    read) the total is estimated from the bytes read so far, and is exact
    once every byte is.
    """

    def __init__(
        self,
        callback: ProgressCallback | None,
        total: int,
        done: int,
        total_bytes: int = 0,
        done_bytes: int = 0,
    ):
        self.callback = callback
        self.total = total
        self.done = done
        self.failed = 0
        self.total_bytes = total_bytes
        self.done_bytes = done_bytes
        self._estimate()

    def advance(self, n: int, failed: int, nbytes: int = 0) -> None:
        self.done += n
        self.failed += failed
        self.done_bytes += nbytes
        self._estimate()
        if self.callback is not None:
            self.callback(self.done, self.total, self.failed)

    def _estimate(self) -> None:
        if self.total_bytes and self.done_bytes:
            share = min(1.0, self.done_bytes / self.total_bytes)
            self.total = max(self.done, round(self.done / share))
