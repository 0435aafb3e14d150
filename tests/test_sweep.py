"""Studies as configs (bnn_align.sweep): validation, caching, resuming, Ray against serial runs,
and the report of the committed study."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bnn_align.cli import main
from bnn_align.sweep import (Cache, CorruptEntry, compare_results, expand, load_study,
                             parse_filter, parse_study, read_results, run, write_report)
from bnn_align.sweep.steps import ROW_KEY

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "study_barrier.csv"


def tiny_study(folder: Path, *, epochs: int = 2, points: int = 3, samples: int = 4,
               name: str = "tiny") -> Path:
    """2 widths x 1 guide x 2 methods x 2 pairs on digits: 8 trainings, 4 matches, 8 rows."""
    path = folder / f"{name}.toml"
    path.write_text(f"""
name = "{name}"
pairs = 2
methods = ["naive", "wasserstein"]
[train]
epochs = {epochs}
[evaluate]
samples = {samples}
points = {points}
[[grid]]
datasets = ["digits"]
archs = ["mlp"]
widths = [8, 16]
guides = ["mean-field"]
""")
    return path


def rows_of(csv_path: Path) -> list[dict]:
    with csv_path.open() as f:
        return list(csv.DictReader(f))


def row_keys(rows: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in ROW_KEY) for r in rows]


def barriers(rows: list[dict]) -> dict[tuple, tuple]:
    return {tuple(r[k] for k in ROW_KEY): (r["nll_barrier"], r["nll_se"], r["acc_barrier"],
                                           r["w2_cost"]) for r in rows}


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------------------ the config --
@pytest.mark.parametrize("old, new, key", [
    ("", "bogus = 1\n", "bogus"),
    ("epochs = 2", "epoch = 2", "train.epoch"),
    ("widths = [8, 16]", "widths = [8, 16]\nwidht = [3]", "grid[0].widht"),
    ('["mlp"]', '["transformer"]', "grid[0].archs"),
    ('["mlp"]', '["resnet9"]', "grid[0].archs"),
    ("[8, 16]", "[8, 0]", "grid[0].widths"),
    ("[8, 16]", "[]", "grid[0].widths"),
    ('["digits"]', '["cifar"]', "grid[0].datasets"),
    ('"wasserstein"]', '"procrustes"]', "methods"),
    ("points = 3", "points = 1", "evaluate.points"),
    ("[[grid]]", "[[grids]]", "grids"),
    ('["mlp"]', '["mlp0"]', "grid[0].archs"),
    ('["mlp"]', '["mlpx"]', "grid[0].archs"),
    ("[[grid]]", "[learned]\nepoch = 3\n[[grid]]", "learned.epoch"),
    ("[[grid]]", "[learned]\nepochs = 0\n[[grid]]", "learned.epochs"),
    ("[[grid]]", "[learned]\nlr = { ste = -1.0 }\n[[grid]]", "learned.lr.ste"),
    ("[[grid]]", "[learned]\nlr = { mean = 1.0 }\n[[grid]]", "learned.lr.mean"),
])
def test_a_bad_config_is_refused_naming_the_key_before_anything_runs(tmp_path, old, new, key):
    good = tiny_study(tmp_path).read_text()
    assert old in good
    bad = tmp_path / "bad.toml"
    bad.write_text(new + good if not old else good.replace(old, new))
    with pytest.raises(ValueError, match=re.escape(key)):
        load_study(bad)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=re.escape(key)):
        main(["study", str(bad), "--out", str(out), "--serial", "--quiet"])
    assert not out.exists()  # nothing ran


def test_an_empty_grid_is_refused():
    with pytest.raises(ValueError, match="grid"):
        parse_study({"pairs": 1})
    with pytest.raises(ValueError, match="grid"):
        parse_study({"pairs": 1, "grid": []})


def test_the_barrier_study_expands_to_the_committed_grid():
    study = load_study(ROOT / "studies" / "barrier.toml")
    steps = expand(study)
    evaluates = [s for s in steps if s.kind == "evaluate"]
    committed = read_results(COMMITTED)
    assert sorted(s.row_key() for s in evaluates) == sorted(
        tuple(r[k] for k in ROW_KEY) for r in committed.to_dict("records"))
    trains = [s for s in steps if s.kind == "train"]
    assert len(trains) == 24 * 3 * 2 and len({s.key for s in steps}) == len(steps)
    digits = next(s for s in trains if s.settings["dataset"] == "digits")
    assert digits.settings["epochs"] == 200
    # width <= 256: every cell but the MLPs of width 512 and 1024
    small = [s for s in expand(study, [parse_filter("width<=256")]) if s.kind == "evaluate"]
    assert len(small) == len(committed[committed.width <= 256])


def test_the_learned_study_shares_its_trainings_and_w2_rows_with_the_barrier_study():
    barrier = {s.key for s in expand(load_study(ROOT / "studies" / "barrier.toml"))}
    learned = expand(load_study(ROOT / "studies" / "learned.toml"))
    trains = [s for s in learned if s.kind == "train"]
    cells = {s.label.rsplit(" seed", 1)[0] for s in trains}
    assert cells == {f"train mnist1d-{n}-mean-field" for n in
                     ("mlp128", "mlp512", "mlp1024", "mlp512x3", "resnet81", "resnet82")}
    assert len(trains) == 6 * 2 * 3
    # every training of a cell the barrier study has is the same step (the same cache entry)
    assert {s.label for s in trains if s.key not in barrier} == {
        f"train mnist1d-mlp512x3-mean-field seed {seed}" for seed in range(6)}
    for kind in ("match", "evaluate"):
        steps = [s for s in learned if s.kind == kind]
        assert len(steps) == 6 * 3 * 3
        shared = {s.settings["method"] for s in steps if s.key in barrier}
        assert shared == {"wasserstein"}
        assert sum(s.key in barrier for s in steps) == 5 * 3
    deep = next(s for s in trains if "x3" in s.label)
    assert (deep.settings["arch"], deep.settings["width"]) == ("mlp3", 512)
    ste = next(s for s in learned if s.kind == "match" and s.settings["method"] == "ste")
    assert {k: ste.settings[k] for k in ("epochs", "batch_size", "samples", "lr")} == {
        "epochs": 5, "batch_size": 512, "samples": 64, "lr": None}


def test_mlp2_is_mlp_and_shares_its_steps():
    raw = {"pairs": 1, "train": {"epochs": 2},
           "grid": [{"datasets": ["digits"], "archs": ["mlp2", "mlp"], "widths": [8],
                     "guides": ["mean-field"]}]}
    study = parse_study(raw)
    assert [c.arch for c in study.cells] == ["mlp"]
    assert len([s for s in expand(study) if s.kind == "train"]) == 2


def test_a_study_of_a_deeper_mlp_with_learned_matching_runs_and_reports(tmp_path):
    config = tmp_path / "deep.toml"
    config.write_text("""
