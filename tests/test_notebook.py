"""docs/examples/quickstart.ipynb runs from top to bottom against a LocalCluster
of its own, and its results show their thumbnails in a real browser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS
from tests.helpers import import_or_skip

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs/examples/quickstart.ipynb"
DATA_URI = re.compile(r'src="data:image/jpeg;base64,')


def html_of(cell) -> str:
    return "".join(
        out.get("data", {}).get("text/html", "")
        for out in cell.get("outputs", [])
        if out["output_type"]
        in ("display_data", "execute_result", "update_display_data")
    )


# Runs in a process of its own: the kernel's client leaves zmq sockets to the
# collector, whose warnings would fail whichever test it next ran in.
RUN = """
import sys
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

notebook_path, sockets, executed = sys.argv[1:]
notebook = nbformat.read(notebook_path, as_version=4)
# Its kernel listens on Unix sockets (an absolute path: it starts in the
# notebook's folder), not on TCP ports another user of the machine could reach.
kernel = KernelManager(kernel_name="python3", transport="ipc", ip=sockets)
client = NotebookClient(
    notebook,
    km=kernel,
    timeout=600,
    resources={"metadata": {"path": str(Path(notebook_path).parent)}},
)
client.execute()
nbformat.write(notebook, executed)
"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nbformat = import_or_skip("nbformat")
    import_or_skip("nbclient")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = ARTIFACTS / "quickstart-executed.ipynb"
    sockets = tmp_path_factory.mktemp("kernel") / "ipc"
    # The kernel's temporary files (its connection file, the notebook's own
    # folder) go here, where a failed run leaves them to pytest to clear.
    scratch = tmp_path_factory.mktemp("tmpdir")
    run = subprocess.run(
        [sys.executable, "-c", RUN, str(NOTEBOOK), str(sockets), str(target)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Its last cell removes the photos and indexes it wrote (12 MB a run).
    assert not list(scratch.glob("imgindex-quickstart-*"))
    return nbformat.read(target, as_version=4)


def cell_showing(notebook, code: str):
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and code in c.source]
    return cell


@pytest.mark.slow  # a kernel, a LocalCluster, a build
def test_notebook_runs_and_shows_results_as_thumbnails(executed):
    for cell in executed.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
    build = html_of(cell_showing(executed, "report = imgindex.build("))
    assert "the caller&#x27;s client" in build or "the caller's client" in build
    assert "<b>photos</b>: done (18 images)" in build
    assert re.search(r"<td>photos</td><td>18</td><td>0</td>", build)
    search = html_of(cell_showing(executed, "results = idx.search("))
    # Three queries and their four hits each.
    assert len(DATA_URI.findall(search)) == 3 + 3 * 4
    # Each crop's own photo told a copy, the unrelated photos after it neither.
    told = html_of(cell_showing(executed, "told = idx.search("))
    assert len(re.findall(r"1\. 0\.\d{3} copy<br>", told)) == 3, told
    assert len(re.findall(r"3\. 0\.\d{3} neither<br>", told)) == 3, told
    duplicates = html_of(cell_showing(executed, "duplicates = idx.duplicates("))
    assert len(DATA_URI.findall(duplicates)) == 2
    assert "keep: chelsea.jpg" in duplicates and "chelsea-small.jpg" in duplicates


@pytest.mark.slow
def test_notebook_thumbnails_render_in_a_browser(executed, browser, tmp_path):
    page = tmp_path / "outputs.html"
    parts = [
        html_of(cell_showing(executed, code))
        for code in ("results = idx.search(", "duplicates = idx.duplicates(")
    ]
    page.write_text(f"<html><body>{''.join(parts)}</body></html>")
    browser.get(page.as_uri())
    sizes = browser.execute_script(
        "return [...document.images].map(i => [i.naturalWidth, i.naturalHeight]);"
    )
    assert len(sizes) == 3 + 3 * 4 + 2
    assert all(max(w, h) == 96 for w, h in sizes), sizes
    browser.save_screenshot(str(ARTIFACTS / "notebook-thumbnails.png"))
