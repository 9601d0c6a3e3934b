"""Which runtime runs the model's forward pass: torch, or ONNX Runtime on a CPU.

The ONNX graph is exported once from the same torch module and weights and
cached on local disk, keyed by model, imgindex version and preprocessing;
nothing is downloaded. Both runtimes give the same vectors (cosine >= 0.9999,
tests/test_runtime.py), so the runtime is a per-worker choice and never part
of an index's identity. ``auto`` times both on the worker and keeps the faster,
and remembers that timing beside the graph for this CPU model, thread count
and these torch and ONNX Runtime versions: a worker starting later on such a
machine (every build starts its workers) does not time them again.

Beside the graph lies its model's card (dim and preprocessing). A process
that finds graph, card and a remembered win for ONNX Runtime runs the graph
without importing torch at all (:func:`cached_onnx_runtime`): on a CPU
worker that import is most of its start-up (1-5 s of a core, 200 MB).
"""

from __future__ import annotations

import functools
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

from imgindex import __version__
from imgindex.pipeline.errors import ModelUnavailable
from imgindex.pipeline.models import LoadedModel

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
INSTALL_HINT = "pip install 'imgindex[fast]'"
_TIMED_RUNS = 5  # forward passes timed per runtime by `auto` (after 2 warm-ups)


@dataclass(frozen=True)
class Runtime:
    """The forward pass an Embedder uses, and why it was chosen."""

    name: str  # "torch" | "onnxruntime"
    # torch: NCHW float tensor -> [n, dim] tensor; onnxruntime: NCHW float32
    # ndarray -> [n, dim] ndarray (see takes_numpy)
    forward: Callable
    reason: str

    @property
    def takes_numpy(self) -> bool:
        return self.name == "onnxruntime"


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
    remembered = (
        choice_path(onnx_cache_path(model), precision, threads)
        if timer is None
        else None
    )
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


def choice_path(graph: Path, precision: str, threads: int) -> Path:
    """Where ``auto``'s timing of the model exported as ``graph`` is
    remembered, beside it: one file per CPU model, thread count and torch /
    ONNX Runtime versions, so that a change of any is timed again. The
    versions are the installed packages' (read without importing torch)."""
    digest = _digest(
        [
            _cpu_model(),
            threads,
            precision,
            _installed("torch"),
            _installed("onnxruntime"),
        ]
    )
    return graph.with_name(f"{graph.stem}.auto-{digest}.json")


def _digest(parts: list) -> str:
    """A short name for ``parts`` (JSON values) in the cache's file names."""
    key = json.dumps(parts, sort_keys=True)
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


