"""Networks with reduced symmetry: the layers, the builders, the derived spec, training and match."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from torch import nn

import bnn_align as ba
from bnn_align import guides, models
from bnn_align.models import AsymConv1d, AsymConv2d, AsymLinear, FiGLU


def random_perms(spec: ba.PermutationSpec, net: nn.Module, gen: torch.Generator) -> dict:
    sizes = {}
    state = net.state_dict()
    for group, axes in spec.perm_to_axes.items():
        name, axis = axes[0]
        size = state[name].shape[axis] // spec.blocks.get(name, {}).get(axis, 1)
        sizes[group] = size
    return {g: torch.randperm(n, generator=gen) for g, n in sizes.items()}


def mixed_mlp() -> nn.Sequential:
    """Standard layers around one W-asymmetric layer: only the first hidden group survives."""
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         AsymLinear(8, 8, num_fixed=2, seed=3), nn.ReLU(), nn.Linear(8, 3))


def mixed_figlu() -> nn.Sequential:
    """A FiGLU on the second hidden layer: the first and third hidden groups survive."""
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), FiGLU(8, seed=1),
                         nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def mixed_cnn() -> nn.Sequential:
    """conv -> W-asymmetric conv -> conv -> flatten -> linear: the last conv's channels survive."""
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(),
                         AsymConv1d(4, 5, 3, padding=1, seed=2), nn.ReLU(),
                         nn.Conv1d(5, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 10, 3))


# ------------------------------------------------------------------------------- the layers --
def test_weight_holds_free_and_fixed_entries_in_their_places():
    layer = AsymLinear(10, 6, num_fixed=3, scale=2.0, seed=5)
    w = layer.weight
    rows = torch.arange(6)[:, None]
    assert torch.equal(w[rows, layer.fixed_index], layer.fixed_values)
    assert torch.equal(w[rows, layer.free_index], layer.free.detach())
    mask = layer.fixed_mask
    assert mask.sum(1).tolist() == [3] * 6
    assert torch.equal(mask[rows, layer.fixed_index], torch.ones(6, 3, dtype=torch.bool))
    x = torch.randn(7, 10, dtype=torch.float64)
    assert torch.allclose(layer.double()(x), x @ layer.weight.T + layer.bias)
    # the fixed entries get no gradient: they are not parameters at all
    assert [n for n, _ in layer.named_parameters()] == ["free", "bias"]
    assert layer.free.shape == (6, 7)


@pytest.mark.parametrize("cls,standard,shape", [
    (AsymConv1d, nn.functional.conv1d, (2, 3, 9)),
    (AsymConv2d, nn.functional.conv2d, (2, 3, 6, 5)),
])
def test_asymmetric_convolutions_are_convolutions_with_the_assembled_weight(cls, standard, shape):
    conv = cls(3, 4, 3, num_fixed=5, scale=0.5, seed=1, padding=1, stride=2)
    rows = conv.weight.reshape(4, -1)
    assert torch.equal(rows[torch.arange(4)[:, None], conv.fixed_index], conv.fixed_values)
    assert conv.free.shape == (4, rows.shape[1] - 5)
    x = torch.randn(shape)
    assert torch.allclose(conv(x), standard(x, conv.weight, conv.bias, stride=2, padding=1))


