"""EMA of weights: the update rule by hand, the warm-up, and that checkpoints rebuild from EMA weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldm.models.ema import ema_decay_at, ema_update


def test_ema_update_by_hand():
    model, ema = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(2.0), ema.weight.fill_(0.0), ema.bias.fill_(0.0)
    ema_update(ema, model, decay=0.9)
    assert ema.weight.flatten().tolist() == pytest.approx([0.1, 0.1])
    assert ema.bias.item() == pytest.approx(0.2)
    ema_update(ema, model, decay=0.9)
    assert ema.bias.item() == pytest.approx(0.9 * 0.2 + 0.1 * 2.0)


def test_ema_warmup():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**7, 0.999) == 0.999
    assert ema_decay_at(0, 0.999, warmup=False) == 0.999


def test_ema_update_with_pairs_matched_once_equals_matching_every_step():
    """The training modules match the EMA's tensors with the model's once per fit (``ema_pairs``) instead of walking
    both module trees every step; the updates are the same, bit for bit, the device-weighted ones too."""
    from ldm.models.ema import ema_pairs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    once, every = copy.deepcopy(model), copy.deepcopy(model)
    pairs = ema_pairs(once, model)
    for step, applied in enumerate([True, torch.tensor(True), torch.tensor(False), True]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model[1](torch.randn(2, 4, 5, 5))  # buffers move too
        ema_update(once, model, 0.9, applied=applied, pairs=pairs)
        ema_update(every, model, 0.9, applied=applied)
        for (name, a), b in zip(once.state_dict().items(), every.state_dict().values(), strict=True):
            assert torch.equal(a, b), (step, name)
    assert not torch.equal(once[0].weight, model[0].weight)