# Asked at each worker start, by choice_path and optimized_path both.
@functools.cache
def _installed(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


@functools.cache
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
        _replace(path, json.dumps(saved).encode())
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
    # torch exports the graph with onnx; a graph exported before needs it not.
    # Images with onnxruntime and no onnx exist (GPU nodes' stock images).
    cache = onnx_cache_path(model)
    if cache is None or not cache.is_file():
        try:
            import onnx  # noqa: F401
        except ImportError:
            return f"onnx, which exports the model, is not installed ({INSTALL_HINT})"
    return None


def onnx_session(graph: str | bytes, threads: int):
    """An ONNX Runtime CPU session of ``graph`` (a path or bytes) with
    ``threads`` intra-op threads and no inter-op pool.

    For a graph in a file, ONNX Runtime's optimised form of it is kept
    beside it (:func:`optimized_path`) and loaded as it is: a session then
    takes 0.015 s rather than 0.075 s here, at every worker's start.
    """
    if isinstance(graph, bytes):
        return _new_session(graph, threads)
    optimized = optimized_path(Path(graph))
    if optimized.is_file():
        try:
            return _new_session(str(optimized), threads, optimize=False)
        except Exception as e:  # ORT's own error types, for a damaged file
            logger.info("optimised graph %s unusable (%s); again", optimized, e)
    if not os.access(optimized.parent, os.W_OK):
        return _new_session(graph, threads)
    from imgindex.pipeline.atomic import atomic_path

    try:
        # The workers of a node may write it at once: each its own copy.
        with atomic_path(optimized) as written:
            session = _new_session(graph, threads, save_to=written)
        return session
    except Exception as e:  # full disk, ...: the graph itself is tried below
        logger.info("not keeping the optimised graph %s: %s", optimized, e)
    return _new_session(graph, threads)


def _new_session(
    graph: str | bytes, threads: int, optimize: bool = True, save_to: Path | None = None
):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # its warnings are about graph fusions
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def optimized_path(graph: Path) -> Path:
    """Where ONNX Runtime's optimised form of ``graph`` is kept: one per CPU
    model (the optimisations may use its instruction set), ONNX Runtime
    version and state of the graph's file (a graph exported again is
    optimised again)."""
    try:
        stat = graph.stat()
        state = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        state = None
    digest = _digest([_cpu_model(), _installed("onnxruntime"), state])
    return graph.with_name(f"{graph.stem}.optimized-{digest}")


def onnx_forward(model: LoadedModel, threads: int) -> Callable:
    """A forward pass through an ONNX Runtime session of ``model``'s module:
    NCHW float32 ndarray in, [n, dim] ndarray out."""
    graph = onnx_graph(model)
    try:
        session = onnx_session(graph, threads)
    except Exception as e:  # ORT's own error types, for a damaged cached file
        if not isinstance(graph, str):
            raise
        logger.warning(
            "cached ONNX graph %s is unusable (%s); exporting again", graph, e
        )
        session = onnx_session(onnx_graph(model, fresh=True), threads)
    return _session_forward(session)


def _session_forward(session) -> Callable:
    def forward(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels": np.ascontiguousarray(x)})[0]

    return forward


def onnx_graph(model: LoadedModel, fresh: bool = False) -> str | bytes:
    """The exported graph of ``model``: a cached file's path, else its bytes.

    Exported from the torch module the worker loaded (even where a cached
    file exists, if ``fresh``), written to the cache through a temporary name
    (workers on one node may export at once), with the model's card beside it.
    """
    cache = onnx_cache_path(model)
    if cache is not None and cache.is_file() and not fresh:
        _write_card(model, cache)  # graphs cached before cards were
        return str(cache)
    graph = export_onnx(model)
    if cache is not None:
        try:
            _replace(cache, graph)
            _write_card(model, cache)
            return str(cache)
        except OSError as e:
            logger.info("not caching the ONNX graph in %s: %s", cache.parent, e)
    return graph


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (other processes may read it)."""
    from imgindex.pipeline.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(data)


def _cache_folder() -> Path:
    from imgindex.pipeline.config import config_value

    folder = config_value(None, "imgindex.runtime-cache")
    if folder is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        folder = os.path.join(base, "imgindex", "onnx")
    # "~/..." in a YAML file is the user's home, as a shell would read it.
    return Path(folder).expanduser()


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def onnx_cache_path(model: LoadedModel) -> Path | None:
    """Where the exported graph of ``model`` is kept (None: nowhere)."""
    digest = _digest([model.name, __version__, asdict(model.preprocess), model.dim])
    return _cache_folder() / f"{_safe_name(model.name)}-{__version__}-{digest}.onnx"


def _card_path(name: str) -> Path:
    """The card of model ``name`` for this imgindex: which graph is its, its
    dim and preprocessing (all a process needs to run the graph unloaded)."""
    return _cache_folder() / f"{_safe_name(name)}-{__version__}.card.json"


def _write_card(model: LoadedModel, graph: Path) -> None:
    card = {
        "name": model.name,
        "dim": int(model.dim),
        "preprocess": asdict(model.preprocess),
        "graph": graph.name,
    }
    path = _card_path(model.name)
    try:
        if json.loads(path.read_text()) == card:
            return
    except (OSError, ValueError):
        pass
    try:
        _replace(path, json.dumps(card).encode())
    except OSError as e:
        logger.info("not caching the model card in %s: %s", path.parent, e)


def _read_card(name: str) -> tuple[LoadedModel, Path] | None:
    """Model ``name`` as its card describes it (no forward pass), and its
    graph; None where either is missing or unreadable."""
    from imgindex.pipeline.models import Preprocess

    path = _card_path(name)
    try:
        saved = json.loads(path.read_text())
        model = LoadedModel(
            name,
            forward=None,
            preprocess=Preprocess.from_json(saved["preprocess"]),
            device="cpu",
            dim=int(saved["dim"]),
        )
        graph = path.with_name(str(saved["graph"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # The card names a graph of exactly this model, dim and preprocessing.
    if saved.get("name") != name or onnx_cache_path(model) != graph:
        return None
    return (model, graph) if graph.is_file() else None


def cached_onnx_runtime(
    wanted: str, name: str, device: str, precision: str, threads: int
) -> tuple[LoadedModel, Runtime] | None:
    """Model ``name`` run by ONNX Runtime from the cached graph, without
    torch: where the spec allows ONNX Runtime here (a CPU, fp32), its graph
    and card are cached, and ``auto`` remembers ONNX Runtime winning on this
    CPU at ``threads``. None otherwise: then the model is loaded with torch
    and the runtime chosen as before (which caches all three for next time).
    """
    found = _cached_choice(wanted, name, device, precision, threads)
    if found is None:
        return None
    model, graph, reason = found
    try:
        session = onnx_session(str(graph), threads)
    except Exception as e:  # a damaged file: torch loads the model, exports again
        logger.info("cached ONNX graph %s unusable (%s); loading with torch", graph, e)
        return None
    model.forward = _session_forward(session)
    return model, Runtime("onnxruntime", model.forward, reason)


def runs_from_cache(
    wanted: str, name: str, device: str, precision: str, threads: int
) -> bool:
    """Whether :func:`cached_onnx_runtime` would run ``name`` from the cache
    (neither export nor timing to pay for), asked without opening it."""
    return _cached_choice(wanted, name, device, precision, threads) is not None


def _cached_choice(
    wanted: str, name: str, device: str, precision: str, threads: int
) -> tuple[LoadedModel, Path, str] | None:
    """(model without its forward pass, cached graph, reason) where the cache
    allows running ``name`` under ONNX Runtime unloaded; else None."""
    if wanted not in ("auto", "onnxruntime") or precision not in ("auto", "fp32"):
        return None
    if device == "cuda" or (device == "auto" and _may_have_gpu()):
        return None
    if _installed("onnxruntime") is None:
        return None
    found = _read_card(name)
    if found is None:
        return None
    model, graph = found
    if wanted == "onnxruntime":
        return model, graph, "--runtime onnxruntime"
    timed = _read_choice(choice_path(graph, "fp32", threads))
    if timed is None or timed[0] >= timed[1]:
        return None
    ort_ms, torch_ms, day = timed
    reason = (
        f"auto: onnxruntime {ort_ms:.1f} ms an image vs torch {torch_ms:.1f} ms "
        f"(timed on this CPU on {day})"
    )
    return model, graph, reason


def _may_have_gpu() -> bool:
    """Whether torch might see a GPU here, asked without importing torch: a
    GPU needs its driver's device files (NVIDIA's, or ROCm's /dev/kfd)."""
    return any(
        os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")
    )


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
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), np.float32)
    if forward is model.forward:
        x = torch.from_numpy(x)
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
