"""Turn image files into L2-normalised float32 vectors; the task run by workers."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from pipeline import __version__
from pipeline.decode import center_crop, decode_image, load_rgb
from pipeline.discover import Failure, ImageRecord, image_id
from pipeline.errors import DecodeError, WorkerEnvironmentError
from pipeline.models import LoadedModel, get_model


@dataclass(frozen=True)
class ModelSpec:
    """What client and workers must agree on; travels with every task.

    Workers never read these from their own config: a remote worker's YAML may
    differ from the client's.
    """

    name: str = "efficientnet-lite0"
    device: str = "auto"
    batch_size: int = 1
    max_pixels: int = 89_478_485
    imgindex_version: str = __version__

    @classmethod
    def from_config(
        cls,
        model: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
    ) -> ModelSpec:
        """The spec from flags, falling back to the ``imgindex`` config.

        The one place config becomes a spec: builds and searches alike (a query
        obeys the same ``max-image-pixels`` as an indexed image).
        """
        from pipeline.config import config_value

        return cls(
            name=config_value(model, "imgindex.model"),
            device=config_value(device, "imgindex.device"),
            batch_size=int(config_value(batch_size, "imgindex.batch-size")),
            max_pixels=int(config_value(None, "imgindex.max-image-pixels")),
        )


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

    def __post_init__(self) -> None:
        self.n_embedded = self.n_embedded or len(self.ids)


class Embedder:
    """A loaded model plus its preprocessing: pixels in, unit vectors out."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.model: LoadedModel = get_model(spec.name, spec.device)

    @property
    def dim(self) -> int:
        return self.model.dim

    def decode(self, path: str) -> np.ndarray:
        pre = self.model.preprocess
        return decode_image(path, pre.resize, pre.crop, self.spec.max_pixels)

    def load(self, path: str):
        """Decode only (see :func:`load_rgb`); :meth:`crop` finishes the job."""
        return load_rgb(path, self.model.preprocess.resize, self.spec.max_pixels)

    def crop(self, image) -> np.ndarray:
        pre = self.model.preprocess
        return center_crop(image, pre.resize, pre.crop)

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Embed uint8 HxWx3 crops; returns float32 [n, dim] with unit rows."""
        import torch

        if not pixels:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            out = self.model.forward(self.input_tensor(pixels))
        return normalize_rows(out.float().cpu().numpy())

    def input_tensor(self, pixels: Sequence[np.ndarray]):
        """Stack uint8 HxWx3 crops into the normalised NCHW batch the model takes."""
        import torch

        pre = self.model.preprocess
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()
        x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(
            1, 3, 1, 1
        )
        if self.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.model.device)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float32 (zero rows stay zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def embed_partition(
    root: str,
    records: Sequence[ImageRecord],
    spec: ModelSpec,
    shard_dir: str | None = None,
) -> PartitionResult:
    """Embed the images ``root/<record.path>``: the Dask task, one per partition.

    With ``shard_dir``, the vectors are written there as a shard by this
    worker and the result carries the shard's name, not the vectors.
    A bad image becomes a Failure row and never fails the task; only a broken
    model or environment (or an unwritable ``shard_dir``) raises, and is
    retried by Dask.
    """
    result = _embed(root, [r.path for r in records], spec)
    if shard_dir is not None:
        from pipeline.shards import write_shard

        result.shard = write_shard(shard_dir, spec, records, result)
        result.vectors = np.zeros((0, result.vectors.shape[1]), np.float32)
        result.ids = np.zeros(0, np.int64)
        result.paths = []
    return result


def _embed(root: str, relpaths: Sequence[str], spec: ModelSpec) -> PartitionResult:
    if spec.imgindex_version != __version__:
        # A worker that joined after the client checked the cluster.
        raise WorkerEnvironmentError(
            f"worker {_worker_address()} runs imgindex {__version__}, the client "
            f"{spec.imgindex_version}; install the same version on every worker"
        )
    embedder = Embedder(spec)
    meter = _meter()
    ids: list[int] = []
    paths: list[str] = []
    chunks: list[np.ndarray] = []
    failures: list[Failure] = []
    batch: list[np.ndarray] = []
    timings = {"decode": 0.0, "preprocess": 0.0, "model": 0.0}

    def flush() -> None:
        t = time.perf_counter()
        with meter("model"):
            chunks.append(embedder.embed_pixels(batch))
        timings["model"] += time.perf_counter() - t
        batch.clear()

    for rel in relpaths:
        t = time.perf_counter()
        try:
            with meter("decode"):
                image = embedder.load(os.path.join(root, rel))
        except DecodeError as e:
            failures.append(Failure(rel, e.reason))
            continue
        finally:
            timings["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        with meter("preprocess"):
            batch.append(embedder.crop(image))
        timings["preprocess"] += time.perf_counter() - t
        ids.append(image_id(rel))
        paths.append(rel)
        if len(batch) >= spec.batch_size:
            flush()
    if batch:
        flush()
    vectors = (
        np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float32)
    )
    return PartitionResult(
        ids=np.asarray(ids, dtype=np.int64),
        paths=paths,
        vectors=vectors,
        failures=failures,
        worker=_worker_address(),
        timings=timings,
    )


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
