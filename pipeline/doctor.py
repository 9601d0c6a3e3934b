"""Cluster health checks: versions, workers, a timed test embedding on each."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.embed import Embedder, ModelSpec

if TYPE_CHECKING:
    from distributed import Client


def probe_embedding(spec: ModelSpec) -> dict[str, Any]:
    """Embed one synthetic image here: the task doctor sends to every worker."""
    import torch

    from pipeline import __version__
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
        "imgindex_version": __version__,
    }


def check_cluster(
    client: Client, spec: ModelSpec, timeout: float = 120.0
) -> dict[str, Any]:
    """Run :func:`probe_embedding` on every worker and collect versions and resources.

    Returns a report whose ``ok`` is True only if every worker embedded a
    unit vector and no package versions disagree.
    """
    from distributed import wait

    info = client.scheduler_info()
    versions = client.get_versions(check=False)
    mismatched = _mismatched_packages(versions)
    workers = []
    futures = {
        addr: client.submit(
            probe_embedding,
            spec,
            workers=[addr],
            allow_other_workers=False,
            pure=False,
            key=f"imgindex-doctor-{i}-{time.time_ns()}",
        )
        for i, addr in enumerate(info["workers"])
    }
    wait(list(futures.values()), timeout=timeout)
    for addr, fut in futures.items():
        w = info["workers"][addr]
        row = {
            "address": addr,
            "threads": w.get("nthreads"),
            "memory_limit": w.get("memory_limit"),
            "resources": w.get("resources", {}),
        }
        if fut.status == "finished":
            row.update(fut.result())
            row["ok"] = abs(row["norm"] - 1.0) < 1e-3
        else:
            exc = (
                fut.exception()
                if fut.status == "error"
                else f"no answer in {timeout:g} s"
            )
            row["ok"] = False
            row["error"] = _explain(exc)
        workers.append(row)
    client.cancel([f for f in futures.values() if not f.done()])
    ok = bool(workers) and all(w["ok"] for w in workers) and not mismatched
    return {
        "ok": ok,
        "scheduler": info.get("address"),
        "n_workers": len(workers),
        "workers": workers,
        "mismatched_packages": mismatched,
        "client_versions": versions.get("client", {}).get("packages", {}),
    }


def _mismatched_packages(versions: dict) -> dict[str, dict[str, str]]:
    client = versions.get("client", {}).get("packages", {})
    sched = versions.get("scheduler", {}).get("packages", {})
    out: dict[str, dict[str, str]] = {}
    sources = {
        "scheduler": sched,
        **{a: v.get("packages", {}) for a, v in versions.get("workers", {}).items()},
    }
    for pkg, want in client.items():
        for where, pkgs in sources.items():
            have = pkgs.get(pkg)
            if (
                pkg
                in (
                    "python",
                    "dask",
                    "distributed",
                    "msgpack",
                    "cloudpickle",
                    "numpy",
                    "toolz",
                    "tornado",
                    "lz4",
                )
                and have != want
            ):
                out.setdefault(pkg, {"client": str(want)})[where] = str(have)
    return out


def _explain(exc: Any) -> str:
    text = (
        f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    )
    if "No module named 'pipeline'" in text or "No module named 'cluster'" in text:
        return "imgindex is not installed in this worker's Python environment"
    return " ".join(text.split())[:300]
