"""Decode images a batch at a time on the model's device: the GPU worker's path.

A GPU runs the model on thousands of images a second, and per-image Python
work (EXIF, draft mode, cropping, the traits' small numpy calls) serialised
on the GIL cannot feed it. Here threads only read files (I/O releases the
GIL) and a JPEG's header is parsed from its bytes; the plain JPEGs of a
batch are decoded together (nvJPEG through torchvision on a GPU; OpenCV,
which decodes without the GIL, in threads elsewhere), then reduced, turned
upright, cropped and measured for their traits in a few batched torch
operations on the device (pipeline/resample.py repeats the CPU path's
steps, so both give the same model input).

What a batch decoder cannot do as the CPU path does (progressive, CMYK,
12-bit or damaged JPEGs, other formats, images over ``huge_pixels``) is
decoded by the CPU path (pipeline/decode.py) in the same threads, meanwhile.
A batch that fails is retried image by image, and an image that fails alone
goes to the CPU path too, which decodes it or says why it cannot.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from imgindex.pipeline.decode import input_and_traits, load_rgb
from imgindex.pipeline.discover import Failure
from imgindex.pipeline.errors import DecodeError
from imgindex.pipeline.feed import Batch, chunked, decode_pool
from imgindex.pipeline.jpeg import JpegHeader, read_header
from imgindex.pipeline.resample import (
    BOX,
    draft_scale,
    grey,
    reduce_blocks,
    resample_spans,
)
from imgindex.pipeline.sources import Reader, Source, as_source, read_file
from imgindex.pipeline.traits import (
    TRAITS,
    FileHashes,
    file_hashes_of,
    grey_input,
    laplacian_variance,
    traits_rows,
)

logger = logging.getLogger(__name__)

BACKENDS = ("nvjpeg", "opencv")
# Decoded pixels one call of the batch decoder may hold (~0.4 GiB of RGB).
BATCH_PIXELS = 1 << 27
# Larger JPEGs take the CPU path, whose draft mode decodes them at an eighth
# of their size: on a GPU one would hold a batch's worth of memory.
HUGE_PIXELS = 1 << 25
# Pixels of the padded canvas one resampling works on (float32: 16 bytes each
# with its intermediates), so a panorama never makes a batch's canvas huge.
CANVAS_PIXELS = 1 << 24
_THUMB = 32
_QUARTER_TURNS = {5, 6, 7, 8}


def nvjpeg_available() -> bool:
    """Whether torchvision's nvJPEG decoder can run here (a GPU, torchvision)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


@dataclass
class _Item:
    """One image on its way through :meth:`BatchDecoder.decode`."""

    rel: str
    path: str
    data: bytearray | None = None
    header: JpegHeader | None = None
    hashes: FileHashes = FileHashes()  # of the bytes read
    read_error: bool = False
    failure: str | None = None  # why it could not be read, where that is final


@dataclass
class DecodedBatch:
    """A batch's model input, on the device, in the order of its paths."""

    paths: list[str]
    pixels: torch.Tensor  # uint8 [n, crop, crop, 3]
    traits: np.ndarray  # pipeline.traits.TRAITS [n]
    failures: list[Failure]
    # Thread-seconds: reading files, decoding, and the rest (the batch's
    # resampling and traits, the CPU path's cropping and traits).
    timings: dict[str, float] = field(default_factory=dict)
    n_batched: int = 0  # images the batch decoder decoded (the rest: the CPU path)


