"""Permutation specs: the format, automatic derivation, and function invariance of every network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_align import PermutationSpec, models, permute, spec_from_module
from bnn_align.symmetry.permutation import random_perms

from conftest import Recurrent


def state_shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def randomise_buffers(net: nn.Module, seed: int = 0) -> None:
    """Random BatchNorm statistics and random affine parameters of every normalisation layer
    (left at 1 and 0, a parameter mapped to the wrong group would go unnoticed)."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if p is not None:
                    p.data.copy_(torch.randn(p.shape, generator=gen))


def assert_invariant(net: nn.Module, x: torch.Tensor, spec: PermutationSpec, seed: int = 0,
                     tol: float = 1e-5) -> None:
    """A random permutation of every group leaves the outputs unchanged; the weights move."""
    net = net.eval()
    sizes = spec.group_sizes(state_shapes(net))
    assert sizes, "the spec has no groups: the test would be vacuous"
    perms = random_perms(sizes, torch.Generator().manual_seed(seed))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    permuted = permute(net, perms, spec)
    with torch.no_grad():
        diff = (net(x) - permuted(x)).abs().max().item()
    assert diff < tol, f"outputs changed by {diff}"
    moved = any(not torch.equal(before[k], v) for k, v in permuted.state_dict().items())
    assert moved, "no weight moved: the permutation was trivial"
    for k, v in net.state_dict().items():  # the input is untouched
        assert torch.equal(before[k], v)


# ------------------------------------------------------------------------- hand-written specs --
def hand_mlp_spec() -> PermutationSpec:
    return PermutationSpec({
        "0.weight": ("A", None), "0.bias": ("A",),
        "2.weight": ("B", "A"), "2.bias": ("B",),
        "4.weight": ("C", "B"), "4.bias": ("C",),
        "6.weight": (None, "C"), "6.bias": (None,),
    })


def hand_resnet_spec(blocks: int = 3, norm: str = "layer") -> PermutationSpec:
    axes: dict[str, tuple] = {}
    conv = (None, None)  # kernel axes of a 2-D convolution

    def norm_params(prefix: str, group: str) -> None:
        axes[prefix + ".weight"] = (group,)
        axes[prefix + ".bias"] = (group,)
        if norm == "batch":
            axes[prefix + ".running_mean"] = (group,)
            axes[prefix + ".running_var"] = (group,)
            axes[prefix + ".num_batches_tracked"] = ()

    axes["conv1.weight"] = ("S1", None, *conv)
    norm_params("norm1", "S1")
    previous = "S1"
    for stage in (1, 2, 3):
        stream = f"S{stage}"
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            inner = f"{p}.inner"
            axes[f"{p}.conv1.weight"] = (inner, previous, *conv)
            norm_params(f"{p}.norm1", inner)
            axes[f"{p}.conv2.weight"] = (stream, inner, *conv)
            norm_params(f"{p}.norm2", stream)
            if b == 0 and stage > 1:
                axes[f"{p}.shortcut.0.weight"] = (stream, previous, *conv)
                norm_params(f"{p}.shortcut.1", stream)
            previous = stream
    axes["fc.weight"] = (None, "S3")
    axes["fc.bias"] = (None,)
    return PermutationSpec(axes)


def test_derived_spec_equals_hand_written_mlp():
    net = models.mlp(10, [16, 9, 12], 4)
    assert spec_from_module(net, torch.randn(2, 10)) == hand_mlp_spec()


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_derived_spec_equals_hand_written_resnet(norm):
    net = models.resnet(20, width=1, norm=norm)
    derived = spec_from_module(net, torch.randn(2, 3, 16, 16))
    assert derived == hand_resnet_spec(3, norm)
    assert len(derived.groups) == 3 + 9  # three residual streams, one inner group per block


def test_spec_equality_is_up_to_relabelling_but_not_structure():
    a = hand_mlp_spec()
    relabelled = PermutationSpec({k: tuple({"A": "x", "B": "y", "C": "z"}.get(e, e) for e in v)
                                  for k, v in a.axes_to_perm.items()})
    assert a == relabelled
    merged = dict(a.axes_to_perm)
    merged["2.weight"] = ("A", "A")
    assert a != PermutationSpec(merged)


