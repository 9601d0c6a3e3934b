"""Cluster health checks: versions, resources, a timed test embedding on each worker."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from imgindex.cluster.environment import problems, survey
from imgindex.pipeline.embed import Embedder, ModelSpec, model_threads

if TYPE_CHECKING:
    from distributed import Client

# How close mixed precision must stay to fp32 (cosine of the unit vectors).
MIN_COSINE = 0.999


def probe_embedding(spec: ModelSpec) -> dict[str, Any]:
    """Embed synthetic images here: the task doctor sends to every worker.

    One image first (model load and warm-up included), then a timed batch of
    the size this worker's builds use (the model alone, no decoding); on a GPU
    also the device and its memory; and how far the chosen precision lands
    from fp32.
    """
    from imgindex.pipeline.synthetic import synthetic_photo

    started = time.perf_counter()
    embedder = Embedder(spec)
    loaded = time.perf_counter()
    rng = np.random.default_rng(0)
    pixels = np.asarray(synthetic_photo(rng, 224, 224))
    vector = embedder.embed_pixels([pixels])
    done = time.perf_counter()
    # Varied copies: the same image n times would be as slow, but this keeps
    # the precision check honest.
    noise = rng.integers(-8, 9, (embedder.batch_size, *pixels.shape))
    batch = list(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    on_gpu = embedder.on_gpu
    if on_gpu:
        import torch

        torch.cuda.reset_peak_memory_stats()
    embedder.embed_pixels(batch)  # warm-up: kernels are picked per batch shape
    timed = time.perf_counter()
    vectors = embedder.embed_pixels(batch)
    batch_seconds = time.perf_counter() - timed
    row: dict[str, Any] = {
        "dim": int(vector.shape[1]),
        "norm": float(np.linalg.norm(vector[0])),
        "device": embedder.model.device,
        "load_seconds": round(loaded - started, 3),
        "embed_seconds": round(done - loaded, 3),
        "torch_threads": model_threads(),  # the key predates ONNX Runtime
        "batch_size": embedder.batch_size,
        "decode_threads": embedder.decode_threads,
        "decoder": embedder.decoder,
        "precision": embedder.precision,
        "runtime": embedder.runtime.name,
        "runtime_reason": embedder.runtime.reason,
        "batch_seconds": round(batch_seconds, 4),
        "images_per_second": round(len(batch) / max(batch_seconds, 1e-9), 1),
    }
    if embedder.precision != "fp32":
        exact = Embedder(replace(spec, precision="fp32")).embed_pixels(batch)
        row["cosine_vs_fp32"] = float(np.min(np.sum(exact * vectors, axis=1)))
    if on_gpu:
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        row.update(
            gpu=torch.cuda.get_device_name(index),
            gpu_memory_total=int(total),
            gpu_memory_free=int(free),
            gpu_memory_peak=int(torch.cuda.max_memory_allocated(index)),
        )
    return row


def check_cluster(client: Client, spec: ModelSpec, timeout: float = 120.0) -> dict:
    """Survey every worker and run :func:`probe_embedding` on each that can.

    Returns
    -------
    dict
        ``ok`` is True only if there is at least one worker, every worker
        embedded a unit vector, and no critical package version differs.
    """
    info = client.scheduler_info(n_workers=-1)
    found = survey(client)
    errors, warnings = problems(found)
    runnable = [a for a in info["workers"] if found.get(a, {}).get("imgindex")]
    futures = {
        address: client.submit(
            probe_embedding,
            spec,
            workers=[address],
            allow_other_workers=False,
            pure=False,
            key=f"imgindex-doctor-{i}-{time.time_ns()}",
        )
        for i, address in enumerate(runnable)
    }
    deadline = time.monotonic() + timeout
    for fut in futures.values():
        try:
            fut.result(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # looked at per worker below
            pass
    workers = []
    for address, w in info["workers"].items():
        row = {
            "address": address,
            "threads": w.get("nthreads"),
            "memory_limit": w.get("memory_limit"),
            "resources": w.get("resources", {}),
            "versions": found.get(address, {}),
        }
        fut = futures.get(address)
        if found.get(address, {}).get("unresponsive"):
            row.update(ok=False, error=found[address]["error"])
        elif fut is None:
            row.update(ok=False, error="cannot run imgindex tasks (see problems)")
        elif fut.status == "finished":
            row.update(fut.result())
            row["ok"] = abs(row["norm"] - 1.0) < 1e-3
            if row.get("cosine_vs_fp32", 1.0) < MIN_COSINE:
                warnings.append(
                    f"worker {address}: {row['precision']} embeddings reach cosine "
                    f"{row['cosine_vs_fp32']:.4f} of fp32, below {MIN_COSINE}; "
                    "build with --precision fp32"
                )
        else:
            exc = fut.exception() if fut.status == "error" else None
            text = (
                f"{type(exc).__name__}: {exc}" if exc else f"no answer in {timeout:g} s"
            )
            row.update(ok=False, error=" ".join(text.split())[:300])
        workers.append(row)
    client.cancel([f for f in futures.values() if not f.done()])
    if not workers:
        errors.append("the scheduler has no workers")
    return {
        "ok": not errors and all(w["ok"] for w in workers),
        "scheduler": info.get("address"),
        "n_workers": len(workers),
        "workers": workers,
        "problems": errors,
        "warnings": warnings,
        "client_versions": found["client"],
    }
