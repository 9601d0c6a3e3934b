"""Per-worker set-up: malloc tuning, torch threads, and the model loaded once."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.embed import Embedder, ModelSpec
from pipeline.errors import ModelUnavailable, WorkerEnvironmentError
from pipeline.models import ModelCard, get_model, loaded_card

logger = logging.getLogger(__name__)

PLUGIN_NAME = "imgindex-worker-setup"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Undo the Nanny's MALLOC_TRIM_THRESHOLD_=65536 for this process.

    That setting freezes glibc's mmap threshold, so every large tensor is
    mmapped, freed, trimmed and faulted in again: torch inference ran ~3x
    slower inside Dask workers (DASK-NOTES.md, finding 1). mallopt works
    however the worker was started, unlike the YAML environment setting.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to undo
        return False
    ok = libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    ok &= libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    return bool(ok)


class WorkerSetup(WorkerPlugin):
    """Runs on every worker, including ones that join or restart later."""

    idempotent = True

    def __init__(self, spec: ModelSpec, torch_threads: int = 1):
        self.spec = spec
        self.torch_threads = torch_threads

    def setup(self, worker: Any) -> None:
        import torch

        tune_malloc()
        # Threads per worker x torch threads must not exceed the cores.
        torch.set_num_threads(max(1, self.torch_threads))
        try:
            get_model(self.spec.name, self.spec.device)
            # Settles the runtime now (with --runtime auto, both are timed),
            # not in the first task.
            runtime = Embedder(self.spec).runtime
        except ModelUnavailable as e:
            raise ModelUnavailable(f"worker {worker.address}: {e}") from None
        logger.info(
            "imgindex: %s loaded on %s, run by %s (%s)",
            self.spec.name,
            worker.address,
            runtime.name,
            runtime.reason,
        )


def setup_workers(
    client: Any, spec: ModelSpec, torch_threads: int | None = None
) -> None:
    """Check the workers' environments, then set up every current and future worker.

    Raises
    ------
    WorkerEnvironmentError
        If a worker lacks imgindex or runs incompatible package versions.
    """
    from cluster.calls import register_worker_plugin
    from cluster.environment import ensure_compatible
    from pipeline.config import config_value

    ensure_compatible(client)
    threads = int(config_value(torch_threads, "imgindex.torch-threads"))
    name = f"{PLUGIN_NAME}-{spec.name}-{spec.device}"
    if not register_worker_plugin(client, WorkerSetup(spec, threads), name):
        logger.warning(
            "not every worker confirmed its set-up in time; tasks load the model "
            "on first use there"
        )


def card_from_workers(client: Any, spec: ModelSpec) -> ModelCard | None:
    """The model's dim and preprocessing from the workers that loaded it in
    set-up, so that the client need not load (and import torch for) its own
    copy; None where no worker has it loaded yet.

    Raises
    ------
    WorkerEnvironmentError
        If workers loaded the same model name with different dims or
        preprocessing (different versions of its package).
    """
    from cluster.calls import run_on_each

    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    # A frozen worker is not waited on for longer than imgindex.call-timeout.
    answers = run_on_each(client, loaded_card, workers, args=(spec.name,))
    cards = {
        address: card
        for address, card in answers.items()
        if isinstance(card, ModelCard)
    }
    if len(set(cards.values())) > 1:
        shown = "; ".join(f"{a}: {c.dim}-d, {c.preprocess}" for a, c in cards.items())
        raise WorkerEnvironmentError(
            f"workers disagree about model {spec.name!r} ({shown}); install the "
            "same version of its package everywhere"
        )
    return next(iter(cards.values()), None)
