"""One integer validator for every public function: same acceptance, same message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnn_align import data, models


def _digits_stub() -> data.DataSplit:
    return data.DataSplit(name="stub", x_train=torch.zeros(5, 2), y_train=torch.zeros(5).long(),
                          x_test=torch.zeros(3, 2), y_test=torch.zeros(3).long(), num_classes=2)


@pytest.mark.parametrize("build, name", [
    (lambda v: models.mlp(4, [8, v], 3), "widths[1]"),
    (lambda v: models.mlp(v, [8], 3), "in_features"),
    (lambda v: models.cnn1d(1, 16, 3, channels=[4, v]), "channels[1]"),
    (lambda v: models.resnet(depth=8, width=v, dim=1, in_channels=1), "width"),
    (lambda v: _digits_stub().subset(num_train=v), "num_train"),
])
def test_every_builder_refuses_bools_and_non_positive_values_by_name(build, name):
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match=rf"{name.replace('[', '.').replace(']', '.')} must be "
                                             rf"(a positive integer|an integer in)"):
            build(bad)
    build(np.int64(2))  # numpy integers are integers


def test_every_positive_number_argument_refuses_bools_infinities_and_non_positive_values():
    from bnn_align import BayesianNetwork, FanInPrior, NormalPrior, fit, guides

    model = BayesianNetwork(models.mlp(2, [4], 2), input_shape=(2,))
    guide = guides.mean_field(model)
    data_pair = (torch.zeros(4, 2), torch.zeros(4).long())
    cases = [(lambda v: NormalPrior(v), "prior scale"),
             (lambda v: FanInPrior(gain=v), "FanInPrior gain"),
             (lambda v: guides.mean_field(model, init_scale=v), "init_scale"),
             (lambda v: fit(model, guide, data_pair, epochs=1, lr=v, progress=False), "lr")]
    for build, name in cases:
        for bad in (0, -1.0, True, float("inf"), float("nan"), "1"):
            with pytest.raises(ValueError, match=f"{name} must be a positive finite number"):
                build(bad)
    assert NormalPrior(np.float32(0.5)).scale == 0.5  # numpy reals are reals
