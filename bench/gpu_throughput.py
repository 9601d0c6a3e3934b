"""One GPU worker against a tuned plain PyTorch loop on the same GPU (issue 11).

    python bench/gpu_throughput.py                    # a machine with an NVIDIA GPU
    python bench/gpu_throughput.py --device cpu --images 300 --batch-sizes 8,16
                                                      # a smoke run of the script itself

In one run, on the same JPEGs (5,000 by default, 500-1,500 px, written once):

1. the reference: a torch DataLoader with one decode process per core, pinned
   memory, non-blocking copies, channels_last and fp16 autocast, the same
   model and the same decode and crop as imgindex, at each batch size (the
   best one is the reference); beside it its two halves alone: decoding only
   (the DataLoader with no model) and the model only (a pinned batch copied
   and run over and over), which tell what bounds the loop;
2. `imgindex build` on a real `dask scheduler` and one
   `dask worker --nthreads 1 --resources GPU=1`, at the reference's best
   batch size and at imgindex's default: end to end (the command's wall time,
   cluster start excluded, model load included) and steady state (the build's
   embed stage: first task sent to last result in);
3. the ratio steady state / reference (the target is 0.8 or more);
4. where time goes: GPU utilisation sampled by nvidia-smi during each run, and
   the worker's own split (decode thread-seconds, the model waiting for
   decoded images, the model).

Prints a table and writes every figure to --report (JSON) for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORES = len(os.sched_getaffinity(0))


# -- the images -----------------------------------------------------------------


def _write_share(args: tuple[str, int, int, int, int]) -> int:
    from pipeline.synthetic import write_photos

    folder, n, seed, min_side, max_side = args
    write_photos(folder, n, seed, min_side, max_side, prefix=f"s{seed:02d}-")
    return n


def ensure_photos(folder: Path, n: int, min_side: int, max_side: int) -> list[Path]:
    """``n`` varied JPEGs, written once by every core; later runs reuse them."""
    files = sorted(folder.glob("*.jpg"))
    if len(files) == n:
        return files
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"writing {n} photos of {min_side}-{max_side} px to {folder} ...", flush=True)
    shares = [n // CORES + (i < n % CORES) for i in range(CORES)]
    jobs = [(str(folder), k, i, min_side, max_side) for i, k in enumerate(shares) if k]
    with ProcessPoolExecutor(CORES) as pool:
        list(pool.map(_write_share, jobs))
    return sorted(folder.glob("*.jpg"))


# -- GPU utilisation -------------------------------------------------------------


class GpuSampler:
    """nvidia-smi's utilisation, every 100 ms, while the block runs."""

    def __init__(self):
        self.samples: list[float] = []
        self._proc = None
        self._reader = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                    "-i",
                    "0",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._reader.join(timeout=2)

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


# -- 1. the reference ------------------------------------------------------------


class Photos:
    """A map-style dataset: uint8 crops, decoded exactly as imgindex does."""

    def __init__(self, files: list[Path]):
        self.files = [str(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch

        from pipeline.decode import decode_image

        # A writable copy (Pillow's array is read-only): 150 KB, microseconds.
        return torch.from_numpy(np.array(decode_image(self.files[i], 256, 224)))


class Model:
    """The model imgindex runs, driven the way a tuned script drives it."""

    def __init__(self, device: str, precision: str):
        import torch

        from pipeline.models import get_model

        self.torch = torch
        self.model = get_model("efficientnet-lite0", device)
        self.device = device
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def __call__(self, pixels):
        torch = self.torch
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.dtype is None:
                return self.model.forward(x)
            with torch.autocast(self.device, dtype=self.dtype):
                return self.model.forward(x)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def _loader(files, batch: int, pin: bool):
    from torch.utils.data import DataLoader

    return DataLoader(
        Photos(files),
        batch_size=batch,
        num_workers=CORES,
        pin_memory=pin,
        prefetch_factor=4,
    )


def reference_run(files, batch: int, model: Model | None) -> dict:
    """The DataLoader loop; steady state counts from the first batch's arrival
    (decode processes started, first batch decoded) to the last output."""
    sampler = GpuSampler()
    started = time.perf_counter()
    first = None
    n_after_first = 0
    outputs = []
    with sampler:
        pin = model is not None and model.device == "cuda"
        for pixels in _loader(files, batch, pin):
            if first is None:
                first = time.perf_counter()
            else:
                n_after_first += len(pixels)
            if model is not None:
                outputs.append(model(pixels).float())
        if model is not None:
            model.sync()
            vectors = model.torch.cat(outputs).cpu()
            assert vectors.shape[0] == len(files)
        done = time.perf_counter()
    return {
        "batch": batch,
        "end_to_end": len(files) / (done - started),
        "steady": n_after_first / max(done - first, 1e-9),
        "gpu_util": sampler.mean,
    }


def model_only(model: Model, batch: int, seconds: float = 5.0) -> float:
    """Images/s of copy + model on one pinned batch, repeated: the GPU's bound."""
    import torch

    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (batch, 224, 224, 3), np.uint8))
    if model.device == "cuda":
        pixels = pixels.pin_memory()
    for _ in range(3):
        model(pixels)
    model.sync()
    n = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            model(pixels)
        model.sync()
        n += 10 * batch
    return n / (time.perf_counter() - started)


