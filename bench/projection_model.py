"""A cheap 1280-d model for client-memory benchmarks, registered through the real API.

EfficientNet-Lite0 costs ~30 ms an image on these CPUs, so 50,000 images would
take half an hour of embedding that says nothing about the client's memory.
This model keeps everything else real (files, decoding, preprocessing, Dask
tasks, shards, FAISS) and replaces only the network: 8x8 average pooling of the
224x224 crop, times a fixed random 192x1280 matrix. Its vectors have the same
size and dtype as the default model's.
"""

from __future__ import annotations

import torch
from distributed.diagnostics.plugin import WorkerPlugin

from imgindex.pipeline.models import LoadedModel, Preprocess, loader

DIM = 1280


@loader("bench-projection")
def _projection(name: str, device: str) -> LoadedModel:
    weights = torch.randn(3 * 8 * 8, DIM, generator=torch.Generator().manual_seed(0))

    def forward(x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return pooled @ weights

    return LoadedModel(name, forward, Preprocess(), "cpu", DIM)


class RegisterProjectionModel(WorkerPlugin):
    """Unpickling this on a worker imports this module, registering the loader."""

    idempotent = True

    def setup(self, worker) -> None:
        pass
