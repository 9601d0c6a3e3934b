"""The ``imgindex`` namespace of ``dask.config``: packaged defaults and lookups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import yaml

from imgindex.pipeline.errors import ConfigError

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


def config_number(value: Any, key: str, kind: type = float) -> Any:
    """Like :func:`config_value` for a number, ``kind`` float or int.

    Raises
    ------
    ConfigError
        Naming the key, for what is no such number (text, true, 2.5 for int).
    """
    value = config_value(value, key)
    try:
        if isinstance(value, bool) or kind is int and float(value) != int(value):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        words = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{key} {value!r} is not {words}") from None


def count_or_auto(value: int | str | None, key: str) -> int:
    """A count >= 1 from a flag or the config ``key``; "auto" is 0.

    Raises
    ------
    ConfigError
        Naming the flag, for anything else.
    """
    # A value from the configuration is named by its key, not the flag.
    named = f"--{key.rsplit('.', 1)[-1]}" if value is not None else key
    value = config_value(value, key)
    if str(value).lower() == "auto":
        return 0
    try:
        count = int(str(value).strip())
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{named} {value!r} is not auto or a whole number >= 1")
    return count