def test_same_seeds_share_fixed_entries_and_different_seeds_differ():
    torch.manual_seed(0)
    a = models.mlp(6, [16, 16], 3, asymmetry="w", asymmetry_seed=7)
    torch.manual_seed(1)  # another global state: other free entries, the same fixed ones
    b = models.mlp(6, [16, 16], 3, asymmetry="w", asymmetry_seed=7)
    c = models.mlp(6, [16, 16], 3, asymmetry="w", asymmetry_seed=8)
    for i in (0, 2, 4):
        assert torch.equal(a[i].fixed_index, b[i].fixed_index)
        assert torch.equal(a[i].fixed_values, b[i].fixed_values)
        assert not torch.equal(a[i].free, b[i].free)
        assert not torch.equal(a[i].fixed_values, c[i].fixed_values)
        assert not torch.equal(a[i].fixed_index, c[i].fixed_index)
    # layers of one shape in one network do not repeat each other's pattern
    square = models.mlp(16, [16, 16], 3, asymmetry="w", asymmetry_seed=7)
    assert square[0].fixed_index.shape == square[2].fixed_index.shape == (16, 2)
    assert not torch.equal(square[0].fixed_index, square[2].fixed_index)
    assert not torch.equal(square[0].fixed_values, square[2].fixed_values)
    s1 = models.resnet(8, in_channels=1, dim=1, asymmetry="sigma", asymmetry_seed=2)
    s2 = models.resnet(8, in_channels=1, dim=1, asymmetry="sigma", asymmetry_seed=2)
    s3 = models.resnet(8, in_channels=1, dim=1, asymmetry="sigma", asymmetry_seed=3)
    for (name, c1), (_, c2), (_, c3) in zip(s1.named_buffers(), s2.named_buffers(),
                                            s3.named_buffers()):
        assert name.endswith(".C") and torch.equal(c1, c2) and not torch.equal(c1, c3)
    # the fixed entries do not touch the global random state
    state = torch.get_rng_state()
    AsymLinear(5, 5, seed=1)
    FiGLU(5, seed=1)
    torch.set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), state)


def test_default_fixed_counts_and_scales_follow_width():
    net = models.mlp(40, [128, 512], 10, asymmetry="w")
    assert [net[i].num_fixed for i in (0, 2, 4)] == [5, 16, 256]
    # Lim et al.'s scales: 1 in the hidden layers, 1/4 in the output layer
    assert [net[i].scale for i in (0, 2, 4)] == [1.0, 1.0, 0.25]
    for width in (64, 1024):
        layer = AsymLinear(width, 2000, seed=0)
        assert layer.scale == 1.0
        fixed = layer.weight.detach()[layer.fixed_mask]
        assert 0.95 < float(fixed.std()) < 1.05
        # much larger than the free entries, which start as nn.Linear's
        assert float(layer.weight.detach()[~layer.fixed_mask].abs().max()) <= width ** -0.5


