"""The documentation cannot rot: the site builds with warnings as errors, every public name is
documented and in the API reference, and the docstrings' examples run."""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bnn_align

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("bnn_align", "bnn_align.models", "bnn_align.data", "bnn_align.guides",
           "bnn_align.diagnostics", "bnn_align.sweep")


def public_objects():
    """(qualified name, object) of every public function and class the package exports."""
    seen = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            seen.setdefault(id(obj), (f"{module_name}.{name}", obj))
    return list(seen.values())


def test_every_public_name_has_a_docstring_and_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.rst").read_text()
    for qualified, obj in public_objects():
        doc = inspect.getdoc(obj)
        assert doc and len(doc) > 40, f"{qualified} has no docstring"
        short = qualified.split(".")[-1]
        directive = "autoclass" if inspect.isclass(obj) else "autofunction"
        assert re.search(rf"^\.\. {directive}:: ([\w.]+\.)?{short}$", api, re.M), \
            f"{qualified} is not in docs/api.rst"


def test_public_functions_document_their_parameters_returns_and_examples():
    for qualified, obj in public_objects():
        if inspect.isclass(obj) or not callable(obj):
            continue
        doc = inspect.getdoc(obj)
        parameters = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        if parameters:
            assert "Parameters\n----------" in doc, f"{qualified}: no Parameters section"
        assert "Returns\n-------" in doc or "Yields\n------" in doc, f"{qualified}: no Returns"
        assert "Examples\n--------" in doc, f"{qualified}: no Examples section"


def test_docstring_examples_run():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for qualified, obj in public_objects():
        module = inspect.getmodule(obj)
        for test in finder.find(obj, qualified, module=module, globs=dict(vars(module))):
            examples += sum(1 for e in test.examples if not e.options.get(doctest.SKIP))
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0
    assert examples >= 40  # not only skipped examples


@pytest.mark.skipif(shutil.which("sphinx-build") is None and
                    importlib.util.find_spec("sphinx") is None, reason="needs the docs extra")
def test_the_site_builds_offline_with_warnings_as_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(tmp_path / "html")],
        capture_output=True, text=True, env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr[-3000:]
    index = (tmp_path / "html" / "index.html").read_text()
    assert "bnn_align" in index
    api = (tmp_path / "html" / "api.html").read_text()
    for name in ("bnn_align.match", "bnn_align.marginal_loss", "bnn_align.fit_curve"):
        assert f'id="{name}"' in api
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        page = tmp_path / "html" / "tutorials" / f"{notebook.stem}.html"
        assert page.stat().st_size > 10_000  # rendered with its outputs
