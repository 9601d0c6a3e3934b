"""The ``imgindex`` namespace of ``dask.config``: packaged defaults and lookups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import yaml

DEFAULTS_FILE = Path(__file__).with_name("imgindex.yaml")

with DEFAULTS_FILE.open() as f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(f)

dask.config.update_defaults(DEFAULTS)


def config_value(value: Any, key: str) -> Any:
    """Return ``value`` unless it is None, else the dask config value at ``key``.

    CLI options default to None and pass through here, so the precedence is
    flag > ``DASK_IMGINDEX__*`` env > user YAML > packaged default.
    """
    if value is not None:
        return value
    return dask.config.get(key)


def seconds_value(value: float | str | None, key: str) -> float:
    """Like :func:`config_value` for durations ("3s", "5 minutes" or a number)."""
    from dask.utils import parse_timedelta

    return float(parse_timedelta(config_value(value, key), default="seconds"))
