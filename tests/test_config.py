"""Every configuration key is documented (docs/configuration.md) and read."""

from __future__ import annotations

import re
from pathlib import Path

import dask.config
import pytest
import yaml

from imgindex.pipeline.config import DEFAULTS, config_value, seconds_value
from imgindex.pipeline.config_docs import MAPPINGS, documented_keys, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def flatten(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in MAPPINGS:
            keys += flatten(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


KEYS = flatten(DEFAULTS["imgindex"])


def packaged(key: str):
    """The packaged default of ``imgindex.<key>`` (whatever is set in this process)."""
    value = DEFAULTS["imgindex"]
    for part in key.split("."):
        value = value[part]
    return value


def source_text() -> str:
    return "\n".join(
        p.read_text()
        for d in ("imgindex", "pipeline", "cluster", "service")
        for p in (ROOT / d).glob("*.py")
    )


@pytest.mark.parametrize("key", KEYS)
def test_key_is_read(key):
    assert f'"imgindex.{key}"' in source_text(), f"imgindex.{key} is never read"


def test_generated_reference_lists_every_key_with_its_comment():
    documented = {k.key: k for k in documented_keys()}
    # An empty mapping (storage-options: {}) is a key too, which flatten misses.
    assert set(KEYS) <= set(documented)
    assert set(documented) - set(KEYS) == {"storage-options"}
    for key, doc in documented.items():
        assert doc.meaning, f"{key} has no comment in imgindex.yaml"
        if key not in MAPPINGS:
            assert yaml.safe_load(doc.default) == packaged(key), key
    table = markdown_table(list(documented.values()))
    for key in documented:
        assert f"| `{key}` |" in table


def test_details_table_lists_the_yaml_keys_and_defaults():
    """The hand-written table of docs/configuration.md cannot drift from the YAML."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    details = text.split("## Details", 1)[1]
    rows = re.findall(r"^\| `([\w.-]+)` \| (`[^`]*`|[^|]*?) \|", details, re.M)
    documented = {k.key: k for k in documented_keys()}
    assert sorted(key for key, _ in rows) == sorted(documented)
    for key, default in rows:
        if key not in MAPPINGS:
            assert default.strip("`") == documented[key].default, key


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
