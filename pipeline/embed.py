"""Turn image files into L2-normalised float32 vectors; the task run by workers."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import numpy as np

from imgindex import __version__
from imgindex.pipeline.decode import decode_image, input_and_traits, load_rgb
from imgindex.pipeline.discover import Failure, ImageRecord, image_id, unpack_records
from imgindex.pipeline.errors import ConfigError, WorkerEnvironmentError
from imgindex.pipeline.feed import Batch, BatchFeed
from imgindex.pipeline.models import LoadedModel, get_model
from imgindex.pipeline.parts import PartSlice
from imgindex.pipeline.sources import (
    HandOver,
    Reader,
    ShardStream,
    Source,
    as_source,
    image_file,
)
from imgindex.pipeline.traits import TRAITS, file_hashes_of

logger = logging.getLogger(__name__)


PRECISIONS = ("fp32", "fp16", "bf16")
# pillow: an image at a time (pipeline/decode.py); batch: a batch at a time on
# the model's device (pipeline/batch_decode.py).
DECODERS = ("auto", "pillow", "batch")
# Not yet measured on a GPU (none was lent to this project so far):
# bench/gpu_throughput.py sweeps 64-512 and prints the best for docs/performance.md.
GPU_BATCH_SIZE = 128


@dataclass(frozen=True)
class ModelSpec:
    """What client and workers must agree on; travels with every task.

    Workers never read these from their own config: a remote worker's YAML may
    differ from the client's. ``batch_size`` and ``decode_threads`` of 0 and
    ``precision`` "auto" are settled by each worker for its device
    (:class:`Embedder`).
    """

    name: str = "efficientnet-lite0"
    device: str = "auto"
    batch_size: int = 0
    max_pixels: int = 89_478_485
    imgindex_version: str = __version__
    decode_threads: int = 0
    precision: str = "auto"
    runtime: str = "auto"  # pipeline/runtime.py: auto | torch | onnxruntime
    decoder: str = "auto"  # DECODERS

    @classmethod
    def from_config(
        cls,
        model: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        decode_threads: int | None = None,
        precision: str | None = None,
        runtime: str | None = None,
        decoder: str | None = None,
    ) -> ModelSpec:
        """The spec from flags, falling back to the ``imgindex`` config.

        The one place config becomes a spec: builds and searches alike (a query
        obeys the same ``max-image-pixels`` as an indexed image).

        Raises
        ------
        ConfigError
            Naming the option, for a value that is not one it takes.
        """
        from imgindex.pipeline.config import config_value, count_or_auto

        chosen = str(config_value(precision, "imgindex.precision")).lower()
        if chosen not in ("auto", *PRECISIONS):
            raise ConfigError(
                f"--precision {chosen!r} is not one of auto, {', '.join(PRECISIONS)}"
            )
        from imgindex.pipeline.runtime import RUNTIMES

        chosen_runtime = str(config_value(runtime, "imgindex.runtime")).lower()
        if chosen_runtime not in RUNTIMES:
            raise ConfigError(
                f"--runtime {chosen_runtime!r} is not one of {', '.join(RUNTIMES)}"
            )
        chosen_decoder = str(config_value(decoder, "imgindex.decoder")).lower()
        if chosen_decoder not in DECODERS:
            raise ConfigError(
                f"--decoder {chosen_decoder!r} is not one of {', '.join(DECODERS)}"
            )
        return cls(
            name=config_value(model, "imgindex.model"),
            device=config_value(device, "imgindex.device"),
            batch_size=count_or_auto(batch_size, "imgindex.batch-size"),
            max_pixels=int(config_value(None, "imgindex.max-image-pixels")),
            decode_threads=count_or_auto(decode_threads, "imgindex.decode-threads"),
            precision=chosen,
            runtime=chosen_runtime,
            decoder=chosen_decoder,
        )


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity (SLURM's
    --cpus-per-task, taskset) and cgroup quota, as Dask counts them."""
    from dask.system import CPU_COUNT

    return max(1, CPU_COUNT)


