"""A call run on a thread of its own while the caller does something else."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """``fn(*args, **kwargs)`` on a daemon thread, started at once.

    A daemon, unlike a ``ThreadPoolExecutor``'s worker: an interrupted build
    exits at once rather than waiting for a discovery of millions of files
    that nobody will read.
    """

    def __init__(self, fn: Callable[..., T], *args: Any, **kwargs: Any):
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn(*args, **kwargs)
            except BaseException as e:  # handed to whoever waits for it
                self._error = e
            finally:
                self._done.set()

        threading.Thread(
            target=run, name=f"background {fn.__name__}", daemon=True
        ).start()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> T:
        """Its value, once it has one (its exception raised here).

        Raises
        ------
        TimeoutError
            If it is still running after ``timeout`` seconds.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
