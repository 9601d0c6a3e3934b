"""Asking a running build to stop, from another thread (the service's DELETE)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from imgindex.pipeline.errors import BuildCancelled

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

# Keys per cancel message: Dask's scheduler takes time quadratic in the keys of
# one cancel (distributed 2026.8.0 releases every cancelled key once per key
# cancelled): 100,000 queued partitions at once held its event loop 11.6 min.
CANCEL_BATCH = 200


class Cancel:
    """A flag a build checks between steps, and hooks that stop what it waits on.

    ``request()`` may come from any thread; the build raises
    :class:`BuildCancelled` at its next :meth:`check`. A hook (the
    dispatcher's: cancel the tasks in flight) makes that happen now rather
    than when the next partition finishes.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self) -> None:
        with self._lock:
            self._event.set()
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                hook()
            except Exception as e:  # the build still stops at its next check
                logger.warning("stopping a build's tasks failed: %s", e)

    def check(self) -> None:
        """Raise BuildCancelled if a stop was requested."""
        if self._event.is_set():
            raise BuildCancelled(
                "build cancelled; its finished partitions were kept: start it "
                "again to resume"
            )

    @contextlib.contextmanager
    def hook(self, stop: Callable[[], None]) -> Iterator[None]:
        """Call ``stop`` on a request made while the block runs."""
        with self._lock:
            self._hooks.append(stop)
            already = self._event.is_set()
        try:
            if already:
                stop()
            yield
        finally:
            with self._lock:
                self._hooks.remove(stop)


def cancel_futures(client: Client, futures: Sequence[Any]) -> None:
    """Cancel ``futures`` on the cluster, even if others want their keys, in
    batches and without a scheduler log line per key."""
    futures = list(futures)
    with _quiet_cancel(client, [f.key for f in futures]):
        for start in range(0, len(futures), CANCEL_BATCH):
            client.cancel(futures[start : start + CANCEL_BATCH], force=True)


@contextlib.contextmanager
def _quiet_cancel(client: Client, keys: list) -> Iterator[None]:
    """Spare the scheduler one INFO line per cancelled key while ``keys`` go;
    its line that counts each cancel's keys stays."""
    if not keys:
        yield
        return
    quiet = False
    with contextlib.suppress(Exception):  # a scheduler that refuses pickles
        client.run_on_scheduler(_per_key_cancel_log_fn(quiet=True))
        quiet = True
    try:
        yield
    finally:
        if quiet:
            with contextlib.suppress(Exception):
                client.run_on_scheduler(_per_key_cancel_log_fn(quiet=False), keys[-1])


# Runs on the scheduler; a closure, so that cloudpickle sends it by value (the
# scheduler need not have imgindex).
def _per_key_cancel_log_fn(quiet: bool):
    def per_key_line(record) -> bool:
        return not str(record.msg).startswith("Scheduler cancels key")

    async def toggle(last_key=None, dask_scheduler=None) -> None:
        import asyncio
        import logging
        import time

        if last_key is not None:
            # Cancels travel on the client's batched stream, which this call
            # may overtake: first let the scheduler handle the last of them.
            deadline = time.monotonic() + 60
            while last_key in dask_scheduler.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        # Counted: concurrent builds on one scheduler may cancel at once.
        log = logging.getLogger("distributed.scheduler")
        count = getattr(dask_scheduler, "_imgindex_quiet_cancels", 0)
        count = count + 1 if quiet else max(count - 1, 0)
        dask_scheduler._imgindex_quiet_cancels = count
        drop = getattr(dask_scheduler, "_imgindex_cancel_filter", None)
        if count and drop is None:
            dask_scheduler._imgindex_cancel_filter = per_key_line
            log.addFilter(per_key_line)
        elif not count and drop is not None:
            log.removeFilter(drop)
            dask_scheduler._imgindex_cancel_filter = None

    return toggle
