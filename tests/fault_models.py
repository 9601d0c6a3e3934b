"""Model plug-ins that misbehave on purpose, registered through the real loader API.

Each is a tiny 6-d model (channel means and deviations) that behaves normally
except on an all-white image, the trigger: ``test-crash`` kills the worker
process, ``test-hang`` never returns. ``test-flaky:N`` fails its first N loads
in a process's workers. Worker processes learn them through
:class:`RegisterFaultModels`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator

import torch
from distributed.diagnostics.plugin import WorkerPlugin

from imgindex.pipeline.models import LoadedModel, Preprocess, loader

_loads: Counter = Counter()


def _has_white_image(x: torch.Tensor) -> bool:
    # Input is (pixel - 127) / 128, so white is ~0.99 everywhere.
    return bool((x.flatten(1).min(dim=1).values > 0.98).any())


def _tiny(name: str, device: str, on_white) -> LoadedModel:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if _has_white_image(x):
            on_white()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)) + 1e-3], dim=1)

    return LoadedModel(name, forward, Preprocess(), device, 0)


@loader("test-crash")
def _crash(name: str, device: str) -> LoadedModel:
    return _tiny(name, device, lambda: os._exit(70))


@loader("test-hang")
def _hang(name: str, device: str) -> LoadedModel:
    return _tiny(name, device, lambda: time.sleep(3600))


@loader("test-flaky")
def _flaky(name: str, device: str) -> LoadedModel:
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:  # on the client: load normally
        return _tiny(name, device, lambda: None)
    _loads[name] += 1
    if _loads[name] <= int(name.split(":")[1]):
        raise RuntimeError(f"transient failure {_loads[name]} loading {name}")
    return _tiny(name, device, lambda: None)


class RegisterFaultModels(WorkerPlugin):
    """Unpickling this on a worker imports this module, registering the loaders."""

    idempotent = True

    def setup(self, worker) -> None:
        pass


@contextlib.contextmanager
def fault_cluster() -> Iterator:
    """A client of two worker processes of one thread each (a restart or a
    death costs one task's slot), which know these models."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.register_plugin(RegisterFaultModels(), name="fault-models")
        yield client


@loader("test-overflow")
def _overflow(name: str, device: str) -> LoadedModel:
    """A linear head whose outputs (~1e5) are finite in fp32 and inf in fp16."""
    weight = torch.full((4, 6), 4e4)
    weight[1] *= -1

    def forward(x: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)) + 1.0], dim=1)
        return torch.nn.functional.linear(feats, weight)

    return LoadedModel(name, forward, Preprocess(), device, 0)


@loader("test-oom")
def _oom(name: str, device: str) -> LoadedModel:
    """Runs out of (pretend) GPU memory on batches of more than 2 images."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError(f"batch of {x.shape[0]} does not fit")
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)) + 1e-3], dim=1)

    return LoadedModel(name, forward, Preprocess(), device, 0)
