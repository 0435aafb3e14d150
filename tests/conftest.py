"""Shared fixtures: small networks, Bayesian models and one guide of every kind."""

from __future__ import annotations

import pyro
import pytest
import torch

from bnn_align import BayesianNetwork, guides, models
from bnn_align.symmetry.permutation import permute_tensor

GUIDE_KINDS = ["mean_field", "diagonal", "low_rank", "full_rank", "delta"]


@pytest.fixture(autouse=True)
def _isolated_pyro():
    """Every test starts with a seeded RNG and an empty Pyro param store."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


class Recurrent(torch.nn.Module):
    """``Linear -> recurrent layer -> Linear -> ReLU -> Linear -> ReLU -> Linear`` on sequences
    ``(batch, time, 4)`` (the last step's output goes on), or on vectors ``(batch, 4)`` for a
    cell such as ``nn.GRUCell``."""

    def __init__(self, layer: type = torch.nn.LSTM):
        super().__init__()
        self.inp = torch.nn.Linear(4, 6)
        cell = issubclass(layer, torch.nn.RNNCellBase)
        self.rnn = layer(6, 5) if cell else layer(6, 5, batch_first=True)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3), torch.nn.ReLU(),
            torch.nn.Linear(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rnn(torch.relu(self.inp(x)))
        if not isinstance(self.rnn, torch.nn.RNNCellBase):
            h = h[0][:, -1]  # (output, state) -> the output at the last step
        return self.head(h)


def make_guide(kind: str, model: BayesianNetwork, *, spread: float = 0.05, seed: int = 0):
    """A guide of the given kind whose scales and factors are random (not the init values),
    so tests can tell a moved parameter from an unmoved one."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "mean_field":
        guide = guides.mean_field(model)
        with torch.no_grad():
            for p in guide.scales.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) - 3)
            for p in guide.locs.parameters():
                p.add_(spread * torch.randn(p.shape, generator=gen))
    elif kind == "diagonal":
        guide = guides.diagonal(model)
        with torch.no_grad():
            guide.scale_unconstrained.copy_(torch.randn(guide.scale.shape, generator=gen) - 3)
    elif kind == "low_rank":
        guide = guides.low_rank(model, rank=3)
        with torch.no_grad():
            guide.scale_unconstrained.copy_(torch.randn(guide.scale.shape, generator=gen) - 3)
            guide.cov_factor.copy_(torch.randn(guide.cov_factor.shape, generator=gen))
    elif kind == "full_rank":
        guide = guides.full_rank(model)
        with torch.no_grad():
            guide.scale_unconstrained.copy_(torch.randn(guide.scale.shape, generator=gen) - 3)
            tril = guide.scale_tril_unconstrained
            tril.copy_(0.1 * torch.randn(tril.shape, generator=gen))
    elif kind == "delta":
        guide = guides.delta(model)
    else:
        raise ValueError(kind)
    return guide


@pytest.fixture
def small_mlp_model() -> BayesianNetwork:
    return BayesianNetwork(models.mlp(5, [7, 6], 3), input_shape=(5,))


def group_sizes(model: BayesianNetwork) -> dict[str, int]:
    return model.spec.group_sizes({k: v.shape for k, v in model.net.state_dict().items()})


def permute_sample(v: torch.Tensor, spec, site: str, perms) -> torch.Tensor:
    """Permute a batch of weights ``(S, *site_shape)`` of one site."""
    if site not in spec:
        return v
    return permute_tensor(v.movedim(0, -1), spec[site], perms,
                          spec.blocks.get(site)).movedim(-1, 0)


def permuted_noise(view, perms, spec, noise, rotation=None):
    """Move the per-weight noise of a sample with the weights; the factor noise ``z`` becomes
    ``R^T z`` when the factor was rotated by ``R``."""
    eps, z = noise
    pos, parts = 0, []
    for site, loc in view.loc.items():
        block = eps[:, pos:pos + loc.numel()].reshape(-1, *loc.shape)
        parts.append(permute_sample(block, spec, site, perms).reshape(len(eps), -1))
        pos += loc.numel()
    if z is not None and rotation is not None:
        z = z @ rotation
    return torch.cat(parts, dim=1), z
