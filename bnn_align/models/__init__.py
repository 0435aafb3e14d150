"""The model stage: plain ``nn.Module`` builders for the networks the studies need.

* :mod:`~bnn_align.models.networks`: MLPs, 1-D and 2-D CNNs and ResNets with readable parameter
  names (``"0.weight"``, ``"layer1.0.conv1.weight"``), standard or with reduced symmetry
  (``asymmetry="w"`` or ``"sigma"``).
* :mod:`~bnn_align.models.asymmetric`: layers without permutation symmetry (W-asymmetric linear
  and convolutional layers with fixed entries, the FiGLU nonlinearity).
* :mod:`~bnn_align.models.transformer`: a small transformer encoder classifier over patch
  tokens.

Nothing here knows about Pyro: :class:`bnn_align.BayesianNetwork` turns any of them (or any other
module) into a Bayesian model, and :func:`bnn_align.spec_from_module` derives their symmetries.
"""

from .asymmetric import (AsymConv1d, AsymConv2d, AsymLinear, FiGLU, default_num_fixed,
                         layer_seed)
from .networks import BasicBlock, ResNet, cnn1d, cnn2d, mlp, resnet
from .transformer import PatchTransformer, transformer

__all__ = ["mlp", "cnn1d", "cnn2d", "resnet", "BasicBlock", "ResNet", "AsymLinear",
           "AsymConv1d", "AsymConv2d", "FiGLU", "default_num_fixed", "layer_seed", "transformer",
           "PatchTransformer"]
