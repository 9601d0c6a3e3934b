"""Asking a running build to stop, from another thread (the service's DELETE)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from pipeline.errors import BuildCancelled

logger = logging.getLogger(__name__)


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
