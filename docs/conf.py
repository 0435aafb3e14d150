"""Sphinx configuration of the bnn_align documentation (builds offline)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import bnn_align  # noqa: E402

project = "bnn_align"
author = "the bnn_align developers"
release = version = bnn_align.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "myst_nb",
]

# the committed notebooks are rendered with their outputs, never executed by the build
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False
suppress_warnings = ["mystnb.unknown_mime_type"]

html_theme = "alabaster"
html_static_path: list[str] = []
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path: list[str] = []


def _copy_tutorials(app) -> None:
    # the notebooks live in tutorials/ (executed by the tests); the site renders copies
    target = HERE / "tutorials"
    target.mkdir(exist_ok=True)
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        shutil.copyfile(notebook, target / notebook.name)


def setup(app):
    app.connect("builder-inited", _copy_tutorials)
    os.environ.setdefault("MPLBACKEND", "Agg")
