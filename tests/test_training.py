"""The training settings real models need: optimiser, schedule with warm-up, clipping, precision's rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from netshrink.config import Optimisation
from netshrink.training import autocast_for, lr_factor, make_optimizer, train


def test_warm_up_rises_linearly_then_cosine_decays_to_zero():
    factors = [lr_factor(step, total_steps=10, warmup_steps=2, schedule="cosine") for step in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0) and all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert [lr_factor(step, 10, 0, "constant") for step in range(10)] == [1.0] * 10  # the default: today's recipe


def test_the_optimizer_named_with_its_decay_and_momentum():
    parameters = [nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(parameters, Optimisation(optimizer="sgd", momentum=0.9, weight_decay=0.01), lr=0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 0.01
    assert isinstance(make_optimizer(parameters, Optimisation(optimizer="adamw"), lr=0.1), torch.optim.AdamW)
    assert type(make_optimizer(parameters, Optimisation(), lr=0.1)) is torch.optim.Adam


def test_clipping_bounds_the_step_and_mixed_precision_is_refused_on_the_cpu():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4) * 1000, torch.randint(0, 2, (8,)))
    moved = {}
    for clip in (None, 0.01):
        torch.manual_seed(1)
        model = nn.Linear(4, 2)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train(model, data, epochs=1, lr=1.0, batch_size=8, seed=0, settings=Optimisation(optimizer="sgd", grad_clip=clip))
        moved[clip] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())
    # one SGD step of lr 1 moves the parameters by the gradient: clipped, by its bound (to float32 rounding)
    assert moved[0.01] == pytest.approx(0.01, rel=1e-3) and moved[None] > 10
    with pytest.raises(ValueError, match="precision: bf16 needs CUDA"):
        autocast_for("bf16", torch.device("cpu"))
