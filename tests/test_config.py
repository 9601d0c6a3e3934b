"""Every configuration key is documented in the README and read by the code."""

from __future__ import annotations

from pathlib import Path

import dask.config
import pytest

from pipeline.config import DEFAULTS, config_value, seconds_value

ROOT = Path(__file__).resolve().parent.parent


# Keys whose value is a mapping handed on as it is (Dask's own settings).
MAPPINGS = {"local.dask-config"}


def flatten(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in MAPPINGS:
            keys += flatten(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


KEYS = flatten(DEFAULTS["imgindex"])


def source_text() -> str:
    return "\n".join(
        p.read_text()
        for d in ("pipeline", "cluster", "service")
        for p in (ROOT / d).glob("*.py")
    )


@pytest.mark.parametrize("key", KEYS)
def test_key_is_documented_and_read(key):
    assert f"`{key}`" in (ROOT / "README.md").read_text(), f"{key} missing from README"
    assert f'"imgindex.{key}"' in source_text(), f"imgindex.{key} is never read"


def test_every_yaml_key_has_a_comment():
    lines = (ROOT / "pipeline" / "imgindex.yaml").read_text().splitlines()
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"no comment: {line!r}"


def test_precedence_flag_over_config(monkeypatch):
    assert config_value(None, "imgindex.partition-size") == "auto"
    with dask.config.set({"imgindex.partition-size": 8}):
        assert config_value(None, "imgindex.partition-size") == 8
        assert config_value(16, "imgindex.partition-size") == 16


def test_durations_parse():
    assert seconds_value(None, "imgindex.task-timeout") == 300
    assert seconds_value("2 minutes", "imgindex.task-timeout") == 120
    assert seconds_value(1.5, "imgindex.connect-timeout") == 1.5
