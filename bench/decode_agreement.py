"""The batch decoder against the CPU path on one device: same input, and how fast.

    python bench/decode_agreement.py --device cuda    # nvJPEG, on a GPU machine
    python bench/decode_agreement.py --device cpu     # OpenCV in threads, anywhere

1. Agreement, on photos of every kind (pipeline.synthetic.write_kinds): the
   lowest cosine between the two paths' vectors (target >= 0.995, the model
   on ``--device``), the largest perceptual-hash distance, and whether the
   file hashes (content sample and whole-file digest) and sizes are equal;
   which images each path decoded.
2. Speed, on ``--images`` JPEGs of 500-1,500 px: images/s of the batch
   decoder (read, decode, reduce, crop, traits) with one thread a core, in
   batches of ``--batch``, against the CPU path on the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

CORES = len(os.sched_getaffinity(0))
# Issue 29: the batch decoder's vectors against the CPU path's, at the least.
LOWEST_COSINE = 0.995


def summary(agreement: dict) -> str:
    """:func:`compare_paths`' figures in a sentence (bench/gpu_report.py's too)."""
    a = agreement
    return (
        f"lowest cosine {a['lowest_cosine']:.4f} (target >= {LOWEST_COSINE}) over "
        f"{len(a['cosine'])} photos of every kind, {a['batch_decoded']} of them "
        f"batch-decoded; hashes within {a['largest_hash_distance']} bits; file "
        f"hashes and size equal: {a['file_hashes_and_size_equal']}"
    )


def compare_paths(folder: Path, names: list[str], device: str) -> dict:
    """How far the batch decoder's input and traits land from the CPU path's."""
    from imgindex.pipeline.batch_decode import BatchDecoder
    from imgindex.pipeline.decode import input_and_traits, load_rgb
    from imgindex.pipeline.embed import Embedder, ModelSpec
    from imgindex.pipeline.traits import hash_distance

    decoder = BatchDecoder(device, threads=CORES)
    batch = decoder.decode(decoder.start_reads(str(folder), names))
    assert batch.paths == names, batch.failures
    cpu = [input_and_traits(load_rgb(str(folder / n)), str(folder / n)) for n in names]
    embedder = Embedder(ModelSpec(device=device, precision="fp32", runtime="torch"))
    ours = embedder.embed_pixels(batch.pixels)
    theirs = embedder.embed_pixels(np.stack([c[0] for c in cpu]))
    cosine = (ours * theirs).sum(axis=1)
    traits = np.stack([c[1] for c in cpu])
    return {
        "backend": decoder.backend,
        "lowest_cosine": float(cosine.min()),
        "cosine": dict(zip(names, np.round(cosine, 5).tolist(), strict=True)),
        "batch_decoded": batch.n_batched,
        "largest_hash_distance": int(hash_distance(batch.traits, traits).max()),
        "file_hashes_and_size_equal": all(
            np.array_equal(batch.traits[f], traits[f])
            for f in ("content", "digest", "width", "height")
        ),
    }


def speeds(folder: Path, device: str, batch: int) -> dict[str, float]:
    """Images/s of the batch decoder and of the CPU path on ``folder``'s JPEGs."""
    from imgindex.pipeline.batch_decode import BatchDecoder
    from imgindex.pipeline.decode import input_and_traits, load_rgb

    names = sorted(p.name for p in folder.glob("*.jpg"))
    for name in names:  # the page cache, for both
        (folder / name).read_bytes()
    decoder = BatchDecoder(device, threads=CORES)
    decoder.decode(decoder.start_reads(str(folder), names[:batch]))  # warm
    sync = _sync(device)
    started = time.perf_counter()
    reads = decoder.start_reads(str(folder), names[:batch])
    for i in range(0, len(names), batch):
        following = decoder.start_reads(str(folder), names[i + batch : i + 2 * batch])
        decoder.decode(reads)
        reads = following
    sync()
    batched = len(names) / (time.perf_counter() - started)

    def one(name: str):
        path = str(folder / name)
        return input_and_traits(load_rgb(path), path)

    with ThreadPoolExecutor(CORES) as pool:
        started = time.perf_counter()
        list(pool.map(one, names))
        cpu = len(names) / (time.perf_counter() - started)
    return {"batch decoder": batched, "cpu path": cpu}


def _sync(device: str):
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def main() -> None:
    from bench.gpu_throughput import ensure_photos
    from imgindex.pipeline.synthetic import write_kinds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    scratch = Path(tempfile.gettempdir()) / "imgindex-decode-agreement"
    parser.add_argument("--work", type=Path, default=scratch)
    parser.add_argument("--report", type=Path, default=Path("decode_agreement.json"))
    args = parser.parse_args()

    kinds = write_kinds(args.work / "kinds")
    agreement = compare_paths(args.work / "kinds", sorted(kinds), args.device)
    print(f"{args.device} ({agreement['backend']}): {summary(agreement)}")
    photos = args.work / f"photos-{args.images}"
    ensure_photos(photos, args.images, 500, 1500)
    rates = speeds(photos, args.device, args.batch)
    print(
        f"{args.images} JPEGs of 500-1,500 px, {CORES} threads: batch decoder "
        f"{rates['batch decoder']:.0f} images/s, CPU path {rates['cpu path']:.0f}"
    )
    report = {"device": args.device, "cores": CORES, **agreement, "speeds": rates}
    args.report.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
