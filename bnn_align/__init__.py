"""bnn_align: align Bayesian neural network posteriors over permutation symmetries.

Data flows one way: model -> guide -> spec -> match -> path -> marginal estimates -> report,
and the package is laid out in that order:

* model: :mod:`bnn_align.models` (network builders), :mod:`~bnn_align.bayesian`
  (:class:`BayesianNetwork`, priors, :func:`fit`), :mod:`~bnn_align.data` (datasets);
* guide: :mod:`~bnn_align.guides` (ready-made autoguides), :mod:`~bnn_align.posterior` (the
  Gaussian view every posterior kind is read through), :mod:`~bnn_align.samples` (sample sets:
  MCMC chains, ensembles);
* spec: :mod:`bnn_align.symmetry`;  match: :mod:`bnn_align.matching`;  path: :mod:`bnn_align.paths`;
* marginal and report: :mod:`~bnn_align.marginal`, :mod:`~bnn_align.flatness`,
  :mod:`~bnn_align.diagnostics`;
* studies of many cells on Ray: :mod:`bnn_align.sweep`; the command line: :mod:`~bnn_align.cli`.
"""

import warnings

with warnings.catch_warnings():
    # tqdm.auto warns in notebooks without ipywidgets; its text progress bars still work
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

from . import diagnostics, guides
from .bayesian import BayesianNetwork, Categorical, FanInPrior, Gaussian, NormalPrior, fit
from .diagnostics import to_inference_data
from .marginal import Barrier, LossCurve, marginal_loss
from .matching import (Alignment, MultiAlignment, SampleAlignment, align_samples,
                       alignment_cost, match, match_many, merge, repair)
from .paths import Curve, Path, fit_curve, interpolate
from .posterior import GaussianView, as_gaussian
from .samples import SamplePosterior
from .symmetry import PermutationSpec, permute, spec_from_module
from .symmetry import ScaleSymmetry, canonicalize, rescale
from .flatness import LocalEnergy, local_energy

__version__ = "0.1.0"

__all__ = [
    "Alignment", "Barrier", "BayesianNetwork", "Categorical", "Curve", "FanInPrior", "Gaussian",
    "GaussianView", "LossCurve", "MultiAlignment", "NormalPrior", "Path", "PermutationSpec",
    "SampleAlignment", "SamplePosterior", "align_samples", "alignment_cost", "as_gaussian",
    "fit", "fit_curve", "diagnostics", "guides", "interpolate", "marginal_loss", "match",
    "match_many", "merge", "permute", "repair", "spec_from_module", "to_inference_data",
    "ScaleSymmetry", "canonicalize", "rescale", "LocalEnergy", "local_energy",
]