# -- 2. imgindex build ------------------------------------------------------------


def imgindex_build(data: Path, out: Path, scheduler_file: Path, args, batch) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "build", str(data), "--out", str(out)]
    cmd += ["--scheduler-file", str(scheduler_file), "--device", args.device]
    cmd += "--gpu-resource --rebuild --json --index-type flat".split()
    if batch:
        cmd += ["--batch-size", str(batch)]
    if args.decode_threads:
        cmd += ["--decode-threads", str(args.decode_threads)]
    sampler = GpuSampler()
    started = time.perf_counter()
    with sampler:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"imgindex build failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)["datasets"][0]
    n = summary["embedded"]
    embed = summary["stage_seconds"]["embed"]
    task = summary["task_seconds"]
    return {
        "batch": batch or "default",
        "end_to_end": n / wall,
        "steady": n / embed,
        "gpu_util": sampler.mean,
        "embed_seconds": embed,
        "wall_seconds": wall,
        "partitions": summary["partitions"],
        "task_seconds": task,
        # Of the embed stage: how long the model waited for decoded images.
        "waiting_for_decode": round(task.get("decode-wait", 0.0) / embed, 3),
    }


# -- the run ---------------------------------------------------------------------


def main() -> None:
    from bench.processes import DaskProcesses

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", default=None, help="default: fp16 on cuda")
    parser.add_argument("--batch-sizes", default="64,128,256,512")
    parser.add_argument("--decode-threads", type=int, default=0, help="0: auto")
    parser.add_argument("--min-side", type=int, default=500)
    parser.add_argument("--max-side", type=int, default=1500)
    scratch = Path(tempfile.gettempdir()) / "imgindex-gpu-bench"
    parser.add_argument("--work", type=Path, default=scratch)
    parser.add_argument("--report", type=Path, default=Path("gpu_throughput.json"))
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch; --device cpu runs the script on CPU")
    precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (CPU run)"
    print(f"device: {gpu}; {CORES} cores; torch {torch.__version__}; {precision}")

    args.work.mkdir(parents=True, exist_ok=True)
    photos = args.work / f"photos-{args.images}-{args.min_side}-{args.max_side}"
    files = ensure_photos(photos, args.images, args.min_side, args.max_side)

    model = Model(args.device, precision)
    reference_run(files[: 2 * batches[0]], batches[0], model)  # warm-up, page cache
    decode_only = reference_run(files, batches[0], None)["steady"]
    print(f"decode only (DataLoader, {CORES} processes): {decode_only:8.1f} images/s")
    refs, bounds = [], {}
    for b in batches:
        bounds[b] = model_only(model, b)
        r = reference_run(files, b, model)
        refs.append(r)
        print(
            f"reference batch {b:4d}: steady {r['steady']:8.1f} images/s, end to "
            f"end {r['end_to_end']:8.1f}, GPU {r['gpu_util']}%; model alone "
            f"{bounds[b]:8.1f}"
        )
    best = max(refs, key=lambda r: r["steady"])
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()

    runs = []
    # One GPU worker, as the README lays out a GPU node.
    gpu = "--nthreads 1 --resources GPU=1 --name gpu0".split()
    hidden = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
    cluster = DaskProcesses(args.work, gpu, 1, hidden)
    try:
        for batch in dict.fromkeys([best["batch"], 0]):
            out = args.work / "out"
            run = imgindex_build(photos, out, cluster.scheduler_file, args, batch)
            runs.append(run)
            print(
                f"imgindex batch {run['batch']}: steady {run['steady']:8.1f} images/s, "
                f"end to end {run['end_to_end']:8.1f}, GPU {run['gpu_util']}%, model "
                f"waited for decoding {100 * run['waiting_for_decode']:.0f}% of "
                "the stage"
            )
    finally:
        cluster.close()

    best_run = max(runs, key=lambda r: r["steady"])
    ratio = best_run["steady"] / best["steady"]
    bound = "decode" if decode_only < bounds[best["batch"]] else "model"
    print(
        f"\nratio (imgindex steady / reference steady): {ratio:.2f} (target >= 0.8); "
        f"the reference is {bound}-bound: decoding {decode_only:.0f} images/s, "
        f"model alone {bounds[best['batch']]:.0f} images/s at batch {best['batch']}"
    )
    report = {
        "device": gpu,
        "cores": CORES,
        "torch": torch.__version__,
        "precision": precision,
        "images": len(files),
        "sides": [args.min_side, args.max_side],
        "decode_only": decode_only,
        "model_only": bounds,
        "reference": refs,
        "reference_best": best,
        "imgindex": runs,
        "ratio": ratio,
        "bound": bound,
    }
    args.report.write_text(json.dumps(report, indent=2))
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
