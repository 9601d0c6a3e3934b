"""Which runtime runs the model's forward pass: torch, or ONNX Runtime on a CPU.

The ONNX graph is exported once from the same torch module and weights and
cached on local disk, keyed by model, imgindex version and preprocessing;
nothing is downloaded. Both runtimes give the same vectors (cosine >= 0.9999,
tests/test_runtime.py), so the runtime is a per-worker choice and never part
of an index's identity. ``auto`` times both on the worker and keeps the faster,
and remembers that timing beside the graph for this CPU model, thread count
and these torch and ONNX Runtime versions: a worker starting later on such a
machine (every build starts its workers) does not time them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.errors import ModelUnavailable
from pipeline.models import LoadedModel

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
INSTALL_HINT = "pip install 'imgindex[fast]'"
_TIMED_RUNS = 5  # forward passes timed per runtime by `auto` (after 2 warm-ups)


@dataclass(frozen=True)
class Runtime:
    """The forward pass an Embedder uses, and why it was chosen."""

    name: str  # "torch" | "onnxruntime"
    forward: Callable  # NCHW float tensor -> [n, dim] float tensor
    reason: str


def choose_runtime(
    wanted: str,
    model: LoadedModel,
    precision: str,
    threads: int,
    timer: Callable[[Callable, LoadedModel], float] | None = None,
) -> Runtime:
    """The runtime for ``model`` on this process, as ``wanted`` asks.

    Parameters
    ----------
    wanted
        ``auto``: ONNX Runtime on a CPU in fp32 where it is installed and
        times faster here, else torch; ``torch``; ``onnxruntime`` (an error
        where it cannot run).
    threads
        Intra-op threads of an ONNX Runtime session (torch's own setting).
    timer
        Milliseconds of one forward pass, as ``auto`` compares them
        (default: the median of a few timed passes here).

    Raises
    ------
    ModelUnavailable
        If ``onnxruntime`` was asked for and cannot run the model here.
    """
    torch_runtime = Runtime("torch", model.forward, f"--runtime {wanted}")
    if wanted == "torch":
        return torch_runtime
    if wanted not in RUNTIMES:
        raise ModelUnavailable(
            f"--runtime {wanted!r} is not one of {', '.join(RUNTIMES)}"
        )
    problem = _why_not_onnx(model, precision)
    if problem:
        if wanted == "onnxruntime":
            raise ModelUnavailable(f"--runtime onnxruntime: {problem}")
        return Runtime("torch", model.forward, f"auto: {problem}")
    if wanted == "onnxruntime":
        return Runtime(wanted, onnx_forward(model, threads), "--runtime onnxruntime")
    # What the real timing found is remembered for this CPU, thread count and
    # these packages; an injected timer's answer is neither read nor kept.
    remembered = choice_path(model, precision, threads) if timer is None else None
    timed = _read_choice(remembered) if remembered else None
    if timed is None:
        onnx = onnx_forward(model, threads)
        ort_ms, torch_ms = (
            (timer or _time)(forward, model) for forward in (onnx, model.forward)
        )
        if remembered:
            _write_choice(remembered, ort_ms, torch_ms)
        when = ""
    else:
        ort_ms, torch_ms, day = timed
        onnx = onnx_forward(model, threads) if ort_ms < torch_ms else None
        when = f" (timed on this CPU on {day})"
    timing = f"{ort_ms:.1f} ms an image vs torch {torch_ms:.1f} ms{when}"
    if ort_ms < torch_ms and onnx is not None:
        return Runtime("onnxruntime", onnx, f"auto: onnxruntime {timing}")
    return Runtime("torch", model.forward, f"auto: onnxruntime {timing}, kept torch")


def choice_path(model: LoadedModel, precision: str, threads: int) -> Path | None:
    """Where ``auto``'s timing of ``model`` is remembered, beside its graph:
    one file per CPU model, thread count and torch / ONNX Runtime versions, so
    that a change of any is timed again (None: nowhere)."""
    import onnxruntime
    import torch

    graph = onnx_cache_path(model)
    if graph is None:
        return None
    key = json.dumps(
        [_cpu_model(), threads, precision, torch.__version__, onnxruntime.__version__]
    )
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return graph.with_name(f"{graph.stem}.auto-{digest}.json")


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_choice(path: Path) -> tuple[float, float, str] | None:
    try:
        saved = json.loads(path.read_text())
        return float(saved["onnxruntime_ms"]), float(saved["torch_ms"]), saved["date"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or unreadable: time again


def _write_choice(path: Path, ort_ms: float, torch_ms: float) -> None:
    from datetime import date

    saved = {"onnxruntime_ms": ort_ms, "torch_ms": torch_ms, "date": str(date.today())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(saved))
        os.replace(partial, path)
    except OSError as e:
        logger.info("not remembering the runtime timing in %s: %s", path.parent, e)


def _why_not_onnx(model: LoadedModel, precision: str) -> str | None:
    if model.device != "cpu":
        return f"ONNX Runtime runs the model on the CPU only, not on {model.device}"
    if precision != "fp32":
        return f"ONNX Runtime runs fp32 only, not {precision}"
    if model.module is None:
        return f"model {model.name!r} has no exportable module"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return f"onnxruntime is not installed here ({INSTALL_HINT})"
    return None


def onnx_session(graph: str | bytes, threads: int):
    """An ONNX Runtime CPU session of ``graph`` (a path or bytes) with
    ``threads`` intra-op threads and no inter-op pool."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # its warnings are about graph fusions
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def onnx_forward(model: LoadedModel, threads: int) -> Callable:
    """A forward pass through an ONNX Runtime session of ``model``'s module."""
    import torch

    session = onnx_session(onnx_graph(model), threads)

    def forward(x):
        pixels = x.contiguous().numpy()  # NCHW, whatever torch's layout was
        return torch.from_numpy(session.run(None, {"pixels": pixels})[0])

    return forward


def onnx_graph(model: LoadedModel) -> str | bytes:
    """The exported graph of ``model``: a cached file's path, else its bytes.

    Exported from the torch module the worker loaded, written to the cache
    through a temporary name (workers on one node may export at once).
    """
    cache = onnx_cache_path(model)
    if cache is not None and cache.is_file():
        return str(cache)
    graph = export_onnx(model)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f".{cache.name}.{os.getpid()}")
            partial.write_bytes(graph)
            os.replace(partial, cache)
            return str(cache)
        except OSError as e:
            logger.info("not caching the ONNX graph in %s: %s", cache.parent, e)
    return graph