# --------------------------------------------------------------------------- the symmetries --
def test_permuting_units_of_asymmetric_layers_changes_the_function():
    x = torch.randn(32, 6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    standard = models.mlp(6, [16, 16], 3).double()
    spec = ba.spec_from_module(standard, torch.zeros(1, 6, dtype=torch.float64))
    perms = random_perms(spec, standard, gen)
    # the standard network: permuting any group leaves the function unchanged
    moved = ba.permute(standard, perms, spec)
    assert torch.allclose(moved(x), standard(x), atol=1e-10)

    # W-asymmetric: the same full weights, permuted the same way, then written back into the
    # layers (whose fixed entries cannot move) give another function
    asym = models.mlp(6, [16, 16], 3, asymmetry="w").double()
    as_standard = models.mlp(6, [16, 16], 3).double()
    with torch.no_grad():
        for i in (0, 2, 4):
            as_standard[i].weight.copy_(asym[i].weight)
            as_standard[i].bias.copy_(asym[i].bias)
    assert torch.allclose(as_standard(x), asym(x), atol=1e-10)
    def only(group):  # the permutation of one group, the identity elsewhere
        return {g: p if g == group else torch.arange(len(p)) for g, p in perms.items()}

    for group in spec.groups:
        permuted = ba.permute(as_standard, only(group), spec)
        back = models.mlp(6, [16, 16], 3, asymmetry="w").double()
        with torch.no_grad():
            for i in (0, 2, 4):
                rows = torch.arange(back[i].out_features)[:, None]
                back[i].free.copy_(permuted[i].weight[rows, back[i].free_index])
                back[i].bias.copy_(permuted[i].bias)
        gap = (back(x) - asym(x)).abs().max() / asym(x).abs().max()
        assert gap > 1e-2, group

    # sigma-asymmetric: the same parameter names as the standard MLP, permuted as it would be
    sigma = models.mlp(6, [16, 16], 3, asymmetry="sigma").double()
    for group in spec.groups:
        permuted = ba.permute(sigma.state_dict(), only(group), spec)
        other = models.mlp(6, [16, 16], 3, asymmetry="sigma").double()
        other.load_state_dict(permuted)
        gap = (other(x) - sigma(x)).abs().max() / sigma(x).abs().max()
        assert gap > 1e-2, group


@pytest.mark.parametrize("build,example,expected", [
    # the W-asymmetric layer 4 removes its output group and its input group (layer 2's units)
    (mixed_mlp, torch.zeros(1, 4), {"0.weight": ("P_0", None), "2.weight": (None, "P_0"),
                                    "4.free": (None, None), "4.bias": (None,),
                                    "4.fixed_values": (None, None), "6.weight": (None, None)}),
    # FiGLU at 3 removes the group of the units it acts on (layer 2's outputs) only
    (mixed_figlu, torch.zeros(1, 4), {"0.weight": ("P_0", None), "2.weight": (None, "P_0"),
                                      "2.bias": (None,), "3.C": (None, None),
                                      "4.weight": ("P_4", None), "6.weight": (None, "P_4")}),
    (mixed_cnn, torch.zeros(1, 1, 10), {"0.weight": (None, None, None),
                                        "2.free": (None, None), "4.weight": ("P_4", None, None),
                                        "4.bias": ("P_4",), "7.weight": (None, "P_4")}),
])
def test_groups_that_remain_in_the_spec_are_symmetries(build, example, expected):
    net = build().double()
    spec = ba.spec_from_module(net, example.double())
    assert spec.groups == sorted({g for axes in expected.values() for g in axes if g})
    for name, axes in expected.items():
        assert spec[name] == axes, name
    x = torch.randn(16, *example.shape[1:], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        perms = random_perms(spec, net, gen)
        assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
        moved = ba.permute(net, perms, spec)
        assert torch.allclose(moved(x), net(x), atol=1e-10)


@pytest.mark.parametrize("asymmetry", ["w", "sigma"])
def test_builders_with_asymmetry_have_no_groups_left(asymmetry):
    cases = [
        (models.mlp(40, [16, 16], 10, asymmetry=asymmetry), torch.zeros(2, 40)),
        (models.cnn1d(1, 40, 10, channels=(4, 4), hidden=(8,), asymmetry=asymmetry),
         torch.zeros(2, 1, 40)),
        (models.cnn2d(1, 8, 10, channels=(4,), hidden=(8,), asymmetry=asymmetry),
         torch.zeros(2, 1, 8, 8)),
        (models.resnet(8, in_channels=1, dim=1, asymmetry=asymmetry), torch.zeros(2, 1, 40)),
    ]
    for net, x in cases:
        assert net(x).shape == (2, 10)
        assert ba.spec_from_module(net, x).groups == []
        kinds = {type(m) for m in net.modules()}
        assert (FiGLU in kinds) == (asymmetry == "sigma")
        assert bool(kinds & {AsymLinear, AsymConv1d, AsymConv2d}) == (asymmetry == "w")
        assert nn.ReLU not in kinds or asymmetry == "w"
    # the standard builders are untouched by the new keyword
    assert ba.spec_from_module(models.resnet(8, in_channels=1, dim=1, asymmetry=None),
                               torch.zeros(1, 1, 40)).groups != []


# ----------------------------------------------------------------------------- Bayesian use --
@pytest.mark.parametrize("kind", ["mean_field", "low_rank"])
def test_training_leaves_fixed_entries_alone_and_guides_have_no_parameters_for_them(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = ba.BayesianNetwork(models.mlp(6, [12], 3, asymmetry="w"), input_shape=(6,))
    before = {k: v.clone() for k, v in model.net.named_buffers()}
    guide = guides.mean_field(model) if kind == "mean_field" else guides.low_rank(model, rank=2)
    start = {k: v.detach().clone() for k, v in guide.named_parameters()}
    losses = ba.fit(model, guide, (x, y), epochs=15, batch_size=32, lr=0.05, progress=False)
    assert losses[-1] < losses[0]
    assert any(not torch.equal(v, start[k]) for k, v in guide.named_parameters())
    for name, value in model.net.named_buffers():
        assert torch.equal(value, before[name]), name           # bit for bit
    # the latent sites are the free entries and biases only: no prior, no KL, no variational
    # parameter for a fixed entry
    assert model.sites == ("0.free", "0.bias", "2.free", "2.bias")
    free = sum(p.numel() for p in model.net.parameters())
    full = sum(m.weight.numel() + m.bias.numel() for m in model.net if isinstance(m, AsymLinear))
    assert full - free == sum(m.fixed_values.numel() for m in model.net
                              if isinstance(m, AsymLinear))
    view = ba.as_gaussian(guide)
    assert view.sites == list(model.sites)
    assert sum(t.numel() for t in view.loc.values()) == free
    trace = pyro.poutine.trace(model).get_trace(x[:4], y[:4], num_data=96)
    latent = [n for n, s in trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and n != "data"]
    assert latent == list(model.sites)
    # the model average along a path runs batched (vmap) over the assembled weights
    other = guides.mean_field(ba.BayesianNetwork(models.mlp(6, [12], 3, asymmetry="w"),
                                                 input_shape=(6,)))
    if kind == "mean_field":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to one draw at a time
            curve = ba.marginal_loss(model, ba.interpolate(guide, other), (x, y),
                                     ts=3, num_samples=4)
        assert curve.values["nll"].shape == (3,)


def test_match_on_a_network_without_groups_warns_and_returns_the_identity():
    model = ba.BayesianNetwork(models.mlp(6, [12, 12], 3, asymmetry="w"), input_shape=(6,))
    guide_a = guides.mean_field(model, init_scale=0.05)
    guide_b = guides.mean_field(ba.BayesianNetwork(models.mlp(6, [12, 12], 3, asymmetry="w"),
                                                   input_shape=(6,)), init_scale=0.05)
    with pytest.warns(UserWarning, match=r"no permutable group: the asymmetric layers 0 "
                                         r"\(AsymLinear\)"):
        result = ba.match(guide_a, guide_b)
    assert result.perms == {}
    assert result.cost_after == result.cost_before > 0
    assert result.cost_before == pytest.approx(ba.alignment_cost(guide_a, guide_b))
    aligned, original = ba.as_gaussian(result.aligned), ba.as_gaussian(guide_b)
    for site in original.sites:
        assert torch.equal(aligned.loc[site], original.loc[site])
        assert torch.equal(aligned.scale[site], original.scale[site])
    sigma = ba.BayesianNetwork(models.mlp(6, [12], 3, asymmetry="sigma"), input_shape=(6,))
    with pytest.warns(UserWarning, match=r"FiGLU"):
        ba.match(guides.mean_field(sigma), guides.mean_field(sigma), method="mean")
    # a network that keeps groups does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        standard = ba.BayesianNetwork(models.mlp(6, [12], 3), input_shape=(6,))
        ba.match(guides.mean_field(standard), guides.mean_field(standard))


# ------------------------------------------------------------------------------- bad input --
@pytest.mark.parametrize("make,message", [
    (lambda: AsymLinear(4, 3, num_fixed=5), "num_fixed must be an integer in 1..3, got 5"),
    (lambda: AsymLinear(4, 3, num_fixed=4), "num_fixed must be an integer in 1..3, got 4"),
    (lambda: AsymLinear(4, 3, num_fixed=0), "num_fixed"),
    (lambda: AsymLinear(4, 3, scale=-1.0), "scale must be a finite number >= 0, got -1.0"),
    (lambda: AsymLinear(4, 3, scale=float("nan")), "scale"),
    (lambda: AsymLinear(4, 3, seed=-1), "seed"),
    (lambda: AsymLinear(1, 3), "rows of at least 2 entries"),
    (lambda: AsymConv1d(1, 2, 1), "rows of at least 2 entries"),
    (lambda: AsymConv2d(2, 2, (3, 3, 3)), "kernel_size"),
    (lambda: AsymConv1d(2, 3, 3, num_fixed=7), "num_fixed must be an integer in 1..5"),
    (lambda: FiGLU(0), "dim must be a positive integer"),
    (lambda: FiGLU(4, scale=-0.1), "scale"),
    (lambda: models.mlp(4, [8], 3, asymmetry="W"), "asymmetry must be None, 'w' or 'sigma'"),
    (lambda: models.resnet(8, asymmetry="both"), "asymmetry"),
    (lambda: models.cnn1d(asymmetry="x"), "asymmetry"),
    (lambda: models.mlp(4, [8], 3, asymmetry="w", asymmetry_seed=-2), "asymmetry_seed"),
    (lambda: models.mlp(1, [8], 3, asymmetry="w"), "at least 2 weights per unit"),
])
def test_bad_arguments_are_refused_clearly(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.")):
        make()


def test_figlu_over_channels_gates_each_position_by_all_channels():
    act = FiGLU(4, seed=2, axis=1).double()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    gate = torch.sigmoid(torch.einsum("ij,bjt->bit", act.C, x))
    assert torch.allclose(act(x), gate * x)
    # a permutation of the channels is not a symmetry: the gate of each channel changes
    p = torch.tensor([1, 0, 3, 2])
    assert not torch.allclose(act(x[:, p])[:, torch.argsort(p)], act(x))


def test_figlu_refuses_inputs_with_the_wrong_number_of_units():
    with pytest.raises(ValueError, match=r"FiGLU\(4\) got an input of shape \(2, 5\)"):
        FiGLU(4)(torch.randn(2, 5))


def test_fit_callback_sees_every_epoch_and_does_not_change_the_training():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    histories, seen = [], []
    for callback in (None, lambda epoch, guide: seen.append((epoch, torch.randn(3)))):
        torch.manual_seed(0)
        model = ba.BayesianNetwork(models.mlp(4, [8], 2, asymmetry="sigma"), input_shape=(4,))
        guide = guides.mean_field(model)
        histories.append(ba.fit(model, guide, (x, y), epochs=4, batch_size=16, progress=False,
                                callback=callback))
    assert [epoch for epoch, _ in seen] == [1, 2, 3, 4]
    assert (histories[0] == histories[1]).all()                 # the callback's draws are its own


# ------------------------------------------------------------------------ the study's axis --
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_the_asymmetric_study_config_has_the_asymmetry_axis():
    from bnn_align import sweep

    study = sweep.load_study(ROOT / "studies" / "asymmetric.toml")
    variants = {cell.asymmetry for cell in study.cells}
    assert variants == {"none", "w", "sigma"}
    for cell, methods in study.cells.items():
        # only the standard networks have something to align
        assert methods == (("naive", "wasserstein") if cell.asymmetry == "none" else ("naive",))
        assert cell.key.endswith("" if cell.asymmetry == "none" else f"-{cell.asymmetry}")
    assert len(study.cells) == (2 * 2 * 2 + 2) * 3           # (MLPs + ResNet-8) x variants
    steps = sweep.expand(study)
    trains = [s for s in steps if s.kind == "train"]
    assert len(trains) == len(study.cells) * 3 * 2 == len({s.key for s in trains})
    for step in trains:
        assert step.settings["history_samples"] == 16
        asymmetric = "-w seed" in step.label or "-sigma seed" in step.label
        assert ("asymmetry" in step.settings) == asymmetric
    # the same cell and seed in two variants: different steps
    keys = {(s.settings["dataset"], s.settings["arch"], s.settings["width"],
             s.settings["guide"], s.settings["seed"], s.settings.get("asymmetry", "none"))
            for s in trains}
    assert len(keys) == len(trains)
    # a study without the axis keeps the settings (hence the cache keys) it always had
    for step in sweep.expand(sweep.load_study(ROOT / "studies" / "barrier.toml")):
        assert not {"asymmetry", "asymmetry_seed", "history_samples"} & set(step.settings)
    with pytest.raises(ValueError, match=r"grid\[0\]\.asymmetries: unknown 'both'"):
        sweep.parse_study({"train": {"epochs": 1}, "grid": [
            {"datasets": ["digits"], "archs": ["mlp"], "widths": [8], "guides": ["mean-field"],
             "asymmetries": ["both"]}]})
    with pytest.raises(ValueError, match=r"train\.asymmetry_seed must be an integer >= 0"):
        sweep.parse_study({"train": {"epochs": 1, "asymmetry_seed": -1}, "grid": [
            {"datasets": ["digits"], "archs": ["mlp"], "widths": [8], "guides": ["mean-field"]}]})


def test_a_tiny_asymmetric_study_runs_records_histories_and_reports(tmp_path, monkeypatch):
    import csv

    from bnn_align import sweep

    study = sweep.parse_study({
        "name": "tiny_asym", "pairs": 1, "metrics": ["nll", "accuracy"],
        "train": {"epochs": 2, "history_samples": 2},
        "evaluate": {"samples": 4, "points": 3},
        "grid": [{"datasets": ["digits"], "archs": ["mlp"], "widths": [8],
                  "guides": ["mean-field"], "asymmetries": ["none"],
                  "methods": ["naive", "wasserstein"]},
                 {"datasets": ["digits"], "archs": ["mlp"], "widths": [8],
                  "guides": ["mean-field"], "asymmetries": ["w", "sigma"],
                  "methods": ["naive"]}]})
    summary = sweep.run(study, tmp_path, serial=True, progress=False)
    assert summary.ran == {"train": 6, "match": 1, "curve": 0, "evaluate": 4}
    assert not summary.failed
    rows = list(csv.DictReader(summary.results.open()))
    assert sorted((r["asymmetry"], r["method"]) for r in rows) == [
        ("none", "naive"), ("none", "wasserstein"), ("sigma", "naive"), ("w", "naive")]
    naive = {r["asymmetry"]: float(r["nll_barrier"]) for r in rows if r["method"] == "naive"}
    assert len(set(naive.values())) == 3        # three different networks, three barriers
    cache = sweep.Cache(tmp_path / "cache")
    trains = {s.label: s for s in sweep.expand(study) if s.kind == "train"}
    w_state = cache.load(trains["train digits-mlp8-mean-field-w seed 0"])["guide"]
    assert "locs.0.free_unconstrained" in w_state and "locs.0.weight_unconstrained" not in w_state
    # the per-epoch history: every training, every epoch, the ELBO fit returned
    history = list(csv.DictReader((tmp_path / "tiny_asym_history.csv").open()))
    assert len(history) == 6 * 2
    for label, step in trains.items():
        found = cache.load(step)
        mine = [r for r in history if r["asymmetry"] == step.settings.get("asymmetry", "none")
                and int(r["seed"]) == step.settings["seed"]]
        assert [float(r["neg_elbo"]) for r in mine] == found["elbo"]
        assert all(0 <= float(r["test_accuracy"]) <= 1 for r in mine)
    # a second run finds everything cached and adds no row
    again = sweep.run(study, tmp_path, serial=True, progress=False)
    assert sum(again.ran.values()) == 0 and again.rows_added == 0 and again.rows == 4
    # the report keeps the variants apart
    from bnn_align.sweep import report

    plotted = []
    by_variant = report._plot_variants
    monkeypatch.setattr(report, "_plot_variants", lambda summary, path, key: (
        plotted.append((key, path.name)), by_variant(summary, path, key)))
    written = sweep.write_report(summary.results, tmp_path / "report")
    # the barrier plots are drawn by variant, not against width
    assert plotted == [("nll", "tiny_asym.png"), ("acc", "tiny_asym_accuracy.png")]
    assert all((tmp_path / "report" / name).stat().st_size > 0 for _, name in plotted)
    text = written[0].read_text()
    assert "| digits | MLP 8x2, w-asym. | mean-field |" in text
    assert "| digits | MLP 8x2, sigma-asym. | mean-field |" in text
    assert "| digits | MLP 8x2 | mean-field |" in text
    # and side by side in one row: standard naive and W2, then each variant's naive barrier
    side_by_side = next(line for line in text.splitlines()
                        if line.startswith("| digits | MLP 8x2 | mean-field |") and " / " in line)
    cells = [c.strip() for c in side_by_side.strip("|").split("|")][3:]
    barrier = {(r["asymmetry"], r["method"]): float(r["nll_barrier"]) for r in rows}
    for cell, key in zip(cells, [("none", "naive"), ("none", "wasserstein"), ("w", "naive"),
                                 ("sigma", "naive")]):
        assert cell == f"{barrier[key]:.3f} ± 0.000"
    assert len(cells[-1].split(" / ")) == 3     # a test accuracy per variant
    # and the training histories beside the table: a table per variant and their plot
    assert [p.name for p in written][-1] == "tiny_asym_history.png"
    last = {v: [r for r in history if r["asymmetry"] == v and r["epoch"] == "2"]
            for v in ("none", "w", "sigma")}
    for variant, label in (("none", "standard"), ("w", "W-asym."), ("sigma", "sigma-asym.")):
        accuracy = sum(float(r["test_accuracy"]) for r in last[variant]) / 2
        assert f"| digits | MLP 8x2 | mean-field | {label} | 2 |" in text
        assert f"| {accuracy:.3f} |" in text
