"""ArviZ diagnostics: InferenceData from posteriors, R-hat before and after alignment, plots."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from bnn_align import BayesianNetwork, as_gaussian, match, models, permute, to_inference_data
from bnn_align.diagnostics import _arviz, plot_units, rhat_report
from bnn_align.permute import random_perms

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
    frame = report.to_dataframe()
    assert frame.loc["0.weight", "weights"] == 35
    same = rhat_report((a, b), num_samples=200, sites=["4.bias"])  # a pair is matched here
    assert same.sites == ["4.bias"]


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
