"""`pipeline` and `cluster` are also names of unrelated old PyPI packages."""

from pathlib import Path

import pytest

import cluster
import pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_packages_are_this_project():
    assert Path(pipeline.__file__).resolve().parent == ROOT / "pipeline"
    assert Path(cluster.__file__).resolve().parent == ROOT / "cluster"


@pytest.mark.slow  # starts a cluster or a process
def test_cli_module_imports_nothing_heavy():
    """`dask scheduler` loads dask_cli entry points; ours must stay light."""
    import subprocess
    import sys

    code = (
        "import sys, pipeline.cli; "
        "heavy = [m for m in ('torch', 'faiss', 'distributed', 'PIL') "
        "if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