@dataclass
class PartitionResult:
    """What one task sends back: vectors of the good images, failures of the rest."""

    ids: np.ndarray  # int64 [n]
    paths: list[str]  # dataset-relative, aligned with ids
    vectors: np.ndarray  # float32 [n, d], L2-normalised
    failures: list[Failure]
    worker: str
    timings: dict[str, float] = field(default_factory=dict)
    # Set when the worker wrote the vectors to this shard file itself; then
    # ids, paths and vectors stay in the shard and only counts travel back
    # (pipeline/shards.py).
    shard: str = ""
    n_embedded: int = 0
    # pipeline.traits.TRAITS rows aligned with ids; None for vectors that
    # came from elsewhere than images (old indexes, generated ones).
    traits: np.ndarray | None = None
    runtime: str = ""  # what ran the model (pipeline/runtime.py), and why
    runtime_reason: str = ""
    # The model's preprocessing on this worker (asdict of a Preprocess): the
    # client refuses vectors of another copy of the model.
    preprocess: dict | None = None
    # The images the task found, where it was given tar shards rather than
    # images (pipeline/sources.py): each member's record.
    records: list[ImageRecord] | None = None

    def __post_init__(self) -> None:
        self.n_embedded = self.n_embedded or len(self.ids)


class Embedder:
    """A loaded model plus its preprocessing: pixels in, unit vectors out.

    Settles what the spec left to "auto" for the device the model landed on:
    on a GPU, batches of :data:`GPU_BATCH_SIZE` decoded on the GPU (files
    read by a thread per core) and fp16 autocast; on a CPU, batch 1 decoded
    inline by Pillow and fp32 (fastest there, bench/throughput.py).
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        # Where ONNX Runtime runs the cached graph, torch is not even imported.
        unloaded = _cached_runtime(spec)
        if unloaded is None:
            self.model: LoadedModel = _torch_model(spec)
        else:
            self.model = unloaded[0]
        gpu = self.model.device == "cuda"
        self.batch_size = spec.batch_size or (GPU_BATCH_SIZE if gpu else 1)
        self.decode_threads = spec.decode_threads or (usable_cores() if gpu else 1)
        if spec.decoder != "auto":
            self.decoder = spec.decoder
        else:
            self.decoder = "batch" if gpu else "pillow"
        if spec.precision != "auto":
            self.precision = spec.precision
        else:
            self.precision = "fp16" if gpu else "fp32"
        self._norm: dict[str, object] = {}
        if unloaded is None:
            self.runtime = _runtime_for(spec.runtime, self.model, self.precision)
        else:
            self.runtime = unloaded[1]

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def on_gpu(self) -> bool:
        return self.model.device == "cuda"

    def decode(self, path: str | BinaryIO) -> np.ndarray:
        pre = self.model.preprocess
        return decode_image(path, pre.resize, pre.crop, self.spec.max_pixels)

    def load(self, path: str | BinaryIO):
        """Decode only (see :func:`load_rgb`); :meth:`input_and_traits` finishes
        the job."""
        return load_rgb(path, self.model.preprocess.resize, self.spec.max_pixels)

    def batch_feed(
        self,
        source: Source | str,
        relpaths: Iterable[str],
        reader: Reader | None = None,
    ):
        """The images ``relpaths`` of ``source`` as batches decoded on the
        model's device (:class:`pipeline.batch_decode.BatchDecodeFeed`)."""
        from imgindex.pipeline.batch_decode import BatchDecodeFeed, BatchDecoder

        pre = self.model.preprocess
        decoder = BatchDecoder(
            self.model.device,
            pre.resize,
            pre.crop,
            self.spec.max_pixels,
            threads=self.decode_threads,
        )
        return BatchDecodeFeed(
            decoder, source, relpaths, self.batch_size, reader=reader
        )

    def input_and_traits(self, image, source) -> tuple[np.ndarray, np.ndarray]:
        """Finish :meth:`load`'s work: the model input and the traits row
        (:func:`pipeline.decode.input_and_traits`)."""
        pre = self.model.preprocess
        return input_and_traits(image, source, pre.resize, pre.crop)

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Embed uint8 HxWx3 crops; returns float32 [n, dim] with unit rows."""
        if not len(pixels):
            return np.zeros((0, self.dim), np.float32)
        return self.finish(self.start(np.stack(pixels)))

    def start(self, pixels) -> _InFlight:
        """Send a uint8 [n, H, W, 3] batch (array or tensor) through the model.

        On a GPU this returns as soon as the work is queued (the copy in is
        non-blocking when ``pixels`` is pinned, the copy out lands in pinned
        memory), so the caller can prepare the next batch meanwhile;
        :meth:`finish` waits for it.
        """
        if self.runtime.takes_numpy:
            return _InFlight(pixels, self.runtime.forward(self.input_array(pixels)))
        import torch

        with torch.inference_mode():
            try:
                out = self._forward(pixels, self.precision)
            except torch.OutOfMemoryError:
                if len(pixels) < 2:
                    raise
                return self._in_halves(pixels)
            if not self.on_gpu:
                return _InFlight(pixels, out)
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return _InFlight(pixels, host, done)

    def _in_halves(self, pixels) -> _InFlight:
        """A batch too big for the GPU's free memory, run as two (and so on)."""
        import torch

        if self.on_gpu:
            torch.cuda.empty_cache()
        logger.warning(
            "%s: out of GPU memory on a batch of %d; running it in halves (a "
            "smaller --batch-size avoids the retry)",
            self.model.name,
            len(pixels),
        )
        half = len(pixels) // 2
        parts = [self.finish(self.start(p)) for p in (pixels[:half], pixels[half:])]
        return _InFlight(pixels, torch.from_numpy(np.concatenate(parts)))

    def finish(self, flight: _InFlight) -> np.ndarray:
        """The unit vectors of a batch passed to :meth:`start`."""
        if flight.done is not None:
            flight.done.synchronize()
        vectors = flight.output
        if not isinstance(vectors, np.ndarray):
            vectors = vectors.numpy()
        if self.precision != "fp32" and not np.isfinite(vectors).all():
            # fp16 overflowed somewhere in the network: this batch again in fp32.
            logger.warning(
                "%s: %s gave non-finite values; batch recomputed in fp32",
                self.model.name,
                self.precision,
            )
            import torch

            with torch.inference_mode():
                vectors = self._forward(flight.pixels, "fp32").cpu().numpy()
        return normalize_rows(vectors)

    def _forward(self, pixels, precision: str):
        import torch

        x = self.input_tensor(pixels)
        if precision == "fp32":
            return self.runtime.forward(x).float()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        with torch.autocast(self.model.device, dtype=dtype):
            return self.model.forward(x).float()

    def input_tensor(self, pixels):
        """The normalised NCHW batch the model takes, on its device, from uint8
        HxWx3 crops (a sequence, or a [n, H, W, 3] tensor, pinned or not)."""
        import torch

        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        elif not isinstance(pixels, torch.Tensor):
            pixels = torch.from_numpy(np.stack(pixels))
        # Scaled on the device: a quarter of the bytes cross the bus as uint8.
        x = pixels.to(self.model.device, non_blocking=True).permute(0, 3, 1, 2).float()
        mean, std = self._mean_std()
        x = (x - mean) / std
        if self.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def input_array(self, pixels) -> np.ndarray:
        """:meth:`input_tensor` for ONNX Runtime, in numpy: normalised float32
        NCHW, C-contiguous, in one pass over the uint8 crops."""
        if not isinstance(pixels, np.ndarray):
            pixels = pixels.numpy() if hasattr(pixels, "numpy") else np.stack(pixels)
        pre = self.model.preprocess
        shift = -np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
        scale = 1 / np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
        n, h, w, _ = pixels.shape
        x = np.empty((n, 3, h, w), np.float32)
        np.add(pixels.transpose(0, 3, 1, 2), shift, out=x)
        x *= scale
        return x

    def _mean_std(self):
        import torch

        if not self._norm:
            pre = self.model.preprocess
            for key, values in (("mean", pre.mean), ("std", pre.std)):
                self._norm[key] = (
                    torch.tensor(values).view(1, 3, 1, 1).to(self.model.device)
                )
        return self._norm["mean"], self._norm["std"]


