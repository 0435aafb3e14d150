"""Every tutorial notebook runs end to end with a small budget; committed copies match the
cells their builder defines and carry outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
sys.path.insert(0, str(TUTORIALS))

import make_notebooks  # noqa: E402

NAMES = sorted(make_notebooks.NOTEBOOKS)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_with_a_small_budget(name):
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    make_notebooks.execute(nb, "small", timeout=600)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_built_from_the_source_and_has_outputs(name):
    committed = nbformat.read(TUTORIALS / name, as_version=4)
    built = make_notebooks.build(name)
    assert [c.source for c in committed.cells] == [c.source for c in built.cells]
    code_cells = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), "run make_notebooks --execute"
    assert any(o.get("output_type") == "display_data" for c in code_cells
               for o in c.get("outputs", [])), "a full-budget run leaves its plots"
