"""The forkserver that LocalCluster workers fork from.

It imports what a worker needs once (distributed, NumPy, ONNX Runtime, FAISS,
imgindex's worker modules: most of a worker's start), so each worker is a
fork of a process that has them, and it starts early, so those imports run
on another core while the client imports and plans.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# What the forkserver imports once, for every worker it forks: what
# distributed itself preloads there (distributed.utils.get_mp_context), then
# what an imgindex worker imports before its first task (ONNX Runtime creates
# its threads with a session, not at import; torch is left to the workers
# that need it), and FAISS, which every build's index tasks import (0.03 s
# here, against 0.1-0.13 s in each worker at the end of a build).
FORKSERVER_MODULES = (
    *("distributed", "dask", "msgpack", "cloudpickle", "tornado", "toolz"),
    *("numpy", "pandas", "lz4"),
    *(
        "imgindex.pipeline.embed",
        "imgindex.pipeline.shards",
        "imgindex.cluster.worker",
        "onnxruntime",
    ),
    "faiss",
    "imgindex.cluster.forkserver_exit",  # last: see there
)


def start_forkserver() -> None:
    """Start the forkserver that LocalCluster workers fork from, now: its
    imports (most of a worker's start) then run while this process imports
    distributed and starts the scheduler, not after.

    The server's children get its environment, not this process's at their
    fork, so the server starts with the variables the Nanny sets before
    starting each worker (``distributed.nanny.pre-spawn-environ``: one BLAS
    thread, ...). This process keeps its own: it may not have imported
    NumPy or FAISS yet, which read theirs once.
    """
    import importlib.util
    import multiprocessing
    import multiprocessing.forkserver

    found = [m for m in FORKSERVER_MODULES if importlib.util.find_spec(m)]
    multiprocessing.get_context("forkserver").set_forkserver_preload(found)
    with _environment(pre_spawn_environ()):
        multiprocessing.forkserver.ensure_running()


def stop_forkserver() -> None:
    """Stop the forkserver now, its preloading included (its workers, if
    any are left, go on).

    Left alone, it would finish its imports before it noticed this process
    gone, holding this process's stdout and stderr open up to 0.5 s longer.
    The standard library has no public way to stop it; where its internals
    differ from these, it is left to stop by itself.
    """
    import multiprocessing.forkserver
    import signal

    server = multiprocessing.forkserver._forkserver
    pid = getattr(server, "_forkserver_pid", None)
    stop = getattr(server, "_stop", None)
    if pid is None or stop is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)  # default action, even mid-import
    stop()  # closes its pipe, reaps it, forgets its address


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values``, then as it was."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pre_spawn_environ() -> dict[str, str]:
    """``distributed.nanny.pre-spawn-environ``, read without importing
    distributed: its defaults from its YAML, the user's settings over them."""
    import importlib.util
    from pathlib import Path

    import dask.config
    import yaml

    values: dict = {}
    spec = importlib.util.find_spec("distributed")
    if spec is not None and spec.origin:
        try:
            text = Path(spec.origin).with_name("distributed.yaml").read_text()
            # libyaml's loader where there is one: 5 ms, not 50.
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            values = yaml.load(text, Loader=loader)["distributed"]["nanny"][
                "pre-spawn-environ"
            ]
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            values = {}
    values = {**values, **dask.config.get("distributed.nanny.pre-spawn-environ", {})}
    return {str(k): str(v) for k, v in values.items()}