_RUNTIMES: dict[tuple, object] = {}
_RUNTIMES_LOCK = threading.Lock()
_MODEL_THREADS: int | None = None


def set_model_threads(n: int) -> None:
    """Threads of one forward pass in this process (a worker's share of the
    cores), for whichever runtime runs it: torch now if it is imported, and
    when it is, if ever."""
    global _MODEL_THREADS
    _MODEL_THREADS = max(1, int(n))
    # Where another thread is still importing torch, its set_num_threads may
    # not exist yet: the count is then applied as the model loads.
    set_threads = getattr(sys.modules.get("torch"), "set_num_threads", None)
    if set_threads is not None:
        set_threads(_MODEL_THREADS)


def model_threads() -> int:
    """Threads of one forward pass here: as set, else as torch counts them
    (OMP_NUM_THREADS first), whether or not torch is imported."""
    if _MODEL_THREADS is not None:
        return _MODEL_THREADS
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        pass
    get_threads = getattr(sys.modules.get("torch"), "get_num_threads", None)
    if get_threads is not None:  # (absent while another thread imports torch)
        return get_threads()
    return usable_cores()


def _torch_model(spec: ModelSpec) -> LoadedModel:
    model = get_model(spec.name, spec.device)
    if _MODEL_THREADS is not None:
        set_model_threads(_MODEL_THREADS)  # torch is imported now
    return model


