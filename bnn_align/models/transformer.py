"""A small transformer encoder classifier: vectors cut into patch tokens, learned positions,
``nn.TransformerEncoderLayer`` blocks, mean pooling over the tokens.

Built for MNIST-1D (40 values -> 10 tokens of 4) so that it trains as a BNN here in minutes;
:func:`bnn_align.spec_from_module` derives its residual stream, its heads and the units within
them (see :mod:`bnn_align.symmetry.attention`).
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_int

__all__ = ["transformer", "PatchTransformer"]


class PatchTransformer(nn.Module):
    """Encoder classifier over patches of a vector (see :func:`transformer`).

    Parameter names: ``embed`` (the patch embedding), ``pos`` (learned positions, shape
    ``(1, tokens, dim)``), ``encoder.layers.<i>.*`` (``self_attn.in_proj_weight``,
    ``linear1``, ``norm1``, ...), ``norm`` and ``head``.

    Examples
    --------
    >>> import torch
    >>> from bnn_align import models
    >>> net = models.transformer(40, 10, dim=16, heads=2, layers=1)
    >>> isinstance(net, models.PatchTransformer), tuple(net.pos.shape)
    (True, (1, 10, 16))
    """

    def __init__(self, in_features: int, num_classes: int, patch: int, dim: int,
                 heads: int, layers: int, hidden: int):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, in_features // patch, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(x.shape[0], -1, self.patch)
        h = self.embed(tokens) + self.pos
        return self.head(self.norm(self.encoder(h)).mean(1))


def transformer(
    in_features: int = 40,
    num_classes: int = 10,
    *,
    patch: int = 4,
    dim: int = 64,
    heads: int = 4,
    layers: int = 2,
    hidden: int | None = None,
) -> PatchTransformer:
    """A pre-norm transformer encoder classifier over patches of a vector.

    Parameters
    ----------
    in_features : int
        Length of the input vector; inputs have shape ``(batch, in_features)``.
    num_classes : int
        Number of classes (output logits).
    patch : int
        Values per token; must divide ``in_features`` (``in_features // patch`` tokens).
    dim : int
        Model dimension (the residual stream); must be a multiple of ``heads``.
    heads : int
        Attention heads per layer (each of ``dim // heads`` dimensions).
    layers : int
        Encoder layers.
    hidden : int, optional
        Width of each layer's MLP (default ``2 * dim``).

    Returns
    -------
    PatchTransformer

    Raises
    ------
    ValueError
        A size that is not a positive integer (naming it), a patch that does not divide
        ``in_features``, or ``dim`` not a multiple of ``heads``.

    Examples
    --------
    >>> import torch
    >>> import bnn_align as ba
    >>> from bnn_align import models
    >>> net = models.transformer(40, 10, dim=16, heads=4, layers=1)
    >>> net(torch.randn(3, 40)).shape
    torch.Size([3, 10])
    >>> spec = ba.spec_from_module(net, torch.zeros(2, 40))
    >>> spec["encoder.layers.0.self_attn.out_proj.weight"]
    ('P_embed', 'P_encoder.layers.0.self_attn.v')
    >>> spec.heads
    {'H_encoder.layers.0.self_attn': {'P_encoder.layers.0.self_attn.qk': 4, 'P_encoder.layers.0.self_attn.v': 4}}
    >>> models.transformer(40, 10, patch=3)
    Traceback (most recent call last):
        ...
    ValueError: patch must divide in_features: 3 does not divide 40
    """
    in_features = check_int("in_features", in_features)
    num_classes = check_int("num_classes", num_classes)
    patch, dim = check_int("patch", patch), check_int("dim", dim)
    heads, layers = check_int("heads", heads), check_int("layers", layers)
    hidden = 2 * dim if hidden is None else check_int("hidden", hidden)
    if in_features % patch:
        raise ValueError(f"patch must divide in_features: {patch} does not divide {in_features}")
    if dim % heads:
        raise ValueError(f"dim must be a multiple of heads: {dim} is not a multiple of {heads}")
    return PatchTransformer(in_features, num_classes, patch, dim, heads, layers, hidden)
