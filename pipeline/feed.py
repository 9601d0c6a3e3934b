"""Decode images into batches of model input, in order, while the model runs.

A GPU runs EfficientNet-Lite0 on a batch of 128 in milliseconds; one thread
decoding JPEGs feeds it about 200 images a second (5 ms an image here). So
on a GPU worker the images of a task are decoded by a pool of threads
(Pillow releases the GIL while it decodes and resizes), straight into the
rows of a batch buffer (in pinned memory, so the copy to the GPU can
overlap), a few batches ahead of the one the model is working on. With one
decode thread the images are decoded inline, one after another, as CPU
workers have always done: there the cores already run one model each.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np

from imgindex.pipeline.discover import Failure
from imgindex.pipeline.errors import DecodeError

# decode(relpath) -> uint8 [crop, crop, 3]; raises DecodeError for a bad image.
DecodeFn = Callable[[str], np.ndarray]

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def decode_pool(n_threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``n_threads`` decode threads, made once.

    Shared by the tasks a worker runs at the same time, so two of them never
    put twice the threads on the same cores.
    """
    with _POOLS_LOCK:
        pool = _POOLS.get(n_threads)
        if pool is None:
            pool = ThreadPoolExecutor(n_threads, thread_name_prefix="imgindex-decode")
            _POOLS[n_threads] = pool
        return pool


def chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of ``size`` (the last may be shorter), taken as needed."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


@dataclass
class Batch:
    """Decoded images, in the order of their paths; bad ones left out."""

    paths: list[str]  # the good images
    # uint8 [len(paths), crop, crop, 3], a view of a buffer: a torch tensor
    # in pinned memory, else an ndarray
    pixels: object
    failures: list[Failure]
    # Seconds the consumer waited for this batch: above zero, decoding is
    # what holds the model back.
    wait_seconds: float = 0.0
    # pipeline.traits.TRAITS rows aligned with paths, where the feed measured
    # them (pipeline/batch_decode.py); else the decode function kept them.
    traits: object = None
    # Thread-seconds the feed spent on this batch, by stage, where it counts them.
    timings: dict[str, float] | None = None


@dataclass
class _Pending:
    paths: list[str]
    buffer: int
    jobs: list[Future] | None = None  # None: decoded inline when taken


class BatchFeed:
    """Yield :class:`Batch` es of ``batch_size`` images from ``paths``, in order.

    Parameters
    ----------
    paths
        Images to decode, as given to ``decode``: a sequence, or an iterable
        read a batch at a time (a tar shard's members, as its stream goes).
    decode
        Turns one path into a uint8 crop, or raises DecodeError.
    shape
        (crop, crop, 3), the shape ``decode`` returns.
    batch_size
        Images per batch (fewer where images are bad, and in the last one).
    threads
        Decode threads; 1 decodes inline in the consumer's thread.
    ahead
        Batches decoded ahead of the one handed out (threaded only).
    pin
        Allocate the buffers in pinned memory (for non-blocking copies to a GPU).
    hold
        How many handed-out batches the consumer may still be using: a
        batch's buffer is refilled only ``hold`` batches after it was handed
        out. The embedder keeps one batch on the GPU while it hands the next
        one over, hence 2.
    """

    def __init__(
        self,
        paths: Iterable[str],
        decode: DecodeFn,
        shape: tuple[int, int, int],
        batch_size: int,
        threads: int = 1,
        ahead: int = 2,
        pin: bool = False,
        hold: int = 2,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.paths = list(paths) if isinstance(paths, Sequence) else paths
        self.decode = decode
        self.batch_size = batch_size
        self.threads = max(1, int(threads))
        self.ahead = max(1, ahead) if self.threads > 1 else 0
        n_buffers = self.ahead + max(1, hold)
        rows = batch_size
        if isinstance(self.paths, list):
            rows = min(batch_size, max(1, len(self.paths)))
        if pin:
            import torch

            self._buffers = [
                torch.empty((rows, *shape), dtype=torch.uint8, pin_memory=True)
                for _ in range(n_buffers)
            ]
            self._arrays = [b.numpy() for b in self._buffers]
        else:  # plain arrays: a CPU worker running ONNX Runtime needs no torch
            self._arrays = [
                np.empty((rows, *shape), np.uint8) for _ in range(n_buffers)
            ]
            self._buffers = self._arrays

    def __iter__(self) -> Iterator[Batch]:
        chunks = chunked(self.paths, self.batch_size)
        pending: deque[_Pending] = deque()
        n_taken = 0
        try:
            while True:
                while len(pending) <= self.ahead:
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    buffer = (n_taken + len(pending)) % len(self._buffers)
                    pending.append(self._start(chunk, buffer))
                if not pending:
                    return
                yield self._take(pending.popleft())
                n_taken += 1
        finally:
            for p in pending:  # the consumer stopped early
                for job in p.jobs or ():
                    job.cancel()

    def _start(self, paths: list[str], buffer: int) -> _Pending:
        if self.threads == 1:
            return _Pending(paths, buffer)
        out = self._arrays[buffer]
        pool = decode_pool(self.threads)
        jobs = [
            pool.submit(self._decode_row, p, out, row) for row, p in enumerate(paths)
        ]
        return _Pending(paths, buffer, jobs)

    def _take(self, p: _Pending) -> Batch:
        out = self._arrays[p.buffer]
        started = time.perf_counter()
        if p.jobs is None:
            results = [
                self._decode_row(path, out, row) for row, path in enumerate(p.paths)
            ]
        else:
            results = [job.result() for job in p.jobs]
        waited = time.perf_counter() - started
        good = [row for row, failure in enumerate(results) if failure is None]
        if len(good) < len(results):
            out[: len(good)] = out[good]  # close the gaps the bad images left
        return Batch(
            paths=[p.paths[row] for row in good],
            pixels=self._buffers[p.buffer][: len(good)],
            failures=[f for f in results if f is not None],
            wait_seconds=waited if p.jobs is not None else 0.0,
        )

    def _decode_row(self, path: str, out: np.ndarray, row: int) -> Failure | None:
        try:
            out[row] = self.decode(path)
        except DecodeError as e:
            return Failure(path, e.reason)
        return None
