"""One import name: `imgindex`, and nothing generic at the top of site-packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import imgindex
import imgindex.cluster
import imgindex.pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_packages_are_this_project():
    assert Path(imgindex.__file__).resolve().parent == ROOT / "imgindex"
    assert Path(imgindex.pipeline.__file__).resolve().parent == ROOT / "pipeline"
    assert Path(imgindex.cluster.__file__).resolve().parent == ROOT / "cluster"


def test_no_generic_top_level_module_is_loaded():
    """`pipeline`, `cluster`, `service` are anyone's names (and old PyPI packages)."""
    code = (
        "import sys, imgindex, imgindex.cli, imgindex.service.app; "
        "print(sorted(m for m in ('pipeline', 'cluster', 'service') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # builds a wheel in a subprocess
def test_wheel_installs_only_imgindex(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, ROOT],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("imgindex-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"imgindex", f"imgindex-{imgindex.__version__}.dist-info"}
    # The packages the repository keeps at its top level travel under imgindex,
    # with their data files.
    for path in (
        "imgindex/__init__.py",
        "imgindex/pipeline/build.py",
        "imgindex/pipeline/imgindex.yaml",
        "imgindex/cluster/connect.py",
        "imgindex/service/app.py",
        "imgindex/service/static/index.html",
    ):
        assert path in names


@pytest.mark.slow  # starts a process
def test_cli_module_imports_nothing_heavy():
    """`dask scheduler` loads dask_cli entry points; ours must stay light."""
    code = (
        "import sys, imgindex, imgindex.cli; "
        "heavy = [m for m in ('torch', 'faiss', 'distributed', 'PIL', 'pandas') "
        "if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # starts a process
def test_python_dash_m_imgindex_is_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "imgindex", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "Usage: imgindex" in out.stdout