class BatchDecoder:
    """Turns lists of image files into :class:`DecodedBatch` es on ``device``.

    Parameters
    ----------
    device
        Where pixels are decoded and prepared (the model's device).
    resize, crop, max_pixels
        As for :func:`pipeline.decode.decode_image`.
    threads
        Threads that read files and run the CPU path (and OpenCV's decoding).
    backend
        ``nvjpeg`` (a GPU) or ``opencv`` (threads, any device); None picks
        nvjpeg where it runs.
    """

    def __init__(
        self,
        device: str | torch.device,
        resize: int = 256,
        crop: int = 224,
        max_pixels: int = 89_478_485,
        threads: int = 1,
        backend: str | None = None,
        batch_pixels: int = BATCH_PIXELS,
        huge_pixels: int = HUGE_PIXELS,
    ):
        self.device = torch.device(device)
        self.resize, self.crop, self.max_pixels = resize, crop, max_pixels
        self.threads = max(1, int(threads))
        if backend is None:
            backend = (
                "nvjpeg"
                if self.device.type == "cuda" and nvjpeg_available()
                else "opencv"
            )
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown batch decoder {backend!r}; use one of {BACKENDS}"
            )
        self.backend = backend
        self.batch_pixels = batch_pixels
        self.huge_pixels = min(huge_pixels, max_pixels)
        self._timings_lock = threading.Lock()

    # Reading: threads, ahead of decoding.

    def start_reads(
        self, source: Source | str, rels: Sequence[str], reader: Reader | None = None
    ) -> list[Future]:
        """Read ``rels`` of ``source`` (a Source, or a folder) in the thread
        pool, through ``reader`` where they are not files of their own;
        :meth:`decode` takes the futures."""
        source = as_source(source)
        pool = decode_pool(self.threads)
        return [pool.submit(self._read, rel, source, reader) for rel in rels]

    def _read(
        self, rel: str, source: Source, reader: Reader | None
    ) -> tuple[_Item, float]:
        started = time.perf_counter()
        local = source.local_file(rel)
        item = _Item(rel, local or source.location(rel))
        try:
            if local is not None:
                item.data = read_file(local)
            else:
                item.data = (reader or source.reader([rel])).read(rel)
            item.header = read_header(item.data)
            item.hashes = file_hashes_of(item.data)  # here, off the batch's thread
        except OSError:
            item.data = None
            item.read_error = True  # the CPU path opens it again and says why
        except DecodeError as e:
            item.data = None
            item.read_error = True
            item.failure = e.reason  # nothing to open again: the reason stands
        return item, time.perf_counter() - started

    # Decoding.

    def decode(self, reads: Sequence[Future]) -> DecodedBatch:
        """The images read by ``reads`` (:meth:`start_reads`), decoded."""
        timings = {"read": 0.0, "decode": 0.0, "preprocess": 0.0}
        items = []
        for job in reads:
            item, seconds = job.result()
            items.append(item)
            self._add(timings, "read", seconds)
        batched = [i for i, item in enumerate(items) if self._batchable(item)]
        on_cpu = sorted(set(range(len(items))) - set(batched))
        pool = decode_pool(self.threads)
        cpu_jobs = {i: pool.submit(self._cpu_path, items[i], timings) for i in on_cpu}

        started = time.perf_counter()
        decoded = self._decode_batched([items[i] for i in batched])
        self._add(timings, "decode", time.perf_counter() - started)
        for i, image in zip(batched, decoded, strict=True):
            if image is None:  # the batch decoder refused it: the CPU path says why
                cpu_jobs[i] = pool.submit(self._cpu_path, items[i], timings)
        good = [
            (i, image)
            for i, image in zip(batched, decoded, strict=True)
            if image is not None
        ]

        started = time.perf_counter()
        pixels = torch.empty(
            (len(items), self.crop, self.crop, 3), dtype=torch.uint8, device=self.device
        )
        rows = np.zeros(len(items), TRAITS)
        on_device = [i for i, _ in good]
        if good:
            crops, gpu_rows = self._prepare(
                [image for _, image in good], [items[i] for i in on_device]
            )
            pixels.index_copy_(0, torch.tensor(on_device, device=self.device), crops)
            rows[on_device] = gpu_rows
        self._add(timings, "preprocess", time.perf_counter() - started)

        failures: list[Failure] = []
        ok = np.zeros(len(items), bool)
        ok[on_device] = True
        from_cpu, crops = [], []
        for i, job in sorted(cpu_jobs.items()):
            result = job.result()
            if isinstance(result, Failure):
                failures.append(result)
                continue
            crops.append(result[0])
            rows[i] = result[1]
            from_cpu.append(i)
        if from_cpu:  # one copy to the device
            index = torch.tensor(from_cpu, device=self.device)
            pixels.index_copy_(
                0, index, torch.from_numpy(np.stack(crops)).to(self.device)
            )
            ok[from_cpu] = True
        keep = np.flatnonzero(ok)
        if len(keep) < len(items):
            pixels = pixels[torch.from_numpy(keep).to(self.device)]
        return DecodedBatch(
            paths=[items[i].rel for i in keep],
            pixels=pixels,
            traits=rows[keep],
            failures=failures,
            timings=timings,
            n_batched=len(good),
        )

    def _batchable(self, item: _Item) -> bool:
        header = item.header
        return (
            header is not None and header.plain() and header.pixels <= self.huge_pixels
        )

    def _cpu_path(self, item: _Item, timings: dict[str, float]):
        """:func:`pipeline.decode.load_rgb` and the rest, as a CPU worker does."""
        started = time.perf_counter()
        decoded = None
        if item.failure is not None:
            return Failure(item.rel, item.failure)
        try:
            if item.data is None:
                source = item.path
            else:
                source = io.BytesIO(item.data)
                source.name = item.path
            image = load_rgb(source, self.resize, self.max_pixels)
            decoded = time.perf_counter()
            content = item.path if item.data is None else item.hashes
            return input_and_traits(image, content, self.resize, self.crop)
        except DecodeError as e:
            return Failure(item.rel, e.reason)
        finally:
            done = time.perf_counter()
            self._add(timings, "decode", (decoded or done) - started)
            self._add(timings, "preprocess", done - (decoded or done))

    def _add(self, timings: dict[str, float], key: str, seconds: float) -> None:
        with self._timings_lock:  # the CPU path's threads add theirs too
            timings[key] += seconds

    def _decode_batched(self, items: list[_Item]) -> list[torch.Tensor | None]:
        """Upright [h, w, 3] uint8 images, reduced as draft mode would, on the
        device; None for one the decoder failed on."""
        out: list[torch.Tensor | None] = []
        for group in _by_budget(
            items, lambda item: item.header.pixels, self.batch_pixels
        ):
            for item, image in zip(group, self._decode_or_split(group), strict=True):
                if image is not None:
                    h = item.header
                    image = reduce_blocks(
                        image, draft_scale(h.width, h.height, self.resize)
                    )
                    image = upright(image, h.orientation)
                out.append(image)
        return out

    def _decode_or_split(self, items: list[_Item]) -> list[torch.Tensor | None]:
        try:
            images = self._decode_jpegs([item.data for item in items])
            for item, image in zip(items, images, strict=True):
                if tuple(image.shape[:2]) != (item.header.height, item.header.width):
                    raise ValueError(f"{item.path}: decoded to {tuple(image.shape)}")
            return images
        except (RuntimeError, ValueError) as e:
            if len(items) == 1:
                logger.debug(
                    "%s: batch decoder failed (%s); CPU path", items[0].path, e
                )
                return [None]
            # One bad file must cost one image, never the batch.
            return [one for item in items for one in self._decode_or_split([item])]

    def _decode_jpegs(self, datas: list[bytearray]) -> list[torch.Tensor]:
        if self.backend == "nvjpeg":
            from torchvision.io import ImageReadMode, decode_jpeg

            tensors = [torch.frombuffer(d, dtype=torch.uint8) for d in datas]
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            return [image.permute(1, 2, 0) for image in images]
        pool = decode_pool(self.threads)
        arrays = list(pool.map(_opencv_decode, datas))
        return [torch.from_numpy(a).to(self.device, non_blocking=True) for a in arrays]

    def _prepare(
        self, images: list[torch.Tensor], items: list[_Item]
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Model inputs and traits rows of upright images of any sizes."""
        crops, thumbs, sharpness = [], [], []
        # By size, so that each padded canvas holds images of like sizes.
        order = sorted(range(len(images)), key=lambda i: images[i].shape[:2])
        sizes = [tuple(images[i].shape[:2]) for i in order]
        for lo, hi in _spans(sizes, CANVAS_PIXELS):
            c, t, s = self._prepare_canvas([images[i] for i in order[lo:hi]])
            crops.append(c)
            thumbs.append(t)
            sharpness.append(s)
        back = torch.from_numpy(np.argsort(order))
        originals = np.array([_upright_size(item.header) for item in items])
        rows = traits_rows(
            torch.cat(thumbs).cpu()[back].numpy(),
            originals,
            torch.cat(sharpness).cpu()[back].numpy(),
        )
        rows["content"] = [item.hashes.content for item in items]
        rows["digest"] = [item.hashes.digest for item in items]
        return torch.cat(crops)[back.to(self.device)], rows

    def _prepare_canvas(self, images: list[torch.Tensor]):
        heights = torch.tensor([i.shape[0] for i in images], dtype=torch.float64)
        widths = torch.tensor([i.shape[1] for i in images], dtype=torch.float64)
        canvas = torch.zeros(
            (len(images), int(heights.max()), int(widths.max()), 3),
            dtype=torch.uint8,
            device=self.device,
        )
        for n, image in enumerate(images):
            canvas[n, : image.shape[0], : image.shape[1]] = image
        # The centre square of the shorter side, scaled to `resize`, cut to
        # `crop` (pipeline.decode.center_crop), in one resampling.
        side = torch.minimum(widths, heights) * self.crop / self.resize
        left, top = (widths - side) / 2, (heights - side) / 2
        crops = resample_spans(
            canvas, heights, widths, (top, left, side, side), self.crop
        )
        zero = torch.zeros_like(widths)
        whole = (zero, zero, heights, widths)
        grey_canvas = grey(canvas)[..., None]
        thumbs = resample_spans(grey_canvas, heights, widths, whole, _THUMB, BOX)
        thumbs = thumbs[..., 0].float()
        sharpness = laplacian_variance(grey_input(crops))
        return crops, thumbs, sharpness


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[h, w, c] ``image`` turned as Pillow's ``ImageOps.exif_transpose`` turns
    an image with EXIF ``orientation``."""
    if orientation in _QUARTER_TURNS:
        image = image.transpose(0, 1)
    flips = {2: (1,), 3: (0, 1), 4: (0,), 6: (1,), 7: (0, 1), 8: (0,)}.get(orientation)
    return image.flip(flips) if flips else image


def _upright_size(header: JpegHeader) -> tuple[int, int]:
    if header.orientation in _QUARTER_TURNS:
        return header.height, header.width
    return header.width, header.height


def _opencv_decode(data: bytearray) -> np.ndarray:
    import cv2

    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise ValueError("OpenCV could not decode it")
    return image


def _by_budget(items: list, size: Callable, budget: int) -> Iterator[list]:
    """Consecutive groups of ``items`` whose sizes add up to at most ``budget``
    (an item over it goes alone)."""
    group: list = []
    total = 0
    for item in items:
        if group and total + size(item) > budget:
            yield group
            group, total = [], 0
        group.append(item)
        total += size(item)
    if group:
        yield group


def _spans(sizes: list[tuple[int, int]], budget: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive runs of images whose padded canvas (n x the
    tallest x the widest) stays within ``budget`` pixels."""
    start, tall, wide = 0, 0, 0
    for n, (h, w) in enumerate(sizes):
        tall2, wide2 = max(tall, h), max(wide, w)
        if n > start and (n - start + 1) * tall2 * wide2 > budget:
            yield start, n
            start, tall2, wide2 = n, h, w
        tall, wide = tall2, wide2
    if start < len(sizes):
        yield start, len(sizes)


class BatchDecodeFeed:
    """Yield :class:`pipeline.feed.Batch` es of ``batch_size`` images of
    ``source``'s ``rels``, in order, decoded by ``decoder`` in a thread of their
    own ``ahead`` batches ahead of the consumer: while the model runs on one
    batch the next is read, decoded and prepared (on a GPU, in a CUDA stream
    of its own)."""

    def __init__(
        self,
        decoder: BatchDecoder,
        source: Source | str,
        rels: Iterable[str],
        batch_size: int,
        ahead: int = 2,
        reader: Reader | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.decoder = decoder
        self.source, self.reader = source, reader
        # Taken a batch at a time, by the producer: ``rels`` may be a stream.
        self.chunks = chunked(rels, batch_size)
        self.ahead = max(1, ahead)

    def __iter__(self) -> Iterator[Batch]:
        import queue

        ready: queue.Queue = queue.Queue(self.ahead)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce,
            args=(ready, stop),
            name="imgindex-batch-decode",
            daemon=True,
        )
        producer.start()
        try:
            while True:
                started = time.perf_counter()
                decoded, event = ready.get()
                if decoded is _END:
                    return
                if isinstance(decoded, BaseException):
                    raise decoded
                if event is not None:  # made in the producer's stream
                    torch.cuda.current_stream(self.decoder.device).wait_event(event)
                    decoded.pixels.record_stream(
                        torch.cuda.current_stream(self.decoder.device)
                    )
                yield Batch(
                    paths=decoded.paths,
                    pixels=decoded.pixels,
                    failures=decoded.failures,
                    wait_seconds=time.perf_counter() - started,
                    traits=decoded.traits,
                    timings=decoded.timings,
                )
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting to put
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass

    def _produce(self, ready, stop: threading.Event) -> None:
        cuda = self.decoder.device.type == "cuda"
        stream = torch.cuda.Stream(self.decoder.device) if cuda else None
        try:
            reads = self._next_reads()
            while reads is not None:
                if stop.is_set():
                    return
                following = self._next_reads()
                event = None
                if stream is not None:
                    with torch.cuda.stream(stream):
                        decoded = self.decoder.decode(reads)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    decoded = self.decoder.decode(reads)
                reads = following
                _put(ready, stop, (decoded, event))
            _put(ready, stop, (_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            _put(ready, stop, (e, None))

    def _next_reads(self) -> list[Future] | None:
        """The next batch's reads, started; None after the last."""
        chunk = next(self.chunks, None)
        if chunk is None:
            return None
        return self.decoder.start_reads(self.source, chunk, self.reader)


_END = object()  # after the last batch


def _put(ready, stop: threading.Event, value) -> None:
    """Put ``value`` in the queue ``ready`` unless the consumer stops first."""
    import queue

    while not stop.is_set():
        try:
            ready.put(value, timeout=0.1)
            return
        except queue.Full:
            pass
