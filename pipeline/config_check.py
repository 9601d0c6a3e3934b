"""What each ``imgindex.*`` setting takes, checked before a command does any work.

A value set in a YAML file or a ``DASK_IMGINDEX__*`` variable reaches code
that would otherwise fail on it much later, as a traceback or on a worker
(``DASK_IMGINDEX__INDEX__RECALL_QUERIES=-5`` failed in numpy after the whole
build), or be taken for something else (``fallback: no`` is the string "no",
which is true). The rest are checked where they are read
(:data:`CHECKED_WHERE_READ` says where), naming the flag or the key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

from imgindex.pipeline.config import config_number, config_value
from imgindex.pipeline.errors import ConfigError

# (whether a value is one the setting takes, what it takes, in words)
Check = tuple[Callable[[Any], bool], str]


def _whole(least: int, none: str | None = None) -> Check:
    def ok(value: Any) -> bool:
        if value is None:
            return none is not None
        try:  # 1e3 in a DASK_ variable is a float, and whole
            return config_number(value, "", int) >= least
        except ConfigError:
            return False

    words = f"a whole number >= {least}"
    return ok, words + (f" (or null: {none})" if none else "")


def _number(low: float, high: float = math.inf, above: bool = False) -> Check:
    def ok(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return (value > low if above else value >= low) and value <= high

    bound = f"> {low:g}" if above else f">= {low:g}"
    return ok, f"a number {bound}" + (f" and <= {high:g}" if high < math.inf else "")


def _duration(value: Any) -> bool:
    from dask.utils import parse_timedelta

    if isinstance(value, bool):
        return False
    try:
        return parse_timedelta(value, default="seconds") >= 0
    except (ValueError, KeyError, TypeError):
        return False


def _one_of(*choices: Any) -> Check:
    return (
        lambda value: isinstance(value, (str, bool)) and value in choices,
        "one of " + ", ".join(str(c).lower() for c in choices),
    )


DURATION: Check = (_duration, "a duration; give seconds or a unit, e.g. 300s or 5m")
FLAG: Check = (lambda value: isinstance(value, bool), "true or false")
TEXT: Check = (lambda value: isinstance(value, str) and bool(value.strip()), "a name")
PATH: Check = (lambda value: value is None or isinstance(value, str), "a path or null")
ADDRESS: Check = (
    lambda value: (
        value is None
        or isinstance(value, str)
        and re.fullmatch(r"[\w.\-\[\]:]*:\d{1,5}", value) is not None
    ),
    "HOST:PORT (port 0: a free one) or null",
)
FOLDERS: Check = (
    lambda value: (
        isinstance(value, (list, tuple))
        and all(
            isinstance(p, str) and os.path.isdir(os.path.expanduser(p)) for p in value
        )
    ),
    "a list of folders that exist (YAML: [/data/a, /data/b])",
)

CHECKS: dict[str, Check] = {
    "imgindex.connect-timeout": DURATION,
    "imgindex.worker-wait": DURATION,
    "imgindex.fallback": FLAG,
    "imgindex.call-timeout": DURATION,
    "imgindex.worker-unresponsive": DURATION,
    "imgindex.no-workers-timeout": DURATION,
    "imgindex.jobqueue.jobs": _whole(1),
    "imgindex.jobqueue.queue-wait": DURATION,
    "imgindex.local.n-workers": _whole(1, none="one per core"),
    "imgindex.local.threads-per-worker": _whole(1),
    "imgindex.local.dashboard-address": ADDRESS,
    "imgindex.model": TEXT,
    "imgindex.device": _one_of("auto", "cpu", "cuda"),
    "imgindex.gpu-resource": FLAG,
    "imgindex.torch-threads": _whole(1),
    "imgindex.runtime-cache": PATH,
    "imgindex.tasks-per-thread": _whole(1),
    "imgindex.max-queued-partitions": _whole(1),
    "imgindex.retries": _whole(0),
    "imgindex.task-timeout": DURATION,
    "imgindex.max-image-pixels": _whole(1),
    "imgindex.index.flat-max": _whole(0),
    "imgindex.index.hnsw-max": _whole(0),
    "imgindex.index.on-disk": _one_of("auto", True, False),
    "imgindex.index.recall-target": _number(0, 1, above=True),
    "imgindex.index.recall-k": _whole(1),
    "imgindex.index.recall-queries": _whole(1),
    "imgindex.index.retrain-growth": _number(1, above=True),
    "imgindex.search.turns": FLAG,
    "imgindex.serve.turns": FLAG,
    "imgindex.serve.dataset-roots": FOLDERS,
}


# Settings checked where they are read, naming their flag where one was given.
CHECKED_WHERE_READ: dict[str, str] = {
    "imgindex.scheduler": "cluster/connect.py: resolve_target",
    "imgindex.scheduler-file": "cluster/connect.py: resolve_target",
    "imgindex.jobqueue.system": "cluster/jobqueue.py",
    "imgindex.local.memory-limit": "cluster/connect.py: _local_sizes",
    "imgindex.local.start-method": "cluster/connect.py: start_local",
    "imgindex.local.dask-config": "handed to dask.config.set as it is",
    "imgindex.batch-size": "pipeline/embed.py: ModelSpec.from_config",
    "imgindex.decode-threads": "pipeline/embed.py: ModelSpec.from_config",
    "imgindex.decoder": "pipeline/embed.py: ModelSpec.from_config",
    "imgindex.precision": "pipeline/embed.py: ModelSpec.from_config",
    "imgindex.runtime": "imgindex/building.py: check_runtime",
    "imgindex.partition-size": "imgindex/building.py: check_build",
    "imgindex.storage-options": "pipeline/sources.py: handed to fsspec",
    "imgindex.index.type": "pipeline/assemble.py: IndexRequest.from_config",
    "imgindex.index.max-memory": "pipeline/assemble.py: IndexRequest.from_config",
    "imgindex.serve.host": "service/app.py: ServiceSettings.from_config",
    "imgindex.serve.port": "service/app.py: ServiceSettings.from_config",
    "imgindex.serve.max-upload": "service/app.py: ServiceSettings.from_config",
    "imgindex.serve.max-k": "service/app.py: ServiceSettings.from_config",
    "imgindex.serve.max-builds": "service/app.py: ServiceSettings.from_config",
    **{
        f"imgindex.duplicates.{key}": "pipeline/duplicates.py: "
        "DuplicateSettings.from_config"
        for key in ("threshold", "criterion", "neighbours")
        + ("rows-per-task", "pairs-per-task")
    },
    **{
        f"imgindex.statistics.{key}": "pipeline/statistics.py: "
        "StatisticsSettings.from_config"
        for key in ("blurry", "dark", "bright", "tiny", "outliers")
    },
}


def check_config(*keys: str) -> None:
    """Raise ConfigError for the first of ``keys`` (default: all the table's)
    holding a value it does not take, in one line naming its key, the value
    and what it takes."""
    for key in keys or CHECKS:
        ok, takes = CHECKS[key]
        value = config_value(None, key)
        if not ok(value):
            raise ConfigError(f"{key} {value!r} is not {takes}")
