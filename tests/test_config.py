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


def test_every_key_is_checked_in_the_table_or_where_it_is_read():
    from imgindex.pipeline.config_check import CHECKED_WHERE_READ, CHECKS

    # storage-options: an empty mapping, which flatten() walks into.
    keys = {f"imgindex.{key}" for key in KEYS} | {"imgindex.storage-options"}
    assert keys == set(CHECKS) | set(CHECKED_WHERE_READ)
    assert not set(CHECKS) & set(CHECKED_WHERE_READ)


def test_the_packaged_defaults_pass_their_checks():
    from imgindex.pipeline.config_check import check_config

    check_config()


@pytest.mark.parametrize(
    "key, value, words",
    [
        # The string "no" from DASK_IMGINDEX__FALLBACK=no is true to Python.
        ("fallback", "no", "imgindex.fallback 'no' is not true or false"),
        ("connect-timeout", "zzz", "connect-timeout 'zzz' is not a duration; give"),
        ("call-timeout", -5, "call-timeout -5 is not a duration"),
        ("torch-threads", "zzz", "torch-threads 'zzz' is not a whole number >= 1"),
        ("retries", -1, "retries -1 is not a whole number >= 0"),
        ("index.recall-queries", -5, "recall-queries -5 is not a whole number >= 1"),
        ("index.retrain-growth", 0.5, "retrain-growth 0.5 is not a number > 1"),
        ("index.on-disk", "sometimes", "on-disk 'sometimes' is not one of auto, true"),
        ("model", -5, "imgindex.model -5 is not a name"),
        ("device", "gpu", "imgindex.device 'gpu' is not one of auto, cpu, cuda"),
        ("local.dashboard-address", "anywhere", "is not HOST:PORT"),
        # A string where YAML wants a list: not each of its letters a folder.
        ("serve.dataset-roots", "/data", "'/data' is not a list of folders"),
    ],
)
def test_a_setting_it_does_not_take_is_one_line_before_any_work(
    tmp_path, key, value, words
):
    """Every command, and the Python API, refuses it naming the key; `--help`
    still works."""
    import imgindex
    from imgindex.pipeline.errors import ConfigError
    from tests.helpers import invoke, one_error_line

    with dask.config.set({f"imgindex.{key}": value}):
        result = invoke("info", tmp_path / "no-index")
        assert result.exit_code == 1
        assert words in one_error_line(result.stderr)
        with pytest.raises(ConfigError, match=re.escape(words)):
            imgindex.open(tmp_path / "no-index")
        assert invoke("build", "--help").exit_code == 0


def test_settings_it_takes_in_every_form_pass():
    from imgindex.pipeline.config_check import check_config

    for key, value in [
        ("local.dashboard-address", ":8787"),
        ("local.dashboard-address", None),
        ("local.n-workers", 4),
        ("max-image-pixels", 1e9),  # DASK_IMGINDEX__MAX_IMAGE_PIXELS=1e9
        ("index.on-disk", True),
        ("task-timeout", "10 minutes"),
        ("task-timeout", 0),
        ("serve.dataset-roots", [str(ROOT)]),
    ]:
        with dask.config.set({f"imgindex.{key}": value}):
            check_config()
