"""Check that every worker can run our tasks: same imgindex, compatible packages."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from imgindex.pipeline.errors import WorkerEnvironmentError

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

# Differences here break task pickling or change the embeddings: refuse.
CRITICAL = ("imgindex", "python", "dask", "distributed", "cloudpickle", "msgpack")
# Differences here are worth a warning (a GPU worker's torch is another build).
OTHER = (
    "torch",
    "numpy",
    "pillow",
    "faiss-cpu",
    "efficientnet-lite-pytorch",
    "opencv-python-headless",  # the duplicates' geometric check
    "pillow-heif",  # an extra: without it, HEIC photos are listed as failed
)
# What a worker that lacks one of these cannot do, said beside the warning.
WITHOUT = {
    "pillow-heif": (
        "it lists HEIC/HEIF images as failed; pip install 'imgindex[heif]' there"
    ),
}


def _versions_fn():
    """The function run on each worker, made as a closure so cloudpickle sends it
    by value: it must run on a worker that lacks imgindex, to say so."""

    def versions() -> dict[str, Any]:
        import sys
        from importlib.metadata import PackageNotFoundError, version

        out: dict[str, Any] = {
            "python": ".".join(map(str, sys.version_info[:2])),
            "executable": sys.executable,
        }
        for dist in (
            "dask",
            "distributed",
            "cloudpickle",
            "msgpack",
            "torch",
            "numpy",
            "pillow",
            "faiss-cpu",
            "efficientnet-lite-pytorch",
            "opencv-python-headless",
            "pillow-heif",
        ):
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                out[dist] = None
        try:
            import imgindex.cluster  # noqa: F401
            import imgindex.pipeline.embed  # noqa: F401
            from imgindex import __version__

            out["imgindex"] = __version__
        except ImportError as e:
            out["imgindex"] = None
            out["imgindex_error"] = str(e)
        return out

    return versions


def survey(client: Client, timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Package versions on the client (key ``"client"``) and on every worker.

    A worker that does not answer within ``timeout`` (``imgindex.call-timeout``)
    is marked ``"unresponsive"`` instead of being waited on.
    """
    from imgindex.cluster.calls import Unresponsive, run_on_each

    probe = _versions_fn()
    found = {"client": probe()}
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    for address, result in run_on_each(client, probe, workers, timeout).items():
        if isinstance(result, Unresponsive):
            result = {"error": str(result), "unresponsive": True}
        elif isinstance(result, BaseException):
            result = {"error": f"{type(result).__name__}: {result}"}
        found[address] = result
    return found


def problems(found: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(errors, warnings) in plain words, one per worker and package."""
    mine = found["client"]
    errors, warnings = [], []
    for address, theirs in found.items():
        if address == "client":
            continue
        if theirs.get("unresponsive"):
            errors.append(theirs["error"])
            continue
        if "error" in theirs:
            errors.append(f"worker {address} did not answer: {theirs['error']}")
            continue
        if theirs.get("imgindex") is None:
            errors.append(
                f"worker {address} cannot import imgindex "
                f"({theirs.get('imgindex_error', 'not installed')}); install "
                f"imgindex {mine['imgindex']} into its environment "
                f"({theirs['executable']})"
            )
            continue
        for pkg in CRITICAL + OTHER:
            if _release(theirs.get(pkg)) != _release(mine.get(pkg)):
                text = _differs(address, pkg, theirs.get(pkg), mine.get(pkg))
                (errors if pkg in CRITICAL else warnings).append(text)
    return errors, warnings


def _differs(address: str, pkg: str, theirs: str | None, mine: str | None) -> str:
    if theirs is None:
        text = f"worker {address} lacks {pkg}, which the client has ({mine})"
        return f"{text}: {WITHOUT[pkg]}" if pkg in WITHOUT else text
    if mine is None:
        return f"worker {address} has {pkg} {theirs}, which the client lacks"
    return f"worker {address} has {pkg} {theirs}, the client {mine}"


def _release(version: str | None) -> str | None:
    """``2.13.0+cu128`` and ``2.13.0+cpu`` are the same release."""
    return version.split("+")[0] if version else version


def ensure_compatible(client: Client) -> dict[str, dict[str, Any]]:
    """Refuse a cluster whose workers cannot run this client's tasks.

    Raises
    ------
    WorkerEnvironmentError
        Naming each worker and what differs, instead of the pickling
        traceback the first task would otherwise produce.
    """
    found = survey(client)
    silent = {a: w for a, w in found.items() if w.get("unresponsive")}
    # A frozen worker is no reason to refuse the build: the watchdog drops it
    # if it stays silent while holding our tasks (dispatch.py).
    for text in (w["error"] for w in silent.values()):
        logger.warning("%s; building on the others", text)
    errors, warnings = problems({a: w for a, w in found.items() if a not in silent})
    for text in warnings:
        logger.warning("%s", text)
    if errors:
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise WorkerEnvironmentError(errors[0] + more + "; run `imgindex doctor`")
    return found
