"""Would a static int8 model keep retrieval? ONNX Runtime int8 against fp32.

    python bench/int8_quality.py                # ~5 minutes on 2 cores
    python bench/int8_quality.py --images DIR   # a collection of your own

The model's fp32 ONNX graph (pipeline/runtime.py) is quantised statically
(QDQ, weights per channel, uint8 activations), calibrated on images of the
collection itself, with each of ONNX Runtime's calibration methods and, with
MinMax, the weight formats it advises for CPUs without VNNI. On
images held out from calibration it measures, against the fp32 graph:

- speed: one thread, batch 1, the median of a forward pass;
- cosine of each int8 vector to its fp32 one (mean, 1st percentile, lowest);
- near-duplicate recall: a cropped, resized, re-encoded copy of each held-out
  image searched among all held-out images, rank 1 = its source; with an
  int8 index and int8 queries, and with int8 queries on an fp32 index (an
  index extended or searched by a worker of the other kind).

imgindex would offer int8 only where the cosine is >= 0.99 and recall is
unchanged (issue #15).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex


def vectors(sess, inputs: list[np.ndarray]) -> np.ndarray:
    from imgindex.pipeline.embed import normalize_rows

    out = [sess.run(None, {"pixels": x})[0] for x in inputs]
    return normalize_rows(np.concatenate(out))


def forward_ms(sess, x: np.ndarray, runs: int = 30) -> float:
    for _ in range(3):
        sess.run(None, {"pixels": x})
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        sess.run(None, {"pixels": x})
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def cropped_copy(path: Path, rng: np.random.Generator) -> bytes:
    """A near-duplicate as users make them: a crop of 70-90 % of each side,
    resized and saved again as JPEG at quality 75."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        cw, ch = (int(s * rng.uniform(0.7, 0.9)) for s in (w, h))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((left, top, left + cw, top + ch))
        im = im.resize((cw * 3 // 4, ch * 3 // 4))
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=75)
        return buffer.getvalue()


def rank1(index_vectors: np.ndarray, queries: np.ndarray) -> float:
    """Share of queries whose best match is the image at the same row."""
    best = np.argmax(queries @ index_vectors.T, axis=1)
    return float(np.mean(best == np.arange(len(queries))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="default: bench-data photos")
    parser.add_argument("--calibrate", type=int, default=200, help="calibration images")
    parser.add_argument("--evaluate", type=int, default=400, help="held-out images")
    args = parser.parse_args()

    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from imgindex.pipeline.embed import Embedder, ModelSpec
    from imgindex.pipeline.runtime import onnx_graph, onnx_session

    if args.images is None:
        from bench.throughput import ensure_photos

        photos = ROOT / "bench-data" / "photos-2000"
        args.images = ensure_photos(photos, 2000, 300, 1000, 1)
    suffixes = (".jpg", ".jpeg", ".png")
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in suffixes)
    rng = np.random.default_rng(0)
    rng.shuffle(files)
    calibration = files[: args.calibrate]
    held_out = files[args.calibrate : args.calibrate + args.evaluate]
    print(
        f"{len(files)} images in {args.images}: {len(calibration)} to calibrate, "
        f"{len(held_out)} held out"
    )

    embedder = Embedder(ModelSpec(device="cpu", runtime="torch"))

    def model_input(source) -> np.ndarray:
        pixels = torch.from_numpy(embedder.decode(source)[None])
        return embedder.input_tensor(pixels).contiguous().numpy()

    calibration_inputs = [model_input(str(p)) for p in calibration]
    originals = [model_input(str(p)) for p in held_out]
    copies = [model_input(io.BytesIO(cropped_copy(p, rng))) for p in held_out]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration_inputs)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"pixels": x}

    graph = onnx_graph(embedder.model)
    fp32 = onnx_session(graph, 1)
    base, base_copies = vectors(fp32, originals), vectors(fp32, copies)
    print(
        f"fp32: {forward_ms(fp32, originals[0]):.1f} ms a pass; near-duplicate "
        f"rank 1: {rank1(base, base_copies):.3f}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fp32.onnx"
        if isinstance(graph, str):
            graph = Path(graph).read_bytes()
        source.write_bytes(graph)
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        # Without VNNI, x86 int8 kernels multiply uint8 by int8 in 16-bit
        # sums that can saturate; ONNX Runtime's advice is 7-bit weights
        # (reduce_range) or uint8 weights, tried here with MinMax.
        u8s8 = {"weight_type": QuantType.QInt8}
        variants = [
            ("MinMax", CalibrationMethod.MinMax, u8s8),
            ("Percentile", CalibrationMethod.Percentile, u8s8),
            ("Entropy", CalibrationMethod.Entropy, u8s8),
            ("MinMax, 7-bit weights", CalibrationMethod.MinMax,
             {**u8s8, "reduce_range": True}),
            ("MinMax, uint8 weights", CalibrationMethod.MinMax,
             {"weight_type": QuantType.QUInt8}),
        ]  # fmt: skip
        for name, method, options in variants:
            out = Path(tmp) / f"int8-{len(rows)}.onnx"
            started = time.perf_counter()
            quantize_static(
                str(prepared),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                calibrate_method=method,
                **options,
            )
            took = time.perf_counter() - started
            int8 = onnx_session(str(out), 1)
            got, got_copies = vectors(int8, originals), vectors(int8, copies)
            cosine = np.sum(got * base, axis=1)
            rows.append(
                (
                    name,
                    forward_ms(int8, originals[0]),
                    float(cosine.mean()),
                    float(np.percentile(cosine, 1)),
                    float(cosine.min()),
                    rank1(got, got_copies),
                    rank1(base, got_copies),
                    took,
                )
            )
            print(f"  {name}: done in {took:.0f} s")

    print()
    print(
        "| calibration | ms a pass | cosine mean | 1st pct | lowest "
        "| rank 1, int8 index | rank 1, int8 queries on fp32 | calibration s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, ms, mean, p1, low, r_int8, r_mixed, took in rows:
        print(
            f"| {name} | {ms:.1f} | {mean:.4f} | {p1:.4f} | {low:.4f} "
            f"| {r_int8:.3f} | {r_mixed:.3f} | {took:.0f} |"
        )


if __name__ == "__main__":
    main()
