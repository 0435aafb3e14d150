"""The command-line demo: tiny settings, real outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bnn_align.cli import main


def test_demo_writes_a_consistent_record_and_a_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--dataset", "digits", "--width", "16", "--epochs", "2",
                 "--samples", "4", "--points", "3", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "demo.json").read_text())
    assert (out / "demo.png").stat().st_size > 1000
    assert record["config"]["dataset"] == "digits" and record["config"]["width"] == 16
    naive = record["curves"]["naive"]
    assert naive["ts"] == [0.0, 0.5, 1.0]
    # the endpoints are the same posteriors on both paths
    aligned = record["curves"]["aligned"]
    assert naive["values"]["nll"][0] == pytest.approx(aligned["values"]["nll"][0])
    assert record["endpoints"]["posterior_1"]["nll"] == pytest.approx(naive["values"]["nll"][0])
    for name in ("naive", "aligned"):
        barrier = record["barriers"][name]["nll"]
        assert barrier["value"] == pytest.approx(record["curves"][name]["barriers"]["nll"]
                                                 ["value"])
    assert record["match"]["cost_after"] <= record["match"]["cost_before"]
    printed = capsys.readouterr().out
    assert "barrier (+- s.e.)" in printed and "aligned" in printed


def test_low_rank_demo_runs_quietly(tmp_path, capsys):
    main(["demo", "--dataset", "digits", "--width", "8", "--epochs", "1", "--guide", "low-rank",
          "--rank", "2", "--samples", "2", "--points", "2", "--out", str(tmp_path), "--quiet"])
    assert capsys.readouterr().out == ""
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["config"]["guide"] == "low-rank"


def test_bad_arguments_and_module_entry_point(tmp_path):
    with pytest.raises(SystemExit, match="--width must be at least 1"):
        main(["demo", "--width", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--epochs must be at least 1"):
        main(["demo", "--epochs", "0", "--out", str(tmp_path)])
    taken = tmp_path / "file"
    taken.write_text("")
    with pytest.raises(SystemExit, match="exists and is not a folder"):
        main(["demo", "--out", str(taken)])
    with pytest.raises(SystemExit):
        main(["demo", "--dataset", "cifar"])
    result = subprocess.run([sys.executable, "-m", "bnn_align", "demo", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--guide {mean-field,low-rank}" in result.stdout


def test_help_is_plain_text_and_version_is_reported():
    import bnn_align

    for argv in (["--help"], ["demo", "--help"]):
        result = subprocess.run([sys.executable, "-m", "bnn_align", *argv],
                                capture_output=True, text=True, check=True)
        assert "``" not in result.stdout and "usage: bnn-align" in result.stdout
    result = subprocess.run([sys.executable, "-m", "bnn_align", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"bnn-align {bnn_align.__version__}"
