"""Per-worker set-up: malloc tuning, torch threads, and the model loaded once."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from imgindex.pipeline.embed import Embedder, ModelSpec, set_model_threads
from imgindex.pipeline.errors import ModelUnavailable, WorkerEnvironmentError
from imgindex.pipeline.models import ModelCard, loaded_card

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


# Each set-up's model load on this worker, by spec: a task or a question
# that arrives meanwhile waits for it (the model is never loaded twice).
_LOADS: dict[ModelSpec, Future] = {}
_LOADS_LOCK = threading.Lock()


class WorkerSetup(WorkerPlugin):
    """Runs on every worker, including ones that join or restart later."""

    idempotent = True

    def __init__(self, spec: ModelSpec, torch_threads: int = 1):
        self.spec = spec
        self.torch_threads = torch_threads

    def setup(self, worker: Any) -> None:
        tune_malloc()
        # Threads per worker x model threads must not exceed the cores.
        set_model_threads(self.torch_threads)
        # The load runs on a thread of its own, so that registering the plugin
        # does not wait for the slowest worker's load: the client sends tasks
        # as soon as one worker has the model (card_from_workers).
        with _LOADS_LOCK:
            before = _LOADS.get(self.spec)
            # Running, or done well: not again (a failed one is tried again).
            if before is not None and not (before.done() and before.exception()):
                return
            loaded: Future = Future()
            _LOADS[self.spec] = loaded
        threading.Thread(
            target=self._load,
            args=(worker.address, loaded),
            name="imgindex model load",
            daemon=True,
        ).start()

    def _load(self, address: str, loaded: Future) -> None:
        try:
            # Loads the model and settles the runtime now (with --runtime
            # auto, both may be timed), not in the first task.
            runtime = Embedder(self.spec).runtime
        except ModelUnavailable as e:
            loaded.set_exception(ModelUnavailable(f"worker {address}: {e}"))
            return
        except Exception as e:  # handed to whoever asks for the card
            loaded.set_exception(e)
            return
        logger.info(
            "imgindex: %s loaded on %s, run by %s (%s)",
            self.spec.name,
            address,
            runtime.name,
            runtime.reason,
        )
        loaded.set_result(loaded_card(self.spec.name))


async def card_when_loaded(spec: ModelSpec, seconds: float) -> ModelCard | None | bool:
    """This worker's card of ``spec``'s model once its set-up has loaded it
    (the load's error raised here), or None if that takes over ``seconds``;
    without a set-up, the card of a model loaded otherwise, or False: none
    is coming, and asking again is no use. Runs in the worker's event loop:
    it polls the load, never blocks on it."""
    loading = _LOADS.get(spec)
    if loading is None:
        return loaded_card(spec.name) or False
    deadline = time.monotonic() + seconds
    while not loading.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return loading.result() if loading.done() else None


# How long each worker is asked to wait for its load, per round of asking:
# the client learns of the first card at most this late.
CARD_ROUND_SECONDS = 0.1
# ... and how much longer it may take to answer (a worker's event loop shares
# the GIL with its model load) before it counts as frozen.
CARD_ROUND_GRACE = 5.0


def setup_workers(
    client: Any,
    spec: ModelSpec,
    torch_threads: int | None = None,
    wait_for_models: bool = False,
) -> None:
    """Check the workers' environments, then set up every current and future
    worker; with ``wait_for_models``, return once each current one has loaded
    the model (a benchmark's steady state starts there), not at once.

    Raises
    ------
    WorkerEnvironmentError
        If a worker lacks imgindex or runs incompatible package versions.
    """
    from imgindex.cluster.calls import register_worker_plugin
    from imgindex.cluster.environment import ensure_compatible
    from imgindex.pipeline.config import config_value

    ensure_compatible(client)
    threads = int(config_value(torch_threads, "imgindex.torch-threads"))
    name = f"{PLUGIN_NAME}-{spec.name}-{spec.device}"
    # Each worker starts loading the model and answers at once; the loads go
    # on while the client checks the workers' file system and plans.
    if not register_worker_plugin(client, WorkerSetup(spec, threads), name):
        logger.warning(
            "not every worker started its set-up in time; tasks load the model "
            "on first use there"
        )
    if wait_for_models:
        from imgindex.cluster.calls import call_timeout, run_on_each

        workers = list(client.scheduler_info(n_workers=-1)["workers"])
        # Each answers before the client's deadline: none is cancelled.
        wait = 0.9 * call_timeout()
        run_on_each(client, card_when_loaded, workers, args=(spec, wait))


def card_from_workers(client: Any, spec: ModelSpec) -> ModelCard | None:
    """The model's dim and preprocessing from the first workers whose set-up
    has loaded it, so that the client need not load (and import torch for)
    its own copy, nor wait for the slowest worker; None where no worker has
    it within ``imgindex.call-timeout``.

    Raises
    ------
    ModelUnavailable
        If no worker could load the model (the first worker's reason).
    WorkerEnvironmentError
        If workers that have loaded it by then disagree about its dim or
        preprocessing (different versions of its package). One that loads
        another copy later is refused by the build, at its first shard.
    """
    from imgindex.cluster.calls import call_timeout, run_on_each

    asking = list(client.scheduler_info(n_workers=-1)["workers"])
    deadline = time.monotonic() + call_timeout()
    failed: list[ModelUnavailable] = []
    # Rounds in which each worker answers within CARD_ROUND_SECONDS (a call
    # the client gave up on would be cancelled mid-way on the scheduler,
    # which logs that as an error); one that does not answer at all, frozen
    # or gone, or that is not loading the model (no set-up), is not asked
    # again.
    while True:
        answers = run_on_each(
            client,
            card_when_loaded,
            asking,
            timeout=CARD_ROUND_SECONDS + CARD_ROUND_GRACE,
            args=(spec, CARD_ROUND_SECONDS),
        )
        cards = {a: card for a, card in answers.items() if _is_card(card)}
        if cards:
            break
        failed += [a for a in answers.values() if isinstance(a, ModelUnavailable)]
        asking = [a for a, answer in answers.items() if answer is None]
        if not asking or time.monotonic() > deadline:
            if failed:
                raise failed[0]
            return None
    if len(set(cards.values())) > 1:
        shown = "; ".join(f"{a}: {c.dim}-d, {c.preprocess}" for a, c in cards.items())
        raise WorkerEnvironmentError(
            f"workers disagree about model {spec.name!r} ({shown}); install the "
            "same version of its package everywhere"
        )
    return next(iter(cards.values()))


def _is_card(answer: Any) -> bool:
    return isinstance(answer, ModelCard)
