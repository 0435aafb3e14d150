"""Attention: head sets in PermutationSpec, spec_from_module on transformers (invariance under
every derived group, heads included; permutations that split a head change the function), bad
input, and permuting guides over a transformer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnn_align import (BayesianNetwork, PermutationSpec, as_gaussian, guides, permute,
                       spec_from_module)
from bnn_align.symmetry.permutation import compose, invert, random_perms
from bnn_align.symmetry.spec import join_heads, split_heads


# ----------------------------------------------------------------------------- networks --
class MHA(nn.Module):
    """Linear -> MultiheadAttention (self, or cross with a differently sized memory) + residual
    -> Linear, on ``(batch, time, 5)`` (or ``(time, batch, 5)`` without ``batch_first``)."""

    def __init__(self, batch_first=True, bias=True, kdim=None, bias_kv=False):
        super().__init__()
        self.emb = nn.Linear(5, 16)
        self.mem = nn.Linear(5, kdim or 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, bias=bias, kdim=kdim,
                                          vdim=kdim, add_bias_kv=bias_kv)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x)
        m = self.mem(x)
        a, _ = self.attn(h, m, m)
        return self.out(a + h)


class Encoder(nn.Module):
    def __init__(self, norm_first, batch_first=True, activation="relu"):
        super().__init__()
        self.inp = nn.Linear(3, 16)
        self.layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, norm_first=norm_first,
                                                batch_first=batch_first, activation=activation)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(self.layer(self.inp(x)))


class EncoderStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True,
                                           activation="gelu")
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16),
                                         enable_nested_tensor=False)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)).mean(1))


class Decoder(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        self.inp, self.mem = nn.Linear(3, 16), nn.Linear(3, 16)
        self.layer = nn.TransformerDecoderLayer(16, 4, 24, dropout=0.0, batch_first=True,
                                                norm_first=norm_first)
        self.out = nn.Linear(16, 2)

    def forward(self, x, memory):
        return self.out(self.layer(self.inp(x), self.mem(memory)))


class CausalSelfAttention(nn.Module):
    """Minimal GPT attention: sizes unpacked from ``x.size()``, a causal-mask buffer sliced to
    the sequence length, or ``F.scaled_dot_product_attention``."""

    def __init__(self, dim, heads, block, sdpa=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.heads, self.sdpa = heads, sdpa
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q = self.q(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = self.k(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = self.v(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class PackedCausalSelfAttention(nn.Module):
    """nanoGPT's attention: one packed ``c_attn`` layer whose output is split into q, k, v."""

    def __init__(self, dim, heads, block, sdpa=False):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n_head, self.n_embd = heads, dim
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class GPT(nn.Module):
    def __init__(self, vocab=11, dim=16, heads=4, block=8, layers=2, sdpa=False, packed=False):
        super().__init__()
        attention = PackedCausalSelfAttention if packed else CausalSelfAttention
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.ln1 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(layers)])
        self.ln2 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(layers)])
        self.attn = nn.ModuleList([attention(dim, heads, block, sdpa) for _ in range(layers)])
        self.fc = nn.ModuleList([nn.Linear(dim, 4 * dim) for _ in range(layers)])
        self.fc_out = nn.ModuleList([nn.Linear(4 * dim, dim) for _ in range(layers)])
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for ln1, attn, ln2, fc, out in zip(self.ln1, self.attn, self.ln2, self.fc, self.fc_out):
            x = x + attn(ln1(x))
            x = x + out(F.gelu(fc(ln2(x))))
        return self.head(self.ln_f(x))


