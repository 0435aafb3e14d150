"""The reproduction study script: resumable, filterable, and its rows make sense (quick grid)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study_barrier.py"


def run_study(out: Path, *args: str) -> list[dict]:
    subprocess.run([sys.executable, str(STUDY), "--quick", "--quiet", "--out", str(out), *args],
                   check=True, capture_output=True, text=True)
    with (out / "study_barrier_quick.csv").open() as f:
        return list(csv.DictReader(f))


def test_quick_study_is_resumable_and_filterable(tmp_path):
    rows = run_study(tmp_path, "--pairs", "1")
    keys = {(r["guide"], r["pair"], r["method"]) for r in rows}
    assert keys == {(g, "0", m) for g in ("mean-field", "low-rank")
                    for m in ("naive", "mean", "wasserstein")}
    for guide in ("mean-field", "low-rank"):
        by_method = {r["method"]: r for r in rows if r["guide"] == guide}
        # the matcher's own objective is never worse than leaving the pair unaligned, and the
        # endpoints of every path are the same two posteriors
        assert float(by_method["wasserstein"]["w2_cost"]) <= float(by_method["naive"]["w2_cost"])
        assert float(by_method["mean"]["mean_cost"]) <= float(by_method["naive"]["mean_cost"])
        for r in by_method.values():
            assert float(r["nll_t0"]) == pytest.approx(float(by_method["naive"]["nll_t0"]))
            assert float(r["nll_se"]) > 0
    for name in ("study_barrier_quick.md", "study_barrier_quick.png",
                 "study_barrier_quick_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    cached = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "study_cache").iterdir()}
    assert len(cached) == 4  # two guides per cell

    # a rerun adds nothing and trains nothing (no cached guide is written again)
    assert run_study(tmp_path, "--pairs", "1") == rows
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "study_cache").iterdir()} == cached

    # --only runs just the matching cells
    more = run_study(tmp_path, "--pairs", "2", "--only", "low-rank")
    assert more[:len(rows)] == rows
    assert {(r["guide"], r["pair"]) for r in more[len(rows):]} == {("low-rank", "1")}
    assert len(more) == len(rows) + 3
