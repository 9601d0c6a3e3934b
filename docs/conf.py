"""Sphinx configuration of imgindex's documentation (`make docs`)."""

from __future__ import annotations

from pathlib import Path

import imgindex

HERE = Path(__file__).resolve().parent

project = "imgindex"
author = "the imgindex developers"
copyright = "2026, the imgindex developers"
version = release = imgindex.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # numpydoc-style docstrings
    "myst_nb",  # Markdown pages and the executed example notebook
]
exclude_patterns = ["_build", "_generated", "**.ipynb_checkpoints", "jupyter_execute"]
suppress_warnings = ["myst.header"]  # pages moved from the README keep their headings

html_theme = "pydata_sphinx_theme"
html_title = "imgindex"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True  # dataclass fields are documented once, not twice

# The example notebook runs at every build, against a LocalCluster of its own:
# its thumbnails and timings are this build's, never pasted in.
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True


def _write_configuration_table(app) -> None:
    """docs/_generated/configuration-keys.md, from imgindex.yaml's comments."""
    from imgindex.pipeline.config_docs import documented_keys, markdown_table

    folder = HERE / "_generated"
    folder.mkdir(exist_ok=True)
    target = folder / "configuration-keys.md"
    text = markdown_table(documented_keys())
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


def setup(app):
    app.connect("builder-inited", _write_configuration_table)