class ViT(nn.Module):
    """Patch embedding by a strided convolution, a learned positional parameter, one encoder
    layer, mean pooling over the tokens."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 16, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 4, 16))
        self.layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.out(self.norm(self.layer(h)).mean(1))


def shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def invariance(net, inputs, seed=0):
    """Largest output change under a random element of every derived group (heads included),
    relative to the largest output; and the spec and the permutations used."""
    net = net.double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    spec = spec_from_module(net, inputs)
    sizes = spec.group_sizes(shapes(net))
    perms = random_perms(sizes, torch.Generator().manual_seed(seed), heads=spec.heads)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moved = permute(net, perms, spec)
    with torch.no_grad():
        y, z = net(*inputs), moved(*inputs)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    return float((y - z).abs().max() / y.abs().max()), spec, perms, moved


def x3(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5))


CASES = {
    "mha_packed_batch_first": (lambda: MHA(), (x3(2, 6, 5),)),
    "mha_packed_time_first": (lambda: MHA(batch_first=False), (x3(6, 2, 5),)),
    "mha_no_bias": (lambda: MHA(bias=False), (x3(2, 6, 5),)),
    "mha_bias_kv": (lambda: MHA(bias_kv=True), (x3(2, 6, 5),)),
    "mha_separate_batch_first": (lambda: MHA(kdim=6), (x3(2, 6, 5),)),
    "mha_separate_time_first": (lambda: MHA(batch_first=False, kdim=6), (x3(6, 2, 5),)),
    "encoder_post_norm": (lambda: Encoder(False), (x3(2, 5, 3),)),
    "encoder_pre_norm": (lambda: Encoder(True), (x3(2, 5, 3),)),
    "encoder_time_first_gelu": (lambda: Encoder(True, False, "gelu"), (x3(5, 2, 3),)),
    "encoder_stack": (lambda: EncoderStack(), (x3(2, 5, 3),)),
    "decoder_post_norm": (lambda: Decoder(False), (x3(2, 5, 3), x3(2, 4, 3))),
    "decoder_pre_norm": (lambda: Decoder(True), (x3(2, 5, 3), x3(2, 4, 3))),
    "gpt_causal_mask": (lambda: GPT(), (torch.randint(0, 11, (2, 6)),)),
    "gpt_sdpa": (lambda: GPT(sdpa=True), (torch.randint(0, 11, (2, 6)),)),
    "nanogpt_packed_split": (lambda: GPT(packed=True), (torch.randint(0, 11, (2, 6)),)),
    "vit_patches": (lambda: ViT(), (x3(2, 1, 8, 8),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_derived_group_heads_included_leaves_the_function_unchanged(case):
    build, inputs = CASES[case]
    torch.manual_seed(0)
    net = build()
    head_moved = False
    for seed in range(3):
        diff, spec, perms, moved = invariance(net, inputs, seed)
        assert diff < 1e-12, (case, diff)
        head_moved |= any(
            not torch.equal(split_heads(perms[g], d)[0], torch.arange(len(perms[g]) // d))
            for members in spec.heads.values() for g, d in members.items())
    # every attention layer has a head set of its query/key and its value group, more than
    # one head, and the random element moved the heads
    assert spec.heads
    for members in spec.heads.values():
        assert len(members) == 2
        for group, d in members.items():
            count = spec.group_sizes(shapes(net))[group] // d
            assert count >= 2
    assert head_moved
    changed = [k for k, v in moved.state_dict().items()
               if not torch.equal(v, net.double().state_dict()[k])]
    assert changed


def test_mha_spec_ties_query_key_rows_and_value_rows_to_out_columns():
    net = MHA()
    spec = spec_from_module(net, x3(2, 6, 5))
    qk, v = spec["attn.in_proj_weight"][0][0], spec["attn.in_proj_weight"][0][2]
    residual = spec["emb.weight"][0]
    assert spec["attn.in_proj_weight"] == ((qk, qk, v), residual)
    assert spec["attn.out_proj.weight"] == (residual, v)
    assert spec["attn.in_proj_bias"] == ((qk, qk, v),)
    assert spec.heads == {"H_attn": {qk: 4, v: 4}}
    # the packed projection reads key and value through the same columns: one residual group
    assert spec["mem.weight"][0] == residual


def test_gpt_spec_shares_the_residual_stream_and_pins_the_mask_buffer():
    net = GPT()
    spec = spec_from_module(net, torch.randint(0, 11, (2, 6)))
    r = spec["wte.weight"][1]
    assert spec["wpe.weight"] == (None, r)
    for name in ("ln1.0.weight", "ln2.1.bias", "ln_f.weight"):
        assert spec[name] == (r,)
    assert spec["head.weight"] == (None, r)
    assert spec["attn.0.proj.weight"][0] == r and spec["fc_out.1.weight"][0] == r
    assert spec["attn.0.q.weight"][0] == spec["attn.0.k.weight"][0] != spec["attn.0.v.weight"][0]
    assert spec["attn.0.bias"] == (None,) * 4
    assert len(spec.heads) == 2


def test_vit_positional_parameter_moves_with_the_residual_stream():
    spec = spec_from_module(ViT(), x3(2, 1, 8, 8))
    assert spec["pos"] == (None, None, spec["patch.weight"][0])


@pytest.mark.parametrize("case", ["mha_packed_batch_first", "gpt_causal_mask",
                                  "encoder_pre_norm"])
def test_a_permutation_that_splits_a_head_changes_the_function(case):
    """Swapping one query/key dimension between two heads (a within-head permutation applied
    across heads, as a single full-width query/key permutation would) is rejected by the head
    spec and, applied without it, changes the outputs: the head sets are not too strict."""
    build, inputs = CASES[case]
    torch.manual_seed(0)
    net = build().double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    spec = spec_from_module(net, inputs)
    sizes = spec.group_sizes(shapes(net))
    identity = {g: torch.arange(n) for g, n in sizes.items()}
    (head, members), *_ = spec.heads.items()
    qk, d = next(iter(members.items()))
    split = torch.arange(sizes[qk])
    split[[1, d + 1]] = split[[d + 1, 1]]  # unit 1 of heads 0 and 1 change places
    with pytest.raises(ValueError, match="splits head 0"):
        permute(net, {**identity, qk: split}, spec)
    loose = PermutationSpec(spec.axes_to_perm, blocks=spec.blocks)  # the heads forgotten
    moved = permute(net, {**identity, qk: split}, loose)
    with torch.no_grad():
        y, z = net(*inputs), moved(*inputs)
    assert float((y - z).abs().max() / y.abs().max()) > 1e-3
    # the same swap inside one head is a symmetry
    inside = torch.arange(sizes[qk])
    inside[[0, 1]] = inside[[1, 0]]
    with torch.no_grad():
        same = permute(net, {**identity, qk: inside}, spec)(*inputs)
    assert float((y - same).abs().max() / y.abs().max()) < 1e-12


def test_head_groups_of_one_set_must_move_heads_alike():
    net = MHA()
    spec = spec_from_module(net, x3(2, 6, 5))
    sizes = spec.group_sizes(shapes(net))
    (members,) = spec.heads.values()
    qk, v = members
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    perms[qk] = join_heads(torch.tensor([1, 0, 2, 3]), torch.arange(4).repeat(4, 1))
    with pytest.raises(ValueError, match="move the heads of head set 'H_attn' differently"):
        permute(net, perms, spec)
    perms[v] = join_heads(torch.tensor([1, 0, 2, 3]), torch.stack([torch.randperm(4)
                                                                   for _ in range(4)]))
    permute(net, perms, spec)  # the same head map: fine


# -------------------------------------------------------------------------------- the spec --
def test_split_and_join_heads_are_inverse_and_compose_stays_in_the_group():
    gen = torch.Generator().manual_seed(0)
    sizes = {"qk": 12, "v": 8}
    heads = {"H": {"qk": 3, "v": 2}}
    a, b = random_perms(sizes, gen, heads), random_perms(sizes, gen, heads)
    for p in (a, b, compose(a, b), invert(a)):
        h_qk, w_qk = split_heads(p["qk"], 3)
        h_v, w_v = split_heads(p["v"], 2)
        assert torch.equal(h_qk, h_v)
        assert torch.equal(join_heads(h_qk, w_qk), p["qk"])
        assert sorted(h_qk.tolist()) == [0, 1, 2, 3]


def test_spec_without_heads_is_git_rebasins_format_and_with_heads_round_trips():
    axes = {"w": ("A", None), "o": (None, "A")}
    plain = PermutationSpec(axes)
    assert plain.heads == {} and "heads" not in plain.to_dict()
    headed = PermutationSpec(axes, heads={"H": {"A": 2}})
    assert headed != plain
    assert PermutationSpec.from_dict(headed.to_dict()) == headed
    assert headed.restrict(["w"]).heads == {"H": {"A": 2}}
    assert headed.restrict(["nothing"]).heads == {}
    renamed = PermutationSpec({"w": ("B", None), "o": (None, "B")}, heads={"K": {"B": 2}})
    assert renamed == headed  # group and head-set names are labels
    assert PermutationSpec(axes, heads={"H": {"A": 4}}) != headed


def test_bad_head_sets_are_named():
    axes = {"w": ("A", "B"), "o": (None, "A")}
    with pytest.raises(ValueError, match="names group 'C'"):
        PermutationSpec(axes, heads={"H": {"C": 2}})
    with pytest.raises(ValueError, match="in head sets 'H' and 'K'"):
        PermutationSpec(axes, heads={"H": {"A": 2}, "K": {"A": 2}})
    with pytest.raises(ValueError, match="head length >= 1"):
        PermutationSpec(axes, heads={"H": {"A": 0}})
    with pytest.raises(TypeError, match="heads must be a mapping"):
        PermutationSpec(axes, heads=[("H", "A")])
    spec = PermutationSpec(axes, heads={"H": {"A": 3}})
    with pytest.raises(ValueError, match="not a multiple of its head length 3"):
        spec.group_sizes({"w": (8, 4), "o": (2, 8)})
    spec = PermutationSpec(axes, heads={"H": {"A": 2, "B": 2}})
    with pytest.raises(ValueError, match="disagree on the number of heads"):
        spec.group_sizes({"w": (8, 4), "o": (2, 8)})


def test_a_group_seen_only_in_a_packed_concatenation_gets_its_size():
    spec = PermutationSpec({"in": (("Q", "Q", "V"), None), "out": (None, "V")})
    assert spec.group_sizes({"in": (24, 3), "out": (2, 8)}) == {"V": 8, "Q": 8}


# ------------------------------------------------------------------------------- bad input --
class FlippedHeads(nn.Module):
    """Reverses the order of the heads of the values only: not a symmetry."""

    def __init__(self):
        super().__init__()
        self.q, self.v, self.o = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, 2, 4).transpose(1, 2)
        v = self.v(x).view(B, T, 2, 4).transpose(1, 2).flip(1)
        y = F.softmax(q @ q.transpose(-2, -1), dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, 8))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(self.attn(x, x, x)[0])


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)


class ActivationMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.emb(x)
        mask = h[..., 0] > 0  # which positions to ignore depends on a permuted unit
        return self.attn(h, h, h, key_padding_mask=mask)[0]


class OddActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True,
                                                activation=lambda t: t - t.mean(-1, keepdim=True))

    def forward(self, x):
        return self.layer(self.inp(x))


@pytest.mark.parametrize("cls, x, words", [
    (FlippedHeads, x3(2, 3, 4), ["flip", "heads"]),
    (DataDependent, x3(2, 3, 8), ["'inner'", "Branchy", "could not trace"]),
    (ActivationMask, x3(2, 3, 4), ["getitem"]),
    (OddActivation, x3(2, 3, 3), ["'layer'", "TransformerEncoderLayer", "activation"]),
])
def test_bad_input_is_refused_naming_the_module(cls, x, words):
    with pytest.raises(ValueError) as info:
        spec_from_module(cls(), x)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_fixing_what_is_refused_stays_invariant():
    net = FlippedHeads().double().eval()
    x = x3(2, 3, 4).double()
    spec = spec_from_module(net, x, unknown="fix")
    sizes = spec.group_sizes(shapes(net))
    perms = random_perms(sizes, torch.Generator().manual_seed(0), heads=spec.heads)
    with torch.no_grad():
        assert torch.allclose(net(x), permute(net, perms, spec)(x), atol=1e-12)


# ------------------------------------------------------------------------ every posterior --
@pytest.mark.parametrize("kind", ["mean_field", "diagonal", "low_rank", "full_rank", "delta"])
def test_permuting_a_guide_over_a_transformer_moves_every_part_with_the_heads(kind):
    model = BayesianNetwork(Encoder(True), input_shape=(5, 3))
    guide = getattr(guides, kind)(model) if kind != "low_rank" else guides.low_rank(model, 2)
    spec = model.spec
    assert spec.heads
    sizes = spec.group_sizes(shapes(model.net))
    perms = random_perms(sizes, torch.Generator().manual_seed(3), heads=spec.heads)
    before = as_gaussian(guide)
    after = as_gaussian(permute(guide, perms))
    expected = permute(dict(before.loc), perms, spec)
    for site in before.sites:
        assert torch.equal(after.loc[site], expected[site]), site
    if before.scale is not None and kind != "full_rank":
        moved = permute(dict(before.scale), perms, spec)
        for site in before.sites:
            assert torch.allclose(after.scale[site], moved[site], rtol=1e-6), site


# -------------------------------------------------------------------------------- matching --
def test_head_assignment_is_the_best_element_of_the_head_symmetry():
    """Brute force over every head permutation and every within-head permutation of two
    groups (3 heads of 2 and of 3 units: 6 * 2^3 * 6^3 elements)."""
    import itertools

    from bnn_align.matching._descent import head_assignment

    rng = torch.Generator().manual_seed(0)
    lengths = {"qk": 2, "v": 3}
    sims = {g: torch.randn(3 * d, 3 * d, generator=rng).numpy() for g, d in lengths.items()}
    found = head_assignment(sims, lengths)

    def value(g, perm):
        return float(sims[g][range(len(perm)), perm].sum())

    best = -math.inf
    for heads in itertools.permutations(range(3)):
        total = 0.0
        for g, d in lengths.items():
            # within each head the best of all d! permutations, heads fixed
            for h in range(3):
                block = sims[g][h * d:(h + 1) * d, heads[h] * d:(heads[h] + 1) * d]
                total += max(sum(block[i, w[i]] for i in range(d))
                             for w in itertools.permutations(range(d)))
        best = max(best, total)
    got = sum(value(g, found[g].numpy()) for g in lengths)
    assert got == pytest.approx(best, rel=1e-6)
    assert torch.equal(split_heads(found["qk"], 2)[0], split_heads(found["v"], 3)[0])


def transformer_model():
    from bnn_align import models
    torch.manual_seed(0)
    return BayesianNetwork(models.transformer(40, 10, dim=16, heads=4, layers=2),
                           input_shape=(40,))


def spread_guide(kind, model, seed):
    guide = guides.mean_field(model) if kind == "mean_field" else guides.low_rank(model, 3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return guide


@pytest.mark.parametrize("kind", ["mean_field", "low_rank"])
def test_planted_heads_and_units_are_recovered_without_a_spec(kind):
    from bnn_align import match

    model = transformer_model()
    guide_a = spread_guide(kind, model, 0)
    spec = model.spec
    sizes = spec.group_sizes(shapes(model.net))
    perms = random_perms(sizes, torch.Generator().manual_seed(1), heads=spec.heads)
    assert any(not torch.equal(split_heads(perms[g], d)[0], torch.arange(4))
               for members in spec.heads.values() for g, d in members.items())
    guide_b = permute(guide_a, perms)
    with torch.no_grad():  # a little noise on every parameter
        gen = torch.Generator().manual_seed(2)
        for p in guide_b.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
    result = match(guide_a, guide_b)
    truth = invert(perms)
    for g in truth:
        assert torch.equal(result.perms[g], truth[g]), g
    assert result.converged
    assert result.cost_after < 1e-3 * result.cost_before
    assert result.history == sorted(result.history, reverse=True)


def test_independent_transformer_posteriors_come_closer_keeping_heads_whole():
    from bnn_align import alignment_cost, match

    model = transformer_model()
    guide_a = spread_guide("mean_field", model, 0)
    guide_b = spread_guide("mean_field", model, 5)
    result = match(guide_a, guide_b)
    model.spec.check_heads(result.perms)  # raises if a head was split
    assert result.cost_after < result.cost_before
    assert result.history == sorted(result.history, reverse=True)
    assert alignment_cost(guide_a, guide_b, result.perms) == pytest.approx(result.cost_after,
                                                                           rel=1e-4)
    # the aligned posterior is the same distribution over functions: equal outputs at the means
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    loc_b = as_gaussian(guide_b).loc
    loc_aligned = as_gaussian(result.aligned).loc
    net_b, net_aligned = copy.deepcopy(model.net), copy.deepcopy(model.net)
    net_b.load_state_dict({k: v for k, v in loc_b.items()}, strict=False)
    net_aligned.load_state_dict({k: v for k, v in loc_aligned.items()}, strict=False)
    with torch.no_grad():
        y, z = net_b.double()(x.double()), net_aligned.double()(x.double())
    assert float((y - z).abs().max() / y.abs().max()) < 1e-5


def test_methods_that_do_not_keep_heads_whole_are_refused():
    from bnn_align import match

    model = transformer_model()
    guide_a, guide_b = spread_guide("mean_field", model, 0), spread_guide("mean_field", model, 1)
    with pytest.raises(ValueError, match="does not respect attention heads"):
        match(guide_a, guide_b, method="activation", data=torch.randn(8, 40))
    spec = model.spec
    sizes = spec.group_sizes(shapes(model.net))
    bad = {g: torch.arange(n) for g, n in sizes.items()}
    qk = next(iter(next(iter(spec.heads.values()))))
    bad[qk] = torch.roll(torch.arange(sizes[qk]), 1)  # shifts units across heads
    with pytest.raises(ValueError, match="splits head"):
        match(guide_a, guide_b, init=bad)


def test_move_heads_false_matches_only_within_heads():
    from bnn_align import match

    model = transformer_model()
    guide_a = spread_guide("mean_field", model, 0)
    spec = model.spec
    sizes = spec.group_sizes(shapes(model.net))
    perms = random_perms(sizes, torch.Generator().manual_seed(4), heads=spec.heads)
    within = {g: p for g, p in perms.items()}
    for members in spec.heads.values():
        for g, d in members.items():
            within[g] = join_heads(torch.arange(sizes[g] // d), split_heads(perms[g], d)[1])
    # heads in place, units moved within them: recovered exactly without the head step
    result = match(guide_a, permute(guide_a, within), move_heads=False)
    for g, p in invert(within).items():
        assert torch.equal(result.perms[g], p), g
    # heads moved as well: the head step is what brings the copy back
    moved = permute(guide_a, perms)
    fixed, free = match(guide_a, moved, move_heads=False), match(guide_a, moved)
    for members in spec.heads.values():
        for g, d in members.items():
            assert torch.equal(split_heads(fixed.perms[g], d)[0], torch.arange(sizes[g] // d))
    assert free.cost_after < 1e-6 * free.cost_before
    assert fixed.cost_after > 100 * free.cost_after + 1.0


class PerHeadBias(nn.Module):
    """Attention scores plus a constant that differs between heads (an ALiBi-like buffer):
    the heads may not move, nor, as a head set cannot pin only its heads, anything within
    them."""

    def __init__(self):
        super().__init__()
        self.emb, self.q, self.v = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.p, self.o = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("slopes", torch.randn(1, 2, 6, 6))

    def forward(self, x):
        B, T, C = x.shape
        h = self.emb(x)
        q = self.q(h).view(B, T, 2, 4).transpose(1, 2)
        v = self.v(h).view(B, T, 2, 4).transpose(1, 2)
        att = F.softmax(q @ q.transpose(-2, -1) + self.slopes[:, :, :T, :T], dim=-1)
        return self.o(self.p((att @ v).transpose(1, 2).reshape(B, T, 8)) + h)


def test_a_constant_per_head_pins_the_head_set_and_the_rest_still_moves():
    net = PerHeadBias().double().eval()
    x = x3(2, 5, 3).double()
    spec = spec_from_module(net, x)
    assert spec.heads == {}
    assert spec["q.weight"][0] is None and spec["v.weight"][0] is None
    assert spec["emb.weight"][0] is not None  # the residual stream is still permuted
    sizes = spec.group_sizes(shapes(net))
    perms = random_perms(sizes, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net(x), permute(net, perms, spec)(x), atol=1e-12)


class Rotary(nn.Module):
    """Rotary position embeddings (rotate-half form) on the queries and keys."""

    def __init__(self):
        super().__init__()
        self.emb, self.p, self.o = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        angles = torch.arange(6)[:, None] * torch.tensor([1.0, 0.1])[None]
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], -1))
        self.register_buffer("sin", torch.cat([angles.sin(), angles.sin()], -1))

    def rotate(self, t):
        return torch.cat([-t[..., 2:], t[..., :2]], -1)

    def forward(self, x):
        B, T, C = x.shape
        h = self.emb(x)
        q, k, v = (layer(h).view(B, T, 2, 4).transpose(1, 2) for layer in (self.q, self.k, self.v))
        cos, sin = self.cos[:T], self.sin[:T]
        q, k = q * cos + self.rotate(q) * sin, k * cos + self.rotate(k) * sin
        y = F.softmax(q @ k.transpose(-2, -1), -1) @ v
        return self.o(self.p(y.transpose(1, 2).reshape(B, T, 8)) + h)


def test_rotary_embeddings_are_refused_or_left_in_place():
    net = Rotary().double().eval()
    x = x3(2, 5, 3).double()
    with pytest.raises(ValueError, match="getitem.*split into attention heads"):
        spec_from_module(net, x)
    spec = spec_from_module(net, x, unknown="fix")
    assert spec.heads == {} and spec["q.weight"][0] is None and spec["v.weight"][0] is None
    assert spec["emb.weight"][0] is not None
    perms = random_perms(spec.group_sizes(shapes(net)), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net(x), permute(net, perms, spec)(x), atol=1e-12)


def test_nanogpt_packed_projection_rows_are_the_query_key_and_value_groups():
    net = GPT(packed=True)
    spec = spec_from_module(net, torch.randint(0, 11, (2, 6)))
    rows, cols = spec["attn.0.c_attn.weight"]
    qk, qk_again, v = rows
    assert qk == qk_again != v and cols == spec["wte.weight"][1]
    assert spec["attn.0.c_proj.weight"] == (cols, v)
    assert {qk, v} == set(next(g for g in spec.heads.values() if qk in g))


class SplitStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(4, 2), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        first, second = h.split(4, dim=1)  # the units of h are also used whole below
        return self.b(first * second) + self.c(h)


def test_splitting_units_that_are_used_elsewhere_is_refused():
    with pytest.raises(ValueError, match="splits units that are not the fresh output"):
        spec_from_module(SplitStream(), x3(2, 4))
