"""Cluster health checks: versions, resources, a timed test embedding on each worker."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster.environment import problems, survey
from pipeline.embed import Embedder, ModelSpec

if TYPE_CHECKING:
    from distributed import Client


def probe_embedding(spec: ModelSpec) -> dict[str, Any]:
    """Embed one synthetic image here: the task doctor sends to every worker."""
    import torch

    from pipeline.synthetic import synthetic_photo

    started = time.perf_counter()
    embedder = Embedder(spec)
    loaded = time.perf_counter()
    pixels = np.asarray(synthetic_photo(np.random.default_rng(0), 224, 224))
    vector = embedder.embed_pixels([pixels])
    done = time.perf_counter()
    return {
        "dim": int(vector.shape[1]),
        "norm": float(np.linalg.norm(vector[0])),
        "device": embedder.model.device,
        "load_seconds": round(loaded - started, 3),
        "embed_seconds": round(done - loaded, 3),
        "torch_threads": torch.get_num_threads(),
    }


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