def test_perm_to_axes_and_round_trip_through_dict():
    spec = spec_from_module(models.cnn1d(), torch.randn(2, 1, 40))
    p2a = spec.perm_to_axes
    for group, axes in p2a.items():
        for name, axis in axes:
            assert spec[name][axis] == group
    assert PermutationSpec.from_dict(spec.to_dict()) == spec
    # the flatten after the last convolution: 32 channels x 10 positions
    (first_linear,) = [n for n in spec.blocks]
    assert spec.block(first_linear, 1) == 10


# --------------------------------------------------------------------------- invariance --
BUILDERS = {
    "mlp": (lambda: models.mlp(11, [13, 7, 9], 5), (4, 11)),
    "mlp_gelu_depth1": (lambda: models.mlp(6, [17], 2, activation="gelu"), (4, 6)),
    "cnn1d": (lambda: models.cnn1d(1, 40, 10, channels=(8, 6), hidden=(12,)), (3, 1, 40)),
    "cnn2d": (lambda: models.cnn2d(3, 12, 7, channels=(5, 6), hidden=(9,)), (3, 3, 12, 12)),
    "resnet20": (lambda: models.resnet(20, width=1), (2, 3, 16, 16)),
    "resnet8_w2_batchnorm": (lambda: models.resnet(8, width=2, norm="batch"), (2, 3, 8, 8)),
    "resnet14_1d": (lambda: models.resnet(14, width=1, dim=1, in_channels=1), (2, 1, 40)),
    "resnet8_1d_nonorm": (lambda: models.resnet(8, dim=1, in_channels=1, norm=None), (2, 1, 20)),
}


def assert_derived_spec_is_invariant(net: nn.Module, shape: tuple) -> PermutationSpec:
    """Random normalisation parameters, then three random permutations of the derived spec."""
    randomise_buffers(net)
    x = torch.randn(*shape)
    spec = spec_from_module(net, x)
    for seed in range(3):
        assert_invariant(net, x, spec, seed=seed)
    return spec


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builders_are_invariant_under_random_permutations(name):
    build, shape = BUILDERS[name]
    assert_derived_spec_is_invariant(build(), shape)


class Residual(nn.Module):
    """Odd widths, an input projection and two residual blocks, one with a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 11)
        self.block1 = nn.Sequential(nn.Linear(11, 7), nn.ReLU(), nn.Linear(7, 11))
        self.norm = nn.LayerNorm(11)
        self.block2 = nn.Sequential(nn.Linear(11, 3), nn.Tanh(), nn.Linear(3, 11, bias=False))
        self.out = nn.Linear(11, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.block1(h)
        h = self.norm(h)
        h = torch.relu(h + self.block2(h))
        return self.out(h)


class ConvViewLinear(nn.Module):
    """Convolutions with BatchNorm, then ``x.view(x.size(0), -1)`` into a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.depthwise = nn.Conv2d(5, 5, 3, padding=1, groups=5)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(5 * 3 * 3, 4)

    def forward(self, x):
        x = self.pool(self.depthwise(torch.relu(self.bn(self.conv(x)))))
        return self.fc(x.view(x.size(0), -1))


class Concat(nn.Module):
    """Two branches concatenated along the features (different widths)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 7)
        self.mix = nn.Linear(11, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        return self.out(torch.relu(self.mix(h)))


class ConcatConvFlatten(nn.Module):
    """Concatenated channels, flattened: blocks of positions inside a concatenated axis."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 3, 3, padding=1)
        self.b = nn.Conv1d(1, 2, 3, padding=1)
        self.fc = nn.Linear(5 * 8, 4)

    def forward(self, x):
        h = torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)
        return self.fc(torch.flatten(torch.relu(h), 1))