def onnx_cache_path(model: LoadedModel) -> Path | None:
    """Where the exported graph of ``model`` is kept (None: nowhere)."""
    from pipeline.config import config_value

    folder = config_value(None, "imgindex.runtime-cache")
    if folder is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        folder = os.path.join(base, "imgindex", "onnx")
    key = json.dumps(
        [model.name, __version__, asdict(model.preprocess), model.dim], sort_keys=True
    )
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.name)
    return Path(folder) / f"{safe}-{__version__}-{digest}.onnx"


def export_onnx(model: LoadedModel) -> bytes:
    """``model.module`` as an ONNX graph (batch size free), in memory."""
    import io
    import warnings

    import torch

    assert model.module is not None
    size = model.preprocess.crop
    example = torch.zeros(1, 3, size, size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter: the torch.export one needs onnxscript,
        # and this graph has no control flow that it would trace better.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.module,
            (example,),
            buffer,
            dynamo=False,
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
            opset_version=17,
        )
    return buffer.getvalue()


def _time(forward: Callable, model: LoadedModel) -> float:
    """Median milliseconds of one batch-1 forward pass."""
    import torch

    size = model.preprocess.crop
    x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((1, 3, size, size), np.float32)
    )
    if model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(2 + _TIMED_RUNS):
            started = time.perf_counter()
            forward(x)
            if i >= 2:
                times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)