def _cached_runtime(spec: ModelSpec):
    """(model, runtime) of ONNX Runtime on the cached graph, made once per
    process; None where it does not apply (see
    :func:`pipeline.runtime.cached_onnx_runtime`)."""
    from imgindex.pipeline.models import remember_card
    from imgindex.pipeline.runtime import cached_onnx_runtime

    threads = model_threads()
    key = ("cached", spec.runtime, spec.name, spec.device, spec.precision, threads)
    with _RUNTIMES_LOCK:
        if key not in _RUNTIMES:
            found = cached_onnx_runtime(
                spec.runtime, spec.name, spec.device, spec.precision, threads
            )
            if found is not None:
                remember_card(found[0].card())
                logger.info(
                    "%s runs with onnxruntime, torch not loaded (%s)",
                    spec.name,
                    found[1].reason,
                )
            _RUNTIMES[key] = found
        return _RUNTIMES[key]


def runs_from_cache(spec: ModelSpec) -> bool:
    """Whether an Embedder of ``spec`` would run ONNX Runtime on the cached
    graph here: no torch to import, no graph to export, no timing."""
    from imgindex.pipeline.runtime import runs_from_cache as cached

    return cached(spec.runtime, spec.name, spec.device, spec.precision, model_threads())


def _runtime_for(wanted: str, model: LoadedModel, precision: str):
    """The runtime for ``model``, chosen once per process (``auto`` times both)."""
    from imgindex.pipeline.runtime import choose_runtime

    threads = model_threads()
    key = (wanted, model.name, model.device, precision, threads)
    with _RUNTIMES_LOCK:
        if key not in _RUNTIMES:
            chosen = choose_runtime(wanted, model, precision, threads)
            log = logger.warning if "not installed" in chosen.reason else logger.info
            log("%s runs with %s (%s)", model.name, chosen.name, chosen.reason)
            _RUNTIMES[key] = chosen
        return _RUNTIMES[key]


@dataclass
class _InFlight:
    """A batch on its way through the model (see :meth:`Embedder.start`)."""

    pixels: object  # the input, kept for a recomputation in fp32
    output: object  # float32 [n, dim], on the host once ``done``
    done: object = None  # a CUDA event; None on CPU (already done)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float32 (zero rows stay zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def embed_partition(
    source: Source | str,
    records: Sequence[ImageRecord] | PartSlice | bytes,
    spec: ModelSpec,
    shard_dir: str | None = None,
) -> PartitionResult:
    """Embed the images ``records`` of ``source`` (a
    :class:`pipeline.sources.Source`, or a folder's absolute path): the Dask
    task, one per partition.

    ``records`` may come packed (:func:`pipeline.discover.pack_records`), or
    as a slice of the plan's parts that this worker reads
    (:class:`pipeline.parts.PartSlice`).
    With ``shard_dir``, the vectors are written there as a shard by this
    worker and the result carries the shard's name, not the vectors.
    A bad image becomes a Failure row and never fails the task; only a broken
    model or environment (or an unwritable ``shard_dir``) raises, and is
    retried by Dask.
    """
    if isinstance(records, bytes):
        records = unpack_records(records)
    elif isinstance(records, PartSlice):
        try:
            records = records.records()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"this worker cannot see the build's plan ({records.file}): give "
                "every worker the file system of the index's folder"
            ) from None
    result = _embed(source, records, spec)
    if shard_dir is not None:
        from imgindex.pipeline.shards import write_shard

        result.shard = write_shard(shard_dir, spec, records, result)
        result.records = None
        result.vectors = np.zeros((0, result.vectors.shape[1]), np.float32)
        result.ids = np.zeros(0, np.int64)
        result.paths = []
        result.traits = None
    return result