class MeanPoolHead(nn.Module):
    """Global average pooling written as a reduction, GroupNorm per channel, skip from a conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1)
        self.gn = nn.GroupNorm(6, 6)
        self.c2 = nn.Conv1d(6, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.gn(self.c1(x))
        h = torch.relu(h) + self.c2(h) * 0.5
        return self.fc(h.mean(dim=-1))


HAND_MADE = {
    "residual_layernorm": (Residual, (4, 5)),
    "conv_bn_depthwise_view_linear": (ConvViewLinear, (3, 2, 6, 6)),
    "concat": (Concat, (4, 6)),
    "concat_conv_flatten": (ConcatConvFlatten, (3, 1, 8)),
    "mean_pool_groupnorm": (MeanPoolHead, (3, 2, 9)),
}


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_hand_made_modules_are_invariant(name):
    cls, shape = HAND_MADE[name]
    assert_derived_spec_is_invariant(cls(), shape)


def test_residual_sum_shares_one_group():
    spec = spec_from_module(Residual(), torch.randn(2, 5))
    stream = spec["inp.weight"][0]
    assert spec["block1.2.weight"][0] == stream
    assert spec["block2.2.weight"][0] == stream
    assert spec["norm.weight"] == (stream,)
    assert spec["out.weight"] == (None, stream)
    assert spec["block1.0.weight"][0] not in (stream, None)


def test_concatenation_and_blocks_are_recorded():
    spec = spec_from_module(Concat(), torch.randn(2, 6))
    assert spec["mix.weight"][1] == (spec["a.weight"][0], spec["b.weight"][0])
    spec = spec_from_module(ConcatConvFlatten(), torch.randn(2, 1, 8))
    assert spec["fc.weight"][1] == (spec["a.weight"][0], spec["b.weight"][0])
    assert spec.block("fc.weight", 1) == 8


def test_inputs_and_outputs_are_never_permuted():
    for build, shape in BUILDERS.values():
        net = build()
        spec = spec_from_module(net, torch.randn(*shape))
        first = next(iter(net.state_dict()))
        assert spec[first][1] is None  # input axis of the first layer
        last_weight = [k for k in net.state_dict() if k.endswith("weight")][-1]
        assert spec[last_weight][0] is None  # output axis of the last layer


def test_batchnorm_buffers_move_with_their_channels():
    net = models.resnet(8, norm="batch")
    spec = spec_from_module(net, torch.randn(2, 3, 8, 8))
    group = spec["norm1.weight"][0]
    assert spec["norm1.running_mean"] == (group,)
    assert spec["norm1.running_var"] == (group,)
    assert spec["norm1.num_batches_tracked"] == ()


# -------------------------------------------------------------------------------- refusals --
class SliceOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))[:, :3])


class GroupedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(1, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.gn(self.c(x)).mean(-1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return x


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(1, 3, 3, padding=1)
        self.fc = nn.Linear(15, 2)

    def forward(self, x):
        return self.fc(self.c(x).transpose(1, 2).flatten(1))


class RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.gain = nn.Parameter(torch.randn(5))
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        # a parameter added to or multiplying the units moves with them (test_attention.py);
        # other operations on a parameter read directly are refused
        return self.b(torch.maximum(self.a(x), self.gain))


@pytest.mark.parametrize("cls, shape, words", [
    (SliceOp, (2, 4), ["getitem"]),
    (GroupedNorm, (2, 1, 5), ["'gn'", "GroupNorm", "2 groups"]),
    (ChannelsLast, (2, 1, 5), ["flatten", "(2, 5, 3)"]),
    (RawParameter, (2, 4), ["maximum", "parameter or buffer directly"]),
])
def test_unsafe_operations_are_refused_with_their_name(cls, shape, words):
    with pytest.raises(ValueError) as info:
        spec_from_module(cls(), torch.randn(*shape))
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("cls, shape", [(SliceOp, (2, 4)),
                                        (GroupedNorm, (2, 1, 5)), (ChannelsLast, (2, 1, 5)),
                                        (RawParameter, (2, 4))])
def test_unknown_fix_leaves_unsafe_parts_unpermuted_and_stays_invariant(cls, shape):
    net = cls()
    x = torch.randn(*shape)
    spec = spec_from_module(net, x, unknown="fix")
    if spec.groups:
        for seed in range(3):
            assert_invariant(net, x, spec, seed=seed)
    else:  # everything touched the unsafe operation: nothing may be permuted
        assert all(e is None for row in spec.axes_to_perm.values() for e in row)


def test_fix_keeps_the_safe_groups():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 5)
            self.c = nn.Linear(3, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x))))[:, :3])

    spec = spec_from_module(Mixed(), torch.randn(2, 4), unknown="fix")
    assert spec["a.weight"][0] is not None  # before the slice: still permutable
    assert spec["b.weight"][0] is None      # sliced: left alone


@pytest.mark.parametrize("layer, gates", [
    (nn.LSTM, "4 gate blocks"), (nn.GRU, "3 gate blocks"), (nn.RNN, None),
    (nn.GRUCell, "3 gate blocks")])
def test_recurrent_layers_are_refused_as_such_and_fixed_on_request(layer, gates):
    net = Recurrent(layer)
    x = torch.randn(3, 5, 4) if layer is not nn.GRUCell else torch.randn(3, 4)
    with pytest.raises(ValueError) as info:
        spec_from_module(net, x)
    message = str(info.value)
    assert f"module 'rnn' ({layer.__name__})" in message
    assert "recurrent layers are not supported" in message
    assert "both axes of the recurrent matrix weight_hh" in message
    assert (gates in message) if gates else ("gate" not in message)
    assert "unknown='fix'" in message
    spec = spec_from_module(net, x, unknown="fix")
    # the units on both sides of the recurrent layer stay put; the head after it keeps its own
    assert spec["inp.weight"][0] is None
    assert all(e is None for name, row in spec.axes_to_perm.items() if name.startswith("rnn.")
               for e in row)
    assert len(spec.groups) == 2
    for seed in range(3):
        assert_invariant(net, x, spec, seed=seed)


class SamePadConv(nn.Module):
    """A stride-2 3x3 convolution with TensorFlow's "SAME" padding of an even input: one row and
    one column after the positions, none before (``F.pad``, or an ``nn.ZeroPad2d`` module)."""

    def __init__(self, in_channels: int, out_channels: int, functional: bool):
        super().__init__()
        self.pad = None if functional else nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, bias=False)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1)) if self.pad is None else self.pad(x)
        return self.conv(x)


def test_resnet_with_same_padding_keeps_every_group():
    net = models.resnet(20, width=1, norm="batch")
    for stage, functional in (("layer2", True), ("layer3", False)):
        block = getattr(net, stage)[0]
        block.conv1 = SamePadConv(block.conv1.in_channels, block.conv1.out_channels, functional)
    x = torch.randn(2, 3, 16, 16)
    spec = assert_derived_spec_is_invariant(net, tuple(x.shape))
    unpadded = spec_from_module(models.resnet(20, width=1, norm="batch"), x)
    assert len(spec.groups) == len(unpadded.groups) == 12
    # the padded streams go on into the padded convolutions
    assert spec["layer2.0.conv1.conv.weight"][1] == spec["layer1.2.conv2.weight"][0]
    assert spec["layer3.0.conv1.conv.weight"][1] == spec["layer2.2.conv2.weight"][0]


class PaddedPositions(nn.Module):
    """Every padding mode over positions: nonzero constants, reflection, replication, circular,
    cropping by negative widths, and a pad tuple that names the channel axis with zero widths."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 5, 3)
        self.constant = nn.ConstantPad1d((2, 1), 0.5)
        self.reflect = nn.ReflectionPad1d(1)
        self.replicate = nn.ReplicationPad1d((0, 2))
        self.c2 = nn.Conv1d(5, 6, 3)
        self.circular = nn.CircularPad1d(1)
        self.c3 = nn.Conv2d(6, 4, 3)
        self.reflect2d = nn.ReflectionPad2d((1, 0, 2, 1))
        self.fc = nn.Linear(4 * 4 * 14, 3)

    def forward(self, x):                                            # (N, 2, 9)
        h = self.constant(torch.relu(self.c1(x)))                    # (N, 5, 10)
        h = F.pad(h, (1, 1, 0, 0), value=-1.0)                       # (N, 5, 12)
        h = self.reflect(self.replicate(F.pad(h, (1, 2), mode="reflect")))   # (N, 5, 19)
        h = self.circular(torch.tanh(self.c2(h)))                    # (N, 6, 19)
        h = F.pad(h, (-2, -1)).unsqueeze(2)                          # (N, 6, 1, 16)
        h = F.pad(h, (0, 0, 2, 2), mode="replicate")                 # (N, 6, 5, 16)
        h = self.reflect2d(self.c3(h))                               # (N, 4, 6, 15)
        return self.fc(F.pad(h, (0, -1, -1, -1)).flatten(1))         # (N, 4 * 4 * 14)


