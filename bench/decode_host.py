"""The CPU side of a GPU worker's decoding, measured on a CPU.

    python bench/decode_host.py            # ~2 minutes on 2 cores
    python bench/decode_host.py --quick    # 300 photos, ~1 minute

A GPU decodes and prepares the JPEGs of a batch (pipeline/batch_decode.py);
what the worker's CPU must still do for each one decides how many images a
second it can feed the GPU. Measured here in process CPU time on one thread:

1. host work per JPEG (target <= 0.3 ms, so one core feeds 3,000 images/s):
   reading the file, parsing its header and EXIF, hashing its head and tail
   for the content hash and the whole of it for the digest (the reading
   threads' work), and handing its bytes
   over as a tensor, on photos of 500-1,500 px (generated as
   bench/throughput.py's are);
2. the batch path's per-image Python and dispatch work (all of it: reading,
   header, decoding, reduction, orientation, the canvas, resampling, traits),
   measured on 16-px JPEGs (reduced by 4 and turned) cut to a 3-px model
   input, so that the
   arithmetic, which a GPU does, is next to nothing;
3. the CPU path's images/s for what the batch decoder leaves to it (PNG,
   progressive JPEG), on one thread and on every core, so that its scaling
   with threads is seen (the GIL would flatten it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.throughput import (  # noqa: E402 (after the path)
    ensure_photos,
    photo_bench_args,
)

CORES = os.cpu_count() or 1
HOST_TARGET_MS = 0.3


def host_work_ms(files: list[Path], batch: int = 128) -> dict[str, float]:
    """CPU milliseconds per JPEG of each host step, one thread, a batch of
    files at a time (their buffers freed after each, as a worker's are)."""
    import torch

    from imgindex.pipeline.batch_decode import BatchDecoder
    from imgindex.pipeline.sources import as_source
    from imgindex.pipeline.traits import file_hashes_of

    decoder = BatchDecoder("cpu", threads=1)
    folder = as_source(str(files[0].parent))  # one folder holds them all
    for f in files:  # into the page cache: a worker's reads are I/O, not CPU
        f.read_bytes()
    read_step = "read + header + EXIF + file hashes"
    steps = dict.fromkeys((read_step, "hand-over"), 0.0)
    hashing = 0.0
    chunks = [files[i : i + batch] for i in range(0, len(files), batch)]
    for n, chunk in enumerate([chunks[0], *chunks]):  # the first warms up
        started = time.process_time()
        items = [decoder._read(f.name, folder, None)[0] for f in chunk]
        read = time.process_time()
        tensors = [torch.frombuffer(item.data, dtype=torch.uint8) for item in items]
        handed = time.process_time()
        for item in items:  # the hashes again, alone, to show their share
            file_hashes_of(item.data)
        hashed = time.process_time()
        assert len(tensors) == len(chunk)
        assert all(i.header is not None and i.header.plain() for i in items)
        if n:
            steps[read_step] += read - started
            steps["hand-over"] += handed - read
            hashing += hashed - handed
        del items, tensors
    per_jpeg = {k: 1000 * v / len(files) for k, v in steps.items()}
    per_jpeg["total"] = sum(per_jpeg.values())
    per_jpeg["of which file hashes"] = 1000 * hashing / len(files)
    return per_jpeg


def dispatch_ms(folder: Path, n: int, batch: int) -> float:
    """CPU milliseconds per image of the whole batch path on 16-px JPEGs."""
    import torch
    from PIL import Image

    from imgindex.pipeline.batch_decode import BatchDecoder

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"t{i:05d}.jpg"
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        exif = Image.Exif()
        exif[0x0112] = 6  # turned, as a camera held upright writes it
        Image.fromarray(pixels).save(folder / name, exif=exif)
        names.append(name)
    torch.set_num_threads(1)
    # The model's input cut to 3 px (draft mode's reduction by 4 included):
    # what is left is per-image work.
    decoder = BatchDecoder("cpu", resize=4, crop=3, threads=1)
    decoder.decode(decoder.start_reads(str(folder), names[:batch]))  # warm
    started = time.process_time()
    for i in range(0, n, batch):
        decoded = decoder.decode(decoder.start_reads(str(folder), names[i : i + batch]))
        assert decoded.n_batched == len(decoded.paths)
    return 1000 * (time.process_time() - started) / n


def cpu_path_rate(files: list[Path], threads: int) -> float:
    """Images/s of the CPU path (decode, crop, traits) on ``threads`` threads."""
    from imgindex.pipeline.decode import input_and_traits, load_rgb

    def one(path: Path):
        return input_and_traits(load_rgb(str(path)), str(path))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, files[: 2 * threads]))  # warm
        started = time.perf_counter()
        list(pool.map(one, files))
        return len(files) / (time.perf_counter() - started)


def other_kinds(files: list[Path], folder: Path) -> dict[str, list[Path]]:
    """The photos again as PNG and as progressive JPEG (made once)."""
    from PIL import Image

    made = {"png": [], "progressive jpeg": []}
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        png, prog = folder / f"{f.stem}.png", folder / f"{f.stem}.prog.jpg"
        if not (png.exists() and prog.exists()):
            with Image.open(f) as im:
                im.save(png)
                im.save(prog, progressive=True, quality=90)
        made["png"].append(png)
        made["progressive jpeg"].append(prog)
    return made


def main() -> None:
    args, n = photo_bench_args(__doc__, 1000, 300)
    photos = ensure_photos(args.data / f"host-{n}", n, 500, 1500, seed=29)
    files = sorted(photos.glob("*.jpg"))

    host = host_work_ms(files)
    print(f"host work per JPEG, one thread ({n} photos of 500-1,500 px):")
    for step, ms in host.items():
        print(f"  {step:38s} {ms:6.3f} ms")
    verdict = "met" if host["total"] <= HOST_TARGET_MS else "NOT met"
    print(
        f"  target <= {HOST_TARGET_MS} ms: {verdict} (one core feeds "
        f"{1000 / host['total']:,.0f} JPEGs/s)"
    )

    dispatch = dispatch_ms(args.data / "host-tiny", 512, 128)
    print(
        f"batch path's per-image work (16-px JPEGs, 3-px input, batches of 128): "
        f"{dispatch:.3f} ms an image, one thread"
    )

    kinds = other_kinds(files[: min(200, n)], args.data / f"host-{n}-kinds")
    fallback = {}
    for kind, paths in kinds.items():
        one = cpu_path_rate(paths, 1)
        every = cpu_path_rate(paths, CORES)
        fallback[kind] = {"1 thread": one, f"{CORES} threads": every}
        print(
            f"CPU path, {kind}: {one:.0f} images/s on one thread, {every:.0f} on "
            f"{CORES} ({every / one / CORES:.2f} of linear scaling)"
        )
    results = {
        "host_ms_per_jpeg": host,
        "host_target_met": host["total"] <= HOST_TARGET_MS,
        "dispatch_ms_per_image": dispatch,
        "cpu_path_images_per_second": fallback,
        "cores": CORES,
        "photos": n,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
