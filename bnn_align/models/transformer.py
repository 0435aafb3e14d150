"""A small transformer encoder classifier: vectors cut into patch tokens, learned positions,
pre-norm encoder blocks, mean pooling over the tokens.

Built for MNIST-1D (40 values -> 10 tokens of 4) so that it trains as a BNN here in minutes;
:func:`bnn_align.spec_from_module` derives its residual stream, its heads and the units within
them (see :mod:`bnn_align.symmetry.attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int

__all__ = ["transformer", "PatchTransformer"]


class Attention(nn.Module):
    """Multi-head self-attention written out (``q``, ``k``, ``v`` and ``proj`` layers), so that
    ``torch.fx`` traces it and batched weight draws (``torch.vmap``) run it without falling back
    from fused kernels that have no batching rule (``nn.MultiheadAttention``'s and
    ``F.scaled_dot_product_attention``'s)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = self.k(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = self.v(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = F.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
        y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm encoder block: ``x + attn(norm1(x))``, then ``x + fc2(gelu(fc1(norm2(x))))``."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchTransformer(nn.Module):
    """Encoder classifier over patches of a vector (see :func:`transformer`).

    Parameter names: ``embed`` (the patch embedding), ``pos`` (learned positions, shape
    ``(1, tokens, dim)``), ``blocks.<i>.*`` (``norm1``, ``attn.q``, ``attn.k``, ``attn.v``,
    ``attn.proj``, ``norm2``, ``fc1``, ``fc2``), ``norm`` and ``head``.

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
        self.blocks = nn.ModuleList([Block(dim, heads, hidden) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


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
    >>> spec["blocks.0.attn.proj.weight"]          # residual stream x value dimensions
    ('P_embed', 'P_blocks.0.attn.v')
    >>> spec.heads                                  # 4 heads of 4 dimensions
    {'H_blocks.0.attn.q': {'P_blocks.0.attn.q': 4, 'P_blocks.0.attn.v': 4}}
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