def test_every_padding_mode_over_positions_is_invariant():
    spec = assert_derived_spec_is_invariant(PaddedPositions(), (3, 2, 9))
    assert len(spec.groups) == 3
    assert spec.block("fc.weight", 1) == 4 * 14


class PadAfter(nn.Module):
    def __init__(self, pad, conv: bool):
        super().__init__()
        self.a = nn.Conv1d(2, 5, 3) if conv else nn.Linear(4, 5)
        self.pad = pad

    def forward(self, x):
        return self.pad(self.a(x)).flatten(1).sum(1)


@pytest.mark.parametrize("pad, conv, words", [
    (lambda h: F.pad(h, (0, 0, 1, 0)), True, ["'pad'", "pads axis 1 of a 3-d input, which "
                                              "holds the units", "(0, 0, 1, 0)"]),
    (lambda h: F.pad(h, (1, 1), value=0.0), False, ["pads axis 1 of a 2-d input"]),
    (lambda h: F.pad(h, (0, 0, 0, 0, 1, 0)), True, ["pads axis 0 of a 3-d input, the batch"]),
    (nn.ZeroPad2d(1), True, ["'pad' (ZeroPad2d)", "pads axis 1"]),
    (nn.ReflectionPad1d(1), False, ["'pad' (ReflectionPad1d)", "pads axis 1 of a 2-d input"]),
], ids=["channels", "features", "batch", "ZeroPad2d_channels", "ReflectionPad1d_features"])
def test_padding_the_units_or_the_batch_is_refused(pad, conv, words):
    x = torch.randn(3, 2, 6) if conv else torch.randn(3, 4)
    with pytest.raises(ValueError) as info:
        spec_from_module(PadAfter(pad, conv), x)
    for word in words:
        assert word in str(info.value)
    assert spec_from_module(PadAfter(pad, conv), x, unknown="fix")["a.weight"][0] is None


