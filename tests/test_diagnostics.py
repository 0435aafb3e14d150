"""ArviZ diagnostics: InferenceData from posteriors, R-hat before and after alignment, plots."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from bnn_align import BayesianNetwork, as_gaussian, match, models, permute, to_inference_data
from bnn_align.diagnostics import (_RHAT_CEILING_TWO_CHAINS, _arviz, _standardized_differences,
                                   plot_units, rhat_report)
from bnn_align.symmetry.permutation import random_perms
from bnn_align.posterior import from_gaussian, paired_views

from conftest import group_sizes, make_guide

matplotlib.use("Agg")
az = _arviz()


def planted_pair(kind: str = "mean_field"):
    model = BayesianNetwork(models.mlp(5, [7, 6], 3), input_shape=(5,))
    a = make_guide(kind, model, spread=0.3)
    b = permute(a, random_perms(group_sizes(model), torch.Generator().manual_seed(1)))
    return model, a, b


def test_inference_data_has_one_chain_per_posterior_with_named_dims():
    model, a, b = planted_pair()
    idata = to_inference_data([a, b], num_samples=300, names=["a", "b"], seed=3)
    w = idata.posterior["2.weight"]
    assert w.dims == ("chain", "draw", "2.weight_out", "2.weight_in")
    assert w.shape == (2, 300, 6, 7)
    assert list(idata.posterior.chain.values) == ["a", "b"]
    assert list(idata.posterior["2.weight_in"].values) == list(range(7))
    view = as_gaussian(a)
    sd = view.scale["2.weight"].numpy()
    np.testing.assert_allclose(w.sel(chain="a").mean("draw").values,
                               view.loc["2.weight"].numpy(), atol=5 * sd.max() / np.sqrt(300))
    again = to_inference_data([a, b], num_samples=300, names=["a", "b"], seed=3)
    assert np.array_equal(again.posterior["2.weight"].values, w.values)
    summary = az.summary(idata, var_names=["4.bias"])
    assert len(summary) == 3 and "r_hat" in summary.columns


def b_guide(model):
    return make_guide("mean_field", model, spread=0.5, seed=7)


# PSIS flags narrow random posteriors (expected here); arviz 0.23 uses a deprecated pandas call
@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")
@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_log_likelihood_group_supports_loo_and_compare():
    model, a, _ = planted_pair()
    x, y = torch.randn(25, 5), torch.randint(0, 3, (25,))
    idata = to_inference_data(a, num_samples=200, data=(x, y))
    ll = idata.log_likelihood["obs"]
    assert ll.shape == (1, 200, 25)
    first = {k: torch.from_numpy(idata.posterior[k].values[0, 0]) for k in model.sites}
    expected = torch.log_softmax(model.evaluate(first, x), -1)[torch.arange(25), y]
    np.testing.assert_allclose(ll.values[0, 0], expected.numpy(), rtol=1e-5, atol=1e-5)
    loo = az.loo(idata)
    assert np.isfinite(loo["elpd_loo"])
    other = to_inference_data(b_guide(model), num_samples=200, data=(x, y))
    table = az.compare({"a": idata, "other": other})
    assert set(table.index) == {"a", "other"}


def test_rhat_shows_the_multimodality_and_its_removal():
    _, a, b = planted_pair()
    report = rhat_report(match(a, b), num_samples=500)
    assert report.fraction_before > 0.5
    assert report.fraction_after < 0.02
    rows = {r["site"]: r for r in report.rows()}
    assert rows["2.weight"]["median_before"] > 1.1
    assert rows["2.weight"]["median_after"] < 1.01
    assert "all weights" in str(report)
    assert report.rhat_informative and report.median_abs_d_after == 0.0  # an exact copy
    frame = report.to_dataframe()
    assert frame.loc["0.weight", "weights"] == 35
    same = rhat_report((a, b), num_samples=200, sites=["4.bias"])  # a pair is matched here
    assert same.sites == ["4.bias"]


def _moved(guide, shift_by_site=None, scale_factor: float = 1.0):
    """A new guide of ``guide``'s kind, its means moved by ``shift_by_site[site]`` and its
    standard deviations multiplied by ``scale_factor``."""
    shift_by_site = shift_by_site or {}

    def move(part, site, value):
        if part == "loc" and site in shift_by_site:
            return value + shift_by_site[site]
        return value * scale_factor if part == "scale" else value

    return from_gaussian(guide, as_gaussian(guide).map(move))


def test_standardized_differences_show_a_noisy_planted_alignment():
    model, a, b = planted_pair()
    sd_b = as_gaussian(b).scale
    gen = torch.Generator().manual_seed(5)
    # noise at a tenth of each weight's own standard deviation: the aligned pair should agree,
    # except at the output bias (not permuted), moved by three standard deviations
    shift = {s: 0.1 * sd * torch.randn(sd.shape, generator=gen) for s, sd in sd_b.items()}
    shift["4.bias"] = 3 * sd_b["4.bias"]
    noisy_b = _moved(b, shift)
    report = rhat_report(match(a, noisy_b), num_samples=500)
    assert report.rhat_informative
    assert report.separated_after == 3 / 111 and report.median_abs_d_after < 0.1  # the bias
    assert report.median_abs_d_before > 1.5 and report.separated_before > 0.5
    permuted_sites = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]
    rows = {r["site"]: r for r in report.rows()}
    for s in permuted_sites:
        assert rows[s]["median_abs_d_before"] > 1.0 > 0.1 > rows[s]["median_abs_d_after"], s
        assert rows[s]["mean_corr_after"] > 0.999, s
        assert rows[s]["rhat_informative"], s
        assert rows[s]["median_after"] < 1.01, s  # and R-hat agrees: the posteriors overlap
    assert report.fraction_after < 0.15 and report.fraction_before > 0.5
    assert not rows["4.bias"]["rhat_informative"]
    assert rows["4.bias"]["median_abs_d_after"] == pytest.approx(3 / 2 ** 0.5, rel=1e-4)
    assert report.verdict().startswith("R-hat is informative")
    assert "Not at 4.bias:" in report.verdict()
    assert report.verdict() in " ".join(str(report).split())


def distinct_narrow_pair():
    """guide_a with tiny standard deviations, and a permuted copy of a shifted version of it:
    after alignment the two are different distributions, by a known standardized difference."""
    model = BayesianNetwork(models.mlp(5, [7, 6], 3), input_shape=(5,))
    a = _moved(make_guide("mean_field", model, spread=0.3), scale_factor=0.02)
    gen = torch.Generator().manual_seed(3)
    shift = {s: 0.03 * torch.randn(loc.shape, generator=gen)
             for s, loc in as_gaussian(a).loc.items()}
    shifted = _moved(a, shift)
    b = permute(shifted, random_perms(group_sizes(model), torch.Generator().manual_seed(1)))
    return a, b, shift


def test_rhat_saturates_on_distinct_narrow_posteriors_and_d_shows_the_alignment():
    a, b, shift = distinct_narrow_pair()
    sd_a = as_gaussian(a).scale
    assert max(float(v.max()) for v in sd_a.values()) < 0.02  # narrow: far below the shift
    report = rhat_report(match(a, b), num_samples=500)
    # R-hat: far above 1 at every site before and after, so its fractions cannot see the
    # alignment
    for r in report.rows():
        assert r["median_before"] > 1.1 and r["median_after"] > 1.1, r["site"]
        assert not r["rhat_informative"], r["site"]
    assert report.fraction_before > 0.9 and report.fraction_after > 0.9
    assert not report.rhat_informative
    text = str(report)
    assert "R-hat is uninformative here" in text and "informative at" not in text
    assert "keep R-hat for chains that should agree" in text
    # where the draws cannot overlap, R-hat sits at the two-chain ceiling the report quotes
    far = np.abs(report.standardized_diff_after["2.weight"]) > 5
    assert far.sum() > 20
    np.testing.assert_allclose(report.after["2.weight"][far], _RHAT_CEILING_TWO_CHAINS,
                               atol=0.02)
    assert "rhat_informative=False" in repr(report)
    # the alignment recovered the planted permutation, so d after is the planted shift over
    # the combined standard deviation sqrt(2) * sd_a, with the sign of mu_a - mu_b
    for s, planted in shift.items():
        expected = (-planted / (2 ** 0.5 * sd_a[s])).numpy()
        np.testing.assert_allclose(report.standardized_diff_after[s], expected, rtol=1e-4)
    # |d| falls severalfold, and the means' correlation rises to about 1
    assert report.median_abs_d_after < report.median_abs_d_before / 5
    rows = {r["site"]: r for r in report.rows()}
    for s in ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]:
        assert rows[s]["median_abs_d_after"] < rows[s]["median_abs_d_before"] / 3, s
        assert rows[s]["mean_corr_after"] > 0.95, s
        assert rows[s]["mean_corr_after"] > rows[s]["mean_corr_before"] + 0.3, s
    assert rows["4.bias"]["mean_corr_before"] == rows["4.bias"]["mean_corr_after"]  # not permuted
    frame = report.to_dataframe()
    for column in ("median_abs_d_before", "median_abs_d_after", "separated_before",
                   "separated_after", "mean_corr_before", "mean_corr_after", "rhat_informative"):
        assert column in frame.columns
    assert frame.loc["2.weight", "separated_after"] == rows["2.weight"]["separated_after"]


def test_separation_sets_what_counts_as_separated():
    a, b, shift = distinct_narrow_pair()
    alignment = match(a, b)
    loose = rhat_report(alignment, num_samples=50, separation=1e6)
    assert loose.rhat_informative and loose.separated_after == 0.0
    strict = rhat_report(alignment, num_samples=50)
    assert not strict.rhat_informative
    assert np.array_equal(loose.standardized_diff_after["2.weight"],
                          strict.standardized_diff_after["2.weight"])


def test_standardized_differences_of_point_estimates():
    model = BayesianNetwork(models.mlp(4, [5], 2), input_shape=(4,))
    a = {k: v.clone() for k, v in model.net.state_dict().items()}
    b = {k: v.clone() for k, v in a.items()}
    b["0.weight"][0, 0] += 1.0
    d = _standardized_differences(*paired_views(a, b), ["0.weight", "0.bias"])
    assert d["0.weight"][0, 0] == -np.inf
    assert np.all(d["0.weight"].reshape(-1)[1:] == 0) and np.all(d["0.bias"] == 0)


def test_plot_units_draws_both_panels():
    _, a, b = planted_pair()
    fig = plot_units((a, b), units=(0, 1), inputs=(0, 2), num_samples=100)
    assert len(fig.axes) == 2
    assert "before alignment" in fig.axes[0].get_title()
    assert len(fig.axes[1].get_yticklabels()) >= 4
    with pytest.raises(ValueError, match="out of range"):
        plot_units((a, b), units=(9,))


def test_bad_input():
    model, a, b = planted_pair()
    other = make_guide("mean_field", BayesianNetwork(models.mlp(5, [8, 6], 3), input_shape=(5,)))
    with pytest.raises(ValueError, match="different architectures"):
        to_inference_data([a, other])
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(a, num_samples=0)
    with pytest.raises(ValueError, match="unknown sites"):
        to_inference_data(a, sites=["9.weight"])
    with pytest.raises(TypeError, match="Alignment"):
        rhat_report(a)
    for bad in (0, -1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="separation must be a positive finite number"):
            rhat_report((a, b), separation=bad)
    loaded = match(a, b)
    loaded.guide_a = None
    with pytest.raises(ValueError, match="loaded from disk"):
        rhat_report(loaded)


def test_plot_units_uses_the_arviz_1_forest_plot_interface(monkeypatch):
    """ArviZ 1.x (Python >= 3.12) cannot be installed here: a stand-in records that the 1.x
    call takes the models as a mapping, without matplotlib axes, and returns its charts."""
    import matplotlib.pyplot as plt

    import bnn_align.diagnostics as diagnostics

    calls = []

    class Chart:
        def __init__(self):
            self.figure = plt.figure()

        def item(self):
            return self.figure

    class Collection:
        def __init__(self):
            self.viz = {"chart": Chart()}

    class ArviZ1:
        __version__ = "1.0.0"

        @staticmethod
        def from_dict(groups, coords=None, dims=None):
            return groups

        @staticmethod
        def plot_forest(dt, **kwargs):
            calls.append((dt, kwargs))
            return Collection()

    monkeypatch.setattr(diagnostics, "_arviz", lambda: ArviZ1)
    model = BayesianNetwork(models.mlp(4, [5], 2), input_shape=(4,))
    a = make_guide("mean_field", model, seed=1)
    b = make_guide("mean_field", model, seed=2)
    figures = plot_units((a, b), units=(0,), inputs=(1,), num_samples=20)
    assert len(figures) == 2 and len(calls) == 2
    models_, kwargs = calls[0]
    assert list(models_) == ["guide_a", "guide_b"] and "ax" not in kwargs
    assert kwargs["var_names"] == ["unit 0, in 1"]
    assert figures[1]._suptitle.get_text().endswith("after alignment")
    plt.close("all")