def _embed(
    source: Source | str, records: Sequence[ImageRecord], spec: ModelSpec
) -> PartitionResult:
    source = as_source(source)
    if spec.imgindex_version != __version__:
        # A worker that joined after the client checked the cluster.
        raise WorkerEnvironmentError(
            f"worker {_worker_address()} runs imgindex {__version__}, the client "
            f"{spec.imgindex_version}; install the same version on every worker"
        )
    embedder = Embedder(spec)
    meter = _meter()
    timings = {"decode": 0.0, "preprocess": 0.0, "model": 0.0}
    timings_lock = threading.Lock()
    traits: dict[str, np.ndarray] = {}
    stream = None
    if source.by_shard:
        # Tar shards: their members are found as each is read, in one pass.
        stream = ShardStream(source, records)
        reader: Reader = HandOver()
        relpaths: Iterable[str] = reader.paths(stream)
    else:
        relpaths = [r.path for r in records]
        reader = source.reader(relpaths)

    def decode(rel: str) -> np.ndarray:
        # Dask's meters see only the task's own thread (one decode thread);
        # from a pool, the wait for each batch is metered instead (_metered).
        t0 = time.perf_counter()
        t1 = None
        try:
            with meter("decode"):
                opened = image_file(source, rel, reader)
                image = embedder.load(opened)
                # A file's hash is taken from it; read bytes' from them.
                content = (
                    opened
                    if isinstance(opened, str)
                    else file_hashes_of(opened.getbuffer())
                )
            t1 = time.perf_counter()
            with meter("preprocess"):
                pixels, row = embedder.input_and_traits(image, content)
            with timings_lock:
                traits[rel] = row
        finally:
            t2 = time.perf_counter()
            with timings_lock:
                timings["decode"] += (t1 or t2) - t0
                timings["preprocess"] += t2 - (t1 or t2)
        return pixels

    crop = embedder.model.preprocess.crop
    if embedder.decoder == "batch":
        feed = embedder.batch_feed(source, relpaths, reader)
    else:
        feed = BatchFeed(
            relpaths,
            decode,
            (crop, crop, 3),
            embedder.batch_size,
            threads=embedder.decode_threads,
            pin=embedder.on_gpu,
        )
    paths: list[str] = []
    chunks: list[np.ndarray] = []
    failures: list[Failure] = []
    waited = 0.0
    # One batch stays in flight while the next is handed to the model, so a
    # GPU always has queued work (the feed keeps two batches' buffers for it).
    flight = None
    with reader:
        for batch in _metered(feed, meter):
            waited += batch.wait_seconds
            failures.extend(batch.failures)
            if batch.traits is not None:
                traits.update(zip(batch.paths, batch.traits, strict=True))
            for stage, seconds in (batch.timings or {}).items():
                timings[stage] = timings.get(stage, 0.0) + seconds
            t = time.perf_counter()
            with meter("model"):
                started = embedder.start(batch.pixels) if batch.paths else None
                if flight is not None:
                    chunks.append(embedder.finish(flight))
            timings["model"] += time.perf_counter() - t
            flight = started
            paths.extend(batch.paths)
    if flight is not None:
        t = time.perf_counter()
        with meter("model"):
            chunks.append(embedder.finish(flight))
        timings["model"] += time.perf_counter() - t
    if embedder.decode_threads > 1 or embedder.decoder == "batch":
        # Thread-seconds in the pool; "decode-wait" is what the model lost to them.
        timings["decode-wait"] = waited
    vectors = (
        np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float32)
    )
    if stream is not None:
        failures.extend(stream.failures)
    return PartitionResult(
        ids=np.asarray([image_id(rel) for rel in paths], dtype=np.int64),
        paths=paths,
        vectors=vectors,
        failures=failures,
        worker=_worker_address(),
        timings=timings,
        traits=np.array([traits[rel] for rel in paths], dtype=TRAITS),
        runtime=embedder.runtime.name,
        runtime_reason=embedder.runtime.reason,
        preprocess=asdict(embedder.model.preprocess),
        records=stream.records if stream is not None else None,
    )


def _metered(feed: BatchFeed, meter) -> Iterator[Batch]:
    """The feed's batches, the time spent waiting for each metered as decode."""
    batches = iter(feed)
    while True:
        with meter("decode"):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _meter():
    """Dask's fine-performance-metrics meter, so the dashboard splits decode/model."""
    try:
        from distributed.metrics import context_meter
    except ImportError:  # plain process without distributed
        return lambda label: nullcontext()
    return lambda label: context_meter.meter(label)


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "client"
