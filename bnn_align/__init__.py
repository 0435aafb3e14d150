"""bnn_align: align Bayesian neural network posteriors over permutation symmetries.

Data flows one way: model -> guide -> spec -> match -> path -> marginal estimates -> report.
"""

import warnings

with warnings.catch_warnings():
    # tqdm.auto warns in notebooks without ipywidgets; its text progress bars still work
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

from . import diagnostics, guides
from .bayesian import BayesianNetwork, Categorical, FanInPrior, Gaussian, NormalPrior, fit
from .curves import Curve, fit_curve
from .diagnostics import to_inference_data
from .marginal import Barrier, LossCurve, marginal_loss
from .matching import Alignment, alignment_cost, match
from .paths import Path, interpolate
from .permute import permute
from .posterior import GaussianView, as_gaussian
from .spec import PermutationSpec
from .symmetry import spec_from_module

__version__ = "0.1.0"

__all__ = [
    "Alignment", "Barrier", "BayesianNetwork", "Categorical", "Curve", "FanInPrior", "Gaussian",
    "GaussianView", "LossCurve", "NormalPrior", "Path", "PermutationSpec", "alignment_cost",
    "as_gaussian", "fit", "fit_curve", "diagnostics", "guides", "interpolate", "marginal_loss",
    "match", "permute", "spec_from_module", "to_inference_data",
]