def test_untraceable_module_gives_a_clear_error():
    with pytest.raises(ValueError, match="could not trace DataDependent"):
        spec_from_module(DataDependent(), torch.randn(2, 4))
    nested = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), DataDependent()))
    with pytest.raises(ValueError, match=r"could not trace Sequential \(in module '1.1', "
                                         r"DataDependent\)"):
        spec_from_module(nested, torch.randn(2, 4))


class PoolOverUnits(nn.Module):
    """Pooling whose window runs over the units (a Linear layer's features): not safe."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.a, self.pool, self.b = nn.Linear(4, 8), pool, nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.pool(self.a(x)))


class TensorClamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.clamp(self.a(x), max=self.b(x)).clamp_min(-0.2))


class PositionalReductions(nn.Module):
    """``norm(2, 1)`` has ``p`` first; ``std(0, True)`` has ``unbiased`` second: neither is a
    ``dim`` / ``keepdim`` pair."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 5, 3)
        self.a, self.fc = nn.Linear(7, 7), nn.Linear(7, 3)

    def forward(self, x):
        h = self.a(self.conv(x).norm(2, 1))   # (N, 7): the channels are reduced away
        return self.fc(h - h.std(0, True))    # std over the batch, kept: units on axis 1


class NormsAndDropout(nn.Module):
    """InstanceNorm (affine), LayerNorm over the positions and over (C, L), dropout."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm1d(6, affine=True)
        self.ln_positions = nn.LayerNorm(9)
        self.ln_all = nn.LayerNorm([6, 9])
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.ln_all(self.ln_positions(self.inorm(self.c1(x))))
        h = nn.functional.dropout(self.drop(torch.relu(h)), 0.1, training=self.training)
        return self.fc(h.mean(-1))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        h[:, 0] += 1.0  # writes into one unit through an index
        return self.b(h)


@pytest.mark.parametrize("pool, shape", [
    (nn.MaxPool1d(3, 1, 1), (5, 4)), (nn.AvgPool1d(3, 1, 1), (5, 4)),
    (nn.MaxPool1d(3, 1, 1), (5, 2, 4)), (nn.AdaptiveAvgPool1d(8), (5, 4)),
])
def test_pooling_over_the_units_is_refused(pool, shape):
    with pytest.raises(ValueError, match="pools over the last 1 axes"):
        spec_from_module(PoolOverUnits(pool), torch.randn(*shape))
    # pooling over positions (units on the channel axis) stays permutable
    net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(3, 1, 10)
    assert_invariant(net, x, spec_from_module(net, x))


@pytest.mark.parametrize("cls, shape", [(TensorClamp, (5, 4)), (PositionalReductions, (4, 2, 9)),
                                        (NormsAndDropout, (3, 2, 9))])
def test_operations_with_extra_operands_or_arguments_are_invariant(cls, shape):
    spec = assert_derived_spec_is_invariant(cls(), shape)
    if cls is TensorClamp:  # the bound's units are compared elementwise with the input's
        assert spec["a.weight"][0] == spec["b.weight"][0]


def test_writes_through_an_index_are_refused():
    with pytest.raises(ValueError, match="could not trace InPlace .*item assignment"):
        spec_from_module(InPlace(), torch.randn(2, 4))


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        spec_from_module(lambda x: x, torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown must be"):
        spec_from_module(models.mlp(4, [3], 2), torch.randn(2, 4), unknown="ignore")
    with pytest.raises(ValueError, match="does not fit|failed"):
        spec_from_module(models.mlp(4, [3], 2), torch.randn(2, 5))


def test_derivation_does_not_modify_the_module():
    net = models.resnet(8, norm="batch").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spec_from_module(net, torch.randn(4, 3, 8, 8))
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k


# ------------------------------------------------------------------------------ the format --
def test_spec_validation_errors_name_the_problem():
    net = models.mlp(4, [3], 2)
    shapes = state_shapes(net)
    spec = PermutationSpec({"0.weight": ("P", None), "missing.weight": ("P", None)})
    with pytest.raises(ValueError, match="missing.weight"):
        spec.group_sizes(shapes)
    spec = PermutationSpec({"0.weight": ("P", None, None)})
    with pytest.raises(ValueError, match="3 axes for '0.weight'"):
        spec.group_sizes(shapes)
    spec = PermutationSpec({"0.weight": ("P", None), "2.weight": ("P", None)})
    with pytest.raises(ValueError, match="group 'P' has 3 units"):
        spec.group_sizes(shapes)
    with pytest.raises(TypeError, match="one entry per axis"):
        PermutationSpec({"0.weight": "P"})
    with pytest.raises(TypeError, match="group name"):
        PermutationSpec({"0.weight": (3, None)})
    with pytest.raises(ValueError, match="not permuted"):
        PermutationSpec({"0.weight": ("P", None)}, blocks={"0.weight": {1: 2}})


class InvariantScale(nn.Module):
    """``h * h.amax()`` (an invariant scalar) and ``h + x`` (the unpermutable input)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 4)
        self.c = nn.Linear(4, 3)
        self.d = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h * h.amax()            # a full reduction is invariant: h keeps its group
        skip = self.b(h) + x        # adds the input: b's units are pinned to the input order
        return self.d(torch.tanh(self.c(skip)))


class SharedLayer(nn.Module):
    """One layer applied twice: to the input and to a hidden activation."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.shared(torch.relu(self.shared(x)))))


def test_invariant_scalars_do_not_pin_units_but_fixed_operands_do():
    net = InvariantScale()
    x = torch.randn(3, 4)
    spec = spec_from_module(net, x)
    assert spec["a.weight"][0] is not None
    assert spec["b.weight"][0] is None
    assert spec["c.weight"][0] is not None
    assert_invariant(net, x, spec)


def test_a_layer_reused_on_the_input_is_left_unpermuted():
    net = SharedLayer()
    x = torch.randn(3, 4)
    spec = spec_from_module(net, x)
    # shared's output feeds shared's input, which also sees the network input: fixed
    assert spec["shared.weight"] == (None, None)
    with torch.no_grad():
        assert torch.equal(net(x), permute(net, {}, spec)(x))