name = "deep"
pairs = 1
methods = ["wasserstein", "ste"]
[train]
epochs = 2
[evaluate]
samples = 4
points = 3
[learned]
epochs = 1
batch_size = 256
samples = 4
lr = { ste = 0.01 }
[[grid]]
datasets = ["digits"]
archs = ["mlp3"]
widths = [8]
guides = ["mean-field"]
""")
    summary = run(load_study(config), tmp_path / "out", serial=True, progress=False)
    assert summary.ran == {"train": 2, "match": 2, "curve": 0, "evaluate": 2} and not summary.failed
    rows = rows_of(summary.results)
    assert {r["method"] for r in rows} == {"wasserstein", "ste"}
    assert all(r["arch"] == "mlp3" for r in rows)
    cache = Cache(tmp_path / "out" / "cache")
    match_step = next(s for s in expand(load_study(config))
                      if s.kind == "match" and s.settings["method"] == "ste")
    found = cache.load(match_step)
    assert math.isfinite(found["validation_barrier"])
    assert math.isfinite(found["validation_barrier_start"])
    assert isinstance(found["kept"], bool) and len(found["history"]) == 1
    # the network has three hidden layers of width 8
    train = next(s for s in expand(load_study(config)) if s.kind == "train")
    assert cache.load(train)["guide"]["locs.4.weight_unconstrained"].shape == (8, 8)
    assert main(["report", str(summary.results), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "deep.md").read_text()
    assert "| digits | MLP 8x3 | mean-field |" in text
    assert "Seconds per match" in text and "| W2 | STE |" in text


def test_filters():
    row = {"dataset": "digits", "arch": "mlp", "width": 64, "guide": "mean-field", "pair": 0,
           "method": "naive", "path": "wasserstein"}
    key = "digits-mlp64-mean-field"
    assert parse_filter("width<=256").matches(row, key)
    assert not parse_filter("width>64").matches(row, key)
    assert parse_filter("digits-mlp*,pair=0").matches(row, key)
    assert not parse_filter("digits-mlp*,pair=1").matches(row, key)
    assert parse_filter("guide=mean*,method!=mean").matches(row, key)
    assert not parse_filter("*-low-rank").matches(row, key)
    for bad, named in (("size<=3", "size"), ("width<=big", "width"), ("width<<3", "width<<3")):
        with pytest.raises(ValueError, match=re.escape(named)):
            parse_filter(bad)


def test_a_filter_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="matches no row"):
        main(["study", str(tiny_study(tmp_path)), "--out", str(tmp_path / "out"), "--serial",
              "--only", "width>16"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- the cache --
def test_a_corrupt_or_truncated_entry_is_detected_and_recomputed(tmp_path):
    study = load_study(tiny_study(tmp_path))
    first = run(study, tmp_path / "out", serial=True, progress=False)
    assert first.ran == {"train": 8, "match": 4, "curve": 0, "evaluate": 8} and first.rows == 8
    rows = rows_of(first.results)
    cache = Cache(tmp_path / "out" / "cache")
    steps = expand(study)
    train = next(s for s in steps if s.kind == "train")
    evaluate = next(s for s in steps if s.kind == "evaluate" and s.inputs[0] is train)
    blob = cache.path(train).read_bytes()
    cache.path(train).write_bytes(blob[:len(blob) // 2])             # truncated
    blob = bytearray(cache.path(evaluate).read_bytes())
    blob[-20] ^= 0xFF                                                  # one byte altered
    cache.path(evaluate).write_bytes(bytes(blob))
    fresh = Cache(cache.root)
    for step in (train, evaluate):
        assert not fresh.valid(step)
        with pytest.raises(CorruptEntry):
            fresh.load(step)

    # without the table (a row in it counts as done), the rows come back from the cache and
    # the corrupt entries are computed again
    first.results.unlink()
    again = run(study, tmp_path / "out", serial=True, progress=False)
    assert again.ran == {"train": 1, "match": 0, "curve": 0, "evaluate": 1} and again.cached == 18
    assert Cache(cache.root).valid(train) and Cache(cache.root).valid(evaluate)
    assert Cache(cache.root).load(train)["guide"].keys() == cache.load(train)["guide"].keys()
    again_rows = rows_of(again.results)  # same numbers, no row written twice
    assert len(again_rows) == len(rows) and barriers(again_rows) == barriers(rows)


def test_a_changed_setting_recomputes_exactly_what_depends_on_it(tmp_path):
    out = tmp_path / "out"
    first = run(load_study(tiny_study(tmp_path)), out, serial=True, progress=False)
    before = barriers(rows_of(first.results))
    again = run(load_study(tiny_study(tmp_path)), out, serial=True, progress=False)
    assert again.ran == {"train": 0, "match": 0, "curve": 0, "evaluate": 0} and again.cached == 20
    more_points = run(load_study(tiny_study(tmp_path, points=4)), out, serial=True,
                      progress=False, echo=lambda line: None)
    assert more_points.ran == {"train": 0, "match": 0, "curve": 0, "evaluate": 8}
    rows = rows_of(more_points.results)
    assert len(rows) == 8 and len(set(row_keys(rows))) == 8  # the old rows were replaced
    assert barriers(rows) != before
    more_epochs = run(load_study(tiny_study(tmp_path, epochs=3, points=4)), out, serial=True,
                      progress=False, echo=lambda line: None)
    assert more_epochs.ran == {"train": 8, "match": 4, "curve": 0, "evaluate": 8}


def test_dry_run_lists_the_steps_and_the_cache_hits(tmp_path, capsys):
    config = tiny_study(tmp_path)
    out = tmp_path / "out"
    assert main(["study", str(config), "--out", str(out), "--serial", "--quiet",
                 "--only", "width=8,pair=0"]) == 0
    capsys.readouterr()
    assert main(["study", str(config), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cached = [line for line in lines if line.startswith("cached ")]
    to_run = [line for line in lines if line.startswith("run ")]
    assert len(cached) == 5 and all("mlp8" in line for line in cached)  # 2 + 1 + 2 steps
    assert len(to_run) == 15
    assert "train digits-mlp16-mean-field seed 3" in "\n".join(to_run)
    assert lines[-1] == "20 steps: 5 cached, 15 to run (train 6, match 3, curve 0, evaluate 6)"
    assert len(rows_of(out / "tiny.csv")) == 2  # the dry run ran nothing


# ----------------------------------------------------------------------------------- Ray --
def test_ray_gives_the_serial_numbers_and_streams_each_row_once(tmp_path, local_ray):
    study = load_study(tiny_study(tmp_path))
    on_ray = run(study, tmp_path / "ray", progress=False)
    assert on_ray.ran == {"train": 8, "match": 4, "curve": 0, "evaluate": 8} and not on_ray.failed
    assert local_ray.is_initialized()  # a Ray started by the caller is left running
    serial = run(study, tmp_path / "serial", serial=True, progress=False)
    ray_rows, serial_rows = rows_of(on_ray.results), rows_of(serial.results)
    assert len(ray_rows) == 8 and len(set(row_keys(ray_rows))) == 8
    assert barriers(ray_rows) == barriers(serial_rows)  # identical numbers (as text)
    parquet = read_results(on_ray.results.with_suffix(".parquet"))
    assert sorted(parquet["nll_barrier"]) == sorted(float(r["nll_barrier"]) for r in ray_rows)


def _ray_workers_running(prefix: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith(prefix):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_killed_during_training_is_retried(tmp_path, local_ray):
    study = load_study(tiny_study(tmp_path, epochs=10))
    target = next(s for s in expand(study) if s.label == "train digits-mlp16-mean-field seed 1")
    cache = Cache(tmp_path / "out" / "cache")
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        summary=run(study, tmp_path / "out", progress=False)))
    runner.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        # Ray names a busy worker process after its task
        workers = _ray_workers_running(f"ray::{target.label}")
        if workers:
            time.sleep(0.5)  # into the training loop
            assert not cache.path(target).exists()  # still training
            os.kill(workers[0], signal.SIGKILL)
            killed = workers[0]
        time.sleep(0.05)
    runner.join(timeout=300)
    assert killed is not None, "the training task was never seen running"
    summary = result["summary"]
    assert not summary.failed and summary.ran == {"train": 8, "match": 4, "curve": 0, "evaluate": 8}
    rows = rows_of(summary.results)
    assert len(rows) == 8 and len(set(row_keys(rows))) == 8
    assert cache.valid(target)


def test_an_interrupted_study_resumes_with_only_the_unfinished_steps(tmp_path):
    pytest.importorskip("ray")
    config, out = tiny_study(tmp_path, epochs=4), tmp_path / "out"
    study = load_study(config)
    steps = expand(study)
    command = [sys.executable, "-m", "bnn_align", "study", str(config), "--out", str(out),
               "--quiet"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if sum(Cache(out / "cache").valid(s) for s in steps) >= 2:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the study finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err
    done = sum(Cache(out / "cache").valid(s) for s in steps)
    assert 2 <= done < len(steps)

    rerun = run(study, out, serial=True, progress=False)
    assert sum(rerun.ran.values()) == len(steps) - done and rerun.cached == done
    rows = rows_of(out / "tiny.csv")
    assert len(rows) == 8 and len(set(row_keys(rows))) == 8


# ------------------------------------------------------------------ the report and results --
def test_report_regenerates_the_committed_tables_and_the_readme_table(tmp_path, capsys):
    assert main(["report", str(COMMITTED), "--out", str(tmp_path)]) == 0
    generated = (tmp_path / "study_barrier.md").read_text()
    assert generated == (COMMITTED.parent / "study_barrier.md").read_text()
    readme = (ROOT / "README.md").read_text()
    nll_table = generated.split("\n\n")[1]
    assert nll_table.startswith("| data | network | guide | test acc |")
    assert nll_table in readme
    for name in ("study_barrier.png", "study_barrier_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_compare_results_finds_the_rows_that_differ(tmp_path, capsys):
    reference = read_results(COMMITTED)
    assert compare_results(reference, reference)["agrees"].all()
    changed = reference.copy()
    changed.loc[5, "nll_barrier"] *= 1 + 1e-6
    changed.loc[7, "w2_cost"] *= 1 + 1e-14  # float rounding
    report = compare_results(changed, reference)
    assert list(report.index[~report["agrees"]]) == [5]
    assert report.loc[5, "worst_column"] == "nll_barrier"
    assert report.loc[5, "max_rel_diff"] == pytest.approx(1e-6, rel=1e-3)
    changed.to_csv(tmp_path / "changed.csv", index=False)
    assert main(["report", str(tmp_path / "changed.csv"), "--compare", str(COMMITTED)]) == 1
    assert f"{len(reference) - 1} agree" in capsys.readouterr().out


def test_a_study_resumes_from_its_results_table_without_the_cache(tmp_path):
    """On a new machine only the committed table is left: its rows are not recomputed, and a
    missing row runs with exactly the steps it needs."""
    import shutil

    study, out = load_study(tiny_study(tmp_path)), tmp_path / "out"
    first = run(study, out, serial=True, progress=False)
    rows = rows_of(out / "tiny.csv")
    shutil.rmtree(out / "cache")
    again = run(study, out, serial=True, progress=False)
    assert sum(again.ran.values()) == 0 and rows_of(out / "tiny.csv") == rows
    # drop one aligned row: its two trainings, the match and the evaluation run again
    lost = next(r for r in rows if r["method"] == "wasserstein")
    with (out / "tiny.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r is not lost)
    resumed = run(study, out, serial=True, progress=False)
    assert resumed.ran == {"train": 2, "match": 1, "curve": 0, "evaluate": 1}
    assert barriers(rows_of(out / "tiny.csv")) == barriers(rows)
    assert first.ran["evaluate"] == 8


def test_a_curve_study_learns_one_curve_per_pair_and_evaluates_its_checkpoints(tmp_path):
    """Paths "bezier": one curve step per pair and method, evaluated after every checkpoint
    epoch (rows "bezier@E") and at the end; the numbers are fit_curve's and marginal_loss's."""
    import torch

    from bnn_align import fit_curve, marginal_loss
    from bnn_align.sweep.execute import load_trained

    config = tiny_study(tmp_path).read_text().replace(
        'methods = ["naive", "wasserstein"]',
        'methods = ["naive", "wasserstein"]\npaths = ["wasserstein", "bezier"]\npairs = 1'
    ).replace("pairs = 2\n", "").replace("widths = [8, 16]", "widths = [8]")
    config += "[curve]\nepochs = 2\ncheckpoints = [1]\n"
    path = tmp_path / "curves.toml"
    path.write_text(config)
    study = load_study(path)
    steps = expand(study)
    assert sorted(s.kind for s in steps).count("curve") == 2  # naive and aligned endpoints
    summary = run(study, tmp_path / "out", serial=True, progress=False)
    assert summary.ran == {"train": 2, "match": 1, "curve": 2, "evaluate": 6}
    rows = {(r["method"], r["path"]): r for r in rows_of(tmp_path / "out" / "tiny.csv")}
    assert set(rows) == {(m, p) for m in ("naive", "wasserstein")
                         for p in ("wasserstein", "bezier@1", "bezier")}
    # the naive curve, recomputed by hand with the study's settings
    cache = Cache(tmp_path / "out" / "cache")
    train_a, train_b = (s for s in steps if s.kind == "train")
    model, q0, split, _ = load_trained(train_a, cache)
    _, q1, _, _ = load_trained(train_b, cache)
    torch.set_num_threads(1)
    curve = fit_curve(model, q0, q1, split.train, epochs=2, seed=0, progress=False)
    by_hand = marginal_loss(model, curve, split.test, ts=3, num_samples=4, seed=0)
    assert float(rows["naive", "bezier"]["nll_barrier"]) == by_hand.barrier("nll").value
    assert rows["naive", "bezier@1"]["nll_barrier"] != rows["naive", "bezier"]["nll_barrier"]
    # the report sets the straight path against the curve and the barrier against epochs
    written = write_report(tmp_path / "out" / "tiny.csv", tmp_path / "report")
    assert [p.name for p in written][-1] == "tiny_curve_epochs.png"
    text = written[0].read_text()
    assert "| naive: line | naive: bezier | W2: line | W2: bezier |" in text
    line = next(s for s in text.splitlines()
                if s.startswith("| digits | MLP 8x2 | mean-field | W2 |"))
    cells = [c.strip() for c in line.strip("|").split("|")][4:]
    expected = [rows["wasserstein", p]["nll_barrier"]
                for p in ("wasserstein", "bezier@1", "bezier")]
    assert cells == [f"{float(v):.3f} ± 0.000" for v in expected]  # one pair: no spread
