"""The README's quick start runs as written (with a shorter training budget)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_alignment_cuts_the_barrier(capsys):
    code = re.search(r"## Quick start\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "epochs=60, seed=seed)" in code
    namespace: dict = {}
    exec(code.replace("epochs=60, seed=seed)", "epochs=3, seed=seed, progress=False)"),
         namespace)
    printed = capsys.readouterr().out
    barriers = dict(re.findall(r"^(naive|aligned) (-?[\d.]+) \+-", printed, re.M))
    assert float(barriers["aligned"]) < float(barriers["naive"])
    assert "Alignment(method='wasserstein'" in printed


def test_readme_and_ci_run_the_same_test_command():
    command = re.search(r"## Set up and test.*?```bash\n(.*?)\n```", README.read_text(),
                        re.S).group(1)
    ci = (README.parent / ".ci" / "run").read_text()
    assert command in ci.splitlines()
